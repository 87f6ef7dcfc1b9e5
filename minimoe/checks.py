"""``python -m minimoe.checks`` and ``from minimoe.checks import lesson01``: the graders' short name.

The graders live in the course chapter, :mod:`minimoe.course.checks`; this entry point
lets a lesson say ``from minimoe.checks import lesson03 as check`` and a learner type
``python -m minimoe.checks``.
"""
import importlib
import sys

from .course.checks import *  # noqa: F401,F403
from .course.checks import __all__  # noqa: F401


def __getattr__(name):
    # ``from minimoe.checks import lesson05`` loads the grader module on first use.
    try:
        return importlib.import_module(f"{__package__}.course.checks.{name}")
    except ModuleNotFoundError as err:
        if err.name != f"{__package__}.course.checks.{name}":
            raise
        raise AttributeError(f"module 'minimoe.checks' has no attribute {name!r}") from None


if __name__ == "__main__":
    from .course.checks.__main__ import main
    sys.exit(main())
