"""The whole clinic: one forward/backward pair composed from the chapter's pairs.

``moe_forward`` is the MoE algorithm, one line per step, each step a pair of an earlier file:

    H  = x W_gate + ε ⊙ softplus(x W_noise)          router.py   the GP scores every specialist
    idx, G, p = gate(H)                               router.py   ... and refers to k of them
    sums = Σ over each group of tokens                balance.py  per-expert sums for balancing
    aux  = balancing losses(sums)                     balance.py
    y    = Σ_j G_tj · FFN_{idx_tj}(x_t)               dispatch.py the trip: plan, dispatch, experts, combine

``moe_backward`` runs the same steps in reverse; the balancing gradients join the task's
where their inputs were computed (the gates, the full softmax p, the clean logits, σ).

Two steps go through a *team*, the only thing that differs between one process and many:
``team.reduce_sums`` (one process: nothing to add; expert parallelism: one all-reduce of
the sums) and ``team.trip_forward`` (one process: the experts are here; expert
parallelism: rows travel to their experts' ranks and back). :class:`OneProcess` is the team
of one; ``minimoe.beyond.parallel`` has the other. The same pair serves both.

The classes hold state and call the pair: ``MoEBase`` (what the five MoE layer classes
share: params and grads, the options in ``cfg``, the last batch's cache, stats, counting,
``repr``) and ``MoELayer``. A call that raises changes nothing: every attribute is set
only after the whole pair has run.

Shapes: T tokens (B·S for (B,S,d) input), d = d_model, h = d_hidden, E experts, k per token.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import fast
from .balance import (balance_loss_backward, balance_loss_forward, balance_sums_backward, balance_sums_forward,
                      switch_choices)
from .config import (BALANCE_GROUPS, BALANCES, DTYPES, MAX_CAPACITY_FACTOR, USUAL_BALANCE_COEF, MoEConfig,
                     check_bool, layer_dtype)
from .dispatch import dispatch_combine_backward, dispatch_combine_forward, expert_capacity
from .experts import GLU_KEYS, init_expert_params
from .router import (Routing, gate_backward, gate_forward, init_gate_weights, router_logits_backward,
                     router_logits_forward)
from ..validate import all_finite, check_array, check_rng, check_tokens

__all__ = ["MoEBase", "MoELayer", "MoEConfig", "MoECache", "OneProcess", "moe_forward", "moe_backward",
           "check_params", "routing_stats", "routing_signature", "BALANCES", "BALANCE_GROUPS", "USUAL_BALANCE_COEF", "DTYPES",
           "MAX_CAPACITY_FACTOR", "check_bool", "layer_dtype"]


# --------------------------------------------------------------------------- the team of one
class RoutingCounts(NamedTuple):
    """What the trip tells the stats: per expert, assignments processed and asked for."""
    load: np.ndarray        # (E,) int, kept assignments per expert
    requested: np.ndarray   # (E,) int, before capacity
    kept: np.ndarray        # (T,k) bool, this process's kept slots
    dropped: int
    capacity: int | None


class OneProcess:
    """The team of one process: every token and every expert are here.

    Its methods are the places where expert parallelism (``beyond/parallel.py``) does
    something else; here they are the identity and the local trip.
    """

    def experts_here(self, cfg):
        """How many of the E experts' weights this process holds: all of them."""
        return cfg.n_experts

    def reduce_sums(self, sums, idx):
        """Balancing sums of all processes together: here, just this one's."""
        return sums

    def local_dsums(self, dsums):
        """This process's part of the sums' gradient: all of it."""
        return dsums

    def trip_forward(self, x, idx, gates, params, cfg):
        """Capacity, plan, dispatch, experts, combine (dispatch.py, or fast.py). -> (y (T,d), cache)"""
        C = expert_capacity(x.shape[0], cfg.n_experts, cfg.k, cfg.capacity_factor)
        trip = fast.dispatch_combine_forward_fast if cfg.fast else dispatch_combine_forward
        return trip(x, idx, gates, params["W1"], params["b1"], params["W2"], params["b2"], capacity=C,
                    activation=cfg.activation, **{n: params[n] for n in GLU_KEYS if n in params})

    def trip_backward(self, dy, cache):
        """-> (dx (T,d), dgates (T,k), the experts' gradients)."""
        back = fast.dispatch_combine_backward_fast if isinstance(cache, fast.FastDispatchCache) \
            else dispatch_combine_backward
        return back(dy, cache)

    def reduce_router_grads(self, grads):
        """The router's gradients over all processes' tokens: here, this one's."""
        return grads

    def counts(self, cache, idx):
        """The trip's :class:`RoutingCounts` (for ``stats``); idx (T,k) the chosen experts."""
        plan = cache.plan
        requested = np.bincount(idx.reshape(-1), minlength=len(plan.load))
        return RoutingCounts(plan.load, requested, plan.kept, plan.dropped, plan.capacity)


