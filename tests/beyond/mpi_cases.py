"""Worker for tests/beyond/test_parallel.py: run under ``mpiexec -n P python mpi_cases.py [steps]``.

Every case takes a communicator, so the same cases also run on simulated ranks
(``minimoe.beyond.ranks.run_ranks``, in test_parallel.py) without MPI.

* equality: every rank builds the same single-process ``MoELayer`` (same seed), runs it on the
  whole global batch, and checks that ``ExpertParallelMoELayer`` on this rank's slice gives
  the same y, dx, aux_loss, statistics and gradients to 1e-12, for two SGD steps;
* bad: bad input on one rank raises the expected error on every rank;
* failures: a failure of any kind on one rank (or two) ends the call on EVERY rank with one
  error naming the rank and the cause, never a hang; each case's time is reported;
* gradcheck: central differences of the global loss over the global parameters;
* interrupt (under ``python -m mpi4py``): a KeyboardInterrupt inside the layer on one rank is
  not caught by the layer; mpi4py aborts every rank.

Rank 0 prints one JSON line: ``{"ranks": P, "passed": n, "failures": [...], "times": {...}}``.
"""
import json
import sys
import time
import traceback

import numpy as np

from minimoe import MoELayer
from minimoe.beyond.parallel import ExpertParallelMoELayer, RankSkipped
from minimoe.core import gradcheck

TOL = 1e-12
D, HID, E, T_GLOBAL, S = 6, 10, 8, 30, 6

# MoELayer options; "train" is the forward's. Sequence cases get (B, S, d) input, B = 2P + 1.
EQUALITY_CASES = [
    dict(gate="topk", k=2, noisy=True, balance=None, capacity_factor=None),
    dict(gate="topk", k=1, noisy=False, balance="importance", capacity_factor=1.0, fast=False),
    dict(gate="topk", k=2, noisy=True, balance="load", capacity_factor=0.75),
    dict(gate="topk", k=2, noisy=True, balance="importance+load", capacity_factor=1.0, z_loss_coef=0.01),
    dict(gate="switch", k=1, noisy=True, balance="switch", capacity_factor=1.0, z_loss_coef=0.001),
    dict(gate="switch", k=2, noisy=True, balance="switch", capacity_factor=1.25, fast=False),
    dict(gate="switch", k=2, noisy=True, balance="load", capacity_factor=None),
    dict(gate="topk", k=2, noisy=True, balance="switch", capacity_factor=0.5, train=False),
    dict(gate="dense", k=2, noisy=False, balance="switch", capacity_factor=None, z_loss_coef=0.001),
    dict(gate="topk", k=2, balance="switch", switch_fraction="all", capacity_factor=0.75, activation="swiglu"),
    dict(gate="switch", k=2, balance="switch", switch_fraction="all/k", capacity_factor=1.0, z_loss_coef=0.01,
         activation="swiglu", fast=False),
    dict(gate="topk", k=2, balance="importance+load", balance_groups="sequence", capacity_factor=1.0,
         activation="gelu", z_loss_coef=0.01),
    dict(gate="switch", k=1, balance="switch", balance_groups="sequence", activation="swiglu", fast=False,
         capacity_factor=1.0),
    dict(gate="topk", k=2, balance="switch", switch_fraction="all/k", balance_groups="sequence",
         capacity_factor=0.5, train=False),
]


def slices(n, P):
    """Uneven slices of n rows (tokens, or sequences), rank 0's first."""
    bounds = np.cumsum([0] + [len(a) for a in np.array_split(np.arange(n), P)])
    return [slice(bounds[r], bounds[r + 1]) for r in range(P)]


def reference(cfg, seed, P):
    cfg = dict(cfg)
    train = cfg.pop("train", True)
    layer = MoELayer(D, HID, E, rng=np.random.default_rng(seed), **cfg)
    rng = np.random.default_rng(seed + 1000)
    for name, p in layer.params.items():
        p[...] = rng.standard_normal(p.shape) * (0.5 if name == "W_noise" else 1.0)
    layer.params["W_gate"] *= 2.0                      # uneven routing, so capacity really drops
    lead = (2 * P + 1, S) if cfg.get("balance_groups") == "sequence" else (T_GLOBAL,)
    x, noise, dy = (rng.standard_normal(lead + (n,)) for n in (D, E, D))
    return layer, x, noise, dy, train


