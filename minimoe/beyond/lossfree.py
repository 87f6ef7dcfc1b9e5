"""Loss-free balancing: a bias that steers the referrals, not the advice (Wang et al. 2024,
"Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts", DeepSeek).

The balancing losses of losses.py keep the GP fair by adding a term to the
objective — and its gradient flows into the router *and mixes with the task
gradient*, so a strong balance term hurts the model (Wang et al. 2024). Loss-free
balancing leaves the objective alone. Each expert e gets a bias ``b_e`` that is
added to the router's logits (or scores, below) **for choosing the top k only**:

    L_t   = x_t W_gate,   s_t = softmax(L_t)  (or sigmoid, as in DeepSeek-V3)   (T,E)
    idx_t = TopK(L_t + b, k)               the bias decides *who* is chosen
    G_te  = s_te  for e in idx_t           but the gate is the unbiased score
    y_t   = Σ_{e in idx_t} G_te · FFN_e(x_t)

(the form for softmax scores; for sigmoid scores the default is DeepSeek-V3's,
``TopK(s_t + b, k)`` and normalised gates: see below).

and after every training step the bias is nudged against the load it caused
(Algorithm 1, with the update rate u = γ):

    b_e ← b_e + γ · sign( mean_load − load_e )       load_e = tokens that chose e this step

An overworked specialist's bias goes down, an idle one's goes up, until the GP's
referrals even out — the way a receptionist steers patients towards the doctor
with free slots without changing what any doctor tells them. The bias is not a
parameter: it has no gradient, the optimizer never sees it, and ``aux_loss`` is 0.

Where the bias goes (``bias_on``), and DeepSeek-V3's gate:

* ``score="sigmoid"`` follows **DeepSeek-V3** (DeepSeek-AI 2024, §2.1.2, eq. 12–16) by
  default: ``s = sigmoid(L)``; the bias is added to the *scores* for selection only,
  and the gates are the selected **unbiased** scores normalised to sum to 1,

      idx_t = TopK(s_t + b, k),     G_te = s_te / Σ_{j in idx_t} s_tj    (e in idx_t)

  (``bias_on="scores"``, ``normalize=True``). The older logit form (``bias_on="logits"``:
  choose by ``L + b``, gate by the raw ``s``, no normalisation) stays as an option.
* ``score="softmax"`` keeps the logit form as its default (``bias_on="logits"``: the
  bias multiplies each probability by e^b). Measured on a collapsed router (T=256, d=8,
  E=8, k=2; a constant feature with weight w towards expert 0, the other router weights
  N(0, 0.3²); fresh tokens every step, router frozen) at the paper's rate u = 1e-3: steps
  until the load's CV (std/mean of tokens per expert) is below 0.25 (None: not in 8,000)

      rule                                      w = 6     w = 10
      sigmoid, bias on scores (DeepSeek-V3)      215       215
      sigmoid, bias on logits                  2,901     4,906
      softmax, bias on scores (the paper's)      513      never
      softmax, bias on logits                  2,901     4,906

  The paper's rule on softmax scores cannot steer a strongly collapsed softmax router: its
  unchosen experts all have s ≈ 0 (e^−10 apart at w = 10), so once the bias has climbed
  past the collapsed expert, the bias alone decides and every token picks the same
  experts — the load swings from one expert to the next and never evens out — while the
  logits still differ by O(1) per token. The logit form balances at any collapse, in
  steps proportional to w/u. (On sigmoid scores the scores rule wins: s is bounded by 1,
  so the bias needs at most about 1/u steps whatever the collapse.) Re-measure with
  tests/beyond/test_lossfree.py's shortened version, or the loop it describes.

Shapes: T tokens, d width, h expert hidden width, E experts, k experts per token.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..core.dispatch import dispatch_combine_backward, dispatch_combine_forward, expert_capacity
from ..core.layers import SoftmaxCache, softmax, softmax_backward
from ..core.router import router_logits_backward, router_logits_forward, sigmoid, topk_indices
from ..core.moe import MoEBase, MoEConfig, check_bool
from ..validate import check_choice, check_positive_float, check_shapes

__all__ = ["SCORES", "BIAS_ON", "scores_forward", "scores_backward", "biased_topk_forward",
           "biased_topk_backward", "normalize_gates_forward", "normalize_gates_backward", "bias_update",
           "LossFreeMoELayer"]

SCORES = ("softmax", "sigmoid")
BIAS_ON = ("scores", "logits")


class ScoresCache(NamedTuple):
    kind: str          # "softmax" or "sigmoid"
    s: np.ndarray      # (T,E) the scores


def scores_forward(L, kind="softmax"):
    """Router scores from logits L (T,E): ``softmax(L)`` per row, or ``sigmoid(L)`` per entry."""
    check_choice("score", kind, SCORES)
    s = softmax(L) if kind == "softmax" else sigmoid(L)
    return s, ScoresCache(kind, s)


def scores_backward(ds, cache):
    """dL from ds: softmax backward ``s ⊙ (ds − ⟨ds, s⟩)``, or sigmoid's ``ds ⊙ s(1 − s)``.
    Returns (dL (T,E), {})."""
    kind, s = cache
    if kind == "softmax":
        return softmax_backward(ds, SoftmaxCache(s, -1))
    return ds * s * (1.0 - s), {}


class BiasedTopKCache(NamedTuple):
    idx: np.ndarray     # (T,k) chosen experts
    shape: tuple        # (T,E)


def biased_topk_forward(logits, scores, bias, k):
    """Choose by ``logits + bias``, weigh by ``scores`` (Wang et al. 2024).

    Args:
        logits: (T, E) router logits L.
        scores: (T, E) router scores s = softmax(L) or sigmoid(L) (any increasing function of L).
        bias: (E,) selection bias b.
        k: experts per token.

    Returns:
        idx (T, k) int (largest ``L + b`` first), gates (T, k) = ``s[t, idx_t]``, and the cache.
        The gates never contain b: the bias changes *which* experts are chosen, never *how much*.
    """
    check_shapes(logits=(logits, ("T", "E")), scores=(scores, ("T", "E")), bias=(bias, ("E",)))
    idx = topk_indices(logits + bias, k)
    gates = np.take_along_axis(scores, idx, axis=1)
    return idx, gates, BiasedTopKCache(idx, scores.shape)


def biased_topk_backward(dgates, cache):
    """The gate *is* the score at the chosen experts: scatter dgates (T,k) into ds (T,E), 0 elsewhere.

    Nothing reaches the logits through the selection (it is piecewise constant) or the bias.
    """
    ds = np.zeros(cache.shape, dtype=dgates.dtype)
    np.put_along_axis(ds, cache.idx, dgates, axis=1)             # no repeats within a row
    return ds, {}


class NormalizeCache(NamedTuple):
    gates: np.ndarray   # (T,k) normalised gates g = s / Σ s
    total: np.ndarray   # (T,1) Σ_j s_tj over the chosen experts


def normalize_gates_forward(s_sel):
    """DeepSeek-V3's gate normalisation (eq. 13): ``g_tj = s_tj / Σ_i s_ti`` over the k chosen.

    Args:
        s_sel: (T, k) the chosen experts' unbiased scores, > 0 (sigmoid scores are).

    Returns:
        g (T, k), each row summing to 1, and the cache.
    """
    total = s_sel.sum(axis=1, keepdims=True)
    if not np.all(total > 0):
        t = int(np.argmin(total[:, 0]))
        raise FloatingPointError(f"the chosen experts' scores of token {t} sum to {total[t, 0]:g}, so they cannot "
                                 "be normalised: sigmoid scores underflow to 0 for logits below about "
                                 f"{np.log(np.finfo(s_sel.dtype).tiny):.0f} ({s_sel.dtype}); scale x or W_gate down")
    g = s_sel / total
    return g, NormalizeCache(g, total)


def normalize_gates_backward(dg, cache):
    """Quotient rule: ``∂g_j/∂s_i = (δ_ij − g_j) / S`` with ``S = Σ_i s_i``, so

        ds_i = (dg_i − Σ_j dg_j g_j) / S

    Returns (ds_sel (T,k), {})."""
    g, total = cache
    return (dg - np.sum(dg * g, axis=1, keepdims=True)) / total, {}


def bias_update(bias, load, rate):
    """One loss-free step: ``b ← b + rate · sign(mean(load) − load)`` (Wang et al. 2024, Alg. 1).

    Args:
        bias: (E,) current bias.  load: (E,) tokens that chose each expert.  rate: γ ≥ 0.

    Returns:
        the new (E,) bias (a new array). An expert exactly at the mean is left alone.
    """
    load = np.asarray(load)
    if load.shape != bias.shape or not (np.issubdtype(load.dtype, np.integer) or np.issubdtype(load.dtype, np.floating)):
        raise ValueError(f"load must have shape {bias.shape} (one count per expert, a number), "
                         f"got {load.dtype} {load.shape}")
    if not np.all(np.isfinite(load)) or np.any(load < 0):
        raise ValueError(f"load must hold finite counts >= 0 (tokens per expert), got {load.tolist()}")
    load = load.astype(np.float64)
    return bias + rate * np.sign(load.mean() - load).astype(bias.dtype)


class LossFreeCache(NamedTuple):
    shape: tuple          # x's shape
    train: bool           # a training forward (its load is what update_bias balances)
    logits: tuple         # router_logits_forward's cache
    scores: ScoresCache
    topk: BiasedTopKCache
    normalize: NormalizeCache | None   # None: the gates are the raw scores
    dispatch: tuple       # dispatch_combine_forward's cache


class LossFreeMoELayer(MoEBase):
    """Top-k MoE balanced by a selection-only bias instead of an auxiliary loss (Wang et al. 2024).

    Same surface as :class:`~minimoe.core.moe.MoELayer`, plus ``bias`` and :meth:`update_bias`.

    Example::

        layer = LossFreeMoELayer(d_model=16, d_hidden=64, n_experts=8, k=2, rng=np.random.default_rng(0))
        y = layer.forward(x)              # choose by L + b, gate by s = softmax(L)
        dx = layer.backward(dy)           # gradient of the task only: aux_loss is 0
        optimizer.step()
        layer.update_bias()               # b += γ·sign(mean load − load), from this step's routing

    Args:
        d_model: d.  d_hidden: h.  n_experts: E.  k: experts per token, 1 ≤ k ≤ E.
        bias_update_rate: γ ≥ 0, the size of each nudge (the paper's u = 0.001 suits
            thousands of steps; a short run wants ~0.01).
        score: "softmax" (the gates of one token sum to at most 1) or "sigmoid" (DeepSeek-V3's
            affinities).
        bias_on: where the selection bias is added: "scores" (``TopK(s + b)``, Wang et al. and
            DeepSeek-V3) or "logits" (``TopK(L + b)``). None: "scores" for sigmoid, "logits"
            for softmax (the measured reason is in the module docstring: the scores rule never
            balances a collapsed softmax router).
        normalize: divide the chosen unbiased scores by their sum (DeepSeek-V3 eq. 13). None:
            True for sigmoid with bias_on="scores" (DeepSeek-V3's gate), False otherwise (the
            gates are the raw scores, as before).
        capacity_factor: C = ceil(capacity_factor·T·k/E) per expert, None for no dropping.
        auto_update: if True, :meth:`backward` ends by calling :meth:`update_bias` — for
            training loops that know nothing about the bias (e.g. ``minimoe.clinic.train.train`` with a
            ``models.Clinic``). Keep it False for gradient checks.
        activation, dtype, rng: as in MoELayer.

    Attributes:
        params / grads: ``W_gate (d,E)``, ``W1 (E,d,h)``, ``b1 (E,h)``, ``W2 (E,h,d)``, ``b2 (E,d)``.
        bias: (E,) the selection bias (not a parameter; starts at 0).
        aux_loss: always 0.0.
        stats: as MoELayer — "load" (after capacity), "requested" (tokens that chose each expert,
            what the bias update reads), "importance", "dropped", "topk_idx", "topk_gates", "kept",
            "probs" (T,E) the unbiased scores, "bias" (E,) used, "capacity", "losses" {}.
        pending_load: (E,) "requested" of the last training forward, until :meth:`update_bias`
            uses it (None otherwise).
    """

    repr_fields = MoEBase.repr_fields[:4] + ("bias_update_rate", "score", "bias_on", "capacity_factor")
    router_keys = ("W_gate",)

    def __init__(self, d_model, d_hidden, n_experts, k=2, bias_update_rate=1e-3, score="softmax",
                 capacity_factor=None, auto_update=False, activation="relu", dtype=np.float64, rng=None,
                 bias_on=None, normalize=None):
        self.bias_update_rate = check_positive_float("bias_update_rate", bias_update_rate, allow_zero=True)
        self.score = check_choice("score", score, SCORES)
        if bias_on is None:
            bias_on = "scores" if score == "sigmoid" else "logits"
        self.bias_on = check_choice("bias_on", bias_on, BIAS_ON)
        if normalize is None:
            normalize = score == "sigmoid" and bias_on == "scores"
        self.normalize = check_bool("normalize", normalize)
        self.auto_update = check_bool("auto_update", auto_update)
        self._setup(MoEConfig(d_model, d_hidden, n_experts, k, noisy=False, capacity_factor=capacity_factor,
                              activation=activation, dtype=dtype), rng, router=("W_gate",))   # W_gate as MoELayer's
        self.bias = np.zeros(self.n_experts, dtype=self.dtype)
        self.pending_load = None       # "requested" of the last training forward, not yet used

    def forward(self, x, train=True, noise=None):
        """Route by ``L + bias``, gate by ``s``, run the experts.

        Args:
            x: (T, d) or (B, S, d) tokens.
            train: only a training forward's load is used by :meth:`update_bias`.
            noise: must be None (this router has no noise; the bias does the exploring).

        Returns:
            y with x's shape; sets ``stats``.
        """
        if noise is not None:
            raise ValueError("noise must be None: the loss-free router has no noise term")
        x2, shape = self._start_forward(x, train)
        T, E, k, p = x2.shape[0], self.n_experts, self.k, self.params
        L, lcache = router_logits_forward(x2, p["W_gate"])
        s, scache = scores_forward(L, self.score)
        # biased_topk_forward chooses by its first argument + bias, and gates by s
        idx, gates, tcache = biased_topk_forward(s if self.bias_on == "scores" else L, s, self.bias, k)
        ncache = None
        if self.normalize:                  # DeepSeek-V3 eq. 13: the chosen scores sum to 1
            gates, ncache = normalize_gates_forward(gates)
        C = expert_capacity(T, E, k, self.capacity_factor)
        y, dcache = dispatch_combine_forward(x2, idx, gates, p["W1"], p["b1"], p["W2"], p["b2"], **self._glu_params(),
                                             capacity=C, activation=self.activation)
        stats = self._routing_stats(idx, gates, dcache.plan, s, bias=self.bias.copy())
        # eval forwards leave a pending training load alone
        pending = {"pending_load": stats["requested"]} if train else {}
        self._finish_forward(LossFreeCache(shape, train, lcache, scache, tcache, ncache, dcache), stats, **pending)
        return y.reshape(shape)

    def backward(self, dy):
        """Gradient of ⟨dy, y⟩ (there is no auxiliary loss): dx, and fills ``grads``.

        dgates from the combine → ds at the chosen experts → dL (softmax or sigmoid
        backward) → dW_gate, dx. The bias is a constant here: it moved *which* entries
        of s are read, never their values.
        """
        c, dy2 = self._start_backward(dy)
        dx, dgates, grads = dispatch_combine_backward(dy2, c.dispatch)
        if c.normalize is not None:
            dgates, _ = normalize_gates_backward(dgates, c.normalize)
        ds, _ = biased_topk_backward(dgates, c.topk)
        dL, _ = scores_backward(ds, c.scores)
        dx_router, rgrads = router_logits_backward(dL, c.logits)
        dx += dx_router
        grads.update(rgrads)
        # An eval forward has no load to balance, and a batch's load is used once: a second
        # backward of the same forward (a gradient check, say) leaves the bias alone.
        step = {}
        if self.auto_update and c.train and self.pending_load is not None:
            step = dict(bias=bias_update(self.bias, self.pending_load, self.bias_update_rate), pending_load=None)
        self._store_grads(grads, **step)            # grads and bias change together, or neither
        return dx.reshape(c.shape)

    def update_bias(self, load=None):
        """Nudge the bias against the last training forward's load (call once per step).

        Args:
            load: (E,) tokens per expert to balance; default: ``stats["requested"]`` of the
                last training forward (each load is used at most once).

        Returns:
            the new bias (also stored in ``self.bias``).
        """
        if load is None:
            if self.pending_load is None:
                raise RuntimeError("update_bias needs a training forward first (forward(x, train=True)), "
                                   "or an explicit load")
            load = self.pending_load
        bias = bias_update(self.bias, load, self.bias_update_rate)         # raises before any change
        vars(self).update(bias=bias, **({"pending_load": None} if load is self.pending_load else {}))
        return self.bias
