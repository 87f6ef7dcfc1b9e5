"""Beyond the GP: other routers, loss-free balancing, and a tiny MoE language model.

Figures of lesson 09, *Beyond the GP*: expert-choice and hash routing against the
GP, the bias that steers a collapsed router back to balance (and how fast each loss-free
rule gets there), and what the experts of a small MoE transformer learn about words.
Every function takes plain data, draws one figure, saves it if given a ``path`` and
returns the ``Figure``.
"""
from __future__ import annotations

import numpy as np

from ._style import _bar_panel, _finish, _plt

__all__ = ["plot_experts_per_token", "plot_bias_steering", "plot_balance_race", "plot_router_comparison", "plot_lm_curves",
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


def plot_balance_race(runs, threshold=0.25, path=None, title="Two loss-free rules on the same collapsed GP"):
    """Lesson 09: load CV against step for each rule, on a log step axis, with the threshold.

    ``runs``: ``{label: (steps,) load CV per step}`` (the runs may differ in length).
    ``threshold``: the CV that counts as balanced, drawn as a dashed line; each run's first
    step below it is marked with a dotted vertical line of the run's colour (none if never).
    """
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    for name, cv in runs.items():
        cv = np.asarray(cv, dtype=np.float64)
        steps = np.arange(1, len(cv) + 1)
        (line,) = ax.plot(steps, cv, lw=1.2, label=name)
        below = np.flatnonzero(cv < threshold)
        if below.size:
            ax.axvline(below[0] + 1, color=line.get_color(), ls=":", lw=1.2)
            ax.annotate(f"step {below[0] + 1:,}", (below[0] + 1, threshold), xytext=(4, 8),
                        textcoords="offset points", fontsize=8, color=line.get_color())
    ax.axhline(threshold, color="gray", ls="--", lw=0.9, label=f"load CV {threshold:g}")
    ax.set_xscale("log")
    ax.set(xlabel="step (log scale)", ylabel="load CV of the step", ylim=(0, None), title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _finish(fig, path)


def plot_router_comparison(rows, path=None, title="Six ways to refer a patient, on the same clinic"):
    """Lesson 09: one bar per router in three panels — accuracy, load CV, patients nobody saw.

    ``rows``: dicts with ``name``, ``acc`` (optional ``acc_std`` for an error bar and ``n_seeds``, the
    number of runs it is over), ``cv``, and ``unserved`` (fraction of patients no specialist saw).
    With one seed (``n_seeds`` 1, or every ``acc_std`` 0) no error bar is drawn and the axis says n = 1.
    """
    plt = _plt()
    names = [r["name"] for r in rows]
    panels = [("acc", "test accuracy", "tab:green", "{:.3f}"), ("cv", "load CV (0 = balanced)", "tab:red", "{:.3f}"),
              ("unserved", "patients no specialist saw", "tab:gray", "{:.1%}")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 0.9 + 0.42 * len(rows)))
    for i, (ax, (key, label, color, fmt)) in enumerate(zip(axes, panels)):
        vals = np.array([r[key] for r in rows], dtype=np.float64)
        top = vals.max() if vals.size and vals.max() > 0 else 1.0
        if key == "acc":            # bars start at 0: a zoomed axis would exaggerate the gaps
            n = min(r.get("n_seeds", 1 if not r.get("acc_std") else 2) for r in rows)
            err = [r.get("acc_std", 0.0) for r in rows] if n > 1 else None     # one seed: no spread to draw
            xlim = (0.0, min(1.0, top * 1.15 + 0.02))
            label = f"{label} (± std over {n} seeds)" if n > 1 else f"{label} (one seed, n = 1: no error bar)"
        else:
            err, xlim = None, (0.0, top * 1.3)
        _bar_panel(ax, names, vals, xlabel=label, color=color, fmt=fmt, xerr=err, xlim=xlim, show_names=i == 0)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _finish(fig, path)


def plot_lm_curves(histories, path=None, title="A tiny MoE language model learns the clinic notes"):
    """Lesson 09: validation cross-entropy (nats) against step, one curve per model, with the
    unigram and bigram baselines of the first history as dashed lines.

    ``histories``: ``{label: minimoe.lm.train.LMHistory}``.
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

    ``tables``: ``{panel title: (E, K) counts}``; ``class_names``: the K labels;
    ``k``: assignments per token.

    Drawn transposed, one row per class and one column per expert, so the class names
    read horizontally at full size and the panels stay narrow enough to sit side by side.
    """
    plt = _plt()
    n = len(tables)
    K = len(class_names)
    E_max = max(np.shape(t)[0] for t in tables.values())
    fig, axes = plt.subplots(1, n, figsize=(1.6 + n * (0.9 + 0.55 * E_max), 1.3 + 0.32 * K), squeeze=False)
    for i, (ax, (name, counts)) in enumerate(zip(axes[0], tables.items())):
        counts = np.asarray(counts, dtype=np.float64)
        cols = counts.sum(axis=0, keepdims=True)
        frac = (np.divide(k * counts, cols, out=np.zeros_like(counts), where=cols > 0)).T    # (K, E)
        ax.imshow(frac, cmap="Purples", vmin=0, vmax=1, aspect="auto")
        for c, e in zip(*np.nonzero(frac >= 0.5)):
            ax.text(e, c, f"{100 * frac[c, e]:.0f}", ha="center", va="center", fontsize=8,
                    color="white" if frac[c, e] > 0.7 else "black")
        ax.set_xticks(range(frac.shape[1]))
        ax.set_xlabel("expert", fontsize=9)
        ax.set_yticks(range(K), class_names if i == 0 else [""] * K, fontsize=9)
        ax.set_title(name, fontsize=9)
    rows_add = f"; with k = {k} experts per token a class's row adds up to {100 * k}%" if k > 1 else ""
    fig.suptitle(title + f"\n(% of each class's tokens that each expert serves{rows_add}; 50% and up written)",
                 fontsize=10)
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
