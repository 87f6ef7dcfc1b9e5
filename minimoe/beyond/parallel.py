"""A network of clinics: expert parallelism over MPI, the all-to-all by hand.

One machine cannot hold every specialist of a large MoE, so the experts are spread over P
processes (MPI *ranks*): rank r keeps experts ``r·E/P … (r+1)·E/P − 1`` and its own share of
the patients (tokens); the GP (the router) is replicated. All referrals to other clinics
travel together in one shuttle run, the **all-to-all** (GShard, Lepikhin et al. 2020 §3.2;
Switch, Fedus et al. 2021 §2.2). The layer is ``core/moe.py``'s pair with :class:`ExpertTeam`
in place of ``OneProcess``, for the three steps that change:

    reduce_sums     one allgather of every rank's balancing sums and (k, E) choice counts,
                    added in rank order (per sequence: concatenated): the losses are those
                    of the whole batch, and the ranks exchange sums, never tokens
    trip_forward    plan in the global drop order (global_plan) ─► Alltoallv #1: each kept
                    (token, expert) row travels to its expert's owner ─► the owner groups the
                    arrivals (_arrival_order), runs its E/P experts ─► Alltoallv #2: home ─► combine
    trip_backward   the same two exchanges with the same counts, in reverse (an all-to-all
                    permutes rows; a permutation's transpose is its inverse); then one
                    Allreduce sums the replicated router's gradients

**One global batch.** The ranks' tokens, rank 0's first, are the batch one ``MoELayer`` would
see, and this layer computes what it computes, for every option (1e-12 under ``mpiexec -n 2``
and ``-n 4``). Capacity and drop priority are global, ``C = ceil(cf · T_global · k / E)``, first
choices before second choices, then rank 0's tokens first: from the count table each rank
knows which of its assignments keep a bed, so a dropped one never travels.

**Nothing waits forever.** Every collective is preceded by a meeting of the ranks
(:class:`~minimoe.beyond.ranks.Call`): a rank that fails, with any exception, brings its error
there, and every rank raises it, naming the rank and the cause. The meetings also check that
the ranks agree on the options, ``train`` and the router's weights. Run scripts as
``mpiexec -n P python -m mpi4py train.py``: an exception that no rank catches (outside the
layer, or a KeyboardInterrupt, which the layer lets through) then aborts every rank.

Shapes: T_r tokens on this rank, T = Σ_r T_r, d width, E experts, E_r = E/P per rank, k per token.
"""
from __future__ import annotations

import copy
import hashlib
import itertools
import time
from typing import NamedTuple

import numpy as np

from ..core.dispatch import (DispatchPlan, combine_backward, combine_forward, dispatch_backward,
                             dispatch_forward, expert_capacity)
from ..core.experts import GLU_KEYS, experts_backward, experts_forward
from ..core.fast import FastBankCache, experts_backward_fast, experts_forward_fast
from ..core.balance import BalanceSums
from ..core.moe import MoEBase, MoELayer, RoutingCounts, check_params, moe_backward, moe_forward, routing_stats
from ..validate import check_rng
from .ranks import Call, LocalComm, RankSkipped, run_ranks   # noqa: F401  (LocalComm, run_ranks: re-exported)

__all__ = ["ExpertParallelMoELayer", "ExpertTeam", "global_plan", "LocalComm", "run_ranks", "RankSkipped",
           "MPI_HELP"]

MPI_HELP = ("expert parallelism needs mpi4py and an MPI library: pip install mpi4py mpich "
            "(or pip install -e '.[mpi]'), then run with mpiexec -n P python -m mpi4py ...")
ROUTER = ("W_gate", "W_noise")        # replicated on every rank; the other parameters are sliced
_SERIALS = itertools.count()          # a serial number for every team of this process


def _world():
    try:
        from mpi4py import MPI
    except ImportError as err:            # pragma: no cover - depends on the machine
        raise ImportError(MPI_HELP) from err
    return MPI.COMM_WORLD


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


# --------------------------------------------------------------------------- the team
HINT = "; build every rank's layer from the same seed or with from_layer, and call it with the same train="
BACKWARD_OF = "forwards (did a forward fail after its last exchange on some ranks only?)"


def _digest(params):
    """A fingerprint of the replicated router's weights (d·E numbers each)."""
    return hashlib.blake2b(b"".join(params[n].tobytes() for n in ROUTER if n in params), digest_size=16).hexdigest()