def close(name, a, b, failures, case):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        failures.append(f"{case}: {name} shape {a.shape} != {b.shape}")
        return
    err = np.abs(a - b) - TOL * (1 + np.abs(b))
    if a.size and err.max() > 0:
        failures.append(f"{case}: {name} differs by {np.abs(a - b).max():.3g}")


def equality_case(comm, i, failures):
    cfg = EQUALITY_CASES[i]
    P, rank = comm.Get_size(), comm.Get_rank()
    case = f"equality {i} {cfg}"
    ref, x, noise, dy, train = reference(cfg, i, P)
    par = ExpertParallelMoELayer.from_layer(ref, comm)
    s = slices(len(x), P)[rank]
    per_row = x.shape[1] if x.ndim == 3 else 1
    tok = slice(s.start * per_row, s.stop * per_row)  # this rank's rows of the flat (T, ...) stats
    kw_ref, kw_par = ({"train": train, "noise": noise}, {"train": train, "noise": noise[s]}) if ref.noisy \
        else ({"train": train},) * 2
    lo, hi = par.expert_ids.start, par.expert_ids.stop
    for step in range(2):                              # a second step after one SGD update
        y_ref = ref.forward(x, **kw_ref)
        dx_ref = ref.backward(dy)
        y = par.forward(x[s], **kw_par)
        dx = par.backward(dy[s])
        tag = f"{case} step {step}"
        if cfg.get("capacity_factor") and step == 0 and cfg["capacity_factor"] <= 1.0 and ref.stats["dropped"] == 0:
            failures.append(f"{tag}: fixture drops nothing, the capacity is not tested")
        close("y", y, y_ref[s], failures, tag)
        close("dx", dx, dx_ref[s], failures, tag)
        close("aux_loss", par.aux_loss, ref.aux_loss, failures, tag)
        for key in ("dropped", "capacity"):
            if par.stats[key] != ref.stats[key]:
                failures.append(f"{tag}: stats[{key!r}] {par.stats[key]} != {ref.stats[key]}")
        for key in ("load", "requested", "importance"):
            close(f"stats[{key!r}]", par.stats[key], ref.stats[key], failures, tag)
        for key in ("topk_idx", "kept", "probs", "topk_gates"):
            if not np.allclose(par.stats[key], ref.stats[key][tok], rtol=0, atol=TOL):
                failures.append(f"{tag}: stats[{key!r}] differs on this rank's tokens")
        if par.stats["losses"].keys() != ref.stats["losses"].keys():
            failures.append(f"{tag}: losses {sorted(par.stats['losses'])} != {sorted(ref.stats['losses'])}")
        for name, value in ref.stats["losses"].items():
            close(f"losses[{name!r}]", par.stats["losses"].get(name, np.nan), value, failures, tag)
        if par.grads.keys() != ref.grads.keys():
            failures.append(f"{tag}: grads {sorted(par.grads)} != {sorted(ref.grads)}")
        for name in ref.params:
            want = ref.grads[name] if name in ("W_gate", "W_noise") else ref.grads[name][lo:hi]
            close(f"grads[{name!r}]", par.grads[name], want, failures, tag)
        sent = par.stats["sent_bytes"]
        if P > 1 and not (isinstance(sent, int) and sent >= 0):
            failures.append(f"{tag}: sent_bytes {sent!r}")
        for name in ref.params:                        # the same SGD step on both
            ref.params[name] -= 0.05 * ref.grads[name]
            par.params[name] -= 0.05 * par.grads[name]


def expect_error(case, fn, needle, failures):
    try:
        fn()
    except ValueError as err:
        if needle not in str(err):
            failures.append(f"{case}: message {str(err)!r} lacks {needle!r}")
        return
    except Exception as err:    # noqa: BLE001
        failures.append(f"{case}: raised {type(err).__name__}: {err}")
        return
    failures.append(f"{case}: no error")


