"""What the specialists end up serving: referral tables and how much they reveal.

Figures of ``python -m minimoe`` and of lesson 08, *What specialists really learn*:
an (E, S) table counts the patients of each hidden specialty that each expert
received (see :func:`minimoe.clinic.train.specialty_routing`).
"""
from __future__ import annotations

import numpy as np

from ._style import _finish, _plt

__all__ = ["plot_specialty_routing", "plot_routing_tables", "plot_accuracy_vs_information"]


def plot_specialty_routing(counts, path=None, title="Which specialty each expert ends up serving", ax=None):
    """Heatmap of an (E, S) table from :func:`minimoe.clinic.train.specialty_routing`.

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
