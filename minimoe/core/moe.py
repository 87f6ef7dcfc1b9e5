"""The whole clinic: router + dispatch + experts + balancing losses in one layer.

``MoELayer`` is a thin class around the functional pairs of ``router.py``,
``dispatch.py``, ``experts.py`` and ``losses.py``. Reading its ``forward`` and
``backward`` top to bottom is reading the whole MoE algorithm:

    forward:   scores H ─► gate (idx, G) ─► plan + dispatch ─► experts ─► combine ─► y
               and the auxiliary losses, from the same scores and gates
    backward:  the same steps in reverse; the losses add their gradients where
               their inputs were computed (gates, probs, clean logits, σ)

Shapes: T tokens (B·S for (B,S,d) input), d = d_model, h = d_hidden, E experts, k per token.
"""
from __future__ import annotations

import numpy as np

from . import losses as L
from .dispatch import dispatch_combine_backward, dispatch_combine_forward, expert_capacity
from .experts import init_expert_params
from .router import (GATES, gate_backward, gate_forward, init_gate_weights, router_logits_backward,
                     router_logits_forward)
from ..validate import check_array, check_choice, check_int, check_positive_float, check_rng, check_tokens

__all__ = ["MoELayer", "BALANCES", "USUAL_BALANCE_COEF"]

BALANCES = (None, "importance", "load", "importance+load", "switch")
# The coefficients the papers use (see losses.py): Shazeer et al. 2017 and Fedus et al. 2021.
USUAL_BALANCE_COEF = {"importance": 0.1, "load": 0.1, "importance+load": 0.1, "switch": 0.01}


