"""A network of clinics: expert parallelism over MPI, the all-to-all by hand.

One machine cannot hold every specialist of a large MoE, so the experts are spread
over P processes (MPI *ranks*, one per core, GPU or machine): rank r keeps experts
``r·E/P … (r+1)·E/P − 1`` and its own share of the patients (tokens). The GP (the
router) is replicated: every clinic refers its own patients. A referral to a
specialist in another clinic becomes a *transfer*, and all transfers of a step
travel together in one shuttle run, the **all-to-all** (GShard, Lepikhin et al.
2020 §3.2; Switch, Fedus et al. 2021 §2.2 and fig. 3):

    forward:  route own tokens ─► plan (who goes where, who is dropped)
              ─► Alltoallv #1: each (token, expert) row travels to its expert's owner
              ─► the owner runs its experts once per expert on the rows it received
              ─► Alltoallv #2: each result travels back to its token's rank ─► combine
    backward: combine backward ─► Alltoallv #1 (the same counts) ─► experts backward
              ─► Alltoallv #2 (back) ─► dispatch and router backward

The backward is the same two exchanges with the same counts: an all-to-all is a
permutation of rows, and the transpose of a permutation is its inverse.

**One global batch.** Every rank's tokens together form the batch the single-process
``MoELayer`` would see (rank 0's tokens first, then rank 1's, ...), and this layer
computes exactly what ``MoELayer`` computes on it (a test checks 1e-12 at 2 and 4 ranks):

* the *counts travel first*: one ``allgather`` brings every rank the (k, E) table of
  how many of each rank's j-th choices go to each expert, plus the per-expert sums
  the balancing losses need (gate mass, smooth load, first choices, softmax mass,
  z-loss). Summed in rank order they are the global statistics (an all-reduce done
  by hand, bitwise the same on every rank);
* the **capacity** is global, ``C = ceil(cf · T_global · k / E)``, and so is the drop
  priority (``dispatch.py``): an expert's queue holds all first choices before all
  second choices, and within a choice rank the global token order, i.e. rank 0's
  tokens, then rank 1's. From the count table every rank works out which of its
  own assignments keep their bed, so a dropped assignment never travels;
* the router's gradients are summed over ranks (``Allreduce``), as data-parallel
  replicas of the router would do; the experts' gradients stay where the experts live.

The same ``allgather`` carries each rank's options and a digest of its router weights,
and any error a rank met while checking its input: if the ranks disagree, every rank
raises the same clear error instead of one rank waiting forever in a collective.

Shapes: T_r tokens on this rank, T = Σ_r T_r the global batch, d width, h hidden,
E experts, E_r = E/P experts per rank, k per token, N_r assignments this rank sends.
mpi4py is imported lazily: ``import minimoe`` never needs it.
"""
from __future__ import annotations

import copy
import hashlib
import threading
import time
from typing import NamedTuple

import numpy as np

from ..core import fast as fast_path
from ..core import losses
from ..core.dispatch import (DispatchPlan, combine_backward, combine_forward, dispatch_backward,
                             dispatch_forward, expert_capacity)
from ..core.experts import experts_backward, experts_forward
from ..core.moe import MoELayer
from ..core.router import gate_backward, gate_forward, router_logits_backward, router_logits_forward
from ..validate import check_array, check_rng, check_tokens

__all__ = ["ExpertParallelMoELayer", "global_plan", "LocalComm", "run_ranks", "MPI_HELP"]

MPI_HELP = ("expert parallelism needs mpi4py and an MPI library: pip install mpi4py mpich "
            "(or pip install -e '.[mpi]'), then run with mpiexec -n P python ...")

_ROUTER = ("W_gate", "W_noise")
_EXPERT = ("W1", "b1", "W2", "b2")
# MoELayer options this layer mirrors at one value only, with that value. An attribute a
# MoELayer does not have yet counts as its default, so this keeps working as options appear.
_ONLY_DEFAULT = {"switch_fraction": "first", "balance_groups": "batch"}
_ACTIVATIONS = ("relu", "gelu")        # the expert banks this layer slices (W1, b1, W2, b2)


