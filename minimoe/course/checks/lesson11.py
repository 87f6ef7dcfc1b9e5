"""Graders for lesson 11, *A network of clinics*: the send counts and displacements of an
all-to-all, the permutation that groups the arrivals by expert and brings the results home,
and the backward of the exchange.

Besides the right numbers: no per-token Python loop (counted, as in lesson 06, with
``sys.settrace`` at two sizes; loops over ranks or experts are fine), and no call to
minimoe's own answer (``minimoe.beyond.parallel``'s plan, or this module's ``*_ref``):
the exercise is to write it.

Also here: :func:`exchange`, the all-to-all of P simulated ranks in one process (given to
the learner), :func:`cost_model`, and :func:`demo_run` / :func:`launch`, the lesson's real
MPI run (``mpiexec -n 2 python -m minimoe.course.checks.lesson11``) with its fallback on
simulated ranks (:func:`minimoe.beyond.parallel.run_ranks`) when MPI is missing.

References: :func:`minimoe.beyond.parallel.global_plan` (the send layout, in the layer).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from ...beyond import parallel
from .compare import expect_array
from .grading import Fail, Lesson, call

LESSON = Lesson("11", "A network of clinics")
progress = LESSON.progress

SMALL_T, LARGE_T = 256, 4096


# --------------------------------------------------------------------------- given to the learner
def owner_of(expert, n_experts, n_ranks):
    """The rank that keeps each expert: experts are owned in blocks of E/P (rank r: r·E/P …)."""
    return np.asarray(expert) // (n_experts // n_ranks)


def exchange(sends, counts):
    """The all-to-all of P simulated ranks (lists indexed by rank).

    ``sends[s]`` is rank s's buffer (rows grouped by destination, rank 0's first);
    ``counts[s, r]`` rows of it go to rank r. Returns ``received``: ``received[r]`` holds
    the rows from rank 0, then rank 1, ... (MPI's ``Alltoallv`` with displacements the
    running sums of the counts).
    """
    counts = np.asarray(counts)
    P = counts.shape[0]
    starts = np.cumsum(counts, axis=1) - counts                  # where rank s's block for r starts
    return [np.concatenate([sends[s][starts[s, r]:starts[s, r] + counts[s, r]] for s in range(P)])
            for r in range(P)]


def routing_case(seed, T, E, k, P, cf=1.0, skew=1.0):
    """A rank's routing: ``idx (T,k)`` from a GP that favours low experts, and ``kept (T,k)``
    from a capacity over this batch (the single-process rule of lesson 06)."""
    from ...core import dispatch, router
    rng = np.random.default_rng(seed)
    H = rng.standard_normal((T, E)) - skew * np.linspace(0, 1, E)
    idx = router.topk_indices(H, k)
    C = dispatch.expert_capacity(T, E, k, cf)
    return idx, dispatch.make_plan(idx, E, C).kept


# --------------------------------------------------------------------------- references
def send_layout_ref(idx, kept, n_experts, n_ranks):
    """``(order, counts, displs)``: the kept flat ids ``t·k + j`` sorted by (expert, j, t), and
    the rows (and their starting row) this rank sends to each rank."""
    T, k = idx.shape
    expert = idx.reshape(-1)
    order = np.argsort(expert * k + np.tile(np.arange(k), T), kind="stable")
    order = order[kept.reshape(-1)[order]]
    counts = np.bincount(owner_of(expert[order], n_experts, n_ranks), minlength=n_ranks)
    return order, counts, np.cumsum(counts) - counts


def arrival_permutation_ref(blocks):
    """``(perm, home)``: ``received[perm]`` grouped by expert (then by source, in rank order),
    and ``grouped[home]`` back in arrival order. ``blocks (P, E_r)``: rows source s sent for
    local expert e; the rows arrive source by source, each source's grouped by expert."""
    blocks = np.asarray(blocks)
    P, Er = blocks.shape
    expert_of_row = np.repeat(np.tile(np.arange(Er), P), blocks.reshape(-1))
    perm = np.argsort(expert_of_row, kind="stable")
    home = np.empty_like(perm)
    home[perm] = np.arange(perm.size)
    return perm, home


