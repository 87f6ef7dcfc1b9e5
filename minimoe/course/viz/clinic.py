"""The clinics side by side: the patients, learning curves, accuracy against compute.

Figures of ``python -m minimoe`` (the README's headline) and of lesson 07, *The whole
clinic*. Every function takes plain data (histories, result rows), draws one figure,
saves it if given a ``path`` and returns the ``Figure``. Nothing here trains.
"""
from __future__ import annotations

import numpy as np

from ._style import CLINIC_STYLE, _clinic_style, _finish, _plt, expert_colors
from .specialties import plot_specialty_routing

__all__ = ["plot_clinic_data", "plot_learning_curves", "plot_accuracy_vs_compute",
           "plot_clinic_summary", "plot_knowledge_vs_compute"]


def _log_count_axis(ax):
    """A log-scale x axis labelled with plain counts (1,000 rather than 10³).

    Labels sit at 1, 2, 3 and 5 times each power of ten, all in one font size: labelling
    every minor tick (800, 900, 1,000, ...) makes neighbouring labels collide.
    """
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    ax.set_xscale("log")
    fmt = FuncFormatter(lambda v, _: f"{v:,.0f}")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 3.0, 5.0)))
    ax.xaxis.set_major_formatter(fmt)
    ax.xaxis.set_minor_locator(LogLocator(base=10, subs=np.arange(2, 10)))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.tick_params(axis="x", which="major", labelsize=8)


def plot_clinic_data(split, centers, path=None, max_points=3000):
    """The patients, coloured by hidden specialty, each specialty on its own spoke.

    Specialty s's centre ``μ_s`` is sent to the s-th corner of a regular polygon:
    symptoms x are drawn at ``Σ_s (x · μ_s/‖μ_s‖) (cos θ_s, sin θ_s)``, ``θ_s = 2πs/S``.
    (No flat picture separates S orthogonal clusters; this one at least gives
    each its own direction. In the full symptom space they barely overlap.)

    Args:
        split: a :class:`~minimoe.clinic.data.Split`; centers: (S, n_symptoms) from ``ClinicData``.
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
    colors = expert_colors(S)
    for c in range(S):
        m = spec == c
        ax.scatter(xy[m, 0], xy[m, 1], s=4, alpha=0.5, color=colors[c], label=f"specialty {c}")
    ax.set_aspect("equal")
    ax.set_xlabel("projection 1")
    ax.set_ylabel("projection 2")
    ax.legend(markerscale=3, fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    ax.set_title("The clinic's patients: a cluster per hidden specialty\n"
                 "(inside each, the diagnosis follows the specialty's own rule)", fontsize=10)
    fig.tight_layout()
    return _finish(fig, path)


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
        label, color, _ = _clinic_style((kinds or {}).get(name, name), i)
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
        label, color, marker = _clinic_style(r["kind"], i)
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
    _log_count_axis(ax)
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
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8), sharey=True)
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
            label, color, marker = _clinic_style(r["kind"], i)
            ax.scatter([r[key]], [r["acc"]], marker=marker, s=160 if marker == "*" else 60, color=color,
                       zorder=4, label=label)
        if bayes is not None:
            ax.axhline(bayes, color="k", ls="--", lw=1)
        _log_count_axis(ax)
        ax.margins(x=0.1)                                 # room for the E=… labels at the ends
        ax.set_xlabel(xlabel + ", log scale")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("test accuracy")
    axes[0].set_title("Accuracy against compute per patient", fontsize=10)
    axes[1].set_title("Accuracy against parameters", fontsize=10)
    # The legend goes below both panels, where it cannot cover a marker.
    handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=3, frameon=False)
    fig.suptitle("More specialists add knowledge without adding compute", fontsize=11)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    return _finish(fig, path)
