"""The nbgrader course as files, without running nbgrader: points and ids from the lesson source
(inserting a cell changes no released id), the graded check cells, the course writer that never
replaces an edited config without --force, the measured timeout, and the teacher's report
(which reads notebooks, never runs them). The real nbgrader runs: test_nbgrader*.py."""
import json

import nbformat
import pytest

from minimoe.course.checks import build as B
from minimoe.course.checks import nbgrader_course as C
from minimoe.course.checks import nbgrader_report as R
from minimoe.course.checks.__main__ import main

LESSON = '''# %% [markdown]
# # Demo

# %%
from minimoe.checks import lesson04 as check

# %%
def f(x):
    ### BEGIN SOLUTION
    return 2 * x
    ### END SOLUTION


# %%
check.softplus(f)

# %%
def g(x):
    ### BEGIN SOLUTION
    return 3 * x
    ### END SOLUTION


# %% points=3
check.topk_margin(g)

# %% [markdown]
# ### BEGIN SOLUTION
# an answer
# ### END SOLUTION
'''


def lesson(tmp_path, text=LESSON, name="04_demo.py"):
    (tmp_path / "src").mkdir(exist_ok=True)
    path = tmp_path / "src" / name
    path.write_text(text)
    return path


def ids(nb):
    return [(c["id"], c["metadata"].get("nbgrader", {}).get("grade_id")) for c in nb.cells]


# ----------------------------------------------------------------------------- points and ids
def test_points_are_declared_on_the_check_cell(tmp_path):
    nb = B.build_notebook(lesson(tmp_path), "solution")
    points = {c.metadata["nbgrader"]["grade_id"]: c.metadata["nbgrader"].get("points") for c in nb.cells
              if c.metadata.get("nbgrader", {}).get("grade")}
    assert points == {"check-softplus": 1, "check-topk_margin": 3, "answers": 1}


def test_lesson10_declares_two_points_per_check_and_fix():
    nb = B.build_notebook(B.default_lessons_dir() / "src" / "10_the_bug_hunt.py", "solution")
    checks = [c.metadata["nbgrader"]["points"] for c in nb.cells if c["id"].startswith("check-")]
    assert checks == [2] * 7


@pytest.mark.parametrize("header, msg", [("# %% points=0", "points must be a number > 0, got 0"),
                                         ('# %% points="two"', "points must be a number > 0, got 'two'")])
def test_bad_points_are_named(tmp_path, header, msg):
    with pytest.raises(ValueError, match=msg):
        B.build_notebook(lesson(tmp_path, LESSON.replace("# %% points=3", header)), "solution")


def test_points_on_an_ordinary_cell_are_refused(tmp_path):
    text = LESSON.replace("# %%\nfrom minimoe", "# %% points=2\nfrom minimoe")
    with pytest.raises(ValueError, match="points= on a cell that is neither a check nor an answer"):
        B.build_notebook(lesson(tmp_path, text), "solution")


def test_inserting_a_cell_changes_no_released_id(tmp_path):
    before = B.build_notebook(lesson(tmp_path), "student")
    grown = LESSON.replace("# %%\ncheck.softplus(f)",
                           "# %% [markdown]\n# A new paragraph.\n\n# %%\nprint('new')\n\n# %%\ncheck.softplus(f)")
    grown = grown.replace("# %% [markdown]\n# ### BEGIN", "# %%\ny = 1\n\n# %% [markdown]\n# ### BEGIN")
    after = B.build_notebook(lesson(tmp_path, grown, "04_demo.py"), "student")
    assert len(after.cells) == len(before.cells) + 3
    assert set(ids(before)) <= set(ids(after)), "every cell id and grade id of the release is still there"
    assert [g for _, g in ids(after) if g] == ["ex-f", "check-softplus", "ex-g", "check-topk_margin", "answers"]


def test_graded_cells_are_named_by_their_grade_id_and_ordinary_cells_by_their_text(tmp_path):
    nb = B.build_notebook(lesson(tmp_path), "solution")
    assert [c["id"] for c in nb.cells if c.metadata.get("nbgrader")] == [
        "ex-f", "check-softplus", "ex-g", "check-topk_margin", "answers"]
    plain = [c["id"] for c in nb.cells if not c.metadata.get("nbgrader")]
    assert len(set(plain)) == len(plain) and all(i.startswith("cell-") for i in plain)


