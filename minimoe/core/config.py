"""The layer's options, in one place: ``MoEConfig``, checked once when it is made.

Every option of an MoE layer lives in this frozen dataclass, and nowhere else: ``MoELayer``,
the four layers of ``minimoe.beyond``, the expert-parallel layer, ``repr`` and the benchmark all
read the same object. A layer's ``layer.k`` or ``layer.gate`` is ``layer.cfg.k``; setting
``layer.capacity_factor = 1.25`` builds a new, checked config (``cfg.replace``), so a bad value
is refused before the layer changes.

The options and what they mean are documented on :class:`~minimoe.core.moe.MoELayer`; the
checks below say what each may be, and the errors name the option.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from ..validate import check_choice, check_dtype, check_int, check_positive_float

__all__ = ["MoEConfig", "GATES", "BALANCES", "BALANCE_GROUPS", "SWITCH_FRACTIONS", "ACTIVATIONS",
           "USUAL_BALANCE_COEF", "DTYPES", "MAX_CAPACITY_FACTOR", "check_bool", "layer_dtype"]

GATES = ("topk", "dense", "switch")
BALANCES = (None, "importance", "load", "importance+load", "switch")
BALANCE_GROUPS = ("batch", "sequence")
# What the Switch loss's f counts, and so its value at perfect balance (see balance.py):
# "first" GShard (1), "all" HF Mixtral (k), "all/k" Megatron-core (1).
SWITCH_FRACTIONS = ("first", "all", "all/k")
ACTIVATIONS = ("relu", "gelu", "swiglu")
# The coefficients the papers use (see losses.py): Shazeer et al. 2017 and Fedus et al. 2021.
USUAL_BALANCE_COEF = {"importance": 0.1, "load": 0.1, "importance+load": 0.1, "switch": 0.01}
DTYPES = (np.float32, np.float64)       # every layer class computes in one of these
MAX_CAPACITY_FACTOR = 1e9               # C = ceil(cf·T·k/E) must stay a finite integer


def check_bool(name, value):
    """True or False, nothing else (a string such as 'False' is truthy, and would mean True)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def layer_dtype(dtype):
    """The one dtype rule of the layer classes: np.float32 or np.float64 (as a type)."""
    dt = check_dtype("dtype", dtype)
    if dt.type not in DTYPES:
        raise TypeError(f"dtype must be np.float32 or np.float64 (a layer computes in one of them), got {dt}")
    return dt.type


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Every option of an MoE layer, checked once (see ``MoELayer`` for their meaning).

    Sizes: ``d_model`` d, ``d_hidden`` h, ``n_experts`` E, ``k`` experts per token (the dense
    gate uses all E: its k is E). Routing: ``gate``, ``noisy``. Balancing: ``balance``,
    ``balance_coef`` (None: the papers' usual value), ``switch_fraction``, ``balance_groups``,
    ``z_loss_coef``. Capacity: ``capacity_factor`` (None: no dropping). Experts:
    ``activation``. Numbers: ``dtype``; ``fast`` picks fast.py's dispatch and bank.
    """
    d_model: int
    d_hidden: int
    n_experts: int
    k: int = 2
    gate: str = "topk"
    noisy: bool = True
    balance: str | None = None
    balance_coef: float | None = None
    z_loss_coef: float = 0.0
    capacity_factor: float | None = None
    activation: str = "relu"
    dtype: type = np.float64
    fast: bool = True
    switch_fraction: str = "first"
    balance_groups: str = "batch"

    def __post_init__(self):
        put = lambda name, value: object.__setattr__(self, name, value)   # noqa: E731  (frozen)
        put("d_model", check_int("d_model", self.d_model, low=1))
        put("d_hidden", check_int("d_hidden", self.d_hidden, low=1))
        E = check_int("n_experts", self.n_experts, low=1)
        put("n_experts", E)
        check_choice("gate", self.gate, GATES)
        put("k", E if self.gate == "dense" else check_int("k", self.k, low=1, high=E))
        put("noisy", check_bool("noisy", self.noisy))
        put("fast", check_bool("fast", self.fast))
        check_choice("balance", self.balance, BALANCES)
        check_choice("switch_fraction", self.switch_fraction, SWITCH_FRACTIONS)
        check_choice("balance_groups", self.balance_groups, BALANCE_GROUPS)
        check_choice("activation", self.activation, ACTIVATIONS)
        put("dtype", layer_dtype(self.dtype))
        if self.switch_fraction != "first" and self.gate == "dense":
            raise ValueError(f"switch_fraction={self.switch_fraction!r} needs a sparse gate ('topk' or 'switch'): "
                             "with gate='dense' every token chooses every expert, f_e = 1 and the Switch loss "
                             "is a constant")
        if self.balance in ("load", "importance+load"):
            if not self.noisy:
                raise ValueError(f"balance={self.balance!r} needs noisy=True: the smooth load estimator "
                                 "(Shazeer et al. 2017) is built from the noise scale softplus(x W_noise)")
            if self.gate == "dense":
                raise ValueError(f"balance={self.balance!r} needs a sparse gate ('topk' or 'switch'): "
                                 "with gate='dense' every expert sees every token")
        coef = USUAL_BALANCE_COEF.get(self.balance, 0.0) if self.balance_coef is None else self.balance_coef
        put("balance_coef", check_positive_float("balance_coef", coef, allow_zero=True))
        put("z_loss_coef", check_positive_float("z_loss_coef", self.z_loss_coef, allow_zero=True))
        if self.capacity_factor is not None:
            cf = check_positive_float("capacity_factor", self.capacity_factor)
            if cf > MAX_CAPACITY_FACTOR:
                raise ValueError(f"capacity_factor must be at most {MAX_CAPACITY_FACTOR:g} (C = ceil(capacity_factor·T·k/E) "
                                 f"must stay a finite integer; use None for no dropping), got {self.capacity_factor!r}")
            put("capacity_factor", cf)

    def replace(self, **changes):
        """A new config with ``changes``, checked like the first (this one is left as it was)."""
        return dataclasses.replace(self, **changes)

    def options(self):
        """``{name: value}`` of every option, in declaration order (repr, digests, benchmark JSON)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def param_shapes(self, router=("W_gate", "W_noise"), experts_here=None):
        """The shape of every parameter a layer with this config holds, by name.

        ``router``: the (d, E) router weights the layer has (``W_noise`` only if noisy).
        ``experts_here``: how many experts this process holds (default E; expert
        parallelism holds E/P per rank).
        """
        d, h, E = self.d_model, self.d_hidden, self.n_experts
        shapes = {name: (d, E) for name in router if name != "W_noise" or self.noisy}
        E = E if experts_here is None else experts_here
        shapes.update(W1=(E, d, h), b1=(E, h), W2=(E, h, d), b2=(E, d))
        if self.activation == "swiglu":
            shapes.update(W3=(E, d, h), b3=(E, h))
        return shapes
