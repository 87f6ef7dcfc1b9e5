"""Plots for the demo, the README's figures and the lessons.

Every function takes plain data (histories, count tables, result rows), draws
one figure with matplotlib, saves it if given a ``path``, and returns the
``Figure``. Nothing here trains or routes: compute first, then draw.

Sections:
    1. style           shared colours and names of the four clinics
    2. the clinic data what the patients look like
    3. training        learning curves and expert load over training
    4. routing         which specialty each expert ends up serving
    5. results         accuracy against compute, and the headline figure

(Other parts of minimoe may append their own sections below.)
"""
from __future__ import annotations

import os

import numpy as np

__all__ = [
    "CLINIC_STYLE", "clinic_label", "save",
    "plot_clinic_data",
    "plot_learning_curves", "plot_expert_load",
    "plot_specialty_routing",
    "plot_accuracy_vs_compute", "plot_clinic_summary",
]


# =========================================================================== 1. style
def _plt():
    """Import pyplot lazily with a non-interactive backend unless one is already chosen."""
    import matplotlib
    if "MPLBACKEND" not in os.environ:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


# name shown in legends, colour, marker — one per clinic kind, used by every plot.
CLINIC_STYLE = {
    "ensemble":   ("second opinion (ensemble)", "#8c8c8c", "s"),
    "generalist": ("generalist (dense FFN)", "#e07b39", "o"),
    "dense_moe":  ("ask every specialist (dense MoE)", "#4c8bc4", "D"),
    "sparse_moe": ("GP referral (sparse top-k MoE)", "#2a9d5c", "*"),
}


def clinic_label(kind):
    """Legend label of a clinic kind (the kind itself if unknown)."""
    return CLINIC_STYLE.get(kind, (kind, None, "o"))[0]


def _style(kind, i=0):
    default = ("C%d" % i, "o")
    label, color, marker = CLINIC_STYLE.get(kind, (kind,) + default)
    return label, color, marker