def exchange_backward_ref(d_received, counts):
    """The transpose of an all-to-all is the all-to-all with the transposed counts."""
    return exchange(d_received, np.asarray(counts).T)


# --------------------------------------------------------------------------- tracing the learner
def _forbidden_codes():
    codes = {parallel.global_plan.__code__: "minimoe.beyond.parallel.global_plan",
             parallel._arrival_order.__code__: "minimoe.beyond.parallel._arrival_order",
             parallel.ExpertParallelMoELayer.forward.__code__: "ExpertParallelMoELayer.forward",
             parallel.ExpertParallelMoELayer.backward.__code__: "ExpertParallelMoELayer.backward"}
    for fn in (send_layout_ref, arrival_permutation_ref, exchange_backward_ref):
        codes[fn.__code__] = f"check.{fn.__name__}"
    return codes


def traced(fn, *args, name):
    """Run ``fn(*args)`` under ``sys.settrace``: ``(Python steps executed, result)``.

    Fails if ``fn`` called minimoe's own answer to the exercise."""
    counter, forbidden, seen = [0], _forbidden_codes(), []

    def local(frame, event, arg):
        if event == "line":
            counter[0] += 1
        return local

    def on_call(frame, event, arg):
        counter[0] += 1
        if frame.f_code in forbidden:
            seen.append(forbidden[frame.f_code])
            return None
        return local

    def counted(*a):
        old = sys.gettrace()
        sys.settrace(on_call)
        try:
            return fn(*a)
        finally:
            sys.settrace(old)

    out = call(counted, *args, name=name)
    if seen:
        raise Fail(f"{name} calls minimoe's own answer ({seen[0]}). The exercise is to write it: "
                   f"use NumPy (np.argsort, np.bincount, np.cumsum, np.repeat) and the given helpers.")
    return counter[0], out


def _no_token_loop(fn, name, make_args, check_out, hint):
    steps = {}
    for T in (SMALL_T, LARGE_T):
        args = make_args(T)
        steps[T], out = traced(fn, *args, name=name)
        check_out(out, *args)
    small, big = steps[SMALL_T], steps[LARGE_T]
    if big > 2 * small + 300:
        raise Fail(f"{name} gives the right answers, but its Python work grows with the number of tokens: "
                   f"{small:,} Python steps at T = {SMALL_T}, {big:,} at T = {LARGE_T} — a loop over tokens "
                   f"(or rows). Loops over the P ranks or the experts are fine. {hint}")
    return small, big


