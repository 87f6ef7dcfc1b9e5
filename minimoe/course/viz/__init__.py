"""Every plot of the demo, the README's figures and the lessons.

Each function takes plain data (histories, count tables, result rows), draws one
figure with matplotlib, saves it if given a ``path`` and returns the ``Figure``.
Nothing here trains or routes: compute first, then draw. Matplotlib is imported
only when a figure is drawn, so ``import minimoe`` never needs it.

    from minimoe.course import viz
    viz.plot_learning_curves(histories, "figures/learning_curves.png")

The modules, in the order the course meets them:

    _style.py       shared colours (one per clinic, one per expert), saving, helpers
    basics.py       lessons 00–04: the ensemble, costs, step sizes, referral maps, gates, noise, kinks
    clinic.py       the demo and lesson 07: the patients, learning curves, accuracy against compute
    specialties.py  the demo and lesson 08: which specialty each expert serves, and what that is worth
    balance.py      lessons 05, 06, 10: expert load, balancing losses, appointment books, drops
    beyond.py       lesson 09: other routers, loss-free balancing, the tiny MoE language model
    parallel.py     lesson 11: what the all-to-all moves, against E, P, k and the capacity factor
    realtext.py     lesson 12: dense against sparse on real text, more experts, what they learn, upcycling
"""
from . import _style, balance, basics, beyond, clinic, parallel, realtext, specialties
from ._style import *  # noqa: F401,F403
from .balance import *  # noqa: F401,F403
from .basics import *  # noqa: F401,F403
from .beyond import *  # noqa: F401,F403
from .clinic import *  # noqa: F401,F403
from .parallel import *  # noqa: F401,F403
from .realtext import *  # noqa: F401,F403
from .specialties import *  # noqa: F401,F403

__all__ = [*_style.__all__, *basics.__all__, *clinic.__all__, *specialties.__all__, *balance.__all__,
           *beyond.__all__, *parallel.__all__, *realtext.__all__]