ONE_PROCESS = OneProcess()


# --------------------------------------------------------------------------- the pair
class MoECache(NamedTuple):
    """What moe_backward needs, and what the stats read."""
    shape: tuple           # x's shape, given back to dx
    cfg: MoEConfig
    team: object
    logits: tuple          # router_logits_forward's cache (clean L and σ inside)
    gate: tuple            # gate_forward's cache (idx, gates, probs)
    sums: tuple            # balance_sums_forward's cache
    loss: tuple            # balance_loss_forward's cache
    trip: tuple            # team.trip_forward's cache
    terms: dict            # each unweighted auxiliary loss, by name


def check_params(params, cfg, experts_here=None):
    """Every parameter the config needs: a numpy array of the layer's dtype and shape, by name.

    The router's (d, E) weights must also be finite (d·E numbers); the experts' weights are
    checked through their output (see experts.py and fast.py), so a bad one is still named.
    """
    if not isinstance(params, dict):
        raise TypeError(f"params must be a dict of arrays, got {type(params).__name__}")
    dt = np.dtype(cfg.dtype)
    shapes = cfg.param_shapes(experts_here=experts_here)
    for name, shape in shapes.items():
        if name not in params:
            raise KeyError(f"params has no {name!r} (this layer needs {', '.join(shapes)})")
        p = params[name]
        check_array(name, p, finite=False)
        if p.dtype != dt:
            raise TypeError(f"{name} must be {dt.name} like the layer (dtype={dt.name}), got {p.dtype}; "
                            f"convert it with .astype(np.{dt.name})")
        if p.shape != shape:
            here = "" if experts_here in (None, cfg.n_experts) else f", {experts_here} of them here"
            raise ValueError(f"{name} must have shape {shape} (d={cfg.d_model}, h={cfg.d_hidden}, "
                             f"E={cfg.n_experts}{here}), got {p.shape}")
        if name in ("W_gate", "W_noise"):
            check_array(name, p)                               # finite, named
    return params


