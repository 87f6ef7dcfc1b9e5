"""Expert-choice routing: the specialists pick their patients (Zhou et al. 2022,
"Mixture-of-Experts with Expert Choice Routing").

Token-choice routing (router.py) lets every *patient* pick k specialists, so a
popular specialist is overbooked while another sits idle, and balancing needs an
auxiliary loss or dropped tokens. Expert choice turns the referral around: the GP
scores every (patient, specialist) pair, then **each specialist picks the C
patients it scores highest**. Every specialist is exactly full, by construction —
no balancing loss at all. The price: a patient may be picked by several
specialists, or by none (it then gets y = 0 and the residual connection carries
it on, like a dropped token).

The algorithm (Zhou et al. 2022), for tokens ``x (T,d)``:

    S = softmax(x W_gate)                  (T,E)  token-to-expert affinities, each row sums to 1
    I, G = TopK(Sᵀ, C)                     (E,C)  expert e picks the C tokens with the largest S[:, e]
                                                  G[e,c] = S[I[e,c], e] is the gate of that pick
    y_t = Σ_{(e,c): I[e,c] = t} G[e,c] · FFN_e(x_t)

with capacity ``C = ceil(capacity_factor · T · k / E)``: on average each token is
served by k·capacity_factor experts, the same compute as top-k token choice
(the paper's "EC-CF2" is k = 2, capacity_factor = 1 here).

Gradients: the selection I is piecewise constant, so W_gate learns only through
the gate values G (and a column's top-C set has kinks where the C-th and (C+1)-th
affinities tie; :meth:`ExpertChoiceMoELayer.routing_signature` lets the gradient
checker detect them). Note the caveat the paper states itself: which tokens an
expert picks depends on *all* T tokens of the batch, including later tokens of
the same sequence — so expert choice is not causal, and a language model trained
with it peeks at the future through the routing (tests/lm/test_transformer.py shows it).

Shapes: T tokens, d width, h expert hidden width, E experts, C tokens per expert.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..core.dispatch import expert_capacity
from ..core.experts import experts_backward, experts_forward
from ..core.layers import SoftmaxCache, softmax, softmax_backward
from ..core.router import router_logits_backward, router_logits_forward
from ..core.moe import MoEBase, MoEConfig
from ..validate import check_array, check_int

__all__ = ["expert_choice_capacity", "expert_choice_forward", "expert_choice_backward",
           "ExpertChoiceMoELayer"]


def expert_choice_capacity(n_tokens, n_experts, k=2, capacity_factor=1.0):
    """Tokens per expert, ``C = ceil(capacity_factor · T · k / E)``, at most T.

    (An expert cannot pick the same token twice, so C is capped at T.)
    """
    if capacity_factor is None:
        raise ValueError("capacity_factor must be a number for expert choice: the capacity C *is* "
                         "the routing decision (each expert picks exactly C tokens)")
    return min(expert_capacity(n_tokens, n_experts, k, capacity_factor), int(n_tokens))


class ExpertChoiceCache(NamedTuple):
    logits: tuple          # router_logits cache (x, W_gate, ...)
    probs: np.ndarray      # (T,E) S = softmax(x W_gate)
    idx: np.ndarray        # (E,C) the tokens each expert picked, best first
    gates: np.ndarray      # (E,C) S[idx[e,c], e]
    experts: tuple         # experts_forward cache
    yg: np.ndarray         # (E·C,d) expert outputs, grouped by expert


def expert_choice_forward(x, W_gate, W1, b1, W2, b2, *, capacity, activation="relu", W3=None, b3=None):
    """Expert-choice MoE: each expert picks its top-C tokens by affinity (Zhou et al. 2022).

    Args:
        x: (T, d) tokens.
        W_gate: (d, E) router weights.
        W1 (E,d,h), b1 (E,h), W2 (E,h,d), b2 (E,d): the expert bank.
        capacity: C, tokens per expert, 1 ≤ C ≤ T.
        activation: "relu" or "gelu".

    Returns:
        y (T, d) and the cache (``cache.idx`` (E,C) and ``cache.gates`` (E,C) are the picks).
    """
    check_array("x", x, ndim=2)
    T = x.shape[0]
    C = check_int("capacity", capacity, low=1, high=T)
    L, lcache = router_logits_forward(x, W_gate)                # clean scores: no noise in EC
    S = softmax(L)                                              # (T,E), rows sum to 1
    E = S.shape[1]
    # Each column is one expert's view of all tokens; keep its C best (stable: ties go
    # to the earlier token). argsort on -Sᵀ sorts all T per expert: O(E·T log T), fine here.
    idx = np.argsort(-S.T, axis=1, kind="stable")[:, :C]        # (E,C)
    gates = np.take_along_axis(S.T, idx, axis=1)                # (E,C) = S[idx[e,c], e]
    xg = np.take(x, idx.reshape(-1), axis=0)                    # (E·C,d): expert e owns rows e·C:(e+1)·C
    offsets = np.arange(E + 1) * C
    yg, ecache = experts_forward(xg, offsets, W1, b1, W2, b2, activation, W3=W3, b3=b3)
    weighted = yg * gates.reshape(-1, 1)
    y = np.zeros((T, x.shape[1]), dtype=yg.dtype)
    for e in range(E):                      # within one expert the picked tokens are distinct,
        y[idx[e]] += weighted[e * C:(e + 1) * C]   # so a fancy-index += adds each exactly once
    return y, ExpertChoiceCache(lcache, S, idx, gates, ecache, yg)


def expert_choice_backward(dy, cache):
    """Backward of :func:`expert_choice_forward`, the forward read bottom-up.

        dyg[e,c] = G[e,c] · dy[I[e,c]]              each pick gets its token's gradient, gated
        dG[e,c]  = ⟨dy[I[e,c]], FFN_e(x_{I[e,c]})⟩  how much the gate value mattered
        experts backward                             dxg, dW1, db1, dW2, db2
        dx[t]   += Σ over the picks of t of dxg      scatter back, one expert at a time
        dS[I[e,c], e] = dG[e,c]   (0 where not picked: the selection has no gradient)
        dL = softmax backward of dS;  dW_gate = xᵀ dL;  dx += dL W_gateᵀ

    Returns:
        dx (T, d) and ``{"W_gate": (d,E), "W1", "b1", "W2", "b2"}``.
    """
    lcache, S, idx, gates, ecache, yg = cache
    T, E = S.shape
    C = idx.shape[1]
    check_array("dy", dy, shape=(T, yg.shape[1]), finite=False)
    flat = idx.reshape(-1)
    dy_rows = np.take(dy, flat, axis=0)                          # (E·C,d)
    dgates = np.einsum("nd,nd->n", dy_rows, yg).reshape(E, C)
    dxg, grads = experts_backward(dy_rows * gates.reshape(-1, 1), ecache)
    dx = np.zeros((T, dy.shape[1]), dtype=dxg.dtype)
    for e in range(E):
        dx[idx[e]] += dxg[e * C:(e + 1) * C]
    dS = np.zeros_like(S)
    dS[idx, np.arange(E)[:, None]] = dgates                     # (token, expert) pairs are unique
    dL, _ = softmax_backward(dS, SoftmaxCache(S, -1))
    dx_router, rgrads = router_logits_backward(dL, lcache)
    dx += dx_router
    return dx, {**rgrads, **grads}


class LayerCache(NamedTuple):
    shape: tuple                  # x's shape
    choice: ExpertChoiceCache     # expert_choice_forward's cache


class ExpertChoiceMoELayer(MoEBase):
    """Expert-choice MoE layer (Zhou et al. 2022): every expert takes exactly C tokens.

    Same surface as :class:`~minimoe.core.moe.MoELayer`, so models can take either.

    Example::

        layer = ExpertChoiceMoELayer(d_model=16, d_hidden=64, n_experts=8, k=2, rng=np.random.default_rng(0))
        y = layer.forward(x)             # x (T, d) or (B, S, d); all B·S tokens compete for the experts
        dx = layer.backward(dy)          # fills layer.grads

    Args:
        d_model: d.  d_hidden: h.  n_experts: E.
        k: average experts per token (1 ≤ k ≤ E); with capacity_factor, sets the capacity.
        capacity_factor: C = ceil(capacity_factor · T · k / E) tokens per expert (> 0).
        activation: "relu" or "gelu".  dtype: np.float64 or np.float32.
        rng: numpy.random.Generator for the initial weights (default ``default_rng(0)``).

    Attributes:
        params / grads: ``W_gate (d,E)``, ``W1 (E,d,h)``, ``b1 (E,h)``, ``W2 (E,h,d)``, ``b2 (E,d)``.
        aux_loss: always 0.0 — the experts are full by construction.
        stats: "load" (E,) = C for every expert; "importance" (E,) gate mass per expert;
            "dropped" = tokens no expert picked; "experts_per_token" (T,); "ec_idx" (E,C) and
            "ec_gates" (E,C) the picks; "probs" (T,E) S; "capacity" C; "losses" {}; and, for
            code written for token choice, "topk_idx" (T,E) = every expert for every token,
            with "kept" (T,E) True where that expert picked that token and "topk_gates" (T,E)
            the gate there (0 elsewhere) — so ``topk_idx[kept]`` lists the real assignments.
    """

    repr_fields = MoEBase.repr_fields[:4] + ("capacity_factor",)
    router_keys = ("W_gate",)

    def __init__(self, d_model, d_hidden, n_experts, k=2, capacity_factor=1.0, activation="relu",
                 dtype=np.float64, rng=None):
        if capacity_factor is None:
            expert_choice_capacity(1, 1, 1, None)                # raises the explanatory error
        self._setup(MoEConfig(d_model, d_hidden, n_experts, k, noisy=False, capacity_factor=capacity_factor,
                              activation=activation, dtype=dtype), rng, router=("W_gate",))   # W_gate as MoELayer's

    def forward(self, x, train=True, noise=None):
        """Let every expert pick its C tokens among all tokens of ``x`` and mix their answers.

        Args:
            x: (T, d) or (B, S, d) tokens (all B·S tokens compete).
            train: accepted for a uniform interface; expert choice is the same in both modes.
            noise: must be None (expert choice uses clean affinities).

        Returns:
            y with x's shape; sets ``stats``.
        """
        if noise is not None:
            raise ValueError("noise must be None: expert-choice routing uses clean affinities")
        x2, shape = self._start_forward(x, train)
        T, E = x2.shape[0], self.n_experts
        C = expert_choice_capacity(T, E, self.k, self.capacity_factor)
        p = self.params
        y, cache = expert_choice_forward(x2, p["W_gate"], p["W1"], p["b1"], p["W2"], p["b2"],
                                         capacity=C, activation=self.activation, **self._glu_params())
        kept = np.zeros((T, E), dtype=bool)
        kept[cache.idx, np.arange(E)[:, None]] = True
        per_token = kept.sum(axis=1)
        stats = {
            "load": np.full(E, C, dtype=np.int64),
            "importance": cache.gates.sum(axis=1),
            "dropped": int(np.sum(per_token == 0)),
            "experts_per_token": per_token,
            "ec_idx": cache.idx,
            "ec_gates": cache.gates,
            "probs": cache.probs,
            "capacity": C,
            "losses": {},
            "topk_idx": np.broadcast_to(np.arange(E), (T, E)),
            "topk_gates": np.where(kept, cache.probs, 0),
            "kept": kept,
        }
        self._finish_forward(LayerCache(shape, cache), stats)
        return y.reshape(shape)

    def routing_signature(self):
        """Which tokens each expert picked, as a set (sorted): a finite difference that changes
        a column's top-C set crosses a kink; a reordering inside the set does not."""
        if self._cache is None:
            raise RuntimeError("call forward before routing_signature")
        return np.sort(self._cache.choice.idx, axis=1)

    def backward(self, dy):
        """Gradient of ⟨dy, y⟩: returns dx (x's shape) and fills ``grads``."""
        c, dy2 = self._start_backward(dy)
        dx, grads = expert_choice_backward(dy2, c.choice)
        self._store_grads(grads)
        return dx.reshape(c.shape)

    @property
    def experts_per_token(self):
        """An *average* token is served by k·capacity_factor experts (the counting uses it)."""
        return self.k * self.capacity_factor