# --------------------------------------------------------------------------- exercise 1
def _check_layout(out, idx, kept, E, P):
    T, k = idx.shape
    want_order, want_counts, want_displs = send_layout_ref(idx, kept, E, P)
    if not isinstance(out, tuple) or len(out) != 3:
        raise Fail("send_layout should return three arrays: (order, counts, displs)")
    order, counts, displs = (np.asarray(a) for a in out)
    if order.ndim != 1 or (order.size and not np.issubdtype(order.dtype, np.integer)):
        raise Fail(f"order should be a 1-D integer array of flat ids t·k + j, got {order.dtype} {order.shape}")
    if order.size == T * k and want_order.size < T * k:
        raise Fail(f"order holds all {T * k} referrals, but {T * k - want_order.size} were turned away by "
                   f"capacity (kept is False): a dropped referral never travels. Keep only order[kept...].")
    if counts.shape == (E,) and E != P:
        raise Fail(f"counts has one entry per expert ({E}); the all-to-all needs one per *rank* (P = {P}): "
                   f"add up the rows of the experts each rank owns.")
    if counts.shape != (P,) or displs.shape != (P,):
        raise Fail(f"counts and displs should have shape (P,) = ({P},), got {counts.shape} and {displs.shape}")
    for what, a in (("counts", counts), ("displs", displs)):
        if not np.issubdtype(a.dtype, np.integer):
            raise Fail(f"{what} holds {a.dtype} numbers: it must be an integer array, as the docstring says — MPI's "
                       f"Alltoallv takes row counts and starting rows as integers (np.bincount and np.cumsum of "
                       f"integers stay integers; a division or np.zeros(P) makes floats).")
    if order.size == want_order.size and np.array_equal(np.sort(order), np.sort(want_order)):
        experts = idx.reshape(-1)[order]
        if np.any(np.diff(experts) < 0):
            raise Fail("The rows must be grouped by expert (hence by the rank that owns it): sort the kept "
                       "referrals by the key expert · k + j with np.argsort(..., kind='stable').")
        if not np.array_equal(order, want_order):
            raise Fail("The rows are grouped by expert but not in queue order inside a group: first choices "
                       "before second choices, earlier tokens first — key expert · k + j, kind='stable'.")
    elif not np.array_equal(order, want_order):
        raise Fail(f"order should hold the {want_order.size} kept referrals (flat ids t·k + j); yours has "
                   f"{order.size} entries, not the same ones.")
    expert = idx.reshape(-1)[want_order]
    round_robin = np.bincount(expert % P, minlength=P)
    if not np.array_equal(counts, want_counts) and np.array_equal(counts, round_robin):
        raise Fail(f"Rank r keeps the block of experts r·E/P … (r+1)·E/P − 1 (use owner_of), not every P-th "
                   f"expert: expert e lives on rank e // (E/P), not e % P.")
    if not np.array_equal(counts, want_counts):
        raise Fail(f"counts[r] should be the number of kept rows whose expert lives on rank r: "
                   f"expected {want_counts.tolist()}, got {counts.tolist()}.")
    if np.array_equal(displs, np.cumsum(want_counts)):
        raise Fail("displs[r] is where rank r's rows *start* in the send buffer: the running sum of the "
                   "counts before r (0 for rank 0), np.cumsum(counts) − counts.")
    if not np.array_equal(displs, want_displs):
        raise Fail(f"displs should be {want_displs.tolist()} (where each rank's rows start), got {displs.tolist()}.")


@LESSON.exercise("send_layout")
def send_layout(fn):
    cases = [(24, 8, 2, 2, 1.0), (30, 8, 1, 4, 1.0), (40, 6, 2, 3, 0.75), (17, 4, 2, 2, None),
             (60, 12, 3, 4, 1.25), (9, 4, 1, 4, 0.5)]
    for seed, (T, E, k, P, cf) in enumerate(cases):
        idx, kept = routing_case(1100 + seed, T, E, k, P, cf)
        _check_layout(traced(fn, idx, kept, E, P, name="send_layout")[1], idx, kept, E, P)

    def make(T):
        idx, kept = routing_case(1150 + T, T, 8, 2, 4, 1.0)
        return idx, kept, 8, 4
    small, big = _no_token_loop(fn, "send_layout", make, _check_layout,
                                "One stable np.argsort, keep the kept rows, np.bincount of owner_of(...).")
    return (f"order, counts and displs are right on 6 routings (P = 2 to 4, k = 1 to 3, with drops), and "
            f"vectorised: {small} Python steps at T = {SMALL_T}, {big} at T = {LARGE_T}.")


# --------------------------------------------------------------------------- exercise 2
def _blocks_case(seed, P, Er, scale=6):
    return np.random.default_rng(seed).integers(0, scale, size=(P, Er))