def moe_forward(x, params, cfg, *, train=True, noise=None, rng=None, team=ONE_PROCESS):
    """The MoE layer's forward: route, balance, run the experts, combine.

    Args:
        x: (T, d) or (B, S, d) tokens; with ``balance_groups="sequence"`` each of the B
            sequences is balanced on its own.
        params: ``W_gate (d,E)``, ``W_noise (d,E)`` (if noisy), ``W1 (E,d,h)``, ``b1 (E,h)``,
            ``W2 (E,h,d)``, ``b2 (E,d)`` (and ``W3``, ``b3`` for SwiGLU), of ``cfg.dtype``.
        cfg: a :class:`~minimoe.core.config.MoEConfig`.
        train: training mode adds router noise (if noisy); eval mode never does.
        noise: optional ε, (T, E) or x's leading shape + (E,); else drawn from ``rng``.
        team: :data:`ONE_PROCESS`, or an expert-parallel team (``beyond/parallel.py``).

    Returns:
        ``(y, aux_loss, cache)``: y with x's shape, the weighted auxiliary loss (float).
    """
    train = check_bool("train", train)
    x2, shape = check_tokens_copy(x, cfg)
    check_params(params, cfg, team.experts_here(cfg))
    noise = check_noise(noise, cfg, x2.shape[0], shape) if train else None
    G = shape[0] if cfg.balance_groups == "sequence" and len(shape) == 3 else 1

    H, logits = router_logits_forward(x2, params["W_gate"], params.get("W_noise"), noise=noise,
                                      rng=rng, train=train)              # H = x W_gate + ε ⊙ σ
    routing, gate = gate_forward(H, cfg.k, cfg.gate)                     # idx, G (T,k), p (T,E)
    sums, scache = balance_sums_forward(routing, logits, H, cfg, G)      # per-expert sums per group
    sums = team.reduce_sums(sums, routing.idx)                           # all processes' tokens
    aux_loss, terms, lcache = balance_loss_forward(sums, cfg)            # aux = Σ coef · loss(sums)
    y, trip = team.trip_forward(x2, routing.idx, routing.gates, params, cfg)   # y_t = Σ_j G_tj FFN(x_t)
    return y.reshape(shape), aux_loss, MoECache(shape, cfg, team, logits, gate, scache, lcache, trip, terms)


def moe_backward(dy, cache):
    """Gradient of ``⟨dy, y⟩ + aux_loss``: returns ``dx`` (x's shape) and ``grads`` (every parameter).

    dy must be finite and representable in the layer's dtype (a float64 dy beyond
    float32's range would turn into inf); the gradients come back as fresh arrays.
    """
    cfg, team = cache.cfg, cache.team
    dy2 = check_dy(dy, cache.shape, cfg)
    dx, dgates, grads = team.trip_backward(dy2, cache.trip)                     # experts, combine
    dsums = team.local_dsums(balance_loss_backward(cache.loss))                 # ∂aux/∂sums
    dgates_aux, dprobs, d_clean, d_noisy, d_sigma = balance_sums_backward(dsums, cache.sums)
    if dgates_aux is not None:
        dgates = dgates + dgates_aux                                            # importance acts on G
    dH, _ = gate_backward(dgates, cache.gate, dprobs)                           # Switch acts on p
    if d_noisy is not None:
        dH = dH + d_noisy                                                       # load acts on H ...
    dx_router, rgrads = router_logits_backward(dH, cache.logits, d_clean=d_clean, d_sigma=d_sigma)  # ... L, σ
    grads.update(team.reduce_router_grads(rgrads))
    if cfg.noisy and "W_noise" not in grads:                                    # eval forward: σ unused
        grads["W_noise"] = np.zeros_like(cache.logits.W_gate)
    dx = dx + dx_router
    check_finite_grads(dx, grads, cfg)
    return dx.reshape(cache.shape), grads


# --------------------------------------------------------------------------- the pair's checks
def check_tokens_copy(x, cfg):
    """x as (T, d) tokens of the layer's dtype (``validate.check_tokens``), always a copy: the
    cache must not change when the caller changes x afterwards (``x += layer.forward(x)``, the
    residual, in place)."""
    x2, shape = check_tokens(x, cfg.d_model, cfg.dtype)
    if np.shares_memory(x2, x):
        x2 = x2.copy()
    if not all_finite(x2):
        raise ValueError(f"x does not fit in {np.dtype(cfg.dtype).name} (the layer's dtype): values up to "
                         f"{np.max(np.abs(x)):.3g} become inf")
    return x2, shape


def check_noise(noise, cfg, T, shape):
    """An explicit ε for a training forward: (T, E) or x's leading shape + (E,)."""
    if noise is None:
        return None
    if not cfg.noisy:
        raise ValueError("noise was given but the layer was built with noisy=False")
    E = cfg.n_experts
    check_array("noise", noise, ndim=(2, 3))
    allowed = sorted({(T, E), shape[:-1] + (E,)})
    if noise.shape not in allowed:
        want = " or ".join(map(str, allowed))
        raise ValueError(f"noise must have shape {want} (one ε per token and expert), got {noise.shape}")
    return noise.reshape(T, E).astype(cfg.dtype, copy=False)


