"""The lesson notebooks: built from their sources, stored clean, no solution leaks, and —
executed top to bottom — every grader passes in the solutions and fails in the student
versions, with no other error in either."""
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nbformat
import pytest

from minimoe.course.checks import build as B
from minimoe.course.checks import progress as P
from minimoe.course.checks.grading import METADATA_KEY

LESSONS = Path(__file__).resolve().parents[2] / "lessons"
SOURCES = B.lesson_sources(LESSONS)
STEMS = [s.stem for s in SOURCES]


def test_lessons_00_to_04_exist():
    assert [s[:2] for s in STEMS][:5] == ["00", "01", "02", "03", "04"]
    for stem in STEMS:
        assert P.lesson_for(f"{stem}.ipynb") is not None, f"no graders for {stem}"


def test_built_notebooks_are_up_to_date():
    stale = B.build(LESSONS, check=True)
    assert stale == [], f"rebuild with `python -m minimoe.checks build`: {[str(p) for p in stale]}"


@pytest.mark.parametrize("kind", ["student", "solution"])
def test_notebooks_are_stored_without_outputs(kind):
    folder = LESSONS if kind == "student" else LESSONS / "solutions"
    for stem in STEMS:
        nb = nbformat.read(folder / f"{stem}.ipynb", as_version=4)
        nbformat.validate(nb)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, f"{stem}: outputs stored"


def _solution_lines(source_text):
    """Lines that appear only inside solution regions of a source (not in given code)."""
    inside, outside, in_region = set(), set(), False
    for line in source_text.splitlines():
        s = line.strip().lstrip("#").strip()
        if s in (B.BEGIN.lstrip("#").strip(), B.END.lstrip("#").strip()):
            in_region = s.startswith("BEGIN")
            continue
        if s:
            (inside if in_region else outside).add(s)
    return inside - outside


def _leaks(source_text, nb):
    """Solution-only lines of the source that appear in the notebook ``nb``."""
    shown = {line.strip().lstrip("#").strip() for c in nb.cells for line in c.source.splitlines()}
    return sorted(_solution_lines(source_text) & shown)


@pytest.mark.parametrize("stem", STEMS)
def test_no_solution_leaks_into_the_student_notebook(stem):
    src = (LESSONS / "src" / f"{stem}.py").read_text(encoding="utf-8")
    student = nbformat.read(LESSONS / f"{stem}.ipynb", as_version=4)
    solution = nbformat.read(LESSONS / "solutions" / f"{stem}.ipynb", as_version=4)
    assert len(_leaks(src, solution)) >= 3, "the leak detector must see the solutions in the solution notebook"
    leaked = _leaks(src, student)
    assert not leaked, f"solution lines in the student notebook: {leaked}"
    text = json.dumps(student.cells)
    assert "BEGIN SOLUTION" not in text and "END SOLUTION" not in text
    n_code = len(re.findall(r"^\s*### BEGIN SOLUTION", src, flags=re.M))
    n_text = len(re.findall(r"^# ### BEGIN SOLUTION", src, flags=re.M))     # text answer cells
    assert n_code >= 2 and n_text >= 1
    assert text.count("raise NotImplementedError()") == n_code
    assert text.count(B.TEXT_STUB) == n_text


# ----------------------------------------------------------------------------- execution
def _run(path):
    nb = nbformat.read(path, as_version=4)
    from nbclient import NotebookClient
    NotebookClient(nb, timeout=120, kernel_name="python3",
                   resources={"metadata": {"path": str(LESSONS)}}).execute()
    return nb


@pytest.fixture(scope="module")
def executed():
    """Every student and solution notebook, executed once (two kernels at a time)."""
    env = {k: os.environ.pop(k) for k in ("MINIMOE_STRICT",) if k in os.environ}
    os.environ["MPLBACKEND"] = "Agg"
    jobs = [(stem, kind, (LESSONS if kind == "student" else LESSONS / "solutions") / f"{stem}.ipynb")
            for stem in STEMS for kind in ("solution", "student")]
    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            runs = list(pool.map(lambda job: _run(job[2]), jobs))
    finally:
        os.environ.update(env)
    return {(stem, kind): nb for (stem, kind, _), nb in zip(jobs, runs)}


