"""minimoe — a Mixture-of-Experts layer in pure NumPy, every backward pass by hand.

The experts are specialist doctors; the router is the GP who reads each patient's
symptoms (a token) and refers them to one or two specialists.

The source is a book; its chapters are folders, each with its table of contents in
its ``__init__`` docstring:

    core/     chapter 1: layers, gradcheck, experts, router, losses, dispatch, moe
    clinic/   chapter 2: optimizers, the clinic data, the four clinics, training
    beyond/   chapter 3: hash routing, expert choice, loss-free balancing, shared experts,
              expert parallelism over MPI
    lm/       chapter 4: norm, attention, embedding, the MoE transformer block, a tiny LM
    course/   chapter 5: the lesson graders, the bug hunt, the plots, the figure builder

At the top: this file (the public names), ``__main__`` (the demo, ``python -m minimoe``),
``bench`` (the benchmark), ``validate`` (the argument checks every chapter uses), and
the entry points ``checks`` and ``figures``.
"""
from .core import dispatch, experts, gradcheck, layers, losses, moe, router  # noqa: F401
from .core.experts import Expert, ExpertBank  # noqa: F401
from .core.moe import MoELayer  # noqa: F401
from .beyond.hash_router import HashMoELayer  # noqa: F401
from .beyond.expert_choice import ExpertChoiceMoELayer  # noqa: F401
from .beyond.lossfree import LossFreeMoELayer  # noqa: F401
from .beyond.shared_experts import SharedExpertMoELayer  # noqa: F401
from .beyond.parallel import ExpertParallelMoELayer  # noqa: F401  (imports mpi4py only when built)
from .lm import MoELM, MoETransformerBlock  # noqa: F401

__all__ = ["MoELayer", "HashMoELayer", "ExpertChoiceMoELayer", "LossFreeMoELayer",
           "SharedExpertMoELayer", "ExpertParallelMoELayer", "MoETransformerBlock", "MoELM", "Expert", "ExpertBank",
           "gradcheck", "layers", "experts", "router", "losses", "dispatch", "moe"]

__version__ = "0.1.0"