def _check_arrival(out, blocks):
    want_perm, want_home = arrival_permutation_ref(blocks)
    if not isinstance(out, tuple) or len(out) != 2:
        raise Fail("arrival_permutation should return two arrays: (perm, home)")
    perm, home = (np.asarray(a) for a in out)
    N = want_perm.size
    for name, a in (("perm", perm), ("home", home)):
        if a.shape != (N,) or not np.issubdtype(a.dtype, np.integer) or not np.array_equal(np.sort(a), np.arange(N)):
            raise Fail(f"{name} should be a permutation of the {N} received rows (an integer array "
                       f"holding 0 … {N - 1} once each), got {a.dtype} {a.shape}")
    P, Er = np.asarray(blocks).shape
    expert_of_row = np.repeat(np.tile(np.arange(Er), P), np.asarray(blocks).reshape(-1))
    if not np.array_equal(perm, want_perm) and np.array_equal(perm, want_home) and np.array_equal(home, want_perm):
        raise Fail("perm and home are swapped: perm is the one that groups, grouped = received[perm] (the stable "
                   "sort of the expert labels), and home is its inverse, which brings the results back, "
                   "back = grouped[home].")
    if not np.array_equal(perm, want_perm):
        if np.any(np.diff(expert_of_row[perm]) < 0):
            raise Fail("received[perm] must be grouped by expert (all of expert 0's rows, then expert 1's, "
                       "...). The rows arrive source by source; label each row with its expert "
                       "(np.repeat of the expert numbers by the block sizes) and sort by that label.")
        raise Fail("received[perm] is grouped by expert, but inside an expert the sources are out of order: "
                   "keep arrival order (source 0's rows first) with np.argsort(..., kind='stable').")
    if np.array_equal(home, perm) and not np.array_equal(want_home, want_perm):
        raise Fail("home = perm sends the results to the wrong places: grouped = received[perm], so to undo "
                   "it you need the *inverse* permutation, home[perm] = arange(N) (or np.argsort(perm)).")
    if not np.array_equal(home, want_home):
        raise Fail("grouped[home] must give back the arrival order: home is the inverse of perm.")


@LESSON.exercise("arrival_permutation")
def arrival_permutation(fn):
    cases = [(2, 2), (4, 2), (3, 4), (2, 1), (1, 3), (4, 8)]
    for seed, (P, Er) in enumerate(cases):
        blocks = _blocks_case(1200 + seed, P, Er)
        blocks[0, 0] = max(blocks[0, 0], 2)
        _check_arrival(traced(fn, blocks, name="arrival_permutation")[1], blocks)

    def make(T):
        return (np.random.default_rng(T).multinomial(T, np.full(8, 1 / 8)).reshape(4, 2),)
    small, big = _no_token_loop(fn, "arrival_permutation", make, _check_arrival,
                                "Label the rows with np.repeat, sort them once, invert with one scatter.")
    return (f"perm groups the arrivals by expert (sources in rank order) and home brings the results back, "
            f"on 6 layouts; vectorised ({small} Python steps at T = {SMALL_T}, {big} at T = {LARGE_T}).")


# --------------------------------------------------------------------------- exercise 3
def _exchange_case(seed, P, d=3):
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 5, size=(P, P))
    counts[0, P - 1] += 3                                       # not symmetric: the transpose matters
    d_received = [rng.standard_normal((int(counts[:, r].sum()), d)) for r in range(P)]
    return counts, d_received


def _check_exchange_backward(out, d_received, counts):
    P = len(d_received)
    want = exchange_backward_ref(d_received, counts)
    if not isinstance(out, (list, tuple)) or len(out) != P:
        raise Fail(f"exchange_backward should return a list of P = {P} arrays, one per rank")
    for s in range(P):
        got = np.asarray(out[s], dtype=float)
        if got.shape != want[s].shape:
            if got.shape == d_received[s].shape:
                raise Fail(f"rank {s}'s gradient has the shape of what it *received* ({got.shape}); it must "
                           f"have the shape of what it *sent* ({want[s].shape}). The gradient travels the "
                           f"way back: rank r returns to rank s the rows s sent it — use the transposed counts.")
            raise Fail(f"rank {s}'s gradient should have shape {want[s].shape} (what rank {s} sent), got {got.shape}")
        if np.array_equal(got, want[s]):
            continue
        same_rows = got.size and np.array_equal(np.sort(got.reshape(got.shape[0], -1), axis=0),
                                                np.sort(want[s].reshape(want[s].shape[0], -1), axis=0))
        if same_rows:
            raise Fail(f"rank {s}'s gradient holds the right rows in the wrong places: each row's gradient goes "
                       f"back to the rank and the place it came from (exchange with counts.T).")
        expect_array(f"rank {s}'s gradient", got, want[s], shape_desc="(rows rank s sent, d)")


