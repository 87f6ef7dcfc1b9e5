"""ExpertParallelMoELayer: equal to the single-process MoELayer under mpiexec -n 2 and -n 4.

The MPI cases live in ``mpi_cases.py`` (a worker script run by mpiexec through a
subprocess, with a timeout so a hang fails instead of stalling CI); each rank checks its
slice against ``MoELayer`` on the whole batch to 1e-12. The plan's bookkeeping
(``global_plan``) is also checked here without MPI, against ``make_plan`` on the
concatenated batch, simulating P ranks in one process.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from minimoe.beyond.parallel import global_plan
from minimoe.core.dispatch import expert_capacity, make_plan

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def find_mpiexec():
    """mpiexec beside this Python (a pip-installed MPICH puts it in the venv's bin), else on PATH."""
    beside = Path(sys.executable).parent / "mpiexec"
    return str(beside) if beside.exists() else shutil.which("mpiexec")


def mpi_missing():
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return "mpi4py is not installed (pip install -e '.[mpi]' brings mpi4py and MPICH)"
    if find_mpiexec() is None:
        return "no mpiexec beside the Python executable or on PATH"
    return None


needs_mpi = pytest.mark.skipif(mpi_missing() is not None, reason=str(mpi_missing()))


def run_cases(n, *steps, timeout=150):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [find_mpiexec(), "-n", str(n), sys.executable, str(HERE / "mpi_cases.py"), *steps]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"mpiexec -n {n} did not finish in {timeout} s (a hang?):\n{err.stdout}\n{err.stderr}")
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    assert done.returncode == 0 and lines, f"mpiexec -n {n} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return json.loads(lines[-1])


@needs_mpi
def test_two_ranks_equal_single_process_with_gradcheck_and_bad_input():
    report = run_cases(2)
    assert report["ranks"] == 2
    assert report["failures"] == [], "\n".join(report["failures"])
    assert report["passed"] == 12      # 9 equality cases, the bad inputs, two gradient checks


@needs_mpi
def test_four_ranks_equal_single_process_and_bad_input():
    report = run_cases(4, "equality", "bad")
    assert report["ranks"] == 4
    assert report["failures"] == [], "\n".join(report["failures"])
    assert report["passed"] == 10


@pytest.mark.parametrize("P,k,cf", [(2, 2, 1.0), (4, 2, 0.5), (4, 1, 1.0), (3, 2, None), (2, 3, 0.75)])
def test_global_plan_keeps_what_make_plan_keeps_on_the_whole_batch(P, k, cf):
    """P simulated ranks: the concatenation of their kept masks is make_plan's over the whole batch."""
    rng = np.random.default_rng(P * 10 + k)
    E, sizes = 6, [7, 4, 9, 5][:P]
    # skewed routing: expert 0 is everyone's favourite, so capacity drops
    idx = np.stack([rng.choice(E, size=k, replace=False, p=[.4, .2, .15, .1, .1, .05])
                    for _ in range(sum(sizes))])
    C = expert_capacity(sum(sizes), E, k, cf)
    ref = make_plan(idx, E, C)
    parts = np.split(idx, np.cumsum(sizes)[:-1])
    counts = np.stack([np.bincount((np.arange(k) * E + p).reshape(-1), minlength=k * E).reshape(k, E)
                       for p in parts])
    kept, load = [], np.zeros(E, dtype=int)
    for r, part in enumerate(parts):
        plan, kept_counts = global_plan(part, counts, r, C, E)
        kept.append(plan.kept)
        load += plan.load
        assert np.array_equal(np.diff(plan.offsets), plan.load)
        assert np.array_equal(part.reshape(-1)[plan.order], np.repeat(np.arange(E), plan.load))
    assert np.array_equal(np.concatenate(kept), ref.kept)
    assert np.array_equal(load, ref.load)
    assert np.array_equal(kept_counts.sum(axis=(0, 1)), ref.load)
    if cf is not None and cf <= 1.0:
        assert ref.dropped > 0, "fixture drops nothing"


