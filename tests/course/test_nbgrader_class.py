"""A class graded by real nbgrader, as docs/teaching.md tells a teacher to run it.

One course from ``python -m minimoe.checks nbgrader DIR``; lessons 01, 10 and 11 released
with ``generate_assignment``; submissions from a blank, a full, a partial (lesson 10: right
checks, no fixes) and cheating students; one ``autograde`` per lesson; then
``generate_feedback`` and ``python -m minimoe.checks nbgrader report``. The cheats are the
three switches that used to turn grading off — ``MINIMOE_STRICT=0`` set in an answer cell,
the grading module's ``strict`` replaced, ``check`` rebound to an object whose checks all
pass — and a student who edits one locked check cell and deletes another.

Needs nbgrader (``pip install -e ".[teacher]"``); skipped without it, unless
``MINIMOE_REQUIRE_NBGRADER=1`` (as in CI). Marked ``nbgrader`` and ``notebooks``."""
import os
import re
import subprocess
import sys

import nbformat
import pytest

from minimoe.course.checks import build as B
from minimoe.course.checks.__main__ import main

pytestmark = [pytest.mark.nbgrader, pytest.mark.notebooks]
L01, L10, L11 = "01_the_specialist", "10_the_bug_hunt", "11_a_network_of_clinics"

CHEATS = {
    "cheat_env": 'import os\nos.environ["MINIMOE_STRICT"] = "0"\n',
    "cheat_strict": ("import minimoe.course.checks.grading as grading\n"
                     "try:\n    grading.strict = lambda: False\n"
                     "except AttributeError:\n    vars(grading)['strict'] = lambda: False\n"),
    "cheat_check": ("class AllPass:\n    def __getattr__(self, name):\n        return lambda *a, **kw: None\n\n\n"
                    "check = AllPass()\n"),
}


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