def test_an_exercise_cell_without_a_function_needs_a_declared_id(tmp_path):
    text = LESSON.replace("def f(x):\n    ### BEGIN SOLUTION\n    return 2 * x\n    ### END SOLUTION",
                          "### BEGIN SOLUTION\ny = 2\n### END SOLUTION")
    with pytest.raises(ValueError, match="an exercise cell defines its function"):
        B.build_notebook(lesson(tmp_path, text), "solution")
    nb = B.build_notebook(lesson(tmp_path, text.replace("# %%\n### BEGIN", '# %% grade_id="ex-y"\n### BEGIN')),
                          "solution")
    assert "ex-y" in [g for _, g in ids(nb)]


# ----------------------------------------------------------------------------- graded check cells
def test_a_graded_check_cell_imports_its_grader_and_passes_its_points(tmp_path):
    nb = B.build_notebook(lesson(tmp_path), "student", graded="summative")
    cells = {c["id"]: c.source for c in nb.cells}
    head = "from minimoe.course.checks import lesson04 as check  # the grader itself (locked)\n"
    assert cells["check-softplus"] == head + "check.softplus(f, points=1, feedback='summative')"
    assert cells["check-topk_margin"] == head + "check.topk_margin(g, points=3, feedback='summative')"
    self_study = {c["id"]: c.source for c in B.build_notebook(lesson(tmp_path), "student").cells}
    assert self_study["check-softplus"] == "check.softplus(f)"


def test_graded_source_handles_calls_over_several_lines_and_refuses_two():
    text = "check.mixed_units(\n    a,\n    b,\n)"
    assert B.graded_source(text, "lesson10", 2).endswith("check.mixed_units(\n    a,\n    b,\n, points=2)")
    with pytest.raises(ValueError, match="exactly one grader call"):
        B.graded_source("check.a(x)\ncheck.b(y)", "lesson10", 2)
    with pytest.raises(ValueError, match="declare the points on the cell"):
        B.graded_source("check.a(x, points=3)", "lesson10", 2)


# ----------------------------------------------------------------------------- the course folder
def test_the_course_config_keeps_a_teachers_edits_unless_forced(tmp_path, capsys):
    assert main(["nbgrader", str(tmp_path)]) == 0
    config = tmp_path / "nbgrader_config.py"
    assert main(["nbgrader", str(tmp_path)]) == 0                    # unchanged files: nothing to refuse
    config.write_text(config.read_text() + "c.Execute.timeout = 77\n")
    capsys.readouterr()
    assert main(["nbgrader", str(tmp_path), "--feedback", "summative"]) == 2
    err = capsys.readouterr().err
    assert "differ from what would be written and are kept: " in err and "nbgrader_config.py" in err
    assert "--force" in err and config.read_text().endswith("c.Execute.timeout = 77\n")
    src = tmp_path / "source" / "01_the_specialist" / "01_the_specialist.ipynb"
    assert "feedback='summative'" not in src.read_text(), "nothing was written"
    assert main(["nbgrader", str(tmp_path), "--feedback", "summative", "--force"]) == 0
    assert "timeout = 77" not in config.read_text() and "feedback='summative'" in src.read_text()


def test_the_course_config(tmp_path):
    assert main(["nbgrader", str(tmp_path)]) == 0
    config = (tmp_path / "nbgrader_config.py").read_text()
    assert f"c.Execute.timeout = {C.default_timeout()}\n" in config
    assert "c.OverwriteCells.add_missing_cells = True" in config
    assert '"minimoe.course.checks.nbgrader_execute.Execute"' in config
    compile(config, "nbgrader_config.py", "exec")


def test_the_timeout_is_the_margin_times_the_slowest_measured_cell_rounded_up_to_a_minute():
    assert C.default_timeout({"a": 12.4}, margin=10) == 180      # 124 s -> 3 minutes
    assert C.default_timeout({"a": 3.0, "b": 6.0}, margin=10) == 60
    assert C.default_timeout() == 300        # 10 x lesson 09's 28.1 s = 281 s -> 5 minutes (not 900)
    assert set(C.SLOWEST_CELL_S) == {s.stem for s in B.lesson_sources(B.default_lessons_dir())}