def bad_input_cases(comm, failures):
    P, rank = comm.Get_size(), comm.Get_rank()
    last = P - 1
    expect_error("E not divisible by P",
                 lambda: ExpertParallelMoELayer(D, HID, P + 1, k=1, rng=np.random.default_rng(0), comm=comm),
                 "divisible", failures)
    expect_error("disagree on the router weights",
                 lambda: ExpertParallelMoELayer.from_layer(MoELayer(D, HID, E, rng=np.random.default_rng(rank)), comm),
                 "disagree on the router weights", failures)
    expect_error("options differ",
                 lambda: ExpertParallelMoELayer(D, HID, E, k=1 if rank == last else 2,
                                                rng=np.random.default_rng(0), comm=comm),
                 f"disagree on k: rank 0 has 2, rank {last} has 1", failures)
    expect_error("a bad option on one rank only",
                 lambda: ExpertParallelMoELayer(D, HID, E, k=E + 1 if rank == last else 2,
                                                rng=np.random.default_rng(0), comm=comm),
                 f"rank {last} failed: ValueError: k", failures)
    expect_error("E differs",
                 lambda: ExpertParallelMoELayer(D, HID, E if rank != last else 2 * E,
                                                rng=np.random.default_rng(0), comm=comm),
                 "disagree on n_experts", failures)
    par = ExpertParallelMoELayer(D, HID, E, k=2, rng=np.random.default_rng(0), comm=comm)
    x = np.random.default_rng(rank).standard_normal((5, D))
    y = par.forward(x)
    if rank == last:
        par.params["W_gate"][0, 0] += 1e-9             # a replica drifted after construction
    expect_error("router drifted", lambda: par.forward(x), "disagree on the router weights", failures)
    if rank == last:
        par.params["W_gate"][0, 0] -= 1e-9
    expect_error("bad x on one rank",
                 lambda: par.forward(x[:, :-1] if rank == last else x), f"rank {last} failed: ValueError: x must",
                 failures)
    par.forward(x)
    expect_error("bad dy on one rank",
                 lambda: par.backward(np.zeros((4, D)) if rank == last else np.zeros_like(y)),
                 f"rank {last} failed: ValueError: dy", failures)
    par.backward(np.ones_like(y))                      # still usable after the errors


# ----------------------------------------------------------------------------- failures on one rank
class Boom(Exception):
    """A failure of a type the layer has never heard of."""


def raise_in(name, error):
    """Raise ``error`` when a function called ``name`` is next entered on this rank (this thread)."""
    def tracer(frame, event, arg):
        if event == "call" and frame.f_code.co_name == name:
            sys.settrace(None)
            raise error
        return None
    sys.settrace(tracer)


def make(comm, **kw):
    """A small expert-parallel layer (switch loss, z-loss, capacity), this rank's x and dy."""
    ref = MoELayer(D, HID, E, rng=np.random.default_rng(0), balance="switch", z_loss_coef=0.01, capacity_factor=1.0,
                   **kw)
    x, dy = np.random.default_rng(comm.Get_rank() + 1).standard_normal((2, 15, D))
    return ExpertParallelMoELayer.from_layer(ref, comm), x, dy


def z_loss_overflow(comm, bad):
    par, x, dy = make(comm)
    par.forward(x * 1e200 if bad else x)              # lse² beyond float64 on the bad rank only


def nan_expert(comm, bad):
    par, x, dy = make(comm)
    if bad:
        par.params["W1"][...] = np.nan                 # found by its experts, between the two exchanges
    par.forward(x)


def backward_without_forward(comm, bad):
    par, x, dy = make(comm)
    fresh, _, _ = make(comm)
    par.forward(x)
    (fresh if bad else par).backward(dy)


def int_dy(comm, bad):
    par, x, dy = make(comm)
    par.forward(x)
    par.backward(3 if bad else dy)


def list_dy(comm, bad):
    par, x, dy = make(comm)
    par.forward(x)
    par.backward(dy.tolist() if bad else dy)


def boom_in(function, error, backward=False):
    """A case: ``error`` raised on the bad rank as ``function`` is entered (in forward, or backward)."""
    def case(comm, bad):
        par, x, dy = make(comm)
        if backward:
            par.forward(x)
        if bad:
            raise_in(function, error)
        par.backward(dy) if backward else par.forward(x)
    return case


def bad_noise_rng(comm, bad):
    ExpertParallelMoELayer.from_layer(MoELayer(D, HID, E, rng=0), comm, noise_rng="not a seed" if bad else None)


def bad_rng_at_forward(comm, bad):
    par, x, dy = make(comm)
    if bad:
        par.rng = "oops"
    par.forward(x)


def train_disagrees(comm, bad):
    par, x, dy = make(comm)
    par.forward(x, train=not bad)


def option_disagrees(comm, bad):
    par, x, dy = make(comm)
    if bad:
        par.capacity_factor = 0.5
    par.forward(x)


def two_ranks_fail(comm, bad):
    par, x, dy = make(comm)
    par.forward(x * 1e200 if bad else x[:, :-1] if comm.Get_rank() == 0 else x)