def check_dy(dy, shape, cfg):
    """dy: the output's shape, finite, and still finite in the layer's dtype. Returns (T, d)."""
    check_array("dy", dy, shape=shape)
    with np.errstate(over="ignore"):
        dy2 = dy.reshape(-1, cfg.d_model).astype(cfg.dtype, copy=False)
    if dy2.dtype != dy.dtype and not all_finite(dy2):
        raise ValueError(f"dy does not fit in {dy2.dtype.name} (the layer's dtype): values up to "
                         f"{np.max(np.abs(dy)):.3g} become inf; scale the loss down")
    return dy2


def check_finite_grads(dx, grads, cfg):
    """A gradient the layer's dtype cannot hold is an error, not a silent inf. Checked on dx,
    the router's and the biases' gradients (T·d + d·E + E·(h+d) numbers): the experts' weight
    gradients are products of these and of finite activations."""
    for name, g in [("dx", dx)] + [(n, grads[n]) for n in ("W_gate", "W_noise", "b1", "b2") if n in grads]:
        if not all_finite(g):
            raise FloatingPointError(f"the gradient {name} overflowed in {np.dtype(cfg.dtype).name}: dy or the "
                                     "weights are too large for the layer's dtype (scale the loss down, or use float64)")


def routing_stats(cache):
    """The ``stats`` dict of one forward (see MoELayer's Attributes)."""
    idx, gates, probs = cache.gate.idx, cache.gate.gates, cache.gate.probs
    counts = cache.team.counts(cache.trip, idx)
    return {"load": counts.load.copy(), "requested": counts.requested,
            "importance": cache.loss.sums.gate_mass.sum(axis=0), "dropped": counts.dropped,
            "topk_idx": np.array(idx), "topk_gates": gates, "kept": counts.kept, "capacity": counts.capacity,
            "probs": probs, "losses": dict(cache.terms)}


def routing_signature(cache):
    """The discrete choices of one forward: top-k indices and kept mask, plus each token's
    Switch choices or its top-(k+1) ranking (load loss) when those are used.
    ``gradcheck.check_layer`` compares it before and after each nudge (a change is a kink)."""
    cfg, gate = cache.cfg, cache.gate
    sig = (np.array(gate.idx), cache.team.counts(cache.trip, gate.idx).kept)
    if cfg.balance == "switch":
        sig += (switch_choices(Routing(gate.idx, gate.gates, gate.probs), cfg),)
    if cache.sums.load is not None:
        sig += (cache.sums.load.ranked,)
    return sig


