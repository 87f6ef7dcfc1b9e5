"""The GP: router logits, Gaussian noise, top-k, and the three gate variants.

The router reads each patient's symptoms (a token ``x``, width d) and scores every
specialist (E experts). It is one matrix: the **clean logits** are

    L = x W_gate                                     x (T,d), W_gate (d,E), L (T,E)

While training, a noisy GP explores (Shazeer et al. 2017, "Outrageously Large
Neural Networks", eq. 4): each score gets Gaussian noise whose size the router
also learns, per token and expert,

    σ = softplus(x W_noise),   H = L + ε ⊙ σ,        ε ~ N(0,1), shape (T,E)

In eval mode there is no noise: ``H = L``. The gate then turns the scores into
referral weights. Three variants (docs/design.md §3):

1. **dense**  — ``G = softmax(H)``: every specialist is consulted (k = E);
2. **top-k**  — ``G = softmax(KeepTopK(H, k))`` (Shazeer eq. 3, 5): the k best
   specialists share a weight of exactly 1. Identical, values and gradients, to
   ``softmax → keep top-k → renormalize`` (both forms are here; a test shows it);
3. **switch** — ``G = softmax(H)`` kept at the top-k entries, *not* renormalized
   (Fedus et al. 2021, "Switch Transformers", eq. 1–2).

The k = 1 trap: with the top-k gate and k = 1 the single weight is exactly 1 for
every token, whatever the logits are, so the task loss sends **no gradient** to the
router. The Switch gate keeps ``p_e < 1`` and so keeps learning.

Gate functions return a :class:`Routing`: ``idx (T,k)`` the chosen experts, best
first (for the dense gate: all E experts in expert order), ``gates (T,k)`` their
weights, and ``probs (T,E)`` the full softmax of H (the balancing losses need it).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .layers import SoftmaxCache, softmax, softmax_backward, sigmoid, softplus
from ..validate import check_array, check_choice, check_int, check_rng, check_shapes

__all__ = [
    "init_gate_weights", "softplus", "sigmoid", "router_logits_forward", "router_logits_backward",
    "topk_indices", "Routing",
    "dense_gate_forward", "dense_gate_backward", "topk_gate_forward", "topk_gate_backward",
    "switch_gate_forward", "switch_gate_backward", "gate_forward", "gate_backward", "GATES", "GATE_PAIRS",
    "keep_topk_forward", "keep_topk_backward", "renormalize_forward", "renormalize_backward",
]


def init_gate_weights(d_model, n_experts, rng, dtype=np.float64):
    """The router's initial ``W_gate (d, E)``: N(0, 0.1/d), the Switch Transformer's
    reduced initialisation scale (Fedus et al. 2021, §2.4), so the first scores are
    small and the first referrals nearly uniform — every specialist gets patients
    while the GP is still learning."""
    rng = check_rng("rng", rng)               # an int seed becomes a Generator (SPEC 7: validate.check_rng)
    return (rng.standard_normal((d_model, n_experts)) * np.sqrt(0.1 / d_model)).astype(dtype)


# --------------------------------------------------------------------------- logits
class LogitsCache(NamedTuple):
    x: np.ndarray                  # (T,d)
    W_gate: np.ndarray             # (d,E)
    W_noise: np.ndarray | None     # (d,E), or None for a clean router
    z_noise: np.ndarray | None     # (T,E) x W_noise, before the softplus
    noise: np.ndarray | None       # (T,E) ε actually used (None: no noise added)
    clean: np.ndarray              # (T,E) L = x W_gate         (public: the load loss reads it)
    sigma: np.ndarray | None       # (T,E) softplus(x W_noise) (public: the load loss reads it)


def router_logits_forward(x, W_gate, W_noise=None, *, noise=None, rng=None, train=True):
    """Router scores ``H = x W_gate + ε ⊙ softplus(x W_noise)`` (Shazeer et al. 2017, eq. 4).

    Args:
        x: (T, d) tokens.
        W_gate: (d, E) gate weights.
        W_noise: (d, E) noise weights, or None for a clean router (then ``H = L``).
        noise: (T, E) explicit ε; if None and noise is needed, drawn from ``rng``.
        rng: ``numpy.random.Generator`` used when ``noise`` is None.
        train: in eval mode (False) no noise is ever added and ``noise`` is ignored.

    Returns:
        H (T, E) and a :class:`LogitsCache`; ``cache.clean`` is L and ``cache.sigma``
        is σ (None without ``W_noise``), both needed by the smooth load estimator.
    """
    check_shapes(W_gate=(W_gate, ("d", "E")), x=(x, ("T", "d")))
    L = x @ W_gate
    if W_noise is None:
        return L, LogitsCache(x, W_gate, None, None, None, L, None)
    check_shapes(W_noise=(W_noise, W_gate.shape))
    z = x @ W_noise
    sigma = softplus(z)                       # σ > 0: the GP's learned uncertainty
    if not train:
        return L, LogitsCache(x, W_gate, W_noise, z, None, L, sigma)
    if noise is None:
        if rng is None:
            raise ValueError("noisy logits in training need noise (a (T, E) array) or rng (a Generator)")
        noise = check_rng("rng", rng).standard_normal(L.shape, dtype=L.dtype)
    else:
        check_array("noise", noise, shape=L.shape)
    return L + noise * sigma, LogitsCache(x, W_gate, W_noise, z, noise, L, sigma)


def router_logits_backward(dH, cache, *, d_clean=None, d_sigma=None):
    """Backward of the router scores.

    ``H = L + ε σ`` so ∂H/∂L = 1 and ∂H/∂σ = ε. The load loss also uses L and σ
    directly, so their extra upstream gradients may be passed in:

        dL = dH + d_clean,   dσ = ε ⊙ dH + d_sigma,   dz = dσ ⊙ sigmoid(x W_noise)
        dW_gate = xᵀ dL,     dW_noise = xᵀ dz,        dx = dL W_gateᵀ + dz W_noiseᵀ

    Returns:
        dx (T, d) and ``{"W_gate": (d,E)}``, plus ``"W_noise"`` for a noisy router.
    """
    dL = dH if d_clean is None else dH + d_clean
    dx = dL @ cache.W_gate.T
    grads = {"W_gate": cache.x.T @ dL}
    if cache.W_noise is not None:
        ds = np.zeros_like(dH) if cache.noise is None else cache.noise * dH
        if d_sigma is not None:
            ds = ds + d_sigma
        dz = ds * sigmoid(cache.z_noise)         # softplus' = sigmoid
        dx = dx + dz @ cache.W_noise.T
        grads["W_noise"] = cache.x.T @ dz
    return dx, grads


# --------------------------------------------------------------------------- top-k
def topk_indices(H, k):
    """The k largest scores of each row, best first: ``idx (T, k)`` int.

    Exact ties go to the lower expert index, as in a stable sort of −H (which is
    what this computes) — deterministic, and the same rule everywhere (the load
    loss re-ranks with this function).
    """
    k = check_int("k", k, low=1, high=H.shape[-1])
    if k <= 8 and np.issubdtype(H.dtype, np.floating) and np.isfinite(H).all():
        # Speed: k passes of argmax cost O(k·E) per row; a row-wise stable sort costs
        # O(E log E) and is slow in NumPy (re-measured 2026-12-05, float64, T=4096, E=64, k=2:
        # 1.0 ms against 10.4 ms; the sort below is the plain rule both follow).
        # argmax returns the *first* maximum, so ties still go to the lower expert index;
        # each winner is then set to −∞, below every (finite) score left in its row.
        rest, rows = H.copy(), np.arange(H.shape[0])
        idx = np.empty((H.shape[0], k), dtype=np.intp)
        for j in range(k):                  # a loop over the k choices, not over tokens
            idx[:, j] = rest.argmax(axis=-1)
            rest[rows, idx[:, j]] = -np.inf
        return idx
    return np.argsort(-H, axis=-1, kind="stable")[:, :k]


class Routing(NamedTuple):
    idx: np.ndarray     # (T,k) chosen experts, best first (dense: all E in expert order)
    gates: np.ndarray   # (T,k) weight of each chosen expert
    probs: np.ndarray   # (T,E) full softmax of the scores


class GateCache(NamedTuple):
    kind: str
    idx: np.ndarray
    gates: np.ndarray
    probs: np.ndarray


def _rows(T):
    return np.arange(T)[:, None]


def _add_probs_grad(dH, probs, dprobs):
    """Add the gradient arriving at the full softmax ``probs`` (e.g. from the Switch loss)."""
    if dprobs is not None:
        dH = dH + softmax_backward(dprobs, SoftmaxCache(probs, -1))[0]
    return dH


def dense_gate_forward(H, k=None):
    """Dense gate ``G = softmax(H)``: all E experts, in expert order (``k`` is ignored: it is E).
    H (T,E) -> Routing."""
    check_array("H", H, ndim=2)
    p = softmax(H)
    idx = np.broadcast_to(np.arange(H.shape[1]), H.shape)
    return Routing(idx, p, p), GateCache("dense", idx, p, p)


def dense_gate_backward(dgates, cache, dprobs=None):
    """Softmax backward, ``dH = p ⊙ (dG − ⟨dG, p⟩)``; gates and probs are the same array."""
    dp = dgates if dprobs is None else dgates + dprobs
    return softmax_backward(dp, SoftmaxCache(cache.probs, -1))[0], {}


def topk_gate_forward(H, k):
    """Top-k gate ``G = softmax(KeepTopK(H, k))`` (Shazeer et al. 2017, eq. 3 and 5).

    Computed as a softmax over the k gathered scores only: the other E − k
    entries would be exp(−∞) = 0 anyway. H (T,E) -> Routing with gates (T,k)
    summing to exactly 1 per token.
    """
    check_array("H", H, ndim=2)
    idx = topk_indices(H, k)
    g = softmax(H[_rows(H.shape[0]), idx])
    p = softmax(H)
    return Routing(idx, g, p), GateCache("topk", idx, g, p)


def topk_gate_backward(dgates, cache, dprobs=None):
    """Softmax backward on the k kept scores; the dropped scores get exactly 0.

        dH[t, idx_tj] = g_tj (dG_tj − Σ_j' dG_tj' g_tj')

    With k = 1, g = 1 so dH = dG − dG = 0: the router learns nothing from the task.
    """
    idx, g = cache.idx, cache.gates
    dH = np.zeros_like(cache.probs)
    dH[_rows(idx.shape[0]), idx] = g * (dgates - np.sum(dgates * g, axis=1, keepdims=True))
    return _add_probs_grad(dH, cache.probs, dprobs), {}


def switch_gate_forward(H, k):
    """Switch gate: ``G = softmax(H)`` read at the top-k entries, not renormalized
    (Fedus et al. 2021, eq. 2). H (T,E) -> Routing; gates (T,k) sum to at most 1."""
    check_array("H", H, ndim=2)
    idx = topk_indices(H, k)
    p = softmax(H)
    g = p[_rows(H.shape[0]), idx]
    return Routing(idx, g, p), GateCache("switch", idx, g, p)


def switch_gate_backward(dgates, cache, dprobs=None):
    """Scatter dG into the full (T,E) softmax gradient, then softmax backward."""
    dp = np.zeros_like(cache.probs) if dprobs is None else np.array(dprobs, dtype=cache.probs.dtype)
    dp[_rows(cache.idx.shape[0]), cache.idx] += dgates      # idx has no repeats within a row
    return softmax_backward(dp, SoftmaxCache(cache.probs, -1))[0], {}


# The gates by name, each a (forward, backward) pair, as layers.ACTIVATIONS.
GATE_PAIRS = {
    "topk": (topk_gate_forward, topk_gate_backward),
    "dense": (dense_gate_forward, dense_gate_backward),
    "switch": (switch_gate_forward, switch_gate_backward),
}
GATES = tuple(GATE_PAIRS)


def gate_forward(H, k, kind="topk"):
    """Apply the gate called ``kind`` (one of :data:`GATES`); ``k`` is ignored for "dense"."""
    forward, _ = GATE_PAIRS[check_choice("gate", kind, GATES)]
    return forward(H, k)


def gate_backward(dgates, cache, dprobs=None):
    """Backward of :func:`gate_forward`: ``dgates (T,k)`` and optional ``dprobs (T,E)`` -> dH (T,E)."""
    _, backward = GATE_PAIRS[cache.kind]
    return backward(dgates, cache, dprobs)


# --------------------------------------------------------------------------- the two textbook forms
def keep_topk_forward(H, k):
    """Shazeer's KeepTopK (eq. 5): keep the k largest scores, set the rest to −∞.

    Follow it with ``layers.softmax`` to get the top-k gate as a dense (T,E) matrix.
    (``layers.softmax_forward`` would reject the −∞ as non-finite, on purpose.)
    """
    idx = topk_indices(H, k)
    mask = np.zeros(H.shape, dtype=bool)
    mask[_rows(H.shape[0]), idx] = True
    return np.where(mask, H, -np.inf), mask


def keep_topk_backward(dmasked, mask):
    """Gradient flows through the kept scores only. Returns (dH, {})."""
    return np.where(mask, dmasked, 0), {}


class RenormCache(NamedTuple):
    g: np.ndarray     # (T,k) the renormalized gates
    s: np.ndarray     # (T,1) the sum they were divided by
    idx: np.ndarray   # (T,k) the chosen experts
    shape: tuple      # (T,E) of p


def renormalize_forward(p, idx):
    """Keep the probabilities of the chosen experts and rescale them to sum to 1.

    p (T,E), idx (T,k) -> g (T,k) with ``g_j = p_j / s``, ``s = Σ_j p_j``.
    """
    sel = p[_rows(p.shape[0]), idx]
    s = np.sum(sel, axis=1, keepdims=True)
    g = sel / s
    return g, RenormCache(g, s, idx, p.shape)


def renormalize_backward(dg, cache):
    """Quotient rule: ``dp_j = (dg_j − ⟨dg, g⟩) / s`` at the chosen experts, 0 elsewhere."""
    g, s, idx, shape = cache
    dp = np.zeros(shape, dtype=g.dtype)
    dp[_rows(shape[0]), idx] = (dg - np.sum(dg * g, axis=1, keepdims=True)) / s
    return dp, {}
