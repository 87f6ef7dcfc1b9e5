"""A network of clinics: expert parallelism over MPI, the all-to-all by hand.

One machine cannot hold every specialist of a large MoE, so the experts are spread
over P processes (MPI *ranks*, one per core, GPU or machine): rank r keeps experts
``r·E/P … (r+1)·E/P − 1`` and its own share of the patients (tokens). The GP (the
router) is replicated: every clinic refers its own patients. A referral to a
specialist in another clinic becomes a *transfer*, and all transfers of a step
travel together in one shuttle run, the **all-to-all** (GShard, Lepikhin et al.
2020 §3.2; Switch, Fedus et al. 2021 §2.2 and fig. 3).

The layer is the single-process pair of ``core/moe.py``, ``moe_forward``/``moe_backward``,
run with a team of its own, :class:`ExpertTeam`, in place of ``OneProcess``. The team does
the three things that change when the experts are spread out:

    reduce_sums     one allgather: every rank's balancing sums and (k, E) choice counts;
                    added (or, per sequence, concatenated) in rank order, so the losses
                    are exactly those of the whole batch
    trip_forward    plan in the global drop order (global_plan) ─► Alltoallv #1: each
                    (token, expert) row travels to its expert's owner ─► the owner groups
                    the arrivals (_arrival_order) and runs its E/P experts ─► Alltoallv #2:
                    each result travels home ─► combine
    trip_backward   the same two exchanges with the same counts, in reverse (an all-to-all
                    is a permutation of rows, and the transpose of a permutation is its
                    inverse); then one Allreduce sums the replicated router's gradients

**One global batch.** Every rank's tokens together form the batch the single-process
``MoELayer`` would see (rank 0's tokens first, then rank 1's, ...), and this layer
computes exactly what ``MoELayer`` computes on it, for every option (a test checks 1e-12
at 2 and 4 ranks). The capacity is global, ``C = ceil(cf · T_global · k / E)``, and so is
the drop priority: an expert's queue holds all first choices before all second choices,
and within a choice rank rank 0's tokens, then rank 1's. From the count table every rank
works out which of its own assignments keep their bed, so a dropped one never travels.

**Nothing waits forever.** A rank that fails (bad input, an overflow, a NaN weight, any
exception) must not leave the others waiting in a collective. So every collective of a
call is preceded by a small *meeting*, an allgather of each rank's status; a rank that
fails takes part in exactly one meeting, carrying its error, and there every rank learns of
it and raises the same error, naming the rank and the cause::

    ValueError: rank 1 failed: ValueError: dy must have shape (15, 6), got (4, 6)

The meetings also check that the ranks agree on the options, on ``train`` and on the
router's weights, and are in the same call. After the last collective of a call a local
failure is raised on its rank alone. Run scripts as ``mpiexec -n P python -m mpi4py
train.py``: then an exception outside the layer that no rank catches aborts every rank
instead of leaving the others waiting.

Shapes: T_r tokens on this rank, T = Σ_r T_r the global batch, d width, h hidden,
E experts, E_r = E/P experts per rank, k per token. mpi4py is imported lazily.
"""
from __future__ import annotations

import builtins
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
from ..core.moe import MoEBase, MoELayer, RoutingCounts, check_params, moe_backward, moe_forward, routing_stats
from ..core.balance import BalanceSums
from ..validate import check_rng
from .ranks import LocalComm, RankSkipped, run_ranks

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


# --------------------------------------------------------------------------- the meetings
def _digest(params):
    """A fingerprint of the replicated router's weights (d·E numbers each)."""
    h = hashlib.blake2b(digest_size=16)
    for name in ROUTER:
        if name in params:
            h.update(np.ascontiguousarray(params[name]).view(np.uint8).data)
    return h.hexdigest()




