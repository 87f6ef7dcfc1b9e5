"""The whole clinic: router + dispatch + experts + balancing losses in one layer.

``MoELayer`` is a thin class around the functional pairs of ``router.py``,
``dispatch.py``, ``experts.py`` and ``losses.py``. Reading its ``forward`` and
``backward`` top to bottom is reading the whole MoE algorithm:

    forward:   scores H ─► gate (idx, G) ─► plan + dispatch ─► experts ─► combine ─► y
               and the auxiliary losses, from the same scores and gates
    backward:  the same steps in reverse; the losses add their gradients where
               their inputs were computed (gates, probs, clean logits, σ)

``MoEBase`` (first below) holds what the five MoE layer classes share (this one, and the
four of ``minimoe.beyond``): the constructor checks, the parameters' initialisation,
counting, the cache guard, the ``stats`` dict and ``__repr__``. Each class adds its routing.

The dispatch and the expert bank run from ``fast.py`` by default (the same numbers, with
reused buffers); ``MoELayer(..., fast=False)`` runs the textbook ``dispatch.py``/``experts.py``.

Shapes: T tokens (B·S for (B,S,d) input), d = d_model, h = d_hidden, E experts, k per token.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import fast as fast_path
from . import losses
from .dispatch import dispatch_combine_backward, dispatch_combine_forward, expert_capacity
from .experts import EXPERT_ACTIVATIONS, GLU_KEYS, init_expert_params
from .router import (GATES, gate_backward, gate_forward, init_gate_weights, router_logits_backward,
                     router_logits_forward)
from ..validate import (check_array, check_choice, check_dtype, check_int, check_positive_float, check_rng,
                        check_tokens)

__all__ = ["MoEBase", "MoELayer", "BALANCES", "BALANCE_GROUPS", "USUAL_BALANCE_COEF", "DTYPES"]

BALANCES = (None, "importance", "load", "importance+load", "switch")
BALANCE_GROUPS = ("batch", "sequence")
# The coefficients the papers use (see losses.py): Shazeer et al. 2017 and Fedus et al. 2021.
USUAL_BALANCE_COEF = {"importance": 0.1, "load": 0.1, "importance+load": 0.1, "switch": 0.01}
DTYPES = (np.float32, np.float64)       # every layer class computes in one of these
MAX_CAPACITY_FACTOR = 1e9               # C = ceil(cf·T·k/E) must stay a finite integer


class MoEBase:
    """What every MoE layer class shares; a subclass adds its routing (forward, backward).

    A subclass's ``__init__`` calls :meth:`_setup` (the shared checks and the expert bank,
    after the router's own weights), its ``forward`` starts with :meth:`_start_forward`
    (checks x, forgets the last batch) and ends by storing its cache, and its
    ``backward`` starts with :meth:`_start_backward` (the cache guard and the dy check).

    Attributes every layer has: ``d_model, d_hidden, n_experts, k, capacity_factor,
    activation, dtype, rng``; ``params``/``grads`` (identical keys); ``aux_loss``; ``stats``.
    """

    router_keys = ("W_gate", "W_noise")          # parameters one token always touches
    repr_fields = ("d_model", "d_hidden", "n_experts", "k", "capacity_factor")

    def _setup(self, d_model, d_hidden, n_experts, k, capacity_factor, activation, dtype, rng,
               router=(), k_max=None):
        """The shared constructor: check the arguments, then make the weights.

        ``router``: names of the (d, E) router weights to create before the experts,
        ``"W_gate"`` (small random) and/or ``"W_noise"`` (zeros). ``k_max``: the largest k (E).
        """
        d = check_int("d_model", d_model, low=1)
        h = check_int("d_hidden", d_hidden, low=1)
        E = check_int("n_experts", n_experts, low=1)
        self.k = check_int("k", k, low=1, high=E if k_max is None else k_max)
        if capacity_factor is not None:
            capacity_factor = check_positive_float("capacity_factor", capacity_factor)
            if capacity_factor > MAX_CAPACITY_FACTOR:
                raise ValueError(f"capacity_factor must be at most {MAX_CAPACITY_FACTOR:g} (C = ceil(capacity_factor·T·k/E) "
                                 f"must stay a finite integer; use None for no dropping), got {capacity_factor!r}")
        self.activation = check_choice("activation", activation, EXPERT_ACTIVATIONS)
        self.dtype = layer_dtype(dtype)
        self.rng = np.random.default_rng(0) if rng is None else check_rng("rng", rng)
        self.d_model, self.d_hidden, self.n_experts, self.capacity_factor = d, h, E, capacity_factor
        # Router: small random W_gate (see init_gate_weights); W_noise = 0 as in Shazeer
        # et al. 2017, i.e. σ = softplus(0) ≈ 0.69 at the start: plenty of exploration.
        self.params = {}
        if "W_gate" in router:
            self.params["W_gate"] = init_gate_weights(d, E, self.rng, self.dtype)
        if "W_noise" in router:
            self.params["W_noise"] = np.zeros((d, E), dtype=self.dtype)
        self.params.update(init_expert_params(E, d, h, self.rng, self.dtype, self.activation))
        self.grads = {name: np.zeros_like(p) for name, p in self.params.items()}
        self.aux_loss, self.stats, self._cache, self._released = 0.0, {}, None, None

    # ------------------------------------------------------------------ forward / backward
    def _start_forward(self, x):
        """Forget the last batch (a failed forward leaves no cache to backward through), check x.

        Returns ``(x2, shape)``: x as (T, d) tokens of the layer's dtype, and x's shape.
        """
        # Speed: the last batch's cache is set aside, and freed only once this batch has its own
        # (_finish_forward). Freed here, its (N, h) arrays would go back to the operating system
        # just before this batch asks for arrays of the same size, which then arrive page by
        # page: at T=4096, E=64 that was ~3,000 page faults and ~9 ms of a 104 ms float32 step
        # (python -m minimoe.bench). `_released` is never read: backward sees only `_cache`.
        self._released, self._cache = self._cache, None
        self.aux_loss, self.stats = 0.0, {}
        return check_tokens(x, self.d_model, self.dtype)        # (T, d); B·S tokens route together

    def _finish_forward(self, cache):
        """Keep this batch's cache for backward; let the last batch's go (see _start_forward)."""
        self._cache, self._released = cache, None

    def _start_backward(self, dy):
        """The cache guard, then dy checked against the output: returns (cache, dy as (T, d))."""
        if self._cache is None:
            raise RuntimeError("call forward before backward")
        check_array("dy", dy, shape=self._cache.shape)
        return self._cache, dy.reshape(-1, self.d_model).astype(self.dtype, copy=False)

    def _store_grads(self, grads):
        """Copy the gradients of every parameter into ``self.grads``, after all were computed."""
        for name in self.params:
            self.grads[name] = grads[name]

    def _routing_stats(self, idx, gates, plan, probs=None, **extra):
        """The ``stats`` dict of a token-choice forward (see MoELayer's Attributes)."""
        flat = idx.reshape(-1)
        stats = {
            "load": plan.load.copy(),
            "requested": np.bincount(flat, minlength=self.n_experts),
            "importance": np.bincount(flat, weights=gates.reshape(-1), minlength=self.n_experts),
            "dropped": plan.dropped,
            "topk_idx": np.array(idx),
            "topk_gates": gates,
            "kept": plan.kept,
            "capacity": plan.capacity,
            "losses": {},
        }
        if probs is not None:
            stats["probs"] = probs
        stats.update(extra)
        return stats

    def routing_signature(self):
        """The discrete choices of the last forward: top-k indices and kept mask.
        ``gradcheck.check_layer`` compares it before and after each nudge and raises
        ``KinkError`` if a finite difference crossed a tie."""
        if self._cache is None:
            raise RuntimeError("call forward before routing_signature")
        return (self.stats["topk_idx"], self.stats["kept"])

    # ------------------------------------------------------------------ counting
    @property
    def n_params(self):
        """Total number of parameters (every specialist on the payroll)."""
        return int(sum(p.size for p in self.params.values()))

    @property
    def experts_per_token(self):
        """How many experts one token uses (k; an average for expert choice)."""
        return self.k

    @property
    def n_active_params(self):
        """Parameters one token touches: the router (incl. W_noise if noisy) plus its experts."""
        router = sum(self.params[n].size for n in self.router_keys if n in self.params)
        per_expert = sum(self.params[n][0].size for n in ("W1", "b1", "W2", "b2") + GLU_KEYS if n in self.params)
        return int(round(router + self.experts_per_token * per_expert))

    def flops_per_token(self):
        """Forward FLOPs per token in eval mode, counting 2 FLOPs per multiply-add and only
        the products: router scores x W_gate (2dE, if there is a router), two matmuls in each
        of the token's experts (4dh each; SwiGLU's three: 6dh) and the weighted combine (2d each). Biases,
        activations, softmax, sorting and the training-only noise matmul are not counted; no
        token is assumed dropped."""
        d, h, E = self.d_model, self.d_hidden, self.n_experts
        router = 2 * d * E if "W_gate" in self.params else 0
        return int(round(router + self.experts_per_token * (self._expert_matmuls() * 2 * d * h + 2 * d)))

    def _expert_matmuls(self):
        """d×h-sized matmuls per expert: 2 (W1, W2), or 3 for SwiGLU (W1, W3, W2)."""
        return 3 if self.activation == "swiglu" else 2

    def _glu_params(self):
        """SwiGLU's extra expert arrays as keyword arguments (``{}`` for ReLU/GELU)."""
        return {n: self.params[n] for n in GLU_KEYS if n in self.params}

    def __repr__(self):
        fields = ", ".join(f"{f}={getattr(self, f)!r}" for f in self.repr_fields)
        return f"{type(self).__name__}({fields}, dtype={np.dtype(self.dtype).name})"


def layer_dtype(dtype):
    """The one dtype rule of the layer classes: np.float32 or np.float64 (as a type)."""
    dt = check_dtype("dtype", dtype)
    if dt.type not in DTYPES:
        raise TypeError(f"dtype must be np.float32 or np.float64 (a layer computes in one of them), got {dt}")
    return dt.type


def check_bool(name, value):
    """True or False, nothing else (a string such as 'no' is truthy, and would mean True)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def _loss_backward(backward, dloss, cache):
    """A loss's backward, through the per-sequence average if the forward was grouped."""
    if isinstance(cache, losses.GroupedCache):
        return losses.grouped_loss_backward(backward, dloss, cache)
    return backward(dloss, cache)


class AuxCaches(NamedTuple):
    """The caches of the auxiliary losses of one forward (None: that loss is off)."""
    importance: tuple | None = None
    load: tuple | None = None
    switch: tuple | None = None
    first_choice: np.ndarray | None = None   # (T,) or (T,k): what the Switch loss's f counts
    z: tuple | None = None


class MoECache(NamedTuple):
    shape: tuple          # x's shape, given back to dx
    logits: tuple         # router_logits_forward's cache (clean L and σ inside)
    gate: tuple           # gate_forward's cache
    dispatch: tuple       # dispatch_combine_forward's cache (plan inside)
    aux: AuxCaches


class MoELayer(MoEBase):
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
        switch_fraction: what the Switch loss's f counts (balance="switch" only).
            "first" (default; GShard): each token's first choice — f sums to 1 and the loss
            is exactly 1 at perfect balance. "all" (Mixtral, as HF transformers'
            ``load_balancing_loss_func`` on this layer's router logits; flaxformer, Megatron):
            every chosen expert, f = mean over tokens of the (T,k,E) one-hot choices summed
            over k — f sums to k and the loss is exactly **k** at perfect balance (so the same
            α weighs it k times more). f is a count in both: no gradient flows through it.
        balance_groups: "batch" (default) pools all B·S tokens into one balancing loss;
            "sequence" computes each balancing loss (importance, load, Switch) on each of the
            B sequences of a (B, S, d) input and averages them — HF Switch Transformers'
            per-group form, DeepSeek-V3's sequence-wise balance loss (§2.1.2, eq. 17–20) —
            so every sequence must be balanced, not just the batch. (T, d) input is one group.
            The z-loss is a mean over tokens, and all sequences have S tokens, so its
            per-sequence average *is* the pooled mean: it is computed pooled in both modes.
        z_loss_coef: weight of the router z-loss (ST-MoE uses 0.001); 0 turns it off.
        capacity_factor: each expert takes at most ``C = ceil(capacity_factor·T·k/E)``
            assignments; None means no dropping. When an expert is full, first choices are
            served before second choices, then earlier tokens before later ones; a dropped
            assignment contributes 0 to y (the residual connection carries the token on).
        activation: "relu", "gelu" or "swiglu" (``(silu(x W1 + b1) ⊙ (x W3 + b3)) W2 + b2``, as
            Mixtral's w1/w3/w2; adds W3 (E,d,h) and b3 (E,h) = 0, see experts.py).
        dtype: np.float64 (gradient checks) or np.float32 (speed); every array stays in it.
        rng: numpy.random.Generator for the initial weights and for the training noise
            (default ``np.random.default_rng(0)``).
        fast: True (default) runs ``fast.py``'s dispatch and expert bank (workspaces, reused
            buffers); False runs the textbook ``dispatch.py``/``experts.py``. Same numbers.

    Attributes:
        params / grads: dicts with identical keys ``W_gate (d,E)``, ``W_noise (d,E)`` (if
            noisy), ``W1 (E,d,h)``, ``b1 (E,h)``, ``W2 (E,h,d)``, ``b2 (E,d)`` (and, for SwiGLU,
            ``W3 (E,d,h)``, ``b3 (E,h)``).
        aux_loss: float, weighted sum of the balancing and z losses of the last forward.
        stats: dict from the last forward — "load" (E,) int assignments each expert processed,
            "requested" (E,) int the same before capacity, "importance" (E,) gate mass per expert (before capacity), "dropped" int,
            "topk_idx" (T,k), "topk_gates" (T,k), "kept" (T,k) bool, "probs" (T,E) softmax of
            the scores used, "capacity" (C or None), "losses" (each unweighted aux loss).
    """

    repr_fields = MoEBase.repr_fields[:4] + ("gate", "noisy", "balance", "capacity_factor")

    def __init__(self, d_model, d_hidden, n_experts, k=2, gate="topk", noisy=True, balance=None,
                 balance_coef=None, z_loss_coef=0.0, capacity_factor=None, activation="relu",
                 dtype=np.float64, rng=None, fast=True, switch_fraction="first", balance_groups="batch"):
        check_choice("gate", gate, GATES)
        check_choice("balance", balance, BALANCES)
        self.switch_fraction = check_choice("switch_fraction", switch_fraction, losses.SWITCH_FRACTIONS)
        self.balance_groups = check_choice("balance_groups", balance_groups, BALANCE_GROUPS)
        if switch_fraction == "all" and gate == "dense":
            raise ValueError("switch_fraction='all' needs a sparse gate ('topk' or 'switch'): with gate='dense' "
                             "every token chooses every expert, f_e = 1 and the Switch loss is the constant E")
        noisy, self.fast = check_bool("noisy", noisy), check_bool("fast", fast)
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
        self.gate, self.noisy, self.balance = gate, noisy, balance
        if gate == "dense":                  # the dense gate uses every expert: k is E
            k = check_int("n_experts", n_experts, low=1)
        self._setup(d_model, d_hidden, n_experts, k, capacity_factor, activation, dtype, rng,
                    router=("W_gate", "W_noise") if noisy else ("W_gate",))

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
        x2, shape = self._start_forward(x)
        T, E, k, p = x2.shape[0], self.n_experts, self.k, self.params
        noise = self._check_noise(noise, T, shape) if train else None

        H, lcache = router_logits_forward(x2, p["W_gate"], p.get("W_noise"), noise=noise,
                                          rng=self.rng, train=train)
        routing, gcache = gate_forward(H, k, self.gate)
        C = expert_capacity(T, E, k, self.capacity_factor)
        trip = fast_path.dispatch_combine_forward if self.fast else dispatch_combine_forward
        y, dcache = trip(x2, routing.idx, routing.gates, p["W1"], p["b1"], p["W2"], p["b2"],
                         capacity=C, activation=self.activation, **self._glu_params())

        # Auxiliary losses: unweighted values in `terms`, caches for backward in `aux`.
        # balance_groups="sequence": each balancing loss per sequence, averaged (one group per
        # sequence of a (B, S, d) input); the z-loss is a mean over tokens, the same either way.
        G = shape[0] if self.balance_groups == "sequence" and len(shape) == 3 else 1
        balance_loss = (lambda fwd, *a, **kw: fwd(*a, **kw)) if G == 1 else \
            (lambda fwd, *a, **kw: losses.grouped_loss_forward(fwd, G, *a, **kw))
        terms, aux = {}, {}
        if self.balance in ("importance", "importance+load"):
            terms["importance"], aux["importance"] = balance_loss(losses.importance_loss_forward,
                                                                  routing.gates, routing.idx, n_experts=E)
        if self.balance in ("load", "importance+load"):
            terms["load"], aux["load"] = balance_loss(losses.load_loss_forward, lcache.clean, H,
                                                      lcache.sigma, k=k)
        if self.balance == "switch":
            if self.switch_fraction == "all":      # Mixtral: f counts all k choices (k at balance)
                choices = routing.idx
            else:                                  # GShard: f counts first choices (1 at balance)
                choices = routing.probs.argmax(axis=1) if self.gate == "dense" else routing.idx[:, 0]
            terms["switch"], aux["switch"] = balance_loss(losses.switch_loss_forward, routing.probs, choices)
            aux["first_choice"] = choices
        if self.z_loss_coef > 0:
            terms["z"], aux["z"] = losses.z_loss_forward(lcache.clean)
        aux_loss = float(sum(self.z_loss_coef * v if name == "z" else self.balance_coef * v
                             for name, v in terms.items()))
        if not np.isfinite(aux_loss):
            raise FloatingPointError(f"the auxiliary loss overflowed ({', '.join(terms)}): the router's "
                                     "logits are too large (lower the learning rate, or scale x or W_gate down)")

        self.aux_loss = aux_loss
        self.stats = self._routing_stats(routing.idx, routing.gates, dcache.plan, routing.probs,
                                         losses=terms)
        self._finish_forward(MoECache(shape, lcache, gcache, dcache, AuxCaches(**aux)))
        return y.reshape(shape)

    def _check_noise(self, noise, T, shape):
        """An explicit ε for a training forward: (T, E) or x's leading shape + (E,)."""
        if noise is None:
            return None
        if not self.noisy:
            raise ValueError("noise was given but the layer was built with noisy=False")
        E = self.n_experts
        check_array("noise", noise, ndim=(2, 3))
        allowed = sorted({(T, E), shape[:-1] + (E,)})
        if noise.shape not in allowed:
            want = " or ".join(map(str, allowed))
            raise ValueError(f"noise must have shape {want} (one ε per token and expert), got {noise.shape}")
        return noise.reshape(T, E).astype(self.dtype, copy=False)

    def routing_signature(self):
        """The discrete choices of the last forward: top-k indices and kept mask, plus each
        token's first choice (Switch loss) or its top-(k+1) ranking (load loss) when those
        are used."""
        sig = super().routing_signature()
        aux = self._cache.aux
        if aux.first_choice is not None:
            sig += (aux.first_choice,)
        if aux.load is not None:
            groups = aux.load.caches if isinstance(aux.load, losses.GroupedCache) else (aux.load,)
            sig += (np.concatenate([c.ranked for c in groups]),)
        return sig

    # ------------------------------------------------------------------ backward
    def backward(self, dy):
        """Gradient of ``⟨dy, y⟩ + aux_loss``: returns dx (x's shape) and fills ``self.grads``."""
        c, dy2 = self._start_backward(dy)
        aux, wb, wz = c.aux, self.balance_coef, self.z_loss_coef
        if self.fast:     # the expert gradients go straight into self.grads (see fast.py)
            dx, dgates, grads = fast_path.dispatch_combine_backward(dy2, c.dispatch, out=self.grads)
        else:
            dx, dgates, grads = dispatch_combine_backward(dy2, c.dispatch)
        if aux.importance is not None:                            # importance acts on the gates
            dgates = dgates + _loss_backward(losses.importance_loss_backward, wb, aux.importance)[0]
        dprobs = _loss_backward(losses.switch_loss_backward, wb, aux.switch)[0] if aux.switch is not None else None
        dH, _ = gate_backward(dgates, c.gate, dprobs)
        d_clean = d_sigma = None
        if aux.load is not None:                                  # load acts on L, H and σ
            d_clean, d_noisy, d_sigma, _ = _loss_backward(losses.load_loss_backward, wb, aux.load)
            dH = dH + d_noisy
        if aux.z is not None:                                     # z-loss acts on the clean logits
            dz = losses.z_loss_backward(wz, aux.z)[0]
            d_clean = dz if d_clean is None else d_clean + dz
        dx_router, rgrads = router_logits_backward(dH, c.logits, d_clean=d_clean, d_sigma=d_sigma)
        dx += dx_router
        grads.update(rgrads)
        if self.noisy and "W_noise" not in grads:     # eval forward: σ was not used
            grads["W_noise"] = np.zeros_like(self.params["W_noise"])
        self._store_grads(grads)
        return dx.reshape(c.shape)