def fail_after_last_exchange(comm, bad):
    par, x, dy = make(comm)
    par.forward(x)
    par.backward(dy)
    if bad:
        raise_in("routing_stats", Boom("after the last exchange"))
    try:
        par.forward(2 * x)                 # raises on the bad rank alone: its cache stays the first forward's
    except Boom:
        assert bad
    par.backward(dy)                       # the ranks would backward through different batches


def forward_here_backward_there(comm, bad):
    par, x, dy = make(comm)
    par.forward(x)
    par.backward(dy) if bad else par.forward(x)


# name, the error type every rank raises, what its message holds, the case (comm, bad: is this the failing rank)
FAILURE_CASES = [
    ("z-loss overflow on one rank", FloatingPointError,
     ["rank {last} failed: FloatingPointError: the z-loss overflowed"], z_loss_overflow),
    ("NaN in one rank's experts", ValueError, ["rank {last} failed: ValueError: W1 contains NaN"], nan_expert),
    ("backward without forward on one rank", RuntimeError,
     ["rank {last} failed: RuntimeError: call forward before backward"], backward_without_forward),
    ("int dy on one rank", TypeError, ["rank {last} failed: TypeError: dy must be a numpy array, got int"], int_dy),
    ("list dy on one rank", TypeError, ["rank {last} failed: TypeError: dy must be a numpy array, got list"], list_dy),
    ("an exception between the forward's exchanges", RuntimeError, ["rank {last} failed: Boom: between"],
     boom_in("experts_forward_fast", Boom("between the exchanges"))),
    ("an exception between the backward's exchanges", RuntimeError, ["rank {last} failed: Boom: between"],
     boom_in("experts_backward_fast", Boom("between the exchanges"), backward=True)),
    ("an exception before the router's Allreduce", RuntimeError, ["rank {last} failed: Boom: before"],
     boom_in("router_logits_backward", Boom("before the Allreduce"), backward=True)),
    ("a MemoryError before the first meeting", MemoryError, ["rank {last} failed: MemoryError: no room"],
     boom_in("router_logits_forward", MemoryError("no room"))),
    ("a bad noise_rng on one rank", TypeError, ["rank {last} failed: TypeError: noise_rng must be"], bad_noise_rng),
    ("a bad rng at forward on one rank", TypeError, ["rank {last} failed: TypeError: rng must be"],
     bad_rng_at_forward),
    ("ranks disagree on train", ValueError, ["disagree on train: rank 0 has True, rank {last} has False"],
     train_disagrees),
    ("ranks disagree on an option", ValueError, ["disagree on capacity_factor: rank 0 has 1.0, rank {last} has 0.5"],
     option_disagrees),
    ("two ranks fail differently", RuntimeError,
     ["rank 0 failed: ValueError: x must have width", "rank {last} failed: FloatingPointError: the z-loss"],
     two_ranks_fail),
    ("a forward failed after its last exchange on one rank, then backward", RuntimeError,
     ["the ranks are not in the same call: rank 0 and rank {last} are in backward of different forwards"],
     fail_after_last_exchange),
    ("forward on some ranks, backward on one", RuntimeError,
     ["the ranks are not in the same call: rank 0 is in forward (meeting 1), rank {last} in backward (meeting 1)"],
     forward_here_backward_there),
]


def failure_case(comm, i):
    """Run failure case i on this rank: -> (None or what is wrong, seconds to the error)."""
    name, kind, needles, fn = FAILURE_CASES[i]
    P, rank = comm.Get_size(), comm.Get_rank()
    bad = rank == P - 1
    t0 = time.perf_counter()
    try:
        fn(comm, bad)
    except Exception as err:   # noqa: BLE001 - judged below
        seconds = time.perf_counter() - t0
        text = f"{type(err).__name__}: {err}"
        missing = [n.format(last=P - 1) for n in needles if n.format(last=P - 1) not in str(err)]
        if isinstance(err, RankSkipped) or type(err) is not kind or missing:
            return f"{name}: rank {rank} raised {text!r}, expected {kind.__name__} with {missing}", seconds
        return None, seconds
    finally:
        sys.settrace(None)
    return f"{name}: rank {rank} raised nothing", time.perf_counter() - t0


def failure_cases(comm, failures, times):
    for i, (name, *_) in enumerate(FAILURE_CASES):
        problem, seconds = failure_case(comm, i)
        if problem:
            failures.append(problem)
        times[name] = max(comm.allgather(round(seconds, 3)))
    par, x, dy = make(comm)                # the ranks are still in step: a good step works
    par.forward(x)
    par.backward(dy)