def _untouched(d_received, before):
    """Fail if the learner's function changed the list d_received, or an array in it, in place."""
    if len(d_received) != len(before) or any(not np.array_equal(a, b) for a, b in zip(d_received, before)):
        raise Fail("exchange_backward changed d_received in place (an array of the list, or the list itself). "
                   "The gradients it is handed belong to the caller; build new arrays for d_sent.")


@LESSON.exercise("exchange_backward")
def exchange_backward(fn):
    for seed, P in enumerate((2, 3, 4, 1)):
        counts, d_received = _exchange_case(1300 + seed, P)
        before = [a.copy() for a in d_received]
        out = traced(fn, d_received, counts, name="exchange_backward")[1]
        _untouched(d_received, before)
        _check_exchange_backward(out, d_received, counts)
    # the adjoint identity  <exchange(a), b> = <a, exchange_backward(b)>  on one more case
    counts, b = _exchange_case(1399, 3)
    rng = np.random.default_rng(1398)
    a = [rng.standard_normal((int(counts[s].sum()), 3)) for s in range(3)]
    lhs = sum(float(np.sum(u * v)) for u, v in zip(exchange(a, counts), b))
    rhs = sum(float(np.sum(u * np.asarray(v))) for u, v in zip(a, traced(fn, b, counts, name="exchange_backward")[1]))
    if abs(lhs - rhs) > 1e-10 * max(1.0, abs(lhs)):
        raise Fail(f"⟨exchange(a), b⟩ = {lhs:.6g} but ⟨a, exchange_backward(b)⟩ = {rhs:.6g}: the backward of a "
                   f"linear map must be its transpose.")

    def make(T):
        rng = np.random.default_rng(T)
        counts = rng.multinomial(T, np.full(16, 1 / 16)).reshape(4, 4)
        return [rng.standard_normal((int(counts[:, r].sum()), 3)) for r in range(4)], counts
    small, big = _no_token_loop(fn, "exchange_backward", make, _check_exchange_backward,
                                "Split each rank's rows by source with np.split at np.cumsum of the counts, or "
                                "call check.exchange with the transposed counts.")
    return (f"the backward of the all-to-all is right on 4 exchanges (P = 1 to 4, counts not symmetric), "
            f"⟨exchange(a), b⟩ = ⟨a, backward(b)⟩ to {abs(lhs - rhs):.0e}, and vectorised ({small} Python "
            f"steps at T = {SMALL_T}, {big} at T = {LARGE_T}).")


# --------------------------------------------------------------------------- the cost model
def cost_model(T, d, k, n_ranks, capacity_factor=None, itemsize=8, padded=False):
    """Bytes one rank sends to the others in one training step (forward + backward: 4 exchanges),
    for T tokens on that rank and uniform routing: a fraction (P−1)/P of its T·k rows is remote.
    ``padded``: fixed-size buffers of C = cf·T·k/E rows per expert (what accelerators use), so the
    bytes grow with the capacity factor whether the slots are used or not."""
    rows = T * k * (n_ranks - 1) / n_ranks
    if padded and capacity_factor is not None:
        rows *= capacity_factor
    return 4 * rows * d * itemsize


