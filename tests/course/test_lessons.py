"""The lesson notebooks: built from their sources, stored clean, no solution leaks, and —
executed top to bottom — every grader passes in the solutions and fails in the student
versions, with no other error in either.

The executing tests are marked ``notebooks`` (``python -m pytest -m "not notebooks"`` is
the fast path). Each cell may take ``MINIMOE_NB_TIMEOUT`` seconds (default 900: lesson
09's language model on a loaded 2-core machine); a notebook that fails or times out is
reported against its own lesson only."""
import json
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nbformat
import pytest

from minimoe.course.checks import build as B
from minimoe.course.checks import progress as P
from minimoe.course.checks.grading import METADATA_KEY

from grader_cases import max_exercises

LESSONS = Path(__file__).resolve().parents[2] / "lessons"
SOURCES = B.lesson_sources(LESSONS)
STEMS = [s.stem for s in SOURCES]


def nb_timeout():
    """Seconds per notebook cell: ``MINIMOE_NB_TIMEOUT``, default 900."""
    raw = os.environ.get("MINIMOE_NB_TIMEOUT", "").strip()
    try:
        value = float(raw) if raw else 900.0
    except ValueError:
        raise ValueError(f"MINIMOE_NB_TIMEOUT must be a number of seconds, got {raw!r}") from None
    if value <= 0:
        raise ValueError(f"MINIMOE_NB_TIMEOUT must be > 0 seconds, got {raw!r}")
    return int(value) if value == int(value) else value


def learner_edits(stem):
    """None if ``lessons/<stem>.ipynb`` is as built; else a message that says what happened and
    how to move the work (a learner who saved answers in the tracked notebooks)."""
    path = LESSONS / f"{stem}.ipynb"
    built = B.build_notebook(LESSONS / "src" / f"{stem}.py", "student")
    if path.exists() and path.read_text(encoding="utf-8") == B.notebook_text(built):
        return None
    try:
        nb = nbformat.read(path, as_version=4)
    except Exception as err:
        return f"lessons/{stem}.ipynb cannot be read ({type(err).__name__}); restore it: git checkout -- lessons/"
    ran = any(c.get("outputs") or c.get("execution_count") for c in nb.cells if c.cell_type == "code")
    changed = [c.source for c in nb.cells] != [c.source for c in built.cells]
    if not ran and not changed:
        return None        # only metadata differs: test_built_notebooks_are_up_to_date reports it
    what = " and ".join(w for w, yes in (("has saved outputs", ran), ("has changed cells", changed)) if yes)
    return (f"lessons/{stem}.ipynb {what}: it looks like you worked in the repository's lessons/ folder, "
            f"which git tracks and these tests check. Your work is safe; move it: run "
            f"`python -m minimoe.checks start` (copies lessons/*.ipynb as they are, your answers included, "
            f"into ./my-lessons/, ignored by git, keeping any file already there), then "
            f"`git checkout -- lessons/` to restore the originals, and work in my-lessons/ from now on.")


def test_learner_edits_are_recognised(monkeypatch, tmp_path):
    """A learner's answers in lessons/ get a message saying what happened and how to move them."""
    stem = STEMS[0]
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / f"{stem}.py").write_text((LESSONS / "src" / f"{stem}.py").read_text())
    monkeypatch.setitem(globals(), "LESSONS", tmp_path)
    nb = B.build_notebook(tmp_path / "src" / f"{stem}.py", "student")
    (tmp_path / f"{stem}.ipynb").write_text(B.notebook_text(nb))
    assert learner_edits(stem) is None
    code = next(c for c in nb.cells if "raise NotImplementedError()" in c.source)
    code.source = code.source.replace("raise NotImplementedError()", "return 42")
    code.outputs = [nbformat.v4.new_output("stream", text="42")]
    code.execution_count = 3
    nbformat.write(nb, tmp_path / f"{stem}.ipynb")
    msg = learner_edits(stem)
    assert "has saved outputs and has changed cells" in msg
    assert "python -m minimoe.checks start" in msg and "git checkout -- lessons/" in msg


