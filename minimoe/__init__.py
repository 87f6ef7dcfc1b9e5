"""minimoe — a Mixture-of-Experts layer in pure NumPy, every backward pass by hand.

The experts are specialist doctors; the router is the GP who reads each patient's
symptoms (a token) and refers them to one or two specialists.

Read the source like a book, in this order: ``layers.py`` (the building blocks),
``gradcheck.py`` (how we know the backward passes are right), ``experts.py`` (the
specialists), then ``router.py``, ``losses.py``, ``dispatch.py`` and ``moe.py``.
"""
from . import gradcheck, layers, experts  # noqa: F401
from .experts import Expert, ExpertBank  # noqa: F401
from . import router, losses, dispatch, moe  # noqa: F401
from .moe import MoELayer  # noqa: F401

__version__ = "0.1.0"
