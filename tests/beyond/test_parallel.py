"""ExpertParallelMoELayer: equal to the single-process MoELayer under mpiexec -n 2 and -n 4,
and no failure on one rank leaves another waiting.

The cases live in ``mpi_cases.py``: a worker script run by mpiexec through a subprocess,
with a timeout so a hang fails instead of stalling CI. Each case takes a communicator, so
the same cases also run here on simulated ranks (``run_ranks``), which report a rank that
would wait forever under MPI as an error. The plan's bookkeeping (``global_plan``) is also
checked without MPI, against ``make_plan`` on the concatenated batch.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import mpi_cases
from minimoe import MoELayer
from minimoe.beyond.parallel import ExpertParallelMoELayer, global_plan, run_ranks
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


def launch(n, *steps, timeout=150, python=()):
    """Run mpi_cases.py under mpiexec -n n: the finished process (a hang fails the test)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [find_mpiexec(), "-n", str(n), sys.executable, *python, str(HERE / "mpi_cases.py"), *steps]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"mpiexec -n {n} {' '.join(steps)} did not finish in {timeout} s (a hang):\n{err.stdout}\n"
                    f"{err.stderr}")


def run_cases(n, *steps, timeout=150):
    done = launch(n, *steps, timeout=timeout)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    assert done.returncode == 0 and lines, f"mpiexec -n {n} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return json.loads(lines[-1])


@needs_mpi
def test_two_ranks_equal_single_process_with_gradcheck_and_bad_input():
    report = run_cases(2, "equality", "bad", "gradcheck")
    assert report["ranks"] == 2
    assert report["failures"] == [], "\n".join(report["failures"])
    assert report["passed"] == len(mpi_cases.EQUALITY_CASES) + 1 + 3     # equality, bad input, 3 gradient checks


@needs_mpi
def test_four_ranks_equal_single_process_and_bad_input():
    report = run_cases(4, "equality", "bad")
    assert report["ranks"] == 4
    assert report["failures"] == [], "\n".join(report["failures"])
    assert report["passed"] == len(mpi_cases.EQUALITY_CASES) + 1


@needs_mpi
@pytest.mark.parametrize("n", [2, 4])
def test_a_failure_on_one_rank_ends_every_rank_within_seconds(n):
    """Issue 21, finding 1: each of these hung the other ranks forever (mpiexec never returned).
    Now every rank raises one error naming the failing rank and the cause; the whole list has
    60 s (a hang fails here), and each case's time to the error on the slowest rank is printed."""
    report = run_cases(n, "failures", timeout=60)
    assert report["failures"] == [], "\n".join(report["failures"])
    assert report["passed"] == 1 and len(report["times"]) == len(mpi_cases.FAILURE_CASES)
    print(f"\nmpiexec -n {n}: seconds to the error on the slowest rank")
    for name, seconds in report["times"].items():
        print(f"  {seconds:6.3f}  {name}")
        assert seconds < 20, name


@needs_mpi
def test_an_interrupt_inside_the_layer_under_python_m_mpi4py_ends_every_rank():
    """KeyboardInterrupt is not the layer's to catch (a rank being stopped); under
    ``python -m mpi4py`` (the docstring's advice) it aborts every rank, none waits."""
    done = launch(2, "interrupt", timeout=60, python=("-m", "mpi4py"))
    assert done.returncode != 0 and "KeyboardInterrupt" in done.stderr, done.stdout + done.stderr


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
@pytest.mark.parametrize("i", range(len(mpi_cases.EQUALITY_CASES)),
                         ids=lambda i: "-".join(f"{v}" for v in mpi_cases.EQUALITY_CASES[i].values()))
def test_simulated_ranks_equal_the_single_process_layer(i):
    """mpi_cases' equality cases on simulated ranks (lesson 11's fallback): every option of MoELayer."""
    for P in (2, 4):
        failures = run_ranks(P, lambda comm: _failures(mpi_cases.equality_case, comm, i))
        assert failures == [[]] * P, failures


def _failures(case, comm, *args):
    found = []
    case(comm, *args, found)
    return found


@pytest.mark.parametrize("i", range(len(mpi_cases.FAILURE_CASES)), ids=lambda i: mpi_cases.FAILURE_CASES[i][0])
@pytest.mark.parametrize("P", [2, 4])
def test_simulated_failure_on_one_rank_ends_every_rank(i, P):
    """mpi_cases' failure cases on simulated ranks: every rank raises the one error naming the
    failing rank (a rank left waiting would get RankSkipped, which fails the case)."""
    results = run_ranks(P, lambda comm: mpi_cases.failure_case(comm, i), timeout=10)
    assert [problem for problem, _ in results] == [None] * P


def test_simulated_bad_input_raises_on_every_rank_not_a_hang():
    assert run_ranks(2, lambda comm: _failures(mpi_cases.bad_input_cases, comm)) == [[], []]
    errors = []

    def rank(comm):
        try:
            ExpertParallelMoELayer(4, 4, 6, rng=np.random.default_rng(0), comm=comm)
        except ValueError as err:
            errors.append(str(err))
    run_ranks(4, rank)
    assert len(errors) == 4 and all(e.startswith("ranks 0, 1, 2, 3 failed: ValueError: n_experts=6 must be divisible "
                                                 "by the number of ranks P=4") for e in errors), errors


def test_batched_input_and_a_failed_forward_leaves_the_layer_as_it_was():
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
    assert all("rank 1 failed: ValueError: x must have width d_model=4" in r[1] for r in runs)