class ExpertTeam:
    """``core.moe.OneProcess``'s methods over MPI, for one forward and the backwards through it;
    ``call`` (a :class:`~minimoe.beyond.ranks.Call`): the current call's meetings."""

    def __init__(self, comm, cfg, params, train):
        self.comm, self.P, self.rank = comm, comm.Get_size(), comm.Get_rank()
        self.cfg, self.params, self.train, self.serial = cfg, params, train, next(_SERIALS)
        self.forward_id = None            # every rank's serial, once the forward's first meeting is done
        self.begin("forward")

    def begin(self, kind):
        """A new call: its meetings, no bytes sent yet. Returns the call."""
        self.sent_bytes, self.seconds = 0, 0.0
        self.call = Call(self.comm, kind, None if kind == "forward" else (self.forward_id, BACKWARD_OF), HINT)
        return self.call

    def _exchange(self, send, send_rows, recv_rows, last=False):
        """One ``Alltoallv``: ``send_rows[s]`` rows go to rank s, ``recv_rows[s]`` come from it."""
        d = send.shape[1]
        recv = np.empty((int(recv_rows.sum()), d), dtype=send.dtype)
        sc, rc = send_rows * d, recv_rows * d
        buffers = ([np.ascontiguousarray(send), (sc, np.cumsum(sc) - sc)], [recv, (rc, np.cumsum(rc) - rc)])
        t0 = time.perf_counter()
        self.call.meet()
        self.comm.Alltoallv(*buffers)
        self.call.open = not last
        self.seconds += time.perf_counter() - t0
        self.sent_bytes += int((send_rows.sum() - send_rows[self.rank]) * d * send.itemsize)
        return recv

    def experts_here(self, cfg):
        """This rank's E/P experts."""
        return cfg.n_experts // self.P

    def reduce_sums(self, sums, idx):
        """The first meeting: every rank's sums and (k, E) choice counts, added in rank order
        ("batch": one group) or concatenated ("sequence": every rank's sequences, rank 0's first)."""
        E, k = sums.gate_mass.shape[1], idx.shape[1]
        chosen = np.bincount((np.arange(k) * E + idx).reshape(-1), minlength=k * E).reshape(k, E)
        agree = {**self.cfg.options(), "train": bool(self.train), "the router weights": _digest(self.params)}
        everyone = self.call.meet(agree, (sums, chosen, self.serial))
        parts, counts, self.forward_id = zip(*(data for _, _, data in everyone))
        self.chosen = np.stack(counts)                                    # (P, k, E) every rank's choices
        sequence, groups = self.cfg.balance_groups == "sequence", np.cumsum([0] + [len(p.tokens) for p in parts])
        self.rows = slice(groups[self.rank], groups[self.rank + 1]) if sequence else slice(None)   # this rank's groups
        join = np.concatenate if sequence else (lambda f: np.sum(f, axis=0))   # every rank's groups, or one group
        return BalanceSums(*(None if f[0] is None else join(f) for f in zip(*parts)))

    def local_dsums(self, dsums):
        """This rank's part of ∂aux/∂sums: the rows of the groups its tokens are in."""
        return BalanceSums(*(None if f is None else f[self.rows] for f in dsums))

    def trip_forward(self, x, idx, gates, params, cfg):
        """Plan, Alltoallv out, the local experts, Alltoallv home, combine. -> (y (T_r,d), cache)"""
        P, r, per, E = self.P, self.rank, self.experts_here(cfg), cfg.n_experts
        C = expert_capacity(int(self.chosen[:, 0].sum()), E, cfg.k, cfg.capacity_factor)   # T_global
        plan, kept = global_plan(idx, self.chosen, r, C, E)
        rows = kept.sum(axis=1).reshape(P, P, per).sum(axis=2)         # rows[s, owner]
        send, recv = rows[r], rows[:, r]
        perm, offsets = _arrival_order(kept, r, per)
        xs, gather = dispatch_forward(x, plan)                          # rows grouped by owner
        xr = self._exchange(xs, send, recv)                             # Alltoallv #1
        bank = experts_forward_fast if cfg.fast else experts_forward
        yg, bank_cache = bank(xr[perm], offsets, params["W1"], params["b1"], params["W2"], params["b2"],
                              cfg.activation, **{n: params[n] for n in GLU_KEYS if n in params})
        yr = np.empty_like(yg)
        yr[perm] = yg                                                   # back to arrival order
        ys = self._exchange(yr, recv, send, last=True)                  # Alltoallv #2
        y, combine = combine_forward(ys, gates, plan)
        return y, ParallelTrip(plan, kept, self.chosen.sum(axis=(0, 1)), perm, send, recv, gather, bank_cache,
                               combine)

    def trip_backward(self, dy, trip):
        """dy travels to the experts as x did, dx comes home as y did. -> (dx, dgates, expert grads)"""
        dys, dgates, _ = combine_backward(dy, trip.combine)
        dyr = self._exchange(dys, trip.send, trip.recv)                 # Alltoallv #1
        back = experts_backward_fast if isinstance(trip.bank, FastBankCache) else experts_backward
        dxg, grads = back(dyr[trip.perm], trip.bank)
        dxr = np.empty_like(dxg)
        dxr[trip.perm] = dxg
        dxs = self._exchange(dxr, trip.recv, trip.send)                 # Alltoallv #2
        return dispatch_backward(dxs, trip.gather)[0], dgates, grads

    def reduce_router_grads(self, grads):
        """The replicated router's gradient is the sum over ranks: one Allreduce of both matrices."""
        names = [n for n in ROUTER if n in grads]
        local = np.concatenate([grads[n].reshape(-1) for n in names])
        total = np.empty_like(local)
        self.call.meet()
        self.comm.Allreduce(local, total)
        self.call.open = False                                          # the call's last collective
        ends = np.cumsum([grads[n].size for n in names])
        return {n: t.reshape(grads[n].shape) for n, t in zip(names, np.split(total, ends[:-1]))}

    def counts(self, trip, idx):
        """The global load, requested, dropped and capacity; this rank's kept mask."""
        load, requested = trip.kept.sum(axis=(0, 1)), trip.requested
        return RoutingCounts(load, requested, trip.plan.kept, int(requested.sum() - load.sum()), trip.plan.capacity)


