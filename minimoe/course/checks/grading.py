"""The grading framework: how an exercise is checked and how the verdict is reported.

A grader is a function decorated with :meth:`Lesson.exercise`. It receives the
learner's function, runs it on fresh seeded inputs, and compares the result with
minimoe's own implementation (or with finite differences) using the helpers of
:mod:`minimoe.course.checks.compare`. Its body is written as if the learner were right;
any doubt is raised as :class:`Fail` with a message that says *what* is wrong.
The decorator turns that into a verdict:

    ✔ 01.ffn_backward — dx, dW1, db1, dW2, db2 pass the gradient check on 3 random batches …
    ✘ 01.ffn_backward — Wrong gradients for W1, b1 and x. The gradient passes through
      the ReLU only where z > 0: dz = da * (z > 0). … (W2 and b2 are right.)

and never lets an exception escape: a blank exercise (``NotImplementedError``),
a crash in the learner's code or a wrong answer are all reported as ✘.

Every verdict is also a machine-readable :class:`Result`, kept in a registry for
the progress table, and attached to the notebook output as metadata
(``{"minimoe_check": {...}}``) so that tests and ``python -m minimoe.checks``
can read a saved or executed notebook without parsing the printed text.

Under nbgrader (``autograde``, ``validate``) a failed grader raises ``AssertionError``
after printing, so nbgrader gives the grader cell zero points; see :func:`strict`.
"""
from __future__ import annotations

import functools
import html
import os
from typing import NamedTuple

import numpy as np

__all__ = ["Lesson", "Result", "Fail", "Blank", "LESSONS", "results", "reset",
           "call", "publish", "METADATA_KEY", "strict"]

METADATA_KEY = "minimoe_check"
LESSONS: dict = {}          # lesson number ("01") -> Lesson
_RESULTS: dict = {}         # "01.ffn_forward" -> Result (the latest verdict in this process)


class Fail(Exception):
    """Raised inside a grader: the answer is wrong; the message says how."""


class Blank(Fail):
    """The learner has not written the exercise yet (it raised NotImplementedError)."""


class Result(NamedTuple):
    """One verdict."""
    lesson: str      # "01"
    exercise: str    # "ffn_forward"
    passed: bool
    message: str     # what was checked (✔) or what is wrong (✘), without the mark

    @property
    def key(self):
        return f"{self.lesson}.{self.exercise}"

    def line(self):
        return f"{'✔' if self.passed else '✘'} {self.key} — {self.message}"

    def _ipython_display_(self):
        """Show nothing: the verdict line was already shown when the grader ran, and a
        grader call is usually the last line of its cell (Jupyter would echo the tuple)."""


class Progress(NamedTuple):
    """A lesson's score: exercises passed out of the total."""
    passed: int
    total: int

    def _ipython_display_(self):
        """Show nothing: the table was already shown (see :class:`Result`)."""


def strict():
    """True when failed graders should raise ``AssertionError``, so nbgrader scores their cell 0.

    Under nbgrader this is automatic: ``nbgrader autograde`` and ``nbgrader validate``
    set ``NBGRADER_EXECUTION`` in the kernel's environment while they run a notebook,
    so a blank or wrong exercise loses its points and ``validate`` reports it, with no
    setting by the teacher. ``MINIMOE_STRICT`` overrides either way: ``1`` (or
    ``true``/``yes``) makes graders strict anywhere, ``0`` (or ``false``/``no``) keeps
    them lenient even under nbgrader. A learner's own Jupyter session sets neither,
    so its graders only print.
    """
    flag = os.environ.get("MINIMOE_STRICT", "").strip().lower()
    if flag:
        return flag not in ("0", "false", "no", "off")
    return bool(os.environ.get("NBGRADER_EXECUTION", "").strip())


def results():
    """A copy of the registry: ``{"01.ffn_forward": Result, ...}``."""
    return dict(_RESULTS)


def reset():
    """Forget every recorded verdict (used by tests)."""
    _RESULTS.clear()


