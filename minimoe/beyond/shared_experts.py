"""Shared and fine-grained experts: a GP on duty for everyone, plus many narrow
specialists (Dai et al. 2024, "DeepSeekMoE: Towards Ultimate Expert Specialization").

DeepSeekMoE changes *which* experts there are, not how they are routed. Two ideas:

1. **Fine-grained segmentation** (§3.1). Split each of the E experts (hidden width
   h) into m narrower ones (width h/m) and route each token to m·k of the m·E —
   the same parameters and the same expert FLOPs, but far more ways to combine
   specialists (C(m·E, m·k) instead of C(E, k)), so each can specialise more finely.
2. **Shared-expert isolation** (§3.2). A few experts see *every* token, with no
   router at all. They learn the common knowledge (grammar, frequent words) that
   every routed expert would otherwise have to duplicate, leaving the routed ones
   free to specialise. To keep the compute fixed, the routed experts per token
   drop by the number of shared ones.

    y_t = Σ_{s=1..K_s} FFN_s(x_t)  +  Σ_{e in TopK(t)} G_te · FFN_e(x_t)
          shared: always on, gate 1    routed: an ordinary MoELayer

The routing is DeepSeekMoE's (Dai et al. 2024, §3.2, eq. 9–11), by default: with u_t the
token, e_i the router's column of expert i, m·N experts of which K_s are shared and
m·K − K_s are routed per token,

    h_t  = Σ_{i=1}^{K_s} FFN_i(u_t) + Σ_{i=K_s+1}^{mN} g_{i,t} FFN_i(u_t) + u_t     (9)
    g_{i,t} = s_{i,t} if s_{i,t} ∈ TopK({s_{j,t} | K_s+1 ≤ j ≤ mN}, mK − K_s), else 0   (10)
    s_{i,t} = Softmax_i(u_tᵀ e_i)                                                   (11)

— a softmax over the routed experts read at the chosen ones, **not renormalised** (the
gates of a token sum to less than 1) and with **no noise**: MoELayer's ``gate="switch",
noisy=False``. (The residual ``+ u_t`` of eq. 9 is the caller's, as for every layer here.)

In the clinic: every patient sees the duty nurse (shared), and the GP refers them
on to a few of many narrow specialists (routed). A sum of always-on FFNs is just
one wider FFN (its hidden units concatenated); they are kept as separate experts
so the books — parameters, active parameters, FLOPs — read like the paper's.

:meth:`SharedExpertMoELayer.fine_grained` converts a coarse design (E experts of
width h, k per token) into the DeepSeekMoE one at the same expert compute:
``m·E − K_s`` routed experts and ``K_s`` shared ones, all of width ``h/m``, with
``m·k − K_s`` routed per token.

Shapes: T tokens, d width, h expert hidden width, E experts, k routed per token,
K_s shared experts.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..core.experts import experts_backward, experts_forward, init_expert_params
from ..core.moe import MoEBase, MoEConfig, moe_backward, moe_forward, routing_signature, routing_stats
from ..validate import check_array, check_int, check_shapes

__all__ = ["shared_experts_forward", "shared_experts_backward", "SharedExpertMoELayer"]


class SharedCache(NamedTuple):
    experts: tuple    # experts_forward cache on the tiled input
    T: int            # tokens
    S: int            # shared experts K_s
    d: int            # width


def shared_experts_forward(x, W1, b1, W2, b2, activation="relu", *, W3=None, b3=None):
    """Every token through every shared expert, summed: ``y = Σ_s FFN_s(x)``.

    The bank of experts.py expects tokens grouped by expert; for shared experts
    every group is the whole batch, so the input is tiled K_s times and the groups
    have equal size T: ``offsets = [0, T, 2T, ...]``.

    Args:
        x: (T, d) tokens.
        W1 (K_s,d,h), b1 (K_s,h), W2 (K_s,h,d), b2 (K_s,d): the shared experts.
        activation: "relu", "gelu" or "swiglu" (then W3 (K_s,d,h), b3 (K_s,h) too).

    Returns:
        y (T, d) and the cache.
    """
    check_shapes(x=(x, ("T", "d")), W1=(W1, ("S", "d", "h")))
    S, T = W1.shape[0], x.shape[0]
    yg, ecache = experts_forward(np.tile(x, (S, 1)), np.arange(S + 1) * T, W1, b1, W2, b2, activation,
                                 W3=W3, b3=b3)
    return yg.reshape(S, T, -1).sum(axis=0), SharedCache(ecache, T, S, x.shape[1])


def shared_experts_backward(dy, cache):
    """Each shared expert receives the whole ``dy`` (gate 1); the input's gradient is the
    sum of their input gradients. Returns dx (T, d) and ``{"W1", "b1", "W2", "b2"}``."""
    ecache, T, S, d = cache
    check_array("dy", dy, shape=(T, d), finite=False)
    dxg, grads = experts_backward(np.tile(dy, (S, 1)), ecache)
    return dxg.reshape(S, T, -1).sum(axis=0), grads


_SHARED_KEYS = {"W1": "W1_shared", "b1": "b1_shared", "W2": "W2_shared", "b2": "b2_shared",
                "W3": "W3_shared", "b3": "b3_shared"}       # W3, b3: SwiGLU experts only


class SharedLayerCache(NamedTuple):
    routed: tuple                 # moe_forward's cache (the routed experts; its shape is x's)
    shared: SharedCache | None    # shared_experts_forward's cache (None: no shared experts)


class SharedExpertMoELayer(MoEBase):
    """K_s shared experts (always on) plus routed ones, routed exactly as :class:`MoELayer` routes.

    Same surface as MoELayer, so models can take either. The routed half is the pair
    ``moe_forward``/``moe_backward`` of ``core/moe.py`` on this layer's own ``params``, so a
    weight replaced in ``layer.params`` is the one used (and checked, under its own name).

    Example::

        # DeepSeekMoE at the compute of a top-2-of-8 layer of width 64: granularity 4,
        # one shared expert -> 31 routed experts of width 16, 7 routed per token.
        layer = SharedExpertMoELayer.fine_grained(d_model=16, d_hidden=64, n_experts=8, k=2,
                                                  granularity=4, n_shared=1, rng=np.random.default_rng(0))
        y = layer.forward(x); dx = layer.backward(dy)

    Args:
        d_model: d.  d_hidden: h, the hidden width of every expert (shared and routed).
        n_experts: routed experts E.  k: routed experts per token.
        n_shared: K_s ≥ 0 shared experts (0: fine-grained routing only).
        rng: numpy.random.Generator for the weights and the routed experts' noise.
        dtype, activation: as in MoELayer.
        gate: the routed experts' gate; default "switch", DeepSeekMoE's eq. 10–11 (softmax
            affinity over the routed experts, not renormalised). "topk" renormalises.
        noisy: router noise; default None = no noise (DeepSeekMoE), except when ``balance``
            is "load" or "importance+load": the smooth load estimator is built from the
            noise (Shazeer et al. 2017), so asking for it turns the noise on.
        **routed_kwargs: MoELayer's other options for the routed experts (balance, balance_coef,
            z_loss_coef, capacity_factor, switch_fraction, balance_groups, fast).

    Attributes:
        cfg: the routed experts' options (a :class:`~minimoe.core.config.MoEConfig`).
        params / grads: MoELayer's keys (``W_gate``, ``W_noise`` if noisy, ``W1``, ``b1``,
            ``W2``, ``b2``) plus ``W1_shared (K_s,d,h)``, ``b1_shared``, ``W2_shared``, ``b2_shared``.
        aux_loss, stats: the routed experts' (the shared experts need no balancing).
    """

    repr_fields = MoEBase.repr_fields[:4] + ("n_shared", "gate", "noisy", "balance")

    def __init__(self, d_model, d_hidden, n_experts, k=2, n_shared=1, activation="relu",
                 dtype=np.float64, rng=None, gate="switch", noisy=None, **routed_kwargs):
        n_shared = check_int("n_shared", n_shared, low=0)
        if noisy is None:                 # DeepSeekMoE has no noise; the smooth load loss needs it
            noisy = routed_kwargs.get("balance") in ("load", "importance+load")
        cfg = MoEConfig(d_model, d_hidden, n_experts, k=k, gate=gate, noisy=noisy, activation=activation,
                        dtype=dtype, **routed_kwargs)
        self._setup(cfg, rng, router=("W_gate", "W_noise"))
        self.n_shared = n_shared
        if n_shared:
            shared = init_expert_params(n_shared, cfg.d_model, cfg.d_hidden, self.rng, cfg.dtype, cfg.activation)
            self.params.update({_SHARED_KEYS[name]: v for name, v in shared.items()})
            self.grads.update({_SHARED_KEYS[name]: np.zeros_like(v) for name, v in shared.items()})

    @classmethod
    def fine_grained(cls, d_model, d_hidden, n_experts, k=2, granularity=4, n_shared=1, **kwargs):
        """The DeepSeekMoE version of a coarse layer (E experts of width h, k per token).

        Each expert is cut into m = ``granularity`` experts of width h/m; ``n_shared`` of the
        m·E become shared, and each token is routed to m·k − n_shared of the rest. Expert
        parameters stay the same up to the extra biases, and the expert matmul FLOPs per token,
        (n_shared + m·k − n_shared) · 4·d·h/m = k·4·d·h, stay exactly the same.

        Raises:
            ValueError: if h is not divisible by m, or if the shared experts would use up all
                m·k expert slots of a token (nothing left to route).
        """
        h = check_int("d_hidden", d_hidden, low=1)
        E = check_int("n_experts", n_experts, low=1)
        k = check_int("k", k, low=1, high=E)
        m = check_int("granularity", granularity, low=1)
        s = check_int("n_shared", n_shared, low=0)
        if h % m:
            raise ValueError(f"d_hidden={h} must be divisible by granularity={m} (each expert is cut "
                             f"into {m} experts of width d_hidden/granularity)")
        if s >= m * k:
            raise ValueError(f"n_shared={s} must be smaller than granularity·k = {m * k}, the expert slots "
                             f"per token; otherwise no routed expert is left")
        return cls(d_model, h // m, m * E - s, k=m * k - s, n_shared=s, **kwargs)

    def forward(self, x, train=True, noise=None):
        """``y = Σ shared FFN_s(x) + routed MoE(x)``.

        Args:
            x: (T, d) or (B, S, d) tokens.
            train, noise: as MoELayer's (noise is (T, E) for the routed experts).

        Returns:
            y with x's shape. If either branch fails, the layer is left as it was.
        """
        y, aux_loss, rcache = moe_forward(x, self.params, self.cfg, train=train, noise=noise, rng=self.rng)
        scache = None
        if self.n_shared:
            ys, scache = self._shared_forward(x.reshape(-1, self.d_model).astype(self.dtype, copy=False))
            y = y + ys.reshape(y.shape)
        self._finish_forward(SharedLayerCache(rcache, scache), routing_stats(rcache), aux_loss)
        return y

    def _shared_forward(self, x2):
        """The shared branch, its weights checked under their own names (W1_shared, ...)."""
        p = self.params
        glu = {}
        if "W3_shared" in p:
            glu = {"W3_shared": (p["W3_shared"], ("S", "d", "h")), "b3_shared": (p["b3_shared"], ("S", "h"))}
        check_shapes(x=(x2, ("T", "d")), W1_shared=(p["W1_shared"], ("S", "d", "h")),
                     b1_shared=(p["b1_shared"], ("S", "h")), W2_shared=(p["W2_shared"], ("S", "h", "d")),
                     b2_shared=(p["b2_shared"], ("S", "d")), **glu)
        return shared_experts_forward(x2, p["W1_shared"], p["b1_shared"], p["W2_shared"], p["b2_shared"],
                                      self.activation, W3=p.get("W3_shared"), b3=p.get("b3_shared"))

    def routing_signature(self):
        """The routed experts' selection (as MoELayer's); the shared experts have none."""
        if self._cache is None:
            raise RuntimeError("call forward before routing_signature")
        return routing_signature(self._cache.routed)

    def backward(self, dy):
        """Gradient of ⟨dy, y⟩ + aux_loss: the two branches' input gradients add up.
        Both are computed before ``grads`` changes."""
        if self._cache is None:
            raise RuntimeError("call forward before backward")
        dx, grads = moe_backward(dy, self._cache.routed)
        if self.n_shared:
            dy2 = dy.reshape(-1, self.d_model).astype(self.dtype, copy=False)
            dxs, sgrads = shared_experts_backward(dy2, self._cache.shared)
            dx = dx + dxs.reshape(dx.shape)
            grads.update({_SHARED_KEYS[name]: g for name, g in sgrads.items()})
        self._store_grads(grads)
        return dx

    @property
    def n_active_params(self):
        """Parameters one token touches: the routed layer's active ones plus every shared expert."""
        shared = sum(self.params[n].size for n in _SHARED_KEYS.values() if n in self.params)
        return int(super().n_active_params + shared)

    def flops_per_token(self):
        """Routed layer's FLOPs (router, k experts, weighted combine) plus 4dh for each of the
        K_s shared experts (6dh for SwiGLU; their outputs are summed with gate 1: additions,
        not counted)."""
        return int(super().flops_per_token()
                   + self.n_shared * self._expert_matmuls() * 2 * self.d_model * self.d_hidden)