def test_from_layer_leaves_the_source_layer_untouched_and_ranks_draw_different_noise():
    ref = MoELayer(4, 6, 4, k=2, rng=np.random.default_rng(3))
    state = ref.rng.bit_generator.state
    params = {n: p.copy() for n, p in ref.params.items()}
    x = np.random.default_rng(0).standard_normal((5, 4))

    def rank(comm):
        par = ExpertParallelMoELayer.from_layer(ref, comm)
        par.params["W1"] += 1.0                        # the twin's arrays are its own
        par.forward(x)                                 # noise from the rank's own stream
        return par.stats["topk_idx"], par._cache.logits.noise
    runs = run_ranks(2, rank)
    assert ref.rng.bit_generator.state == state
    assert all(np.array_equal(p, params[n]) for n, p in ref.params.items())
    assert not np.allclose(runs[0][1], runs[1][1])     # the same x, different noise on each rank
    errors = run_ranks(1, lambda comm: _raises(lambda: ExpertParallelMoELayer.from_layer("not a layer", comm)))
    assert errors == ["TypeError: rank 0 failed: TypeError: layer must be a MoELayer, got str"]


def _raises(fn):
    try:
        fn()
    except Exception as err:   # noqa: BLE001
        return f"{type(err).__name__}: {err}"
    return "no error"


def test_a_rank_whose_experts_get_no_patients_and_a_rank_with_one_token():
    ref = MoELayer(3, 4, 4, k=1, noisy=False, balance="importance", capacity_factor=1.0,
                   rng=np.random.default_rng(0))
    ref.params["W_gate"][...] = 0
    ref.params["W_gate"][:, 0] = 5.0                   # every positive-sum token goes to expert 0
    x = np.abs(np.random.default_rng(1).standard_normal((7, 3)))
    dy = np.random.default_rng(2).standard_normal((7, 3))
    y, dx = ref.forward(x), None
    dx = ref.backward(dy)
    bounds = [0, 1, 7]                                  # rank 0 has one token, rank 1 six

    for fast in (True, False):
        ref.fast = fast

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
    """from_layer keeps MoELayer's fast= (fast.py's bank or the textbook's): equal to 1e-12 either way."""
    rng = np.random.default_rng(21)
    ref = MoELayer(5, 7, 4, k=2, balance="importance+load", capacity_factor=0.75, activation="swiglu",
                   rng=rng, fast=fast)
    ref.params["W_gate"] *= 20                             # skewed, so capacity drops
    x, noise, dy = (rng.standard_normal((13, 5)), rng.standard_normal((13, 4)), rng.standard_normal((13, 5)))
    y = ref.forward(x, noise=noise)
    dx = ref.backward(dy)
    assert ref.stats["dropped"] > 0

    def rank(comm):
        s = slice(0, 6) if comm.Get_rank() == 0 else slice(6, 13)
        par = ExpertParallelMoELayer.from_layer(ref, comm)
        bank = []
        out = par.forward(x[s], noise=noise[s])
        bank.append(type(par._cache.trip.bank).__name__)
        return par.fast, out, par.backward(dy[s]), par.grads, bank
    runs = run_ranks(2, rank)
    assert [r[0] for r in runs] == [fast, fast]
    assert runs[0][4] == ["FastBankCache" if fast else "BankCache"]
    np.testing.assert_allclose(np.concatenate([r[1] for r in runs]), y, rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.concatenate([r[2] for r in runs]), dx, rtol=0, atol=1e-12)
    for name in ("W1", "b1", "W2", "b2", "W3", "b3"):
        np.testing.assert_allclose(np.concatenate([r[3][name] for r in runs]), ref.grads[name], rtol=0, atol=1e-12)
    for name in ("W_gate", "W_noise"):
        np.testing.assert_allclose(runs[1][3][name], ref.grads[name], rtol=0, atol=1e-12)


def test_options_are_the_layers_config_and_a_parameter_it_would_drop_is_refused():
    """The options come from MoELayer's cfg (one place lists them); a parameter the config does
    not use is refused with its name on every rank, never silently dropped."""
    ref = MoELayer(4, 6, 4, k=2, rng=np.random.default_rng(3), activation="swiglu", switch_fraction="all",
                   balance="switch", balance_groups="sequence", fast=False)

    def rank(comm):
        par = ExpertParallelMoELayer.from_layer(ref, comm)
        built = ExpertParallelMoELayer(4, 6, 4, k=2, rng=np.random.default_rng(3), activation="swiglu",
                                       switch_fraction="all", balance="switch", balance_groups="sequence",
                                       fast=False, comm=comm)
        return par.cfg, built.cfg, repr(par), sorted(par.params), par.params["W3"].shape
    runs = run_ranks(2, rank)
    assert all(r[0] == ref.cfg and r[1] == ref.cfg for r in runs)
    assert runs[1][2].startswith("ExpertParallelMoELayer(d_model=4") and runs[1][2].endswith(
        "ranks=2, rank=1, experts=2..3)")
    assert runs[0][3] == sorted(ref.params) and runs[0][4] == (2, 4, 6)
    ref.params["W9"] = np.zeros((4, 4))
    errors = run_ranks(2, lambda comm: _raises(lambda: ExpertParallelMoELayer.from_layer(ref, comm)))
    assert all(e.startswith("ValueError: ranks 0, 1 failed: ValueError: layer.params has W9, which a MoELayer "
                            "with these options does not use") for e in errors), errors