def _ranks_error(everyone):
    """The one error every rank raises after a meeting that went wrong (built from what all ranks saw)."""
    failed = {}
    for r, (_, error, _) in enumerate(everyone):
        if error is not None:
            failed.setdefault(error, []).append(str(r))
    if failed:
        message = "; ".join(f"rank{'s' * (len(rs) > 1)} {', '.join(rs)} failed: {name}: {text}"
                            for (name, text), rs in failed.items())
        kind = getattr(builtins, next(iter(failed))[0], None) if len({n for n, _ in failed}) == 1 else None
        if isinstance(kind, type) and issubclass(kind, Exception):      # the original type, where sensible
            try:
                return kind(message)
            except Exception:          # noqa: BLE001 - a type that wants other arguments
                pass
        return RuntimeError(message)
    (tag0, agree0) = everyone[0][0]
    r, (tag, agree) = next((r, e[0]) for r, e in enumerate(everyone) if e[0] != everyone[0][0])
    if tag[0] != tag0[0] or tag[2] != tag0[2]:
        return RuntimeError(f"the ranks are not in the same call: rank 0 is in {tag0[0]} (meeting {tag0[2]}), rank "
                            f"{r} in {tag[0]} (meeting {tag[2]}); every rank must call the same methods in the same order")
    if tag != tag0:
        return RuntimeError(f"the ranks are not in the same call: rank 0 and rank {r} are in backward through "
                            "different forwards (did a forward fail after its last exchange on some ranks only?)")
    name = next(n for n in agree0 if agree0[n] != agree.get(n))
    what = ("the router weights differ" if name == "router" else
            f"{name} differs: rank 0 has {agree0[name]!r}, rank {r} has {agree.get(name)!r}")
    return ValueError(f"the ranks must run the same layer, but {what} (rank 0 vs rank {r}); build every rank's "
                      "layer from the same seed or with from_layer, and call it with the same train=")


