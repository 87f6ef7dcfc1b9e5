"""Overworked specialists: the load-balancing losses and the router z-loss.

Left alone, a GP soon refers everyone to the one specialist who happened to
do well early; that specialist gets all the practice, does even better, and the
others are never trained (expert collapse). These auxiliary losses are added to
the task loss to keep the referrals spread out. Each is an unweighted
forward/backward pair; the layer multiplies it by its coefficient.

| loss | source | usual coefficient |
|---|---|---|
| importance ``CV(Σ_t G_t)²`` | Shazeer et al. 2017, §4 eq. 6–7 | w_importance = 0.1 |
| smooth load ``CV(Σ_t P_t)²`` | Shazeer et al. 2017, appendix A eq. 8–11 | w_load = 0.1 |
| Switch ``E · Σ_e f_e P_e`` | Fedus et al. 2021, §2.2 eq. 4–6 | α = 0.01 |
| router z-loss ``mean_t logsumexp(L_t)²`` | Zoph et al. 2022 (ST-MoE), §3.1 eq. 5 | c = 0.001 |

Shapes: T tokens, E experts, k experts per token.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .config import SWITCH_FRACTIONS  # noqa: F401  ("first", "all", "all/k"; the layer's option)
from .layers import softmax
from .normal import normal_cdf, normal_pdf  # noqa: F401  (Φ and φ in NumPy, no loop: see normal.py)
from .router import topk_indices
from ..validate import check_array, check_int, check_shapes

__all__ = [
    "cv_squared_forward", "cv_squared_backward",
    "importance_loss_forward", "importance_loss_backward",
    "normal_cdf", "normal_pdf", "load_probs_forward", "load_probs_backward", "load_loss_forward", "load_loss_backward",
    "switch_loss_forward", "switch_loss_backward",
    "z_loss_forward", "z_loss_backward", "SWITCH_FRACTIONS",
]


# --------------------------------------------------------------------------- CV²
class CVCache(NamedTuple):
    u: np.ndarray   # (E,) v / mean(v)
    m: float        # mean(v)


def cv_squared_forward(v):
    """Squared coefficient of variation ``CV(v)² = Var(v) / mean(v)²`` (population variance).

    Scale-free: it is 0 when all entries are equal, whatever their size. Computed
    as ``mean((v/m − 1)²)`` so a tiny mean cannot underflow ``m²``. If the mean is
    exactly 0 (all entries 0 for the non-negative vectors used here) the entries
    are all equal, so we return 0 — and a zero gradient — instead of dividing by 0.

    Args:
        v: (E,) non-negative per-expert totals.

    Returns:
        a float, and the cache.
    """
    check_array("v", v, ndim=1)
    m = float(np.mean(v))
    if m == 0.0:
        return 0.0, CVCache(np.zeros_like(v), 0.0)
    u = v / m
    return float(np.mean((u - 1.0) ** 2)), CVCache(u, m)


def cv_squared_backward(dloss, cache):
    """With ``u = v/m``, ``CV² = mean(u²) − 1``, so ``∂CV²/∂v = 2/(E m) · (u − mean(u²))``.

    Returns (dv (E,), {}); dv = 0 when the mean was 0.
    """
    u, m = cache
    if m == 0.0:
        return np.zeros_like(u), {}
    return (float(dloss) * 2.0 / (u.size * m)) * (u - np.mean(u**2)), {}


# --------------------------------------------------------------------------- importance
class ImportanceCache(NamedTuple):
    idx: np.ndarray       # (T,k)
    importance: np.ndarray  # (E,)
    cv: CVCache


def importance_loss_forward(gates, idx, n_experts):
    """Importance loss ``CV(Importance)²`` with ``Importance_e = Σ_t G_te`` (Shazeer eq. 6–7).

    How much referral *weight* each specialist receives, summed over the batch.

    Args:
        gates: (T, k) gate values of the chosen experts.
        idx: (T, k) int, which expert each gate belongs to.
        n_experts: E.

    Returns:
        loss (float), cache (``cache.importance`` is the (E,) vector).
    """
    E = check_int("n_experts", n_experts, low=1)
    check_array("gates", gates, ndim=2)
    imp = np.bincount(idx.reshape(-1), weights=gates.reshape(-1), minlength=E).astype(gates.dtype)
    loss, cv = cv_squared_forward(imp)
    return loss, ImportanceCache(idx, imp, cv)


def importance_loss_backward(dloss, cache):
    """Each gate receives its expert's share: ``dG_tj = ∂CV²/∂Importance[idx_tj]``.

    Note the trap: with the top-k gate and k = 1 every gate is exactly 1, so this
    gradient stops at the gate and never reaches the router. Returns (dgates (T,k), {}).
    """
    dimp, _ = cv_squared_backward(dloss, cache.cv)
    return dimp[cache.idx], {}


# --------------------------------------------------------------------------- smooth load
_Z_CLIP = 40.0   # Φ(±40) is exactly 0 or 1 in float64: beyond it Φ is flat, and its gradient is taken as 0


class LoadProbsCache(NamedTuple):
    ranked: np.ndarray   # (T, k+1) experts by noisy score, best first (the kink signature)
    in_topk: np.ndarray  # (T,E) bool
    z: np.ndarray        # (T,E) clipped standardized distance
    live: np.ndarray     # (T,E) bool: where z was not clipped (elsewhere Φ is flat)
    sigma: np.ndarray    # (T,E) σ, floored at the dtype's tiny
    k: int


def load_probs_forward(clean, noisy, sigma, k):
    """The smooth load's per-token part (Shazeer et al. 2017, appendix A, eq. 8–10).

    The real load (tokens per expert) is a step function of the scores — no gradient.
    Instead take, for each token t and expert e, the probability that e would be in
    the top k if *only its own* noise were drawn again:

        P(t,e) = Φ( (L_te − kth_excluding(H_t, k, e)) / σ_te )

    ``kth_excluding(H_t, k, e)`` is the k-th largest noisy score among the *other*
    experts: the (k+1)-th largest of H_t if e is in the top k, else the k-th largest.

    Args:
        clean: (T, E) clean logits L.
        noisy: (T, E) noisy logits H (= L in eval mode).
        sigma: (T, E) noise scale σ = softplus(x W_noise) > 0.
        k: experts per token. With k = E every P is 1 (no one can be displaced).

    Returns:
        P (T, E) in the logits' dtype, and the cache.
    """
    check_shapes(clean=(clean, ("T", "E")), noisy=(noisy, ("T", "E")), sigma=(sigma, ("T", "E")))
    T, E = clean.shape
    k = check_int("k", k, low=1, high=E)
    rows = np.arange(T)[:, None]
    ranked = topk_indices(noisy, min(k + 1, E))       # same ranking and tie rule as the gate
    in_topk = np.zeros((T, E), dtype=bool)
    in_topk[rows, ranked[:, :k]] = True
    if k == E:
        thr = np.full((T, E), -np.inf, dtype=clean.dtype)   # nobody can be displaced
    else:
        kth = noisy[np.arange(T), ranked[:, k - 1]][:, None]    # k-th largest
        k1th = noisy[np.arange(T), ranked[:, k]][:, None]       # (k+1)-th largest
        thr = np.where(in_topk, k1th, kth)
    sig = np.maximum(sigma, np.finfo(clean.dtype).tiny)        # σ can underflow to 0
    with np.errstate(over="ignore", invalid="ignore"):
        z_raw = (clean - thr) / sig
    z = np.clip(np.nan_to_num(z_raw, nan=0.0), -_Z_CLIP, _Z_CLIP)
    live = (np.abs(z) < _Z_CLIP) & (sigma > 0)
    P = normal_cdf(z).astype(clean.dtype)
    return P, LoadProbsCache(ranked, in_topk, z, live, sig, k)


def load_probs_backward(dP, cache):
    """Backward of :func:`load_probs_forward` into L, H and σ.

    With ``z = (L − thr)/σ``:

        dz = dP φ(z),   dL = dz/σ,   dσ = −dz z/σ,   d thr = −dz/σ

    and ``thr`` *is* one noisy score: H at the (k+1)-th ranked expert for the
    experts in the top k, H at the k-th ranked expert for the others. So d thr is
    summed into those two entries of dH — the gradient reaches the *other*
    experts' noisy scores, hence W_gate, W_noise and x.

    Args:
        dP: (T, E), or (E,) — the same for every token (the gradient of a loss of Σ_t P).

    Returns:
        d_clean, d_noisy, d_sigma (each (T,E): one gradient per input, in the forward's
        order) and ``{}`` (no parameters).
    """
    ranked, in_topk, z, live, sig, k = cache
    T, E = z.shape
    dz = np.where(live, dP * normal_pdf(z), 0).astype(sig.dtype)
    d_clean = dz / sig
    d_sigma = -d_clean * z
    d_noisy = np.zeros_like(d_clean)
    if k < E:
        t = np.arange(T)
        d_noisy[t, ranked[:, k]] -= np.sum(np.where(in_topk, d_clean, 0), axis=1)
        d_noisy[t, ranked[:, k - 1]] -= np.sum(np.where(in_topk, 0, d_clean), axis=1)
    return d_clean, d_noisy, d_sigma, {}


class LoadCache(NamedTuple):
    probs: LoadProbsCache
    load: np.ndarray     # (E,) smooth load
    cv: CVCache

    @property
    def ranked(self):
        """(T, k+1) the experts by noisy score, best first (the kink signature)."""
        return self.probs.ranked


def load_loss_forward(clean, noisy, sigma, k):
    """Smooth load estimator and its loss ``CV(Load)²`` (Shazeer et al. 2017, appendix A, eq. 8–11).

        Load_e = Σ_t P(t,e)       with P from :func:`load_probs_forward`

    Args and shapes as :func:`load_probs_forward`.

    Returns:
        loss (float), cache (``cache.load`` is the (E,) smooth load).
    """
    P, pcache = load_probs_forward(clean, noisy, sigma, k)
    load = P.sum(axis=0)
    loss, cv = cv_squared_forward(load)
    return loss, LoadCache(pcache, load, cv)


def load_loss_backward(dloss, cache):
    """Backward of the smooth load loss into L, H and σ: ``dP_te = ∂CV²/∂Load_e`` for every t,
    then :func:`load_probs_backward`. Returns d_clean, d_noisy, d_sigma (each (T,E)) and ``{}``."""
    dload, _ = cv_squared_backward(dloss, cache.cv)
    return load_probs_backward(dload[None, :], cache.probs)


# --------------------------------------------------------------------------- Switch


class SwitchCache(NamedTuple):
    f: np.ndarray      # (E,) chosen slots per token that went to e (no gradient)
    T: int
    dtype: np.dtype


def switch_loss_forward(probs, choices=None, *, first_choice=None, per_choice=1):
    """Switch Transformer auxiliary loss ``E · Σ_e f_e · P_e`` (Fedus et al. 2021, eq. 4–6).

    ``P_e`` = mean over tokens of the router probability of e; ``f_e`` = (number of
    entries of ``choices`` equal to e) / (T · per_choice) — a count, so it carries no
    gradient. The three conventions of the field differ in what ``choices`` holds and in
    what f is divided by:

    * **"first"** (GShard, Lepikhin et al. 2020; minimoe's default): ``choices`` is (T,),
      each token's first choice. f sums to 1, and at perfect balance ``f = P = 1/E``:
      the loss is exactly **1** (so α · loss = α).
    * **"all"** (HF transformers' ``load_balancing_loss_func``, used by Mixtral; flaxformer's
      ``_load_balancing_loss``, per group): ``choices`` is (T, k), every chosen expert. f sums
      to k, and at perfect balance ``f = k/E``, ``P = 1/E``: the loss is exactly **k**.
    * **"all/k"** (Megatron-core's ``switch_load_balancing_loss_func``): every chosen expert
      is counted, and f is divided by T·k (``per_choice=k``): f sums to 1 and the loss is
      exactly **1** at perfect balance, as GShard's, while counting every choice.

    The layer computes these from per-expert sums (``balance.py``); this function is the
    same loss written on the tokens, for the lessons and the tests.

    Args:
        probs: (T, E) full softmax of the router scores.
        choices: (T,) or (T, k) int experts chosen per token.
        first_choice: the older name of ``choices`` (a (T,) array), still accepted.
        per_choice: 1, or k for Megatron-core's "all/k" (f divided by T·k).

    Returns:
        loss (float), cache.
    """
    per_choice = check_int("per_choice", per_choice, low=1)
    if (choices is None) == (first_choice is None):
        raise TypeError("switch_loss_forward needs exactly one of choices and first_choice (its older name)")
    choices = first_choice if choices is None else choices
    check_array("probs", probs, ndim=2)
    T, E = probs.shape
    choices = np.asarray(choices)
    if choices.ndim not in (1, 2) or choices.shape[0] != T or not np.issubdtype(choices.dtype, np.integer):
        raise ValueError(f"choices must be an integer array of shape ({T},) or ({T}, k) (the experts each "
                         f"token chose), got {choices.dtype} {choices.shape}")
    f = np.bincount(choices.reshape(-1), minlength=E) / (max(T, 1) * per_choice)
    P = probs.mean(axis=0)
    return float(E * np.dot(f, P)), SwitchCache(f, T, probs.dtype)


def switch_loss_backward(dloss, cache):
    """Only P carries gradient: ``∂loss/∂probs_te = E f_e / T``. Returns (dprobs (T,E), {})."""
    f, T, dtype = cache
    row = (float(dloss) * f.size / max(T, 1)) * f
    return np.broadcast_to(row.astype(dtype), (T, f.size)).copy(), {}


# --------------------------------------------------------------------------- z-loss
class ZCache(NamedTuple):
    lse: np.ndarray  # (T,) logsumexp of each row
    p: np.ndarray    # (T,E) softmax of the logits


def z_loss_forward(logits):
    """Router z-loss ``mean_t (logsumexp_e L_te)²`` (Zoph et al. 2022, ST-MoE, eq. 5).

    Keeps the router's logits small, which keeps its softmax (and float32
    training) stable. Stable at logits of ±1e4: logsumexp subtracts the row max.

    Args:
        logits: (T, E) clean router logits.

    Returns:
        loss (float), cache.
    """
    check_array("logits", logits, ndim=2)
    mx = logits.max(axis=1)
    lse = mx + np.log(np.exp(logits - mx[:, None]).sum(axis=1))
    with np.errstate(over="ignore"):
        loss = float(np.mean(lse**2))
    if not np.isfinite(loss):
        raise FloatingPointError(f"the z-loss overflowed: logits up to {np.max(np.abs(logits)):.3g} give "
                                 f"logsumexp² beyond {np.finfo(logits.dtype).max:.3g} ({logits.dtype}); the "
                                 "router's logits are too large (lower the learning rate?)")
    return loss, ZCache(lse, softmax(logits))


def z_loss_backward(dloss, cache):
    """``∂/∂L_te = (2/T) · lse_t · softmax(L_t)_e`` (the derivative of logsumexp is softmax)."""
    lse, p = cache
    return (float(dloss) * 2.0 / lse.size) * lse[:, None] * p, {}
