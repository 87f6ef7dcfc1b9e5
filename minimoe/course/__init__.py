"""Chapter 5 — the course: what the lessons are graded, drawn and built with.

    checks/     the graders, one module per lesson (``from minimoe.checks import lesson01``),
                the progress report, the lesson build, the learner's copy (workspace.py:
                ``checks start``) and the nbgrader course (nbgrader_course.py, its runner
                and its report; the teacher's guide is docs/teaching.md)
    student_notebooks/  (in an installed wheel only) the student notebooks, for ``checks start``
    bugs.py     the bug hunt: real MoE bugs that autograd hid, and the check that catches each
    viz/        every plot of the demo, the README and the lessons, one module per theme
    figures.py  regenerates every PNG in ``figures/`` (``python -m minimoe.figures``)
"""
