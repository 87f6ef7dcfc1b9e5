"""What a teacher should look at after ``nbgrader autograde``: ``python -m minimoe.checks nbgrader report COURSE``.

nbgrader restores a changed locked cell and puts back a deleted one (the course config asks it
to), but says so only in its log, if at all. This report reads the course folder and lists,
per assignment and student,

* **locked cells changed or deleted** in the submitted notebook (compared with release/);
* **code that reaches into the grading machinery or into minimoe's answers**: every code cell
  the student wrote or changed is parsed (never run) and these are named with their line —
  the environment (``os.environ``, ``MINIMOE_STRICT``), the graders (``minimoe.course.checks``,
  ``strict``, ``publish``, rebinding ``check``), the kernel and the interpreter
  (``get_ipython``, ``sys.modules``, ``builtins``, ``setprofile``, frames, ``gc``, ``ctypes``),
  changing an attribute of an imported module (``np.allclose = ...``), code run from strings
  (``exec``), and minimoe's own answer to the exercise (what its grader's ``forbid`` lists);
* in the autograded notebook, **checks that scored without a passing verdict** from minimoe's
  grader (its output was suppressed somehow) and **cells that timed out**;
* **submissions that were not autograded** (nbgrader gave up on them, or autograde has not run).

Each row also shows the code score from the gradebook. A finding is a reason to read the
notebook, not a verdict: the solutions themselves produce none (a test says so).
"""
from __future__ import annotations

import ast
import importlib
from pathlib import Path
from typing import NamedTuple

from .grading import METADATA_KEY

__all__ = ["Row", "report", "format_report", "scan_code", "submission_findings"]

# names that only the grading machinery, the kernel or the interpreter's insides answer to
_MACHINERY = {
    "MINIMOE_STRICT", "NBGRADER_EXECUTION", "strict", "grading", "publish", "METADATA_KEY", METADATA_KEY,
    "CheckFailed", "LESSONS", "_RESULTS", "_FORBIDDEN", "_PARTS", "_STARTED_STRICT", "_Sealed",
    "get_ipython", "showtraceback", "set_custom_exc", "_render_traceback_", "_ipython_display_",
    "setprofile", "settrace", "getprofile", "gettrace", "excepthook", "displayhook",
    "__builtins__", "builtins", "__import__", "__class__", "__dict__", "__code__", "__closure__",
    "__globals__", "__wrapped__", "f_back", "f_locals", "f_globals", "_getframe", "environ", "putenv",
    "unsetenv",
}
# attributes that are the machinery only on a given module (np.stack is not inspect.stack)
_ON_MODULE = {"sys": {"modules", "_getframe", "meta_path", "path_hooks"}, "inspect": {"stack", "currentframe",
              "getouterframes", "getsource"}, "gc": {"get_objects", "get_referrers"},
              "os": {"environ", "putenv", "unsetenv", "system", "_exit", "kill"}}
_MODULES = ("minimoe.course.checks", "minimoe.checks", "minimoe.course.bugs", "builtins", "inspect", "gc",
            "ctypes", "importlib", "IPython", "signal", "threading", "subprocess")
_DYNAMIC = {"exec", "eval", "compile", "vars", "globals", "setattr", "delattr", "__import__"}


class Row(NamedTuple):
    """One student's submission of one assignment."""
    assignment: str
    student: str
    score: str          # "code 5/5" from the gradebook, "" without one
    findings: list      # what to look at, one sentence each


