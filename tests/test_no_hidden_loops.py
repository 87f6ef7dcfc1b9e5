"""The library hides no Python loop over elements (docs/design.md §2: no loops over tokens).

``np.vectorize``, ``np.frompyfunc`` and ``np.apply_along_axis`` look like array code but call
a Python function once per element (or per row). This file reads every module of ``minimoe/``
as a syntax tree (so a docstring or a grader's message that *names* them is fine) and fails
with ``file:line`` for each use, however numpy was imported.
"""
import ast
from pathlib import Path

import pytest

import minimoe

BANNED = {"vectorize", "frompyfunc", "apply_along_axis"}
LIBRARY = Path(minimoe.__file__).resolve().parent


def hidden_loops(source, filename="<string>"):
    """Every use of a banned numpy function in ``source``, as ``"filename:line: what"``.

    Caught: ``np.vectorize`` under any alias of numpy (``import numpy``, ``import numpy as N``),
    deeper paths (``np.lib.shape_base.apply_along_axis``), ``from numpy import vectorize [as v]``
    (from numpy or any numpy submodule), and ``getattr(np, "vectorize")``.
    """
    tree = ast.parse(source, filename)
    numpy_names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            numpy_names |= {a.asname or a.name.split(".")[0] for a in node.names
                            if a.name == "numpy" or a.name.startswith("numpy.")}
    found = []

    def root_is_numpy(node):
        while isinstance(node, ast.Attribute):
            node = node.value
        return isinstance(node, ast.Name) and node.id in numpy_names

    for node in ast.walk(tree):
        what = None
        if isinstance(node, ast.Attribute) and node.attr in BANNED and root_is_numpy(node.value):
            what = ast.unparse(node)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "numpy":
            names = [a.name for a in node.names if a.name in BANNED]
            what = f"from {node.module} import {', '.join(names)}" if names else None
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
              and len(node.args) >= 2 and root_is_numpy(node.args[0])
              and isinstance(node.args[1], ast.Constant) and node.args[1].value in BANNED):
            what = ast.unparse(node)
        if what:
            found.append(f"{filename}:{node.lineno}: {what}")
    return sorted(found, key=lambda s: int(s.split(":")[-2]))


def _scan(paths):
    found = []
    for path in paths:
        found += hidden_loops(path.read_text(encoding="utf-8"), str(path.relative_to(LIBRARY.parent)))
    return found


ALL_MODULES = sorted(LIBRARY.rglob("*.py"))


# --------------------------------------------------------------------------- the scanner itself
@pytest.mark.parametrize("source, expected", [
    ("import numpy as np\nf = np.vectorize(abs)", ["np.vectorize"]),
    ("import numpy\nf = numpy.frompyfunc(abs, 1, 1)", ["numpy.frompyfunc"]),
    ("import numpy as N\ny = N.apply_along_axis(sum, 0, x)", ["N.apply_along_axis"]),
    ("import numpy as np\ny = np.lib.shape_base.apply_along_axis(sum, 0, x)", ["np.lib.shape_base.apply_along_axis"]),
    ("from numpy import vectorize\nf = vectorize(abs)", ["from numpy import vectorize"]),
    ("from numpy import zeros, vectorize as v", ["from numpy import vectorize"]),
    ("from numpy.lib.shape_base import apply_along_axis", ["from numpy.lib.shape_base import apply_along_axis"]),
    ("import numpy.linalg\nf = numpy.vectorize(abs)", ["numpy.vectorize"]),
    ("import numpy as np\nf = getattr(np, 'frompyfunc')(abs, 1, 1)", ["getattr(np, 'frompyfunc')"]),
    ("import numpy as np\n@np.vectorize\ndef f(a):\n    return a", ["np.vectorize"]),
])
def test_the_scanner_catches_every_spelling(source, expected):
    found = hidden_loops(source, "m.py")
    assert [f.split(": ", 1)[1] for f in found] == expected
    assert all(f.startswith("m.py:") for f in found)


def test_the_scanner_names_the_line():
    assert hidden_loops("import numpy as np\n\n\nf = np.vectorize(abs)\n", "m.py") == ["m.py:4: np.vectorize"]


@pytest.mark.parametrize("source", [
    '"""Do not use np.vectorize here."""',                       # a docstring that names it
    "# np.frompyfunc would loop\nx = 1",                         # a comment
    "msg = 'np.apply_along_axis loops in Python'",               # a grader's message
    "import numpy as np\ny = np.vectorized_sum",                 # another name
    "def vectorize(f):\n    return f\ng = vectorize(abs)",       # a function of one's own
    "import numpy as np\nclass A:\n    def f(self):\n        return self.vectorize",
    "import numpy as np\nimport mylib\nf = mylib.vectorize(abs)",  # not numpy's
])
def test_the_scanner_lets_names_in_text_and_other_modules_pass(source):
    assert hidden_loops(source) == []


# --------------------------------------------------------------------------- the library
def test_the_scan_covers_the_whole_library():
    names = {p.relative_to(LIBRARY).as_posix() for p in ALL_MODULES}
    assert {"core/layers.py", "core/losses.py", "core/normal.py", "clinic/optim.py", "lm/model.py"} <= names


def test_no_hidden_loops_anywhere_in_the_library():
    assert _scan(ALL_MODULES) == []
