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

import os
import tempfile
from pathlib import Path

from ...validate import check_out_dir
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


def _write_new(target, text):
    """Write ``text`` into the new file ``target``, whole or not at all, never over an existing file.

    The text goes to a temporary file beside it first, hard-linked to ``target`` only when
    complete (a link, unlike a rename, refuses an existing target), so a full disk or a
    Ctrl-C never leaves a truncated notebook, which a later ``start`` would keep.
    Returns False (writing nothing) if ``target`` already exists.
    """
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)              # mkstemp makes 0600; open() would not
        try:
            os.link(tmp, target)
        except FileExistsError:
            return False
        except OSError:                            # a file system without hard links
            if target.exists():
                return False
            os.replace(tmp, target)
        return True
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def start(dest=DEFAULT_DIR):
    """Copy every student notebook into ``dest`` (created if needed), keeping existing files.

    Returns:
        ``(copied, kept)``: the paths written and the paths that already existed
        (left exactly as they were).

    Raises:
        ValueError: ``dest`` is empty (which would mean the current folder), is a file or
            lies under one, cannot be created or is not writable; nothing is copied.
    """
    notebooks = student_notebooks()
    dest = Path(check_out_dir("dest", dest))       # created here, once it is known to be possible
    copied, kept = [], []
    for nb in notebooks:
        target = dest / nb.name
        text = nb.read_text(encoding="utf-8")
        if BEGIN in text:       # a guard: a learner's copy never carries the solutions
            raise RuntimeError(f"{nb} contains solution markers; it is not a student notebook")
        if target.exists() or not _write_new(target, text):    # never overwrite, even in a race
            kept.append(target)
        else:
            copied.append(target)
    return copied, kept