def _unsupported(layer):
    """None if this layer can mirror ``layer``, else a message naming each option it cannot."""
    problems = [f"{name}={getattr(layer, name)!r} (only {default!r} is supported)"
                for name, default in _ONLY_DEFAULT.items() if getattr(layer, name, default) != default]
    if getattr(layer, "activation", "relu") not in _ACTIVATIONS:
        problems.append(f"activation={layer.activation!r} (only {' or '.join(map(repr, _ACTIVATIONS))})")
    extra = sorted(set(layer.params) - set(_ROUTER + _EXPERT))
    if extra:     # a parameter this layer would neither copy nor slice: refuse, never drop it silently
        problems.append(f"parameters {', '.join(extra)} (only {', '.join(_ROUTER + _EXPERT)} are copied or sliced)")
    if not problems:
        return None
    return ("ValueError: ExpertParallelMoELayer cannot mirror this MoELayer: " + "; ".join(problems)
            + ". Build the MoELayer with the supported values")


def _world():
    try:
        from mpi4py import MPI
    except ImportError as err:            # pragma: no cover - depends on the machine
        raise ImportError(MPI_HELP) from err
    return MPI.COMM_WORLD


# --------------------------------------------------------------------------- the core's return conventions
# The only two places that read the shape of a core function's return value beyond
# "(array, {})"; if core/ changes a convention, adapt these two lines and nothing else.
# (The core returns one gradient per input, in the forward's order, then the parameters' dict.)
def _combine_backward(dy, cache):
    """-> (dyg (N,d), dgates (T,k)), from ``dispatch.combine_backward``."""
    dyg, dgates, _ = combine_backward(dy, cache)
    return dyg, dgates


def _load_loss_backward(w, cache):
    """-> (d_clean, d_noisy, d_sigma), each (T,E), from ``losses.load_loss_backward``."""
    d_clean, d_noisy, d_sigma, _ = losses.load_loss_backward(w, cache)
    return d_clean, d_noisy, d_sigma