def test_import_minimoe_does_not_need_mpi4py():
    code = ("import sys, builtins; real = builtins.__import__\n"
            "def no_mpi(name, *a, **k):\n"
            "    if name.startswith('mpi4py'): raise ImportError('no mpi4py here')\n"
            "    return real(name, *a, **k)\n"
            "builtins.__import__ = no_mpi\n"
            "import minimoe, minimoe.beyond.parallel\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.stdout.strip() == "ok", out.stderr


# ----------------------------------------------------------------------------- without MPI: P threads
def test_simulated_ranks_equal_the_single_process_layer():
    """The same layer code on LocalComm threads (lesson 11's fallback) equals MoELayer too."""
    from minimoe import MoELayer
    from minimoe.beyond.parallel import ExpertParallelMoELayer, run_ranks
    rng = np.random.default_rng(11)
    ref = MoELayer(5, 7, 8, k=2, gate="switch", balance="switch", capacity_factor=0.75, z_loss_coef=0.01,
                   rng=rng)
    ref.params["W_gate"] *= 20                             # skewed, so capacity drops
    x, noise, dy = (rng.standard_normal((21, 5)), rng.standard_normal((21, 8)), rng.standard_normal((21, 5)))
    y, dx = ref.forward(x, noise=noise), None
    dx = ref.backward(dy)
    assert ref.stats["dropped"] > 0
    for P in (2, 4):
        bounds = np.linspace(0, 21, P + 1).astype(int)

        def rank(comm):
            r = comm.Get_rank()
            s = slice(bounds[r], bounds[r + 1])
            par = ExpertParallelMoELayer.from_layer(ref, comm)
            out = par.forward(x[s], noise=noise[s]), par.backward(dy[s])
            return out + (par.grads, par.aux_loss, par.stats["dropped"], par.stats["sent_bytes"])
        runs = run_ranks(P, rank)
        np.testing.assert_allclose(np.concatenate([r[0] for r in runs]), y, rtol=0, atol=1e-12)
        np.testing.assert_allclose(np.concatenate([r[1] for r in runs]), dx, rtol=0, atol=1e-12)
        for name in ("W_gate", "W_noise"):
            for r in runs:
                np.testing.assert_allclose(r[2][name], ref.grads[name], rtol=0, atol=1e-12)
        np.testing.assert_allclose(np.concatenate([r[2]["W1"] for r in runs]), ref.grads["W1"], rtol=0, atol=1e-12)
        assert all(abs(r[3] - ref.aux_loss) < 1e-12 and r[4] == ref.stats["dropped"] for r in runs)
        assert all(r[5] > 0 for r in runs)


def test_simulated_bad_input_raises_on_every_rank_not_a_hang():
    from minimoe.beyond.parallel import ExpertParallelMoELayer, run_ranks
    errors = []

    def rank(comm):
        try:
            ExpertParallelMoELayer(4, 4, 6, rng=np.random.default_rng(0), comm=comm)
        except ValueError as err:
            errors.append(str(err))
    run_ranks(4, rank, timeout=20)
    assert len(errors) == 4 and all("n_experts=6 must be divisible by the number of ranks P=4" in e
                                    for e in errors)


def test_batched_input_and_a_failed_forward_leaves_the_layer_as_it_was():
    from minimoe import MoELayer
    from minimoe.beyond.parallel import ExpertParallelMoELayer, run_ranks
    ref = MoELayer(4, 6, 4, k=2, rng=np.random.default_rng(3))
    x = np.random.default_rng(4).standard_normal((2, 6, 4))             # (B, S, d) per rank
    noise = np.random.default_rng(5).standard_normal((2, 2, 6, 4))
    y_ref = ref.forward(np.concatenate([x.reshape(-1, 4)] * 2), noise=noise.reshape(-1, 4))

    def rank(comm):
        r = comm.Get_rank()
        par = ExpertParallelMoELayer.from_layer(ref, comm)
        y = par.forward(x, noise=noise[r])
        stats, params = dict(par.stats), {n: p.copy() for n, p in par.params.items()}
        try:
            par.forward(x[..., :3] if r == 1 else x, noise=noise[r])
        except ValueError as err:
            message = str(err)
        assert par.stats.keys() == stats.keys() and par.stats["sent_bytes"] == stats["sent_bytes"]
        assert all(np.array_equal(p, params[n]) for n, p in par.params.items())
        return y, message
    runs = run_ranks(2, rank)
    np.testing.assert_allclose(np.concatenate([r[0].reshape(-1, 4) for r in runs]), y_ref, rtol=0, atol=1e-12)
    assert runs[0][0].shape == (2, 6, 4)
    assert all("rank 1: ValueError: x must have width d_model=4" in r[1] for r in runs)


def test_from_layer_leaves_the_source_layer_untouched_and_ranks_draw_different_noise():
    from minimoe import MoELayer
    from minimoe.beyond.parallel import ExpertParallelMoELayer, run_ranks
    ref = MoELayer(4, 6, 4, k=2, rng=np.random.default_rng(3))
    state = ref.rng.bit_generator.state
    params = {n: p.copy() for n, p in ref.params.items()}
    x = np.random.default_rng(0).standard_normal((5, 4))

    def rank(comm):
        par = ExpertParallelMoELayer.from_layer(ref, comm)
        par.params["W1"] += 1.0                        # the twin's arrays are its own
        par.forward(x)                                 # noise from the rank's own stream
        return par.stats["topk_idx"], par._cache[1].noise
    runs = run_ranks(2, rank)
    assert ref.rng.bit_generator.state == state
    assert all(np.array_equal(p, params[n]) for n, p in ref.params.items())
    assert not np.allclose(runs[0][1], runs[1][1])     # the same x, different noise on each rank
    try:
        ExpertParallelMoELayer.from_layer("not a layer")
    except TypeError as err:
        assert "layer must be a MoELayer, got str" in str(err)
    else:
        raise AssertionError("no error")


def test_a_rank_whose_experts_get_no_patients_and_a_rank_with_one_token():
    from minimoe import MoELayer
    from minimoe.beyond.parallel import ExpertParallelMoELayer, run_ranks
    ref = MoELayer(3, 4, 4, k=1, noisy=False, balance="importance", capacity_factor=1.0,
                   rng=np.random.default_rng(0))
    ref.params["W_gate"][...] = 0
    ref.params["W_gate"][:, 0] = 5.0                   # every positive-sum token goes to expert 0
    x = np.abs(np.random.default_rng(1).standard_normal((7, 3)))
    dy = np.random.default_rng(2).standard_normal((7, 3))
    y, dx = ref.forward(x), None
    dx = ref.backward(dy)
    bounds = [0, 1, 7]                                  # rank 0 has one token, rank 1 six

    def rank(comm):
        r = comm.Get_rank()
        par = ExpertParallelMoELayer.from_layer(ref, comm)
        out = par.forward(x[bounds[r]:bounds[r + 1]]), par.backward(dy[bounds[r]:bounds[r + 1]])
        return out + (par.stats["received_rows"], par.grads["W1"])
    runs = run_ranks(2, rank)
    np.testing.assert_allclose(np.concatenate([r[0] for r in runs]), y, rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.concatenate([r[1] for r in runs]), dx, rtol=0, atol=1e-12)
    assert runs[1][2] == 0 and not runs[1][3].any()     # rank 1's experts saw nobody: zero gradients
    assert ref.stats["dropped"] == 7 - 2               # C = ceil(7/4) = 2 beds at expert 0


@pytest.mark.parametrize("fast", [True, False])
def test_simulated_ranks_follow_the_layers_fast_or_textbook_path(fast):
    """from_layer mirrors MoELayer's fast= (fast.py's bank or the textbook's): equal to 1e-12 either way."""
    from minimoe import MoELayer
    from minimoe.beyond.parallel import ExpertParallelMoELayer, run_ranks
    rng = np.random.default_rng(21)
    ref = MoELayer(5, 7, 4, k=2, balance="importance+load", capacity_factor=0.75, activation="gelu",
                   rng=rng, fast=fast)
    ref.params["W_gate"] *= 20                             # skewed, so capacity drops
    x, noise, dy = (rng.standard_normal((13, 5)), rng.standard_normal((13, 4)), rng.standard_normal((13, 5)))
    y = ref.forward(x, noise=noise)
    dx = ref.backward(dy)
    assert ref.stats["dropped"] > 0

    def rank(comm):
        s = slice(0, 6) if comm.Get_rank() == 0 else slice(6, 13)
        par = ExpertParallelMoELayer.from_layer(ref, comm)
        return par.fast, par.forward(x[s], noise=noise[s]), par.backward(dy[s]), par.grads
    runs = run_ranks(2, rank)
    assert [r[0] for r in runs] == [fast, fast]
    np.testing.assert_allclose(np.concatenate([r[1] for r in runs]), y, rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.concatenate([r[2] for r in runs]), dx, rtol=0, atol=1e-12)
    for name in ("W1", "b1", "W2", "b2"):
        np.testing.assert_allclose(np.concatenate([r[3][name] for r in runs]), ref.grads[name], rtol=0, atol=1e-12)
    for name in ("W_gate", "W_noise"):
        np.testing.assert_allclose(runs[1][3][name], ref.grads[name], rtol=0, atol=1e-12)


@pytest.mark.parametrize("attr,value,needle", [
    ("switch_fraction", "all", "switch_fraction='all' (only 'first' is supported)"),
    ("balance_groups", "sequence", "balance_groups='sequence' (only 'batch' is supported)"),
    ("activation", "swiglu", "activation='swiglu' (only 'relu' or 'gelu')"),
    ("params", "W3", "parameters W3"),
])
def test_from_layer_refuses_a_layer_option_it_does_not_implement_on_every_rank(attr, value, needle):
    """A MoELayer option this layer does not implement is refused with its name, never computed wrongly;
    an attribute at its supported value (or absent: an older MoELayer) is accepted."""
    from minimoe import MoELayer
    from minimoe.beyond.parallel import ExpertParallelMoELayer, run_ranks
    ref = MoELayer(4, 6, 4, k=2, rng=np.random.default_rng(3))
    errors = []

    def rank(comm):
        try:
            ExpertParallelMoELayer.from_layer(ref, comm)
        except ValueError as err:
            errors.append(str(err))
    run_ranks(2, rank, timeout=20)
    assert errors == []
    if attr == "params":
        ref.params["W3"] = np.zeros((4, 4))
    else:
        supported = {"switch_fraction": "first", "balance_groups": "batch", "activation": "relu"}[attr]
        setattr(ref, attr, supported)
        run_ranks(2, rank, timeout=20)
        assert errors == []
        setattr(ref, attr, value)
    run_ranks(2, rank, timeout=20)
    assert len(errors) == 2 and all(needle in e and "cannot mirror this MoELayer" in e for e in errors), errors
