"""A ready nbgrader course: ``python -m minimoe.checks nbgrader DIR``.

(Named ``nbgrader_course`` so that it is never mistaken for nbgrader itself.)

Writes, from the lesson sources of a clone,

    DIR/nbgrader_config.py
    DIR/source/<lesson>/<lesson>.ipynb     (one assignment per lesson, e.g. 04_a_noisy_gp)

The source notebooks are the solution builds with nbgrader's own markers and cell
metadata (autograded answers, locked autograder tests, manually graded text answers),
except that each locked check cell imports its grader itself and calls it *graded*::

    from minimoe.course.checks import lesson10 as check  # the grader itself (locked)
    check.mixed_units(load_is_honest, fixed_smooth_load, points=2)

so no answer cell can switch grading off (not by the environment, not by replacing
``strict``, not by rebinding ``check``), and a check worth several points earns them part by
part. The points are those the lesson source declares (``build``). Then, from DIR, with
zero edits::

    nbgrader generate_assignment 04_a_noisy_gp
    nbgrader autograde 04_a_noisy_gp          # after collecting submitted/<student>/04_a_noisy_gp/
    python -m minimoe.checks nbgrader report DIR     # what a teacher should look at

An existing ``nbgrader_config.py`` or source notebook that differs from what would be
written is never replaced without ``force``. The kernel that grades must import minimoe
(install ``minimoe[course,teacher]``). The teacher's guide is ``docs/teaching.md``.
"""
from __future__ import annotations

import math
from pathlib import Path

from ...validate import check_int
from .build import build_notebook, default_lessons_dir, lesson_sources, notebook_text

__all__ = ["CONFIG", "SLOWEST_CELL_S", "TIMEOUT_MARGIN", "default_timeout", "write_course", "planned_files"]

# The slowest cell of each lesson's solution, in seconds, measured by executing every solution
# notebook (nbclient, one kernel each) on the project's 2-core machine while it was shared with
# other work (load average 6-9, so about twice an idle machine's times); docs/teaching.md gives
# the table and how to measure again. (11: its two cells that run the parallel layer failed
# on that branch and were not timed. 12: measured later, 2026-12-05, at load average about 2.)
SLOWEST_CELL_S = {
    "00_the_clinic": 5.35, "01_the_specialist": 4.65, "02_the_gp": 6.12, "03_the_referral": 9.17,
    "04_a_noisy_gp": 7.62, "05_overworked_specialists": 16.86, "06_appointment_books": 12.37,
    "07_the_whole_clinic": 14.04, "08_what_specialists_learn": 15.68, "09_beyond_the_gp": 28.1,
    "10_the_bug_hunt": 7.8, "11_a_network_of_clinics": 7.59,
    "12_real_patients": 16.52,
}
# A cell may take this many times its measured time (a slower or busier grading machine)
# before nbgrader interrupts it; the limit is rounded up to whole minutes.
TIMEOUT_MARGIN = 10


def default_timeout(slowest=None, margin=TIMEOUT_MARGIN):
    """nbgrader's seconds per cell: ``margin`` × the slowest measured cell, rounded up to a minute."""
    slowest = max((slowest or SLOWEST_CELL_S).values())
    return int(60 * math.ceil(margin * slowest / 60))


