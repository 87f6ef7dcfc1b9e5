"""What every lesson grader must do, generated from a lesson's table of cases (not a test module).

A lesson's test file lists, for each exercise, the grader, a right answer written
independently of minimoe, and the typical mistakes with a fragment of the hint each
must get::

    CASES = [(grader, right_answer, [(typical_mistake, fragment_of_its_hint), ...]), ...]

    class TestGraders(GraderContract):
        LESSONS = (lesson05.LESSON,)
        CASES = CASES

and pytest then runs, once per exercise (ids are the exercise names):

* a blank exercise (``raise NotImplementedError()``) fails clearly;
* the right answer passes;
* every typical mistake fails with its own hint;
* a crash, garbage or ``None`` is a failed verdict, never an exception;
* **near misses** fail: the right answer with every float it returns off by about 1e-3
  and about 1e-6 relative (:func:`perturbed`), plus the exercise's own near misses in
  ``NEAR_MISSES`` (a lossy softplus, allclose where exact equality is asked, ...);
* **every call is checked** (the grader exercises all its cases): the right answer made
  wrong at one call only — for each of the grader's calls in turn — fails; and a grader
  calls the learner at least twice (several shapes/seeds), unless listed in ``SINGLE_CALL``;
* **rule-breaking answers** fail: those in ``RULE_BREAKING`` (a per-token loop where
  vectorised code is asked, ...) with their fragment, and, for every function in the
  grader's ``forbid`` list (``@LESSON.exercise(name, forbid=[...])``), an answer that calls
  it and then returns the right answer gets "you called `<that function>`". A forbidden
  function whose signature is not the exercise's must get an explicit ``RULE_BREAKING``
  case whose fragment names it;
* **in-place changes of a cache or a list argument** fail: the right answer that then
  scribbles on every array inside a tuple argument (a cache: a backward may be called twice on
  one cache) or on a list argument (its arrays or its entries) gets "in place"
  (:func:`scribbling`; arrays passed directly are :func:`~minimoe.course.checks.grading.call`'s
  own check). An exercise with no tuple or list argument is skipped, saying so;
* **calls to minimoe.course.bugs** fail: an answer that returns what a function of
  :mod:`minimoe.course.bugs` returns on the learner's arguments fails, for every such function
  (:func:`assert_calls_to_bugs_fail`) unless the exercise lists it in ``ALLOWED_BUGS`` (a
  building block the exercise offers);

plus one check that every exercise of ``LESSONS`` has a case, in the lesson's order.
``NEAR_MISSES`` and ``RULE_BREAKING`` map an exercise name to ``[(answer, fragment or None),
...]`` (``None``: any failed verdict will do).
"""
import inspect

import numpy as np
import pytest

from minimoe import checks
from minimoe.course.checks.grading import qualified_name


def blank(*args, **kwargs):
    """An exercise the learner has not written yet."""
    raise NotImplementedError()


def assert_pass(res, lesson=None):
    """``res`` is a passing verdict (of ``lesson``, e.g. ``"10"``, if given)."""
    assert isinstance(res, checks.Result)
    assert res.passed, res.message
    assert res.line().startswith("✔ ")
    if lesson is not None:
        assert res.lesson == lesson, res.line()


def assert_fail(res, *fragments):
    """``res`` is a failing verdict whose message contains every one of ``fragments``."""
    assert isinstance(res, checks.Result)
    assert not res.passed, "a wrong answer passed"
    assert res.line().startswith("✘ ")
    for f in fragments:
        assert f in res.message, f"expected {f!r} in the verdict:\n{res.message}"


def assert_crash_or_garbage_is_a_verdict(grade, none_is_valid=False):
    """``grade(fn) -> Result`` fails, without raising, an answer that crashes or returns
    garbage or ``None`` (unless ``None`` is a right answer of the exercise)."""
    def crash(*a, **k):
        raise ZeroDivisionError("boom")
    assert_fail(grade(crash), "ZeroDivisionError", "boom")
    assert not grade(lambda *a, **k: "nonsense").passed
    if not none_is_valid:
        assert not grade(lambda *a, **k: None).passed


