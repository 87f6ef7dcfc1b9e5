"""Build the lesson notebooks from their sources.

Each lesson has one source of truth, ``lessons/src/NN_name.py``, in jupytext's
*percent* format (``# %%`` starts a code cell, ``# %% [markdown]`` a text cell):
plain Python that diffs cleanly and can be opened in any editor. From it,

    python -m minimoe.checks build            # write both versions
    python -m minimoe.checks build --check    # fail if they are out of date

writes, without outputs,

* the **student** notebook ``lessons/NN_name.ipynb``, in which every region
  between ``### BEGIN SOLUTION`` and ``### END SOLUTION`` becomes
  ``# YOUR CODE HERE`` / ``raise NotImplementedError()`` (code) or
  ``YOUR ANSWER HERE`` (a text answer cell), exactly as nbgrader's
  ``generate_assignment`` would;
* the **solution** notebook ``lessons/solutions/NN_name.ipynb``, with the code
  and markers kept and the marker lines of text answers removed.

Both carry nbgrader cell metadata (solution cells, locked grader cells, answer
cells). The nbgrader course (:mod:`~minimoe.course.checks.nbgrader_course`) uses a third
build, ``build_notebook(src, "solution", graded=...)``: the same notebook whose locked
grader cells import their grader themselves and call it graded,
``check.name(name, points=P)`` (see :mod:`~minimoe.course.checks.grading`).

**Points** are declared in the source, on the check cell, as jupytext cell metadata::

    # %% points=2
    check.mixed_units(load_is_honest, fixed_smooth_load)

(default: one point per grader call; a text answer cell likewise takes ``points=``).
**Ids** come from names, never from positions, so inserting a cell into a lesson changes
no id of an assignment already released: an exercise cell is ``ex-<function>``, its check
``check-<grader>``, a text answer ``answers`` (the second one ``answers-2``, or
``grade_id="..."`` in its metadata), and a cell's notebook id is its grade id, or, for an
ordinary cell, a hash of its source. A rebuild of an unchanged source changes nothing.
"""
from __future__ import annotations

import ast
import hashlib
import numbers
import re
from pathlib import Path

__all__ = ["BEGIN", "END", "CODE_STUB", "TEXT_STUB", "strip_solutions", "build_notebook", "graded_source",
           "notebook_text", "lesson_sources", "build", "default_lessons_dir", "repository_root",
           "NeedsCheckout"]

BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
CODE_STUB = ("# YOUR CODE HERE", "raise NotImplementedError()")
TEXT_STUB = "YOUR ANSWER HERE"
_GRADER_CALL = re.compile(r"^check\.(\w+)\(", re.M)
_DEF = re.compile(r"^def (\w+)\(", re.M)
_GRADERS = re.compile(r"^from minimoe\.checks import (lesson\d\d) as check\b", re.M)
_GRADE_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")   # nbformat's cell id rule, so a grade id can be one


class NeedsCheckout(RuntimeError):
    """A command needs the repository (a clone with ``lessons/src/``), not just the installed package."""


def repository_root():
    """The clone this ``minimoe`` was imported from, or None for an installed package.

    A clone (an editable install, or ``PYTHONPATH`` set to it) has ``pyproject.toml``
    and ``lessons/src/`` beside the ``minimoe`` folder; an installed wheel sits in
    ``site-packages`` with neither.
    """
    root = Path(__file__).resolve().parents[3]
    if (root / "pyproject.toml").is_file() and (root / "lessons" / "src").is_dir():
        return root
    return None


def default_lessons_dir(command="python -m minimoe.checks build"):
    """The repository's ``lessons/``; :class:`NeedsCheckout` (saying so) outside a clone."""
    root = repository_root()
    if root is None:
        raise NeedsCheckout(
            f"`{command}` works on the lesson sources, which only a clone of the repository has "
            f"(this minimoe is installed in {Path(__file__).resolve().parents[2]}). Clone the repository "
            f"and run it there, or pass --lessons DIR.")
    return root / "lessons"


def _regions(lines, where):
    """``[(begin_index, end_index), ...]`` of the solution regions; checks they pair up."""
    out, start = [], None
    for i, line in enumerate(lines):
        s = line.strip()
        if s == BEGIN:
            if start is not None:
                raise ValueError(f"{where}: '{BEGIN}' on line {i + 1} inside another solution region")
            start = i
        elif s == END:
            if start is None:
                raise ValueError(f"{where}: '{END}' on line {i + 1} without a '{BEGIN}'")
            out.append((start, i))
            start = None
        elif BEGIN in s or END in s:
            raise ValueError(f"{where}: a solution marker must be alone on its line (line {i + 1})")
    if start is not None:
        raise ValueError(f"{where}: '{BEGIN}' on line {start + 1} is never closed")
    return out


