"""The three command lines end cleanly: Ctrl-C is one line and exit 130, a closed pipe is quiet,
and the shared checks they use (validate's command-line helpers) say what is wrong."""
import argparse
import os
import signal
import subprocess
import sys
import time

import pytest

from minimoe import __main__ as demo
from minimoe import bench
from minimoe.clinic import data as clinic_data
from minimoe.course.checks import __main__ as checks_cli
from minimoe.course.checks import progress, workspace
from minimoe.validate import arg_int, check_out_file, check_out_files, exit_cleanly


def _interrupt(*a, **kw):
    raise KeyboardInterrupt


def _assert_interrupted(exc, capsys):
    assert exc.value.code == 130
    captured = capsys.readouterr()
    assert captured.err == "interrupted\n"            # one line, no traceback


# --------------------------------------------------------------------------- Ctrl-C, in process
def test_ctrl_c_in_the_demo_is_one_line_and_130(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(demo, "run_demo", _interrupt)
    with pytest.raises(SystemExit) as exc:
        demo.main(["--quick", "--no-progress", "--out", str(tmp_path / "out")])
    _assert_interrupted(exc, capsys)
    assert os.listdir(tmp_path / "out") == []            # nothing written


def test_ctrl_c_while_the_demo_writes_keeps_the_old_files(monkeypatch, capsys, tmp_path):
    from minimoe.course import viz
    out = tmp_path / "out"
    out.mkdir()
    for n in demo.OUTPUTS:
        (out / n).write_text(f"old {n}")
    res = demo.run_demo(dict(demo.QUICK, n_train=100, n_val=20, n_test=40, epochs=2), progress=False,
                        log=lambda *a: None)
    monkeypatch.setattr(demo, "run_demo", lambda *a, **kw: res)
    monkeypatch.setattr(viz, "plot_clinic_data", _interrupt)       # the last figure drawn
    with pytest.raises(SystemExit) as exc:
        demo.main(["--quick", "--no-progress", "--out", str(out)])
    assert exc.value.code == 130 and capsys.readouterr().err == "interrupted\n"
    assert sorted(os.listdir(out)) == sorted(demo.OUTPUTS)
    assert all((out / n).read_text() == f"old {n}" for n in demo.OUTPUTS)


def test_ctrl_c_in_the_benchmark_is_one_line_and_130(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(bench, "run_bench", _interrupt)
    with pytest.raises(SystemExit) as exc:
        bench.main(["--quick", "--no-progress", "--json", str(tmp_path / "b.json")])
    _assert_interrupted(exc, capsys)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("command, where", [
    (["start", "DIR"], (workspace, "student_notebooks")),
    (["DIR"], (progress, "summarize")),
])
def test_ctrl_c_in_the_checks_command_is_one_line_and_130(monkeypatch, capsys, tmp_path, command, where):
    import nbformat
    nbformat.write(nbformat.v4.new_notebook(), tmp_path / "04_a_noisy_gp.ipynb")
    monkeypatch.setattr(*where, _interrupt)
    with pytest.raises(SystemExit) as exc:
        checks_cli.main([str(tmp_path) if a == "DIR" else a for a in command])
    _assert_interrupted(exc, capsys)


def test_on_a_terminal_the_interrupt_line_first_clears_a_progress_bar(monkeypatch):
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True
    term = Terminal()
    term.write("bench rounds:  40%|████      | 4/10")
    monkeypatch.setattr(sys, "stderr", term)
    with pytest.raises(SystemExit):
        with exit_cleanly():
            raise KeyboardInterrupt
    assert term.getvalue().endswith("4/10\r\x1b[Kinterrupted\n")


def test_exit_cleanly_lets_other_errors_through():
    with pytest.raises(ZeroDivisionError):
        with exit_cleanly():
            1 / 0
    with exit_cleanly():                    # and does nothing on success
        pass


# --------------------------------------------------------------------------- Ctrl-C, for real
def test_sigint_to_the_running_demo(tmp_path):
    """A real Ctrl-C (SIGINT) during training: exit 130, one line on stderr, no output written."""
    env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(demo.__file__)),
                                          os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "minimoe", "--no-progress", "--epochs", "200", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        first = proc.stdout.readline()               # printed once the arguments are checked, before training
        assert first.startswith("The clinic:"), first
        time.sleep(0.5)                              # well inside the training (200 epochs take minutes)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, stderr
    assert stderr == "interrupted\n"
    assert os.listdir(out) == []


def test_a_closed_pipe_is_quiet(tmp_path):
    """``python -m minimoe.checks start | head -1``: no BrokenPipeError traceback."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(demo.__file__)),
                                                        os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "minimoe.checks", "start", str(tmp_path / "mine")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.close()                              # the reader went away before anything was printed
    stderr = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr
    assert proc.returncode == 141                    # 128 + SIGPIPE, as a shell tool would


# --------------------------------------------------------------------------- the clinic data's progress bar
def test_the_progress_bar_advances_once_per_specialty(monkeypatch):
    seen = []

    class Bar:
        def __init__(self, progress, total):
            seen.append(("total", total))

        def update(self, n):
            seen.append(n)

        def close(self):
            seen.append("closed")

    monkeypatch.setattr(clinic_data, "_progress_bar", Bar)
    clinic_data.make_clinic(50, 10, 10, n_specialties=3, progress=True)
    assert seen == [("total", 3), 1, 1, 1, "closed"]


def test_a_long_draw_of_the_clinic_shows_a_progress_bar(monkeypatch, capsys):
    monkeypatch.setattr(clinic_data, "PROGRESS_DELAY_S", 0)        # as if it took longer than the delay
    clinic_data.make_clinic(50, 10, 10, n_specialties=3, progress=True)
    assert "specialties' rules" in capsys.readouterr().err
    clinic_data.make_clinic(50, 10, 10, n_specialties=3, progress=False)
    assert capsys.readouterr().err == ""


def test_the_progress_bar_does_not_change_the_data():
    a = clinic_data.make_clinic(200, 20, 20, n_specialties=5, seed=3, progress=True)
    b = clinic_data.make_clinic(200, 20, 20, n_specialties=5, seed=3, progress=False)
    assert (a.train.x == b.train.x).all() and (a.test.y == b.test.y).all() and (a.rules.o == b.rules.o).all()


def test_make_clinic_checks_progress():
    with pytest.raises(TypeError, match="progress must be True, False or None"):
        clinic_data.make_clinic(50, progress="yes")


# --------------------------------------------------------------------------- the helpers
def test_arg_int_names_the_range_and_the_text():
    parse = arg_int(low=1, high=10)
    assert parse("7") == 7 and parse(" 10 ") == 10
    for text in ("0", "11", "2.5", "many", ""):
        with pytest.raises(argparse.ArgumentTypeError, match=f"expected a whole number from 1 to 10, got {text!r}"):
            parse(text)
    with pytest.raises(argparse.ArgumentTypeError, match=r"expected a whole number >= 1, got '0' \(why\)"):
        arg_int(low=1, why="why")("0")
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=arg_int(low=1))
    assert p.parse_args(["--n", "3"]).n == 3


@pytest.mark.parametrize("path, msg", [
    ("", "--json is empty: give a file name"),
    ("   ", "--json is empty: give a file name"),
    ("TMP", "is a directory; give a file name"),
    ("TMP/new/", "ends with a slash: give a file name"),
    ("TMP/nodir/x.json", "folder .*nodir' does not exist"),
    ("FILE/x.json", "folder .*a_file' exists and is not a directory"),
])
def test_check_out_file_refuses_what_cannot_be_written(tmp_path, path, msg):
    (tmp_path / "a_file").write_text("x")
    path = path.replace("TMP", str(tmp_path)).replace("FILE", str(tmp_path / "a_file"))
    with pytest.raises(ValueError, match=msg):
        check_out_file("--json", path)
    assert sorted(os.listdir(tmp_path)) == ["a_file"]


def test_check_out_file_accepts_a_new_or_an_existing_file(tmp_path, monkeypatch):
    assert check_out_file("--json", str(tmp_path / "x.json")) == str(tmp_path / "x.json")
    (tmp_path / "x.json").write_text("old")
    assert check_out_file("--json", tmp_path / "x.json") == str(tmp_path / "x.json")
    monkeypatch.chdir(tmp_path)
    assert check_out_file("--json", "y.json") == "y.json"            # a bare name: the current folder
    assert sorted(os.listdir(tmp_path)) == ["x.json"]


def test_check_out_files_names_the_folder_and_the_file(tmp_path):
    (tmp_path / "b.png").mkdir()
    assert check_out_files("--out", tmp_path, ["a.png"]) == str(tmp_path)
    with pytest.raises(ValueError, match=r"--out '.*': b.png there is a directory; move it aside"):
        check_out_files("--out", tmp_path, ["a.png", "b.png"])
