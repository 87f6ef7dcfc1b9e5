"""The building blocks: affine, ReLU, GELU, SiLU and SwiGLU, softmax, and cross-entropy.

Each block is a pair of functions in the style of the CS231n assignments:

    out, cache = thing_forward(x, ...)
    dx, grads  = thing_backward(dout, cache)

``dout`` is ∂L/∂out for some scalar loss L; backward returns ∂L/∂x and a dict
``grads`` with ∂L/∂(each parameter) under the parameter's own name (empty for
blocks without parameters). A cache is a small NamedTuple holding exactly what
backward needs. A forward with several differentiable inputs (``combine_forward(yg,
gates, plan)``, ``load_loss_forward(clean, noisy, sigma, k)``) gets one gradient per
input back, positionally in the forward's order, then the ``grads`` dict, which holds
gradients of parameters only: ``dyg, dgates, grads = combine_backward(dy, cache)``.

Shapes: ``x`` may have any leading dimensions ``(..., d)`` — a batch of tokens
``(T, d)`` or of sequences ``(B, S, d)``; the last axis is the feature axis.

Forward functions check their inputs (rank, shape, floating dtype, no NaN/inf) and
raise a ``ValueError``/``TypeError`` naming the argument; backward functions check
that ``dout`` has the shape of ``out``, so a wrong upstream gradient fails loudly
instead of broadcasting into a silently wrong answer.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from ..validate import check_array, check_choice, check_shapes

__all__ = [
    "linear_forward", "linear_backward",
    "relu_forward", "relu_backward",
    "gelu_forward", "gelu_backward", "softplus", "sigmoid", "silu_forward", "silu_backward",
    "swiglu_forward", "swiglu_backward",
    "ActivationCache", "activation_forward", "activation_backward", "ACTIVATIONS",
    "softmax", "softmax_forward", "softmax_backward",
    "log_softmax", "cross_entropy_forward", "cross_entropy_backward", "PairLayer",
]


# --------------------------------------------------------------------------- affine
class LinearCache(NamedTuple):
    x: np.ndarray   # (..., d_in)
    W: np.ndarray   # (d_in, d_out)


def linear_forward(x, W, b):
    """Affine map ``out = x W + b``.

    Args:
        x: (..., d_in) inputs.
        W: (d_in, d_out) weights.
        b: (d_out,) bias.

    Returns:
        out: (..., d_out); cache for :func:`linear_backward`.
    """
    check_array("x", x, ndim=range(1, 8))
    check_array("W", W, ndim=2)
    check_array("b", b, shape=(W.shape[1],))
    if x.shape[-1] != W.shape[0]:
        raise ValueError(f"x has width {x.shape[-1]} but W expects {W.shape[0]} (W has shape {W.shape})")
    return x @ W + b, LinearCache(x, W)


def linear_backward(dout, cache):
    """Backward of the affine map.

    With ``out = x W + b`` and upstream ``dout = ∂L/∂out`` (..., d_out), writing
    ``X`` and ``D`` for x and dout flattened to one row per token:

        ∂L/∂x = dout Wᵀ                  (..., d_in)
        ∂L/∂W = Xᵀ D = Σ_t x_t ⊗ dout_t   (d_in, d_out)  — one outer product per token
        ∂L/∂b = Σ_t dout_t                (d_out,)       — b is added to every token

    Returns:
        dx, ``{"W": dW, "b": db}``.
    """
    x, W = cache
    check_array("dout", dout, shape=x.shape[:-1] + (W.shape[1],), finite=False)
    x2 = x.reshape(-1, x.shape[-1])
    d2 = dout.reshape(-1, dout.shape[-1])
    return dout @ W.T, {"W": x2.T @ d2, "b": d2.sum(axis=0)}


# --------------------------------------------------------------------------- activations
class ReluCache(NamedTuple):
    positive: np.ndarray  # boolean mask x > 0


def relu_forward(x):
    """``out = max(x, 0)`` elementwise. Returns out (same shape as x) and the cache."""
    check_array("x", x)
    return np.maximum(x, 0), ReluCache(x > 0)


def relu_backward(dout, cache):
    """ReLU passes the gradient where the input was positive and blocks it elsewhere.

    (At exactly 0 we take the derivative to be 0; it is a kink, and float inputs
    hit it with probability zero. A gradient check that steps across 0 measures
    a jump, not a slope; pass the mask as the selection signature to detect it.)
    """
    check_array("dout", dout, shape=cache.positive.shape, finite=False)
    return dout * cache.positive, {}


class GeluCache(NamedTuple):
    x: np.ndarray
    t: np.ndarray  # tanh(u), u = √(2/π)(x + 0.044715 x³)


_GELU_C = math.sqrt(2.0 / math.pi)
# Beyond |x| = 10, u > 43 and tanh u is ±1 to the last bit (1 − tanh 43 ≈ 1e-37, below float32's
# and float64's ulp). The cubic is evaluated at x clipped to ±10: nothing changes where tanh is
# not saturated, and x³ (or x² in backward) cannot overflow where it is (x³ does from 5.6e102
# in float64, 7e12 in float32, which made gelu_backward's slope 0·∞ = NaN).
_GELU_SATURATED = 10.0


def _gelu_cubic(x):
    """u = √(2/π) (x + 0.044715 x³) at x clipped to ±10 (see ``_GELU_SATURATED``)."""
    xc = np.clip(x, -_GELU_SATURATED, _GELU_SATURATED)
    return _GELU_C * (xc + 0.044715 * xc**3)


def gelu_forward(x):
    """GELU, **tanh form** (Hendrycks & Gimpel 2016, as used in BERT and GPT-2):

        gelu(x) = ½ x (1 + tanh(u)),   u = √(2/π) (x + 0.044715 x³)

    The tanh form is smooth and needs no erf; it differs from the exact
    ``x Φ(x)`` by less than 5e-4 everywhere (the largest gap is near x ≈ −2.7).
    For |x| ≥ 10, tanh u = ±1 exactly, so gelu(x) = x or 0 (u is computed at x clipped
    to ±10, so x³ never overflows). Returns out (same shape as x) and the cache.
    """
    check_array("x", x)
    t = np.tanh(_gelu_cubic(x))
    return 0.5 * x * (1.0 + t), GeluCache(x, t)


def gelu_backward(dout, cache):
    """Product rule on ``½ x (1 + tanh u)``, with ``d tanh(u)/du = 1 − tanh²u``:

        d gelu/dx = ½ (1 + t) + ½ x (1 − t²) · √(2/π) (1 + 3·0.044715 x²)

    Where tanh saturates (|x| ≥ 10) 1 − t² = 0 exactly, and du/dx is taken at x clipped to
    ±10 so that it stays finite: the slope is exactly 1 (x > 0) or 0 (x < 0), as it should,
    instead of 0·∞ = NaN once x² overflows.
    """
    x, t = cache
    check_array("dout", dout, shape=x.shape, finite=False)
    xc = np.clip(x, -_GELU_SATURATED, _GELU_SATURATED)
    du_dx = _GELU_C * (1.0 + 3 * 0.044715 * xc**2)
    return dout * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t**2) * du_dx), {}


# The smooth ones below are shared: the router's noise scale is softplus, DeepSeek-V3's
# gate and SwiGLU's silu are sigmoids. One definition of each, here.
def softplus(z):
    """``log(1 + e^z)`` = ``np.logaddexp(0, z)``, so it neither overflows nor loses digits.

    Written out as ``max(z, 0) + log1p(e^−|z|)``, the very formula ``logaddexp``
    evaluates (the exponent is never positive, and log1p keeps the tiny tail
    e^z exact). Speed: NumPy's logaddexp has no SIMD loop; exp and log1p do. Measured
    2026-12-05 on a (4096, 64) array (NumPy 2.4, 2 shared cores, median of 11 interleaved
    rounds): 2.3 ms against 7.4 ms in float64 (about 3×), 0.55 ms against 4.9 ms in float32
    (about 9×). The ratio depends on the machine: issue 21 saw 1.5× in float64 elsewhere.
    """
    return np.maximum(z, 0) + np.log1p(np.exp(-np.abs(z)))


def sigmoid(z):
    """The logistic sigmoid ``1 / (1 + e^−z)`` = ``exp(−softplus(−z))``, the derivative of softplus.

    Through softplus, so e^−z never overflows (z = −1e4 gives exactly 0, not a warning).
    """
    return np.exp(-softplus(-z))


class SiluCache(NamedTuple):
    x: np.ndarray
    s: np.ndarray   # sigmoid(x)


def silu_forward(x):
    """SiLU (swish, Elfwing et al. 2018; Ramachandran et al. 2017): ``silu(x) = x σ(x)``.
    Returns out (same shape as x) and the cache."""
    check_array("x", x)
    s = sigmoid(x)
    return x * s, SiluCache(x, s)


def silu_backward(dout, cache):
    """Product rule with ``σ' = σ(1 − σ)``: ``d silu/dx = σ(x) (1 + x (1 − σ(x)))``."""
    x, s = cache
    check_array("dout", dout, shape=x.shape, finite=False)
    return dout * s * (1.0 + x * (1.0 - s)), {}


