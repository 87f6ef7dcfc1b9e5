"""``mpiexec -n 2 python -m minimoe.bench --parallel``: the report's structure (no timing asserted)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from minimoe import bench
from test_parallel import ROOT, find_mpiexec, mpi_missing

pytestmark = pytest.mark.skipif(mpi_missing() is not None, reason=str(mpi_missing()))


@pytest.fixture(scope="module")
def parallel_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("pbench") / "pbench.json"
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = [find_mpiexec(), "-n", "2", sys.executable, "-m", "minimoe.bench", "--parallel", "--quick",
           "--no-progress", "--json", str(path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    return proc, path


def test_parallel_report_has_the_table_and_one_json_line(parallel_run):
    proc, path = parallel_run
    assert proc.returncode == 0, proc.stderr
    for word in ("moe_ms", "ceiling_ms", "ceiling/moe", "E64/E8", "grouped_ms", "grouped E64/E8", "peak_MiB",
                 "single_ms", "par/single", "exchange_ms", "MiB/step", "2 ranks"):
        assert word in proc.stdout, word
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert json.loads(path.read_text()) == result
    assert sum(ln.startswith("{") for ln in lines) == 1           # rank 0 alone prints


def test_parallel_result_is_consistent(parallel_run):
    result = json.loads(parallel_run[0].stdout.strip().splitlines()[-1])
    assert result["ranks"] == 2 and result["config"]["tokens_per_rank"] == bench.QUICK["T"] // 2
    rows = result["results"]
    assert [(r["dtype"], r["E"]) for r in rows] == [("float64", 8), ("float64", 64), ("float32", 8), ("float32", 64)]
    d, k = result["config"]["d"], result["config"]["k"]
    for r in rows:
        n = result["config"]["repeats"]
        assert len(r["moe_ms_all"]) == len(r["single_ms_all"]) == len(r["grouped_ms_all"]) == n
        assert r["moe_ms"] == pytest.approx(np.median(r["moe_ms_all"]), rel=1e-3)
        assert r["single_ms"] == pytest.approx(np.median(r["single_ms_all"]), rel=1e-3)
        assert r["parallel/single"] == pytest.approx(r["moe_ms"] / r["single_ms"])
        assert r["ceiling/moe"] == pytest.approx(r["ceiling_ms"] / r["moe_ms"])
        base = next(b for b in rows if b["dtype"] == r["dtype"] and b["E"] == 8)
        assert r["E/E8"] == pytest.approx(r["moe_ms"] / base["moe_ms"])
        assert 0 <= r["exchange_ms"] and r["peak_mib"] > 0
        # bytes: 4 exchanges of d-wide rows, at most every routed row of both ranks
        itemsize = np.dtype(r["dtype"]).itemsize
        assert 0 < r["sent_bytes"] <= 4 * bench.QUICK["T"] * k * d * itemsize
        assert r["sent_bytes"] % (d * itemsize) == 0
    assert result["targets"] == {}                                 # only the full configuration has targets


ATOMIC_SCRIPT = r'''
import json, os, sys
from minimoe import bench
from minimoe.validate import atomic_open
path = sys.argv[1]
dumps = json.dumps                               # bench.json is the json module: keep the real one
bench.run_parallel_bench = lambda *a, **kw: {"rows": [1, 2]}
bench.format_parallel_report = lambda result: "report"
bench.main(["--parallel", "--quick", "--no-progress", "--json", path])
assert json.load(open(path)) == {"rows": [1, 2]}, open(path).read()
bench.json.dumps = lambda obj: "x" * 10          # the next result, interrupted while written

def interrupted(p, text):
    with atomic_open(p) as f:
        f.write(text[:3])
        raise KeyboardInterrupt

bench.atomic_write_text = interrupted
try:
    bench.main(["--parallel", "--quick", "--no-progress", "--json", path])
except KeyboardInterrupt:
    pass
except SystemExit as stop:                       # the command line ends an interrupt with status 130
    assert stop.code == 130, stop.code
else:
    raise SystemExit("the interrupted write was not interrupted: --parallel does not write through atomic_write_text")
print(dumps({"after": open(path).read(), "files": sorted(os.listdir(os.path.dirname(path)))}))
'''


def test_parallel_json_is_written_atomically_over_an_old_one(tmp_path):
    """--parallel writes its JSON as the single-process mode does: an interrupted write keeps the old file."""
    path = tmp_path / "pbench.json"
    path.write_text("old, and longer than the new result will be ....................................")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([find_mpiexec(), "-n", "1", sys.executable, "-c", ATOMIC_SCRIPT, str(path)],
                          capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert json.loads(out["after"]) == {"rows": [1, 2]} and out["files"] == ["pbench.json"]
