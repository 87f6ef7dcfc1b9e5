"""``python -m minimoe.checks``: your own copy of the lessons, your progress, the build, a course.

    python -m minimoe.checks start [DIR]
        Copy the student notebooks into DIR (default ./my-lessons), never
        overwriting a file that is there. Work there, not in the repository's
        lessons/ (tracked by git and checked by the tests).
    python -m minimoe.checks [NOTEBOOK_OR_DIR ...] [--run]
        Progress over lesson notebooks (default: ./my-lessons if it exists, else
        the clone's lessons/). Without --run, reads the verdicts saved in each
        notebook's outputs (run the notebook and save it first); with --run,
        executes a copy of each.
    python -m minimoe.checks build [--check] [--lessons DIR]
        (In a clone.) Build lessons/NN_*.ipynb and lessons/solutions/NN_*.ipynb
        from lessons/src/NN_*.py; with --check, only report (exit 1) if any is stale.
    python -m minimoe.checks nbgrader DIR [--feedback summative] [--timeout S] [--force]
        (In a clone.) Write an nbgrader course directory: source/<lesson>/ for
        every lesson and nbgrader_config.py (an edited one is kept unless --force).
    python -m minimoe.checks nbgrader report COURSE
        Per student and assignment: locked cells changed or deleted, code that reaches
        into the grading machinery or minimoe's answers, checks scored without a
        passing verdict, cells that timed out, submissions nbgrader did not grade.
"""
from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path

from ...validate import arg_int, check_out_dir, exit_cleanly

COMMANDS = """\
commands:
  python -m minimoe.checks start [DIR]            copy the student notebooks into DIR
                                                  (default ./my-lessons; existing files are kept)
  python -m minimoe.checks [PATH ...] [--run]     your progress (default ./my-lessons, else lessons/)
  python -m minimoe.checks build [--check]        build the notebooks from lessons/src/ (in a clone)
  python -m minimoe.checks nbgrader DIR           write an nbgrader course directory (in a clone)
  python -m minimoe.checks nbgrader report COURSE tampering and grading trouble, per student
Each command has its own --help."""


def _notebooks(paths):
    """``(notebooks, problems)``: the NN_*.ipynb files named or inside the folders named."""
    from .build import NeedsCheckout, repository_root
    from .workspace import DEFAULT_DIR
    if not paths:
        root = repository_root()
        if Path(DEFAULT_DIR).is_dir():
            paths = [DEFAULT_DIR]
        elif root is not None:
            paths = [root / "lessons"]
        else:
            raise NeedsCheckout(f"no notebooks here: run `python -m minimoe.checks start` to copy the "
                                f"lessons into ./{DEFAULT_DIR}, or name the notebooks or folder to report on")
    found, problems = [], []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            found += sorted(p.glob("[0-9][0-9]_*.ipynb"))
        elif p.suffix == ".ipynb" and p.exists():
            found.append(p)
        else:
            problems.append((p, "not a notebook or a folder of notebooks"))
    return found, problems


def _folder(example):
    """An argparse ``type=`` for a folder name: an empty one would silently mean the current folder."""
    def folder(text):
        if not text.strip():
            raise argparse.ArgumentTypeError(f"is empty: give a folder, e.g. {example}")
        return text
    return folder


def _usable_folder(ap, path):
    """Create ``path`` if needed and check it is a writable folder, or ``ap.error`` naming it (exit 2)."""
    try:
        check_out_dir("DIR", path)
    except ValueError as err:
        ap.error(str(err))


def _start(argv):
    from .workspace import DEFAULT_DIR, start, student_notebooks
    ap = argparse.ArgumentParser(prog="python -m minimoe.checks start",
                                 description="Copy the student notebooks into a folder of your own, "
                                             "never overwriting a file that is already there.")
    ap.add_argument("dir", nargs="?", default=DEFAULT_DIR, metavar="DIR", type=_folder(DEFAULT_DIR),
                    help=f"where (default: ./{DEFAULT_DIR})")
    args = ap.parse_args(argv)
    student_notebooks()                 # no lessons to copy (a wheel without them): say so before making DIR
    _usable_folder(ap, args.dir)
    copied, kept = start(args.dir)
    for p in copied:
        print(f"copied {p}")
    if kept:
        print(f"kept {len(kept)} notebook(s) already in {args.dir} as they are: "
              + ", ".join(p.name for p in kept))
    first = (copied + kept)[0]
    print(f"\nstart with:  jupyter lab {first}\nyour progress:  python -m minimoe.checks {args.dir}")
    return 0


def _build(argv):
    from .build import build
    ap = argparse.ArgumentParser(prog="python -m minimoe.checks build",
                                 description="Build the lesson notebooks from lessons/src/ (in a clone).")
    ap.add_argument("--check", action="store_true", help="only check that they are up to date")
    ap.add_argument("--lessons", default=None, type=_folder("lessons"),
                    help="the lessons folder (default: the clone's lessons/)")
    args = ap.parse_args(argv)
    try:
        stale = build(args.lessons, check=args.check)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for p in stale:
        print(("out of date: " if args.check else "wrote ") + str(p))
    if args.check and stale:
        print("run `python -m minimoe.checks build` to rebuild them")
        return 1
    if not stale:
        print("all lesson notebooks are up to date")
    return 0