CONFIG = '''\
# nbgrader configuration for the minimoe lessons, written by `python -m minimoe.checks nbgrader`.
# Run nbgrader from this folder: it is the course directory. The teacher's guide is
# docs/teaching.md in minimoe's repository. `checks nbgrader` never replaces this file once
# you have edited it, unless you pass --force.
c = get_config()  # noqa: F821  (nbgrader provides get_config)

c.CourseDirectory.course_id = "minimoe"
# One assignment per lesson, named like its notebook: {assignments}.
# `nbgrader generate_assignment <lesson>` adds it to the gradebook (gradebook.db here).

# The student version nbgrader makes is the one in the repository's lessons/ (but for the
# check cells, which here import their grader themselves and grade with points=).
c.ClearSolutions.code_stub = {{"python": "# YOUR CODE HERE\\nraise NotImplementedError()"}}
c.ClearSolutions.text_stub = "YOUR ANSWER HERE"

# Submissions from students not yet in the gradebook are graded, and the students added.
c.Autograde.create_student = True
# A check cell the student deleted is put back and graded (and the report names the student).
c.OverwriteCells.add_missing_cells = True

# Seconds per cell: {margin}x the slowest cell measured ({slowest} s), rounded up to a minute.
c.Execute.timeout = {timeout}
c.Execute.interrupt_on_timeout = True
# minimoe's runner: a cell that ignores the interrupt scores 0 and the kernel is restarted,
# instead of nbgrader dropping the whole submission (minimoe/course/checks/nbgrader_execute.py).
c.Autograde.autograde_preprocessors = [
    "minimoe.course.checks.nbgrader_execute.Execute",
    "nbgrader.preprocessors.IgnorePattern",
    "nbconvert.preprocessors.ClearMetadataPreprocessor",
    "nbgrader.preprocessors.LimitOutput",
    "nbgrader.preprocessors.SaveAutoGrades",
    "nbgrader.preprocessors.AssignLatePenalties",
    "nbgrader.preprocessors.CheckCellMetadata",
]
# The grading kernel talks to nbgrader over loopback TCP; ipykernel >= 7 warns about that
# on every start. Its other messages (errors) still show.
c.Execute.extra_arguments = ["--HistoryManager.hist_file=:memory:", "--IPKernelApp.log_level=ERROR"]

# Feedback: {feedback!r} ("detailed": the graders' hints, as in self-study; "summative": the
# first sentence of each failure, what is wrong without how to fix it). It is written into
# each check cell of source/: run `python -m minimoe.checks nbgrader . --feedback ... --force`
# to change it, then generate_assignment again.
'''


def planned_files(dest, lessons_dir=None, timeout=None, feedback="detailed"):
    """``{path: text}``: every file :func:`write_course` would write into ``dest``."""
    if feedback not in ("detailed", "summative"):
        raise ValueError(f"feedback must be 'detailed' or 'summative', got {feedback!r}")
    timeout = default_timeout() if timeout is None else check_int("timeout", timeout, low=1)
    lessons_dir = Path(lessons_dir or default_lessons_dir("python -m minimoe.checks nbgrader"))
    sources = lesson_sources(lessons_dir)
    if not sources:
        raise FileNotFoundError(f"no lesson sources in {lessons_dir / 'src'}")
    dest = Path(dest)
    files = {}
    for src in sources:
        nb = build_notebook(src, "solution", graded=feedback)
        files[dest / "source" / src.stem / f"{src.stem}.ipynb"] = notebook_text(nb)
    files[dest / "nbgrader_config.py"] = CONFIG.format(
        assignments=", ".join(s.stem for s in sources), timeout=timeout, feedback=feedback,
        margin=TIMEOUT_MARGIN, slowest=max(SLOWEST_CELL_S.values()))
    return files


def write_course(dest, lessons_dir=None, timeout=None, feedback="detailed", force=False):
    """Write the nbgrader course directory ``dest``; returns the source notebook paths.

    ``timeout``: nbgrader's seconds per cell, a whole number >= 1 (nbclient reads 0 or a
    negative number as *no limit*, so a hung cell would block grading forever); default
    :func:`default_timeout`. ``feedback``: ``"detailed"`` or ``"summative"`` (see
    :func:`~minimoe.course.checks.grading.summary`).

    A file already in ``dest`` that differs from what would be written (an edited
    ``nbgrader_config.py``, a changed source notebook) is replaced only with ``force``;
    otherwise ``FileExistsError`` names them all and nothing is written. Nothing else in
    ``dest`` (gradebook, release, submissions, feedback) is touched.
    """
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise NotADirectoryError(f"{dest} exists and is not a folder; choose another DIR")
    files = planned_files(dest, lessons_dir, timeout, feedback)
    differ = [p for p, text in files.items() if p.exists() and p.read_text(encoding="utf-8") != text]
    if differ and not force:
        names = ", ".join(str(p.relative_to(dest)) for p in differ)
        raise FileExistsError(f"{len(differ)} file(s) in {dest} differ from what would be written and are "
                              f"kept: {names}. Pass --force to replace them (an edited nbgrader_config.py "
                              f"loses its edits), or write the course into another folder")
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
    return [p for p in files if p.suffix == ".ipynb"]