def strip_solutions(source, kind="code", where="cell"):
    """The student version of one cell's source.

    Code: each region (markers included) becomes the two-line stub, indented like
    the ``BEGIN`` marker. Text: the cell must be one region, and becomes
    ``YOUR ANSWER HERE``.
    """
    lines = source.split("\n")
    regions = _regions(lines, where)
    if not regions:
        return source
    if kind == "markdown":
        if len(regions) != 1 or regions[0] != (0, len(lines) - 1):
            raise ValueError(f"{where}: a text answer cell must be a single solution region, "
                             f"markers on its first and last lines")
        return TEXT_STUB
    out, prev = [], 0
    for b, e in regions:
        indent = lines[b][: len(lines[b]) - len(lines[b].lstrip())]
        out += lines[prev:b] + [indent + s for s in CODE_STUB]
        prev = e + 1
    return "\n".join(out + lines[prev:])


def _nbgrader(grade_id, *, solution=False, grade=False, locked=False, points=None):
    meta = {"grade": grade, "grade_id": grade_id, "locked": locked,
            "schema_version": 3, "solution": solution, "task": False}
    if grade:
        meta["points"] = points
    return {"nbgrader": meta}


def _points(meta, where, default):
    """The points a source cell declares (``# %% points=2``), or ``default``."""
    points = meta.get("points", default)
    if isinstance(points, bool) or not isinstance(points, numbers.Real) or not points > 0:
        raise ValueError(f"{where}: points must be a number > 0, got {points!r}")
    return points


def graded_source(text, lesson_module, points, feedback="detailed", where="cell"):
    """A check cell as the graded course runs it: its grader imported by the cell itself, called graded.

    ``check.mixed_units(a, b)`` becomes::

        from minimoe.course.checks import lesson10 as check  # the grader itself (locked)
        check.mixed_units(a, b, points=2)

    so the cell depends on no name an answer cell could rebind, and its grader is strict
    whatever the notebook's environment says. A graded cell holds one grader call.
    """
    tree = ast.parse(text)
    calls = [node.value for node in tree.body if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)
             and isinstance(node.value.func, ast.Attribute) and isinstance(node.value.func.value, ast.Name)
             and node.value.func.value.id == "check" and node.value.func.attr != "progress"]
    if len(calls) != 1:
        raise ValueError(f"{where}: a check cell of a graded course holds exactly one grader call "
                         f"(`check.name(...)`), found {len(calls)}")
    call = calls[0]
    if any(k.arg in ("points", "feedback") for k in call.keywords):
        raise ValueError(f"{where}: the check call passes points= or feedback= itself; declare the points "
                         f"on the cell (`# %% points=2`) instead")
    lines = text.split("\n")
    row, col = call.end_lineno - 1, call.end_col_offset - 1       # the call's closing parenthesis
    extra = f", points={points!r}" + (f", feedback={feedback!r}" if feedback != "detailed" else "")
    if call.args or call.keywords:
        lines[row] = lines[row][:col] + extra + lines[row][col:]
    else:
        lines[row] = lines[row][:col] + extra[2:] + lines[row][col:]
    head = f"from minimoe.course.checks import {lesson_module} as check  # the grader itself (locked)"
    return head + "\n" + "\n".join(lines)


def _cell_id(text, used):
    """A notebook id for an ordinary cell: a hash of its source (the n-th copy of a source gets -n)."""
    base = "cell-" + hashlib.sha1(text.encode("utf-8")).hexdigest()[:10]
    n = used.get(base, 0) + 1
    used[base] = n
    return base if n == 1 else f"{base}-{n}"