class MoELayer:
    """A sparse Mixture-of-Experts layer: a GP (router) refers each token to k of E specialists.

    Each token (a patient) is scored by the router, sent to its k best-scoring experts
    (specialist FFNs), and gets back their answers mixed by the gate weights. Only k of
    the E experts run per token, so parameters grow with E while compute grows with k.
    Meant to sit inside a residual connection: ``x + layer.forward(x)``.

    Example (a training step on the mean of y², then a deterministic eval pass)::

        >>> import numpy as np
        >>> from minimoe import MoELayer
        >>> layer = MoELayer(d_model=16, d_hidden=64, n_experts=8, k=2, balance="switch",
        ...                  rng=np.random.default_rng(0))
        >>> x = np.random.default_rng(1).standard_normal((32, 16))   # 32 tokens, or (B, S, 16)
        >>> y = layer.forward(x)                 # train=True: noisy routing, sets aux_loss, stats
        >>> y.shape
        (32, 16)
        >>> loss = np.mean(y**2) + layer.aux_loss
        >>> dx = layer.backward(2 * y / y.size)  # dy = ∂task/∂y; the aux_loss part is added for you
        >>> for name in layer.params:            # layer.grads has the same keys as layer.params
        ...     layer.params[name] -= 0.1 * layer.grads[name]
        >>> int(layer.stats["load"].sum())       # 32 tokens x 2 specialists, none dropped
        64
        >>> y_eval = layer.forward(x, train=False)   # no noise: the same x always routes the same way

    Args:
        d_model: d, the token width.  d_hidden: h, each expert's hidden width.
        n_experts: E.  k: experts per token, 1 ≤ k ≤ E (ignored by the dense gate, which uses all E).
        gate: "topk" (softmax over the k kept scores; they sum to 1), "dense" (softmax
            over all E), or "switch" (full softmax read at the top k, not renormalized).
            Beware k=1 with "topk": every gate is 1 and the router gets no task gradient.
        noisy: add learned Gaussian noise ``ε ⊙ softplus(x W_noise)`` to the scores while
            training (Shazeer et al. 2017). Never in eval mode.
        balance: None, "importance", "load", "importance+load" or "switch" — the
            load-balancing loss(es) added to ``aux_loss`` ("load" needs noisy=True and a sparse gate).
        balance_coef: weight of each balancing loss; None means the papers' usual value
            (0.1 for importance/load, 0.01 for switch).
        z_loss_coef: weight of the router z-loss (ST-MoE uses 0.001); 0 turns it off.
        capacity_factor: each expert takes at most ``C = ceil(capacity_factor·T·k/E)``
            assignments; None means no dropping. When an expert is full, first choices are
            served before second choices, then earlier tokens before later ones; a dropped
            assignment contributes 0 to y (the residual connection carries the token on).
        activation: "relu" or "gelu".
        dtype: np.float64 (gradient checks) or np.float32 (speed); every array stays in it.
        rng: numpy.random.Generator for the initial weights and for the training noise
            (default ``np.random.default_rng(0)``).

    Attributes:
        params / grads: dicts with identical keys ``W_gate (d,E)``, ``W_noise (d,E)`` (if
            noisy), ``W1 (E,d,h)``, ``b1 (E,h)``, ``W2 (E,h,d)``, ``b2 (E,d)``.
        aux_loss: float, weighted sum of the balancing and z losses of the last forward.
        stats: dict from the last forward — "load" (E,) int assignments each expert processed,
            "requested" (E,) int the same before capacity, "importance" (E,) gate mass per expert (before capacity), "dropped" int,
            "topk_idx" (T,k), "topk_gates" (T,k), "kept" (T,k) bool, "probs" (T,E) softmax of
            the scores used, "capacity" (C or None), "losses" (each unweighted aux loss).
    """

    def __init__(self, d_model, d_hidden, n_experts, k=2, gate="topk", noisy=True, balance=None,
                 balance_coef=None, z_loss_coef=0.0, capacity_factor=None, activation="relu",
                 dtype=np.float64, rng=None):
        d = check_int("d_model", d_model, low=1)
        h = check_int("d_hidden", d_hidden, low=1)
        E = check_int("n_experts", n_experts, low=1)
        check_choice("gate", gate, GATES)
        self.k = E if gate == "dense" else check_int("k", k, low=1, high=E)
        check_choice("balance", balance, BALANCES)
        if balance in ("load", "importance+load"):
            if not noisy:
                raise ValueError(f"balance={balance!r} needs noisy=True: the smooth load estimator "
                                 "(Shazeer et al. 2017) is built from the noise scale softplus(x W_noise)")
            if gate == "dense":
                raise ValueError(f"balance={balance!r} needs a sparse gate ('topk' or 'switch'): "
                                 "with gate='dense' every expert sees every token")
        if balance_coef is None:
            balance_coef = USUAL_BALANCE_COEF.get(balance, 0.0)
        self.balance_coef = check_positive_float("balance_coef", balance_coef, allow_zero=True)
        self.z_loss_coef = check_positive_float("z_loss_coef", z_loss_coef, allow_zero=True)
        if capacity_factor is not None:
            check_positive_float("capacity_factor", capacity_factor)
        check_choice("activation", activation, ("relu", "gelu"))
        if not (isinstance(dtype, type) and dtype in (np.float32, np.float64)):
            dtype = np.dtype(dtype).type
            check_choice("dtype", dtype, (np.float32, np.float64))
        rng = np.random.default_rng(0) if rng is None else check_rng("rng", rng)

        self.d_model, self.d_hidden, self.n_experts = d, h, E
        self.gate, self.noisy, self.balance = gate, bool(noisy), balance
        self.capacity_factor, self.activation, self.dtype, self.rng = capacity_factor, activation, dtype, rng
        # Router: small random W_gate (see init_gate_weights); W_noise = 0 as in Shazeer
        # et al. 2017, i.e. σ = softplus(0) ≈ 0.69 at the start: plenty of exploration.
        self.params = {"W_gate": init_gate_weights(d, E, rng, dtype)}
        if self.noisy:
            self.params["W_noise"] = np.zeros((d, E), dtype=dtype)
        self.params.update(init_expert_params(E, d, h, rng, dtype))
        self.grads = {name: np.zeros_like(p) for name, p in self.params.items()}
        self.aux_loss, self.stats, self._cache = 0.0, {}, None

    # ------------------------------------------------------------------ forward
    def forward(self, x, train=True, noise=None):
        """Route every token to its experts and mix their answers.

        Args:
            x: (T, d) or (B, S, d) tokens.
            train: training mode adds router noise (if noisy); eval mode (False) never does.
            noise: optional explicit ε, (T, E) or (B, S, E); drawn from ``self.rng`` when
                omitted in a noisy training forward. Ignored in eval mode.

        Returns:
            y, the same shape as x. Also sets ``aux_loss`` and ``stats``.
        """
        x2, shape = check_tokens(x, self.d_model, self.dtype)   # (T, d); B·S tokens route together
        T, E, k, p = x2.shape[0], self.n_experts, self.k, self.params
        if noise is not None:
            if not self.noisy:
                raise ValueError("noise was given but the layer was built with noisy=False")
            check_array("noise", noise, ndim=(2, 3))
            if noise.shape not in ((T, E), shape[:-1] + (E,)):
                raise ValueError(f"noise must have shape {(T, E)} or {shape[:-1] + (E,)} (one ε per "
                                 f"token and expert), got {noise.shape}")
            noise = noise.reshape(T, E).astype(self.dtype, copy=False)

        H, lcache = router_logits_forward(x2, p["W_gate"], p.get("W_noise"), noise=noise,
                                          rng=self.rng, train=train)
        routing, gcache = gate_forward(H, k, self.gate)
        C = expert_capacity(T, E, k, self.capacity_factor)
        y, dcache = dispatch_combine_forward(x2, routing.idx, routing.gates, p["W1"], p["b1"], p["W2"],
                                             p["b2"], capacity=C, activation=self.activation)

        # Auxiliary losses (unweighted values in `terms`, caches for backward in `lc`).
        terms, lc = {}, {}
        if self.balance in ("importance", "importance+load"):
            terms["importance"], lc["importance"] = L.importance_loss_forward(routing.gates, routing.idx, E)
        if self.balance in ("load", "importance+load"):
            terms["load"], lc["load"] = L.load_loss_forward(lcache.clean, H, lcache.sigma, k)
        if self.balance == "switch":
            first = routing.probs.argmax(axis=1) if self.gate == "dense" else routing.idx[:, 0]
            terms["switch"], lc["switch"] = L.switch_loss_forward(routing.probs, first)
            lc["first_choice"] = first
        if self.z_loss_coef > 0:
            terms["z"], lc["z"] = L.z_loss_forward(lcache.clean)
        self.aux_loss = float(sum(self.z_loss_coef * v if name == "z" else self.balance_coef * v
                                  for name, v in terms.items()))

        plan = dcache.plan
        self.stats = {
            "load": plan.load.copy(),
            "requested": np.bincount(routing.idx.reshape(-1), minlength=E),
            "importance": np.bincount(routing.idx.reshape(-1), weights=routing.gates.reshape(-1),
                                      minlength=E),
            "dropped": plan.dropped,
            "topk_idx": np.array(routing.idx),
            "topk_gates": routing.gates,
            "kept": plan.kept,
            "probs": routing.probs,
            "capacity": C,
            "losses": terms,
        }
        self._cache = (shape, lcache, gcache, dcache, lc)
        return y.reshape(shape)

    def routing_signature(self):
        """The discrete choices of the last forward: top-k indices and kept mask, plus each
        token's first choice (Switch loss) or its top-(k+1) ranking (load loss) when those
        are used. ``gradcheck.check_layer`` compares it before and after each nudge and
        raises ``KinkError`` if a finite difference crossed a tie."""
        if self._cache is None:
            raise RuntimeError("call forward before routing_signature")
        lc = self._cache[4]
        sig = (self.stats["topk_idx"], self.stats["kept"])
        if "first_choice" in lc:
            sig += (lc["first_choice"],)
        if "load" in lc:
            sig += (lc["load"].ranked,)
        return sig

    # ------------------------------------------------------------------ backward
    def backward(self, dy):
        """Gradient of ``⟨dy, y⟩ + aux_loss``: returns dx (x's shape) and fills ``self.grads``."""
        if self._cache is None:
            raise RuntimeError("call forward before backward")
        shape, lcache, gcache, dcache, lc = self._cache
        check_array("dy", dy, shape=shape)
        dy2 = dy.reshape(-1, self.d_model).astype(self.dtype, copy=False)
        wb, wz = self.balance_coef, self.z_loss_coef

        # The expert gradients are written straight into self.grads (speed: no fresh
        # E·d·h arrays per step); every entry is overwritten, nothing accumulates.
        experts_out = {n: self.grads[n] for n in ("W1", "b1", "W2", "b2")}
        dx, grads = dispatch_combine_backward(dy2, dcache, experts_out)   # experts + combine + gather
        dgates = grads.pop("gates")
        if "importance" in lc:                                    # importance acts on the gates
            dgates = dgates + L.importance_loss_backward(wb, lc["importance"])[0]
        dprobs = L.switch_loss_backward(wb, lc["switch"])[0] if "switch" in lc else None
        dH, _ = gate_backward(dgates, gcache, dprobs)
        d_clean = d_sigma = None
        if "load" in lc:                                          # load acts on L, H and σ
            d_clean, g = L.load_loss_backward(wb, lc["load"])
            dH = dH + g["noisy"]
            d_sigma = g["sigma"]
        if "z" in lc:                                             # z-loss acts on the clean logits
            dz = L.z_loss_backward(wz, lc["z"])[0]
            d_clean = dz if d_clean is None else d_clean + dz
        dx_router, rgrads = router_logits_backward(dH, lcache, d_clean=d_clean, d_sigma=d_sigma)
        dx += dx_router
        grads.update(rgrads)
        if "W_noise" in self.params and "W_noise" not in grads:
            grads["W_noise"] = np.zeros_like(self.params["W_noise"])
        for name in self.params:
            self.grads[name] = grads[name]
        return dx.reshape(shape)

    # ------------------------------------------------------------------ counting
    @property
    def n_params(self):
        """Total number of parameters (every specialist on the payroll)."""
        return int(sum(p.size for p in self.params.values()))

    @property
    def n_active_params(self):
        """Parameters one token touches: the router (incl. W_noise if noisy) plus k experts."""
        router = sum(self.params[n].size for n in ("W_gate", "W_noise") if n in self.params)
        per_expert = sum(self.params[n][0].size for n in ("W1", "b1", "W2", "b2"))
        return int(router + self.k * per_expert)

    def flops_per_token(self):
        """Forward FLOPs per token in eval mode, counting 2 FLOPs per multiply-add and only
        the products: router scores x W_gate (2dE), two matmuls in each of the k experts
        (k·4dh) and the weighted combine (2kd). Biases, activations, softmax, sorting
        and the training-only noise matmul are not counted; no token is assumed dropped."""
        d, h, E, k = self.d_model, self.d_hidden, self.n_experts, self.k
        return int(2 * d * E + k * 4 * d * h + 2 * k * d)

    def __repr__(self):
        return (f"MoELayer(d_model={self.d_model}, d_hidden={self.d_hidden}, n_experts={self.n_experts}, "
                f"k={self.k}, gate={self.gate!r}, noisy={self.noisy}, balance={self.balance!r}, "
                f"capacity_factor={self.capacity_factor}, dtype={np.dtype(self.dtype).name})")
