"""A ready nbgrader course: ``python -m minimoe.checks nbgrader DIR``.

(Named ``nbgrader_course`` so that it is never mistaken for nbgrader itself.)

Writes, from the lesson sources of a clone,

    DIR/nbgrader_config.py
    DIR/source/<lesson>/<lesson>.ipynb     (one assignment per lesson, e.g. 04_a_noisy_gp)

The source notebooks are the solution builds: nbgrader's own markers and cell
metadata (autograded answers, locked autograder tests worth one point per grader
call, manually graded text answers), from which ``nbgrader generate_assignment``
makes the same student version as ``lessons/``. Then, from DIR, with zero edits::

    nbgrader generate_assignment 04_a_noisy_gp
    nbgrader autograde 04_a_noisy_gp          # after collecting submitted/<student>/04_a_noisy_gp/

The graders are strict under nbgrader by themselves (see
:func:`minimoe.course.checks.grading.strict`): a failed check raises after printing
its verdict, so a blank exercise scores 0 and ``nbgrader validate`` reports it.
The kernel that grades must import minimoe (install ``minimoe[course,teacher]``).
"""
from __future__ import annotations

from pathlib import Path

from ...validate import check_int
from .build import build_notebook, default_lessons_dir, lesson_sources, notebook_text

__all__ = ["CONFIG", "write_course"]

CONFIG = '''\
# nbgrader configuration for the minimoe lessons, written by `python -m minimoe.checks nbgrader`.
# Run nbgrader from this folder: it is the course directory.
c = get_config()  # noqa: F821  (nbgrader provides get_config)

c.CourseDirectory.course_id = "minimoe"
# One assignment per lesson, named like its notebook: {assignments}.
# `nbgrader generate_assignment <lesson>` adds it to the gradebook (gradebook.db here).

# The student version nbgrader makes is the one in the repository's lessons/.
c.ClearSolutions.code_stub = {{"python": "# YOUR CODE HERE\\nraise NotImplementedError()"}}
c.ClearSolutions.text_stub = "YOUR ANSWER HERE"

# Submissions from students not yet in the gradebook are graded, and the students added.
c.Autograde.create_student = True

# Seconds per cell. Lesson 09 trains a small language model; on a loaded laptop a cell
# can take minutes. Graders are strict under nbgrader by themselves (NBGRADER_EXECUTION).
c.Execute.timeout = {timeout}
c.Execute.interrupt_on_timeout = True
'''


def write_course(dest, lessons_dir=None, timeout=900):
    """Write the nbgrader course directory ``dest``; returns the notebook paths written.

    Existing source notebooks and config are replaced (they are generated files);
    nothing else in ``dest`` (gradebook, submissions, feedback) is touched.

    ``timeout``: nbgrader's seconds per cell, a whole number >= 1 (nbclient reads 0 or a
    negative number as *no limit*, so a hung cell would block grading forever).
    """
    timeout = check_int("timeout", timeout, low=1)
    lessons_dir = Path(lessons_dir or default_lessons_dir("python -m minimoe.checks nbgrader"))
    sources = lesson_sources(lessons_dir)
    if not sources:
        raise FileNotFoundError(f"no lesson sources in {lessons_dir / 'src'}")
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise NotADirectoryError(f"{dest} exists and is not a folder; choose another DIR")
    written = []
    for src in sources:
        folder = dest / "source" / src.stem
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"{src.stem}.ipynb"
        target.write_text(notebook_text(build_notebook(src, "solution")), encoding="utf-8")
        written.append(target)
    assignments = ", ".join(s.stem for s in sources)
    (dest / "nbgrader_config.py").write_text(CONFIG.format(assignments=assignments, timeout=timeout),
                                             encoding="utf-8")
    return written
