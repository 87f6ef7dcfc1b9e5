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


# --------------------------------------------------------------------------- issue 14: outputs, --out, --help
import re  # noqa: E402

from minimoe import __main__ as demo  # noqa: E402


def test_help_says_what_quick_really_does():
    text = " ".join(demo._parser().format_help().split())
    assert f"or {QUICK['n_train']} with --quick" in text
    assert f"or {QUICK['epochs']} with --quick" in text
    assert f"default: {demo.DEFAULTS['n_train']}," in text and f"default: {demo.DEFAULTS['epochs']}," in text
    m = re.search(r"--quick small data and few epochs: (\d+) training, (\d+) validation and (\d+) test "
                  r"patients, (\d+) epochs", text)
    assert m is not None, text
    assert tuple(int(g) for g in m.groups()) == (QUICK["n_train"], QUICK["n_val"], QUICK["n_test"], QUICK["epochs"])


@pytest.fixture
def no_training(monkeypatch):
    """Fail loudly if the demo starts training: a bad --out must be caught before."""
    def run_demo(*a, **kw):
        raise AssertionError("training started before --out was checked")
    monkeypatch.setattr(demo, "run_demo", run_demo)


@pytest.mark.parametrize("out, msg", [
    ("", "--out is empty: give a directory"),
    ("FILE/sub", "is inside"),
    ("FILE", "exists and is not a directory"),
    ("/proc/minimoe-demo", "cannot be created"),
])
def test_bad_out_is_rejected_before_any_training(tmp_path, capsys, no_training, out, msg):
    f = tmp_path / "a_file"
    f.write_text("x")
    with pytest.raises(SystemExit) as exc:
        main(["--quick", "--no-progress", "--out", out.replace("FILE", str(f))])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err


@pytest.fixture(scope="module")
def tiny_res():
    cfg = dict(QUICK, n_train=200, n_val=50, n_test=100, epochs=1)
    return demo.run_demo(cfg, progress=False, log=lambda *a: None)


