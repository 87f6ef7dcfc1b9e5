"""The installed package: extras that cover every import, requirements.txt built on them,
student notebooks as package data, and no default output folder inside site-packages.

(The wheel itself is built, installed into a fresh venv with [course] and run from a
temporary folder by .ci/run; these tests check the pieces that make that work.)"""
import ast
import sys
from pathlib import Path

import pytest

import minimoe
from minimoe.course import figures as figmod
from minimoe.course.checks import build as B
from minimoe.course.checks import workspace

ROOT = Path(__file__).resolve().parents[2]
tomllib = pytest.importorskip("tomllib")      # Python >= 3.11
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

# import name -> distribution name, for the third-party modules minimoe imports
DIST = {"IPython": "ipykernel", "matplotlib": "matplotlib", "tqdm": "tqdm", "threadpoolctl": "threadpoolctl",
        "nbformat": "nbformat", "nbclient": "nbclient", "jupytext": "jupytext", "numpy": "numpy"}
# Imports that belong to another extra than [course]: expert parallelism needs an MPI.
# The nbgrader runner (course/checks/nbgrader_execute.py) imports nbgrader and jupyter_core, which
# nbgrader brings: the [teacher] extra.
OTHER_EXTRA = {"mpi4py": ("mpi", "mpi4py"), "nbgrader": ("teacher", "nbgrader"),
               "jupyter_core": ("teacher", "nbgrader")}
# Imported only to compare with, when installed, and never a dependency of any extra:
# `python -m minimoe.bench --lm` times PyTorch eager beside minimoe if torch is there.
OPTIONAL = {"torch"}


def _imports(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0]


def _names(reqs):
    import re
    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].strip().lower() for r in reqs}


def test_the_course_extra_covers_every_import():
    third_party = set()
    for path in Path(minimoe.__file__).parent.rglob("*.py"):
        for name in _imports(path):
            if name not in sys.stdlib_module_names and name != "minimoe":
                third_party.add(name)
    for module, (extra, dist) in OTHER_EXTRA.items():
        if module in third_party:
            assert dist in _names(PYPROJECT["project"]["optional-dependencies"][extra]), \
                f"minimoe imports {module}: the [{extra}] extra must list {dist}"
            third_party.discard(module)
    for module in OPTIONAL & third_party:
        every_extra = set().union(*map(_names, PYPROJECT["project"]["optional-dependencies"].values()))
        assert module not in every_extra | _names(PYPROJECT["project"]["dependencies"]), \
            f"{module} is only compared with, when installed: no extra may depend on it"
        third_party.discard(module)
    unknown = third_party - set(DIST)
    assert not unknown, f"minimoe imports {sorted(unknown)}: add them to [course] and to DIST here"
    deps = _names(PYPROJECT["project"]["dependencies"])
    course = _names(PYPROJECT["project"]["optional-dependencies"]["course"])
    assert deps == {"numpy"}, "numpy is the library's only hard dependency"
    missing = {DIST[m] for m in third_party} - deps - course
    assert not missing, f"[course] lacks {sorted(missing)}"
    assert {"jupyter", "ipykernel"} <= course


def test_extras_and_requirements():
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert {"pytest", "hypothesis"} <= _names(extras["test"])
    assert _names(extras["teacher"]) == {"nbgrader", "sqlalchemy"}   # SQLAlchemy pinned below 2: no warnings
    lines = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    assert [line for line in lines if line] == ["-e .[course,test,mpi]"]
    assert {"mpi4py", "mpich"} <= _names(extras["mpi"]), "the [mpi] extra brings mpi4py and a pip-installed MPI"
    markers = " ".join(PYPROJECT["tool"]["pytest"]["ini_options"]["markers"])
    assert "notebooks:" in markers and "nbgrader:" in markers


def test_sdist_and_wheel_carry_the_lessons():
    manifest = (ROOT / "MANIFEST.in").read_text()
    assert "graft lessons" in manifest and "graft tests" in manifest
    setup = (ROOT / "setup.py").read_text()
    assert 'glob.glob(os.path.join("lessons", "[0-9][0-9]_*.ipynb"))' in setup     # students only
    assert workspace.PACKAGED == Path(workspace.__file__).resolve().parents[1] / "student_notebooks"
    assert '"minimoe", "course", "student_notebooks"' in setup


def test_default_figures_folder_is_never_site_packages(tmp_path, monkeypatch):
    installed = tmp_path / "site-packages" / "minimoe" / "course" / "figures.py"
    monkeypatch.setattr(figmod, "__file__", str(installed))
    monkeypatch.chdir(tmp_path / "..")
    assert figmod.default_dir() == str(tmp_path.parent / "figures")
    monkeypatch.undo()
    assert Path(figmod.default_dir()) == ROOT / "figures"          # in a clone: the repository's


def test_outside_a_clone_start_uses_the_packaged_notebooks(tmp_path, monkeypatch):
    installed = tmp_path / "site-packages" / "minimoe" / "course" / "checks" / "build.py"
    monkeypatch.setattr(B, "__file__", str(installed))
    assert B.repository_root() is None
    with pytest.raises(B.NeedsCheckout, match="only a clone of the repository has"):
        B.default_lessons_dir()
    monkeypatch.undo()
    assert B.repository_root() == ROOT
    packaged = tmp_path / "student_notebooks"
    packaged.mkdir()
    for stem in ("00_a", "01_b"):
        (packaged / f"{stem}.ipynb").write_text("{}")
    (packaged / "README.md").write_text("not a lesson")
    monkeypatch.setattr(workspace, "repository_root", lambda: None)
    monkeypatch.setattr(workspace, "PACKAGED", packaged)
    copied, kept = workspace.start(tmp_path / "mine")
    assert [p.name for p in copied] == ["00_a.ipynb", "01_b.ipynb"] and kept == []
    monkeypatch.setattr(workspace, "PACKAGED", tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="installed without its lessons"):
        workspace.start(tmp_path / "other")