def test_lessons_00_to_04_exist():
    assert [s[:2] for s in STEMS][:5] == ["00", "01", "02", "03", "04"]
    for stem in STEMS:
        assert P.lesson_for(f"{stem}.ipynb") is not None, f"no graders for {stem}"


def test_built_notebooks_are_up_to_date():
    edited = [m for m in map(learner_edits, STEMS) if m]
    assert not edited, "\n".join(edited)
    stale = B.build(LESSONS, check=True)
    assert stale == [], f"rebuild with `python -m minimoe.checks build`: {[str(p) for p in stale]}"


@pytest.mark.parametrize("kind", ["student", "solution"])
def test_notebooks_are_stored_without_outputs(kind):
    folder = LESSONS if kind == "student" else LESSONS / "solutions"
    for stem in STEMS:
        if kind == "student":
            assert learner_edits(stem) is None, learner_edits(stem)
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
    assert learner_edits(stem) is None, learner_edits(stem)     # a learner's answers are not a leak
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
def _run(job):
    """Execute the notebook built from a lesson source (not the file in lessons/, which a
    learner may have edited; test_built_notebooks_are_up_to_date ties the two together)."""
    stem, kind = job
    from nbclient import NotebookClient
    nb = B.build_notebook(LESSONS / "src" / f"{stem}.py", kind)
    NotebookClient(nb, timeout=nb_timeout(), kernel_name="python3",
                   resources={"metadata": {"path": str(LESSONS)}}).execute()
    return nb


def execute_all(jobs, run, workers=2):
    """``{job: notebook or exception}``: one notebook's failure (a timeout, a dead kernel)
    is kept against that job, and every other notebook still runs."""
    def safe(job):
        try:
            return run(job)
        except Exception as err:      # reported by the tests of this lesson only
            return err
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return dict(zip(jobs, pool.map(safe, jobs)))


def test_a_failed_notebook_is_reported_against_its_own_lesson():
    def run(job):
        if job == ("09_slow", "solution"):
            raise TimeoutError("A cell timed out while it was being executed, after 1 seconds.")
        return f"ran {job}"
    out = execute_all([("00_a", "solution"), ("09_slow", "solution"), ("10_b", "student")], run)
    assert out[("00_a", "solution")] == "ran ('00_a', 'solution')"
    assert out[("10_b", "student")] == "ran ('10_b', 'student')"
    assert isinstance(out[("09_slow", "solution")], TimeoutError)
    with pytest.raises(pytest.fail.Exception, match=r"(?s)09_slow \(solution\) did not finish.*"
                                                     r"MINIMOE_NB_TIMEOUT"):
        _notebook(out, "09_slow", "solution")
    assert _notebook(out, "00_a", "solution") == "ran ('00_a', 'solution')"


def test_nb_timeout_reads_the_environment(monkeypatch):
    monkeypatch.delenv("MINIMOE_NB_TIMEOUT", raising=False)
    assert nb_timeout() == 900
    monkeypatch.setenv("MINIMOE_NB_TIMEOUT", "2400")
    assert nb_timeout() == 2400
    for bad in ("soon", "0", "-5"):
        monkeypatch.setenv("MINIMOE_NB_TIMEOUT", bad)
        with pytest.raises(ValueError, match="MINIMOE_NB_TIMEOUT must be"):
            nb_timeout()


@pytest.fixture(scope="module")
def executed():
    """Every student and solution notebook, executed once (two kernels at a time)."""
    env = {k: os.environ.pop(k) for k in ("MINIMOE_STRICT", "NBGRADER_EXECUTION") if k in os.environ}
    os.environ["MPLBACKEND"] = "Agg"
    jobs = [(stem, kind) for stem in STEMS for kind in ("solution", "student")]
    try:
        return execute_all(jobs, _run)
    finally:
        os.environ.update(env)


def _notebook(executed, stem, kind):
    nb = executed[(stem, kind)]
    if isinstance(nb, Exception):
        pytest.fail(f"{stem} ({kind}) did not finish: {type(nb).__name__}: {str(nb)[:500]}\n(a slow "
                    f"machine? each cell may take MINIMOE_NB_TIMEOUT={nb_timeout()} s; raise it)", pytrace=False)
    return nb