class SwigluCache(NamedTuple):
    z1: np.ndarray   # (..., h) the gate branch x W1 + b1
    z3: np.ndarray   # (..., h) the linear branch x W3 + b3
    s: np.ndarray    # (..., h) sigmoid(z1)


def swiglu_forward(z1, z3):
    """SwiGLU's hidden layer (Shazeer 2020, "GLU Variants Improve Transformer", eq. 6):
    ``a = silu(z1) ⊙ z3`` — the silu branch gates the linear one. Two inputs of one shape;
    returns a and the cache."""
    check_array("z1", z1)
    check_array("z3", z3, shape=z1.shape)
    a1, c = silu_forward(z1)
    return a1 * z3, SwigluCache(z1, z3, c.s)


def swiglu_backward(da, cache):
    """Product rule: ``dz1 = da ⊙ z3 ⊙ silu'(z1)``, ``dz3 = da ⊙ silu(z1)``.
    Returns dz1, dz3 (one gradient per input, in the forward's order) and ``{}``."""
    z1, z3, s = cache
    check_array("da", da, shape=z1.shape, finite=False)
    dz1, _ = silu_backward(da * z3, SiluCache(z1, s))
    return dz1, da * (z1 * s), {}


ACTIVATIONS = {
    "relu": (relu_forward, relu_backward),
    "gelu": (gelu_forward, gelu_backward),
}