def _errors(nb):
    return [(i, o.get("ename"), o.get("evalue")) for i, c in enumerate(nb.cells)
            for o in c.get("outputs", []) if o.get("output_type") == "error"]


def _verdicts(nb):
    return P.notebook_results(nb)


@pytest.mark.parametrize("stem", STEMS)
def test_solution_notebook_runs_and_every_grader_passes(executed, stem):
    nb = executed[(stem, "solution")]
    assert _errors(nb) == []
    lesson = P.lesson_for(f"{stem}.ipynb")
    verdicts = _verdicts(nb)
    assert [v["exercise"] for v in verdicts] == list(lesson.exercises), "each grader runs once, in order"
    assert 2 <= len(verdicts) <= 5
    failed = [(v["exercise"], v["message"]) for v in verdicts if not v["passed"]]
    assert failed == []
    progress = [o["metadata"]["minimoe_progress"] for c in nb.cells for o in c.get("outputs", [])
                if "minimoe_progress" in o.get("metadata", {})]
    assert progress and progress[-1]["passed"] == progress[-1]["total"] == len(lesson.exercises)


@pytest.mark.parametrize("stem", STEMS)
def test_student_notebook_runs_and_every_grader_catches_the_blank(executed, stem):
    nb = executed[(stem, "student")]
    assert _errors(nb) == [], "cells after an exercise must not depend on the learner's answer"
    lesson = P.lesson_for(f"{stem}.ipynb")
    verdicts = _verdicts(nb)
    assert [v["exercise"] for v in verdicts] == list(lesson.exercises)
    for v in verdicts:
        assert not v["passed"] and "not written yet" in v["message"], v
    printed = [o["data"]["text/plain"] for c in nb.cells for o in c.get("outputs", [])
               if METADATA_KEY in o.get("metadata", {})]
    assert all(line.startswith("✘ ") for line in printed)


@pytest.mark.parametrize("stem", STEMS)
def test_graders_do_not_echo_their_return_value(executed, stem):
    """A grader call ends its cell; its verdict line is the only thing the learner should see."""
    for kind in ("solution", "student"):
        echoed = [o["data"].get("text/plain", "") for c in executed[(stem, kind)].cells
                  for o in c.get("outputs", []) if o.get("output_type") == "execute_result"]
        assert not [e for e in echoed if e.startswith(("Result(", "Progress("))], (kind, echoed)


@pytest.mark.parametrize("stem", STEMS)
def test_every_notebook_has_a_figure_questions_and_a_progress_table(stem):
    src = (LESSONS / "src" / f"{stem}.py").read_text(encoding="utf-8")
    assert re.search(r"viz\.plot_\w+\(", src), "at least one figure"
    assert "Questions to think about" in src
    assert "**Difficulty**" in src and "**Prerequisites**" in src
    assert src.rstrip().endswith("check.progress()")


def test_progress_can_execute_a_notebook(tmp_path):
    """``python -m minimoe.checks --run``: a copy is executed and its verdicts read back."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("import numpy as np\nfrom minimoe.course.checks import lesson04 as check"),
                nbformat.v4.new_code_cell("check.softplus(lambda z: np.logaddexp(0, z))"),
                nbformat.v4.new_code_cell("1 / 0"),                     # a broken cell doesn't stop it
                nbformat.v4.new_code_cell("check.topk_margin(lambda H, k: H[:, 0])")]
    path = tmp_path / "04_mine.ipynb"
    nbformat.write(nb, path)
    before = path.read_text()
    ran = P.execute_notebook(path, timeout=60)
    lesson, rows = P.summarize(path, ran)
    assert dict(rows) == {"softplus": True, "noisy_logits_forward": None, "noisy_logits_backward": None,
                          "topk_margin": False}
    assert path.read_text() == before, "the learner's file is never modified"
