"""Graders for the lessons: every exercise is checked the moment it runs.

In a lesson notebook::

    from minimoe.course.checks import lesson01 as check
    ...
    check.ffn_forward(ffn_forward)      # ✔ … or ✘ with what is wrong
    ...
    check.progress()                    # the lesson's table: exercises passed / total

Each ``lessonNN`` module holds one grader per exercise. A grader runs the
learner's function on fresh seeded inputs, compares it with minimoe's own
implementation or with finite differences, and prints one line that starts with
✔ (and says what was checked) or ✘ (and says what is wrong, with a targeted hint
for the typical mistakes). It never raises — except under nbgrader's autograde and
validate (or with ``MINIMOE_STRICT=1``), so that a failed check scores 0, and when a
graded course calls it with ``points=`` (strict whatever the notebook does). The
framework is in :mod:`minimoe.course.checks.grading` (verdicts, graded mode, calling the
learner's code) and :mod:`minimoe.course.checks.compare` (explaining a wrong answer);
around it, :mod:`~minimoe.course.checks.progress` (the tables),
:mod:`~minimoe.course.checks.build` (notebooks from ``lessons/src/``),
:mod:`~minimoe.course.checks.workspace` (the learner's copy),
:mod:`~minimoe.course.checks.nbgrader_course` (a course directory for nbgrader),
:mod:`~minimoe.course.checks.nbgrader_execute` (its notebook runner) and
:mod:`~minimoe.course.checks.nbgrader_report` (tampering, per student). The teacher's
guide: ``docs/teaching.md``.

From a shell::

    python -m minimoe.checks start [DIR]     # copy the student notebooks into ./my-lessons (or DIR)
    python -m minimoe.checks                 # progress over ./my-lessons, from the saved outputs
    python -m minimoe.checks --run           # … executing (copies of) the notebooks afresh
    python -m minimoe.checks build [--check] # build the notebooks from lessons/src/ (in a clone)
    python -m minimoe.checks nbgrader DIR    # write an nbgrader course directory (in a clone)
    python -m minimoe.checks nbgrader report DIR   # what a teacher should look at after autograde
"""
from .compare import expect_array, expect_grads, expect_number, numeric_grads  # noqa: F401
from .grading import (LESSONS, Blank, CheckFailed, Fail, Lesson, Result, call, part, reset,  # noqa: F401
                      results, strict)

__all__ = ["LESSONS", "Lesson", "Result", "Fail", "Blank", "CheckFailed", "call", "part", "expect_array",
           "expect_grads", "expect_number", "numeric_grads", "results", "reset", "strict"]