class Lesson:
    """A lesson's list of exercises and their graders, in the order they appear."""

    def __init__(self, number, title):
        self.number, self.title = number, title
        self.exercises = {}        # name -> grader, in order
        LESSONS[number] = self

    def exercise(self, name):
        """Decorator: register ``grader(learner_fn) -> str`` as the grader of exercise ``name``.

        The wrapped grader returns the :class:`Result` (and publishes it).
        """
        def wrap(body):
            @functools.wraps(body)
            def grade(*learner):
                try:
                    checked = body(*learner)
                    res = Result(self.number, name, True, checked or "correct")
                except Fail as e:                    # includes Blank: not written yet
                    res = Result(self.number, name, False, str(e))
                except Exception as e:  # a bug in a grader must still end in a verdict
                    res = Result(self.number, name, False,
                                 f"the grader could not finish ({type(e).__name__}: {e}). "
                                 f"Check that your function returns what the exercise asks for.")
                _RESULTS[res.key] = res
                publish(res)
                if strict() and not res.passed:
                    raise AssertionError(res.line())
                return res
            grade.exercise_name = name
            self.exercises[name] = grade
            return grade
        return wrap

    def progress(self):
        """Show this lesson's table: each exercise ✔ / ✘ / not run, and the count passed."""
        from .progress import format_table, html_table
        rows = []
        for name in self.exercises:
            r = _RESULTS.get(f"{self.number}.{name}")
            rows.append((name, None if r is None else r.passed))
        title = f"Lesson {self.number} — {self.title}"
        passed = sum(1 for _, p in rows if p)
        meta = {"lesson": self.number, "passed": passed, "total": len(rows),
                "exercises": {n: p for n, p in rows}}
        _display({"text/plain": format_table(title, rows), "text/html": html_table(title, rows)},
                 {"minimoe_progress": meta})
        return Progress(passed, len(rows))


# --------------------------------------------------------------------------- output
def _display(bundle, metadata):
    """Show a mimebundle in a Jupyter kernel (with metadata), or print its text elsewhere."""
    try:
        from IPython import get_ipython
        ip = get_ipython()
    except ImportError:  # pragma: no cover - IPython ships with jupyter
        ip = None
    if ip is not None and getattr(ip, "kernel", None) is not None:
        from IPython.display import display
        display(bundle, raw=True, metadata=metadata)
    else:
        print(bundle["text/plain"])


def publish(res):
    """Show a verdict: one line starting with ✔ or ✘, with the Result as output metadata."""
    colour, mark = ("#1a7f37", "✔") if res.passed else ("#cf222e", "✘")
    body = html.escape(res.message).replace("\n", "<br>")
    page = (f'<div style="border-left:4px solid {colour};padding:2px 8px;font-family:monospace">'
            f'<b style="color:{colour}">{mark} {res.key}</b> — {body}</div>')
    _display({"text/plain": res.line(), "text/html": page}, {METADATA_KEY: res._asdict()})


# --------------------------------------------------------------------------- calling the learner
def _snapshot(v):
    return v.copy() if isinstance(v, np.ndarray) else v


def call(fn, *args, name=None, copy=True, **kwargs):
    """Call the learner's ``fn`` on copies of the inputs; turn trouble into a verdict.

    * ``NotImplementedError`` -> :class:`Blank` ("not written yet");
    * any other exception -> :class:`Fail` naming it;
    * an input array changed in place -> :class:`Fail` (a classic source of silent bugs).

    With ``copy=False`` the arguments are passed as they are and not watched (for
    functions whose job is to perturb an array in place and restore it).
    """
    name = name or getattr(fn, "__name__", "your function")
    if not callable(fn):
        raise Fail(f"expected a function, got {type(fn).__name__}; pass the function itself, "
                   f"e.g. check.{name}({name}), without calling it")
    if copy:
        args = [_snapshot(a) for a in args]
        kwargs = {k: _snapshot(v) for k, v in kwargs.items()}
    before = [_snapshot(a) for a in args], {k: _snapshot(v) for k, v in kwargs.items()}
    try:
        with np.errstate(all="ignore"):     # the verdict explains overflow; no warning spam
            out = fn(*args, **kwargs)
    except NotImplementedError:
        raise Blank(f"{name} is not written yet: replace `raise NotImplementedError()` "
                    f"with your code, run its cell, then run this check again.") from None
    except Fail:
        raise
    except Exception as e:
        raise Fail(f"{name} raised {type(e).__name__}: {e}") from None
    if copy:
        labels = [f"argument {i + 1}" for i in range(len(args))]
        pairs = list(zip(labels, before[0], args)) + [(k, before[1][k], v) for k, v in kwargs.items()]
        for label, old, new in pairs:
            if isinstance(old, np.ndarray) and not np.array_equal(old, new, equal_nan=True):
                raise Fail(f"{name} changed its input ({label}) in place. Work on a copy "
                           f"(`x = x.copy()`) or use operations that return new arrays, "
                           f"like `x - m` instead of `x -= m`.")
    return out
