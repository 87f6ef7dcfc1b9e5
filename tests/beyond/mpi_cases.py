"""Worker for tests/beyond/test_parallel.py: run under ``mpiexec -n P python mpi_cases.py``.

Every rank builds the same single-process ``MoELayer`` (same seed), runs it on the whole
global batch, and checks that ``ExpertParallelMoELayer`` on this rank's slice gives the same
y, dx, aux_loss, statistics and gradients to 1e-12. Then the bad-input cases (each must raise
the expected ValueError on every rank, never hang) and a gradient check of the layer under
MPI over the *global* parameters. Rank 0 prints one JSON line: ``{"failures": [...], "passed": n}``.
"""
import json
import sys
import traceback

import numpy as np
from mpi4py import MPI

from minimoe import MoELayer
from minimoe.beyond.parallel import ExpertParallelMoELayer
from minimoe.core import gradcheck

comm = MPI.COMM_WORLD
P, RANK = comm.Get_size(), comm.Get_rank()
TOL = 1e-12
D, HID, E, T_GLOBAL = 6, 10, 8, 30

# gate, k, noisy, balance, capacity_factor, z_loss_coef, train
EQUALITY_CASES = [
    dict(gate="topk", k=2, noisy=True, balance=None, capacity_factor=None),
    dict(gate="topk", k=1, noisy=False, balance="importance", capacity_factor=1.0),
    dict(gate="topk", k=2, noisy=True, balance="load", capacity_factor=0.75),
    dict(gate="topk", k=2, noisy=True, balance="importance+load", capacity_factor=1.0, z_loss_coef=0.01),
    dict(gate="switch", k=1, noisy=True, balance="switch", capacity_factor=1.0, z_loss_coef=0.001),
    dict(gate="switch", k=2, noisy=True, balance="switch", capacity_factor=1.25),
    dict(gate="switch", k=2, noisy=True, balance="load", capacity_factor=None),
    dict(gate="topk", k=2, noisy=True, balance="switch", capacity_factor=0.5, train=False),
    dict(gate="dense", k=2, noisy=False, balance="switch", capacity_factor=None, z_loss_coef=0.001),
]


def slices(T):
    """Uneven slices of the global batch, rank 0's tokens first."""
    bounds = np.cumsum([0] + [len(a) for a in np.array_split(np.arange(T), P)])
    return [slice(bounds[r], bounds[r + 1]) for r in range(P)]


def reference(cfg, seed):
    cfg = dict(cfg)
    train = cfg.pop("train", True)
    layer = MoELayer(D, HID, E, rng=np.random.default_rng(seed), **cfg)
    rng = np.random.default_rng(seed + 1000)
    for name, p in layer.params.items():
        p[...] = rng.standard_normal(p.shape) * (0.5 if name == "W_noise" else 1.0)
    layer.params["W_gate"] *= 2.0                      # uneven routing, so capacity really drops
    x = rng.standard_normal((T_GLOBAL, D))
    noise = rng.standard_normal((T_GLOBAL, E))
    dy = rng.standard_normal((T_GLOBAL, D))
    return layer, x, noise, dy, train


def close(name, a, b, failures, case):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        failures.append(f"{case}: {name} shape {a.shape} != {b.shape}")
        return
    err = np.abs(a - b) - TOL * (1 + np.abs(b))
    if a.size and err.max() > 0:
        failures.append(f"{case}: {name} differs by {np.abs(a - b).max():.3g}")


def equality_case(i, cfg, failures):
    case = f"equality {i} {cfg}"
    ref, x, noise, dy, train = reference(cfg, seed=i)
    par = ExpertParallelMoELayer.from_layer(ref, comm)
    kw = {"train": train}
    if ref.noisy:
        kw_ref, kw_par = dict(kw, noise=noise), dict(kw, noise=noise[slices(T_GLOBAL)[RANK]])
    else:
        kw_ref = kw_par = kw
    s = slices(T_GLOBAL)[RANK]
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
        for key in ("topk_idx", "kept"):
            if not np.array_equal(par.stats[key], ref.stats[key][s]):
                failures.append(f"{tag}: stats[{key!r}] differs on this rank's tokens")
        for name, value in ref.stats["losses"].items():
            close(f"losses[{name!r}]", par.stats["losses"][name], value, failures, tag)
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