class Perturbed:
    """A learner answer: ``right``'s result with its numbers nudged (the nudge is a near miss).

    Every float (Python float, float array, inside tuples, lists, dicts and NamedTuples) is
    multiplied by ``1 + rel · (0.5 + u)`` with ``u`` in [0, 1) varying over the entries, so
    the relative error lies between rel/2 and 3·rel/2 and is not one constant factor.
    With ``ints=True`` every int (not bool) is moved by 1 too. With ``at=i`` only the i-th
    call (0-based) is nudged. ``changed`` says whether any nudged call changed anything.
    """

    def __init__(self, right, rel, at=None, ints=False):
        self.right, self.rel, self.at, self.ints = right, rel, at, ints
        self.calls, self.changed = 0, False
        self.__name__ = getattr(right, "__name__", "answer")

    def __call__(self, *args, **kwargs):
        out = self.right(*args, **kwargs)
        i, self.calls = self.calls, self.calls + 1
        if self.at is not None and i != self.at:
            return out
        return self._nudge(out)

    def _nudge(self, v):
        if isinstance(v, bool) or v is None or isinstance(v, str):
            return v
        if isinstance(v, np.ndarray):
            if np.issubdtype(v.dtype, np.floating) and v.size:
                u = (np.arange(v.size).reshape(v.shape) * 0.618034) % 1.0
                w = v * (1 + self.rel * (0.5 + u))
            elif self.ints and np.issubdtype(v.dtype, np.integer) and v.size:
                w = v + 1
            else:
                return v
            self.changed |= not np.array_equal(w, v, equal_nan=True)
            return w
        if isinstance(v, (float, np.floating)):
            w = type(v)(v * (1 + self.rel))
            self.changed |= bool(w != v)
            return w
        if isinstance(v, (int, np.integer)) and self.ints:
            self.changed = True
            return v + 1
        if isinstance(v, tuple) and hasattr(v, "_fields"):
            return type(v)(*(self._nudge(x) for x in v))
        if isinstance(v, (tuple, list)):
            return type(v)(self._nudge(x) for x in v)
        if isinstance(v, dict):
            return {k: self._nudge(x) for k, x in v.items()}
        return v


def perturbed(right, rel, at=None, ints=False):
    """``right`` with its result off by about ``rel`` relative (see :class:`Perturbed`)."""
    return Perturbed(right, rel, at=at, ints=ints)


def count_calls(grader, right):
    """How many times ``grader`` calls the learner's function when it is ``right``."""
    counter = Perturbed(right, 0.0)
    counter.at = -1                       # never nudge
    assert_pass(grader(counter))
    return counter.calls


def calling(f, right):
    """An answer that calls minimoe's ``f`` with the learner's arguments (ignoring what it
    returns or raises) and then returns the right answer."""
    def cheat(*args, **kwargs):
        try:
            f(*args, **kwargs)
        except Exception:
            pass
        return right(*args, **kwargs)
    cheat.__name__ = getattr(right, "__name__", "answer")
    return cheat


# Most lessons hold 2 to 5 graded exercises (enough to practise, few enough to finish in
# one sitting). Lesson 10, the bug hunt, has one exercise pair per bug (the check that
# catches it, or the fix), so it grows with its bugs: 7 once bugs 6 and 7 were added.
MAX_EXERCISES = {"10": 7}


def max_exercises(number):
    """The most graded exercises lesson ``number`` ("01", ...) may hold: 5, unless listed above."""
    return MAX_EXERCISES.get(number, 5)