def test_a_rerun_replaces_every_old_result_and_says_so(tmp_path, tiny_res):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text("stale")
    (out / "clinic_summary.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 116)   # a truncated one
    said = []
    paths = demo.write_outputs(tiny_res, str(out), log=said.append)
    assert sorted(os.listdir(out)) == sorted(demo.OUTPUTS) and len(paths) == len(demo.OUTPUTS)
    assert json.loads((out / "results.json").read_text())["rows"]
    assert len((out / "clinic_summary.png").read_bytes()) > 10_000
    assert said and "Replaced 2 files of an earlier run" in said[0]
    said.clear()
    demo.write_outputs(tiny_res, str(out), log=said.append)
    assert f"Replaced {len(demo.OUTPUTS)} files" in said[0]


def test_an_interrupted_write_leaves_the_old_results_untouched(tmp_path, tiny_res, monkeypatch):
    from minimoe.course import viz
    out = tmp_path / "out"
    demo.write_outputs(tiny_res, str(out), log=lambda *a: None)
    before = {n: (out / n).read_bytes() for n in demo.OUTPUTS}

    def interrupted(*a, **kw):
        raise KeyboardInterrupt      # Ctrl-C after two figures were drawn

    monkeypatch.setattr(viz, "plot_expert_load", interrupted)
    with pytest.raises(KeyboardInterrupt):
        demo.write_outputs(tiny_res, str(out), log=lambda *a: None)
    assert sorted(os.listdir(out)) == sorted(demo.OUTPUTS)        # no staging folder, no temporary left
    assert {n: (out / n).read_bytes() for n in demo.OUTPUTS} == before   # the old run, whole and unmixed
    # and into an empty folder, an interrupted run leaves nothing (no truncated PNG)
    empty = tmp_path / "empty"
    with pytest.raises(KeyboardInterrupt):
        demo.write_outputs(tiny_res, str(empty), log=lambda *a: None)
    assert os.listdir(empty) == []


@pytest.mark.parametrize("out, msg", [("", "--out is empty"), ("FILE/sub", "is inside"),
                                      ("/proc/minimoe-figures", "cannot be created")])
def test_figures_command_checks_out_before_building(tmp_path, capsys, monkeypatch, out, msg):
    f = tmp_path / "a_file"
    f.write_text("x")
    ran = []
    monkeypatch.setattr(figures, "BUILDERS", {"clinic_demo": lambda d: ran.append(d) or []})
    with pytest.raises(SystemExit) as exc:
        figures.main(["--out", out.replace("FILE", str(f))])
    assert exc.value.code == 2 and msg in capsys.readouterr().err and ran == []


# --------------------------------------------------------------------------- issue 21: every argument up front
@pytest.mark.parametrize("name", ["results.json", "clinic_summary.png", "results.md"])
def test_an_output_that_is_a_folder_is_rejected_before_training(tmp_path, capsys, no_training, name):
    out = tmp_path / "out"
    out.mkdir()
    for n in demo.OUTPUTS:                                   # an earlier run's files ...
        (out / n).write_text(f"old {n}")
    (out / name).unlink()
    (out / name).mkdir()                                     # ... and a folder where one of them goes
    before = sorted(os.listdir(out)), {n: (out / n).read_text() for n in demo.OUTPUTS if n != name}
    with pytest.raises(SystemExit) as exc:
        main(["--quick", "--no-progress", "--out", str(out)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"--out {str(out)!r}: {name} there is a directory" in err and "Traceback" not in err
    assert (sorted(os.listdir(out)), {n: (out / n).read_text() for n in demo.OUTPUTS if n != name}) == before


def test_write_outputs_checks_every_target_before_drawing(tmp_path, tiny_res, monkeypatch):
    from minimoe.course import viz
    out = tmp_path / "out"
    (out / "expert_load.png").mkdir(parents=True)
    drawn = []
    monkeypatch.setattr(viz, "plot_clinic_summary", lambda *a, **kw: drawn.append(a))
    with pytest.raises(ValueError, match=r"out_dir .*: expert_load.png there is a directory"):
        demo.write_outputs(tiny_res, str(out), log=lambda *a: None)
    assert drawn == [] and os.listdir(out) == ["expert_load.png"]


@pytest.mark.parametrize("failure", [OSError("disk gone"), KeyboardInterrupt()])
def test_a_failure_while_moving_the_files_in_puts_the_old_run_back(tmp_path, tiny_res, monkeypatch, failure):
    out = tmp_path / "out"
    out.mkdir()
    for n in demo.OUTPUTS[1:]:                       # an earlier run (not the same bytes as this one) ...
        (out / n).write_text(f"old {n}")
    (out / "notes.txt").write_text("mine")           # ... and a file of the user's
    before = {n: (out / n).read_bytes() for n in os.listdir(out)}
    real, moved = os.replace, []

    def replace(src, dst):                       # the 4th file moved into out/ fails
        if os.path.dirname(os.fspath(dst)) == str(out) and not os.path.basename(os.fspath(src)).startswith("."):
            moved.append(dst)
            if len(moved) == 4:
                raise failure
        return real(src, dst)

    monkeypatch.setattr(demo.os, "replace", replace)
    with pytest.raises(type(failure)):
        demo.write_outputs(tiny_res, str(out), log=lambda *a: None)
    monkeypatch.setattr(demo.os, "replace", real)
    assert len(moved) >= 4                         # it did get that far
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before   # the old run, whole; nothing left over


@pytest.mark.parametrize("argv, msg", [
    (["--specialties", "5000"], f"--specialties must be <= {demo.MAX_SPECIALTIES}, got 5000"),
    (["--n-train", "100000000"], f"--n-train must be <= {demo.MAX_N_TRAIN}, got 100000000"),
    (["--epochs", "-3"], "--epochs must be >= 1, got -3"),
    (["--n-train", "0"], "--n-train must be >= 10, got 0"),
    (["--seed", "0", "-1"], "--seed must be >= 0, got -1"),
    (["--seed", "1", "2", "1"], "--seed 1 is given twice"),
    (["--epochs", "2.5"], "argument --epochs: invalid int value: '2.5'"),
])
def test_every_argument_is_checked_before_any_work(argv, msg, capsys, no_training, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(argv + ["--no-progress", "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()              # a bad argument creates no folder either


def test_the_largest_allowed_specialties_and_n_train_pass_the_checks(monkeypatch, tmp_path, capsys):
    seen = {}

    def run_demo(cfg, seeds, progress=None, log=print):
        seen.update(cfg, progress=progress)
        raise KeyboardInterrupt                      # stop before any work (and see how it ends)

    monkeypatch.setattr(demo, "run_demo", run_demo)
    with pytest.raises(SystemExit) as exc:
        main(["--specialties", str(demo.MAX_SPECIALTIES), "--n-train", str(demo.MAX_N_TRAIN), "--no-progress",
              "--out", str(tmp_path)])
    assert exc.value.code == 130
    assert seen["n_specialties"] == demo.MAX_SPECIALTIES and seen["n_train"] == demo.MAX_N_TRAIN
    assert seen["progress"] is False


def test_help_gives_the_bounds_and_why():
    text = " ".join(demo._parser().format_help().split())
    assert f"at most {demo.MAX_SPECIALTIES}" in text and f"at most {demo.MAX_N_TRAIN:,}" in text


def test_run_demo_hands_progress_to_the_data(monkeypatch):
    seen = []

    def make_clinic(*a, progress=None, **kw):
        seen.append(progress)
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "make_clinic", make_clinic)
    for progress in (False, None, True):
        with pytest.raises(KeyboardInterrupt):
            demo.run_demo(dict(QUICK), progress=progress, log=lambda *a: None)
    assert seen == [False, None, True]
