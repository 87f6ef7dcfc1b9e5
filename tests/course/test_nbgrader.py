"""A real nbgrader course from ``python -m minimoe.checks nbgrader DIR``: with zero edits,
``generate_assignment`` makes our student notebook, ``autograde`` gives a blank submission
0 code points, a partial one some and the solution full marks, and ``validate`` fails an
incomplete notebook — because the course's check cells call their graders graded
(``points=``). The class as a teacher grades it: ``test_nbgrader_class.py``.

Needs nbgrader (``pip install -e ".[teacher]"``); skipped without it, unless
``MINIMOE_REQUIRE_NBGRADER=1`` (as in CI), where its absence fails. Marked ``nbgrader``
and ``notebooks`` (it executes notebooks), so ``-m "not notebooks"`` skips it."""
import os
import subprocess
import sys

import nbformat
import pytest

from minimoe.course.checks import build as B
from minimoe.course.checks.__main__ import main

pytestmark = [pytest.mark.nbgrader, pytest.mark.notebooks]
LESSON = "04_a_noisy_gp"          # small and quick; the course holds every lesson


@pytest.fixture(scope="module")
def nbgrader_env():
    try:
        import nbgrader  # noqa: F401
    except ImportError:
        if os.environ.get("MINIMOE_REQUIRE_NBGRADER", "").strip() not in ("", "0"):
            pytest.fail("nbgrader is not installed: pip install -e '.[teacher]'")
        pytest.skip("nbgrader is not installed (the teacher extra: pip install -e '.[teacher]')")
    env = {k: v for k, v in os.environ.items() if k not in ("MINIMOE_STRICT", "NBGRADER_EXECUTION")}
    env["MPLBACKEND"] = "Agg"
    return env


def _nbgrader(course, env, *args):
    timeout = float(os.environ.get("MINIMOE_NB_TIMEOUT", "900")) * 4
    proc = subprocess.run([sys.executable, "-m", "nbgrader", *args], cwd=course, env=env,
                          capture_output=True, text=True, timeout=timeout)
    return proc


def _submission(release, solution, fill):
    """The released notebook with the solution cells whose grade_id is in ``fill`` answered."""
    nb = nbformat.read(release, as_version=4)
    answers = {c.metadata.get("nbgrader", {}).get("grade_id"): c.source for c in solution.cells}
    for cell in nb.cells:
        gid = cell.metadata.get("nbgrader", {}).get("grade_id")
        if gid in fill:
            cell.source = answers[gid]
    return nb


@pytest.fixture(scope="module")
def course(tmp_path_factory, nbgrader_env):
    course = tmp_path_factory.mktemp("course")
    assert main(["nbgrader", str(course)]) == 0
    proc = _nbgrader(course, nbgrader_env, "generate_assignment", LESSON)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    release = course / "release" / LESSON / f"{LESSON}.ipynb"
    solution = nbformat.read(course / "source" / LESSON / f"{LESSON}.ipynb", as_version=4)
    answers = [c.metadata["nbgrader"]["grade_id"] for c in solution.cells
               if c.metadata.get("nbgrader", {}).get("solution")]
    exercises = [gid for gid in answers if gid.startswith("ex-")]     # code, not text answers
    assert len(exercises) >= 3
    subs = {"blank": [], "partial": exercises[:1], "full": answers}
    for student, fill in subs.items():
        folder = course / "submitted" / student / LESSON
        folder.mkdir(parents=True)
        nbformat.write(_submission(release, solution, fill), folder / f"{LESSON}.ipynb")
    proc = _nbgrader(course, nbgrader_env, "autograde", LESSON)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return course


def test_generate_assignment_makes_our_student_notebook(course):
    """lessons/' student notebook, but for the check cells, which import their grader and grade with points=."""
    release = nbformat.read(course / "release" / LESSON / f"{LESSON}.ipynb", as_version=4)
    src = B.default_lessons_dir() / "src" / f"{LESSON}.py"
    assert [c.source for c in release.cells] == [c.source for c in B.build_notebook(src, "student", graded="detailed").cells]
    lesson = B.build_notebook(src, "student")
    differ = [(a.source, b.source) for a, b in zip(release.cells, lesson.cells) if a.source != b.source]
    assert differ and all(a.startswith("from minimoe.course.checks import lesson04 as check")
                          and a.endswith(b[:-1] + ", points=1)") for a, b in differ)


def test_autograde_scores_blank_partial_and_solution(course):
    from nbgrader.api import Gradebook
    with Gradebook(f"sqlite:///{course / 'gradebook.db'}") as gb:
        scores = {s: gb.find_submission(LESSON, s) for s in ("blank", "partial", "full")}
        got = {s: (sub.code_score, sub.max_code_score) for s, sub in scores.items()}
    top = got["full"][1]
    assert top >= 3 and all(m == top for _, m in got.values()), got
    assert got["blank"][0] == 0, got
    assert 0 < got["partial"][0] < top, got
    assert got["full"][0] == top, got


def test_validate_fails_an_incomplete_notebook_and_passes_the_solution(course, nbgrader_env):
    blank = course / "submitted" / "blank" / LESSON / f"{LESSON}.ipynb"
    proc = _nbgrader(course, nbgrader_env, "validate", str(blank))
    out = proc.stdout + proc.stderr
    assert "passes all the tests" not in out and "VALIDATION FAILED" in out, out[-2000:]
    assert "✘ 04.softplus" in out and "not written yet" in out, "the graders themselves fail it"
    full = course / "submitted" / "full" / LESSON / f"{LESSON}.ipynb"
    proc = _nbgrader(course, nbgrader_env, "validate", str(full))
    assert "passes all the tests" in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-2000:]
