"""``python -m minimoe``: the four clinics, trained end to end on the clinic data.

    python -m minimoe                     # the full demo (well under a minute on 2 cores)
    python -m minimoe --quick             # a few seconds: small data, few epochs
    python -m minimoe --seed 0 1 2        # repeat over seeds; the table shows mean ± std
    python -m minimoe --out figures       # write the figures somewhere else

It draws the clinic data (:mod:`minimoe.clinic.data`), builds the four clinics of
:mod:`minimoe.clinic.models` at comparable compute per patient, trains each with
:func:`minimoe.clinic.train.train`, prints a table and writes figures and the numbers
(``results.json``, ``results.md``) to the output directory.

**How compute is matched.** The GP clinic (sparse MoE) has E experts of width h
and sends each patient to k of them, so its block costs ``2dE`` (router) +
``k·4dh`` (experts) + ``2kd`` (combine) FLOPs per patient. The generalist's
width ``h_g`` is the smallest whose FFN costs at least as much (``4d·h_g ≥``
that), so the generalist never has *less* compute than the GP clinic. The
ensemble is M such generalists (M× the compute) and the dense MoE runs all E
experts (about E/k× the experts' compute); the table says so.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time

import numpy as np

from .clinic.data import bayes_accuracy, make_clinic
from .clinic.models import DenseMoE, Ensemble, Generalist, SparseMoE
from .clinic.train import evaluate, specialty_routing, train
from .validate import atomic_write_text, check_out_dir, check_out_files, exit_cleanly

__all__ = ["DEFAULTS", "QUICK", "MAX_SPECIALTIES", "MAX_N_TRAIN", "OUTPUTS", "build_clinics", "run_demo",
           "format_table", "write_outputs", "main"]

# The full demo. Measured over seeds 0–4, see README: the GP clinic beats the
# generalist by ~0.18 accuracy at equal compute per patient.
DEFAULTS = dict(n_train=16000, n_val=2000, n_test=4000, n_specialties=8, n_classes=4, n_symptoms=8,
                rule_width=6, noise=0.05, d_model=16, d_hidden=8, n_experts=8, k=2, n_members=3,
                epochs=20, batch_size=128, lr=3e-3)
# --quick: the same clinics on a small data set, for tests and a first look.
QUICK = dict(DEFAULTS, n_train=3000, n_val=500, n_test=1000, epochs=6)
# The largest values the command line takes (measured on 2 cores):
# - each hidden specialty has its own diagnostic rule, which costs about 12 ms to draw (3 s at
#   256), and a column of 0.55 inch in the referral figure (matplotlib refuses an image wider
#   than 2^16 pixels, which that figure reaches at about 900); and with 8 symptoms, far fewer
#   specialties than that are already too close together to be told apart.
MAX_SPECIALTIES = 256
# - the data take about 200 MB per million patients, and one epoch of the four clinics about
#   a minute per million; at 10 million, 2 GB and hours of training.
MAX_N_TRAIN = 10_000_000

ORDER = ("ensemble", "generalist", "dense_moe", "sparse_moe")
TITLES = {"ensemble": "1 second opinion", "generalist": "2 generalist",
          "dense_moe": "3 ask every specialist", "sparse_moe": "4 GP referral"}


def build_clinics(cfg, seed, n_symptoms, n_classes):
    """The four clinics at matched compute; returns ``({kind: model}, {kind: description})``."""
    rng = np.random.default_rng(10_000 + seed)
    d, h, E, k, M = cfg["d_model"], cfg["d_hidden"], cfg["n_experts"], cfg["k"], cfg["n_members"]
    sparse = SparseMoE(n_symptoms, n_classes, d, h, E, k, rng=rng)
    # The generalist gets the smallest width whose FFN costs >= the GP clinic's whole block.
    h_g = math.ceil(sparse.block.flops_per_token() / (4 * d))
    clinics = {
        "ensemble": Ensemble(n_symptoms, n_classes, M, d, h_g, rng=rng),
        "generalist": Generalist(n_symptoms, n_classes, d, h_g, rng=rng),
        "dense_moe": DenseMoE(n_symptoms, n_classes, d, h, E, rng=rng),
        "sparse_moe": sparse,
    }
    desc = {
        "ensemble": f"{M} generalists of width {h_g}, probabilities averaged",
        "generalist": f"one FFN of width h_g={h_g}",
        "dense_moe": f"all {E} experts of width {h}, softmax-weighted",
        "sparse_moe": f"noisy top-{k} of {E} experts of width {h}, importance+load balancing",
    }
    return {kind: clinics[kind] for kind in ORDER}, desc


def run_demo(cfg, seeds=(0,), progress=None, log=print):
    """Train the four clinics for each seed. Returns a dict of results (JSON-friendly) and,
    for the first seed, the histories and the GP clinic's (E, S) referral table."""
    per_seed, histories, routing = [], None, None
    for seed in seeds:
        data = make_clinic(cfg["n_train"], cfg["n_val"], cfg["n_test"], n_symptoms=cfg["n_symptoms"],
                           n_specialties=cfg["n_specialties"], n_classes=cfg["n_classes"],
                           rule_width=cfg["rule_width"], noise=cfg["noise"], seed=seed, progress=progress)
        clinics, desc = build_clinics(cfg, seed, data.n_symptoms, data.n_classes)
        rows, hists = {}, {}
        for kind, model in clinics.items():
            t0 = time.perf_counter()
            hists[kind] = train(model, data.train, data.val, epochs=cfg["epochs"], batch_size=cfg["batch_size"],
                                lr=cfg["lr"], seed=seed, progress=progress,
                                desc=f"seed {seed} {TITLES[kind]}")
            ev = evaluate(model, data.test)
            rows[kind] = {"kind": kind, "acc": ev["acc"], "params": int(model.n_params),
                          "active": int(model.n_active_params), "flops": int(model.flops_per_token()),
                          "cv": ev.get("cv"), "seconds": time.perf_counter() - t0, "desc": desc[kind]}
            log(f"  seed {seed}  {TITLES[kind]:<24} test accuracy {ev['acc']:.3f}")
        per_seed.append(rows)
        if histories is None:
            histories, data0 = hists, data
            routing = specialty_routing(clinics["sparse_moe"], data.test)
    summary = []
    base = per_seed[0]["generalist"]["flops"]
    for kind in ORDER:
        accs = np.array([r[kind]["acc"] for r in per_seed])
        cvs = [r[kind]["cv"] for r in per_seed if r[kind]["cv"] is not None]
        r0 = per_seed[0][kind]
        summary.append({"kind": kind, "title": TITLES[kind], "desc": r0["desc"],
                        "acc_mean": float(accs.mean()), "acc_std": float(accs.std()),
                        "accs": accs.tolist(), "params": r0["params"], "active": r0["active"],
                        "flops": r0["flops"], "x_generalist": r0["flops"] / base,
                        "cv": float(np.mean(cvs)) if cvs else None,
                        "seconds": float(np.mean([r[kind]["seconds"] for r in per_seed]))})
    return {"config": dict(cfg), "seeds": list(seeds), "bayes": bayes_accuracy(cfg["noise"], cfg["n_classes"]),
            "rows": summary, "histories": histories, "routing": routing, "data": data0}


