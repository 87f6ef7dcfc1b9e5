"""The specialists: a feed-forward expert, and a bank of E of them.

An expert is the ordinary transformer feed-forward network (FFN), applied to each
token on its own:

    FFN(x) = act(x W1 + b1) W2 + b2          x (n,d), W1 (d,h), W2 (h,d)

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

from .layers import ReluCache, activation_backward, activation_forward, linear_backward, linear_forward
from ..validate import all_finite, check_array, check_choice, check_dtype, check_int, check_rng

__all__ = [
    "init_expert_params", "ffn_forward", "ffn_backward",
    "experts_forward", "experts_backward", "Expert", "ExpertBank",
]


def init_expert_params(n_experts, d_model, d_hidden, rng, dtype=np.float64):
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

    Returns:
        dict with ``W1 (E,d,h)``, ``b1 (E,h)``, ``W2 (E,h,d)``, ``b2 (E,d)``.
    """
    E = check_int("n_experts", n_experts, low=1)
    d = check_int("d_model", d_model, low=1)
    h = check_int("d_hidden", d_hidden, low=1)
    rng = check_rng("rng", rng)  # SPEC 7: an int seed becomes a Generator
    dtype = check_dtype("dtype", dtype)
    return {
        "W1": (rng.standard_normal((E, d, h)) * np.sqrt(2.0 / d)).astype(dtype),
        "b1": np.zeros((E, h), dtype=dtype),
        "W2": (rng.standard_normal((E, h, d)) * np.sqrt(1.0 / h)).astype(dtype),
        "b2": np.zeros((E, d), dtype=dtype),
    }


# --------------------------------------------------------------------------- one expert
class FFNCache(NamedTuple):
    lin1: tuple   # cache of x W1 + b1
    act: tuple    # cache of the activation
    lin2: tuple   # cache of a W2 + b2


def ffn_forward(x, W1, b1, W2, b2, activation="relu"):
    """One expert: ``y = act(x W1 + b1) W2 + b2``.

    Args:
        x: (n, d) tokens (or any (..., d)).
        W1: (d, h), b1: (h,), W2: (h, d), b2: (d,).
        activation: ``"relu"`` or ``"gelu"``.

    Returns:
        y: (n, d); cache for :func:`ffn_backward`.
    """
    # Check every shape here, so a mistake names W2 rather than the "W" of an inner linear.
    check_array("W1", W1, ndim=2)
    d, h = W1.shape
    check_array("x", x, ndim=range(1, 8))
    if x.shape[-1] != d:
        raise ValueError(f"x has width {x.shape[-1]} but W1 expects d={d} (W1 has shape {W1.shape})")
    check_array("b1", b1, shape=(h,))
    check_array("W2", W2, shape=(h, d))
    check_array("b2", b2, shape=(d,))
    z, c1 = linear_forward(x, W1, b1)        # (n, h)  pre-activation
    a, ca = activation_forward(z, activation)
    y, c2 = linear_forward(a, W2, b2)        # (n, d)
    return y, FFNCache(c1, ca, c2)


def ffn_backward(dy, cache):
    """Backward of one expert: the chain rule, read right to left.

        da = dy W2ᵀ,  dW2 = aᵀ dy,  db2 = Σ dy
        dz = da ⊙ act'(z)
        dx = dz W1ᵀ,  dW1 = xᵀ dz,  db1 = Σ dz

    Returns:
        dx (n, d) and ``{"W1", "b1", "W2", "b2"}``.
    """
    da, g2 = linear_backward(dy, cache.lin2)
    dz, _ = activation_backward(da, cache.act)
    dx, g1 = linear_backward(dz, cache.lin1)
    return dx, {"W1": g1["W"], "b1": g1["b"], "W2": g2["W"], "b2": g2["b"]}


# --------------------------------------------------------------------------- a bank of experts
class BankCache(NamedTuple):
    x: np.ndarray        # (N, d) grouped input
    offsets: np.ndarray  # (E+1,) group boundaries
    a: np.ndarray        # (N, h) hidden activations
    act: tuple           # activation cache
    W1: np.ndarray       # (E, d, h)
    W2: np.ndarray       # (E, h, d)


def _check_offsets(offsets, E, N):
    offsets = np.asarray(offsets)
    if offsets.shape != (E + 1,) or not np.issubdtype(offsets.dtype, np.integer):
        raise ValueError(f"offsets must be an integer array of shape ({E + 1},) (E+1 group boundaries), "
                         f"got {offsets.dtype} {offsets.shape}")
    if offsets[0] != 0 or offsets[-1] != N or np.any(np.diff(offsets) < 0):
        raise ValueError(f"offsets must start at 0, end at N={N} and never decrease; got {offsets.tolist()}")
    return offsets