# --------------------------------------------------------------------------- the real run
def demo_run(comm, T=512, d=16, h=32, E=8, k=2, capacity_factor=1.0, seed=0):
    """One forward + backward of the expert-parallel layer on this rank's slice of a global
    batch, compared with the single-process ``MoELayer`` on the whole batch (every rank runs
    it). Returns a dict (the same on every rank for the global numbers)."""
    from ...core.moe import MoELayer
    rng = np.random.default_rng(seed)
    ref = MoELayer(d, h, E, k=k, balance="switch", capacity_factor=capacity_factor, rng=rng)
    x, noise, dy = rng.standard_normal((T, d)), rng.standard_normal((T, E)), rng.standard_normal((T, d))
    y_ref, dx_ref = ref.forward(x, noise=noise), None
    dx_ref = ref.backward(dy)
    P, r = comm.Get_size(), comm.Get_rank()
    s = slice(r * T // P, (r + 1) * T // P)
    par = parallel.ExpertParallelMoELayer.from_layer(ref, comm)
    y = par.forward(x[s], noise=noise[s])
    dx = par.backward(dy[s])
    gather = comm.allgather
    return {
        "ranks": P,
        "experts_per_rank": [[int(e) for e in ids] for ids in gather(par.expert_ids)],
        "max_diff_y": max(gather(float(np.abs(y - y_ref[s]).max()))),
        "max_diff_dx": max(gather(float(np.abs(dx - dx_ref[s]).max()))),
        "max_rel_diff_W_gate_grad": max(gather(float(np.abs(par.grads["W_gate"] - ref.grads["W_gate"]).max()
                                                     / np.abs(ref.grads["W_gate"]).max()))),
        "aux_loss": par.aux_loss, "aux_loss_single": ref.aux_loss,
        "dropped": par.stats["dropped"], "dropped_single": int(ref.stats["dropped"]),
        "rows_treated": gather(par.stats["received_rows"]),
        "sent_bytes": gather(par.stats["sent_bytes"]),
    }


def find_mpiexec():
    """mpiexec beside this Python (a pip-installed MPICH puts it in the venv), else on PATH, else None."""
    beside = Path(sys.executable).parent / "mpiexec"
    return str(beside) if beside.exists() else shutil.which("mpiexec")


def launch(n_ranks=2, timeout=60):
    """Run :func:`demo_run` under ``mpiexec -n n_ranks`` (a real MPI job, one process per rank).

    Returns ``(result dict, how)``; when mpi4py or mpiexec is missing, or the job fails, the
    same code runs on simulated ranks in this process and ``how`` says why."""
    try:
        import mpi4py  # noqa: F401
        mpiexec = find_mpiexec()
    except ImportError:
        mpiexec = None
    if mpiexec is None:
        return simulate(n_ranks), "simulated ranks (threads): mpi4py or mpiexec is not installed"
    root = str(Path(__file__).resolve().parents[3])
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    cmd = [mpiexec, "-n", str(n_ranks), sys.executable, "-m", "minimoe.course.checks.lesson11"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        line = [ln for ln in done.stdout.splitlines() if ln.startswith("{")][-1]
        return json.loads(line), f"mpiexec -n {n_ranks}: {n_ranks} processes"
    except (subprocess.TimeoutExpired, IndexError, json.JSONDecodeError, OSError) as err:
        return simulate(n_ranks), f"simulated ranks (threads): the MPI run failed ({type(err).__name__})"


def simulate(n_ranks=2, **kw):
    """:func:`demo_run` on ``n_ranks`` simulated ranks (threads of this process)."""
    return parallel.run_ranks(n_ranks, lambda comm: demo_run(comm, **kw))[0]


if __name__ == "__main__":                  # mpiexec -n 2 python -m minimoe.course.checks.lesson11
    from mpi4py import MPI
    result = demo_run(MPI.COMM_WORLD)
    if MPI.COMM_WORLD.Get_rank() == 0:
        print(json.dumps(result))
