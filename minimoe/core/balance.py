"""Balancing from per-expert sums: what the layer does with the losses of ``losses.py``.

Look at the four auxiliary losses again. Each reads the tokens only through a few sums over
them, one number per expert (or one in all):

    importance  CV(Σ_t G_te)²                              gate mass     m_e = Σ_t G_te
    load        CV(Σ_t P(t,e))²                            smooth load   l_e = Σ_t P(t,e)
    Switch      E · Σ_e (c_e / (T·q)) · (s_e / T)          choices       c_e = #{t: e counted}
                                                           prob mass     s_e = Σ_t p_te
    z-loss      (Σ_t lse_t²) / T                           lse²          z   = Σ_t logsumexp(L_t)²

(q = k for Megatron-core's "all/k" convention, else 1.) So the layer computes them in two
pairs instead of one:

    tokens ──balance_sums_forward──► sums (per group) ──balance_loss_forward──► aux_loss
    dgates, dprobs, dL, dH, dσ ◄──balance_sums_backward── dsums ◄──balance_loss_backward──

and everything the field varies is a choice of *group*, not a new loss:

* **per-sequence balancing** (HF Switch Transformers, flaxformer, DeepSeek-V3's
  sequence-wise loss) is the sums taken per sequence: G groups, the loss averaged over them;
* **expert parallelism** is the sums of every rank's tokens added up before the second
  pair (``team.reduce_sums`` in moe.py): the ranks exchange E numbers per sum, never tokens.

The z-loss is a mean over all tokens in every mode (its per-group average is the pooled
mean when the groups have equal size, which they do).

Shapes: T tokens, E experts, k per token, G groups of S = T/G consecutive tokens.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .losses import cv_squared_backward, cv_squared_forward, load_probs_backward, load_probs_forward

__all__ = ["BalanceSums", "balance_sums_forward", "balance_sums_backward", "balance_loss_forward",
           "balance_loss_backward", "switch_choices"]


class BalanceSums(NamedTuple):
    """Per-expert sums over each of G groups of tokens (None: no loss needs that sum)."""
    tokens: np.ndarray              # (G,) tokens in each group
    gate_mass: np.ndarray           # (G,E) Σ_t G_te      importance (and stats["importance"])
    load: np.ndarray | None         # (G,E) Σ_t P(t,e)    smooth load
    chosen: np.ndarray | None       # (G,E) choices counted by the Switch loss's f
    prob_mass: np.ndarray | None    # (G,E) Σ_t p_te      the Switch loss's P
    lse_sq: np.ndarray | None       # (G,)  Σ_t logsumexp(L_t)²   z-loss


class SumsCache(NamedTuple):
    group: np.ndarray               # (T,) each token's group
    idx: np.ndarray                 # (T,k) chosen experts
    load: tuple | None              # load_probs_forward's cache
    lse: np.ndarray | None          # (T,) logsumexp of the clean logits (z-loss)
    softmax_clean: np.ndarray | None   # (T,E) softmax of the clean logits (z-loss)
    T: int
    E: int


def switch_choices(routing, cfg):
    """What the Switch loss's f counts: each token's first choice ("first"; for the dense gate,
    its most probable expert), or all k choices ("all", "all/k"). Returns (T,) or (T,k) int."""
    if cfg.switch_fraction != "first":
        return routing.idx
    return routing.probs.argmax(axis=1) if cfg.gate == "dense" else routing.idx[:, 0]


def _per_group(values, G):
    """``out[g, e] = Σ_{t in g} values[t, e]``: (T,E) -> (G,E), the groups being consecutive rows."""
    return values.reshape(G, -1, values.shape[1]).sum(axis=1)


def _count(experts, group, G, E, weights=None):
    """``out[g, e]``: how many entries (or how much weight) of row group g name expert e."""
    flat = (group[:, None] * E + experts.reshape(len(group), -1)).reshape(-1)
    w = None if weights is None else weights.reshape(-1)
    return np.bincount(flat, weights=w, minlength=G * E).reshape(G, E)


def balance_sums_forward(routing, logits_cache, H, cfg, n_groups=1):
    """The per-expert sums the configured losses need, per group of consecutive tokens.

    Args:
        routing: the gate's :class:`~minimoe.core.router.Routing` (idx, gates (T,k), probs (T,E)).
        logits_cache: ``router_logits_forward``'s cache (clean logits L and σ).
        H: (T, E) the scores the gate used (noisy in training).
        cfg: the layer's :class:`~minimoe.core.config.MoEConfig`.
        n_groups: G ≥ 1, dividing T (one group per sequence, or 1 for the whole batch).

    Returns:
        :class:`BalanceSums` and the cache.
    """
    idx, gates, probs = routing
    T, E, G = H.shape[0], cfg.n_experts, n_groups
    if T % G:
        raise ValueError(f"n_groups={G} must divide the number of tokens T={T} (groups of equal size)")
    group = np.repeat(np.arange(G), T // G)
    dtype = probs.dtype
    gate_mass = _count(idx, group, G, E, gates).astype(dtype)               # m_ge = Σ_t G_te
    load = chosen = prob_mass = lse_sq = pcache = lse = p_clean = None
    if cfg.balance in ("load", "importance+load"):
        P, pcache = load_probs_forward(logits_cache.clean, H, logits_cache.sigma, cfg.k)
        load = _per_group(P, G)                                  # l_ge = Σ_t P(t,e)
    if cfg.balance == "switch":
        chosen = _count(switch_choices(routing, cfg), group, G, E).astype(dtype)   # c_ge
        prob_mass = _per_group(probs, G)                         # s_ge = Σ_t p_te
    if cfg.z_loss_coef > 0:
        L = logits_cache.clean
        mx = L.max(axis=1)
        e = np.exp(L - mx[:, None])
        lse = mx + np.log(e.sum(axis=1))                                   # logsumexp, stable at ±1e4
        p_clean = e / e.sum(axis=1, keepdims=True)
        with np.errstate(over="ignore"):
            lse_sq = (lse**2).reshape(G, -1).sum(axis=1)                   # z_g = Σ_t lse_t²
        if not np.all(np.isfinite(lse_sq)):
            raise FloatingPointError(f"the z-loss overflowed: logits up to {np.max(np.abs(L)):.3g} give "
                                     f"logsumexp² beyond {np.finfo(dtype).max:.3g} ({np.dtype(dtype).name}); the "
                                     "router's logits are too large (lower the learning rate, or scale x or W_gate down)")
    tokens = np.full(G, T // G, dtype=np.int64)
    return (BalanceSums(tokens, gate_mass, load, chosen, prob_mass, lse_sq),
            SumsCache(group, idx, pcache, lse, p_clean, T, E))


def balance_sums_backward(dsums, cache):
    """Each sum hands its gradient to every token it added up.

    Returns ``(dgates (T,k), dprobs (T,E), d_clean, d_noisy, d_sigma)`` (each (T,E)), where a
    gradient no loss produced is None:

        dG_tj  = dm[g(t), idx_tj]                 dp_te  = ds[g(t), e]
        d(L,H,σ) from dP_te = dl[g(t), e]          (load_probs_backward)
        dL_te += dz[g(t)] · 2 lse_t · softmax(L_t)_e
    """
    g, idx = cache.group, cache.idx
    dgates = None if dsums.gate_mass is None else dsums.gate_mass[g[:, None], idx]
    dprobs = None if dsums.prob_mass is None else dsums.prob_mass[g]
    d_clean = d_noisy = d_sigma = None
    if dsums.load is not None:
        d_clean, d_noisy, d_sigma, _ = load_probs_backward(dsums.load[g], cache.load)
    if dsums.lse_sq is not None:
        dz = (dsums.lse_sq[g] * 2.0 * cache.lse)[:, None] * cache.softmax_clean
        d_clean = dz if d_clean is None else d_clean + dz
    return dgates, dprobs, d_clean, d_noisy, d_sigma


class LossCache(NamedTuple):
    sums: BalanceSums
    cv_importance: tuple | None     # one CVCache per group
    cv_load: tuple | None
    cfg: object


def balance_loss_forward(sums, cfg):
    """The weighted auxiliary loss from the sums: the mean over groups of each balancing loss.

    Returns:
        ``(aux_loss, terms, cache)``: aux_loss (float) = balance_coef · (the balancing terms)
        + z_loss_coef · z; terms, each unweighted loss by name ("importance", "load",
        "switch", "z"), for ``stats["losses"]``.
    """
    terms, cv_imp, cv_load = {}, None, None
    G, E = sums.gate_mass.shape
    if cfg.balance in ("importance", "importance+load"):
        values, cv_imp = zip(*map(cv_squared_forward, sums.gate_mass))    # a loop over groups
        terms["importance"] = float(np.mean(values))
    if cfg.balance in ("load", "importance+load"):
        values, cv_load = zip(*map(cv_squared_forward, sums.load))
        terms["load"] = float(np.mean(values))
    if cfg.balance == "switch":
        T = sums.tokens[:, None].astype(np.float64)
        q = cfg.k if cfg.switch_fraction == "all/k" else 1
        f, P = sums.chosen / (T * q), sums.prob_mass / T                   # f_ge, P_ge
        terms["switch"] = float(np.mean(E * np.sum(f * P, axis=1)))       # mean_g E · Σ_e f P
    if cfg.z_loss_coef > 0:
        terms["z"] = float(np.sum(sums.lse_sq) / np.sum(sums.tokens))     # mean_t lse_t²
    aux = sum(cfg.z_loss_coef * v if name == "z" else cfg.balance_coef * v for name, v in terms.items())
    if not np.isfinite(aux):
        raise FloatingPointError(f"the auxiliary loss overflowed ({', '.join(terms)}): the router's "
                                 "logits are too large (lower the learning rate, or scale x or W_gate down)")
    return float(aux), terms, LossCache(sums, cv_imp, cv_load, cfg)


def balance_loss_backward(cache):
    """∂aux_loss/∂sums, as a :class:`BalanceSums` of gradients (``tokens`` is a count: None)."""
    sums, cv_imp, cv_load, cfg = cache
    G, E = sums.gate_mass.shape
    w = cfg.balance_coef / G                                 # each group's loss counts 1/G
    d_mass = d_load = d_prob = d_z = None
    if cv_imp is not None:
        d_mass = np.stack([cv_squared_backward(w, c)[0] for c in cv_imp]).astype(sums.gate_mass.dtype)
    if cv_load is not None:
        d_load = np.stack([cv_squared_backward(w, c)[0] for c in cv_load]).astype(sums.load.dtype)
    if sums.prob_mass is not None:
        T = sums.tokens[:, None].astype(np.float64)
        q = cfg.k if cfg.switch_fraction == "all/k" else 1
        d_prob = (w * E * sums.chosen / (T * q) / T).astype(sums.prob_mass.dtype)   # ∂/∂s_ge = w E f_ge / T_g
    if sums.lse_sq is not None:
        d_z = np.full(G, cfg.z_loss_coef / np.sum(sums.tokens), dtype=sums.lse_sq.dtype)
    return BalanceSums(None, d_mass, d_load, None, d_prob, d_z)