class ActivationCache(NamedTuple):
    name: str       # which activation, so backward knows which rule to use
    inner: tuple    # that activation's own cache


def activation_forward(x, name):
    """Apply the activation called ``name`` (``"relu"`` or ``"gelu"``). Returns out and the cache."""
    forward, _ = ACTIVATIONS[check_choice("activation", name, tuple(ACTIVATIONS))]
    out, cache = forward(x)
    return out, ActivationCache(name, cache)


def activation_backward(dout, cache):
    """Backward of :func:`activation_forward`."""
    name, inner = cache
    return ACTIVATIONS[name][1](dout, inner)


# --------------------------------------------------------------------------- softmax
def softmax(z, axis=-1):
    """Numerically stable softmax along ``axis`` (no input checks: see :func:`softmax_forward`).

    Subtracting the row maximum changes nothing mathematically (softmax is
    invariant to adding a constant to a row) but keeps ``exp`` from overflowing:
    the largest exponent is exp(0) = 1, so logits of ±1e4 give exact results
    (``softmax([1e4, -1e4]) = [1, 0]``) where the naive formula gives inf/inf = NaN.
    An entry of −∞ gets probability exactly 0 — that is how top-k masks the
    experts it did not pick — as long as each row has at least one finite entry.
    """
    z = z - np.max(z, axis=axis, keepdims=True)
    e = np.exp(z)
    return e / np.sum(e, axis=axis, keepdims=True)


class SoftmaxCache(NamedTuple):
    p: np.ndarray
    axis: int


def softmax_forward(z, axis=-1):
    """Row-wise softmax ``p_i = exp(z_i) / Σ_j exp(z_j)``.

    Args:
        z: (..., E) finite logits (or any shape, with ``axis`` the one to normalise).
            NaN and ±∞ are rejected: one of them turns a whole row into NaN, and
            an unexpected −∞ usually means something upstream overflowed. Masked
            logits (−∞ on purpose, as in top-k) go through :func:`softmax` directly.
        axis: the axis that sums to 1.

    Returns:
        p (same shape as z) and the cache.
    """
    check_array("z", z, ndim=range(1, 8))
    if isinstance(axis, bool) or not isinstance(axis, int) or not -z.ndim <= axis < z.ndim:
        raise ValueError(f"axis must be an integer in [{-z.ndim}, {z.ndim}) for z of shape {z.shape}, got {axis!r}")
    if z.shape[axis] == 0:
        raise ValueError(f"z must have at least one entry along axis {axis}, got shape {z.shape}")
    p = softmax(z, axis)
    return p, SoftmaxCache(p, axis)