# ----------------------------------------------------------------------------- gradients under MPI
def gradient_check(comm, cfg, seed, failures):
    """Central differences of the global loss Σ_ranks ⟨dout, y⟩ + aux_loss over the global
    parameters (x, the router, all E experts); every rank nudges the same entry."""
    P, rank = comm.Get_size(), comm.Get_rank()
    case = f"gradcheck {cfg}"
    rng = np.random.default_rng(seed)
    ref = MoELayer(3, 4, 4, rng=rng, **cfg)
    for name, p in ref.params.items():
        p[...] = rng.standard_normal(p.shape) * (0.5 if name == "W_noise" else 1.0)
    T = 2 * P + 2
    x, noise, dout = (rng.standard_normal((T, 3)), rng.standard_normal((T, 4)), rng.standard_normal((T, 3)))
    par = ExpertParallelMoELayer.from_layer(ref, comm)
    s, (lo, hi) = slices(T, P)[rank], (par.expert_ids.start, par.expert_ids.stop)
    full = {"x": x, **{n: p.copy() for n, p in ref.params.items()}}
    kw = {"noise": noise[s]} if ref.noisy else {}

    def load():
        for n in par.params:
            par.params[n][...] = full[n] if n in ("W_gate", "W_noise") else full[n][lo:hi]

    def loss_fn():
        load()
        y = par.forward(full["x"][s], **kw)
        value = comm.allreduce(float(np.sum(y * dout[s]))) + par.aux_loss
        return value, comm.allgather(par.routing_signature())

    loss_fn()
    dx = par.backward(dout[s])
    analytic = {"x": np.concatenate(comm.allgather(dx))}
    for n in par.params:
        g = par.grads[n]
        analytic[n] = g.copy() if n in ("W_gate", "W_noise") else np.concatenate(comm.allgather(g))
    try:
        gradcheck.check_gradients(loss_fn, full, analytic)
    except gradcheck.GradCheckError as err:
        failures.append(f"{case}: {err}")
    par.forward(full["x"][s], **kw)
    if "capacity_factor" in cfg and comm.allreduce(int((~par.stats["kept"]).sum())) == 0:
        failures.append(f"{case}: fixture drops nothing")


def interrupt(comm):
    """Under ``python -m mpi4py``: a KeyboardInterrupt inside the layer on the last rank is not
    the layer's to catch; mpi4py aborts every rank (the others would wait in the next exchange)."""
    par, x, dy = make(comm)
    if comm.Get_rank() == comm.Get_size() - 1:
        raise_in("experts_forward_fast", KeyboardInterrupt())
    par.forward(x)
    par.backward(dy)


def main():
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    failures, passed, times = [], 0, {}
    steps = [(f"equality {i}", lambda i=i: equality_case(comm, i, failures)) for i in range(len(EQUALITY_CASES))]
    steps.append(("bad input", lambda: bad_input_cases(comm, failures)))
    steps.append(("failures", lambda: failure_cases(comm, failures, times)))
    steps.append(("gradcheck topk", lambda: gradient_check(comm, dict(
        k=2, gate="topk", noisy=True, balance="importance+load", capacity_factor=1.0, z_loss_coef=0.01), 3, failures)))
    steps.append(("gradcheck switch", lambda: gradient_check(comm, dict(
        k=1, gate="switch", noisy=True, balance="switch", capacity_factor=1.0), 5, failures)))
    steps.append(("gradcheck swiglu", lambda: gradient_check(comm, dict(
        k=2, gate="switch", noisy=True, balance="switch", switch_fraction="all/k", activation="swiglu",
        capacity_factor=1.0, fast=False), 7, failures)))
    steps.append(("interrupt", lambda: interrupt(comm)))
    only = sys.argv[1:]     # e.g. "equality bad": run the steps whose names contain a word
    for name, fn in steps:
        if (only and not any(o in name for o in only)) or (name == "interrupt" and "interrupt" not in only):
            continue
        before = len(failures)
        try:
            fn()
        except Exception:   # noqa: BLE001 - report and go on (the others raised too, or time out)
            failures.append(f"{name}: {traceback.format_exc(limit=-3)}")
        passed += len(failures) == before
    everyone = comm.gather(failures, root=0)
    if comm.Get_rank() == 0:
        print(json.dumps({"ranks": comm.Get_size(), "passed": passed, "times": times,
                          "failures": [f"rank {r}: {f}" for r, fs in enumerate(everyone) for f in fs]}))


if __name__ == "__main__":
    main()
