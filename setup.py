"""Packaging hook (all metadata is in pyproject.toml): ship the student notebooks in the wheel.

The lessons live in ``lessons/`` at the top of the repository, outside the ``minimoe``
package. A wheel built from a clone or an sdist gets a copy of the *student* notebooks
(``lessons/NN_*.ipynb``, never the solutions or the sources) as package data in
``minimoe/course/student_notebooks/``, so ``python -m minimoe.checks start`` works
from an installed wheel. An editable install skips the copy: there
``minimoe.course.checks.workspace`` reads ``lessons/`` in the clone itself.
"""
import glob
import os

from setuptools import setup
from setuptools.command.build_py import build_py


class build_py_with_lessons(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        notebooks = sorted(glob.glob(os.path.join("lessons", "[0-9][0-9]_*.ipynb")))
        if not notebooks:
            raise SystemExit("setup.py: no student notebooks in lessons/ to ship; "
                             "build them with `python -m minimoe.checks build`")
        target = os.path.join(self.build_lib, "minimoe", "course", "student_notebooks")
        self.mkpath(target)
        for nb in notebooks:
            self.copy_file(nb, os.path.join(target, os.path.basename(nb)))


setup(cmdclass={"build_py": build_py_with_lessons})