def experts_forward(x, offsets, W1, b1, W2, b2, activation="relu"):
    """Run a bank of E experts on tokens grouped by expert.

    Args:
        x: (N, d) tokens, grouped: rows ``offsets[e]:offsets[e+1]`` go to expert e.
            (N counts (token, expert) assignments, so a token sent to k experts
            appears k times.)
        offsets: (E+1,) int group boundaries, ``offsets[0] = 0``, ``offsets[E] = N``.
        W1: (E, d, h), b1: (E, h), W2: (E, h, d), b2: (E, d).
        activation: ``"relu"`` or ``"gelu"``.

    Returns:
        y: (N, d), row i is the output of its expert on row i of x, with dtype
        ``result_type(x, W1)`` (float32 in, float32 out); the cache.
    """
    # The weights' shapes are checked at the door; their values through the output (below).
    check_array("W1", W1, ndim=3, finite=False)
    E, d, h = W1.shape
    check_array("x", x, shape=(None, d))
    check_array("b1", b1, shape=(E, h), finite=False)
    check_array("W2", W2, shape=(E, h, d), finite=False)
    check_array("b2", b2, shape=(E, d), finite=False)
    offsets = _check_offsets(offsets, E, x.shape[0])
    dtype = np.result_type(x, W1)
    z = np.empty((x.shape[0], h), dtype=dtype)
    for e in range(E):                      # a loop over experts, not tokens
        s, t = offsets[e], offsets[e + 1]
        if s < t:
            np.matmul(x[s:t], W1[e], out=z[s:t])
            z[s:t] += b1[e]
    a, act_cache = _activation_forward_inplace(z, activation)   # one vectorized call for all groups
    y = np.empty((x.shape[0], d), dtype=dtype)
    for e in range(E):
        s, t = offsets[e], offsets[e + 1]
        if s < t:
            np.matmul(a[s:t], W2[e], out=y[s:t])
            y[s:t] += b2[e]
    _check_output_finite(y, W1=W1, b1=b1, W2=W2, b2=b2)
    return y, BankCache(x, offsets, a, act_cache, W1, W2)


def _check_output_finite(y, **weights):
    """Raise a clear error if y holds NaN or inf, naming the weight it came from.

    Speed: the bank's weights are E·d·h numbers each; checking them on every forward
    costs time that grows with E (the one thing a sparse layer should not do), while
    checking the output costs N·d. A non-finite weight that no token reaches cannot
    spoil y, and is reported the first time a token does.
    """
    if all_finite(y):
        return
    for name, w in weights.items():
        check_array(name, w)                  # raises "<name> contains NaN or inf"
    raise FloatingPointError("the experts' output overflowed to inf or NaN although every input is "
                             "finite; the weights or inputs are too large (lower the learning rate?)")


def experts_backward(dy, cache, out=None):
    """Backward of the bank: :func:`ffn_backward` applied to each group.

    An expert's weight gradient only collects the tokens in its own group; an
    expert that received no tokens gets an exactly zero gradient.

    Args:
        dy: (N, d) upstream gradient, grouped like the forward's input.
        cache: from :func:`experts_forward`.
        out: optional dict of arrays ``{"W1", "b1", "W2", "b2"}`` of the gradients'
            shapes and dtype to write into (a layer passes its own ``grads``; every
            entry is overwritten). Speed only: the weight gradients are E·d·h numbers
            each, and fresh arrays of that size every step cost page faults that grow
            with E (32 MiB each at E=64, d=128, h=512 in float64).

    Returns:
        dx (N, d) and ``{"W1": (E,d,h), "b1": (E,h), "W2": (E,h,d), "b2": (E,d)}``
        (the arrays of ``out`` when given).
    """
    x, offsets, a, act_cache, W1, W2 = cache
    check_array("dy", dy, shape=(x.shape[0], W2.shape[2]), finite=False)
    E, d, h = W1.shape
    # Speed: np.empty, not np.zeros — every expert with tokens overwrites its own slice
    # below, so only idle experts are zeroed (zero-filling all of dW1 and dW2 costs time
    # that grows with E: 64 MiB of writes at E=64, d=128, h=512 in float64).
    shapes = {"W1": W1.shape, "b1": (E, h), "W2": W2.shape, "b2": (E, d)}
    if out is None:
        out = {name: np.empty(shape, dtype=W1.dtype) for name, shape in shapes.items()}
    else:
        for name, shape in shapes.items():
            if name not in out or out[name].shape != shape or out[name].dtype != W1.dtype:
                raise ValueError(f"out[{name!r}] must be a {W1.dtype} array of shape {shape}")
    dW1, db1, dW2, db2 = out["W1"], out["b1"], out["W2"], out["b2"]
    dx = np.empty_like(x)
    # Speed: the backward runs one expert at a time, so da and dz are (n_e, h) blocks
    # that stay in cache instead of (N, h) arrays (32 MiB at N=8192, h=512 in float64);
    # and one workspace, as tall as the largest group, holds them for every expert,
    # because a fresh multi-MiB block per expert costs page faults each time.
    work = np.empty((int(np.max(np.diff(offsets), initial=0)), h), dtype=np.result_type(dy, W2))
    for e in range(E):                      # ffn_backward on one group at a time
        s, t = offsets[e], offsets[e + 1]
        if s == t:                          # no tokens: an exactly zero gradient
            dW1[e], dW2[e], db1[e], db2[e] = 0, 0, 0, 0
            continue
        da = np.matmul(dy[s:t], W2[e].T, out=work[:t - s])      # (n_e, h)
        np.matmul(a[s:t].T, dy[s:t], out=dW2[e])
        db2[e] = dy[s:t].sum(axis=0)
        dz = _activation_backward_rows(da, act_cache, s, t)      # (n_e, h)
        np.matmul(dz, W1[e].T, out=dx[s:t])
        np.matmul(x[s:t].T, dz, out=dW1[e])
        db1[e] = dz.sum(axis=0)
    return dx, {"W1": dW1, "b1": db1, "W2": dW2, "b2": db2}


