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

plus one check that every exercise of ``LESSONS`` has a case, in the lesson's order.
"""
from minimoe import checks


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


class GraderContract:
    """Base class of a lesson's ``TestGraders``: set ``LESSONS`` and ``CASES`` (see the module)."""

    LESSONS = ()            # the checks.Lesson objects whose exercises CASES must cover
    CASES = []              # [(grader, right answer, [(typical mistake, hint fragment), ...]), ...]
    NONE_IS_VALID = ()      # graders for which returning None can be a right answer

    def pytest_generate_tests(self, metafunc):
        """Run each test that takes ``grader, right, mistakes`` once per case, named by exercise."""
        if "grader" in metafunc.fixturenames:
            metafunc.parametrize("grader,right,mistakes", self.CASES,
                                 ids=[grader.exercise_name for grader, _, _ in self.CASES])

    def test_every_exercise_has_a_case(self):
        graded = {}
        for lesson in self.LESSONS:
            assert 2 <= len(lesson.exercises) <= 5, f"lesson {lesson.number}: 2 to 5 exercises"
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
