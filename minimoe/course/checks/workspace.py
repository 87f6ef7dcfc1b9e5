"""The learner's own copy of the lessons: ``python -m minimoe.checks start [DIR]``.

The notebooks in the repository's ``lessons/`` are tracked by git and checked by
the tests, so answers saved there make ``git pull`` conflict and the tests fail.
``start`` copies the student notebooks into a folder of the learner's own
(default ``./my-lessons``, which the repository's ``.gitignore`` ignores) and
never overwrites a file that is already there, so running it again only adds
lessons that are new since last time.

Where the notebooks come from: in a clone, ``lessons/NN_*.ipynb`` as they are
(so work already saved there moves along); in an installed wheel, the copies
shipped as package data in ``minimoe/course/student_notebooks/`` (``setup.py``
puts them there when the wheel is built). Solution notebooks are never copied.
"""
from __future__ import annotations

from pathlib import Path

from .build import BEGIN, repository_root

__all__ = ["DEFAULT_DIR", "PACKAGED", "student_notebooks", "start"]

DEFAULT_DIR = "my-lessons"
PACKAGED = Path(__file__).resolve().parents[1] / "student_notebooks"
_PATTERN = "[0-9][0-9]_*.ipynb"


def student_notebooks():
    """The student notebooks, in lesson order: the clone's ``lessons/``, else the packaged copies."""
    root = repository_root()
    folder = root / "lessons" if root is not None else PACKAGED
    found = sorted(folder.glob(_PATTERN))
    if not found:
        raise FileNotFoundError(f"no student notebooks ({_PATTERN}) in {folder}: this minimoe was "
                                f"installed without its lessons; reinstall it from a wheel or a clone")
    return found


def start(dest=DEFAULT_DIR):
    """Copy every student notebook into ``dest`` (created if needed), keeping existing files.

    Returns:
        ``(copied, kept)``: the paths written and the paths that already existed
        (left exactly as they were).
    """
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise NotADirectoryError(f"{dest} exists and is not a folder; choose another DIR")
    notebooks = student_notebooks()
    dest.mkdir(parents=True, exist_ok=True)
    copied, kept = [], []
    for nb in notebooks:
        target = dest / nb.name
        text = nb.read_text(encoding="utf-8")
        if BEGIN in text:       # a guard: a learner's copy never carries the solutions
            raise RuntimeError(f"{nb} contains solution markers; it is not a student notebook")
        if target.exists():
            kept.append(target)
            continue
        try:
            with open(target, "x", encoding="utf-8") as f:     # "x": never overwrite, even in a race
                f.write(text)
        except FileExistsError:
            kept.append(target)
            continue
        copied.append(target)
    return copied, kept
