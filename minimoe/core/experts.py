"""The specialists: a feed-forward expert, and a bank of E of them.

An expert is the ordinary transformer feed-forward network (FFN), applied to each
token on its own:

    FFN(x) = act(x W1 + b1) W2 + b2          x (n,d), W1 (d,h), W2 (h,d)

or, with ``activation="swiglu"`` (Shazeer 2020; the FFN of Llama, Mixtral, DeepSeek, Qwen),

    FFN(x) = (silu(x W1 + b1) ⊙ (x W3 + b3)) W2 + b2       W1, W3 (d,h): Mixtral's w1, w3

W1 is the silu ("gate") branch, W3 the linear branch, W2 the output, as Mixtral's
w1/w3/w2. Mixtral has no biases; here b1, b3, b2 are present and start at zero (so a
freshly made SwiGLU expert computes Mixtral's function, and every key of the ReLU
expert is still there). SwiGLU costs three d×h matmuls instead of two: at the same h it
has 1.5× the parameters and FLOPs (Llama shrinks h to 2/3 of 4d to compensate).

In the analogy, each expert is a specialist doctor: same training, same kind of
examination, but each one ends up with its own expertise because it only sees the
patients the GP sends to it.

Two forms live here:

* :func:`ffn_forward` / :func:`ffn_backward` — one expert, built from the layers
  in ``layers.py``. This is the one to read first.
* :func:`experts_forward` / :func:`experts_backward` — a *bank* of E experts whose
  weights are stacked, ``W1 (E,d,h)``, ``b1 (E,h)``, ``W2 (E,h,d)``, ``b2 (E,d)``,
  run on tokens that are already **grouped by expert**: rows
  ``offsets[e]:offsets[e+1]`` of the input belong to expert e. Grouping is the
  dispatcher's job (``dispatch.py``); given the groups, the bank loops over
  experts (E iterations, never over tokens) and does one pair of matmuls each.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .layers import (ACTIVATIONS, ActivationCache, PairLayer, activation_backward, activation_forward, linear_backward,
                     linear_forward, swiglu_backward, swiglu_forward)
from ..validate import all_finite, check_array, check_choice, check_dtype, check_int, check_rng, check_shapes

EXPERT_ACTIVATIONS = tuple(ACTIVATIONS) + ("swiglu",)   # swiglu: two input matrices, W1 and W3

__all__ = ["EXPERT_ACTIVATIONS", "GLU_KEYS",
    "init_expert_params", "ffn_forward", "ffn_backward",
    "experts_forward", "experts_backward", "Expert", "ExpertBank",
]


def init_expert_params(n_experts, d_model, d_hidden, rng, dtype=np.float64, activation="relu"):
    """Initial weights for a bank of experts, stacked along the first axis.

    W1 uses He initialisation, N(0, 2/d) (He et al. 2015): each pre-activation
    ``z = x W1`` sums d terms, so its mean square is 2·mean(x²); a ReLU zeroes
    half of it, leaving mean(a²) = mean(x²). W2 uses N(0, 1/h) (LeCun): the
    output sums h terms, so mean(y²) = mean(a²). Together the expert maps
    inputs of mean square 1 to outputs of mean square about 1 — signals neither
    explode nor vanish. Biases start at zero. Each expert gets different random
    weights — that, plus the different patients each one is sent, is what lets
    them specialise.

    Args:
        n_experts: E ≥ 1.  d_model: d ≥ 1.  d_hidden: h ≥ 1.
        rng: ``numpy.random.Generator``; the only source of randomness.
        dtype: floating dtype of the returned arrays.
        activation: "swiglu" adds ``W3 (E,d,h)``, N(0, 1/d), drawn after W2 (so W1 and W2 are
            the ReLU expert's for the same rng), and ``b3 (E,h)`` = 0.

    Returns:
        dict with ``W1 (E,d,h)``, ``b1 (E,h)``, ``W2 (E,h,d)``, ``b2 (E,d)`` (and ``W3``, ``b3``).
    """
    E = check_int("n_experts", n_experts, low=1)
    d = check_int("d_model", d_model, low=1)
    h = check_int("d_hidden", d_hidden, low=1)
    rng = check_rng("rng", rng)  # an int seed becomes a Generator (SPEC 7: validate.check_rng)
    dtype = check_dtype("dtype", dtype)
    activation = check_choice("activation", activation, EXPERT_ACTIVATIONS)
    params = {
        "W1": (rng.standard_normal((E, d, h)) * np.sqrt(2.0 / d)).astype(dtype),
        "b1": np.zeros((E, h), dtype=dtype),
        "W2": (rng.standard_normal((E, h, d)) * np.sqrt(1.0 / h)).astype(dtype),
        "b2": np.zeros((E, d), dtype=dtype),
    }
    if activation == "swiglu":      # the linear branch: LeCun, mean(z3²) = mean(x²)
        params["W3"] = (rng.standard_normal((E, d, h)) * np.sqrt(1.0 / d)).astype(dtype)
        params["b3"] = np.zeros((E, h), dtype=dtype)
    return params


# --------------------------------------------------------------------------- one expert
GLU_KEYS = ("W3", "b3")     # the extra parameters of a SwiGLU expert


class FFNCache(NamedTuple):
    lin1: tuple   # cache of x W1 + b1
    act: tuple    # cache of the activation
    lin2: tuple   # cache of a W2 + b2


class GluCache(NamedTuple):
    """The activation cache of a SwiGLU expert: its second branch lives here, so an
    FFNCache has the same three fields (lin1, act, lin2) for every activation."""
    swiglu: tuple   # SwigluCache of silu(z1) ⊙ z3
    lin3: tuple     # cache of x W3 + b3


def check_glu(activation, W3, b3):
    """W3 and b3 come with activation="swiglu", and only with it."""
    activation = check_choice("activation", activation, EXPERT_ACTIVATIONS)
    if activation == "swiglu" and (W3 is None or b3 is None):
        raise ValueError("activation='swiglu' needs W3 and b3 (the linear branch x W3 + b3)")
    if activation != "swiglu" and (W3 is not None or b3 is not None):
        raise ValueError(f"W3 and b3 belong to activation='swiglu', not activation={activation!r}")
    return activation


def ffn_forward(x, W1, b1, W2, b2, activation="relu", *, W3=None, b3=None):
    """One expert: ``y = act(x W1 + b1) W2 + b2``, or ``(silu(x W1 + b1) ⊙ (x W3 + b3)) W2 + b2``.

    Args:
        x: (n, d) tokens (or any (..., d)).
        W1: (d, h), b1: (h,), W2: (h, d), b2: (d,).
        activation: ``"relu"``, ``"gelu"`` or ``"swiglu"``.
        W3: (d, h), b3: (h,): SwiGLU's linear branch (with activation="swiglu" only).

    Returns:
        y: (n, d); cache for :func:`ffn_backward`.
    """
    activation = check_glu(activation, W3, b3)
    # Every shape is checked here, so a mistake names W2 rather than the "W" of an inner linear.
    glu = {"W3": (W3, ("d", "h")), "b3": (b3, ("h",))} if W3 is not None else {}
    check_shapes(W1=(W1, ("d", "h")), x=(x, ("...", "d")), b1=(b1, ("h",)), W2=(W2, ("h", "d")), b2=(b2, ("d",)),
                 **glu)
    z, c1 = linear_forward(x, W1, b1)        # (n, h)  pre-activation
    if activation == "swiglu":
        z3, c3 = linear_forward(x, W3, b3)   # (n, h)  the linear branch
        a, inner = swiglu_forward(z, z3)     # silu(z) ⊙ z3
        ca = ActivationCache("swiglu", GluCache(inner, c3))
    else:
        a, ca = activation_forward(z, activation)
    y, c2 = linear_forward(a, W2, b2)        # (n, d)
    return y, FFNCache(c1, ca, c2)


def ffn_backward(dy, cache):
    """Backward of one expert: the chain rule, read right to left.

        da = dy W2ᵀ,  dW2 = aᵀ dy,  db2 = Σ dy
        dz = da ⊙ act'(z)
        dx = dz W1ᵀ,  dW1 = xᵀ dz,  db1 = Σ dz

    SwiGLU (a = silu(z1) ⊙ z3): dz1 = da ⊙ z3 ⊙ silu'(z1), dz3 = da ⊙ silu(z1), and x
    feeds both branches, so dx = dz1 W1ᵀ + dz3 W3ᵀ; dW3 = xᵀ dz3, db3 = Σ dz3.

    Returns:
        dx (n, d) and ``{"W1", "b1", "W2", "b2"}`` (plus ``"W3", "b3"`` for SwiGLU).
    """
    if cache.act.name == "swiglu":
        da, g2 = linear_backward(dy, cache.lin2)
        dz1, dz3, _ = swiglu_backward(da, cache.act.inner.swiglu)
        dx1, g1 = linear_backward(dz1, cache.lin1)
        dx3, g3 = linear_backward(dz3, cache.act.inner.lin3)
        return dx1 + dx3, {"W1": g1["W"], "b1": g1["b"], "W2": g2["W"], "b2": g2["b"], "W3": g3["W"], "b3": g3["b"]}
    da, g2 = linear_backward(dy, cache.lin2)
    dz, _ = activation_backward(da, cache.act)
    dx, g1 = linear_backward(dz, cache.lin1)
    return dx, {"W1": g1["W"], "b1": g1["b"], "W2": g2["W"], "b2": g2["b"]}


# --------------------------------------------------------------------------- a bank of experts
class BankCache(NamedTuple):
    offsets: np.ndarray  # (E+1,) group boundaries
    ffn: tuple           # one FFNCache per expert, for its rows offsets[e]:offsets[e+1]


def check_offsets(offsets, E, N):
    """Check group boundaries: an (E+1,) integer array from 0 to N that never decreases."""
    offsets = np.asarray(offsets)
    if offsets.shape != (E + 1,) or not np.issubdtype(offsets.dtype, np.integer):
        raise ValueError(f"offsets must be an integer array of shape ({E + 1},) (E+1 group boundaries), "
                         f"got {offsets.dtype} {offsets.shape}")
    if offsets[0] != 0 or offsets[-1] != N or np.any(np.diff(offsets) < 0):
        raise ValueError(f"offsets must start at 0, end at N={N} and never decrease; got {offsets.tolist()}")
    return offsets


def check_bank(x, offsets, W1, b1, W2, b2, W3=None, b3=None):
    """The bank's shape checks (shared with ``fast.py``): returns (E, d, h) and the offsets."""
    glu = {"W3": (W3, ("E", "d", "h")), "b3": (b3, ("E", "h"))} if W3 is not None else {}
    check_shapes(W1=(W1, ("E", "d", "h")), x=(x, ("N", "d")), b1=(b1, ("E", "h")),
                 W2=(W2, ("E", "h", "d")), b2=(b2, ("E", "d")), finite=("x",), **glu)
    return W1.shape, check_offsets(offsets, W1.shape[0], x.shape[0])


def experts_forward(x, offsets, W1, b1, W2, b2, activation="relu", *, W3=None, b3=None):
    """Run a bank of E experts on tokens grouped by expert: :func:`ffn_forward` on each group.

    Args:
        x: (N, d) tokens, grouped: rows ``offsets[e]:offsets[e+1]`` go to expert e.
            (N counts (token, expert) assignments, so a token sent to k experts
            appears k times.)
        offsets: (E+1,) int group boundaries, ``offsets[0] = 0``, ``offsets[E] = N``.
        W1: (E, d, h), b1: (E, h), W2: (E, h, d), b2: (E, d).
        activation: ``"relu"``, ``"gelu"`` or ``"swiglu"``.
        W3: (E, d, h), b3: (E, h): SwiGLU's linear branch (activation="swiglu" only).

    Returns:
        y: (N, d), row i is the output of its expert on row i of x, with dtype
        ``result_type(x, W1)`` (float32 in, float32 out); the cache.
    """
    activation = check_glu(activation, W3, b3)
    (E, d, h), offsets = check_bank(x, offsets, W1, b1, W2, b2, W3, b3)
    y = np.zeros((x.shape[0], d), dtype=np.result_type(x, W1))
    caches = []
    for e in range(E):                      # a loop over experts, not tokens
        s, t = offsets[e], offsets[e + 1]
        glu = {"W3": W3[e], "b3": b3[e]} if W3 is not None else {}
        y[s:t], cache = ffn_forward(x[s:t], W1[e], b1[e], W2[e], b2[e], activation, **glu)
        caches.append(cache)
    check_output_finite(y, W1=W1, b1=b1, W2=W2, b2=b2, **({"W3": W3, "b3": b3} if W3 is not None else {}))
    return y, BankCache(offsets, tuple(caches))


def check_output_finite(y, **weights):
    """Raise a clear error if y holds NaN or inf, naming the weight it came from."""
    if all_finite(y):
        return
    for name, w in weights.items():
        check_array(name, w)                  # raises "<name> contains NaN or inf"
    raise FloatingPointError("the experts' output overflowed to inf or NaN although every input is "
                             "finite; the weights or inputs are too large (lower the learning rate?)")


def experts_backward(dy, cache):
    """Backward of the bank: :func:`ffn_backward` applied to each group.

    An expert's weight gradient only collects the tokens in its own group; an
    expert that received no tokens gets an exactly zero gradient (its group is empty).

    Args:
        dy: (N, d) upstream gradient, grouped like the forward's input.
        cache: from :func:`experts_forward`.

    Returns:
        dx (N, d) and ``{"W1": (E,d,h), "b1": (E,h), "W2": (E,h,d), "b2": (E,d)}`` (plus
        ``"W3": (E,d,h), "b3": (E,h)`` for SwiGLU).
    """
    offsets, caches = cache
    first = caches[0].lin1                 # LinearCache(x, W1[0]): the shapes of the bank
    N, d = offsets[-1], first.W.shape[0]
    check_array("dy", dy, shape=(N, d), finite=False)
    dx = np.zeros((N, d), dtype=np.result_type(dy, first.W))
    grads = {name: [] for name in ("W1", "b1", "W2", "b2") + (GLU_KEYS if caches[0].act.name == "swiglu" else ())}
    for e, c in enumerate(caches):           # ffn_backward on one group at a time
        s, t = offsets[e], offsets[e + 1]
        dx[s:t], g = ffn_backward(dy[s:t], c)
        for name in grads:
            grads[name].append(g[name])
    return dx, {name: np.stack(g) for name, g in grads.items()}


# --------------------------------------------------------------------------- thin classes
class Expert(PairLayer):
    """One specialist: an FFN with ``params``/``grads`` dicts of identical keys.

    Also the dense FFN of the clinic's generalist and of a dense transformer block, so it
    has a layer's surface: ``forward(x, train, noise)`` (a dense FFN has no routing, so
    both are ignored), ``aux_loss`` (0), ``n_params``, ``n_active_params``, ``flops_per_token()``.

    Example:
        >>> ex = Expert(d_model=8, d_hidden=32, rng=np.random.default_rng(0))
        >>> y = ex.forward(np.ones((5, 8)))          # (5, 8)
        >>> dx = ex.backward(np.ones_like(y))        # fills ex.grads
    """

    pair_backward = staticmethod(ffn_backward)
    aux_loss = 0.0

    def __init__(self, d_model, d_hidden, activation="relu", rng=None, dtype=np.float64):
        rng = np.random.default_rng(0) if rng is None else rng
        self.activation = check_choice("activation", activation, EXPERT_ACTIVATIONS)
        self.d_model, self.d_hidden = d_model, d_hidden
        self._keep_params({k: v[0] for k, v in init_expert_params(1, d_model, d_hidden, rng, dtype,
                                                                  self.activation).items()})

    def forward(self, x, train=True, noise=None):
        """x (n, d) -> y (n, d)."""
        y, self._cache = ffn_forward(x, **self.params, activation=self.activation)
        return y

    @property
    def n_params(self):
        """W1, b1, W2, b2: every one touches every token."""
        return int(sum(v.size for v in self.params.values()))

    n_active_params = n_params

    def flops_per_token(self):
        """2 FLOPs per multiply-add of the matmuls, d×h and h×d — and SwiGLU's second d×h
        (6dh then); biases and the activation are not counted."""
        return (6 if self.activation == "swiglu" else 4) * self.d_model * self.d_hidden


class ExpertBank(PairLayer):
    """E specialists with stacked weights ``W1 (E,d,h)``, ``b1 (E,h)``, ``W2 (E,h,d)``, ``b2 (E,d)``.

    ``forward(x, offsets)`` runs each expert on its group of rows (see :func:`experts_forward`).
    """

    pair_backward = staticmethod(experts_backward)

    def __init__(self, n_experts, d_model, d_hidden, activation="relu", rng=None, dtype=np.float64):
        rng = np.random.default_rng(0) if rng is None else rng
        self.activation = check_choice("activation", activation, EXPERT_ACTIVATIONS)
        self._keep_params(init_expert_params(n_experts, d_model, d_hidden, rng, dtype, self.activation))

    def forward(self, x, offsets):
        """x (N, d) grouped by expert, offsets (E+1,) -> y (N, d)."""
        y, self._cache = experts_forward(x, offsets, **self.params, activation=self.activation)
        return y
