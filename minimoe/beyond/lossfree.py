"""Loss-free balancing: a bias that steers the referrals, not the advice (Wang et al. 2024,
"Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts", DeepSeek).

The balancing losses of losses.py keep the GP fair by adding a term to the
objective — and its gradient flows into the router *and mixes with the task
gradient*, so a strong balance term hurts the model (Wang et al. 2024). Loss-free
balancing leaves the objective alone. Each expert e gets a bias ``b_e`` that is
added to the router's logits **for choosing the top k only**:

    L_t   = x_t W_gate,   s_t = softmax(L_t)  (or sigmoid, as in DeepSeek-V3)   (T,E)
    idx_t = TopK(L_t + b, k)               the bias decides *who* is chosen
    G_te  = s_te  for e in idx_t           but the gate is the unbiased score
    y_t   = Σ_{e in idx_t} G_te · FFN_e(x_t)

and after every training step the bias is nudged against the load it caused
(Algorithm 1, with the update rate u = γ):

    b_e ← b_e + γ · sign( mean_load − load_e )       load_e = tokens that chose e this step

An overworked specialist's bias goes down, an idle one's goes up, until the GP's
referrals even out — the way a receptionist steers patients towards the doctor
with free slots without changing what any doctor tells them. The bias is not a
parameter: it has no gradient, the optimizer never sees it, and ``aux_loss`` is 0.

One deliberate difference from the paper: Wang et al. add b to the scores s
themselves; we add it to the logits L (for softmax scores: to log s, i.e. the
bias multiplies each probability by e^b). Selection only needs an order, so the
idea is the same, but on the logit scale a *collapsed* softmax router can still
be steered: its unchosen experts all have s ≈ 0, and steps of γ on s could not
tell them apart, while their logits still differ by O(1) (tests/test_lossfree.py
shows a collapsed router balanced this way).

Shapes: T tokens, d width, h expert hidden width, E experts, k experts per token.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..core.dispatch import dispatch_combine_backward, dispatch_combine_forward, expert_capacity
from ..core.experts import init_expert_params
from ..core.layers import SoftmaxCache, softmax, softmax_backward
from ..core.router import init_gate_weights, router_logits_backward, router_logits_forward, topk_indices
from ..validate import (check_array, check_choice, check_dtype, check_int, check_positive_float,
                       check_rng, check_tokens)

__all__ = ["SCORES", "scores_forward", "scores_backward", "biased_topk_forward", "biased_topk_backward",
           "bias_update", "LossFreeMoELayer"]

SCORES = ("softmax", "sigmoid")


def scores_forward(L, kind="softmax"):
    """Router scores from logits L (T,E): ``softmax(L)`` per row, or ``sigmoid(L)`` per entry."""
    check_choice("score", kind, SCORES)
    if kind == "softmax":
        return softmax(L), (kind, None)
    s = np.exp(-np.logaddexp(0, -L))            # sigmoid, stable for any L
    return s, (kind, s)


def scores_backward(ds, cache, s):
    """dL from ds: softmax backward ``s ⊙ (ds − ⟨ds, s⟩)``, or sigmoid's ``ds ⊙ s(1 − s)``."""
    kind, _ = cache
    if kind == "softmax":
        return softmax_backward(ds, SoftmaxCache(s, -1))[0]
    return ds * s * (1.0 - s)


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
    check_array("logits", logits, ndim=2)
    check_array("scores", scores, shape=logits.shape)
    check_array("bias", bias, shape=(logits.shape[1],))
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


def bias_update(bias, load, rate):
    """One loss-free step: ``b ← b + rate · sign(mean(load) − load)`` (Wang et al. 2024, Alg. 1).

    Args:
        bias: (E,) current bias.  load: (E,) tokens that chose each expert.  rate: γ ≥ 0.

    Returns:
        the new (E,) bias (a new array). An expert exactly at the mean is left alone.
    """
    load = np.asarray(load, dtype=np.float64)
    return bias + rate * np.sign(load.mean() - load).astype(bias.dtype)