class GraderContract:
    """Base class of a lesson's ``TestGraders``: set ``LESSONS`` and ``CASES`` (see the module)."""

    LESSONS = ()            # the checks.Lesson objects whose exercises CASES must cover
    CASES = []              # [(grader, right answer, [(typical mistake, hint fragment), ...]), ...]
    NONE_IS_VALID = ()      # graders for which returning None can be a right answer
    NEAR_MISSES = {}        # exercise name -> [(answer, fragment or None), ...]
    RULE_BREAKING = {}      # exercise name -> [(answer, fragment or None), ...]
    SINGLE_CALL = ()        # exercise names whose grader rightly calls the learner only once
    ALLOWED_BUGS = {}       # exercise name -> names of minimoe.course.bugs functions it may call
    NO_GENERIC_NEAR_MISS = ()   # exercise names whose answers hold no float to nudge (say why)

    def pytest_generate_tests(self, metafunc):
        """Run each test that takes ``grader, right, mistakes`` once per case, named by exercise."""
        if "grader" in metafunc.fixturenames:
            metafunc.parametrize("grader,right,mistakes", self.CASES,
                                 ids=[grader.exercise_name for grader, _, _ in self.CASES])

    def test_every_exercise_has_a_case(self):
        graded = {}
        for lesson in self.LESSONS:
            most = max_exercises(lesson.number)
            assert 2 <= len(lesson.exercises) <= most, f"lesson {lesson.number}: 2 to {most} exercises"
            graded.update({id(g): f"{lesson.number}.{name}" for name, g in lesson.exercises.items()})
        covered = [graded.get(id(grader), f"{grader.exercise_name} (of another lesson)")
                   for grader, _, _ in self.CASES]
        assert covered == list(graded.values())

    def test_blank_fails_clearly(self, grader, right, mistakes):
        assert_fail(grader(blank), "not written yet", "NotImplementedError")

    def test_right_answer_passes(self, grader, right, mistakes):
        assert_pass(grader(right))

    def test_typical_mistakes_get_their_hint(self, grader, right, mistakes):
        assert mistakes, "every grader needs at least one typical mistake"
        for wrong, hint in mistakes:
            assert_fail(grader(wrong), hint)

    def test_crash_or_garbage_is_a_verdict_not_an_exception(self, grader, right, mistakes):
        assert_crash_or_garbage_is_a_verdict(grader, none_is_valid=grader in self.NONE_IS_VALID)

    def test_near_misses_fail(self, grader, right, mistakes):
        nudged = []
        for rel in (1e-3, 1e-6):
            answer = perturbed(right, rel)
            res = grader(answer)
            if answer.changed:
                nudged.append(rel)
                assert not res.passed, f"an answer off by ~{rel:g} relative passed: {res.message}"
        if grader.exercise_name not in self.NO_GENERIC_NEAR_MISS:
            assert nudged == [1e-3, 1e-6], "the right answer returns no float to nudge: list the " \
                                           "exercise in NO_GENERIC_NEAR_MISS and give NEAR_MISSES"
        for answer, fragment in self.NEAR_MISSES.get(grader.exercise_name, []):
            res = grader(answer)
            assert_fail(res, *([fragment] if fragment else []))
        assert nudged or self.NEAR_MISSES.get(grader.exercise_name), "no near miss is tested"

    def test_every_call_is_checked(self, grader, right, mistakes):
        n = count_calls(grader, right)
        if grader.exercise_name not in self.SINGLE_CALL:
            assert n >= 2, f"the grader calls the learner's function {n} time(s): use several cases"
        for i in range(n):
            answer = perturbed(right, 1e-3, at=i, ints=True)
            res = grader(answer)
            if answer.changed:
                assert not res.passed, f"wrong at call {i + 1} of {n} only, and it passed"

    def test_rule_breaking_answers_fail(self, grader, right, mistakes):
        named = []
        for answer, fragment in self.RULE_BREAKING.get(grader.exercise_name, []):
            res = grader(answer)
            assert_fail(res, *([fragment] if fragment else []))
            named.append(res.message)
        for f in getattr(grader, "forbidden", ()):
            name = f"you called `{qualified_name(f)}`"
            res = grader(_bindable_cheat(f, right))
            if res.passed and any(name in m for m in named):
                continue                   # tested by an explicit case: the signatures differ
            assert_fail(res, name, "write it yourself")

    def test_in_place_changes_of_a_cache_or_a_list_fail(self, grader, right, mistakes):
        answer = scribbling(right)
        res = grader(answer)
        if not answer.changed:
            pytest.skip(f"{grader.exercise_name} takes no tuple (cache) or list argument")
        assert_fail(res, "in place")

    def test_calls_to_course_bugs_fail(self, grader, right, mistakes):
        assert_calls_to_bugs_fail(grader, right, allowed=self.ALLOWED_BUGS.get(grader.exercise_name, ()))


