"""The lessons' first cell: what it needs, and what it says when minimoe cannot be used.

It must run where only minimoe, NumPy and matplotlib are (JupyterLite: Pyodide has no
nbformat), and when ``import minimoe`` finds a clone's folder named ``minimoe`` (Jupyter
started in the clone's parent) instead of the package, it must say so in one line, not fail
later with "cannot import name 'MoELayer' from 'minimoe' (unknown location)".
"""
import json
import sys
import types
from pathlib import Path

import pytest

LESSONS = Path(__file__).resolve().parents[2] / "lessons"
NOTEBOOKS = sorted(LESSONS.glob("[0-9][0-9]_*.ipynb")) + sorted((LESSONS / "solutions").glob("[0-9][0-9]_*.ipynb"))


def first_cell(path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    return "".join(next(c for c in nb["cells"] if c["cell_type"] == "code")["source"])


def test_there_are_lessons():
    assert len(NOTEBOOKS) >= 24


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_first_cell_needs_no_nbformat(path, monkeypatch):
    """With nbformat impossible to import (as in JupyterLite), the whole first cell runs."""
    monkeypatch.setitem(sys.modules, "nbformat", None)          # import nbformat -> ImportError
    with pytest.raises(ImportError):
        import nbformat  # noqa: F401
    namespace = {}
    exec(compile(first_cell(path), f"{path.stem} first cell", "exec"), namespace)
    assert namespace["minimoe"].__file__ and "matplotlib" in namespace


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_first_cell_names_a_clone_folder_found_instead_of_the_package(path, monkeypatch, tmp_path):
    """``import minimoe`` from a clone's parent gives a namespace package (no ``__file__``,
    a ``__path__`` that is the folder): the cell says what happened and what to do."""
    folder = tmp_path / "minimoe"
    folder.mkdir()
    namespace_package = types.ModuleType("minimoe")
    namespace_package.__path__ = [str(folder)]                  # what the import system makes of it
    monkeypatch.setitem(sys.modules, "minimoe", namespace_package)
    with pytest.raises(ImportError) as err:
        exec(compile(first_cell(path), f"{path.stem} first cell", "exec"), {})
    msg = str(err.value)
    assert "\n" not in msg
    assert str(folder) in msg and "not the minimoe package" in msg
    assert "start Jupyter inside the clone" in msg and "pip install -r requirements.txt" in msg