class LossFreeMoELayer:
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
            affinities; V3 also renormalises the chosen gates, which we do not).
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

    def __init__(self, d_model, d_hidden, n_experts, k=2, bias_update_rate=1e-3, score="softmax",
                 capacity_factor=None, auto_update=False, activation="relu", dtype=np.float64, rng=None):
        d = check_int("d_model", d_model, low=1)
        h = check_int("d_hidden", d_hidden, low=1)
        E = check_int("n_experts", n_experts, low=1)
        self.k = check_int("k", k, low=1, high=E)
        self.bias_update_rate = check_positive_float("bias_update_rate", bias_update_rate, allow_zero=True)
        self.score = check_choice("score", score, SCORES)
        if capacity_factor is not None:
            check_positive_float("capacity_factor", capacity_factor)
        check_choice("activation", activation, ("relu", "gelu"))
        self.dtype = check_dtype("dtype", dtype).type
        rng = np.random.default_rng(0) if rng is None else check_rng("rng", rng)
        self.d_model, self.d_hidden, self.n_experts = d, h, E
        self.capacity_factor, self.auto_update = capacity_factor, bool(auto_update)
        self.activation, self.rng = activation, rng
        self.params = {"W_gate": init_gate_weights(d, E, rng, self.dtype)}   # as MoELayer's
        self.params.update(init_expert_params(E, d, h, rng, self.dtype))
        self.grads = {name: np.zeros_like(p) for name, p in self.params.items()}
        self.bias = np.zeros(E, dtype=self.dtype)
        self.aux_loss, self.stats, self._cache = 0.0, {}, None
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
        x2, shape = check_tokens(x, self.d_model, self.dtype)   # (T, d); B·S tokens route together
        T, E, k, p = x2.shape[0], self.n_experts, self.k, self.params
        L, lcache = router_logits_forward(x2, p["W_gate"])
        s, scache = scores_forward(L, self.score)
        idx, gates, tcache = biased_topk_forward(L, s, self.bias, k)
        C = expert_capacity(T, E, k, self.capacity_factor)
        y, dcache = dispatch_combine_forward(x2, idx, gates, p["W1"], p["b1"], p["W2"], p["b2"],
                                             capacity=C, activation=self.activation)
        requested = np.bincount(idx.reshape(-1), minlength=E)
        if train:                       # eval forwards leave a pending training load alone
            self.pending_load = requested
        plan = dcache.plan
        self.stats = {
            "load": plan.load.copy(),
            "requested": requested,
            "importance": np.bincount(idx.reshape(-1), weights=gates.reshape(-1), minlength=E),
            "dropped": plan.dropped,
            "topk_idx": idx,
            "topk_gates": gates,
            "kept": plan.kept,
            "probs": s,
            "bias": self.bias.copy(),
            "capacity": C,
            "losses": {},
        }
        self._cache = (shape, lcache, s, scache, tcache, dcache)
        return y.reshape(shape)

    def routing_signature(self):
        """Chosen experts and kept mask of the last forward (kinks: ties in L + b)."""
        if self._cache is None:
            raise RuntimeError("call forward before routing_signature")
        return (self.stats["topk_idx"], self.stats["kept"])

    def backward(self, dy):
        """Gradient of ⟨dy, y⟩ (there is no auxiliary loss): dx, and fills ``grads``.

        dgates from the combine → ds at the chosen experts → dL (softmax or sigmoid
        backward) → dW_gate, dx. The bias is a constant here: it moved *which* entries
        of s are read, never their values.
        """
        if self._cache is None:
            raise RuntimeError("call forward before backward")
        shape, lcache, s, scache, tcache, dcache = self._cache
        check_array("dy", dy, shape=shape)
        dx, grads = dispatch_combine_backward(dy.reshape(-1, self.d_model).astype(self.dtype, copy=False),
                                              dcache)
        ds, _ = biased_topk_backward(grads.pop("gates"), tcache)
        dL = scores_backward(ds, scache, s)
        dx_router, rgrads = router_logits_backward(dL, lcache)
        dx += dx_router
        grads.update(rgrads)
        for name in self.params:
            self.grads[name] = grads[name]
        if self.auto_update:
            self.update_bias()
        return dx.reshape(shape)

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
            load, self.pending_load = self.pending_load, None
        load = np.asarray(load)
        if load.shape != (self.n_experts,):
            raise ValueError(f"load must have shape ({self.n_experts},) (one count per expert), got {load.shape}")
        self.bias = bias_update(self.bias, load, self.bias_update_rate)
        return self.bias

    @property
    def n_params(self):
        """Total number of parameters (the bias is state, not a parameter)."""
        return int(sum(p.size for p in self.params.values()))

    @property
    def n_active_params(self):
        """Parameters one token touches: the router plus k experts."""
        per_expert = sum(self.params[n][0].size for n in ("W1", "b1", "W2", "b2"))
        return int(self.params["W_gate"].size + self.k * per_expert)

    def flops_per_token(self):
        """As MoELayer: scores (2dE) + k experts (k·4dh) + combine (2kd); adding b is free."""
        d, h, E, k = self.d_model, self.d_hidden, self.n_experts, self.k
        return int(2 * d * E + k * 4 * d * h + 2 * k * d)

    def __repr__(self):
        return (f"LossFreeMoELayer(d_model={self.d_model}, d_hidden={self.d_hidden}, n_experts={self.n_experts}, "
                f"k={self.k}, bias_update_rate={self.bias_update_rate}, score={self.score!r}, "
                f"capacity_factor={self.capacity_factor}, dtype={np.dtype(self.dtype).name})")