class ParallelTrip(NamedTuple):
    """What the backward of one expert-parallel trip needs."""
    plan: DispatchPlan      # this rank's tokens, in the global drop order
    kept: np.ndarray        # (P, k, E) kept assignments of every rank
    requested: np.ndarray   # (E,) global, before capacity
    perm: np.ndarray        # arrival order -> grouped by local expert
    send: np.ndarray        # (P,) rows sent to each rank
    recv: np.ndarray        # (P,) rows received from each rank
    gather: tuple           # dispatch_forward's cache
    bank: tuple             # the local experts' cache (fast.py's or experts.py's)
    combine: tuple          # combine_forward's cache


# --------------------------------------------------------------------------- the layer
class ExpertParallelMoELayer(MoEBase):
    """``MoELayer`` with its E experts spread over the P ranks of an MPI communicator.

    Run one copy of the program per rank (``mpiexec -n P python -m mpi4py train.py``); each
    rank passes its own tokens, and together they compute what ``MoELayer`` computes on the
    concatenated batch (rank 0's tokens first), for every option of ``MoELayer``::

        layer = MoELayer(16, 64, n_experts=8, k=2, rng=np.random.default_rng(0))   # same seed everywhere
        par = ExpertParallelMoELayer.from_layer(layer)           # rank r keeps 4 experts
        y = par.forward(x_local)                                 # x_local: this rank's tokens
        dx = par.backward(dy_local)                              # par.grads: router (summed) + own experts

    Args:
        the arguments of :class:`~minimoe.core.moe.MoELayer` (pass the same ``rng`` seed on
        every rank, so that every rank draws the same weights), and
        comm: an mpi4py communicator (default ``MPI.COMM_WORLD``); E must be divisible by its size.
        noise_rng: this rank's generator for training noise (default: drawn from ``rng`` and the rank).

    With ``balance_groups="sequence"`` each rank passes whole sequences, (B_r, S, d). Every
    method is *collective* (every rank calls it, in the same order); an error on one rank is
    raised on every rank, and a call that raises leaves the layer as it was.

    Attributes: ``cfg``, ``params``, ``grads``, ``aux_loss``, ``stats`` as ``MoELayer``'s, except
    that params and grads hold this rank's experts (``W1 (E_r,d,h)``, ...; the router's
    gradients are summed over ranks) and stats' "topk_idx", "topk_gates", "kept", "probs"
    describe this rank's tokens (the rest, the global batch). stats also has "sent_bytes"
    (sent to other ranks in the last forward and backward), "exchange_seconds" (in their four
    Alltoallv and the meetings before them, waiting included), "received_rows" (assignments
    this rank's experts ran) and "n_tokens_global" (T). ``expert_ids``: this rank's experts.
    """

    routing_signature = MoELayer.routing_signature

    def __init__(self, *args, comm=None, noise_rng=None, **options):
        try:
            layer, error = MoELayer(*args, **options), None
        except Exception as err:           # noqa: BLE001 - every rank must hear of it (see _adopt)
            layer, error = None, err
        self._adopt(layer, comm, noise_rng, error)

    @classmethod
    def from_layer(cls, layer, comm=None, noise_rng=None):
        """The expert-parallel twin of a ``MoELayer`` (its options, its router copied, its experts
        sliced). Every rank must pass an identical layer."""
        self = cls.__new__(cls)
        self._adopt(layer, comm, noise_rng, None if isinstance(layer, MoELayer) else
                    TypeError(f"layer must be a MoELayer, got {type(layer).__name__}"))
        return self

    def _adopt(self, layer, comm, noise_rng, error):
        """Keep ``layer``'s options, router and this rank's experts; one meeting checks that every
        rank built the same layer. (Every call's first line may not fail: see ranks.Call.fail.)"""
        comm, call = _world() if comm is None else comm, None
        try:
            call = Call(comm, "the constructor", hint=HINT)
            if error is not None:
                raise error
            cfg, P, r = layer.cfg, comm.Get_size(), comm.Get_rank()
            per, rest = divmod(cfg.n_experts, P)
            if rest:
                raise ValueError(f"n_experts={cfg.n_experts} must be divisible by the number of ranks P={P} "
                                 "(each rank owns E/P experts)")
            extra = sorted(set(layer.params) - set(cfg.param_shapes()))
            if extra:      # a parameter this layer would neither copy nor slice: refuse, never drop it
                raise ValueError(f"layer.params has {', '.join(extra)}, which a MoELayer with these options does "
                                 f"not use (it needs {', '.join(cfg.param_shapes())})")
            params = {n: p.copy() if n in ROUTER else p[r * per:(r + 1) * per].copy()
                      for n, p in check_params(layer.params, cfg).items()}
            seed = [int(copy.deepcopy(layer.rng).integers(2**63)), r]     # a copy: the layer's rng stays as it was
            rng = check_rng("noise_rng", np.random.default_rng(seed) if noise_rng is None else noise_rng)
        except Exception as err:           # noqa: BLE001 - to the meeting, then raised on every rank
            (Call(comm, "the constructor") if call is None else call).fail(err)
        call.meet({**cfg.options(), "the router weights": _digest(params)})
        self.cfg, self.rng, self.params = cfg, rng, params
        self.grads = {name: np.zeros_like(p) for name, p in params.items()}
        self.aux_loss, self.stats, self._cache = 0.0, {}, None
        self.comm, self.n_ranks, self.rank, self.experts_per_rank = comm, P, r, per
        self.expert_ids = range(r * per, (r + 1) * per)

    def forward(self, x_local, train=True, noise=None):
        """Route this rank's tokens, exchange, run the local experts, exchange back, combine:
        :func:`~minimoe.core.moe.moe_forward` with an :class:`ExpertTeam`. ``x_local``: (T_r, d) or
        (B_r, S, d), this rank's tokens; ``train``: True or False, the same on every rank; ``noise``:
        optional ε for this rank's tokens, (T_r, E) or (B_r, S, E). Returns y_local (x_local's
        shape); sets ``aux_loss`` and ``stats``."""
        team = None
        try:
            team = ExpertTeam(self.comm, self.cfg, self.params, train)
            y, aux_loss, cache = moe_forward(x_local, self.params, self.cfg, train=train, noise=noise, rng=self.rng,
                                             team=team)
            stats = {**routing_stats(cache), "sent_bytes": team.sent_bytes, "exchange_seconds": team.seconds,
                     "received_rows": int(cache.trip.recv.sum()), "n_tokens_global": int(team.chosen[:, 0].sum())}
            team.forward_traffic = (team.sent_bytes, team.seconds)
        except Exception as err:           # noqa: BLE001 - every rank must hear of it
            (Call(self.comm, "forward") if team is None else team.call).fail(err)
        self._finish_forward(cache, stats, aux_loss)
        return y

    def backward(self, dy_local):
        """Gradient of ``Σ_ranks ⟨dy, y⟩ + aux_loss`` (:func:`~minimoe.core.moe.moe_backward`):
        returns dx_local; puts fresh arrays in ``grads`` (the router's summed over ranks)."""
        cache, call = self._cache, None
        try:
            if cache is None:
                raise RuntimeError("call forward before backward")
            call = cache.team.begin("backward")      # this call's meetings (the forward's plan stays)
            dx, grads = moe_backward(dy_local, cache)
        except Exception as err:           # noqa: BLE001 - every rank must hear of it
            (Call(self.comm, "backward") if call is None else call).fail(err)
        self._store_grads(grads)
        sent, seconds = cache.team.forward_traffic
        self.stats.update(sent_bytes=sent + cache.team.sent_bytes, exchange_seconds=seconds + cache.team.seconds)
        return dx

    def __repr__(self):
        return (f"{super().__repr__()[:-1]}, ranks={self.n_ranks}, rank={self.rank}, "
                f"experts={self.expert_ids.start}..{self.expert_ids.stop - 1})")