def _activation_forward_inplace(z, activation):
    """``layers.activation_forward``, except that ReLU may overwrite z. Returns (a, cache).

    Speed: the bank keeps its hidden activations for backward, and at N=8192, h=512
    in float64 each (N, h) array is 32 MiB. ReLU in place turns z's buffer into a, so
    only one is allocated. The cache is the same ``("relu", ReluCache(z > 0))`` that
    ``layers.relu_forward`` makes. GELU's backward needs z itself: no shortcut there.
    """
    if activation != "relu":
        return activation_forward(z, activation)
    positive = z > 0
    return np.maximum(z, 0, out=z), ("relu", ReluCache(positive))


def _activation_backward_rows(da, act_cache, s, t):
    """``layers.activation_backward`` for rows s:t of the bank; for ReLU it overwrites da.

    Speed: ReLU's backward is a mask, applied in place (no new (n_e, h) block).
    """
    name, inner = act_cache
    if name == "relu":
        return np.multiply(da, inner.positive[s:t], out=da)
    rows = inner._make(field[s:t] for field in inner)   # every field of the cache is (N, h)
    return activation_backward(da, (name, rows))[0]


# --------------------------------------------------------------------------- thin classes
class Expert:
    """One specialist: an FFN with ``params``/``grads`` dicts of identical keys.

    Example:
        >>> ex = Expert(d_model=8, d_hidden=32, rng=np.random.default_rng(0))
        >>> y = ex.forward(np.ones((5, 8)))          # (5, 8)
        >>> dx = ex.backward(np.ones_like(y))        # fills ex.grads
    """

    def __init__(self, d_model, d_hidden, activation="relu", rng=None, dtype=np.float64):
        rng = np.random.default_rng(0) if rng is None else rng
        check_choice("activation", activation, ("relu", "gelu"))
        p = init_expert_params(1, d_model, d_hidden, rng, dtype)
        self.params = {k: v[0] for k, v in p.items()}
        self.grads = {k: np.zeros_like(v) for k, v in self.params.items()}
        self.activation = activation
        self._cache = None

    def forward(self, x):
        """x (n, d) -> y (n, d)."""
        y, self._cache = ffn_forward(x, **self.params, activation=self.activation)
        return y

    def backward(self, dy):
        """dy (n, d) -> dx (n, d); fills ``self.grads``."""
        if self._cache is None:
            raise RuntimeError("call forward before backward")
        dx, grads = ffn_backward(dy, self._cache)
        self.grads.update(grads)
        return dx


class ExpertBank:
    """E specialists with stacked weights ``W1 (E,d,h)``, ``b1 (E,h)``, ``W2 (E,h,d)``, ``b2 (E,d)``.

    ``forward(x_grouped, offsets)`` runs expert e on rows ``offsets[e]:offsets[e+1]``
    (see :func:`experts_forward`); ``backward(dy)`` fills ``grads`` with the
    same keys and shapes as ``params``.
    """

    def __init__(self, n_experts, d_model, d_hidden, activation="relu", rng=None, dtype=np.float64):
        rng = np.random.default_rng(0) if rng is None else rng
        check_choice("activation", activation, ("relu", "gelu"))
        self.params = init_expert_params(n_experts, d_model, d_hidden, rng, dtype)
        self.grads = {k: np.zeros_like(v) for k, v in self.params.items()}
        self.activation = activation
        self._cache = None

    def forward(self, x, offsets):
        """x (N, d) grouped by expert, offsets (E+1,) -> y (N, d)."""
        y, self._cache = experts_forward(x, offsets, **self.params, activation=self.activation)
        return y

    def backward(self, dy):
        """dy (N, d) -> dx (N, d); fills ``self.grads``."""
        if self._cache is None:
            raise RuntimeError("call forward before backward")
        dx, grads = experts_backward(dy, self._cache)
        self.grads.update(grads)
        return dx
