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
(:class:`CheckFailed`: one message, no traceback), so nbgrader gives the grader cell zero
points; see :func:`strict`.

Graded, in a class
------------------
The course that ``python -m minimoe.checks nbgrader`` writes calls each grader *graded*,
from a locked cell that imports it itself::

    from minimoe.course.checks import lesson10 as check
    check.mixed_units(load_is_honest, fixed_smooth_load, points=2)

With ``points`` the grader is strict whatever the environment or :func:`strict` say (an
answer cell cannot lower it), and the cell's value is the score nbgrader records:
a grader whose exercise has *parts* (:func:`part`, e.g. lesson 10's check and fix) earns
its points part by part. ``feedback="summative"`` shows only the first sentence of a
message, what is wrong, without the hint that follows it. The modules of
:mod:`minimoe.course.checks` are sealed: ``grading.strict = ...`` or ``lesson01.x = ...``
raise ``AttributeError``. What this can and cannot prevent: ``docs/design.md`` §5.

Grading the exercise's *rules*, not only its numbers
---------------------------------------------------
Two helpers let a grader fail an answer whose numbers are right but that breaks the
exercise's rules:

* **Calling minimoe's own answer is not an answer.** ``@LESSON.exercise(name,
  forbid=[layers.softmax, ...])`` lists the functions that *are* the exercise (minimoe's
  implementation, and the lesson's own ``*_ref``). While the learner's function runs
  (every :func:`call` inside that grader, or ``call(..., forbid=[...])`` explicitly), a
  profile hook (``sys.setprofile``) watches for a call of one of them *from code outside
  minimoe*, however it was reached (``from minimoe.core.layers import softmax``,
  ``minimoe.layers.softmax``, a ``functools.partial``, a callback handed to NumPy, the
  function passed in place of the answer), and the verdict is then
  "you called `minimoe.core.layers.softmax` — write it yourself". minimoe's other
  functions stay allowed, even when they use a forbidden one internally (a call whose
  caller is minimoe's own library code is not the learner's). The grader's own
  reference computations run outside :func:`call`, so they are never blocked. Nothing
  is replaced in any module; the hook is removed when the call ends, exceptions included.

* **No Python loop over tokens.** :func:`no_token_loop` runs the learner's function at a
  small and a large number of tokens T and counts the Python lines and calls it
  executes (:func:`python_steps`, ``sys.settrace``: deterministic, no timing). A
  vectorised function runs the same lines at both sizes; a loop over tokens (or
  ``np.vectorize`` / ``np.apply_along_axis``, which loop in Python) runs thousands more,
  and fails with a message that says so. Loops over the E experts or the k choices are
  fine: E and k are the same in both runs.
"""
from __future__ import annotations

import contextlib
import functools
import html
import inspect
import numbers
import os
import re
import sys
import textwrap
import types
from typing import NamedTuple

import numpy as np

__all__ = ["Lesson", "Result", "Fail", "Blank", "CheckFailed", "LESSONS", "results", "reset",
           "call", "publish", "METADATA_KEY", "strict", "part", "summary", "FEEDBACK", "forbidding",
           "qualified_name", "python_steps", "no_token_loop"]

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
    credit: float = None   # the share of the exercise earned, 0..1 (parts passed / parts); None: 1 or 0

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


class CheckFailed(AssertionError):
    """A failed check where failing must cost the points (nbgrader, or ``MINIMOE_STRICT=1``).

    Its text is the verdict line. IPython shows :meth:`_render_traceback_` instead of a
    traceback, so the student and nbgrader's feedback see one message, wrapped to lines
    that ``nbgrader validate`` (which cuts lines at 87 characters) shows whole, and nothing
    of the grader's own code.
    """

    def _render_traceback_(self):
        return _wrapped(str(self))


def _wrapped(text, width=78):
    """``text`` as lines of at most ``width`` characters (its own line breaks kept)."""
    lines = []
    for para in text.split("\n"):
        lines += textwrap.wrap(para, width, subsequent_indent="  ", break_on_hyphens=False) or [""]
    return lines


def _env_strict():
    if os.environ.get("NBGRADER_EXECUTION", "").strip():
        return True        # nbgrader is running this kernel: nothing may lower that
    return os.environ.get("MINIMOE_STRICT", "").strip().lower() in ("1", "true", "yes", "on")


# A kernel started strict (nbgrader's, or a teacher's with MINIMOE_STRICT=1) stays strict:
# read once, when the graders are first imported, before any answer cell of the lesson runs.
_STARTED_STRICT = _env_strict()


def strict():
    """True when failed graders should raise (:class:`CheckFailed`), so nbgrader scores their cell 0.

    Under nbgrader this is automatic: ``nbgrader autograde`` and ``nbgrader validate``
    set ``NBGRADER_EXECUTION`` in the kernel's environment while they run a notebook,
    so a blank or wrong exercise loses its points and ``validate`` reports it, with no
    setting by the teacher. ``MINIMOE_STRICT=1`` (or ``true``/``yes``/``on``) makes
    graders strict anywhere. Nothing lowers it: under nbgrader ``MINIMOE_STRICT=0`` changes
    nothing, and a kernel that was strict when the graders were imported stays strict
    whatever a cell later does to ``os.environ``. A learner's own Jupyter session sets
    neither, so its graders only print.

    The graded cells of an nbgrader course do not even ask: they call the grader with
    ``points=...``, which is strict by itself (see the module docstring).
    """
    return _STARTED_STRICT or _env_strict()


FEEDBACK = ("detailed", "summative")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[^a-z\s])")


def summary(message):
    """The summative form of a verdict's message: the first sentence of each line.

    Graders write what is wrong first and the hint after it ("dprobs is wrong. Still zero:
    that is the bug … ∂loss/∂probs[t, e] = E·f_e / T."); a graded class that should not be
    handed the formula sees "dprobs is wrong." (CONTRIBUTING.md: the first sentence names
    the fault, never the fix.)
    """
    return "\n".join(_SENTENCE_END.split(line.strip(), maxsplit=1)[0] for line in message.split("\n"))


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
        _seal_graders()            # this lesson's module (being imported) and compare, loaded by now

    def exercise(self, name, forbid=()):
        """Decorator: register ``grader(learner_fn) -> str`` as the grader of exercise ``name``.

        ``forbid``: the functions that *are* this exercise (minimoe's implementation of it,
        the lesson's ``*_ref``); every :func:`call` of the learner's code inside the grader
        fails if the learner's code calls one of them (see the module docstring).

        The wrapped grader, ``grader(*learner_fns, points=None, feedback="detailed")``,
        returns the :class:`Result` (and publishes it). With ``points`` (a number > 0) it is
        *graded*: strict whatever the environment says, and it returns the points earned
        (``points`` × the share of its parts passed, :func:`part`) for nbgrader to record; a
        graded check that earns nothing raises :class:`CheckFailed`. ``feedback="summative"``
        shows each failure's first sentence only (:func:`summary`).
        """
        forbid = tuple(forbid)

        def wrap(body):
            @functools.wraps(body)
            def grade(*learner, points=None, feedback="detailed"):
                if points is not None and (isinstance(points, bool) or not isinstance(points, numbers.Real)
                                           or not points > 0):
                    raise ValueError(f"points must be a number > 0 (the cell's points in the course), "
                                     f"got {points!r}")
                if feedback not in FEEDBACK:
                    raise ValueError(f"feedback must be one of {FEEDBACK}, got {feedback!r}")
                _FORBIDDEN.append(forbid)
                _PARTS.append([])
                try:
                    res = self._verdict(name, body, learner, _PARTS[-1])
                finally:
                    _PARTS.pop()
                    _FORBIDDEN.pop()
                if feedback == "summative" and not res.passed:
                    res = res._replace(message=summary(res.message))
                _RESULTS[res.key] = res
                return _report(res, points)
            grade.exercise_name = name
            grade.forbidden = forbid
            self.exercises[name] = grade
            return grade
        return wrap

    def _verdict(self, name, body, learner, parts):
        """Run the grader's body on the learner's functions; never raises."""
        try:
            checked = body(*learner)
        except Exception as e:               # Fail, Blank (not written yet), or a bug in a grader
            if not any(not ok for _, ok, _ in parts):   # (after a failed part the rest may not finish)
                message = str(e) if isinstance(e, Fail) else _could_not_finish(e)
                return Result(self.number, name, False, message, 0.0)
        failed = [message for _, ok, message in parts if not ok]
        if failed:
            return Result(self.number, name, False, "\n".join(failed),
                          (len(parts) - len(failed)) / len(parts))
        return Result(self.number, name, True, checked or "correct", 1.0)

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


# --------------------------------------------------------------------------- parts and scores
_PARTS: list = []               # a stack: the parts recorded by the graders now running


@contextlib.contextmanager
def part(name):
    """A part of an exercise that earns its share of the points on its own (partial credit).

    Inside a grader, ``with part("fixed_smooth_load"): ...`` turns a :class:`Fail` raised in
    the block into a failed part and goes on with the grader, so the next part is checked
    too. The exercise passes when every part passes; graded with ``points=P``, it earns
    ``P × parts passed / parts``. (Lesson 10: one part for the learner's check, one for
    the fix.) Outside a grader it does nothing special: the ``Fail`` goes on.
    """
    if not _PARTS:
        yield
        return
    try:
        yield
    except Fail as e:
        _PARTS[-1].append((name, False, str(e)))
    except Exception as e:  # the learner's garbage broke the grader's own code: a failed part
        _PARTS[-1].append((name, False, _could_not_finish(e)))
    else:
        _PARTS[-1].append((name, True, ""))


def _could_not_finish(e):
    return (f"the grader could not finish ({type(e).__name__}: {e}). "
            f"Check that your function returns what the exercise asks for.")


def _report(res, points):
    """Show a verdict the way the mode asks; returns what the grader call returns."""
    graded = points is not None
    if res.passed:
        publish(res)
        return float(points) if graded else res
    if not (graded or strict()):
        publish(res)                       # self-study: print it and let the learner read on
        return res
    earned = 0.0 if not graded else round(points * (res.credit or 0.0), 6)
    if earned > 0 and os.environ.get("NBGRADER_EXECUTION", "").strip() != "validate":
        # Part of the exercise is right: nbgrader records the cell's value as its score.
        publish(res, f" ({earned:g} of {points:g} points)")
        return earned
    note = f" ({earned:g} of {points:g} points)" if earned > 0 else ""
    raise CheckFailed(res.line() + note)   # one message; the cell scores 0 (validate: any loss fails)


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


def publish(res, note=""):
    """Show a verdict: one line starting with ✔ or ✘, with the Result as output metadata.

    ``note`` is added to the line (a graded partial score: " (1 of 2 points)")."""
    colour, mark = ("#1a7f37", "✔") if res.passed else ("#cf222e", "✘")
    body = html.escape(res.message + note).replace("\n", "<br>")
    page = (f'<div style="border-left:4px solid {colour};padding:2px 8px;font-family:monospace">'
            f'<b style="color:{colour}">{mark} {res.key}</b> — {body}</div>')
    _display({"text/plain": res.line() + note, "text/html": page}, {METADATA_KEY: res._asdict()})


# --------------------------------------------------------------------------- calling the learner
def _snapshot(v):
    return v.copy() if isinstance(v, np.ndarray) else v


def call(fn, *args, name=None, copy=True, forbid=(), **kwargs):
    """Call the learner's ``fn`` on copies of the inputs; turn trouble into a verdict.

    * ``NotImplementedError`` -> :class:`Blank` ("not written yet");
    * a call of one of the exercise's forbidden functions (the grader's ``forbid`` list
      plus this call's ``forbid``) -> :class:`Fail` "you called `...` — write it yourself";
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
    banned = tuple(f for group in _FORBIDDEN for f in group) + tuple(forbid)
    try:
        with np.errstate(all="ignore"), forbidding(banned) as caught:  # no warning spam
            out = fn(*args, **kwargs)
    except Exception as e:
        if caught:
            _fail_forbidden(caught[0])
        if isinstance(e, NotImplementedError):
            raise Blank(f"{name} is not written yet: replace `raise NotImplementedError()` "
                        f"with your code, run its cell, then run this check again.") from None
        if isinstance(e, Fail):
            raise
        raise Fail(f"{name} raised {type(e).__name__}: {e}") from None
    if caught:
        _fail_forbidden(caught[0])
    if copy:
        labels = [f"argument {i + 1}" for i in range(len(args))]
        pairs = list(zip(labels, before[0], args)) + [(k, before[1][k], v) for k, v in kwargs.items()]
        for label, old, new in pairs:
            if isinstance(old, np.ndarray) and not np.array_equal(old, new, equal_nan=True):
                raise Fail(f"{name} changed its input ({label}) in place. Work on a copy "
                           f"(`x = x.copy()`) or use operations that return new arrays, "
                           f"like `x - m` instead of `x -= m`.")
    return out


# --------------------------------------------------------------------------- the exercise's rules
_FORBIDDEN: list = []           # a stack: the forbid lists of the graders now running
_HARNESS = "minimoe.course.checks"


def qualified_name(f):
    """``"minimoe.core.layers.softmax"``: where a function lives, as a learner would import it."""
    return f"{getattr(f, '__module__', '?')}.{getattr(f, '__qualname__', getattr(f, '__name__', f))}"


def _is_library(frame):
    """True when ``frame`` runs minimoe's own library code (not the graders, not the learner)."""
    mod = frame.f_globals.get("__name__", "") if frame is not None else ""
    return mod.startswith("minimoe.") and not mod.startswith(_HARNESS)


@contextlib.contextmanager
def forbidding(functions):
    """Watch, inside the ``with`` block, for calls of ``functions`` that are not minimoe's own.

    Yields a list that receives the qualified name of each forbidden function called
    (the first one only) from code outside minimoe's library — the learner's code, a
    NumPy callback, or the grading harness calling it *as* the answer. Detection uses
    ``sys.setprofile`` on the functions' code objects, so it sees the function however
    it was imported or wrapped; nothing in any module is replaced. The previous profile
    hook is restored on exit, also after an exception. (An active profiler is suspended
    for the duration.)

        with forbidding([layers.softmax]) as caught:
            learner_softmax(z)
        if caught: ...   # ["minimoe.core.layers.softmax"]
    """
    codes = {}
    for f in functions:
        code = getattr(inspect.unwrap(f), "__code__", None)
        if code is None:
            raise TypeError(f"forbidding() needs Python functions, got {f!r}")
        codes[code] = qualified_name(f)
    caught = []
    if not codes:
        yield caught
        return

    def hook(frame, event, arg):
        if event == "call" and not caught and frame.f_code in codes and not _is_library(frame.f_back):
            caught.append(codes[frame.f_code])

    old = sys.getprofile()
    sys.setprofile(hook)
    try:
        yield caught
    finally:
        sys.setprofile(old)


def _fail_forbidden(qualname):
    raise Fail(f"you called `{qualname}` — write it yourself: that function is the exercise. "
               f"(Building on minimoe's other functions is fine.)")


class _TooManySteps(BaseException):
    """Raised by the step counter past its limit (a BaseException, so `except Exception`
    in the learner's code does not swallow it)."""


def python_steps(fn, *args, name=None, limit=None, **kwargs):
    """``(number of Python lines and calls executed inside fn, its result)``.

    Counts, with ``sys.settrace``, every function call and every line run in every
    Python frame below ``fn`` (the learner's code and any Python-level library code
    it calls). Deterministic: no timing involved. ``fn`` runs through :func:`call`
    (copies of the inputs, the grader's forbidden functions watched). With ``limit``,
    the run is stopped as soon as it exceeds ``limit`` steps; the result is then
    ``(a count > limit, None)``.
    """
    counter = [0]

    def local(frame, event, arg):
        if event == "line":
            counter[0] += 1
            if limit is not None and counter[0] > limit:
                raise _TooManySteps()
        return local

    def on_call(frame, event, arg):
        counter[0] += 1
        return local

    def counted(*a, **kw):
        old = sys.gettrace()
        sys.settrace(on_call)
        try:
            return fn(*a, **kw)
        finally:
            sys.settrace(old)

    counted.__name__ = name or getattr(fn, "__name__", "your function")
    try:
        out = call(counted, *args, name=counted.__name__, **kwargs)
    except _TooManySteps:
        return counter[0], None
    return counter[0], out


def no_token_loop(fn, name, make_args, check_out=None, hint="", sizes=(64, 1024),
                  loops="a loop over tokens"):
    """Fail if the Python work of ``fn`` grows with the number of tokens T.

    Runs ``fn(*make_args(T))`` at ``T = sizes[0]`` and ``sizes[1]``, counting executed
    Python steps with :func:`python_steps`, and checks each output with
    ``check_out(out, *args)`` (which raises :class:`Fail` when wrong). A vectorised
    function runs the same steps at both sizes; one that runs more than
    ``small + max(300, ΔT / 2)`` at the large size (ΔT = the difference of the two T: at
    least one step per two extra tokens) loops over tokens (the run is stopped there).
    ``hint`` says how to vectorise; ``loops`` names what a loop would be over.

    Returns ``(steps at the small T, steps at the large T)``.
    """
    small_T, big_T = sizes
    args = make_args(small_T)
    small, out = python_steps(fn, *args, name=name)
    if check_out is not None:
        check_out(out, *args)
    limit = small + max(300, (big_T - small_T) // 2)
    args = make_args(big_T)
    big, out = python_steps(fn, *args, name=name, limit=limit)
    if big > limit:
        raise Fail(f"{name} is right at T = {small_T}, but its Python work grows with the number of "
                   f"tokens: {small:,} Python steps (lines and calls) at T = {small_T} and more than "
                   f"{limit:,} at T = {big_T}. That is {loops} (np.vectorize and np.apply_along_axis "
                   f"loop in Python too); the exercise asks for vectorised NumPy. {hint}".rstrip())
    if check_out is not None:
        check_out(out, *args)
    return small, big


# --------------------------------------------------------------------------- sealed modules
# The graders and the package that holds them refuse `module.name = value` and `del module.name`,
# so an answer cell cannot replace a grader, `strict`, or a reference the graders compare with
# by the cheapest route (a cell that tries raises AttributeError, and the teacher's report
# names it). `vars(module)[name] = value` is not stopped: see docs/design.md §5.
_PACKAGE = __name__.rpartition(".")[0]          # minimoe.course.checks
_SEALED_NAMES = re.compile(rf"^{re.escape(_PACKAGE)}(\.(grading|compare|lesson\d\d))?$")
_RELOAD_SETS = frozenset({"__spec__", "__loader__", "__file__", "__cached__", "__package__", "__path__",
                          "__doc__"})      # what importlib.reload writes back


class _Sealed(types.ModuleType):
    """A module of the graders: its names cannot be rebound or deleted from outside."""

    def __setattr__(self, name, value):
        here = types.ModuleType.__getattribute__(self, "__name__")
        if (name in _RELOAD_SETS or (name == "__name__" and value == here)
                or (isinstance(value, types.ModuleType)        # the import system adding a submodule
                    and sys.modules.get(f"{here}.{name}") is value)):
            return types.ModuleType.__setattr__(self, name, value)
        raise AttributeError(_sealed(here, name, "replaced"))

    def __delattr__(self, name):
        raise AttributeError(_sealed(types.ModuleType.__getattribute__(self, "__name__"), name, "deleted"))


def _sealed(module, name, what):
    return (f"{module}.{name} cannot be {what}: minimoe's graders are read-only, so that a check "
            f"means the same for every student (in a graded course the teacher's report lists "
            f"cells that try)")


def _seal_graders():
    """Seal every loaded module of the graders (the package, grading, compare, lessonNN)."""
    for name, module in list(sys.modules.items()):
        if (_SEALED_NAMES.match(name) and isinstance(module, types.ModuleType)
                and type(module) is types.ModuleType):
            module.__class__ = _Sealed


_seal_graders()
