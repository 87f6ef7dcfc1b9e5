"""Progress: how many exercises a learner has passed, per lesson and over the course.

Inside a notebook, the last cell calls ``check.progress()`` and shows the lesson's
table. Over all notebooks, ``python -m minimoe.checks`` reads the verdicts that
the graders left in the **saved** notebooks: each verdict is an output carrying
``{"minimoe_check": {...}}`` metadata, so nothing fragile is parsed. A notebook
that was never run (or saved without outputs) shows as "not run". With
``--run`` the notebooks are instead executed afresh, each in its own folder, on a
copy (the learner's file is never touched), which reports the state of the code
as saved, whatever was or was not run in the open session.
"""
from __future__ import annotations

import html
import importlib
import os
import re
from collections.abc import Mapping
from pathlib import Path

from .grading import LESSONS, METADATA_KEY

__all__ = ["format_table", "html_table", "notebook_results", "readable_verdict", "unreadable_verdicts",
           "lesson_for", "execute_notebook", "summarize", "format_report"]

_MARK = {True: "✔", False: "✘", None: "·"}
_WORD = {True: "passed", False: "not yet", None: "not run"}


def format_table(title, rows):
    """Plain-text progress table. ``rows``: ``[(exercise, True | False | None), ...]``."""
    width = max([len(n) for n, _ in rows] + [8])
    lines = [title]
    lines += [f"  {_MARK[p]} {n:<{width}}  {_WORD[p]}" for n, p in rows]
    passed = sum(1 for _, p in rows if p)
    done = "  — lesson complete!" if rows and passed == len(rows) else ""
    lines.append(f"  {passed}/{len(rows)} exercises passed{done}")
    return "\n".join(lines)


def html_table(title, rows):
    """The same table as HTML, for Jupyter."""
    colour = {True: "#1a7f37", False: "#cf222e", None: "#777"}
    body = "".join(f'<tr><td style="color:{colour[p]}">{_MARK[p]}</td><td><code>{html.escape(n)}</code></td>'
                   f'<td style="color:{colour[p]}">{_WORD[p]}</td></tr>' for n, p in rows)
    passed = sum(1 for _, p in rows if p)
    return (f"<b>{html.escape(title)}</b><table>{body}</table>"
            f"<b>{passed}/{len(rows)}</b> exercises passed")


def notebook_results(nb):
    """Every verdict recorded in a notebook's outputs, in document order (dicts).

    A verdict whose metadata is not a mapping (a hand-edited or damaged file) comes back as an
    empty dict, so it is counted by :func:`unreadable_verdicts` rather than stopping the report.
    """
    found = []
    for cell in nb.get("cells", []):
        for out in cell.get("outputs", []) or []:
            meta = out.get("metadata", {}) or {}
            if METADATA_KEY in meta:
                v = meta[METADATA_KEY]
                found.append(dict(v) if isinstance(v, Mapping) else {})
    return found


def readable_verdict(r):
    """True when a saved verdict has what the report needs: an ``exercise`` name and a bool ``passed``.

    The grader always writes both (:class:`~minimoe.course.checks.grading.Result`); one without
    them was edited or damaged, and is skipped, not taken for a broken notebook.
    """
    return isinstance(r.get("exercise"), str) and isinstance(r.get("passed"), bool)


def unreadable_verdicts(nb):
    """How many of a notebook's saved verdicts lack an exercise name or a result (skipped in reports)."""
    return sum(not readable_verdict(r) for r in notebook_results(nb))


def lesson_for(path):
    """The :class:`Lesson` of a notebook named ``NN_something.ipynb``, or None."""
    m = re.match(r"(\d\d)_", Path(path).name)
    if not m:
        return None
    try:
        importlib.import_module(f"minimoe.course.checks.lesson{m.group(1)}")
    except ImportError:
        return None
    return LESSONS.get(m.group(1))


def execute_notebook(path, timeout=300):
    """Execute a copy of the notebook at ``path`` (in its own folder) and return it.

    Errors in cells do not stop the run (``allow_errors``): a learner's notebook
    with a broken exercise still gets every other exercise graded.
    """
    import nbformat
    from nbclient import NotebookClient
    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    os.environ.setdefault("MPLBACKEND", "Agg")
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", allow_errors=True,
                            resources={"metadata": {"path": str(path.parent.resolve())}})
    client.execute()
    return nb


def summarize(path, nb):
    """``(lesson, rows)`` for one notebook, ``rows = [(exercise, True|False|None)]``."""
    lesson = lesson_for(path)
    latest = {}
    for r in notebook_results(nb):
        if readable_verdict(r):
            latest[r["exercise"]] = r["passed"]
    if lesson is None:
        return None, sorted(latest.items())
    return lesson, [(name, latest.get(name)) for name in lesson.exercises]


def format_report(summaries, problems=(), notes=()):
    """The course table: one line per notebook file and a total over lessons.

    ``summaries``: ``[(path, lesson, rows), ...]`` as from :func:`summarize`;
    ``problems``: ``[(path, message), ...]`` for notebooks that could not be read or
    run (each is named, and the others are still reported); ``notes``: ``[(path, message), ...]``
    for what is worth knowing but not wrong (a verdict that was skipped). Each line names its
    file. When one lesson has several copies (``01_the_specialist.ipynb`` and
    ``01_the_specialist-Copy1.ipynb``), each is listed and the total counts the
    copy with the most exercises passed, once.
    """
    lines = ["Your progress through the minimoe lessons", ""]
    titles = [f"{lesson.number} {lesson.title}" if lesson else Path(path).stem for path, lesson, _ in summaries]
    width = max([28] + [len(t) for t in titles])
    best = {}                  # lesson key -> (passed, total, path) of its best copy
    copies = {}
    for title, (path, lesson, rows) in zip(titles, summaries):
        passed = sum(1 for _, p in rows if p)
        marks = "".join(_MARK[p] for _, p in rows)
        todo = [n for n, p in rows if not p]
        state = "not run yet" if rows and all(p is None for _, p in rows) else (
            "complete" if rows and not todo else "next: " + ", ".join(todo[:3]) + (" …" if len(todo) > 3 else ""))
        lines.append(f"  {title:<{width}} {passed}/{len(rows):<3} {marks:<6} {state:<34} {Path(path).name}")
        key = lesson.number if lesson else str(path)
        copies.setdefault(key, []).append(Path(path).name)
        if key not in best or passed > best[key][0]:
            best[key] = (passed, len(rows), path)
    for path, message in problems:
        lines.append(f"  ✘ {Path(path).name}: {message}")
    for path, message in notes:
        lines.append(f"  note: {Path(path).name}: {message}")
    done = sum(b[0] for b in best.values())
    total = sum(b[1] for b in best.values())
    lines += ["", f"  {done}/{total} exercises passed"]
    for key, names in copies.items():
        if len(names) > 1:
            lines.append(f"  (lesson {key} has {len(names)} copies: {', '.join(names)}; "
                         f"the total counts {Path(best[key][2]).name}, the one with most passed)")
    if any(all(p is None for _, p in rows) for _, _, rows in summaries):
        lines.append("  (\"not run yet\": open the notebook, run it and save it — or use --run to execute it)")
    return "\n".join(lines)
