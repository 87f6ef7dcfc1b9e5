"""What every plot shares: lazy pyplot, one colour per clinic and per expert, saving.

Matplotlib is imported only when a figure is drawn, so ``import minimoe`` never
needs it. Colours are fixed: the GP clinic is always green, and expert 3 is the
same colour in every lesson.
"""
from __future__ import annotations

import os

import numpy as np

__all__ = ["CLINIC_STYLE", "clinic_label", "expert_colors", "save"]


def _plt():
    """Import pyplot lazily with a non-interactive backend unless one is already chosen.

    (A Jupyter kernel sets ``MPLBACKEND`` to its inline backend, so lessons still show figures.)
    """
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


def _clinic_style(kind, i=0):
    """``(label, colour, marker)`` of a clinic kind; an unknown kind gets matplotlib's i-th colour."""
    label, color, marker = CLINIC_STYLE.get(kind, (kind, "C%d" % i, "o"))
    return label, color, marker


def expert_colors(E):
    """One colour per expert (tab10, then tab20 beyond 10 experts) — or per specialty."""
    cmap = _plt().get_cmap("tab10" if E <= 10 else "tab20")
    return [cmap(e % cmap.N) for e in range(E)]


def save(fig, path, dpi=130):
    """Save ``fig`` to ``path`` (creating its directory), atomically, and close it; returns ``path``."""
    plt = _plt()
    d = os.path.dirname(os.fspath(path))
    if d:
        os.makedirs(d, exist_ok=True)
    # Atomically (a temporary file, renamed when complete): an interrupted save never leaves a
    # truncated PNG behind, only the old file or none.
    from ...validate import atomic_open
    fmt = os.path.splitext(os.fspath(path))[1][1:].lower() or None
    try:
        with atomic_open(path, "wb") as f:
            fig.savefig(f, format=fmt, dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def _finish(fig, path):
    """Save ``fig`` if a ``path`` is given (closing it); return the figure either way."""
    if path is not None:
        save(fig, path)
    return fig


def _stack_load_shares(ax, epoch, load):
    """Stack each expert's share of the referrals over training on ``ax``.

    ``load`` (n_logs, E): referrals each expert processed at each log. Perfect
    balance is E equal bands (dotted lines). Returns the referrals per log (n_logs,).
    """
    load = np.asarray(load, dtype=np.float64)
    E = load.shape[1]
    total = load.sum(axis=1, keepdims=True)
    share = np.divide(load, total, out=np.zeros_like(load), where=total > 0)
    ax.stackplot(epoch, share.T, colors=expert_colors(E), labels=[f"expert {e}" for e in range(E)], alpha=0.9)
    for y in np.arange(1, E) / E:
        ax.axhline(y, color="white", lw=0.6, ls=":")
    ax.set(xlim=(epoch[0], epoch[-1]), ylim=(0, 1))
    return total[:, 0]


def _bar_panel(ax, names, values, *, xlabel, color, fmt="{:.2f}", xerr=None, xlim=None, show_names=True):
    """One horizontal bar per option, its value written at the tip (a panel of a comparison).

    ``xlim`` defaults to ``(0, 1.25 · max)``; ``show_names=False`` leaves the y labels blank
    (for the second and later panels of a row, which share the first one's names).
    """
    vals = np.asarray(values, dtype=np.float64)
    y = np.arange(len(names))
    ax.barh(y, vals, xerr=xerr, color=color, alpha=0.8, capsize=3 if xerr is not None else 0)
    for yi, v, e in zip(y, vals, xerr if xerr is not None else [0.0] * len(vals)):
        ax.text(v + e, yi, " " + fmt.format(v), va="center", fontsize=8)
    ax.set(xlabel=xlabel, xlim=xlim or (0, vals.max() * 1.25 if vals.size and vals.max() > 0 else 1))
    ax.set_yticks(y, names if show_names else [""] * len(names))
    ax.invert_yaxis()
    ax.grid(axis="x", alpha=0.3)