def _errors(nb):
    return [(i, o.get("ename"), o.get("evalue")) for i, c in enumerate(nb.cells)
            for o in c.get("outputs", []) if o.get("output_type") == "error"]


def _verdicts(nb):
    return P.notebook_results(nb)


@pytest.mark.notebooks
@pytest.mark.parametrize("stem", STEMS)
def test_solution_notebook_runs_and_every_grader_passes(executed, stem):
    nb = _notebook(executed, stem, "solution")
    assert _errors(nb) == []
    lesson = P.lesson_for(f"{stem}.ipynb")
    verdicts = _verdicts(nb)
    assert [v["exercise"] for v in verdicts] == list(lesson.exercises), "each grader runs once, in order"
    assert 2 <= len(verdicts) <= max_exercises(lesson.number)   # 5; the bug hunt: one pair per bug
    failed = [(v["exercise"], v["message"]) for v in verdicts if not v["passed"]]
    assert failed == []
    progress = [o["metadata"]["minimoe_progress"] for c in nb.cells for o in c.get("outputs", [])
                if "minimoe_progress" in o.get("metadata", {})]
    assert progress and progress[-1]["passed"] == progress[-1]["total"] == len(lesson.exercises)


@pytest.mark.notebooks
@pytest.mark.parametrize("stem", STEMS)
def test_student_notebook_runs_and_every_grader_catches_the_blank(executed, stem):
    nb = _notebook(executed, stem, "student")
    assert _errors(nb) == [], "cells after an exercise must not depend on the learner's answer"
    lesson = P.lesson_for(f"{stem}.ipynb")
    verdicts = _verdicts(nb)
    assert [v["exercise"] for v in verdicts] == list(lesson.exercises)
    for v in verdicts:
        assert not v["passed"] and "not written yet" in v["message"], v
    printed = [o["data"]["text/plain"] for c in nb.cells for o in c.get("outputs", [])
               if METADATA_KEY in o.get("metadata", {})]
    assert all(line.startswith("✘ ") for line in printed)


@pytest.mark.notebooks
@pytest.mark.parametrize("stem", STEMS)
def test_graders_do_not_echo_their_return_value(executed, stem):
    """A grader call ends its cell; its verdict line is the only thing the learner should see."""
    for kind in ("solution", "student"):
        echoed = [o["data"].get("text/plain", "") for c in _notebook(executed, stem, kind).cells
                  for o in c.get("outputs", []) if o.get("output_type") == "execute_result"]
        assert not [e for e in echoed if e.startswith(("Result(", "Progress("))], (kind, echoed)


@pytest.mark.parametrize("stem", STEMS)
def test_every_notebook_has_a_figure_questions_and_a_progress_table(stem):
    src = (LESSONS / "src" / f"{stem}.py").read_text(encoding="utf-8")
    assert re.search(r"viz\.plot_\w+\(", src), "at least one figure"
    assert "Questions to think about" in src
    assert "**Difficulty**" in src and "**Prerequisites**" in src
    assert src.rstrip().endswith("check.progress()")


@pytest.mark.notebooks
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


@pytest.mark.parametrize("stem", STEMS)
def test_first_cell_says_how_to_install_the_course(stem, monkeypatch):
    """Opened where minimoe is missing (e.g. a fresh Binder or kernel), the first cell says in
    one line how to install the course instead of a bare ModuleNotFoundError."""
    nb = nbformat.read(LESSONS / f"{stem}.ipynb", as_version=4)
    first = next(c for c in nb.cells if c.cell_type == "code")
    assert first.source.startswith("try:") and "import minimoe" in first.source.splitlines()[1]
    guard = first.source[: first.source.index("from None") + len("from None")]
    # run the guard where minimoe cannot be found (monkeypatch puts sys back afterwards)
    class Hide:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "minimoe":
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    monkeypatch.setattr(sys, "meta_path", [Hide()] + sys.meta_path)
    monkeypatch.delitem(sys.modules, "minimoe")
    with pytest.raises(ModuleNotFoundError) as err:
        exec(compile(guard, f"{stem} first cell", "exec"), {})
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("minimoe is not installed for this kernel")
    assert "pip install -r requirements.txt" in msg and "minimoe[course]" in msg
