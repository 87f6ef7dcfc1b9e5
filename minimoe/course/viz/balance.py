"""Who gets the patients: expert load over training, balancing losses, appointment books.

Figures of ``python -m minimoe`` and of lessons 05 (*Overworked specialists*), 06
(*Appointment books*) and 10 (*The bug hunt*, bug 1). Every function takes plain data,
draws one figure, saves it if given a ``path`` and returns the ``Figure``.
"""
from __future__ import annotations

import numpy as np

from ._style import _bar_panel, _finish, _plt, _stack_load_shares

__all__ = ["plot_expert_load", "plot_load_shares", "plot_balance_options", "plot_load_estimate",
           "plot_balance_runs", "plot_appointment_book", "plot_drop_rates", "plot_pooled_balance",
           "plot_switch_conventions"]


def _balance_lines(ax, E):
    """Perfect balance, E equal bands: dark dashed lines at shares 1/E, 2/E, ... that stay
    visible on every band colour (the helper's thin white ones vanish on light bands)."""
    for y in np.arange(1, E) / E:
        ax.axhline(y, color="black", lw=1.1, ls="--", alpha=0.75, zorder=3)


def plot_expert_load(history, path=None, title="Patients per specialist during training"):
    """Share of referrals each expert processed, over training (a stacked area).

    Perfect balance is E equal bands; a collapsing GP shows one band swallowing
    the others. Dropped referrals (over capacity) are drawn on a second axis if any.
    """
    plt = _plt()
    load = history.load_array()
    if load.shape[1] == 0:
        raise ValueError("this history has no expert load (train an MoE clinic)")
    fig, ax = plt.subplots(figsize=(7, 4))
    total = _stack_load_shares(ax, history.epoch, load)
    _balance_lines(ax, load.shape[1])
    ax.set_xlabel("epoch")
    ax.set_ylabel("share of referrals")
    ax.set_title(title + "\n(dashed lines: perfect balance)", fontsize=11)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    dropped = np.asarray(history.dropped, dtype=np.float64)
    if dropped.any():
        ax2 = ax.twinx()
        ax2.plot(history.epoch, dropped / np.maximum(total, 1), color="k", lw=1.5, label="dropped")
        ax2.set_ylabel("fraction dropped (over capacity)")
        ax2.set_ylim(0, None)
    fig.tight_layout()
    return _finish(fig, path)


def plot_load_shares(histories, path=None, title="Who gets the patients, over training"):
    """Lesson 05: each expert's share of the referrals over training, one stacked panel per run.

    ``histories``: ``{panel title: History}`` of MoE clinics. Perfect balance is E equal
    bands (dashed lines); collapse is a few bands swallowing the rest.
    """
    plt = _plt()
    n = len(histories)
    fig, axes = plt.subplots(1, n, figsize=(4.6 * n + 1.4, 3.6), squeeze=False, sharey=True)
    for ax, (name, h) in zip(axes[0], histories.items()):
        _stack_load_shares(ax, h.epoch, h.load_array())
        _balance_lines(ax, np.shape(h.load_array())[1])
        ax.set(xlabel="epoch", title=name)
    axes[0][0].set_ylabel("share of referrals")
    axes[0][-1].legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    fig.suptitle(title + "  (dashed: perfect balance)", fontsize=11)
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
    for i, (ax, (key, label, color)) in enumerate(zip(axes, panels)):
        _bar_panel(ax, names, [results[n][key] for n in names], xlabel=label, color=color, show_names=i == 0)
    # the accuracy axis starts at 0 (the default), so the bars' lengths compare honestly
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


def plot_balance_runs(runs, path=None, title="Balancing the real load, or only the loss?"):
    """Lesson 10, bug 1: what each version of a load loss does to the *real* load.

    ``runs``: ``{label: minimoe.course.bugs.BalanceRun}`` (from ``bugs.train_router_on_load_loss``).
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


def plot_pooled_balance(shares, labels, path=None, title="Balanced when pooled, collapsed in every part",
                        values=None):
    """Lessons 05 and 10: each group's share of the referrals per expert, one panel per group.

    ``shares`` (R, E): row r is group r's share of the choices per expert (each row sums to
    1); ``labels``: R names (e.g. "sequence 1", ..., "pooled"). A dashed line marks perfect
    balance, 1/E. ``values`` (optional, R numbers, e.g. each group's balancing loss) are
    written in the panels' titles.
    """
    plt = _plt()
    shares = np.asarray(shares, dtype=float)
    if shares.ndim != 2 or len(labels) != shares.shape[0]:
        raise ValueError(f"shares must be (R, E) with one label per row; got shape {shares.shape} "
                         f"and {len(labels)} labels")
    R, E = shares.shape
    fig, axes = plt.subplots(1, R, figsize=(2.3 * R + 0.8, 3.0), sharey=True, squeeze=False)
    for r, ax in enumerate(axes[0]):
        pooled = "pool" in str(labels[r]).lower()
        ax.bar(np.arange(E), shares[r], color="0.35" if pooled else [f"C{e % 10}" for e in range(E)])
        ax.axhline(1 / E, color="black", ls="--", lw=1)
        name = str(labels[r]) + ("" if values is None else f"\nloss {float(values[r]):.3g}")
        ax.set(xticks=np.arange(E), xlabel="expert", title=name, ylim=(0, 1.05))
        ax.title.set_fontsize(9)
    axes[0][0].set_ylabel("share of the choices")
    fig.suptitle(title + " (dashed: perfect balance)", fontsize=11)
    fig.tight_layout()
    return _finish(fig, path)


def plot_switch_conventions(collapse, first, every, k, path=None,
                            title="The two Switch-loss conventions, from balance to collapse"):
    """Lesson 05: the Switch loss with f counting first choices (GShard) and all k choices
    (Mixtral) against how collapsed the batch is.

    ``collapse`` (n,): the share of the tokens sent to one expert (1/E is balance, 1 total
    collapse); ``first``, ``every`` (n,): the two losses there. Dotted lines mark their values
    at perfect balance, 1 and k.
    """
    plt = _plt()
    collapse, first, every = (np.asarray(v, dtype=float) for v in (collapse, first, every))
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    ax.plot(collapse, every, "-", color="tab:red", lw=2, label="f counts all k choices (Mixtral, HF)")
    ax.plot(collapse, first, "-", color="tab:blue", lw=2, label="f counts first choices (GShard, minimoe's default)")
    ax.axhline(k, color="tab:red", ls=":", lw=1)
    ax.axhline(1, color="tab:blue", ls=":", lw=1)
    ax.text(collapse[0], k, f" k = {k} at balance", va="bottom", fontsize=8, color="tab:red")
    ax.text(collapse[0], 1, " 1 at balance", va="bottom", fontsize=8, color="tab:blue")
    ax.set(xlabel="share of the tokens whose favourite is expert 0", ylabel="Switch loss E·Σ f·P", title=title)
    ax.title.set_fontsize(10)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return _finish(fig, path)
