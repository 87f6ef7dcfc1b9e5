"""`python -m minimoe`: the quick demo runs end to end, writes its figures, and rejects bad arguments."""
import json
import os
import subprocess
import sys

import pytest

from minimoe import figures
from minimoe.__main__ import QUICK, format_table, main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FIGURES = ("clinic_summary.png", "learning_curves.png", "expert_load.png", "expert_specialty.png",
           "clinic_data.png")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["--quick", "--out", str(out), "--no-progress"])
    return code, out, buf.getvalue()


def test_quick_demo_runs_and_prints_the_table(quick_run):
    code, _, text = quick_run
    assert code == 0
    for title in ("second opinion", "generalist", "ask every specialist", "GP referral"):
        assert title in text
    for column in ("test acc", "params", "FLOPs/patient", "load CV"):
        assert column in text


def test_quick_demo_writes_its_figures_and_results(quick_run):
    _, out, text = quick_run
    for name in FIGURES:
        path = out / name
        assert path.exists(), name
        data = path.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000, name
    res = json.loads((out / "results.json").read_text())
    assert [r["kind"] for r in res["rows"]] == ["ensemble", "generalist", "dense_moe", "sparse_moe"]
    rows = {r["kind"]: r for r in res["rows"]}
    # compute is matched: the generalist costs at least as much per patient as the GP clinic
    assert rows["generalist"]["flops"] >= rows["sparse_moe"]["flops"]
    assert rows["ensemble"]["flops"] == QUICK["n_members"] * rows["generalist"]["flops"]
    assert rows["sparse_moe"]["params"] > rows["generalist"]["params"]
    assert all(0 <= r["acc_mean"] <= 1 for r in res["rows"])
    assert "| clinic |" in (out / "results.md").read_text()
    assert str(out) in text                               # it names the directory it wrote


def test_help_documents_the_options():
    proc = subprocess.run([sys.executable, "-m", "minimoe", "--help"], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "MPLBACKEND": "Agg"})
    assert proc.returncode == 0
    for option in ("--seed", "--n-train", "--epochs", "--out", "--quick", "--no-progress"):
        assert option in proc.stdout


@pytest.mark.parametrize("argv, msg", [
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--n-train", "many"], "argument --n-train: invalid int value"),
    (["--n-train", "3"], "--n-train must be >= 10"),
    (["--specialties", "0"], "--specialties must be >= 1"),
    (["--colour", "red"], "unrecognized arguments: --colour"),
])
def test_bad_arguments_fail_clearly(argv, msg, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv + ["--no-progress"])
    assert exc.value.code == 2
    assert msg in capsys.readouterr().err


def test_out_must_be_a_directory(tmp_path, capsys):
    f = tmp_path / "a_file"
    f.write_text("x")
    with pytest.raises(SystemExit):
        main(["--quick", "--out", str(f)])
    assert "exists and is not a directory" in capsys.readouterr().err


def test_format_table_markdown():
    rows = [{"title": "2 generalist", "acc_mean": 0.5, "acc_std": 0.01, "accs": [0.49, 0.51], "params": 1000,
             "active": 1000, "flops": 2000, "x_generalist": 1.0, "cv": None}]
    md = format_table(rows, markdown=True).splitlines()
    assert md[0].startswith("| clinic | test acc")
    assert md[2] == "| 2 generalist | 0.500 ± 0.010 | 1,000 | 1,000 | 2,000 | 1.00 | — |"


def test_figures_command_lists_and_rejects(capsys):
    assert figures.main(["--list"]) == 0
    assert "clinic_demo" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        figures.main(["--only", "no-such-figure"])
    assert "matches no builder" in capsys.readouterr().err
    assert figures.default_dir().endswith("figures")