def softmax_backward(dp, cache):
    """Softmax backward as a Jacobian-vector product.

    The Jacobian of one row is ``∂p_i/∂z_j = p_i (δ_ij − p_j)``, i.e.
    ``J = diag(p) − p pᵀ``. We never build it (it would be E×E per token);
    multiplying it by the upstream gradient collapses to

        dz = p ⊙ (dp − ⟨dp, p⟩)

    where ⟨dp, p⟩ is one number per row: each logit's gradient is its
    probability times how much its upstream gradient exceeds the average.
    """
    p, axis = cache
    check_array("dp", dp, shape=p.shape, finite=False)
    return p * (dp - np.sum(dp * p, axis=axis, keepdims=True)), {}


def log_softmax(z, axis=-1):
    """Stable ``log softmax(z) = z − logsumexp(z)`` (no input checks).

    Computed directly rather than as ``log(softmax(z))``: at logits ±1e4 the
    softmax underflows to 0 and its log is −∞, while ``z − logsumexp(z)`` is
    the exact, finite −2e4.
    """
    z = z - np.max(z, axis=axis, keepdims=True)
    return z - np.log(np.sum(np.exp(z), axis=axis, keepdims=True))


# --------------------------------------------------------------------------- cross-entropy
def check_labels(labels, C):
    """Class labels must exist: at least one class, every label in [0, C)."""
    if C == 0:
        raise ValueError("logits must have at least one class (last axis), got 0")
    if labels.size and (labels.min() < 0 or labels.max() >= C):
        raise ValueError(f"labels must be in [0, {C}) for {C} classes; got values from {labels.min()} to {labels.max()}")


class CrossEntropyCache(NamedTuple):
    p: np.ndarray       # (N, C) softmax of the logits
    labels: np.ndarray  # (N,) int
    shape: tuple        # the original logits shape


def cross_entropy_forward(logits, labels):
    """Mean cross-entropy of integer labels under ``softmax(logits)``.

        loss = −(1/N) Σ_n log softmax(logits_n)[labels_n]

    Args:
        logits: (..., C) unnormalized scores; leading dims are flattened to N rows.
        labels: (...,) integers in ``[0, C)``, one per row.

    Returns:
        loss (a float) and the cache. An empty batch (N = 0) has loss 0 and a
        zero gradient rather than 0/0.
    """
    labels = np.asarray(labels)
    C = check_shapes(logits=(logits, ("...", "C")), labels=(labels, ("...",), "one per row of logits"),
                     integer=("labels",))["C"]
    check_labels(labels, C)
    z = logits.reshape(-1, C)
    y = labels.reshape(-1)
    logp = log_softmax(z)
    N = max(z.shape[0], 1)
    loss = -logp[np.arange(z.shape[0]), y].sum() / N
    return float(loss), CrossEntropyCache(np.exp(logp), y, logits.shape)


def cross_entropy_backward(dloss, cache):
    """∂loss/∂logits = (softmax(logits) − onehot(labels)) / N, times the upstream ``dloss``.

    The famous simplification: the softmax Jacobian and the log's 1/p cancel.
    ``dloss`` is a scalar, because the loss is.
    """
    if np.ndim(dloss) != 0:
        raise ValueError(f"dloss must be a scalar (the loss is one number), got shape {np.shape(dloss)}")
    p, y, shape = cache
    N = max(p.shape[0], 1)
    d = p.copy()
    d[np.arange(p.shape[0]), y] -= 1.0
    return (float(dloss) / N) * d.reshape(shape), {}


# --------------------------------------------------------------------------- thin classes
class PairLayer:
    """The base of the thin classes (``Expert``, ``ExpertBank``, ``LayerNorm``, ...): one pair, kept.

    A thin class holds ``params`` and ``grads`` (dicts with identical keys, so one optimizer
    and one gradient checker serve every layer) and the cache of its last forward. A
    subclass names its pair's backward (``pair_backward = staticmethod(thing_backward)``),
    makes its weights with :meth:`_keep_params` and writes ``forward``, which stores the
    pair's cache in ``self._cache``; :meth:`backward` is the same for all of them.
    """

    pair_backward = None      # the subclass's thing_backward(dout, cache) -> (dx, grads)

    def _keep_params(self, params):
        """Set ``params``, zero ``grads`` of the same keys and shapes, and no cache yet."""
        self.params = params
        self.grads = {name: np.zeros_like(p) for name, p in params.items()}
        self._cache = None

    def backward(self, dout):
        """dout (the output's shape) -> the input's gradient; fills ``self.grads``."""
        if self._cache is None:
            raise RuntimeError("call forward before backward")
        dx, grads = self.pair_backward(dout, self._cache)
        self.grads.update(grads)
        return dx
