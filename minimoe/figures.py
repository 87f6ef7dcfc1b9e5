"""``python -m minimoe.figures``: regenerate every PNG in ``figures/``.

The builders live in the course chapter, :mod:`minimoe.course.figures`.
"""
import sys

from .course.figures import BUILDERS, default_dir, main, register  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