# --------------------------------------------------------------------------- the classes
class MoEBase:
    """What every MoE layer class shares; a subclass adds its routing (forward, backward).

    A subclass's ``__init__`` calls :meth:`_setup` (the config, then the weights), its
    ``forward`` computes everything first and then calls :meth:`_finish_forward` (which sets
    cache, stats and aux_loss together), and its ``backward`` starts with
    :meth:`_start_backward` (the cache guard and the dy check) and ends with
    :meth:`_store_grads`. So a call that raises leaves the layer as it was.

    The options live in ``self.cfg`` (a frozen :class:`MoEConfig`); ``layer.k`` reads
    ``layer.cfg.k``, and ``layer.capacity_factor = 1.25`` replaces the config by a checked copy.

    Attributes every layer has: ``cfg`` and its options (``d_model, d_hidden, n_experts, k,
    capacity_factor, activation, dtype, ...``), ``rng``; ``params``/``grads`` (identical keys);
    ``aux_loss``; ``stats``.
    """

    router_keys = ("W_gate", "W_noise")          # parameters one token always touches
    repr_fields = ("d_model", "d_hidden", "n_experts", "k", "capacity_factor")

    def __getattr__(self, name):                 # only called when normal lookup fails
        cfg = self.__dict__.get("cfg")
        if cfg is not None and name in MoEConfig.__dataclass_fields__:
            return getattr(cfg, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name, value):
        if name in MoEConfig.__dataclass_fields__ and "cfg" in self.__dict__:
            value = self.cfg.replace(**{name: value})      # checked; the layer is unchanged if it fails
            name = "cfg"
        object.__setattr__(self, name, value)

    def _setup(self, cfg, rng, router=()):
        """The shared constructor: keep the config, then make the weights.

        ``router``: names of the (d, E) router weights to create before the experts,
        ``"W_gate"`` (small random) and/or ``"W_noise"`` (zeros; only if ``cfg.noisy``).
        """
        rng = np.random.default_rng(0) if rng is None else check_rng("rng", rng)
        d, h, E = cfg.d_model, cfg.d_hidden, cfg.n_experts
        # Router: small random W_gate (see init_gate_weights); W_noise = 0 as in Shazeer
        # et al. 2017, i.e. σ = softplus(0) ≈ 0.69 at the start: plenty of exploration.
        params = {}
        if "W_gate" in router:
            params["W_gate"] = init_gate_weights(d, E, rng, cfg.dtype)
        if "W_noise" in router and cfg.noisy:
            params["W_noise"] = np.zeros((d, E), dtype=cfg.dtype)
        params.update(init_expert_params(E, d, h, rng, cfg.dtype, cfg.activation))
        self.cfg, self.rng, self.params = cfg, rng, params
        self.grads = {name: np.zeros_like(p) for name, p in params.items()}
        self.aux_loss, self.stats, self._cache = 0.0, {}, None

    # ------------------------------------------------------------------ forward / backward
    def _start_forward(self, x, train=True):
        """Check x and train (the layer is not touched): returns ``(x2, shape)``, x as (T, d)
        tokens of the layer's dtype (a copy, so the cache never depends on the caller's x),
        and x's shape."""
        check_bool("train", train)
        return check_tokens_copy(x, self.cfg)

    def _finish_forward(self, cache, stats, aux_loss=0.0, **more):
        """Keep this batch's cache, stats and aux loss (and ``more`` attributes), all at once,
        once all were computed.

        Speed: the last batch's cache is freed here, after the new one exists: freed earlier,
        its (N, h) arrays would go back to the operating system just before this batch asks
        for arrays of the same size, which then arrive page by page (at T=4096, E=64 that was
        ~3,000 page faults and ~9 ms of a 104 ms float32 step, python -m minimoe.bench).
        """
        vars(self).update(_cache=cache, stats=stats, aux_loss=aux_loss, **more)     # one step: all or none

    def _start_backward(self, dy):
        """The cache guard, then dy checked against the output: returns (cache, dy as (T, d))."""
        if self._cache is None:
            raise RuntimeError("call forward before backward")
        return self._cache, check_dy(dy, self._cache.shape, self.cfg)

    def _store_grads(self, grads, **more):
        """Put the gradient of every parameter into ``self.grads`` (fresh arrays), and ``more``
        attributes, after all were computed: ``self.grads`` stays the same dict, so an
        optimizer holding it sees the new ones."""
        missing = [name for name in self.params if name not in grads]
        if missing:
            raise RuntimeError(f"backward computed no gradient for {', '.join(missing)}")
        new = {name: grads[name] for name in self.params}
        self.grads.update(new)
        vars(self).update(more)

    def _routing_stats(self, idx, gates, plan, probs=None, **extra):
        """The ``stats`` dict of a token-choice forward through ``dispatch.py`` (the beyond classes)."""
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

    Args (every option is kept in ``layer.cfg``, a :class:`~minimoe.core.config.MoEConfig`):
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
        switch_fraction: what the Switch loss's f counts (balance="switch" only); f is a count
            in all three, so no gradient flows through it:
            "first" (default; GShard): each token's first choice — f sums to 1 and the loss
            is exactly 1 at perfect balance.
            "all" (HF transformers' ``load_balancing_loss_func``, used by Mixtral; flaxformer):
            every chosen expert — f sums to k and the loss is exactly **k** at perfect balance
            (so the same α weighs it k times more).
            "all/k" (Megatron-core's ``switch_load_balancing_loss_func``): every chosen expert,
            f divided by T·k — f sums to 1 and the loss is exactly 1 at perfect balance.
        balance_groups: "batch" (default) pools all B·S tokens into one balancing loss;
            "sequence" computes each balancing loss (importance, load, Switch) on each of the
            B sequences of a (B, S, d) input and averages them — HF Switch Transformers'
            per-group form, DeepSeek-V3's sequence-wise balance loss (§2.1.2, eq. 17–20) —
            so every sequence must be balanced, not just the batch. (T, d) input is one group.
            The z-loss is a mean over tokens, the same in both modes.
        z_loss_coef: weight of the router z-loss (ST-MoE uses 0.001); 0 turns it off.
        capacity_factor: each expert takes at most ``C = ceil(capacity_factor·T·k/E)``
            assignments; None means no dropping. When an expert is full, first choices are
            served before second choices, then earlier tokens before later ones; a dropped
            assignment contributes 0 to y (the residual connection carries the token on).
        activation: "relu", "gelu" or "swiglu" (``(silu(x W1 + b1) ⊙ (x W3 + b3)) W2 + b2``, as
            Mixtral's w1/w3/w2; adds W3 (E,d,h) and b3 (E,h) = 0, see experts.py).
        dtype: np.float64 (gradient checks) or np.float32 (speed); every array stays in it.
        rng: numpy.random.Generator (or a seed) for the initial weights and for the training
            noise (default ``np.random.default_rng(0)``).
        fast: True (default) runs ``fast.py``'s dispatch and expert bank (workspaces);
            False runs the textbook ``dispatch.py``/``experts.py``. Same numbers.

    Attributes:
        cfg: the options, a frozen :class:`~minimoe.core.config.MoEConfig`.
        params / grads: dicts with identical keys ``W_gate (d,E)``, ``W_noise (d,E)`` (if
            noisy), ``W1 (E,d,h)``, ``b1 (E,h)``, ``W2 (E,h,d)``, ``b2 (E,d)`` (and, for SwiGLU,
            ``W3 (E,d,h)``, ``b3 (E,h)``). Each backward puts fresh gradient arrays in ``grads``.
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
        cfg = MoEConfig(d_model, d_hidden, n_experts, k, gate, noisy, balance, balance_coef, z_loss_coef,
                        capacity_factor, activation, dtype, fast, switch_fraction, balance_groups)
        self._setup(cfg, rng, router=("W_gate", "W_noise"))

    @classmethod
    def from_config(cls, cfg, rng=None):
        """A layer with the options of ``cfg`` (a :class:`MoEConfig`) and fresh weights."""
        return cls(**cfg.options(), rng=rng)

    def forward(self, x, train=True, noise=None):
        """Route every token to its experts and mix their answers (:func:`moe_forward`).

        Args:
            x: (T, d) or (B, S, d) tokens.
            train: True or False; training mode adds router noise (if noisy), eval mode never does.
            noise: optional explicit ε, (T, E) or (B, S, E); drawn from ``self.rng`` when
                omitted in a noisy training forward. Ignored in eval mode.

        Returns:
            y, the same shape as x. Also sets ``aux_loss`` and ``stats``.
        """
        y, aux_loss, cache = moe_forward(x, self.params, self.cfg, train=train, noise=noise, rng=self.rng)
        self._finish_forward(cache, routing_stats(cache), aux_loss)
        return y

    def routing_signature(self):
        """The discrete choices of the last forward (:func:`routing_signature`)."""
        if self._cache is None:
            raise RuntimeError("call forward before routing_signature")
        return routing_signature(self._cache)

    def backward(self, dy):
        """Gradient of ``⟨dy, y⟩ + aux_loss`` (:func:`moe_backward`): returns dx (x's shape)
        and puts fresh arrays into ``self.grads``."""
        if self._cache is None:
            raise RuntimeError("call forward before backward")
        dx, grads = moe_backward(dy, self._cache)
        self._store_grads(grads)
        return dx