def build_notebook(src, kind, graded=None):
    """Build the ``"student"`` or ``"solution"`` notebook (a NotebookNode) from a source file.

    ``graded``: ``None`` for the lessons (self-study), or ``"detailed"`` / ``"summative"`` for
    the nbgrader course, whose check cells then call their grader graded
    (:func:`graded_source`) with that feedback.
    """
    import jupytext
    import nbformat
    if kind not in ("student", "solution"):
        raise ValueError(f"kind must be 'student' or 'solution', got {kind!r}")
    if graded not in (None, "detailed", "summative"):
        raise ValueError(f"graded must be None, 'detailed' or 'summative', got {graded!r}")
    src = Path(src)
    parsed = jupytext.read(src, fmt="py:percent")
    whole = src.read_text(encoding="utf-8")
    module = _GRADERS.search(whole)
    nb = nbformat.v4.new_notebook()
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    seen, used, texts = set(), {}, 0
    for i, cell in enumerate(parsed.cells):
        text, where = cell.source, f"{src.name}, cell {i + 1}"
        declared = dict(cell.metadata)
        has_solution = bool(_regions(text.split("\n"), where))
        meta, cell_id = {}, _cell_id(text, used)
        if cell.cell_type == "markdown":
            if has_solution:
                texts += 1
                gid = declared.get("grade_id", "answers" if texts == 1 else f"answers-{texts}")
                meta = _nbgrader(gid, solution=True, grade=True, points=_points(declared, where, 1))
                text = (strip_solutions(text, "markdown", where) if kind == "student" else
                        "\n".join(s for s in text.split("\n") if s.strip() not in (BEGIN, END)))
            new = nbformat.v4.new_markdown_cell(text, metadata=meta)
        else:
            if has_solution:
                names = _DEF.findall(text)
                if not names and "grade_id" not in declared:
                    raise ValueError(f"{where}: an exercise cell defines its function (`def name(...)`), "
                                     f"whose name becomes the cell's id; or declare `grade_id=\"...\"`")
                meta = _nbgrader(declared.get("grade_id", f"ex-{names[0] if names else ''}"), solution=True)
                if kind == "student":
                    text = strip_solutions(text, "code", where)
            else:
                graders = [n for n in _GRADER_CALL.findall(text) if n != "progress"]
                if graders:
                    points = _points(declared, where, len(graders))
                    meta = _nbgrader(declared.get("grade_id", f"check-{graders[0]}"), grade=True, locked=True,
                                     points=points)
                    if graded is not None:
                        if module is None:
                            raise ValueError(f"{src.name}: no `from minimoe.checks import lessonNN as check` "
                                             f"line, so its check cells cannot import their grader")
                        text = graded_source(text, module.group(1), points, graded, where)
                elif "points" in declared:
                    raise ValueError(f"{where}: points= on a cell that is neither a check nor an answer")
            new = nbformat.v4.new_code_cell(text, metadata=meta)
        gid = meta.get("nbgrader", {}).get("grade_id")
        if gid is not None:
            if not _GRADE_ID.match(gid):
                raise ValueError(f"{where}: grade id {gid!r} must be 1 to 64 letters, digits, - or _")
            if gid in seen:
                raise ValueError(f"{where}: duplicate nbgrader grade_id {gid!r}")
            seen.add(gid)
            cell_id = gid
        new["id"] = cell_id
        nb.cells.append(new)
    nbformat.validate(nb)
    return nb


def notebook_text(nb):
    """The exact text a notebook is stored as (nbformat's JSON, trailing newline)."""
    import nbformat
    return nbformat.writes(nb) + "\n"


def lesson_sources(lessons_dir=None):
    """The lesson sources ``lessons/src/NN_*.py``, in order."""
    lessons_dir = Path(lessons_dir or default_lessons_dir())
    return sorted((lessons_dir / "src").glob("[0-9][0-9]_*.py"))


def build(lessons_dir=None, check=False):
    """Write (or, with ``check``, only compare) every student and solution notebook.

    Returns:
        The list of notebook paths that were out of date (and were rewritten
        unless ``check``). Raises ``FileNotFoundError`` if ``lessons_dir/src``
        holds no lesson source.
    """
    lessons_dir = Path(lessons_dir or default_lessons_dir())
    sources = lesson_sources(lessons_dir)
    if not sources:
        # a typo'd --lessons must not report "all lesson notebooks are up to date"
        raise FileNotFoundError(f"no lesson sources in {lessons_dir / 'src'} (expected NN_name.py files "
                                f"there): is {str(lessons_dir)!r} the lessons folder?")
    stale = []
    for src in sources:
        for kind, folder in (("student", lessons_dir), ("solution", lessons_dir / "solutions")):
            target = folder / (src.stem + ".ipynb")
            text = notebook_text(build_notebook(src, kind))
            current = target.read_text(encoding="utf-8") if target.exists() else None
            if current != text:
                stale.append(target)
                if not check:
                    folder.mkdir(parents=True, exist_ok=True)
                    target.write_text(text, encoding="utf-8")
    return stale
