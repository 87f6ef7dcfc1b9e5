"""Issue 14: outputs are written atomically into a checked directory, and array subclasses
whose meaning would be silently lost (masked arrays, np.matrix) are refused."""
import os

import numpy as np
import pytest

from minimoe.validate import atomic_open, atomic_write_text, check_array, check_out_dir


# --------------------------------------------------------------------------- check_out_dir
def test_out_dir_is_created_and_returned(tmp_path):
    target = tmp_path / "a" / "b"
    assert check_out_dir("--out", target) == str(target)
    assert target.is_dir()
    assert check_out_dir("--out", str(target)) == str(target)       # an existing one is fine too


@pytest.mark.parametrize("bad", ["", "   "])
def test_empty_out_dir_is_rejected(bad):
    with pytest.raises(ValueError, match="--out is empty: give a directory"):
        check_out_dir("--out", bad)


def test_a_file_or_a_path_under_a_file_is_rejected(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("x")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        check_out_dir("--out", f)
    with pytest.raises(ValueError, match=r"'.*notes.txt/sub/deeper' is inside '.*notes.txt', a file"):
        check_out_dir("--out", f / "sub" / "deeper")
    assert f.read_text() == "x"


def test_unwritable_or_uncreatable_dirs_are_rejected(tmp_path):
    # /proc refuses new entries even to root, so this works whoever runs the tests.
    with pytest.raises(ValueError, match="'/proc/minimoe-out' cannot be created"):
        check_out_dir("--out", "/proc/minimoe-out")
    with pytest.raises(ValueError, match="'/proc' is not writable"):
        check_out_dir("--out", "/proc")


def test_missing_dir_without_create_and_bad_types(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        check_out_dir("--json folder", tmp_path / "missing", create=False)
    assert not (tmp_path / "missing").exists()
    with pytest.raises(TypeError, match="--out must be a directory path, got int"):
        check_out_dir("--out", 3)


# --------------------------------------------------------------------------- atomic writes
def test_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "results.json"
    path.write_text("old")
    atomic_write_text(path, "new")
    assert path.read_text() == "new"
    assert os.listdir(tmp_path) == ["results.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert (path.stat().st_mode & 0o777) == 0o666 & ~umask   # the mode open() would have given


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, OSError])
def test_an_interrupted_write_leaves_the_old_file_whole(tmp_path, interrupt):
    path = tmp_path / "figure.png"
    path.write_bytes(b"old complete figure")
    with pytest.raises(interrupt):
        with atomic_open(path, "wb") as f:
            f.write(b"\x89PNG half a fig")
            raise interrupt("interrupted")
    assert path.read_bytes() == b"old complete figure"
    assert os.listdir(tmp_path) == ["figure.png"]
    # ... and where there was no file, there is still none (not a truncated one).
    fresh = tmp_path / "fresh.png"
    with pytest.raises(KeyboardInterrupt):
        with atomic_open(fresh, "wb") as f:
            f.write(b"\x89PNG")
            raise KeyboardInterrupt
    assert not fresh.exists() and os.listdir(tmp_path) == ["figure.png"]


def test_atomic_open_modes():
    with pytest.raises(ValueError, match="mode must be 'w' or 'wb'"):
        atomic_open("x", "a")


def test_an_interrupted_figure_save_leaves_no_truncated_png(tmp_path, monkeypatch):
    # viz's save helper: Ctrl-C in the middle of savefig (after some bytes went out).
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure
    from minimoe.course.viz import _style

    path = tmp_path / "clinic_summary.png"
    fig = Figure()
    fig.add_subplot().plot([0, 1], [1, 0])
    real = Figure.savefig

    def interrupted(self, fname, **kw):
        fname.write(b"\x89PNG\r\n\x1a\n" + b"\0" * 116)       # the 124 bytes an interrupted demo left
        raise KeyboardInterrupt

    monkeypatch.setattr(Figure, "savefig", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _style.save(fig, path)
    assert not path.exists() and os.listdir(tmp_path) == []
    monkeypatch.setattr(Figure, "savefig", real)
    fig = Figure()
    fig.add_subplot().plot([0, 1], [1, 0])
    _style.save(fig, path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000 and os.listdir(tmp_path) == [path.name]


# --------------------------------------------------------------------------- check_array and array subclasses
def test_a_masked_array_is_refused_not_unmasked():
    x = np.ma.masked_array(np.arange(6.0).reshape(2, 3), mask=[[0, 1, 0], [0, 0, 0]])
    with pytest.raises(TypeError, match=r"x is a masked array: minimoe would silently use the values under its mask"):
        check_array("x", x)


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")
def test_np_matrix_is_refused():
    with pytest.raises(TypeError, match=r"x is a numpy.matrix .*pass np.asarray\(x\)"):
        check_array("x", np.asmatrix(np.ones((2, 3))))


def test_plain_arrays_still_pass():
    x = np.ones((2, 3))
    assert check_array("x", x, ndim=2) is x


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")
def test_a_layer_refuses_a_masked_batch():
    from minimoe.core.moe import MoELayer
    layer = MoELayer(4, 8, 4, k=2, rng=np.random.default_rng(0))
    x = np.random.default_rng(1).standard_normal((6, 4))
    with pytest.raises(TypeError, match="x is a masked array"):
        layer.forward(np.ma.masked_array(x, mask=x > 1))
    with pytest.raises(TypeError, match="x is a numpy.matrix"):
        layer.forward(np.asmatrix(x))
