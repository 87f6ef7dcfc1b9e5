"""Regenerate every PNG in ``figures/`` with one command:

    python -m minimoe.figures                 # all figures, into <repo>/figures
    python -m minimoe.figures --only clinic   # just the builders whose name contains "clinic"
    python -m minimoe.figures --list          # what would be built

Each *builder* is a function ``builder(out_dir) -> list of paths`` registered
with :func:`register`; parts of minimoe that add figures for the README or the
lessons register a builder here, so this one command keeps ``figures/`` in
step with the code. Builders compute first, then draw with :mod:`minimoe.course.viz`
(whose save is atomic: an interrupted run never leaves a truncated PNG). ``--out`` is
checked before any builder runs.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from ..validate import check_out_dir

__all__ = ["BUILDERS", "register", "default_dir", "main"]

BUILDERS = {}


def register(fn):
    """Add ``fn(out_dir) -> [paths]`` to the builders run by ``python -m minimoe.figures``."""
    BUILDERS[fn.__name__] = fn
    return fn


def default_dir():
    """The repository's ``figures/`` in a clone; ``./figures`` (the current folder) otherwise.

    An installed package never writes into ``site-packages``: there is no ``figures/``
    beside it there, so the default is the folder the command runs in.
    """
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    root = os.path.dirname(package)
    if os.path.isfile(os.path.join(root, "pyproject.toml")) and os.path.isdir(os.path.join(root, "figures")):
        return os.path.join(root, "figures")
    return os.path.join(os.getcwd(), "figures")


# --------------------------------------------------------------------------- the whole clinic
@register
def clinic_demo(out_dir):
    """The four clinics (``python -m minimoe``), over seeds 0–2: the README's table and figures.

    Writes clinic_summary.png (the headline), learning_curves.png, expert_load.png,
    expert_specialty.png, clinic_data.png, results.md and results.json.
    """
    from ..__main__ import DEFAULTS, format_table, run_demo, write_outputs
    res = run_demo(DEFAULTS, seeds=(0, 1, 2), progress=False, log=lambda *a: None)
    print(format_table(res["rows"]))
    return write_outputs(res, out_dir)


# --------------------------------------------------------------------------- lesson 12: real text
@register
def lm_realtext(out_dir):
    """The MoE language model on Python's own text (``python -m minimoe.lm``, the full run, about ten minutes).

    Writes lm_realtext.json / .md (every number, with the Python version), lm_dense_vs_sparse.png,
    lm_experts.png, lm_routing.png, lm_expert_text.png / .html and lm_upcycling.png.
    """
    from ..lm import experiments
    from ..lm.__main__ import write_outputs
    try:
        from threadpoolctl import threadpool_limits
        limiter = threadpool_limits(limits=1, user_api="blas")      # small matrices: one thread is faster
    except ImportError:
        limiter = None
    try:
        res, _ = experiments.run_all(experiments.FULL, progress=None)
    finally:
        if limiter is not None:
            limiter.restore_original_limits()
    print(experiments.format_tables(res, markdown=False))
    return write_outputs(res, out_dir, log=lambda *a: None)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m minimoe.figures",
                                 description="Regenerate the PNGs used by the README and the lessons.")
    ap.add_argument("--out", default=default_dir(), metavar="DIR",
                    help="output directory (default: the repository's figures/)")
    ap.add_argument("--only", default=None, metavar="TEXT",
                    help="run only the builders whose name contains TEXT")
    ap.add_argument("--list", action="store_true", help="list the builders and exit")
    args = ap.parse_args(argv)
    chosen = {n: f for n, f in BUILDERS.items() if args.only is None or args.only in n}
    if args.list:
        for n, f in BUILDERS.items():
            print(f"{n:<20} {(f.__doc__ or '').strip().splitlines()[0]}")
        return 0
    if not chosen:
        ap.error(f"--only {args.only!r} matches no builder; choose from: {', '.join(BUILDERS)}")
    try:                            # before any builder runs: a bad --out must not cost a whole run
        check_out_dir("--out", args.out)
    except (TypeError, ValueError) as err:
        ap.error(str(err))
    for name, fn in chosen.items():
        t0 = time.perf_counter()
        paths = fn(args.out)
        print(f"{name}: wrote {len(paths)} files to {args.out} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