class ExpertTeam:
    """The team of P ranks for one forward (and the backwards through it): ``core.moe.OneProcess``'s
    methods over an MPI communicator, and the meetings that keep the ranks in step.

    ``begin(kind)`` starts a call; ``fail(err)`` ends it on a rank that failed.
    """

    def __init__(self, comm, cfg=None, params=None, train=None):
        self.comm, self.P, self.rank = comm, comm.Get_size(), comm.Get_rank()
        self.cfg, self.params, self.train, self.serial = cfg, params, train, next(_SERIALS)
        self.forward_id = None            # every rank's serial, once the forward's first meeting is done
        self.begin("forward" if cfg is not None else "build")

    def begin(self, kind):
        """A new call: no meeting yet, one still owed, no bytes sent."""
        self.kind, self.meetings, self.open, self.sent_bytes, self.seconds = kind, 0, True, 0, 0.0

    def _meet(self, agree=None, data=None, error=None):
        """Every rank's (tag, agree, error, data), after checking that nobody failed and all agree."""
        self.meetings += 1
        mine = ((self.kind, self.forward_id, self.meetings), agree)
        everyone = self.comm.allgather((mine, error, data))
        ok = True
        for theirs, err, _ in everyone:   # no call here: nothing may fail between a meeting and its collective
            ok = ok and err is None and theirs == everyone[0][0]
        if not ok:
            self.open = False             # every rank saw the same: nobody meets again in this call
            raise _ranks_error(everyone)
        return everyone

    def fail(self, err):
        """This rank failed: if the call still owes a meeting, bring the error to it, where every
        rank learns of it and raises; else (after the last collective) raise it here alone."""
        if not self.open:
            raise err
        try:
            self._meet(error=(type(err).__name__, str(err)))
        except Exception as everyone:     # noqa: BLE001 - the ranks' error, always raised here
            raise everyone from err

    def _exchange(self, send, send_rows, recv_rows, last=False):
        """One ``Alltoallv`` of rows: ``send_rows[s]`` rows (grouped by destination) go to
        rank s, ``recv_rows[s]`` rows arrive from rank s, in rank order."""
        d = send.shape[1]
        recv = np.empty((int(recv_rows.sum()), d), dtype=send.dtype)
        sc, rc = send_rows * d, recv_rows * d
        buffers = ([np.ascontiguousarray(send), (sc, np.cumsum(sc) - sc)], [recv, (rc, np.cumsum(rc) - rc)])
        t0 = time.perf_counter()
        self._meet()
        self.comm.Alltoallv(*buffers)
        self.open = not last
        self.seconds += time.perf_counter() - t0
        self.sent_bytes += int((send_rows.sum() - send_rows[self.rank]) * d * send.itemsize)
        return recv

    # ------------------------------------------------------------------ OneProcess's methods
    def experts_here(self, cfg):
        """This rank's E/P experts."""
        return cfg.n_experts // self.P

    def reduce_sums(self, sums, idx):
        """The first meeting: every rank's sums and (k, E) choice counts, added in rank order
        ("batch": one group) or concatenated ("sequence": every rank's sequences, rank 0's first)."""
        E, k = sums.gate_mass.shape[1], idx.shape[1]
        chosen = np.bincount((np.arange(k) * E + idx).reshape(-1), minlength=k * E).reshape(k, E)
        agree = {**self.cfg.options(), "train": bool(self.train), "router": _digest(self.params)}
        parts, counts, serials = zip(*(data for _, _, data in self._meet(agree, (sums, chosen, self.serial))))
        self.forward_id = serials          # names this forward on every rank: its backward's meetings compare it
        self.chosen = np.stack(counts)                                    # (P, k, E) every rank's choices
        groups = np.cumsum([0] + [len(p.tokens) for p in parts])
        self.rows = slice(groups[self.rank], groups[self.rank + 1])      # this rank's groups
        join = np.concatenate if self.cfg.balance_groups == "sequence" else lambda f: np.sum(f, axis=0)
        return BalanceSums(*(None if f[0] is None else join(f) for f in zip(*parts)))

    def local_dsums(self, dsums):
        """This rank's part of ∂aux/∂sums: all of it ("batch"), or its own groups' rows."""
        if self.cfg.balance_groups != "sequence":
            return dsums
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
        self._meet()
        self.comm.Allreduce(local, total)
        self.open = False                                               # the call's last collective
        ends = np.cumsum([grads[n].size for n in names])
        return {n: t.reshape(grads[n].shape) for n, t in zip(names, np.split(total, ends[:-1]))}

    def counts(self, trip, idx):
        """The global load, requested, dropped and capacity; this rank's kept mask."""
        load = trip.kept.sum(axis=(0, 1))
        return RoutingCounts(load, trip.requested, trip.plan.kept, int(trip.requested.sum() - load.sum()),
                             trip.plan.capacity)


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
    rank passes its own tokens. Together the ranks compute exactly what ``MoELayer`` computes
    on the concatenated batch (rank 0's tokens first), for every option of ``MoELayer``.

    Example (under ``mpiexec -n 2``)::

        layer = MoELayer(16, 64, n_experts=8, k=2, rng=np.random.default_rng(0))   # same seed everywhere
        par = ExpertParallelMoELayer.from_layer(layer)           # rank r keeps 4 experts
        y = par.forward(x_local)                                 # x_local: this rank's tokens
        dx = par.backward(dy_local)                              # par.grads: router (summed) + own experts

    Args:
        the arguments of :class:`~minimoe.core.moe.MoELayer` (its options, and ``rng``, which
        must give every rank the same weights: pass the same seed), and
        comm: an mpi4py communicator (default ``MPI.COMM_WORLD``); E must be divisible by its size.
        noise_rng: this rank's generator for training noise (default: one drawn from ``rng``
            and the rank, so ranks never share noise).

    With ``balance_groups="sequence"`` each rank passes whole sequences, (B_r, S, d): a
    sequence never spans ranks, and the groups are every rank's sequences, rank 0's first.

    Every method is *collective*: every rank must call it, in the same order. Errors are
    raised on every rank (see the module's docstring), and a call that raises leaves params,
    grads, stats, aux_loss and the cache as they were.

    Attributes:
        cfg: the options (a :class:`~minimoe.core.config.MoEConfig`, the same on every rank).
        params / grads: ``W_gate (d,E)``, ``W_noise (d,E)`` (if noisy), and the local experts'
            ``W1 (E_r,d,h)``, ``b1 (E_r,h)``, ``W2 (E_r,h,d)``, ``b2 (E_r,d)`` (SwiGLU: ``W3``,
            ``b3``); each backward puts fresh arrays in ``grads``.
        expert_ids: ``range`` of the experts this rank owns.
        aux_loss: float, the global batch's weighted balancing + z losses (the same on every rank).
        stats: like ``MoELayer.stats``: "load", "requested", "importance", "dropped",
            "capacity", "losses" describe the global batch; "topk_idx", "topk_gates",
            "kept", "probs" this rank's tokens; plus "sent_bytes" (bytes this rank sent to
            other ranks in the last forward and backward), "exchange_seconds" (time in
            their four Alltoallv and the meetings before them, waiting included),
            "received_rows" (assignments its experts ran), "n_tokens_global" (T).
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
        """The expert-parallel twin of a single-process ``MoELayer`` (its options, its router
        copied, its experts sliced). Every rank must pass an identical layer."""
        self = cls.__new__(cls)
        error = None if isinstance(layer, MoELayer) else TypeError(f"layer must be a MoELayer, got "
                                                                    f"{type(layer).__name__}")
        self._adopt(layer, comm, noise_rng, error)
        return self

    def _adopt(self, layer, comm, noise_rng, error=None):
        """Keep ``layer``'s options, router and this rank's experts; one meeting checks that
        every rank built the same layer (and passes on any rank's error)."""
        comm, team = _world() if comm is None else comm, None
        try:
            team = ExpertTeam(comm)
            if error is not None:
                raise error
            cfg, P, r = layer.cfg, team.P, team.rank
            if cfg.n_experts % P:
                raise ValueError(f"n_experts={cfg.n_experts} must be divisible by the number of ranks P={P} "
                                 "(each rank owns E/P experts)")
            extra = sorted(set(layer.params) - set(cfg.param_shapes()))
            if extra:      # a parameter this layer would neither copy nor slice: refuse, never drop it
                raise ValueError(f"layer.params has {', '.join(extra)}, which a MoELayer with these options does "
                                 f"not use (it needs {', '.join(cfg.param_shapes())})")
            check_params(layer.params, cfg)
            per = cfg.n_experts // P
            params = {n: p.copy() if n in ROUTER else p[r * per:(r + 1) * per].copy() for n, p in layer.params.items()}
            # Drawn from a copy, so the single-process layer's generator stays as it was.
            seed = [int(copy.deepcopy(layer.rng).integers(2**63)), r]
            rng = check_rng("noise_rng", np.random.default_rng(seed) if noise_rng is None else noise_rng)
        except Exception as err:           # noqa: BLE001 - to the meeting, then raised on every rank
            (ExpertTeam(comm) if team is None else team).fail(err)
        team._meet({**cfg.options(), "router": _digest(params)})
        self.cfg, self.rng, self.params = cfg, rng, params
        self.grads = {name: np.zeros_like(p) for name, p in params.items()}
        self.aux_loss, self.stats, self._cache = 0.0, {}, None
        self.comm, self.n_ranks, self.rank, self.experts_per_rank = comm, P, r, per
        self.expert_ids = range(r * per, (r + 1) * per)

    def forward(self, x_local, train=True, noise=None):
        """Route this rank's tokens, exchange, run the local experts, exchange back, combine.

        Args:
            x_local: (T_r, d) or (B_r, S, d) this rank's tokens.
            train: True or False, the same on every rank; training adds router noise (if noisy).
            noise: optional explicit ε for this rank's tokens, (T_r, E) or (B_r, S, E).

        Returns:
            y_local, x_local's shape. Sets ``aux_loss`` and ``stats`` (global batch).
        """
        team = None                        # (the first line may not fail: see fail)
        try:
            team = ExpertTeam(self.comm, self.cfg, self.params, train)
            y, aux_loss, cache = moe_forward(x_local, self.params, self.cfg, train=train, noise=noise, rng=self.rng,
                                             team=team)
            stats = {**routing_stats(cache), "sent_bytes": team.sent_bytes, "exchange_seconds": team.seconds,
                     "received_rows": int(cache.trip.recv.sum()), "n_tokens_global": int(cache.loss.sums.tokens.sum())}
            team.forward_traffic = (team.sent_bytes, team.seconds)
        except Exception as err:           # noqa: BLE001 - every rank must hear of it
            (ExpertTeam(self.comm) if team is None else team).fail(err)
        self._finish_forward(cache, stats, aux_loss)
        return y

    def backward(self, dy_local):
        """Gradient of ``Σ_ranks ⟨dy, y⟩ + aux_loss``: returns dx_local and puts fresh arrays in
        ``grads`` (the router's summed over ranks, the local experts' own)."""
        cache, team = self._cache, None
        try:
            if cache is None:
                raise RuntimeError("call forward before backward")
            cache.team.begin("backward")   # this call's meetings (the forward's plan stays)
            team = cache.team
            dx, grads = moe_backward(dy_local, cache)
        except Exception as err:           # noqa: BLE001 - every rank must hear of it
            (ExpertTeam(self.comm) if team is None else team).fail(err)
        self._store_grads(grads)
        sent, seconds = team.forward_traffic
        self.stats.update(sent_bytes=sent + team.sent_bytes, exchange_seconds=seconds + team.seconds)
        return dx

    def __repr__(self):
        return (f"{super().__repr__()[:-1]}, ranks={self.n_ranks}, rank={self.rank}, "
                f"experts={self.expert_ids.start}..{self.expert_ids.stop - 1})")