def _root(node):
    while isinstance(node, (ast.Attribute, ast.Subscript)):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def _imported(tree):
    """Names bound by import statements."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def scan_code(source, imported=(), forbidden=()):
    """``[(line, what), ...]``: where ``source`` reaches into the grading machinery or minimoe's answers.

    ``imported``: names bound by imports elsewhere in the notebook (``np``, ``check``, ...);
    ``forbidden``: minimoe's answers to this cell's exercise, by name (its grader's forbid
    list). A cell that does not parse is left to the grader (it fails its check).
    """
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    imported = set(imported) | _imported(tree)
    found = []

    def flag(node, what):
        found.append((getattr(node, "lineno", 0), what))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith(_MODULES):
                    flag(node, f"imports {a.name}")
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if mod.startswith(_MODULES) or any(f"{mod}.{a.name}".startswith(_MODULES) for a in node.names):
                flag(node, f"imports from {mod}: {', '.join(a.name for a in node.names)}")
        elif isinstance(node, ast.Name):
            if node.id in _MACHINERY:
                flag(node, f"uses `{node.id}`")
            elif node.id == "check" and isinstance(node.ctx, (ast.Store, ast.Del)):
                flag(node, "rebinds `check`, the name the lesson's graders are called through")
            elif node.id in forbidden and node.id in imported:      # imported, not the student's own
                flag(node, f"uses `{node.id}`, minimoe's own answer to this exercise")
        elif isinstance(node, ast.Attribute):
            base = _root(node)
            if node.attr in _MACHINERY or node.attr in _ON_MODULE.get(base, ()):
                flag(node, f"uses `{base or '…'}.{node.attr}`")
            elif isinstance(node.ctx, (ast.Store, ast.Del)) and base in imported:
                flag(node, f"changes `{base}.{node.attr}`, part of an imported module")
            elif node.attr in forbidden and base in imported:
                flag(node, f"uses `{base}.{node.attr}`, minimoe's own answer to this exercise")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _DYNAMIC:
            flag(node, f"calls {node.func.id}()")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in _MACHINERY:
            flag(node, f"names {node.value!r}")
    return sorted(set(found))


def _cells(nb):
    return [(c.get("metadata", {}).get("nbgrader", {}) or {}, c) for c in nb.cells]


def _forbidden(assignment, release):
    """``{learner function name: names of minimoe's answers its grader forbids}`` for a lesson.

    Read from the released check cells (``check.mixed_units(load_is_honest, fixed_smooth_load)``
    hands ``load_is_honest`` to grader ``mixed_units``) and the graders' ``forbid`` lists.
    """
    try:
        lesson = importlib.import_module(f"minimoe.course.checks.lesson{assignment[:2]}").LESSON
    except (ImportError, AttributeError):
        return {}
    out = {}
    for meta, cell in _cells(release):
        if not (meta.get("locked") and cell.cell_type == "code"):
            continue
        try:
            tree = ast.parse(cell.source)
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in lesson.exercises):
                names = {getattr(f, "__name__", "") for f in lesson.exercises[node.func.attr].forbidden} - {""}
                for arg in node.args:
                    if isinstance(arg, ast.Name):
                        out.setdefault(arg.id, set()).update(names)
    return out


def submission_findings(release, submitted, autograded=None, forbidden=None):
    """What to look at in one submitted notebook (NotebookNodes; ``autograded`` may be None).

    ``forbidden``: ``{function name: minimoe's answers to it}`` (default: read from ``release``
    and the lesson's graders, the lesson named by the notebook's first two characters)."""
    findings = []
    rel = {m.get("grade_id"): c for m, c in _cells(release) if m.get("grade_id")}
    rel_by_id = {c.get("id"): c for c in release.cells}
    sub = {m.get("grade_id"): c for m, c in _cells(submitted) if m.get("grade_id")}
    for gid, cell in rel.items():
        meta = cell.metadata["nbgrader"]
        if not meta.get("locked"):
            continue
        if gid not in sub:
            findings.append(f"deleted locked cell {gid}")
        elif sub[gid].source != cell.source or sub[gid].cell_type != cell.cell_type:
            findings.append(f"changed locked cell {gid}")
    if forbidden is None:
        forbidden = {}
    imported = set()
    for c in list(release.cells) + list(submitted.cells):
        if c.cell_type == "code":
            try:
                imported |= _imported(ast.parse(c.source))
            except SyntaxError:
                pass
    for meta, cell in _cells(submitted):
        if cell.cell_type != "code" or (meta.get("locked") and meta.get("grade_id") in rel):
            continue
        before = rel.get(meta.get("grade_id")) or rel_by_id.get(cell.get("id"))
        if before is not None and before.source == cell.source:
            continue                                        # as released: nothing the student wrote
        old = set(before.source.split("\n")) if before is not None else set()
        name = meta.get("grade_id") or f"cell {submitted.cells.index(cell) + 1}"
        lines = cell.source.split("\n")
        answers = set().union(*[forbidden.get(fn, set()) for fn in _defined(cell.source)])
        by_line = {}
        for line, what in scan_code(cell.source, imported, answers):
            if 0 < line <= len(lines) and lines[line - 1] in old:
                continue                                    # a line of the released cell, left as it was
            by_line.setdefault(line, []).append(what)
        findings += [f"{name} line {line}: {'; '.join(whats)}" for line, whats in sorted(by_line.items())]
    if autograded is not None:
        findings += _graded_findings(autograded)
    return findings


def _defined(source):
    try:
        return [n.name for n in ast.parse(source).body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    except SyntaxError:
        return []


def _graded_findings(nb):
    found = []
    for n, (meta, cell) in enumerate(_cells(nb)):
        if cell.cell_type != "code":
            continue
        outs = cell.get("outputs", [])
        if any(o.get("ename") == "CellTimeoutError" for o in outs):
            found.append(f"{meta.get('grade_id') or f'cell {n + 1}'} timed out (see its feedback)")
            continue
        if not meta.get("grade"):
            continue
        failed = any(o.get("output_type") == "error" or o.get("name") == "stderr" for o in outs)
        verdicts = [o.get("metadata", {}).get(METADATA_KEY) for o in outs]
        earned = any(isinstance(v, dict) and (v.get("passed") or (v.get("credit") or 0) > 0) for v in verdicts)
        if not failed and not earned:
            found.append(f"{meta['grade_id']} scored without a passing verdict from minimoe's grader")
    return found


def _scores(course):
    """``{(assignment, student): "code 5/5"}`` from the gradebook, if nbgrader and one are there."""
    db = Path(course) / "gradebook.db"
    try:
        from nbgrader.api import Gradebook
    except ImportError:
        return {}
    if not db.exists():
        return {}
    out = {}
    with Gradebook(f"sqlite:///{db.resolve()}") as gb:
        for a in gb.assignments:
            for s in a.submissions:
                out[(a.name, s.student.id)] = f"code {s.code_score:g}/{s.max_code_score:g}"
    return out


def report(course, assignment=None):
    """``[Row, ...]`` for every (assignment, student) with a submission, in order."""
    import nbformat
    course = Path(course)
    scores = _scores(course)
    rows = []
    for rel_dir in sorted(p for p in (course / "release").iterdir() if p.is_dir()):
        if assignment and rel_dir.name != assignment:
            continue
        for student_dir in sorted((course / "submitted").glob(f"*/{rel_dir.name}")):
            student, findings = student_dir.parent.name, []
            for rel_nb in sorted(rel_dir.glob("*.ipynb")):
                sub_nb = student_dir / rel_nb.name
                if not sub_nb.exists():
                    findings.append(f"did not submit {rel_nb.name}")
                    continue
                auto = course / "autograded" / student / rel_dir.name / rel_nb.name
                try:
                    sub = nbformat.read(sub_nb, as_version=4)
                except Exception as err:    # a broken file is a finding, not the end of the report
                    findings.append(f"{rel_nb.name} cannot be read ({type(err).__name__})")
                    continue
                graded = nbformat.read(auto, as_version=4) if auto.exists() else None
                if graded is None:
                    findings.append(f"{rel_nb.name} was not autograded (nbgrader gave up on it, or autograde "
                                    f"has not run): see autograde's log")
                release = nbformat.read(rel_nb, as_version=4)
                findings += submission_findings(release, sub, graded, _forbidden(rel_dir.name, release))
            rows.append(Row(rel_dir.name, student, scores.get((rel_dir.name, student), ""), findings))
    return rows


def format_report(rows):
    """The report as text: one line per submission, then its findings indented."""
    if not rows:
        return "no submissions found (submitted/<student>/<assignment>/)"
    width = max(len(r.student) for r in rows)
    lines, current = [], None
    for r in rows:
        if r.assignment != current:
            current = r.assignment
            lines.append(current)
        mark = "✘" if r.findings else "✔"
        lines.append(f"  {mark} {r.student:<{width}}  {r.score or '':<11} "
                     f"{len(r.findings)} finding{'s' if len(r.findings) != 1 else ''}" if r.findings else
                     f"  {mark} {r.student:<{width}}  {r.score or '':<11} nothing to look at")
        lines += [f"      - {f}" for f in r.findings]
    flagged = sum(1 for r in rows if r.findings)
    lines.append(f"{flagged} of {len(rows)} submissions to look at")
    return "\n".join(lines)
