"""Graded mode, in-process: what a class graded through nbgrader relies on, without nbgrader.

A graded check (``check.x(x, points=P)``, what the course's locked cells call) is strict
whatever the environment or ``grading.strict`` say; it returns the points earned, part by
part (lesson 10: the check and the fix); a failure is one message without a traceback, cut
to its first sentence in summative feedback; and the graders cannot be rebound by
``module.name = value``. The real nbgrader runs are in ``test_nbgrader_class.py``."""
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from grader_cases import assert_fail, blank
from minimoe.course.checks import build, grading, lesson04, lesson10
from minimoe.course.checks.grading import CheckFailed

ROOT = Path(__file__).resolve().parents[2]


def softplus(z):
    return np.logaddexp(0, z)          # right, and written without minimoe


@pytest.fixture(autouse=True)
def self_study(monkeypatch):
    """A learner's own session: neither nbgrader nor MINIMOE_STRICT."""
    monkeypatch.delenv("MINIMOE_STRICT", raising=False)
    monkeypatch.delenv("NBGRADER_EXECUTION", raising=False)


@pytest.fixture(scope="module")
def solution10():
    """The exercise functions of lesson 10's solution (its import cell and exercise cells)."""
    src = (ROOT / "lessons" / "src" / "10_the_bug_hunt.py").read_text("utf-8")
    cells = re.split(r"^# %%(.*)$", src, flags=re.M)
    code = [body for head, body in zip(cells[1::2], cells[2::2]) if "[markdown]" not in head]
    ns = {}
    exec(code[0], ns)
    for text in code:
        if build.BEGIN in text:
            exec(text, ns)
    return ns


# ----------------------------------------------------------------------------- no switch turns it off
@pytest.mark.parametrize("env", [{}, {"MINIMOE_STRICT": "0"}, {"MINIMOE_STRICT": "off"}])
def test_a_graded_check_fails_a_blank_whatever_the_environment(monkeypatch, env):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert not grading.strict()                       # self-study graders would only print
    with pytest.raises(CheckFailed, match=r"^✘ 04.softplus — softplus is not written yet"):
        lesson04.softplus(blank, points=1)
    assert lesson04.softplus(softplus, points=3) == 3.0   # the score nbgrader records


def test_a_graded_check_does_not_ask_strict(monkeypatch):
    """Even `strict` replaced through the module's dict (which sealing cannot stop) changes nothing."""
    monkeypatch.setitem(vars(grading), "strict", lambda: False)
    with pytest.raises(CheckFailed):
        lesson04.softplus(blank, points=1)


def test_under_nbgrader_minimoe_strict_0_no_longer_lowers_it(monkeypatch):
    monkeypatch.setenv("NBGRADER_EXECUTION", "autograde")
    monkeypatch.setenv("MINIMOE_STRICT", "0")
    assert grading.strict()
    with pytest.raises(CheckFailed):
        lesson04.softplus(blank)