# ----------------------------------------------------------------------------- the report's reading of code
@pytest.mark.parametrize("code, fragment", [
    ('import os\nos.environ["MINIMOE_STRICT"] = "0"', "uses `os.environ`"),
    ("from os import environ\nenviron['X'] = '0'", "uses `environ`"),
    ("import minimoe.course.checks.grading as g\ng.strict = lambda: False", "imports minimoe.course.checks.grading"),
    ("vars(g)['strict'] = None", "calls vars()"),
    ("check = object()", "rebinds `check`"),
    ("for check in range(3): pass", "rebinds `check`"),
    ("np.allclose = lambda *a, **k: True", "changes `np.allclose`, part of an imported module"),
    ("setattr(np, 'allclose', None)", "calls setattr()"),
    ("get_ipython().showtraceback = print", "uses `get_ipython`"),
    ("import sys\nsys.modules['x'] = None", "uses `sys.modules`"),
    ("import builtins", "imports builtins"),
    ("f = inspect.currentframe().f_back", "uses `inspect.currentframe`"),
    ("exec('x = 1')", "calls exec()"),
    ("y = experts.ffn_forward(x, **p)", "uses `experts.ffn_forward`, minimoe's own answer to this exercise"),
])
def test_the_report_names_code_that_reaches_into_grading(code, fragment):
    found = R.scan_code(code, imported={"np", "experts", "inspect", "check"}, forbidden={"ffn_forward"})
    assert any(fragment in what for _, what in found), found


def test_the_report_leaves_ordinary_numpy_alone():
    code = ("def f(x, W):\n    z = x @ W\n    s = np.stack([z, z])\n    d = {}\n    d['a'] = z\n"
            "    strictly = z.max(axis=1, keepdims=True)\n    return np.maximum(z, 0), check.owner_of(1, 4, 2)")
    assert R.scan_code(code, imported={"np", "check"}, forbidden={"ffn_forward"}) == []


def test_the_solutions_give_the_report_nothing_to_look_at():
    for src in B.lesson_sources(B.default_lessons_dir()):
        release = B.build_notebook(src, "student", graded="detailed")
        full = B.build_notebook(src, "solution", graded="detailed")
        assert R.submission_findings(release, full, None, R._forbidden(src.stem, release)) == [], src.stem


def test_the_report_reads_a_course_folder(tmp_path, capsys):
    """Release and submissions written by hand (no nbgrader): each kind of finding, and the exit status."""
    src = B.default_lessons_dir() / "src" / "01_the_specialist.py"
    release = B.build_notebook(src, "student", graded="detailed")
    name = "01_the_specialist"
    (tmp_path / "release" / name).mkdir(parents=True)
    nbformat.write(release, tmp_path / "release" / name / f"{name}.ipynb")

    def submit(student, nb):
        (tmp_path / "submitted" / student / name).mkdir(parents=True)
        nbformat.write(nb, tmp_path / "submitted" / student / name / f"{name}.ipynb")
    submit("honest", release)
    cheat = nbformat.from_dict(json.loads(nbformat.writes(release)))
    cheat.cells = [c for c in cheat.cells if c["id"] != "check-ffn_backward"]
    next(c for c in cheat.cells if c["id"] == "ex-ffn_forward").source += "\nimport os\nos.environ['MINIMOE_STRICT'] = '0'"
    next(c for c in cheat.cells if c["id"] == "check-rel_error").source = "pass"
    submit("cheat", cheat)
    (tmp_path / "submitted" / "ghost" / name).mkdir(parents=True)       # a folder, no notebook
    graded = nbformat.from_dict(json.loads(nbformat.writes(release)))   # autograded, with a silent check
    (tmp_path / "autograded" / "honest" / name).mkdir(parents=True)
    nbformat.write(graded, tmp_path / "autograded" / "honest" / name / f"{name}.ipynb")
    assert main(["nbgrader", "report", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    cheat_block = out[out.index("cheat"):out.index("ghost")]
    assert "deleted locked cell check-ffn_backward" in cheat_block
    assert "changed locked cell check-rel_error" in cheat_block
    assert "ex-ffn_forward line" in cheat_block and "uses `os.environ`" in cheat_block
    assert "was not autograded" in cheat_block
    assert "did not submit 01_the_specialist.ipynb" in out[out.index("ghost"):]
    honest = out[out.index("honest"):]
    assert "check-ffn_forward scored without a passing verdict" in honest   # no error, no ✔: suppressed
    assert "3 of 3 submissions to look at" in out
    assert main(["nbgrader", "report", str(tmp_path), "--assignment", "02_the_gp"]) == 0
    assert "no submissions found" in capsys.readouterr().out


def test_the_report_refuses_a_folder_that_is_not_a_course(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["nbgrader", "report", str(tmp_path)])
    assert exc.value.code == 2 and "has no release/ folder" in capsys.readouterr().err