def save(fig, path, dpi=130):
    """Save ``fig`` to ``path`` (creating its directory) and close it; returns ``path``."""
    plt = _plt()
    d = os.path.dirname(os.fspath(path))
    if d:
        os.makedirs(d, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path


def _finish(fig, path):
    if path is not None:
        save(fig, path)
    return fig


# =========================================================================== 2. the clinic data
def plot_clinic_data(split, centers, path=None, max_points=3000):
    """The patients, coloured by hidden specialty, each specialty on its own spoke.

    Specialty s's centre ``μ_s`` is sent to the s-th corner of a regular polygon:
    symptoms x are drawn at ``Σ_s (x · μ_s/‖μ_s‖) (cos θ_s, sin θ_s)``, ``θ_s = 2πs/S``.
    (No flat picture separates S orthogonal clusters; this one at least gives
    each its own direction. In the full symptom space they barely overlap.)

    Args:
        split: a :class:`~minimoe.data.Split`; centers: (S, n_symptoms) from ``ClinicData``.
    """
    plt = _plt()
    x = np.asarray(split.x, dtype=np.float64)[:max_points]
    spec = np.asarray(split.specialty)[:max_points]
    centers = np.asarray(centers, dtype=np.float64)
    S = centers.shape[0]
    norms = np.linalg.norm(centers, axis=1, keepdims=True)
    u = np.divide(centers, norms, out=np.zeros_like(centers), where=norms > 0)
    theta = 2 * np.pi * np.arange(S) / S
    xy = x @ (u.T @ np.stack([np.cos(theta), np.sin(theta)], axis=1))     # (N, 2)
    fig, ax = plt.subplots(figsize=(6.2, 5))
    cm = plt.get_cmap("tab10" if S <= 10 else "tab20")
    for c in range(S):
        m = spec == c
        ax.scatter(xy[m, 0], xy[m, 1], s=4, alpha=0.5, color=cm(c % cm.N), label=f"specialty {c}")
    ax.set_aspect("equal")
    ax.set_xlabel("projection 1")
    ax.set_ylabel("projection 2")
    ax.legend(markerscale=3, fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    ax.set_title("The clinic's patients: a cluster per hidden specialty\n"
                 "(inside each, the diagnosis follows the specialty's own rule)", fontsize=10)
    fig.tight_layout()
    return _finish(fig, path)


# =========================================================================== 3. training
def plot_learning_curves(histories, path=None, bayes=None, kinds=None):
    """Validation accuracy and training loss against epochs, one line per clinic.

    Args:
        histories: ``{name: History}`` (name is the clinic kind, e.g. ``"sparse_moe"``).
        bayes: optional best possible accuracy, drawn as a dashed ceiling.
        kinds: optional ``{name: kind}`` if the names are not kinds.
    """
    plt = _plt()
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    for i, (name, h) in enumerate(histories.items()):
        label, color, _ = _style((kinds or {}).get(name, name), i)
        ax_acc.plot(h.epoch, h.val_acc, color=color, lw=2, label=label)
        ax_loss.plot(h.epoch, h.train_loss, color=color, lw=2, label=label)
    if bayes is not None:
        ax_acc.axhline(bayes, color="k", ls="--", lw=1)
        ax_acc.annotate("best possible (label noise)", (0.02, bayes), xycoords=("axes fraction", "data"),
                        xytext=(0, -11), textcoords="offset points", fontsize=8)
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("validation accuracy")
    ax_acc.set_title("How well each clinic diagnoses")
    ax_acc.legend(fontsize=8, loc="lower right")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("training loss (cross-entropy)")
    ax_loss.set_title("Training loss")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _finish(fig, path)


def plot_expert_load(history, path=None, title="Patients per specialist during training"):
    """Share of referrals each expert processed, over training (a stacked area).

    Perfect balance is E equal bands; a collapsing GP shows one band swallowing
    the others. Dropped referrals (over capacity) are drawn on a second axis if any.
    """
    plt = _plt()
    load = history.load_array().astype(np.float64)
    if load.shape[1] == 0:
        raise ValueError("this history has no expert load (train an MoE clinic)")
    E = load.shape[1]
    total = load.sum(axis=1, keepdims=True)
    share = np.divide(load, total, out=np.zeros_like(load), where=total > 0)
    fig, ax = plt.subplots(figsize=(7, 4))
    cmap = plt.get_cmap("tab20" if E > 10 else "tab10")
    ax.stackplot(history.epoch, share.T, colors=[cmap(e % cmap.N) for e in range(E)],
                 labels=[f"expert {e}" for e in range(E)], alpha=0.9)
    for y in np.arange(1, E) / E:
        ax.axhline(y, color="white", lw=0.6, ls=":")
    ax.set_xlim(history.epoch[0], history.epoch[-1])
    ax.set_ylim(0, 1)
    ax.set_xlabel("epoch")
    ax.set_ylabel("share of referrals")
    ax.set_title(title + "\n(dotted lines: perfect balance)", fontsize=11)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    dropped = np.asarray(history.dropped, dtype=np.float64)
    if dropped.any():
        ax2 = ax.twinx()
        ax2.plot(history.epoch, dropped / np.maximum(total[:, 0], 1), color="k", lw=1.5, label="dropped")
        ax2.set_ylabel("fraction dropped (over capacity)")
        ax2.set_ylim(0, None)
    fig.tight_layout()
    return _finish(fig, path)


# =========================================================================== 4. routing
def plot_specialty_routing(counts, path=None, title="Which specialty each expert ends up serving", ax=None):
    """Heatmap of an (E, S) table from :func:`minimoe.train.specialty_routing`.

    Each row is normalised: row e shows where expert e's patients come from. A
    specialised expert has one dark cell; the numbers are the percentages.
    """
    plt = _plt()
    counts = np.asarray(counts, dtype=np.float64)
    E, S = counts.shape
    rows = counts.sum(axis=1, keepdims=True)
    frac = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    own = ax is None
    if own:
        fig, ax = plt.subplots(figsize=(1.0 + 0.55 * S, 1.0 + 0.45 * E))
    else:
        fig = ax.figure
    im = ax.imshow(frac, cmap="Greens", vmin=0, vmax=1, aspect="auto")
    for e in range(E):
        for s in range(S):
            if frac[e, s] >= 0.05:
                ax.text(s, e, f"{100 * frac[e, s]:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if frac[e, s] > 0.6 else "black")
    ax.set_xticks(range(S))
    ax.set_yticks(range(E))
    ax.set_yticklabels([f"{e} ({int(rows[e, 0])})" for e in range(E)], fontsize=8)
    ax.set_xlabel("hidden specialty of the patient")
    ax.set_ylabel("expert (referrals received)")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the expert's referrals")
    if own:
        fig.tight_layout()
    return _finish(fig, path) if own else fig


# =========================================================================== 5. results
def plot_accuracy_vs_compute(rows, path=None, ax=None, bayes=None):
    """Test accuracy against FLOPs per patient, one labelled marker per clinic.

    Args:
        rows: list of dicts with ``kind``, ``acc`` (or ``acc_mean`` and ``acc_std``
            over seeds), ``flops`` and ``params``.
        bayes: optional best possible accuracy (dashed line).
    """
    plt = _plt()
    own = ax is None
    if own:
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
    else:
        fig = ax.figure
    flops = np.array([r["flops"] for r in rows], dtype=np.float64)
    accs = np.array([r.get("acc_mean", r.get("acc")) for r in rows], dtype=np.float64)
    for i, r in enumerate(rows):
        label, color, marker = _style(r["kind"], i)
        ax.errorbar(flops[i], accs[i], yerr=r.get("acc_std"), fmt=marker, color=color,
                    ms=16 if marker == "*" else 10, capsize=3, zorder=3)
        ax.annotate(f"{label}\n{r['params']:,} params", (flops[i], accs[i]), xytext=(0, 12),
                    textcoords="offset points", ha="center", va="bottom", fontsize=8, color=color,
                    fontweight="bold")
    lo, hi = flops.min(), flops.max()
    ax.set_xlim(lo / 1.5, hi * 1.5)
    top = max(accs.max(), bayes or 0)
    ax.set_ylim(max(0.0, accs.min() - 0.08), min(1.0, top + 0.06))
    if bayes is not None:
        ax.axhline(bayes, color="k", ls="--", lw=1)
        ax.annotate("best possible", (0.99, bayes), xycoords=("axes fraction", "data"), ha="right",
                    xytext=(0, -11), textcoords="offset points", fontsize=8)
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter
    fmt = FuncFormatter(lambda v, _: f"{v:,.0f}")
    ax.xaxis.set_major_formatter(fmt)
    ax.xaxis.set_minor_formatter(fmt)
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel("FLOPs per patient (log scale)")
    ax.set_ylabel("test accuracy")
    n_seeds = max(len(r.get("accs", [0])) for r in rows)
    ax.set_title("Accuracy against compute per patient"
                 + (f" (mean ± std over {n_seeds} seeds)" if n_seeds > 1 else ""), fontsize=10)
    ax.grid(alpha=0.3, which="both")
    if own:
        fig.tight_layout()
    return _finish(fig, path) if own else fig


def plot_clinic_summary(rows, counts, path=None, bayes=None):
    """The headline figure: accuracy vs compute (left) and the GP's referrals (right)."""
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.6), gridspec_kw={"width_ratios": [1.25, 1]})
    plot_accuracy_vs_compute(rows, ax=a1, bayes=bayes)
    plot_specialty_routing(counts, ax=a2, title="GP referral: each expert's patients by specialty (%)")
    fig.suptitle("The GP's clinic wins: specialists' accuracy at a generalist's compute", fontsize=12)
    fig.tight_layout()
    return _finish(fig, path)


# =========================================================================== lesson 10: the bug hunt
def plot_balance_runs(runs, path=None, title="Balancing the real load, or only the loss?"):
    """Lesson 10, bug 1: what each version of a load loss does to the *real* load.

    ``runs``: ``{label: minimoe.bugs.BalanceRun}`` (from ``bugs.train_router_on_load_loss``).
    Left: patients per specialist before training (grey outline) and after (filled), one
    group of bars per version. Right: the CV² of the real load (solid) and the balancing
    loss itself (dashed) over the training steps, on a log scale.
    """
    plt = _plt()
    fig, (ax_bar, ax_cv) = plt.subplots(1, 2, figsize=(11, 4.3))
    E = len(next(iter(runs.values())).load_before)
    width = 0.8 / len(runs)
    for i, (label, run) in enumerate(runs.items()):
        pos = np.arange(E) + (i - (len(runs) - 1) / 2) * width
        color = "C%d" % (3 if i == 0 else 2 if i == 1 else i)
        ax_bar.bar(pos, run.load_before, width, fill=False, edgecolor="0.6", lw=1,
                   label="before training" if i == 0 else None)
        ax_bar.bar(pos, run.load_after, width * 0.8, color=color, alpha=0.85, label=f"after: {label}")
        steps = np.arange(1, len(run.real_cv2) + 1)
        ax_cv.plot(steps, np.maximum(run.real_cv2, 1e-6), "-", color=color, lw=2,
                   label=f"CV² of the real load — {label}")
        ax_cv.plot(steps, np.maximum(run.loss, 1e-6), "--", color=color, lw=1.5,
                   label=f"the loss itself — {label}")
    ax_bar.axhline(np.mean(next(iter(runs.values())).load_before), color="k", ls=":", lw=1,
                   label="perfect balance")
    ax_bar.set(xticks=np.arange(E), xlabel="specialist (expert)", ylabel="patients referred")
    ax_bar.legend(fontsize=8)
    ax_cv.set(yscale="log", xlabel="training step", ylabel="CV²")
    ax_cv.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _finish(fig, path)


# =========================================================================== lessons 07–08
# (appended for lessons 07 "The whole clinic" and 08 "What specialists really learn")
__all__ += ["plot_knowledge_vs_compute", "plot_routing_tables", "plot_accuracy_vs_information"]


def plot_knowledge_vs_compute(rows, sweep, path=None, bayes=None):
    """Test accuracy against FLOPs per patient (left) and against parameters (right).

    Args:
        rows: the clinics, dicts with ``kind``, ``acc``, ``flops``, ``params`` (one marker each).
        sweep: GP clinics with more and more experts at fixed k, dicts with ``E``, ``acc``,
            ``flops``, ``params`` — drawn as a line. Growing E adds parameters (knowledge)
            at almost no compute, so the line runs steeply up on the left and across on the right.
        bayes: optional best possible accuracy (dashed line).
    """
    plt = _plt()
    sweep = sorted(sweep, key=lambda r: r["E"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, key, xlabel in ((axes[0], "flops", "FLOPs per patient (compute)"),
                            (axes[1], "params", "parameters (knowledge)")):
        xs = [r[key] for r in sweep]
        ax.plot(xs, [r["acc"] for r in sweep], "-", color=CLINIC_STYLE["sparse_moe"][1], lw=1.5, alpha=0.6,
                zorder=2, label="GP referral, k fixed, more experts E")
        for r in sweep:
            ax.annotate(f"E={r['E']}", (r[key], r["acc"]), xytext=(4, -10), textcoords="offset points",
                        fontsize=7, color=CLINIC_STYLE["sparse_moe"][1])
        ax.scatter(xs, [r["acc"] for r in sweep], s=14, color=CLINIC_STYLE["sparse_moe"][1], zorder=3)
        for i, r in enumerate(rows):
            label, color, marker = _style(r["kind"], i)
            ax.scatter([r[key]], [r["acc"]], marker=marker, s=160 if marker == "*" else 60, color=color,
                       zorder=4, label=label)
        if bayes is not None:
            ax.axhline(bayes, color="k", ls="--", lw=1)
        ax.set_xscale("log")
        from matplotlib.ticker import FuncFormatter
        fmt = FuncFormatter(lambda v, _: f"{v:,.0f}")
        ax.xaxis.set_major_formatter(fmt)
        ax.xaxis.set_minor_formatter(fmt)
        ax.tick_params(axis="x", which="minor", labelsize=7)
        ax.set_xlabel(xlabel + ", log scale")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("test accuracy")
    axes[0].set_title("Accuracy against compute per patient", fontsize=10)
    axes[1].set_title("Accuracy against parameters", fontsize=10)
    axes[1].legend(fontsize=7, loc="lower right")
    fig.suptitle("More specialists add knowledge without adding compute", fontsize=11)
    fig.tight_layout()
    return _finish(fig, path)


def plot_routing_tables(tables, path=None, title=None, ncols=None):
    """Several (E, S) referral tables side by side, each as in :func:`plot_specialty_routing`.

    Args:
        tables: ``{panel title: (E, S) counts}`` — e.g. a learned GP, a hash, a domain ensemble.
        ncols: panels per row (default: all in one row).
    """
    plt = _plt()
    n = len(tables)
    ncols = n if ncols is None else max(1, min(int(ncols), n))
    nrows = -(-n // ncols)
    E_max = max(np.shape(t)[0] for t in tables.values())
    S_max = max(np.shape(t)[1] for t in tables.values())
    fig, axes = plt.subplots(nrows, ncols, squeeze=False,
                             figsize=(ncols * (1.4 + 0.42 * S_max), nrows * (1.5 + 0.22 * E_max)))
    for ax, (name, counts) in zip(axes.flat, tables.items()):
        plot_specialty_routing(counts, ax=ax, title=name)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _finish(fig, path)


def plot_accuracy_vs_information(rows, path=None, bayes=None, baseline=None):
    """Test accuracy against how much the referral knows about the hidden specialty.

    Args:
        rows: dicts with ``name``, ``info`` (I(expert; specialty) / H(specialty), in [0, 1])
            and ``acc``; an optional ``labels`` (bool) draws the point hollow: its members were
            split by human labels before training.
        bayes: optional best possible accuracy; baseline: optional accuracy of one generalist
            (both dashed lines).
    """
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8.6, 4.2))
    for i, r in enumerate(rows):
        color = "C%d" % i
        ax.scatter([r["info"]], [r["acc"]], s=70, zorder=3, edgecolors=color,
                   facecolors="none" if r.get("labels") else color, linewidths=2, label=r["name"])
    for y, text, ls in ((bayes, "best possible", "--"), (baseline, "one generalist", ":")):
        if y is not None:
            ax.axhline(y, color="k", ls=ls, lw=1)
            ax.annotate(text, (0.01, y), xycoords=("axes fraction", "data"), xytext=(0, 3),
                        textcoords="offset points", fontsize=8)
    ax.set_xlim(-0.05, 1.05)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.set_xlabel("I(expert; specialty) / H(specialty): what the referral knows about the specialty")
    ax.set_ylabel("test accuracy")
    ax.set_title("Referrals that carry more information about the specialty diagnose better\n"
                 "(hollow: doctors split by human labels before training)", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _finish(fig, path)


# =========================================================================== lessons 05–06: balance and capacity
__all__ += ["plot_load_shares", "plot_balance_options", "plot_load_estimate",
            "plot_appointment_book", "plot_drop_rates"]


def plot_load_shares(histories, path=None, title="Who gets the patients, over training"):
    """Lesson 05: each expert's share of the referrals over training, one stacked panel per run.

    ``histories``: ``{panel title: History}`` of MoE clinics. Perfect balance is E equal
    bands (dotted lines); collapse is a few bands swallowing the rest.
    """
    plt = _plt()
    n = len(histories)
    fig, axes = plt.subplots(1, n, figsize=(4.6 * n + 1.4, 3.6), squeeze=False, sharey=True)
    for ax, (name, h) in zip(axes[0], histories.items()):
        load = h.load_array().astype(np.float64)
        E = load.shape[1]
        total = load.sum(axis=1, keepdims=True)
        share = np.divide(load, total, out=np.zeros_like(load), where=total > 0)
        cmap = plt.get_cmap("tab20" if E > 10 else "tab10")
        ax.stackplot(h.epoch, share.T, colors=[cmap(e % cmap.N) for e in range(E)],
                     labels=[f"expert {e}" for e in range(E)], alpha=0.9)
        for y in np.arange(1, E) / E:
            ax.axhline(y, color="white", lw=0.6, ls=":")
        ax.set(xlim=(h.epoch[0], h.epoch[-1]), ylim=(0, 1), xlabel="epoch", title=name)
    axes[0][0].set_ylabel("share of referrals")
    axes[0][-1].legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    fig.suptitle(title + "  (dotted: perfect balance)", fontsize=11)
    fig.tight_layout()
    return _finish(fig, path)


def plot_balance_options(results, path=None, title="What each balancing option buys"):
    """Lesson 05: one bar per option in three panels — load CV, accuracy, router z-loss.

    ``results``: ``{option: {"cv": float, "acc": float, "z": float}}``.
    """
    plt = _plt()
    names = list(results)
    panels = [("cv", "load CV (0 = balanced)", "tab:red"),
              ("acc", "validation accuracy", "tab:green"),
              ("z", "router z-loss  mean(logsumexp L)²", "tab:purple")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.9))
    y = np.arange(len(names))
    for ax, (key, label, color) in zip(axes, panels):
        vals = np.array([results[n][key] for n in names], dtype=np.float64)
        ax.barh(y, vals, color=color, alpha=0.8)
        for yi, v in zip(y, vals):
            ax.text(v, yi, f" {v:.2f}", va="center", fontsize=8)
        ax.set(xlabel=label, xlim=(0, vals.max() * 1.25 if vals.max() > 0 else 1))
        ax.set_yticks(y, names if ax is axes[0] else [""] * len(names))
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    if "acc" in results[names[0]]:
        accs = [results[n]["acc"] for n in names]
        axes[1].set_xlim(min(accs) - 0.1, max(accs) + 0.05)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _finish(fig, path)


def plot_load_estimate(real, smooth, path=None, title="The smooth load tracks the real one"):
    """Lesson 05: average real load (patients per expert) next to the smooth estimate Σ_t P(t,e)."""
    plt = _plt()
    real, smooth = np.asarray(real, float), np.asarray(smooth, float)
    E = real.size
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    x = np.arange(E)
    ax.bar(x - 0.2, real, 0.4, color="tab:blue", label="real load (top-k count), mean over noise draws")
    ax.bar(x + 0.2, smooth, 0.4, color="tab:orange", label="smooth load Σ_t P(t,e), mean over draws")
    ax.set(xticks=x, xlabel="specialist (expert)", ylabel="patients", title=title)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=1, frameon=False)
    fig.tight_layout()
    return _finish(fig, path)


def plot_appointment_book(idx, order, offsets, capacity, path=None,
                          title="Each specialist's appointment book"):
    """Lesson 06: the slots of each expert (rows) filled with the patients it serves.

    ``idx`` (T, k) referrals, ``order``/``offsets`` a dispatch plan (grouped flat ids
    ``a = t·k + j``), ``capacity`` C. A slot shows the patient ``t``; dark = a first
    choice, light = a second (or later) choice. Turned-away referrals are listed on the right.
    """
    plt = _plt()
    idx = np.asarray(idx)
    T, k = idx.shape
    E = len(offsets) - 1
    C = int(capacity)
    kept = np.zeros(T * k, dtype=bool)
    kept[np.asarray(order)] = True
    fig, ax = plt.subplots(figsize=(1.2 + 0.62 * C + 3.2, 0.9 + 0.5 * E))
    cols = plt.get_cmap("tab10")
    for e in range(E):
        ax.text(-0.6, e, f"expert {e}", ha="right", va="center", fontsize=9)
        for s in range(C):
            ax.add_patch(plt.Rectangle((s - 0.45, e - 0.4), 0.9, 0.8, fill=False, ec="0.75", lw=0.8))
        for s, a in enumerate(np.asarray(order)[offsets[e]:offsets[e + 1]]):
            t, j = divmod(int(a), k)
            ax.add_patch(plt.Rectangle((s - 0.45, e - 0.4), 0.9, 0.8, color=cols(e % 10),
                                       alpha=0.95 if j == 0 else 0.4))
            ax.text(s, e, f"{t}", ha="center", va="center", fontsize=9,
                    color="white" if j == 0 else "black")
        away = [a for a in np.flatnonzero(~kept) if idx.reshape(-1)[a] == e]
        if away:
            ax.text(C - 0.2, e, "  turned away: " + ", ".join(
                f"{a // k}" + ("" if a % k == 0 else " (2nd)" if a % k == 1 else f" ({a % k + 1}th)")
                for a in away), va="center", fontsize=8, color="tab:red")
    ax.set(xlim=(-0.6, C + 3.5), ylim=(E - 0.5, -0.5), title=title)
    ax.set_xticks(range(C), [f"slot {s + 1}" for s in range(C)], fontsize=8)
    ax.set_yticks([])
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    fig.tight_layout()
    return _finish(fig, path)


def plot_drop_rates(capacity_factors, rates, path=None,
                    title="Referrals turned away against the capacity factor"):
    """Lesson 06: fraction of referrals dropped against the capacity factor.

    ``rates``: ``{panel title: {curve label (e.g. "k = 2"): array like capacity_factors}}``.
    """
    plt = _plt()
    n = len(rates)
    fig, axes = plt.subplots(1, n, figsize=(5 * n, 3.7), squeeze=False, sharey=True)
    cf = np.asarray(capacity_factors, float)
    for ax, (name, curves) in zip(axes[0], rates.items()):
        for (label, r), m in zip(curves.items(), "os^Dv"):
            ax.plot(cf, r, m + "-", lw=1.8, ms=4, label=label)
        ax.axvline(1.0, color="gray", ls=":", lw=1)
        ax.text(1.0, 0.97, " factor 1: books exactly fit a perfectly balanced GP", fontsize=7,
                color="gray", va="top", transform=ax.get_xaxis_transform())
        ax.set(xlabel="capacity factor", title=name, ylim=(0, None))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("fraction of referrals turned away")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _finish(fig, path)


# =========================================================================== lesson 09: beyond the GP
__all__ += ["plot_experts_per_token", "plot_bias_steering", "plot_router_comparison", "plot_lm_curves",
            "plot_expert_classes", "plot_class_vs_topic"]


def plot_experts_per_token(counts, path=None, title="How many specialists saw each patient"):
    """Lesson 09: the share of tokens served by 0, 1, 2, … experts, one bar group per router.

    ``counts``: ``{router name: (T,) int array}`` — experts that served each token.
    """
    plt = _plt()
    top = max(int(np.max(c)) for c in counts.values())
    n, width = len(counts), 0.8 / len(counts)
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    for i, (name, c) in enumerate(counts.items()):
        share = np.bincount(np.asarray(c), minlength=top + 1) / np.size(c)
        ax.bar(np.arange(top + 1) + (i - (n - 1) / 2) * width, share, width, label=name, alpha=0.85)
    ax.set_xticks(range(top + 1))
    ax.set(xlabel="specialists who saw the patient (0 = nobody)", ylabel="share of patients", title=title)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _finish(fig, path)


def plot_bias_steering(runs, path=None, title="A receptionist nudging the referral list"):
    """Lesson 09: loss-free balancing of a collapsed router, step by step.

    ``runs``: ``{label: {"cv": (steps,) load CV per step, "bias": (steps, E) or None}}``. Left: the
    load CV of every run; right: the bias of each expert over the steps, for the runs that have one.
    """
    plt = _plt()
    biased = {k: r for k, r in runs.items() if r.get("bias") is not None}
    fig, axes = plt.subplots(1, 1 + len(biased), figsize=(5.2 * (1 + len(biased)), 3.6), squeeze=False)
    ax = axes[0][0]
    for name, r in runs.items():
        ax.plot(np.arange(1, len(r["cv"]) + 1), r["cv"], lw=1.3, label=name)
    ax.set(xlabel="step", ylabel="load CV of the step", ylim=(0, None), title="balance, step by step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    for ax, (name, r) in zip(axes[0][1:], biased.items()):
        b = np.asarray(r["bias"])
        for e in range(b.shape[1]):
            ax.plot(np.arange(1, len(b) + 1), b[:, e], lw=1.2, label=f"expert {e}")
        ax.axhline(0, color="gray", lw=0.8)
        ax.set(xlabel="step", ylabel="bias b_e", title=f"the bias: {name}")
        ax.grid(alpha=0.3)
    if biased:
        axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _finish(fig, path)


def plot_router_comparison(rows, path=None, title="Six ways to refer a patient, on the same clinic"):
    """Lesson 09: one bar per router in three panels — accuracy, load CV, patients nobody saw.

    ``rows``: dicts with ``name``, ``acc`` (optional ``acc_std`` for an error bar), ``cv``, and
    ``unserved`` (fraction of patients no specialist saw).
    """
    plt = _plt()
    names = [r["name"] for r in rows]
    y = np.arange(len(rows))
    panels = [("acc", "test accuracy", "tab:green"), ("cv", "load CV (0 = balanced)", "tab:red"),
              ("unserved", "patients no specialist saw", "tab:gray")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 0.9 + 0.42 * len(rows)))
    for ax, (key, label, color) in zip(axes, panels):
        vals = np.array([r[key] for r in rows], dtype=np.float64)
        err = [r.get("acc_std", 0.0) for r in rows] if key == "acc" else None
        ax.barh(y, vals, xerr=err, color=color, alpha=0.8, capsize=3)
        for yi, v, e in zip(y, vals, err or [0.0] * len(vals)):
            ax.text(v + e, yi, f" {100 * v:.1f}%" if key == "unserved" else f" {v:.3f}", va="center", fontsize=8)
        top = vals.max() if vals.size and vals.max() > 0 else 1.0
        lo = max(0.0, vals.min() - 0.1) if key == "acc" else 0.0
        ax.set(xlabel=label, xlim=(lo, top * (1.02 if key == "acc" else 1.3) + (0.03 if key == "acc" else 0)))
        ax.set_yticks(y, names if ax is axes[0] else [""] * len(names))
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _finish(fig, path)


def plot_lm_curves(histories, path=None, title="A tiny MoE language model learns the clinic notes"):
    """Lesson 09: validation cross-entropy (nats) against step, one curve per model, with the
    unigram and bigram baselines of the first history as dashed lines.

    ``histories``: ``{label: minimoe.lm_train.LMHistory}``.
    """
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    for name, h in histories.items():
        ax.plot(h.step, h.val_loss, "o-", ms=3, lw=1.5, label=name)
    first = next(iter(histories.values()))
    for value, text in ((first.unigram, "unigram (word frequencies only)"), (first.bigram, "bigram (one word back)")):
        if np.isfinite(value):
            ax.axhline(value, color="k", ls="--", lw=0.9)
            ax.annotate(text, (0.99, value), xycoords=("axes fraction", "data"), xytext=(0, 3),
                        textcoords="offset points", ha="right", fontsize=8)
    ax.set(xlabel="training step", ylabel="validation loss (nats per token)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _finish(fig, path)


def plot_expert_classes(tables, class_names, path=None, k=1, title="Where each kind of word is sent"):
    """Lesson 09: (E, K) tables of assignments by word class, one heatmap per model/block.

    Each *column* is normalised by its number of tokens (its count / k): entry (e, c) is the
    share of class c's tokens that expert e serves, so a class that always goes to expert e
    has a cell of 100% (with k experts per token a column adds up to k·100%).

    ``tables``: ``{panel title: (E, K) counts}``; ``class_names``: the K column labels;
    ``k``: assignments per token.
    """
    plt = _plt()
    n = len(tables)
    K = len(class_names)
    E_max = max(np.shape(t)[0] for t in tables.values())
    fig, axes = plt.subplots(1, n, figsize=(n * (1.2 + 0.36 * K), 1.9 + 0.3 * E_max), squeeze=False)
    for ax, (name, counts) in zip(axes[0], tables.items()):
        counts = np.asarray(counts, dtype=np.float64)
        cols = counts.sum(axis=0, keepdims=True)
        frac = np.divide(k * counts, cols, out=np.zeros_like(counts), where=cols > 0)
        ax.imshow(frac, cmap="Purples", vmin=0, vmax=1, aspect="auto")
        for e, c in zip(*np.nonzero(frac >= 0.5)):
            ax.text(c, e, f"{100 * frac[e, c]:.0f}", ha="center", va="center", fontsize=6,
                    color="white" if frac[e, c] > 0.7 else "black")
        ax.set_xticks(range(K), class_names, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(counts.shape[0]))
        ax.set_title(name, fontsize=9)
    axes[0][0].set_ylabel("expert")
    fig.suptitle(title + " (% of each class's tokens that each expert serves)", fontsize=10)
    fig.tight_layout()
    return _finish(fig, path)


def plot_class_vs_topic(rows, path=None,
                        title="What the experts' choice reveals: the word's class or the note's topic?"):
    """Lesson 09: I(expert; class)/H(class) and I(expert; topic)/H(topic), a pair of bars per row.

    ``rows``: dicts with ``name``, ``class_frac`` and ``topic_frac`` (fractions in [0, 1]).
    """
    plt = _plt()
    y = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(8, 0.9 + 0.45 * len(rows)))
    for off, key, label, color in ((-0.2, "class_frac", "word class (syntax)", "tab:purple"),
                                   (0.2, "topic_frac", "note topic (specialty)", "tab:orange")):
        vals = np.array([r[key] for r in rows], dtype=np.float64)
        ax.barh(y + off, vals, 0.38, color=color, alpha=0.85, label=label)
        for yi, v in zip(y + off, vals):
            ax.text(v, yi, f" {100 * v:.1f}%", va="center", fontsize=7)
    ax.set_yticks(y, [r["name"] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set(xlabel="I(expert; label) / H(label): share of the label's uncertainty the expert removes",
           xlim=(0, max(max(r["class_frac"], r["topic_frac"]) for r in rows) * 1.2 + 1e-9))
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return _finish(fig, path)