def _scribble(v, seen):
    """Change in place every array inside the tuple or list ``v`` (and a list's own entries);
    ``seen[0]`` becomes True when something changed. Arrays NumPy will not write are skipped."""
    if isinstance(v, list) and v and not any(isinstance(x, (np.ndarray, tuple, list)) for x in v):
        v[0] = v[0] + 1 if isinstance(v[0], (int, float, np.number)) and not isinstance(v[0], bool) else None
        seen[0] = True
        return
    for i, x in enumerate(v):
        if isinstance(x, np.ndarray) and x.size and x.flags.writeable and np.issubdtype(x.dtype, np.number):
            x += 1                                   # 1 more everywhere: ints and floats alike
            seen[0] = True
        elif isinstance(x, (tuple, list)):
            _scribble(x, seen)


def scribbling(right):
    """The right answer, which then changes in place every array inside its tuple arguments
    (caches) and its list arguments (and a list's entries). ``changed`` says whether a call
    had any such argument to change."""
    def answer(*args, **kwargs):
        out = right(*args, **kwargs)
        seen = [False]
        for a in list(args) + list(kwargs.values()):
            if isinstance(a, (tuple, list)):
                _scribble(a, seen)
        answer.changed |= seen[0]
        return out
    answer.changed = False
    answer.__name__ = getattr(right, "__name__", "answer")
    return answer


def bug_functions():
    """Every public function of :mod:`minimoe.course.bugs` (the buggy code, the reference checks
    and the reference losses), by name."""
    from minimoe.course import bugs
    return {n: getattr(bugs, n) for n in bugs.__all__ if inspect.isfunction(getattr(bugs, n))}


def handing_in(f, right):
    """An answer that returns what ``f`` (a function of minimoe.course.bugs) returns on the
    learner's arguments: ``f`` handed in as the answer, through a call."""
    def answer(*args, **kwargs):
        return f(*args, **kwargs)
    answer.__name__ = getattr(right, "__name__", "answer")
    return answer


def assert_calls_to_bugs_fail(grade, right, allowed=(), extra=()):
    """``grade(answer) -> Result`` fails every answer that returns what a function ``f`` of
    :mod:`minimoe.course.bugs` returns on the learner's arguments (:func:`handing_in`), for every
    ``f`` not in ``allowed``: the reference checks and losses there are answers of lesson 10,
    and the buggy functions are wrong ones. Where ``f`` would give the right answer, the verdict
    must say "you called `minimoe.course.bugs.<f>`". ``extra``: ``[(name, answer)]``, answers that
    call ``f`` adapted to the exercise's arguments, each of which must get "you called". Returns
    the names of the functions whose call was caught by name."""
    caught = []
    for name, f in bug_functions().items():
        if name in allowed:
            continue
        res = grade(handing_in(f, right))
        assert_fail(res)
        if f"you called `minimoe.course.bugs.{name}`" in res.message:
            caught.append(name)
    for name, cheat in extra:
        assert_fail(grade(cheat), f"you called `minimoe.course.bugs.{name}`")
        caught.append(name)
    return caught


def _bindable_cheat(f, right):
    """:func:`calling`, but only calling ``f`` when the learner's arguments fit its signature."""
    sig = inspect.signature(f)

    def cheat(*args, **kwargs):
        try:
            sig.bind(*args, **kwargs)
        except TypeError:
            return right(*args, **kwargs)
        return calling(f, right)(*args, **kwargs)
    cheat.__name__ = getattr(right, "__name__", "answer")
    return cheat