def _nbgrader(argv):
    from .build import default_lessons_dir
    from .nbgrader_course import TIMEOUT_MARGIN, default_timeout, write_course
    if argv[:1] == ["report"]:
        return _report(argv[1:])
    ap = argparse.ArgumentParser(prog="python -m minimoe.checks nbgrader",
                                 description="Write an nbgrader course directory with every lesson "
                                             "(source/<lesson>/<lesson>.ipynb and nbgrader_config.py). "
                                             "`python -m minimoe.checks nbgrader report COURSE` then lists "
                                             "tampering and grading trouble per student.")
    ap.add_argument("dir", metavar="DIR", type=_folder("course"),
                    help="the course directory to write (created if needed; ./report if it is named report)")
    ap.add_argument("--lessons", default=None, type=_folder("lessons"),
                    help="the lessons folder (default: the clone's lessons/)")
    ap.add_argument("--timeout", type=arg_int(low=1), default=None, metavar="SECONDS",
                    help=f"nbgrader's seconds per cell, >= 1 (default {default_timeout()}: {TIMEOUT_MARGIN}x the "
                         f"slowest cell measured; nbgrader would read 0 as no limit)")
    ap.add_argument("--feedback", choices=("detailed", "summative"), default="detailed",
                    help="detailed: the graders' hints, as in self-study (default); summative: what is "
                         "wrong, without how to fix it")
    ap.add_argument("--force", action="store_true",
                    help="replace an nbgrader_config.py or source notebook that differs (edits are lost)")
    args = ap.parse_args(argv)
    lessons = args.lessons or default_lessons_dir("python -m minimoe.checks nbgrader")   # a clone? before DIR
    _usable_folder(ap, args.dir)
    written = write_course(args.dir, lessons, timeout=args.timeout, feedback=args.feedback, force=args.force)
    print(f"wrote {len(written)} assignments into {Path(args.dir) / 'source'} and "
          f"{Path(args.dir) / 'nbgrader_config.py'}")
    print(f"then, in {args.dir}:  nbgrader generate_assignment {written[0].parent.name}")
    return 0


def _report(argv):
    from .nbgrader_report import format_report, report
    ap = argparse.ArgumentParser(prog="python -m minimoe.checks nbgrader report",
                                 description="For each student and assignment of an nbgrader course: locked "
                                             "cells changed or deleted, code that reaches into the grading "
                                             "machinery or minimoe's answers, checks that scored without a "
                                             "passing verdict, cells that timed out, and submissions that "
                                             "were not autograded. Exit status 1 when anything is listed.")
    ap.add_argument("course", metavar="COURSE", type=_folder("course"), help="the nbgrader course directory")
    ap.add_argument("--assignment", default=None, help="only this assignment (default: every one released)")
    args = ap.parse_args(argv)
    if not (Path(args.course) / "release").is_dir():
        ap.error(f"COURSE {args.course!r} has no release/ folder: is it an nbgrader course directory "
                 f"after `nbgrader generate_assignment`?")
    rows = report(args.course, assignment=args.assignment)
    print(format_report(rows))
    return 1 if any(r.findings for r in rows) else 0


def _progress(argv):
    ap = argparse.ArgumentParser(prog="python -m minimoe.checks",
                                 description="Report your progress through the minimoe lessons.",
                                 epilog=COMMANDS, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="*", type=_folder("my-lessons"),
                    help="notebooks or folders (default: ./my-lessons if it exists, else the clone's lessons/)")
    ap.add_argument("--run", action="store_true",
                    help="execute a copy of each notebook instead of reading its saved outputs")
    args = ap.parse_args(argv)
    import nbformat
    from .progress import execute_notebook, format_report, summarize, unreadable_verdicts
    notebooks, problems = _notebooks(args.paths)
    problems = [(p, msg + _did_you_mean(p)) for p, msg in problems]
    summaries, notes = [], []
    for path in notebooks:
        if args.run:
            print(f"running {path} …", file=sys.stderr)
        try:
            nb = execute_notebook(path) if args.run else nbformat.read(path, as_version=4)
            lesson, rows = summarize(path, nb)
            skipped = unreadable_verdicts(nb)
        except Exception as err:    # a corrupt or truncated file must not hide the others
            problems.append((path, f"could not {'run' if args.run else 'read'} this notebook "
                                   f"({type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}); "
                                   f"is it truncated or not a notebook? Reopen it in Jupyter, or move it "
                                   f"aside and `python -m minimoe.checks start` copies a fresh one"))
            continue
        summaries.append((path, lesson, rows))
        if skipped:
            notes.append((path, f"{skipped} saved verdict{'s' if skipped > 1 else ''} could not be read (no "
                                f"exercise name or result) and {'were' if skipped > 1 else 'was'} skipped; "
                                f"run that exercise's check again and save"))
    if not summaries and not problems:
        print("no lesson notebooks (NN_name.ipynb) found in " + ", ".join(map(str, args.paths or ["."])))
        return 1
    print(format_report(summaries, problems, notes))
    return 1 if problems else 0


COMMAND_NAMES = ("start", "build", "nbgrader")


def _did_you_mean(path):
    """`` did you mean ...`` when a path that does not exist looks like a mistyped command."""
    if Path(path).exists():
        return ""
    close = difflib.get_close_matches(str(path), COMMAND_NAMES, n=1)
    return f"; did you mean `python -m minimoe.checks {close[0]}`?" if close else ""


def main(argv=None):
    """Entry point of ``python -m minimoe.checks``; returns the exit status.

    Bad arguments exit 2 with a message naming them, before anything is copied or written;
    Ctrl-C ends it with one line, ``interrupted``, and exit status 130.
    """
    from .build import NeedsCheckout
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = dict(zip(COMMAND_NAMES, (_start, _build, _nbgrader)))
    with exit_cleanly():
        try:
            if argv[:1] and argv[0] in commands:
                return commands[argv[0]](argv[1:])
            return _progress(argv)
        except (NeedsCheckout, NotADirectoryError, FileNotFoundError, FileExistsError, RuntimeError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
