"""``python -m minimoe.lm``: the MoE language model on real text — lesson 12's full run.

    python -m minimoe.lm                  # the full run: tables and figures in ./minimoe_lm
    python -m minimoe.lm --quick          # under a minute on 2 cores: one seed, E in {1, 8}, few steps
    python -m minimoe.lm --out figures    # write somewhere else (python -m minimoe.figures uses figures/)

It reads Python's own documentation and standard library from the running Python
(:mod:`minimoe.lm.text`: nothing is downloaded), runs the four experiments of
:mod:`minimoe.lm.experiments` with a progress bar over every training step, prints the
tables and writes them (``lm_realtext.md``, ``lm_realtext.json``: the Python version and
every number) with the figures. Everything is written into a hidden folder first and moved
into place only when all of it is done, so an interrupted run leaves ``--out`` as it was.

The BLAS is limited to one thread (with threadpoolctl, if installed): the matrices are
small, and one thread is faster for them than two that wait for each other.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

from . import experiments as X
from ..validate import atomic_write_text, check_out_dir, check_out_files, exit_cleanly

__all__ = ["OUTPUTS", "write_outputs", "main"]

OUTPUTS = ("lm_realtext.json", "lm_realtext.md", "lm_dense_vs_sparse.png", "lm_experts.png", "lm_routing.png",
           "lm_expert_text.png", "lm_expert_text.html", "lm_upcycling.png")


def _snippets(res, layer):
    """The coloured-text panels of block ``layer``: ``{title: (text, experts)}``."""
    return {name: (v["text"], v["experts"]) for name, v in res["expert_text"].items() if v["layer"] == layer}


def write_outputs(res, out_dir, log=print):
    """Write the tables (md, json) and the figures of a :func:`~minimoe.lm.experiments.run_all` result
    into ``out_dir``: all of them, or (if interrupted) none. Returns the paths written."""
    from ..course import viz
    from ..__main__ import _move_in              # the demo's all-or-nothing move
    check_out_dir("out_dir", out_dir)
    check_out_files("out_dir", out_dir, OUTPUTS)
    stage = tempfile.mkdtemp(dir=out_dir, prefix=".minimoe-lm-")
    p = lambda name: os.path.join(stage, name)  # noqa: E731
    try:
        atomic_write_text(p("lm_realtext.json"), json.dumps(res, indent=1))
        atomic_write_text(p("lm_realtext.md"), X.format_tables(res) + "\n")
        viz.plot_dense_vs_sparse(res["compare"], res["baselines"], p("lm_dense_vs_sparse.png"))
        dense = [r for r in res["compare"] if r["kind"] == "dense" and r["seed"] == res["config"]["seeds"][0]][0]
        viz.plot_loss_vs_experts(res["sweep"], p("lm_experts.png"), dense=(dense["params"], dense["test"]["mean"]))
        viz.plot_domain_vs_type(res["routing"], p("lm_routing.png"))
        E = res["config"]["n_experts"]
        last = res["config"]["n_layers"] - 1
        title = f"Each character coloured by its expert (block {last} of the top-1 MoE, {E} experts; test text)"
        viz.plot_expert_text(_snippets(res, last), E, p("lm_expert_text.png"), title=title)
        page = "".join(viz.expert_text_html(_snippets(res, layer), E,
                                            title=f"Each character coloured by its expert, block {layer}")
                       for layer in range(res["config"]["n_layers"]))
        atomic_write_text(p("lm_expert_text.html"), page)
        viz.plot_upcycling(res["upcycle"], res["baselines"], p("lm_upcycling.png"))
        old = [n for n in OUTPUTS if os.path.exists(os.path.join(out_dir, n))]
        _move_in(stage, out_dir, OUTPUTS)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    if old:
        log(f"Replaced {len(old)} files of an earlier run in {out_dir}.")
    return [os.path.join(out_dir, n) for n in OUTPUTS]


def _parser():
    ap = argparse.ArgumentParser(
        prog="python -m minimoe.lm",
        description="Train minimoe's MoE language model on text that ships with Python (its documentation "
                    "and standard library, read at run time): dense against sparse at equal FLOPs, loss "
                    "against the number of experts, what the experts learn, and sparse upcycling. Prints "
                    "the tables and writes them with the figures.")
    ap.add_argument("--quick", action="store_true",
                    help=f"a short run (one seed, E in {list(X.QUICK['sweep'])}, {X.QUICK['steps']} steps): "
                         f"under a minute on 2 cores; its numbers mean little")
    ap.add_argument("--out", default="minimoe_lm", metavar="DIR",
                    help="folder for the tables and figures (default: ./minimoe_lm; created if missing)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def main(argv=None):
    """Entry point of ``python -m minimoe.lm``; returns 0. Ctrl-C ends it with one line and exit 130."""
    with exit_cleanly():
        ap = _parser()
        args = ap.parse_args(argv)
        try:                            # before any training: a bad --out must not cost a whole run
            check_out_dir("--out", args.out)
            check_out_files("--out", args.out, OUTPUTS)
        except (TypeError, ValueError) as err:
            ap.error(str(err))
        cfg = X.QUICK if args.quick else X.FULL
        limiter = None
        try:
            from threadpoolctl import threadpool_limits
            limiter = threadpool_limits(limits=1, user_api="blas")
        except ImportError:             # optional: the run is only slower without it
            pass
        t0 = time.perf_counter()
        try:
            res, _ = X.run_all(cfg, progress=False if args.no_progress else None)
        finally:
            if limiter is not None:
                limiter.restore_original_limits()
        print(X.format_tables(res, markdown=False))
        paths = write_outputs(res, args.out, log=print)
        print(f"\nWrote {len(paths)} files to {os.path.abspath(args.out)}/ in {time.perf_counter() - t0:.0f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
