"""``python -m minimoe.checks``: a learner's progress, or the lesson build.

    python -m minimoe.checks [NOTEBOOK_OR_DIR ...] [--run]
        Progress over lesson notebooks (default: the repository's lessons/).
        Without --run, reads the verdicts saved in each notebook's outputs (run
        the notebook and save it first); with --run, executes a copy of each.
    python -m minimoe.checks build [--check]
        Build lessons/NN_*.ipynb and lessons/solutions/NN_*.ipynb from
        lessons/src/NN_*.py; with --check, only report (exit 1) if any is stale.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _notebooks(paths):
    from .build import default_lessons_dir
    found = []
    for p in (paths or [default_lessons_dir()]):
        p = Path(p)
        if p.is_dir():
            found += sorted(p.glob("[0-9][0-9]_*.ipynb"))
        elif p.suffix == ".ipynb" and p.exists():
            found.append(p)
        else:
            raise SystemExit(f"not a notebook or a folder of notebooks: {p}")
    return found


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["build"]:
        ap = argparse.ArgumentParser(prog="python -m minimoe.checks build",
                                     description="Build the lesson notebooks from lessons/src/.")
        ap.add_argument("--check", action="store_true", help="only check that they are up to date")
        ap.add_argument("--lessons", default=None, help="the lessons folder (default: the repository's)")
        args = ap.parse_args(argv[1:])
        from .build import build
        stale = build(args.lessons, check=args.check)
        for p in stale:
            print(("out of date: " if args.check else "wrote ") + str(p))
        if args.check and stale:
            print("run `python -m minimoe.checks build` to rebuild them")
            return 1
        if not stale:
            print("all lesson notebooks are up to date")
        return 0
    ap = argparse.ArgumentParser(prog="python -m minimoe.checks",
                                 description="Report your progress through the minimoe lessons.")
    ap.add_argument("paths", nargs="*", help="notebooks or folders (default: the repository's lessons/)")
    ap.add_argument("--run", action="store_true",
                    help="execute a copy of each notebook instead of reading its saved outputs")
    args = ap.parse_args(argv)
    import nbformat
    from .progress import execute_notebook, format_report, summarize
    summaries = []
    for path in _notebooks(args.paths):
        if args.run:
            print(f"running {path} …", file=sys.stderr)
        nb = execute_notebook(path) if args.run else nbformat.read(path, as_version=4)
        lesson, rows = summarize(path, nb)
        summaries.append((path, lesson, rows))
    print(format_report(summaries))
    return 0


if __name__ == "__main__":
    sys.exit(main())
