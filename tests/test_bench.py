"""The benchmark runs and reports; the speed paths it motivated give the plain answers.

No timing is asserted anywhere: the benchmark *reports* speed, the tests check that
it runs, that its report is well formed and that its ratios are the ratios of its
own figures. The second half checks each shortcut taken for speed (in router.py and
experts.py) against the slow, obvious computation it replaces.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from minimoe import bench
from minimoe.core.experts import init_expert_params
from minimoe.core.fast import experts_backward_fast as experts_backward   # the fast bank these tests are about
from minimoe.core.fast import experts_forward_fast as experts_forward
from minimoe.core.router import router_logits_backward, router_logits_forward, softplus, topk_indices


# --------------------------------------------------------------------------- the command
@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One ``python -m minimoe.bench --quick`` in a subprocess, as a user would type it."""
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    # One BLAS thread: on a shared 2-core machine many small multi-threaded matmuls crawl.
    proc = subprocess.run([sys.executable, "-m", "minimoe.bench", "--quick", "--no-progress", "--threads", "1",
                           "--json", str(path)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "MPLBACKEND": "Agg"})
    return proc, path


def test_quick_run_succeeds_and_prints_table_and_one_json_line(quick_run):
    proc, path = quick_run
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    for word in ("moe_ms", "ceiling_ms", "ceiling/moe", "E64/E8", "grouped_ms", "grouped/moe", "grouped E64/E8",
                 "peak_MiB", "BLAS", "machine"):
        assert word in proc.stdout, word
    result = json.loads(lines[-1])                       # the last line is the machine-readable one
    assert json.loads(path.read_text()) == result       # and --json wrote the same thing


def test_quick_result_is_consistent(quick_run):
    result = json.loads(quick_run[0].stdout.strip().splitlines()[-1])
    rows = result["results"]
    assert [(r["dtype"], r["E"]) for r in rows] == [("float64", 8), ("float64", 64), ("float32", 8), ("float32", 64)]
    cfg = result["config"]
    assert cfg["T"] == bench.QUICK["T"] and cfg["balance"] == "switch" and cfg["capacity_factor"] is None
    for r in rows:
        assert len(r["moe_ms_all"]) == len(r["ceiling_ms_all"]) == len(r["grouped_ms_all"]) == cfg["repeats"]
        assert r["moe_ms"] == pytest.approx(np.median(r["moe_ms_all"]), rel=1e-3)
        assert r["grouped_ms"] == pytest.approx(np.median(r["grouped_ms_all"]), rel=1e-3)
        assert r["ceiling_ms"] == pytest.approx(result["ceiling_ms"][r["dtype"]])
        assert r["ceiling/moe"] == pytest.approx(r["ceiling_ms"] / r["moe_ms"])
        assert r["grouped/moe"] == pytest.approx(r["grouped_ms"] / r["moe_ms"])
        base = next(b for b in rows if b["dtype"] == r["dtype"] and b["E"] == 8)
        assert r["E/E8"] == pytest.approx(r["moe_ms"] / base["moe_ms"])
        assert r["grouped E/E8"] == pytest.approx(r["grouped_ms"] / base["grouped_ms"])
        assert r["peak_mib"] > 0
    assert result["targets"] == {}                       # targets only judge the full configuration
    assert result["machine"]["numpy"] == np.__version__ and result["machine"]["cores"] >= 1
    assert [b["num_threads"] for b in result["machine"]["blas"]] == [1] * len(result["machine"]["blas"])