def test_a_kernel_started_strict_stays_strict():
    """Read when the graders are imported: an answer cell that later clears the environment changes nothing."""
    code = ("import os\nfrom minimoe.course.checks import grading, lesson04\n"
            "os.environ.pop('NBGRADER_EXECUTION'); os.environ['MINIMOE_STRICT'] = '0'\n"
            "print(grading.strict())")
    import subprocess
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "NBGRADER_EXECUTION": "autograde"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "True", out.stderr[-2000:]
    env.pop("NBGRADER_EXECUTION")
    out = subprocess.run([sys.executable, "-c", code.replace("os.environ.pop('NBGRADER_EXECUTION'); ", "")],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr[-2000:]          # a learner's session: lenient


@pytest.mark.parametrize("module, name", [(grading, "strict"), (lesson04, "softplus"), (grading, "call"),
                                          (sys.modules["minimoe.course.checks"], "lesson04"),
                                          (sys.modules["minimoe.course.checks.compare"], "expect_array")])
def test_the_graders_cannot_be_rebound_or_deleted(module, name):
    before = getattr(module, name)
    with pytest.raises(AttributeError, match=rf"{re.escape(module.__name__)}\.{name} cannot be replaced: "
                                             r"minimoe's graders are read-only"):
        setattr(module, name, lambda *a, **kw: None)
    with pytest.raises(AttributeError, match="cannot be deleted"):
        delattr(module, name)
    with pytest.raises(AttributeError):
        module.__class__ = type(re)                   # nor unsealed by swapping the class back
    assert getattr(module, name) is before


def test_the_import_system_still_adds_submodules_to_the_sealed_package():
    pkg = sys.modules["minimoe.course.checks"]
    setattr(pkg, "lesson04", lesson04)                # what importlib does: the genuine module
    with pytest.raises(AttributeError):
        setattr(pkg, "lesson04", lesson10)


@pytest.mark.parametrize("bad, err", [(0, "points must be a number > 0"), (-1, "points must be"),
                                      (True, "points must be"), ("2", "points must be")])
def test_points_must_be_a_positive_number(bad, err):
    with pytest.raises(ValueError, match=err):
        lesson04.softplus(softplus, points=bad)


def test_feedback_must_be_detailed_or_summative():
    with pytest.raises(ValueError, match=r"feedback must be one of \('detailed', 'summative'\), got 'short'"):
        lesson04.softplus(softplus, points=1, feedback="short")


# ----------------------------------------------------------------------------- one message, no traceback
def test_a_failure_is_one_message_in_short_lines_without_a_traceback():
    with pytest.raises(CheckFailed) as info:
        lesson10.no_gradient(blank, blank, points=2)
    lines = info.value._render_traceback_()          # what IPython shows instead of a traceback
    assert all(len(line) <= 78 for line in lines), lines
    assert lines[0].startswith("✘ 10.no_gradient — switch_loss_gradcheck is not written yet")
    text = " ".join(line.strip() for line in lines)
    assert text.count("not written yet") == 2       # one message per failed part, nothing repeated
    assert "grading.py" not in text and "Traceback" not in text


def test_self_study_is_unchanged_a_failure_prints_and_returns(capsys):
    res = lesson04.softplus(blank)
    assert not res.passed and capsys.readouterr().out.startswith("✘ 04.softplus — softplus is not written yet")


# ----------------------------------------------------------------------------- partial credit (lesson 10)
def test_lesson10_check_and_fix_earn_their_points_apart(solution10, capsys):
    check, fix = solution10["load_is_honest"], solution10["fixed_smooth_load"]
    assert lesson10.mixed_units(check, fix, points=2) == 2.0
    assert lesson10.mixed_units(check, blank, points=2) == 1.0      # a right check, no fix yet
    assert "(1 of 2 points)" in capsys.readouterr().out
    assert lesson10.mixed_units(blank, fix, points=2) == 1.0        # a right fix, no check yet
    assert lesson10.mixed_units(check, lesson10.buggy_smooth_load, points=4) == 2.0   # the bug as the fix
    with pytest.raises(CheckFailed):
        lesson10.mixed_units(blank, blank, points=2)
    res = lesson10.mixed_units(check, blank)                          # self-study: failed, with its share
    assert_fail(res, "fixed_smooth_load is not written yet")
    assert res.credit == 0.5 and "load_is_honest" not in res.message


def test_every_lesson10_exercise_has_a_check_part_and_a_fix_part(solution10):
    for name, grader in lesson10.LESSON.exercises.items():
        fns = [solution10[p] for p in grader.__wrapped__.__code__.co_varnames[:2]]
        assert grader(fns[0], blank, points=2) == 1.0, name
        assert grader(blank, fns[1], points=2) == 1.0, name


def test_under_validate_a_partial_score_fails_so_the_student_sees_it(solution10, monkeypatch):
    monkeypatch.setenv("NBGRADER_EXECUTION", "validate")
    with pytest.raises(CheckFailed, match=r"\(1 of 2 points\)$"):
        lesson10.mixed_units(solution10["load_is_honest"], blank, points=2)


def test_a_part_outside_a_grader_lets_the_failure_through():
    with pytest.raises(grading.Fail):
        with grading.part("x"):
            raise grading.Fail("wrong")


# ----------------------------------------------------------------------------- summative feedback
def test_summative_feedback_says_what_is_wrong_without_the_formula(capsys):
    from minimoe import losses
    from minimoe.course import bugs
    zeros = bugs.bug2_switch_loss_backward                          # the bug handed in as the fix
    right_check = lambda fwd, bwd, p, first: fwd is losses.switch_loss_forward and bwd is losses.switch_loss_backward  # noqa: E731,E501
    detailed = lesson10.no_gradient(right_check, zeros)
    assert "E·f_e / T" in detailed.message                           # self-study: the hint, formula and all
    capsys.readouterr()
    assert lesson10.no_gradient(right_check, zeros, points=2, feedback="summative") == 1.0
    assert capsys.readouterr().out == "✘ 10.no_gradient — dprobs is wrong. (1 of 2 points)\n"
    assert grading.results()["10.no_gradient"].message == "dprobs is wrong."   # the saved verdict too


@pytest.mark.parametrize("message, short", [
    ("dprobs is wrong. Still zero: that is the bug.", "dprobs is wrong."),
    ("x rejects it (T=1, E=2). Redraw, e.g. this.", "x rejects it (T=1, E=2)."),
    ("Compare with e.g. np.allclose, then stop.", "Compare with e.g. np.allclose, then stop."),
    ("one is wrong. Hint one.\ntwo = 1.5 is wrong. Hint two.", "one is wrong.\ntwo = 1.5 is wrong."),
])
def test_summary_keeps_the_first_sentence_of_each_failure(message, short):
    assert grading.summary(message) == short
