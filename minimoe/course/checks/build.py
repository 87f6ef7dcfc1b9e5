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

Both carry nbgrader cell metadata (solution cells, locked grader cells worth one
point, answer cells), so a teacher can use the solution notebooks as nbgrader
*source* notebooks. Cell ids are deterministic, so a rebuild of an unchanged
source changes nothing.
"""
from __future__ import annotations

import re
from pathlib import Path

__all__ = ["BEGIN", "END", "CODE_STUB", "TEXT_STUB", "strip_solutions", "build_notebook",
           "notebook_text", "lesson_sources", "build", "default_lessons_dir", "repository_root",
           "NeedsCheckout"]

BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
CODE_STUB = ("# YOUR CODE HERE", "raise NotImplementedError()")
TEXT_STUB = "YOUR ANSWER HERE"
_GRADER_CALL = re.compile(r"^check\.(\w+)\(", re.M)
_DEF = re.compile(r"^def (\w+)\(", re.M)


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


def build_notebook(src, kind):
    """Build the ``"student"`` or ``"solution"`` notebook (a NotebookNode) from a source file."""
    import jupytext
    import nbformat
    if kind not in ("student", "solution"):
        raise ValueError(f"kind must be 'student' or 'solution', got {kind!r}")
    src = Path(src)
    parsed = jupytext.read(src, fmt="py:percent")
    nb = nbformat.v4.new_notebook()
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    seen = set()
    for i, cell in enumerate(parsed.cells):
        text, where = cell.source, f"{src.name}, cell {i + 1}"
        has_solution = bool(_regions(text.split("\n"), where))
        meta = {}
        if cell.cell_type == "markdown":
            if has_solution:
                meta = _nbgrader(f"answers-{i}", solution=True, grade=True, points=1)
                text = (strip_solutions(text, "markdown", where) if kind == "student" else
                        "\n".join(s for s in text.split("\n") if s.strip() not in (BEGIN, END)))
            new = nbformat.v4.new_markdown_cell(text, metadata=meta)
        else:
            if has_solution:
                names = _DEF.findall(text)
                meta = _nbgrader(f"ex-{names[0] if names else i}", solution=True)
                if kind == "student":
                    text = strip_solutions(text, "code", where)
            else:
                graded = [n for n in _GRADER_CALL.findall(text) if n != "progress"]
                if graded:
                    meta = _nbgrader(f"check-{graded[0]}", grade=True, locked=True, points=len(graded))
            new = nbformat.v4.new_code_cell(text, metadata=meta)
        gid = meta.get("nbgrader", {}).get("grade_id")
        if gid is not None:
            if gid in seen:
                raise ValueError(f"{where}: duplicate nbgrader grade_id {gid!r}")
            seen.add(gid)
        new["id"] = f"cell-{i:02d}"
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