def bad_input_cases(failures):
    last = P - 1
    expect_error("E not divisible by P",
                 lambda: ExpertParallelMoELayer(D, HID, P + 1, k=1, rng=np.random.default_rng(0), comm=comm),
                 "divisible", failures)
    expect_error("router weights differ",
                 lambda: ExpertParallelMoELayer.from_layer(MoELayer(D, HID, E, rng=np.random.default_rng(RANK)), comm),
                 "router weights differ", failures)
    expect_error("options differ",
                 lambda: ExpertParallelMoELayer(D, HID, E, k=1 if RANK == last else 2,
                                                rng=np.random.default_rng(0), comm=comm),
                 "k differs", failures)
    expect_error("a bad option on one rank only",
                 lambda: ExpertParallelMoELayer(D, HID, E, k=E + 1 if RANK == last else 2,
                                                rng=np.random.default_rng(0), comm=comm),
                 f"rank {last}: ValueError: k", failures)
    expect_error("E differs",
                 lambda: ExpertParallelMoELayer(D, HID, E if RANK != last else 2 * E,
                                                rng=np.random.default_rng(0), comm=comm),
                 "n_experts differs", failures)
    par = ExpertParallelMoELayer(D, HID, E, k=2, rng=np.random.default_rng(0), comm=comm)
    x = np.random.default_rng(RANK).standard_normal((5, D))
    y = par.forward(x)
    if RANK == last:
        par.params["W_gate"][0, 0] += 1e-9             # a replica drifted after construction
    expect_error("router drifted", lambda: par.forward(x), "router weights differ", failures)
    if RANK == last:
        par.params["W_gate"][0, 0] -= 1e-9
    expect_error("bad x on one rank",
                 lambda: par.forward(x[:, :-1] if RANK == last else x), f"rank {last}: ValueError: x must", failures)
    par.forward(x)
    expect_error("bad dy on one rank",
                 lambda: par.backward(np.zeros((4, D)) if RANK == last else np.zeros_like(y)),
                 f"rank {last}: ValueError: dy", failures)
    par.backward(np.ones_like(y))                      # still usable after the errors


def gradient_check(cfg, seed, failures):
    """Central differences of the global loss Σ_ranks ⟨dout, y⟩ + aux_loss over the global
    parameters (x, the router, all E experts); every rank nudges the same entry."""
    case = f"gradcheck {cfg}"
    rng = np.random.default_rng(seed)
    ref = MoELayer(3, 4, 4, rng=rng, **cfg)
    for name, p in ref.params.items():
        p[...] = rng.standard_normal(p.shape) * (0.5 if name == "W_noise" else 1.0)
    T = 2 * P + 2
    x, noise, dout = (rng.standard_normal((T, 3)), rng.standard_normal((T, 4)), rng.standard_normal((T, 3)))
    par = ExpertParallelMoELayer.from_layer(ref, comm)
    s, (lo, hi) = slices(T)[RANK], (par.expert_ids.start, par.expert_ids.stop)
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


def main():
    failures, passed = [], 0
    steps = [(f"equality {i}", lambda i=i, c=c: equality_case(i, c, failures))
             for i, c in enumerate(EQUALITY_CASES)]
    steps.append(("bad input", lambda: bad_input_cases(failures)))
    steps.append(("gradcheck topk", lambda: gradient_check(
        dict(k=2, gate="topk", noisy=True, balance="importance+load", capacity_factor=1.0,
             z_loss_coef=0.01), 3, failures)))
    steps.append(("gradcheck switch", lambda: gradient_check(
        dict(k=1, gate="switch", noisy=True, balance="switch", capacity_factor=1.0), 5, failures)))
    only = sys.argv[1:]     # e.g. "equality bad": run the steps whose names contain a word
    for name, fn in steps:
        if only and not any(o in name for o in only):
            continue
        before = len(failures)
        try:
            fn()
        except Exception:   # noqa: BLE001 - report and go on (the others raised too, or time out)
            failures.append(f"{name}: {traceback.format_exc(limit=-3)}")
        passed += len(failures) == before
    everyone = comm.gather(failures, root=0)
    if RANK == 0:
        print(json.dumps({"ranks": P, "passed": passed,
                          "failures": [f"rank {r}: {f}" for r, fs in enumerate(everyone) for f in fs]}))


if __name__ == "__main__":
    main()