# --------------------------------------------------------------------------- the plan, from the count table
def global_plan(idx, counts, rank, capacity, n_experts):
    """Which of this rank's assignments keep a bed, in the global drop order, and where each row goes.

    Args:
        idx: (T_r, k) int, this rank's chosen experts, best first.
        counts: (P, k, E) int, ``counts[s, j, e]`` = how many of rank s's j-th choices are e.
        rank: r, this rank.  capacity: C (global), or None for no dropping.  n_experts: E.

    Returns:
        ``(plan, kept_counts)``: a :class:`~minimoe.core.dispatch.DispatchPlan` of this
        rank's tokens whose rows are grouped by expert (hence by owner rank: experts are
        owned in blocks), with ``plan.load`` this rank's kept rows per expert; and
        ``kept_counts (P, k, E)``, the kept part of ``counts`` — every rank computes the
        same table, so every rank knows every transfer without asking.

    Expert e's queue is ordered by (choice rank j, rank s, token t), exactly the
    single-process order over the global batch. The block (s, j, e) starts at
    ``base[s,j,e] = Σ_{j'<j} Σ_s' counts[s',j',e] + Σ_{s'<s} counts[s',j,e]``, so its
    first ``clip(C − base, 0, counts)`` rows are kept.
    """
    T, k = idx.shape
    P, E = counts.shape[0], n_experts
    if capacity is None:
        kept_counts = counts
    else:
        by_js = counts.transpose(1, 0, 2).reshape(k * P, E)        # queue order: j, then s
        base = (np.cumsum(by_js, axis=0) - by_js).reshape(k, P, E).transpose(1, 0, 2)
        kept_counts = np.clip(capacity - base, 0, counts)
    expert = idx.reshape(-1)
    key = expert * k + np.tile(np.arange(k), T)                   # (e, j); stable: tokens in order
    order = np.argsort(key, kind="stable")
    mine = counts[rank].T.reshape(-1)                             # (E·k,) requested per key (e, j)
    if capacity is not None and np.any(kept_counts[rank] < counts[rank]):
        starts = np.cumsum(mine) - mine
        place = np.arange(order.size) - starts[key[order]]        # place within its (e, j) block
        order = order[place < kept_counts[rank].T.reshape(-1)[key[order]]]
    kept = np.zeros(T * k, dtype=bool)
    kept[order] = True
    load = kept_counts[rank].sum(axis=0)
    offsets = np.concatenate([[0], np.cumsum(load)])
    plan = DispatchPlan(order, order // k, offsets, kept.reshape(T, k), load, int(T * k - order.size), capacity)
    return plan, kept_counts


def _arrival_order(kept_counts, rank, per_rank):
    """The owner's side: rows arrive grouped by (source s, local expert e, choice j);
    the experts want them grouped by (e, j, s) — the single-process order. Returns
    ``perm`` with ``grouped = received[perm]``, and the local experts' offsets (E_r+1,)."""
    P, k, _ = kept_counts.shape
    mine = kept_counts[:, :, rank * per_rank:(rank + 1) * per_rank]      # (P, k, E_r)
    sizes = mine.transpose(0, 2, 1).reshape(-1)                          # arrival blocks (s, e, j)
    s, e, j = np.meshgrid(np.arange(P), np.arange(per_rank), np.arange(k), indexing="ij")
    block_key = ((e * k + j) * P + s).reshape(-1)
    perm = np.argsort(np.repeat(block_key, sizes), kind="stable")
    offsets = np.concatenate([[0], np.cumsum(mine.sum(axis=(0, 1)))])
    return perm, offsets


def _digest(arrays):
    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        h.update(np.ascontiguousarray(a).view(np.uint8).data)
    return h.hexdigest()


def _check_agreement(headers):
    """Raise the same ValueError on every rank if a rank failed or the ranks disagree."""
    failed = [(r, hd["error"]) for r, hd in enumerate(headers) if "error" in hd]
    if failed:
        raise ValueError("; ".join(f"rank {r}: {msg}" for r, msg in failed))
    ref = headers[0]["options"]
    for r, hd in enumerate(headers[1:], start=1):
        for name, value in ref.items():
            other = hd["options"].get(name)
            if other != value:
                what = ("the router weights differ" if name == "router_digest" else
                        f"{name} differs: rank 0 has {value!r}, rank {r} has {other!r}")
                raise ValueError(f"the ranks must build the same layer, but {what} (rank 0 vs rank {r}); "
                                 "build every rank's layer from the same seed or with from_layer")


class ParallelCache(NamedTuple):
    """What backward needs from one expert-parallel forward."""
    shape: tuple            # x_local's shape
    logits: object          # router_logits_forward's cache
    gate: object            # gate_forward's cache
    dispatch: object        # the local dispatch plan
    experts: object         # the local expert bank's cache
    combine: object         # the combine's cache
    perm: np.ndarray        # the order the arrivals were grouped in
    send_rows: np.ndarray   # (P,) rows sent to each rank
    recv_rows: np.ndarray   # (P,) rows received from each rank
    aux: dict               # the auxiliary losses' caches
    n_tokens: int           # T, the global batch


class ExpertParallelMoELayer:
    """``MoELayer`` with its E experts spread over the P ranks of an MPI communicator.

    Run one copy of the program per rank (``mpiexec -n P python train.py``); each rank
    passes its own tokens. Together the ranks compute exactly what ``MoELayer`` computes
    on the concatenated batch (rank 0's tokens first).

    Example (under ``mpiexec -n 2``)::

        layer = MoELayer(16, 64, n_experts=8, k=2, rng=np.random.default_rng(0))   # same seed everywhere
        par = ExpertParallelMoELayer.from_layer(layer)           # rank r keeps 4 experts
        y = par.forward(x_local)                                 # x_local: this rank's tokens
        dx = par.backward(dy_local)                              # par.grads: router (summed) + own experts

    Args:
        the options of :class:`~minimoe.core.moe.MoELayer` (its ``rng`` must give every
        rank the same weights: pass the same seed; ``fast`` picks fast.py's expert bank or
        the textbook's, the same numbers), and
        comm: an mpi4py communicator (default ``MPI.COMM_WORLD``); E must be divisible by its size.
        noise_rng: this rank's generator for training noise (default: one drawn from ``rng``
            and the rank, so ranks never share noise).

    Only the MoELayer options above are mirrored: ``from_layer`` refuses a layer with any
    other option value (e.g. ``switch_fraction="all"``, ``balance_groups="sequence"``, a
    SwiGLU bank) with a ValueError naming it, rather than compute something else.

    Attributes:
        params / grads: ``W_gate (d,E)``, ``W_noise (d,E)`` (if noisy), and the local experts'
            ``W1 (E_r,d,h)``, ``b1 (E_r,h)``, ``W2 (E_r,h,d)``, ``b2 (E_r,d)``.
        expert_ids: ``range`` of the experts this rank owns.
        aux_loss: float, the global batch's weighted balancing + z losses (the same on every rank).
        stats: like ``MoELayer.stats``: "load", "requested", "importance", "dropped",
            "capacity", "losses" describe the global batch; "topk_idx", "topk_gates",
            "kept", "probs" this rank's tokens; plus "sent_bytes" (bytes this rank sent to
            other ranks in the last forward and backward), "exchange_seconds" (time in
            their four Alltoallv, waiting included), "received_rows" (assignments its
            experts ran), "n_tokens_global" (T).
    """

    def __init__(self, d_model, d_hidden, n_experts, k=2, gate="topk", noisy=True, balance=None,
                 balance_coef=None, z_loss_coef=0.0, capacity_factor=None, activation="relu",
                 dtype=np.float64, rng=None, fast=True, comm=None, noise_rng=None):
        # MoELayer validates every option and draws the weights; from the same seed every
        # rank draws the same router and the same bank, and keeps its own slice of the bank.
        # A bad option on one rank only must not leave the others waiting: the error travels
        # in the first collective, and every rank raises it.
        try:
            layer, error = MoELayer(d_model, d_hidden, n_experts, k=k, gate=gate, noisy=noisy, balance=balance,
                                    balance_coef=balance_coef, z_loss_coef=z_loss_coef,
                                    capacity_factor=capacity_factor, activation=activation, dtype=dtype,
                                    rng=rng, fast=fast), None
        except (ValueError, TypeError) as err:
            layer, error = None, f"{type(err).__name__}: {err}"
        if layer is not None:     # an option MoELayer accepts but this layer does not implement (e.g. activation)
            error = _unsupported(layer)
        self._adopt(layer, comm, noise_rng, error)

    @classmethod
    def from_layer(cls, layer, comm=None, noise_rng=None):
        """The expert-parallel twin of a single-process ``MoELayer`` (same options, its router
        copied, its experts sliced). Every rank must pass an identical layer.

        Raises ValueError (on every rank) if the layer has an option value this layer does
        not implement (see ``_ONLY_DEFAULT``): it would otherwise compute something else."""
        if not isinstance(layer, MoELayer):
            raise TypeError(f"layer must be a MoELayer, got {type(layer).__name__}")
        self = cls.__new__(cls)
        self._adopt(layer, comm, noise_rng, _unsupported(layer))
        return self

    def _adopt(self, layer, comm, noise_rng, error=None):
        comm = _world() if comm is None else comm
        P, r = comm.Get_size(), comm.Get_rank()
        if error is not None:
            _check_agreement(comm.allgather({"options": {}, "error": error}))
        self._options = {name: getattr(layer, name) for name in (
            "d_model", "d_hidden", "n_experts", "k", "gate", "noisy", "balance", "balance_coef",
            "z_loss_coef", "capacity_factor", "activation")}
        self._options["dtype"] = np.dtype(layer.dtype).name
        self._options["ranks"] = P
        router = [layer.params[n] for n in _ROUTER if n in layer.params]
        # The first collective: every rank learns whether the others built the same layer.
        _check_agreement(comm.allgather({"options": {**self._options, "router_digest": _digest(router)}}))
        E = layer.n_experts
        if E % P:
            raise ValueError(f"n_experts={E} must be divisible by the number of ranks P={P} "
                             f"(each rank owns E/P experts)")
        per = E // P
        self.comm, self.n_ranks, self.rank, self.experts_per_rank = comm, P, r, per
        self.expert_ids = range(r * per, (r + 1) * per)
        for name, value in self._options.items():
            if name not in ("dtype", "ranks"):
                setattr(self, name, value)
        self.dtype = layer.dtype
        # fast.py's bank or the textbook's, as the layer ran (the same numbers; not an option
        # the ranks must agree on)
        self.fast = bool(getattr(layer, "fast", True))
        self.params = {n: layer.params[n].copy() for n in _ROUTER if n in layer.params}
        self.params.update({n: layer.params[n][r * per:(r + 1) * per].copy() for n in _EXPERT})
        self.grads = {n: np.zeros_like(p) for n, p in self.params.items()}
        if noise_rng is None:
            # Drawn from a copy, so building the twin leaves the single-process layer's generator
            # as it was; one stream per rank, so ranks never share their noise.
            noise_rng = np.random.default_rng([int(copy.deepcopy(layer.rng).integers(2**63)), r])
        self.rng = check_rng("noise_rng", noise_rng)
        self.aux_loss, self.stats, self._cache, self._released = 0.0, {}, None, None

    # ------------------------------------------------------------------ helpers
    def _exchange(self, send, send_rows, recv_rows):
        """One ``Alltoallv`` of rows: ``send_rows[s]`` rows (grouped by destination) go to
        rank s, ``recv_rows[s]`` rows arrive from rank s, in rank order."""
        d = send.shape[1]
        recv = np.empty((int(recv_rows.sum()), d), dtype=send.dtype)
        sc, rc = send_rows * d, recv_rows * d
        sd, rd = np.cumsum(sc) - sc, np.cumsum(rc) - rc
        t0 = time.perf_counter()
        self.comm.Alltoallv([np.ascontiguousarray(send), (sc, sd)], [recv, (rc, rd)])
        self._exchange_seconds += time.perf_counter() - t0
        self._sent_bytes += int((send_rows.sum() - send_rows[self.rank]) * d * send.itemsize)
        return recv

    def _route_local(self, x, train, noise):
        """Everything before the first collective: check the input, score, gate, and the
        per-rank sums of the balancing statistics. Touches no attribute."""
        x2, shape = check_tokens(x, self.d_model, self.dtype)
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
        idx = np.asarray(routing.idx)
        # counts[j, e]: how many of this rank's j-th choices are expert e
        counts = np.bincount((np.arange(k) * E + idx).reshape(-1), minlength=k * E).reshape(k, E)
        # Per-rank sums of the balancing statistics; the global ones are their sums.
        lc, sums = {}, {"importance": np.bincount(idx.reshape(-1), weights=routing.gates.reshape(-1),
                                                  minlength=E)}
        if self.balance in ("importance", "importance+load"):
            _, lc["importance"] = losses.importance_loss_forward(routing.gates, idx, E)
        if self.balance in ("load", "importance+load"):
            _, lc["load"] = losses.load_loss_forward(lcache.clean, H, lcache.sigma, k)
            sums["load"] = lc["load"].load
        if self.balance == "switch":
            first = routing.probs.argmax(axis=1) if self.gate == "dense" else idx[:, 0]
            lc["first_choice"] = first
            sums["first"] = np.bincount(first, minlength=E)
            sums["probs"] = routing.probs.sum(axis=0)
        if self.z_loss_coef > 0:
            z_local, lc["z"] = losses.z_loss_forward(lcache.clean)
            sums["z"] = z_local * T                                 # Σ_t lse_t² on this rank
        return x2, shape, lcache, routing, gcache, counts, lc, sums

    # ------------------------------------------------------------------ forward
    def forward(self, x_local, train=True, noise=None):
        """Route this rank's tokens, exchange, run the local experts, exchange back, combine.

        Collective: every rank of ``comm`` must call it (with its own tokens).

        Args:
            x_local: (T_r, d) or (B, S, d) this rank's tokens.
            train: training mode adds router noise (if noisy).
            noise: optional explicit ε for this rank's tokens, (T_r, E) or (B, S, E).

        Returns:
            y_local, x_local's shape. Sets ``aux_loss`` and ``stats`` (global batch).
        """
        comm, P, r, E, k = self.comm, self.n_ranks, self.rank, self.n_experts, self.k
        # A failed forward leaves no cache to backward through; the last batch's is only set
        # aside until this one has its own (as in MoEBase._start_forward: memory, not state).
        self._released, self._cache = self._cache, None
        router = [self.params[n] for n in _ROUTER if n in self.params]
        header = {"options": {**self._options, "router_digest": _digest(router)}}
        try:
            local = self._route_local(x_local, train, noise)
            header.update(T=local[0].shape[0], counts=local[5], sums=local[7])
        except (ValueError, TypeError) as err:
            header["error"], local = f"{type(err).__name__}: {err}", None
        headers = comm.allgather(header)          # the counts travel first (one small message per rank)
        _check_agreement(headers)
        x2, shape, lcache, routing, gcache, _, lc, _ = local

        # --- the global batch, bitwise the same on every rank (sums in rank order)
        T_r, T = x2.shape[0], sum(hd["T"] for hd in headers)
        counts = np.stack([hd["counts"] for hd in headers])                  # (P, k, E)
        total = {name: sum(hd["sums"][name] for hd in headers) for name in headers[0]["sums"]}
        C = expert_capacity(T, E, k, self.capacity_factor)
        plan, kept_counts = global_plan(np.asarray(routing.idx), counts, r, C, E)
        per = self.experts_per_rank
        by_owner = kept_counts.sum(axis=1).reshape(P, P, per).sum(axis=2)     # [s, owner] rows
        send_rows, recv_rows = by_owner[r], by_owner[:, r]
        perm, offsets = _arrival_order(kept_counts, r, per)

        # --- the balancing losses of the global batch, from the global sums
        terms = {}
        if "importance" in lc:
            terms["importance"], cv = losses.cv_squared_forward(total["importance"].astype(self.dtype))
            lc["importance"] = lc["importance"]._replace(importance=total["importance"], cv=cv)
        if "load" in lc:
            terms["load"], cv = losses.cv_squared_forward(total["load"])
            lc["load"] = lc["load"]._replace(load=total["load"], cv=cv)
        if "first_choice" in lc:
            f, Pm = total["first"] / T, total["probs"] / T                  # Fedus et al. eq. 4-6
            terms["switch"] = float(E * np.dot(f, Pm))
            lc["switch"] = losses.SwitchCache(f, T_r, self.dtype)
        if "z" in lc:
            terms["z"] = float(total["z"] / T)
        self.aux_loss = float(sum(self.z_loss_coef * v if name == "z" else self.balance_coef * v
                                  for name, v in terms.items()))

        # --- transfer, treat, bring home, combine
        self._sent_bytes, self._exchange_seconds = 0, 0.0
        p = self.params
        xs, dcache = dispatch_forward(x2, plan)                    # rows grouped by owner
        xr = self._exchange(xs, send_rows, recv_rows)              # Alltoallv #1
        bank = fast_path.experts_forward if self.fast else experts_forward
        yg, ecache = bank(xr[perm], offsets, p["W1"], p["b1"], p["W2"], p["b2"], self.activation)
        yr = np.empty_like(yg)
        yr[perm] = yg                                              # back to arrival order
        ys = self._exchange(yr, recv_rows, send_rows)              # Alltoallv #2
        y, ccache = combine_forward(ys, routing.gates, plan)

        self.stats = {
            "load": kept_counts.sum(axis=(0, 1)),
            "requested": counts.sum(axis=(0, 1)),
            "importance": total["importance"],
            "dropped": int(T * k - kept_counts.sum()),
            "topk_idx": np.array(routing.idx),
            "topk_gates": routing.gates,
            "kept": plan.kept,
            "probs": routing.probs,
            "capacity": C,
            "losses": terms,
            "sent_bytes": self._sent_bytes,
            "exchange_seconds": self._exchange_seconds,
            "received_rows": int(recv_rows.sum()),
            "n_tokens_global": T,
        }
        self._cache, self._released = ParallelCache(shape, lcache, gcache, dcache, ecache, ccache, perm,
                                                    send_rows, recv_rows, lc, T), None
        return y.reshape(shape)

    def routing_signature(self):
        """This rank's discrete choices of the last forward (as ``MoELayer.routing_signature``);
        a gradient check under MPI gathers every rank's."""
        if self._cache is None:
            raise RuntimeError("call forward before routing_signature")
        lc = self._cache.aux
        sig = (self.stats["topk_idx"], self.stats["kept"])
        if "first_choice" in lc:
            sig += (lc["first_choice"],)
        if "load" in lc:
            sig += (lc["load"].ranked,)
        return sig

    # ------------------------------------------------------------------ backward
    def backward(self, dy_local):
        """Gradient of ``Σ_ranks ⟨dy, y⟩ + aux_loss``: returns dx_local and fills ``grads``
        (the router's summed over ranks, the local experts' own). Collective."""
        if self._cache is None:
            raise RuntimeError("call forward before backward")
        shape, lcache, gcache, dcache, ecache, ccache, perm, send_rows, recv_rows, lc, T = self._cache
        error = None
        try:
            check_array("dy", dy_local, shape=shape)
        except ValueError as err:
            error = f"ValueError: {err}"
        errors = self.comm.allgather(error)       # never leave the other ranks waiting in an exchange
        if any(errors):
            raise ValueError("; ".join(f"rank {s}: {m}" for s, m in enumerate(errors) if m))
        dy2 = dy_local.reshape(-1, self.d_model).astype(self.dtype, copy=False)
        wb, wz, T_r = self.balance_coef, self.z_loss_coef, dy2.shape[0]
        self._sent_bytes_fwd = self.stats["sent_bytes"]
        self._sent_bytes, self._exchange_seconds = 0, 0.0

        # The two exchanges of the forward, in the same direction and with the same counts:
        # dy travels to the experts as x did, dx comes home as y did.
        dys, dgates = _combine_backward(dy2, ccache)
        dyr = self._exchange(dys, send_rows, recv_rows)            # Alltoallv #1
        if self.fast:     # the expert gradients go straight into self.grads (see fast.py)
            dxg, _ = fast_path.experts_backward(dyr[perm], ecache, {n: self.grads[n] for n in _EXPERT})
        else:
            dxg, egrads = experts_backward(dyr[perm], ecache)
            self.grads.update(egrads)
        dxr = np.empty_like(dxg)
        dxr[perm] = dxg
        dxs = self._exchange(dxr, recv_rows, send_rows)            # Alltoallv #2
        dx, _ = dispatch_backward(dxs, dcache)

        # The router, as in MoELayer.backward; a loss over the global batch sends each
        # rank's tokens their share (the mean over T, not over T_r: hence the T_r/T).
        if "importance" in lc:
            dgates = dgates + losses.importance_loss_backward(wb, lc["importance"])[0]
        dprobs = losses.switch_loss_backward(wb * T_r / T, lc["switch"])[0] if "switch" in lc else None
        dH, _ = gate_backward(dgates, gcache, dprobs)
        d_clean = d_sigma = None
        if "load" in lc:
            d_clean, d_noisy, d_sigma = _load_loss_backward(wb, lc["load"])
            dH = dH + d_noisy
        if "z" in lc:
            dz = losses.z_loss_backward(wz * T_r / T, lc["z"])[0]
            d_clean = dz if d_clean is None else d_clean + dz
        dx_router, rgrads = router_logits_backward(dH, lcache, d_clean=d_clean, d_sigma=d_sigma)
        dx += dx_router

        # The replicated router's gradient is the sum over ranks: one Allreduce of both matrices.
        names = [n for n in _ROUTER if n in self.params]
        local = np.concatenate([rgrads[n].reshape(-1) for n in names])
        flat = np.empty_like(local)
        self.comm.Allreduce(local, flat)
        at = 0
        for n in names:
            size = self.params[n].size
            self.grads[n] = flat[at:at + size].reshape(self.params[n].shape)
            at += size
        self.stats["sent_bytes"] = self._sent_bytes_fwd + self._sent_bytes
        self.stats["exchange_seconds"] += self._exchange_seconds
        return dx.reshape(shape)

    def __repr__(self):
        return (f"ExpertParallelMoELayer(d_model={self.d_model}, d_hidden={self.d_hidden}, "
                f"n_experts={self.n_experts}, k={self.k}, gate={self.gate!r}, ranks={self.n_ranks}, "
                f"rank={self.rank}, experts={self.expert_ids.start}..{self.expert_ids.stop - 1}, "
                f"capacity_factor={self.capacity_factor}, dtype={np.dtype(self.dtype).name})")


# --------------------------------------------------------------------------- P ranks in one process
class LocalComm:
    """A stand-in for an mpi4py communicator: P threads of one process play the P ranks.

    It has just what :class:`ExpertParallelMoELayer` uses — ``Get_size``, ``Get_rank``,
    ``allgather``, ``Alltoallv`` and ``Allreduce`` (sum) — with MPI's semantics, so the
    very same layer code runs without MPI (lesson 11's fallback, and fast tests). Build
    the P communicators with :func:`run_ranks`, not by hand.
    """

    def __init__(self, rank, shared):
        self._rank, self._shared = rank, shared

    def Get_size(self):
        return self._shared["size"]

    def Get_rank(self):
        return self._rank

    def _swap(self, item):
        """Post ``item``, wait for every rank, return everyone's items (a list in rank order)."""
        slots, barrier = self._shared["slots"], self._shared["barrier"]
        slots[self._rank] = item
        barrier.wait()
        items = list(slots)
        barrier.wait()           # nobody overwrites a slot before everyone has read it
        return items

    def allgather(self, obj):
        return self._swap(obj)

    def Alltoallv(self, send, recv):
        (sbuf, (sc, sd)), (rbuf, (rc, rd)) = send, recv
        posted = self._swap((np.asarray(sbuf).reshape(-1), np.asarray(sc), np.asarray(sd)))
        out, r = rbuf.reshape(-1), self._rank
        for s, (buf, counts, displs) in enumerate(posted):
            out[rd[s]:rd[s] + rc[s]] = buf[displs[r]:displs[r] + counts[r]]

    def Allreduce(self, send, recv):
        recv[...] = sum(self._swap(np.array(send, copy=True)))   # in rank order, like the header sums


def run_ranks(n_ranks, fn, timeout=60.0):
    """Run ``fn(comm)`` on ``n_ranks`` simulated ranks (threads) and return their results in rank order.

    If a rank raises, the others are released (the barrier is broken, never a hang) and the
    first error is raised here.
    """
    shared = {"size": n_ranks, "slots": [None] * n_ranks, "barrier": threading.Barrier(n_ranks, timeout=timeout)}
    results, errors = [None] * n_ranks, [None] * n_ranks

    def work(r):
        try:
            results[r] = fn(LocalComm(r, shared))
        except BaseException as err:   # noqa: BLE001 - handed to the caller below
            errors[r] = err
            shared["barrier"].abort()

    threads = [threading.Thread(target=work, args=(r,), daemon=True) for r in range(n_ranks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    first = next((e for e in errors if e is not None and not isinstance(e, threading.BrokenBarrierError)),
                 next((e for e in errors if e is not None), None))
    if first is not None:
        raise first
    return results