def format_table(rows, markdown=False):
    """The results table as text (or a Markdown table)."""
    head = ["clinic", "test acc", "params", "active params", "FLOPs/patient", "× generalist", "load CV"]
    lines = []
    for r in rows:
        acc = f"{r['acc_mean']:.3f}" + (f" ± {r['acc_std']:.3f}" if len(r["accs"]) > 1 else "")
        cv = "—" if r["cv"] is None else f"{r['cv']:.2f}"
        lines.append([r["title"], acc, f"{r['params']:,}", f"{r['active']:,}", f"{r['flops']:,}",
                      f"{r['x_generalist']:.2f}", cv])
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
        out += ["| " + " | ".join(row) + " |" for row in lines]
        return "\n".join(out)
    widths = [max(len(h), *(len(row[i]) for row in lines)) for i, h in enumerate(head)]
    fmt = lambda row: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                for i, (c, w) in enumerate(zip(row, widths)))
    return "\n".join([fmt(head), "  ".join("-" * w for w in widths)] + [fmt(r) for r in lines])


OUTPUTS = ("clinic_summary.png", "learning_curves.png", "expert_load.png", "expert_specialty.png",
           "clinic_data.png", "results.md", "results.json")


def write_outputs(res, out_dir, log=print):
    """Write the figures, results.json and results.md; return the list of paths written.

    Everything is drawn into a hidden staging folder inside ``out_dir`` first and moved into
    place only when all of it is done, so an interrupted run leaves the folder as it was
    (never a truncated PNG, never new figures mixed with an earlier run's numbers); a rerun
    replaces every file of the earlier run, and says so. A directory where one of the files
    goes is an error before anything is drawn.
    """
    from .course import viz
    check_out_dir("out_dir", out_dir)
    check_out_files("out_dir", out_dir, OUTPUTS)
    stage = tempfile.mkdtemp(dir=out_dir, prefix=".minimoe-demo-")
    p = lambda name: os.path.join(stage, name)  # noqa: E731
    try:
        viz.plot_clinic_summary(res["rows"], res["routing"], p("clinic_summary.png"), bayes=res["bayes"])
        viz.plot_learning_curves(res["histories"], p("learning_curves.png"), bayes=res["bayes"])
        viz.plot_expert_load(res["histories"]["sparse_moe"], p("expert_load.png"),
                             title="GP referral: share of patients each specialist saw during training")
        viz.plot_specialty_routing(res["routing"], p("expert_specialty.png"),
                                    title="GP referral: which specialty each expert ends up serving (%)")
        viz.plot_clinic_data(res["data"].test, res["data"].centers, p("clinic_data.png"))
        atomic_write_text(p("results.md"), format_table(res["rows"], markdown=True) + "\n")
        atomic_write_text(p("results.json"),
                          json.dumps({k: res[k] for k in ("config", "seeds", "bayes", "rows")}, indent=1))
        old = [n for n in OUTPUTS if os.path.exists(os.path.join(out_dir, n))]
        _move_in(stage, out_dir, OUTPUTS)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    if old:
        log(f"Replaced {len(old)} files of an earlier run in {out_dir}: all {len(OUTPUTS)} files there are "
            f"now from this run.")
    return [os.path.join(out_dir, n) for n in OUTPUTS]