def test_help_documents_every_option():
    proc = subprocess.run([sys.executable, "-m", "minimoe.bench", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0
    for option in ("--quick", "--repeats", "--warmup", "--capacity-factor", "--balance", "--threads", "--json",
                   "--no-progress"):
        assert option in proc.stdout, option


@pytest.mark.parametrize("argv, msg", [
    (["--repeats", "0"], "argument --repeats: expected a whole number >= 1, got '0'"),
    (["--repeats", "many"], "argument --repeats: expected a whole number >= 1, got 'many'"),
    (["--warmup", "-2"], "argument --warmup: expected a whole number >= 1"),
    (["--capacity-factor", "-1"], "argument --capacity-factor: expected a number > 0 or 'none'"),
    (["--capacity-factor", "nan"], "argument --capacity-factor: expected a number > 0 or 'none'"),
    (["--threads", "0"], "argument --threads: expected a whole number >= 1"),
    (["--json", "/no/such/folder/out.json"], "--json: folder '/no/such/folder' does not exist"),
    (["--colour", "red"], "unrecognized arguments: --colour"),
])
def test_bad_arguments_fail_clearly(argv, msg, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(argv + ["--quick", "--no-progress"])
    assert exc.value.code == 2
    assert msg in capsys.readouterr().err


def test_balance_option_reaches_the_layer_through_its_config(capsys, monkeypatch):
    """--balance picks the layer's balancing loss; the layer is built from one MoEConfig, whose
    options are what the JSON reports."""
    built = []
    real = bench.MoELayer.from_config
    monkeypatch.setattr(bench.MoELayer, "from_config", classmethod(lambda cls, cfg, rng=None: built.append(cfg)
                                                                   or real.__func__(cls, cfg, rng=rng)))
    result = bench.main(["--quick", "--no-progress", "--threads", "1", "--repeats", "1", "--balance", "load"])
    assert built and all(cfg.balance == "load" for cfg in built)
    assert result["config"]["balance"] == "load" and result["config"]["switch_fraction"] == "first"
    assert "balance='load'" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--balance", "loads"])


def test_capacity_factor_option_reaches_the_layer(capsys):
    result = bench.main(["--quick", "--no-progress", "--threads", "1", "--repeats", "1", "--capacity-factor", "1.0"])
    assert result["config"]["capacity_factor"] == 1.0
    assert "capacity_factor=1.0" in capsys.readouterr().out


# --------------------------------------------------------------------------- the pieces
def test_time_interleaved_rotates_the_order_and_skips_the_warmup():
    calls = []
    steps = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    times = bench.time_interleaved(steps, repeats=4, warmup=2)
    assert calls == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert {k: len(v) for k, v in times.items()} == {"a": 4, "b": 4, "c": 4}
    assert all(t >= 0 for v in times.values() for t in v)


def test_peak_mib_sees_numpy_buffers():
    assert bench.peak_mib(lambda: np.ones(4 * 2**20 // 8)) >= 4.0        # a 4 MiB float64 array
    assert bench.peak_mib(lambda: None) < 0.5


def test_steps_do_what_they_say():
    cfg = dict(bench.QUICK, T=16)
    step, layer = bench.make_moe_step(8, np.float32, cfg)
    assert np.any(layer.params["W_noise"] != 0)         # not the W_noise = 0 special case
    step()
    assert layer.grads["W1"].dtype == np.float32 and np.any(layer.grads["W1"] != 0)
    assert layer.stats["dropped"] == 0 and int(layer.stats["load"].sum()) == 16 * 2
    bench.make_ceiling_step(np.float64, cfg)()          # six plain matmuls, no error


@pytest.mark.parametrize("E", [1, 3, 8])
def test_grouped_ceiling_writes_every_product_into_preallocated_outputs(E):
    # T·k = 2·13 = 26 rows: E=3 gives groups of unequal size. The step allocates nothing
    # (each of its 6·E matmuls writes into an output made once), so its peak memory is ~0.
    step = bench.make_grouped_ceiling_step(E, np.float64, dict(bench.QUICK, T=13))
    step()
    assert bench.peak_mib(step) < 0.05


def _rows(moe, grouped):
    """Benchmark rows for the full configuration with the given (E=8, E=64) times."""
    return [{"dtype": dt, "E": E, "moe_ms": m, "grouped_ms": g, "ceiling/moe": 100.0 / m,
             "E/E8": m / moe[0], "grouped E/E8": g / grouped[0]}
            for dt in ("float64", "float32") for E, m, g in zip((8, 64), moe, grouped)]


def test_targets_judge_the_full_configuration_and_carry_the_grouped_bound():
    met = bench._targets(bench.FULL, _rows(moe=(125.0, 150.0), grouped=(100.0, 110.0)))
    assert met["ceiling/moe (float64, E=8)"] == {"op": ">=", "target": 0.65, "measured": 0.8, "met": True}
    assert met["E64/E8 (float32)"] == {"op": "<=", "target": 1.25, "measured": 1.2, "met": True, "bound": 1.1}
    missed = bench._targets(bench.FULL, _rows(moe=(200.0, 300.0), grouped=(100.0, 170.0)))
    assert not missed["ceiling/moe (float64, E=8)"]["met"] and not missed["E64/E8 (float64)"]["met"]
    assert missed["E64/E8 (float64)"]["bound"] == pytest.approx(1.7)
    report = bench.format_report({"config": {**bench.FULL, **bench.LAYER, "capacity_factor": None},
                                  "machine": bench.machine_info(), "results": [
                                      {**r, "ceiling_ms": 100.0, "grouped/moe": r["grouped_ms"] / r["moe_ms"],
                                       "peak_mib": 1.0} for r in _rows((200.0, 300.0), (100.0, 170.0))],
                                  "targets": missed})
    assert "target E64/E8 (float64) <= 1.25: measured 1.50 -> NOT met  (the grouped matmuls alone: 1.70)" in report


# --------------------------------------------------------------------------- speed paths = plain paths
def _tie_heavy(rng, T, E, dtype):
    """Scores drawn from a few integers, so almost every row has exact ties."""
    return rng.integers(-2, 3, size=(T, E)).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("E, k", [(1, 1), (4, 2), (8, 8), (12, 3), (64, 2), (20, 9), (20, 20)])
def test_topk_indices_equals_the_stable_sort_even_with_ties(rng, dtype, E, k):
    for H in (_tie_heavy(rng, 50, E, dtype), rng.standard_normal((50, E)).astype(dtype)):
        expected = np.argsort(-H, axis=-1, kind="stable")[:, :k]
        np.testing.assert_array_equal(topk_indices(H, k), expected)


def test_topk_indices_with_infinities_falls_back_to_the_sort():
    H = np.array([[-np.inf, -np.inf, 1.0, -np.inf], [np.inf, 0.0, np.inf, -1.0]])
    np.testing.assert_array_equal(topk_indices(H, 3), [[2, 0, 1], [0, 2, 1]])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_softplus_matches_logaddexp(dtype):
    z = np.concatenate([np.linspace(-1e4, 1e4, 20001), np.linspace(-60, 60, 20001),
                        [0.0, -0.0, 1e-30, -1e-30, 88.7, -103.0, 709.0, -745.0]]).astype(dtype)
    got, want = softplus(z), np.logaddexp(dtype(0), z)
    assert got.dtype == dtype
    ulps = np.abs(got - want) / np.spacing(np.maximum(np.abs(want), np.finfo(dtype).tiny))
    assert ulps.max() <= 4
    np.testing.assert_array_equal(softplus(np.array([np.inf, -np.inf])), [np.inf, 0.0])


def test_router_noise_gradient_uses_the_logistic_function(rng):
    T, d, E = 7, 5, 4
    x, Wg, Wn = rng.standard_normal((T, d)), rng.standard_normal((d, E)), 3 * rng.standard_normal((d, E))
    noise, dH = rng.standard_normal((T, E)), rng.standard_normal((T, E))
    _, cache = router_logits_forward(x, Wg, Wn, noise=noise)
    _, grads = router_logits_backward(dH, cache)
    logistic = 1 / (1 + np.exp(-(x @ Wn)))                 # softplus' written the textbook way
    np.testing.assert_allclose(grads["W_noise"], x.T @ (noise * dH * logistic), rtol=1e-12)


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_bank_leaves_its_inputs_alone_and_backward_can_be_repeated(rng, activation):
    E, d, h, sizes = 4, 3, 6, [3, 0, 5, 2]
    p = init_expert_params(E, d, h, rng)
    p["b1"] = rng.standard_normal((E, h))
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    x, dy = rng.standard_normal((10, d)), rng.standard_normal((10, d))
    x0, dy0, p0 = x.copy(), dy.copy(), {k: v.copy() for k, v in p.items()}
    y, cache = experts_forward(x, offsets, **p, activation=activation)
    a0 = cache.a.copy()
    first, second = experts_backward(dy, cache), experts_backward(dy, cache)
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(dy, dy0)
    np.testing.assert_array_equal(cache.a, a0)
    assert all(np.array_equal(p[k], p0[k]) for k in p)
    np.testing.assert_array_equal(first[0], second[0])
    assert all(np.array_equal(first[1][k], second[1][k]) for k in first[1])


def test_idle_experts_get_zeros_even_from_recycled_memory(rng):
    E, d, h = 6, 8, 16
    p = init_expert_params(E, d, h, rng)
    busy = np.arange(E + 1) * 4                             # every expert has tokens: dirty buffers
    x = rng.standard_normal((4 * E, d))
    experts_backward(np.ones_like(x), experts_forward(x, busy, **p)[1])
    idle = np.array([0, 12, 12, 24, 24, 24, 24])            # experts 1, 3, 4, 5 get nobody
    _, grads = experts_backward(np.ones((24, d)), experts_forward(x[:24], idle, **p)[1])
    for e in (1, 3, 4, 5):
        assert all(np.all(g[e] == 0) for g in grads.values()), e


# --------------------------------------------------------------------------- issue 14: --threads, --json
class _Stop(Exception):
    """Raised instead of running the benchmark: these tests are about what happens before."""


def _no_run(*a, **kw):
    raise _Stop


def test_threads_above_the_core_count_warns(monkeypatch):
    pytest.importorskip("threadpoolctl")
    monkeypatch.setattr(bench.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(bench.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(bench, "run_bench", _no_run)
    with pytest.warns(RuntimeWarning, match="--threads 3 is more than the 2 cores available"), pytest.raises(_Stop):
        bench.main(["--quick", "--no-progress", "--threads", "3"])
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")            # at or below the core count: no warning
        with pytest.raises(_Stop):
            bench.main(["--quick", "--no-progress", "--threads", "2"])


@pytest.mark.parametrize("where, msg", [("DIR", "is a directory; give a file name"),
                                        ("/proc/bench.json", "'/proc' is not writable")])
def test_bad_json_paths_are_rejected_before_the_run(tmp_path, capsys, monkeypatch, where, msg):
    monkeypatch.setattr(bench, "run_bench", _no_run)
    with pytest.raises(SystemExit) as exc:
        bench.main(["--quick", "--no-progress", "--json", where.replace("DIR", str(tmp_path))])
    assert exc.value.code == 2 and msg in capsys.readouterr().err


def test_json_is_written_atomically_over_an_old_one(tmp_path, monkeypatch):
    path = tmp_path / "bench.json"
    path.write_text("old, and longer than the new result will be ....................................")
    monkeypatch.setattr(bench, "run_bench", lambda *a, **kw: {"rows": [1, 2]})
    monkeypatch.setattr(bench, "format_report", lambda result: "report")
    bench.main(["--quick", "--no-progress", "--json", str(path)])
    assert json.loads(path.read_text()) == {"rows": [1, 2]}
    assert os.listdir(tmp_path) == ["bench.json"]
    # An interrupted write keeps the old file whole.
    monkeypatch.setattr(bench.json, "dumps", lambda obj: "x" * 10)

    def interrupted(p, text):
        from minimoe.validate import atomic_open
        with atomic_open(p) as f:
            f.write(text[:3])
            raise KeyboardInterrupt

    monkeypatch.setattr(bench, "atomic_write_text", interrupted)
    with pytest.raises(SystemExit) as exc:                 # Ctrl-C: one line and exit 130 (issue 21)
        bench.main(["--quick", "--no-progress", "--json", str(path)])
    assert exc.value.code == 130
    assert json.loads(path.read_text()) == {"rows": [1, 2]} and os.listdir(tmp_path) == ["bench.json"]


# --------------------------------------------------------------------------- issue 21: every argument before any timing
@pytest.mark.parametrize("argv, msg", [
    (["--capacity-factor", "1e10"],
     f"argument --capacity-factor: expected a number > 0 or 'none', and at most {bench.MAX_CAPACITY_FACTOR:g} "
     f"(the layer's limit), got '1e10'"),
    (["--capacity-factor", "inf"], "argument --capacity-factor: expected a number > 0"),
    (["--json", ""], "--json is empty: give a file name"),
    (["--json", "NEW/"], "--json 'NEW/' ends with a slash: give a file name"),
    (["--json", "FILE/out.json"], "exists and is not a directory"),
    (["--repeats", "0"], "argument --repeats: expected a whole number >= 1, got '0'"),
    (["--repeats", "1.5"], "argument --repeats: expected a whole number >= 1, got '1.5'"),
    (["--warmup", "0"], "argument --warmup: expected a whole number >= 1, got '0'"),
    (["--threads", "-1"], "argument --threads: expected a whole number >= 1, got '-1'"),
])
def test_bad_arguments_are_refused_before_any_timing(tmp_path, capsys, monkeypatch, argv, msg):
    (tmp_path / "a_file").write_text("x")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bench, "run_bench", _no_run)
    with pytest.raises(SystemExit) as exc:
        bench.main([a.replace("FILE", "a_file") for a in argv] + ["--quick", "--no-progress"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err
    assert os.listdir(tmp_path) == ["a_file"]             # and nothing was made: no NEW/ folder


def test_the_largest_capacity_factor_the_layer_takes_is_accepted(monkeypatch):
    seen = []
    monkeypatch.setattr(bench, "run_bench", lambda cfg, cf, progress: seen.append(cf) or _no_run())
    with pytest.raises(_Stop):
        bench.main(["--quick", "--no-progress", "--capacity-factor", repr(bench.MAX_CAPACITY_FACTOR)])
    assert seen == [bench.MAX_CAPACITY_FACTOR]
    from minimoe.core import moe
    assert bench.MAX_CAPACITY_FACTOR is moe.MAX_CAPACITY_FACTOR     # one number, owned by the layer
