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