def nbgrader(course, env, *args):
    proc = subprocess.run([sys.executable, "-m", "nbgrader", *args], cwd=course, env=env,
                          capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout + proc.stderr


def solution_regions(text):
    """The solution regions of a source cell, as (start, end) line indices."""
    lines = text.split("\n")
    starts = [i for i, s in enumerate(lines) if s.strip() == B.BEGIN]
    ends = [i for i, s in enumerate(lines) if s.strip() == B.END]
    return lines, list(zip(starts, ends))


def answer(source_cell, keep):
    """A source exercise cell with only the solution regions numbered in ``keep`` written (0-based)."""
    lines, regions = solution_regions(source_cell.source)
    out, prev = [], 0
    for n, (b, e) in enumerate(regions):
        indent = lines[b][: len(lines[b]) - len(lines[b].lstrip())]
        out += lines[prev:b] + (lines[b + 1:e] if n in keep else [indent + s for s in B.CODE_STUB])
        prev = e + 1
    return "\n".join(out + lines[prev:])


def submit(course, student, lesson, edit):
    """Write submitted/<student>/<lesson>/: the released notebook changed by ``edit(nb, source_cells)``."""
    release = nbformat.read(course / "release" / lesson / f"{lesson}.ipynb", as_version=4)
    source = nbformat.read(course / "source" / lesson / f"{lesson}.ipynb", as_version=4)
    by_id = {c.metadata.get("nbgrader", {}).get("grade_id"): c for c in source.cells}
    edit(release, by_id)
    folder = course / "submitted" / student / lesson
    folder.mkdir(parents=True)
    nbformat.write(release, folder / f"{lesson}.ipynb")


def gid(cell):
    return cell.metadata.get("nbgrader", {}).get("grade_id")


def fill(keep=None):
    """Answer every code exercise (``keep``: which solution regions of each cell; None: all)."""
    def edit(nb, by_id):
        for cell in nb.cells:
            if cell.cell_type == "code" and (gid(cell) or "").startswith("ex-"):
                src = by_id[gid(cell)]
                cell.source = answer(src, keep if keep is not None else range(99))
    return edit


def blank(nb, by_id):
    pass


def cheat(code):
    def edit(nb, by_id):
        first = next(c for c in nb.cells if (gid(c) or "").startswith("ex-"))
        first.source = code + "\n" + first.source
    return edit


def tamper(nb, by_id):
    fill()(nb, by_id)
    changed = next(c for c in nb.cells if gid(c) == "check-ffn_forward")
    changed.source = "pass  # " + changed.source.replace("\n", " ")
    nb.cells = [c for c in nb.cells if gid(c) != "check-ffn_backward"]


@pytest.fixture(scope="module")
def course(tmp_path_factory, nbgrader_env):
    course = tmp_path_factory.mktemp("class")
    assert main(["nbgrader", str(course)]) == 0
    logs = {}
    for lesson in (L01, L10, L11):
        logs[("generate", lesson)] = nbgrader(course, nbgrader_env, "generate_assignment", lesson)
    students = {L01: {"blank": blank, "full": fill(), "tamper": tamper,
                      **{name: cheat(code) for name, code in CHEATS.items()}},
                L10: {"blank": blank, "partial": fill(keep={0}), "full": fill(),
                      "cheat_check": cheat(CHEATS["cheat_check"])},
                L11: {"blank": blank, "full": fill(), "cheat_env": cheat(CHEATS["cheat_env"]),
                      "cheat_check": cheat(CHEATS["cheat_check"])}}
    for lesson, who in students.items():
        for student, edit in who.items():
            submit(course, student, lesson, edit)
        logs[("autograde", lesson)] = nbgrader(course, nbgrader_env, "autograde", lesson)
    logs[("feedback", L01)] = nbgrader(course, nbgrader_env, "generate_feedback", L01)
    return course, logs


def scores(course, lesson):
    from nbgrader.api import Gradebook
    with Gradebook(f"sqlite:///{course / 'gradebook.db'}") as gb:
        return {s.student.id: (s.code_score, s.max_code_score) for s in gb.find_assignment(lesson).submissions}


def test_the_released_notebook_is_our_graded_student_build(course):
    course, _ = course
    for lesson in (L01, L10):
        release = nbformat.read(course / "release" / lesson / f"{lesson}.ipynb", as_version=4)
        ours = B.build_notebook(B.default_lessons_dir() / "src" / f"{lesson}.py", "student", graded="detailed")
        assert [c.source for c in release.cells] == [c.source for c in ours.cells]
        checks = [c.source for c in release.cells if (gid(c) or "").startswith("check-")]
        assert checks and all(s.startswith(f"from minimoe.course.checks import lesson{lesson[:2]} as check")
                              and "points=" in s for s in checks)


def test_blank_scores_zero_and_the_solution_full_marks(course):
    course, _ = course
    for lesson, top in ((L01, 5), (L10, 14), (L11, 3)):
        got = scores(course, lesson)
        assert got["blank"] == (0, top) and got["full"] == (top, top), (lesson, got)


def test_no_switch_turns_grading_off(course):
    course, _ = course
    for lesson in (L01, L11):
        got = scores(course, lesson)
        cheats = {s: v for s, v in got.items() if s.startswith("cheat_")}
        assert cheats and all(v[0] == 0 for v in cheats.values()), (lesson, got)
    assert scores(course, L10)["cheat_check"][0] == 0


def test_lesson10_check_and_fix_earn_partial_credit(course):
    course, _ = course
    assert scores(course, L10)["partial"] == (7, 14)          # 7 right checks, 7 missing fixes


def test_a_tampered_and_a_deleted_locked_cell_are_restored_graded_and_reported(course, capsys):
    course, _ = course
    assert scores(course, L01)["tamper"] == (5, 5)             # both checks put back, run, and passed
    assert main(["nbgrader", "report", str(course)]) == 1
    out = capsys.readouterr().out
    block = out[out.index(L01):out.index(L10)]
    tamper = block[block.index("tamper"):]
    assert "changed locked cell check-ffn_forward" in tamper and "deleted locked cell check-ffn_backward" in tamper
    for student, fragment in (("cheat_env", "uses `os.environ`"), ("cheat_strict", "uses `grading.strict`"),
                              ("cheat_check", "rebinds `check`")):
        line = block[block.index(student):]
        assert fragment in line.split("\n  ")[0] + line, (student, block)
    assert re.search(r"✔ full +code 5/5 +nothing to look at", block), block
    assert re.search(r"✔ blank +code 0/5 +nothing to look at", block), block


def test_feedback_is_one_message_per_failure_without_a_traceback(course):
    course, _ = course
    html = (course / "feedback" / "blank" / L01 / f"{L01}.html").read_text()
    assert html.count("not written yet") == 5, "each of the 5 exercises once"
    assert "grading.py" not in html and "Traceback (most recent call last)" not in html
    assert 'File "' not in html and "minimoe/course" not in html          # no frame of the graders


def test_validate_shows_the_message_whole(course, nbgrader_env):
    course, _ = course
    proc = subprocess.run([sys.executable, "-m", "nbgrader", "validate",
                           str(course / "submitted" / "blank" / L01 / f"{L01}.ipynb")],
                          cwd=course, env=nbgrader_env, capture_output=True, text=True, timeout=1200)
    out = proc.stdout + proc.stderr
    assert "VALIDATION FAILED" in out
    shown = [line for line in out.splitlines() if line.startswith("    ")]   # the cells and their errors
    assert shown and not any(line.endswith("...") for line in shown), out       # nothing cut at 87 columns
    words = " ".join(out.split())
    assert ("✘ 01.ffn_forward — ffn_forward is not written yet: replace `raise NotImplementedError()` with your "
            "code, run its cell, then run this check again.") in words, out[-3000:]


def test_nbgrader_runs_without_warnings(course):
    """No SQLAlchemy or kernel warnings. (Lesson 01's class has a student who deleted a check cell:
    nbgrader logs that, and nbformat warns about the id of the cell nbgrader puts back.)"""
    _, logs = course
    for (step, lesson), log in logs.items():
        if (step, lesson) == ("autograde", L01):
            log = log.replace("MissingIDFieldWarning: Cell is missing an id field", "")
        assert "SAWarning" not in log and "Warning:" not in log, (step, lesson, log[-3000:])
        assert "Kernel is running over TCP" not in log, (step, lesson)
        if step == "generate" or lesson != L01:
            assert "WARNING" not in log, (step, lesson, log[-3000:])


def test_a_cell_that_ignores_the_interrupt_costs_only_that_cell(nbgrader_env, tmp_path):
    """minimoe's Execute (the course config's runner): nbgrader alone would drop the whole submission."""
    from nbformat.v4 import new_code_cell, new_notebook

    from minimoe.course.checks.nbgrader_execute import Execute
    stubborn = ("import time\nwhile True:\n    try:\n        time.sleep(0.05)\n"
                "    except KeyboardInterrupt:\n        pass")
    nb = new_notebook(cells=[new_code_cell("x = 1"), new_code_cell(stubborn), new_code_cell("print(x + 1)")])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    out, _ = Execute(timeout=3).preprocess(nb, {"metadata": {"path": str(tmp_path)}})
    assert [o.get("ename") for o in out.cells[1].outputs] == ["CellTimeoutError"]
    assert "ignored the interrupt" in out.cells[1].outputs[0].evalue
    assert [o.get("text") for o in out.cells[2].outputs] == ["2\n"]       # the cells above ran again


def test_a_submission_that_ignores_the_interrupt_is_still_graded_with_feedback(nbgrader_env, tmp_path, capsys):
    """Through nbgrader itself, with the course's config: the stuck answer cell loses its check only."""
    course = tmp_path / "course"
    assert main(["nbgrader", str(course), "--timeout", "30"]) == 0
    nbgrader(course, nbgrader_env, "generate_assignment", L01)
    stubborn = ("import time\nwhile True:\n    try:\n        time.sleep(0.05)\n"
                "    except KeyboardInterrupt:\n        pass\n")

    def stuck(nb, by_id):
        fill()(nb, by_id)
        cell = next(c for c in nb.cells if gid(c) == "ex-rel_error")
        cell.source = stubborn + cell.source
    submit(course, "stuck", L01, stuck)
    nbgrader(course, nbgrader_env, "autograde", L01)
    assert scores(course, L01)["stuck"] == (4, 5)              # every check but the stuck cell's
    nbgrader(course, nbgrader_env, "generate_feedback", L01)
    assert "ignored the interrupt" in (course / "feedback" / "stuck" / L01 / f"{L01}.html").read_text()
    capsys.readouterr()
    main(["nbgrader", "report", str(course)])
    assert "ex-rel_error timed out" in capsys.readouterr().out