def _move_in(stage, out_dir, names):
    """Move the files ``names`` from ``stage`` into ``out_dir``: all of them, or none.

    Each old file is first set aside in the stage (a rename, in the same file system); if a
    move fails or is interrupted, the new files moved so far are taken out again and the old
    ones put back, so ``out_dir`` never holds half of one run and half of another.
    """
    backup = os.path.join(stage, ".old")
    os.mkdir(backup)
    started = []
    try:
        for name in names:
            started.append(name)          # before the renames: an interrupt between them is undone too
            target = os.path.join(out_dir, name)
            if os.path.lexists(target):
                os.replace(target, os.path.join(backup, name))
            os.replace(os.path.join(stage, name), target)
    except BaseException:
        for name in reversed(started):
            target, aside = os.path.join(out_dir, name), os.path.join(backup, name)
            if os.path.lexists(aside):
                os.replace(aside, target)                 # the old file back, over the new one
            elif not os.path.lexists(os.path.join(stage, name)) and os.path.lexists(target):
                os.remove(target)                         # a new file where there was none
        raise


def _parser():
    ap = argparse.ArgumentParser(
        prog="python -m minimoe",
        description="The whole clinic: train four ways of getting a diagnosis — a second opinion "
                    "(ensemble), one generalist (dense FFN), asking every specialist (dense MoE) and a "
                    "GP's referral (sparse top-k MoE) — on the synthetic clinic data at comparable "
                    "compute per patient; print a table and write figures.")
    ap.add_argument("--seed", type=int, nargs="+", default=[0], metavar="N",
                    help="random seed(s) for data, weights and training; several seeds give mean ± std "
                         "(default: 0)")
    ap.add_argument("--n-train", type=int, default=None, metavar="N",
                    help=f"training patients (default: {DEFAULTS['n_train']}, or {QUICK['n_train']} with --quick; "
                         f"at least 10, at most {MAX_N_TRAIN:,}: the data take about 200 MB and an epoch of the "
                         f"four clinics about a minute per million patients)")
    ap.add_argument("--epochs", type=int, default=None, metavar="N",
                    help=f"passes over the training data (default: {DEFAULTS['epochs']}, or {QUICK['epochs']} "
                         f"with --quick)")
    ap.add_argument("--specialties", type=int, default=None, metavar="S",
                    help=f"hidden specialties in the data (default: {DEFAULTS['n_specialties']}; at most "
                         f"{MAX_SPECIALTIES}: each has its own rule to draw and a column in the referral "
                         f"figure, and with {DEFAULTS['n_symptoms']} symptoms many specialties overlap)")
    ap.add_argument("--out", default="minimoe_demo", metavar="DIR",
                    help="directory for the figures and results (default: ./minimoe_demo)")
    ap.add_argument("--quick", action="store_true",
                    help=f"small data and few epochs: {QUICK['n_train']} training, {QUICK['n_val']} validation "
                         f"and {QUICK['n_test']} test patients, {QUICK['epochs']} epochs (a few seconds)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    ap.add_argument("--no-figures", action="store_true", help="print the table only")
    return ap


def _check_args(ap, args):
    """Every argument, before any work: the run's config, or ``ap.error`` (exit 2) naming the option."""
    cfg = dict(QUICK if args.quick else DEFAULTS)
    for seed in args.seed:
        if seed < 0:
            ap.error(f"--seed must be >= 0, got {seed}")
        if args.seed.count(seed) > 1:
            ap.error(f"--seed {seed} is given twice: each seed is one run, and a repeated one would count "
                     f"twice in the mean ± std")
    too_many = {"n_train": "the data take about 200 MB and an epoch of the four clinics about a minute "
                           "per million patients",
                "n_specialties": f"each specialty has its own rule to draw, about 12 ms each, and a column in "
                                 f"the referral figure; with {cfg['n_symptoms']} symptoms, many more overlap too "
                                 f"much to tell apart"}
    for opt, key, low, high in (("--n-train", "n_train", 10, MAX_N_TRAIN), ("--epochs", "epochs", 1, None),
                                ("--specialties", "n_specialties", 1, MAX_SPECIALTIES)):
        value = getattr(args, opt[2:].replace("-", "_"))
        if value is not None:
            if value < low:
                ap.error(f"{opt} must be >= {low}, got {value}")
            if high is not None and value > high:
                ap.error(f"{opt} must be <= {high}, got {value}: {too_many[key]}")
            cfg[key] = value
    if not args.no_figures:
        try:                        # before any training: a bad --out must not cost a whole run
            check_out_dir("--out", args.out)
            check_out_files("--out", args.out, OUTPUTS)
        except (TypeError, ValueError) as err:
            ap.error(str(err))
    return cfg


def main(argv=None):
    """Entry point of ``python -m minimoe``; returns 0. Ctrl-C ends it with one line and exit 130."""
    with exit_cleanly():
        ap = _parser()
        args = ap.parse_args(argv)
        cfg = _check_args(ap, args)
        progress = False if args.no_progress else None

        t0 = time.perf_counter()
        print(f"The clinic: {cfg['n_train']} training patients, {cfg['n_specialties']} hidden specialties, "
              f"{cfg['n_classes']} diagnoses, {100 * cfg['noise']:.0f}% label noise "
              f"(best possible accuracy {bayes_accuracy(cfg['noise'], cfg['n_classes']):.3f}).")
        res = run_demo(cfg, seeds=args.seed, progress=progress)
        print()
        print(format_table(res["rows"]))
        print()
        for r in res["rows"]:
            print(f"  {r['title']:<24} {r['desc']}")
        g = next(r for r in res["rows"] if r["kind"] == "generalist")
        print(f"Compute is matched on FLOPs per patient: the generalist's width is the smallest whose FFN "
              f"costs at least the GP clinic's router + {cfg['k']} experts + combine ({g['flops']:,} FLOPs "
              f"in all, embedding and readout included).")
        print("Load CV: std/mean of the referrals each expert received on the test set (0 = perfectly even).")
        if not args.no_figures:
            paths = write_outputs(res, args.out, log=print)
            print(f"\nWrote {len(paths)} files to {os.path.abspath(args.out)}/: "
                  + ", ".join(os.path.basename(q) for q in paths))
        print(f"Done in {time.perf_counter() - t0:.1f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
