"""Figures for lessons 00–04: one specialist, one GP, the referral and its noise.

The lessons compute; these functions only draw, so a figure can be regenerated
from the same numbers anywhere. Each returns the ``Figure`` (saved too if given a
``path``). Colours: one fixed colour per expert (specialist), so expert 3 is the
same colour in every lesson.
"""
from __future__ import annotations

import numpy as np

from ._style import _finish, _plt, expert_colors

__all__ = ["plot_ensemble", "plot_clinic_costs", "plot_step_sizes",
           "plot_referral_map", "plot_gates", "plot_router_learning", "plot_exploration",
           "plot_kink"]


def plot_ensemble(grid, truth, singles, ensemble, Ms, bias2, variance, path=None):
    """Lesson 00: a second opinion from the same specialty.

    Left: the truth, a few single cardiologists (straight-line fits) and the
    average of many. Right: bias² and variance of the averaged opinion against
    the number of cardiologists M.
    """
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, s in enumerate(singles):
        a.plot(grid, s, color="tab:red", alpha=0.35, lw=1, label="one cardiologist" if i == 0 else None)
    a.plot(grid, ensemble, color="tab:red", lw=3, label=f"average of {Ms[-1]}")
    a.plot(grid, truth, color="black", lw=2, ls="--", label="the truth")
    a.set(xlabel="symptom x", ylabel="diagnosis score", title="Many opinions, one way of thinking")
    a.legend(fontsize=8, loc="lower right")
    Ms = np.asarray(Ms, float)
    b.loglog(Ms, variance, "o-", color="tab:blue", label="variance")
    b.loglog(Ms, bias2, "s-", color="tab:red", label="bias²")
    b.loglog(Ms, variance[0] / Ms, ":", color="tab:blue", label="variance(1) / M")
    b.set(xlabel="number of cardiologists M", ylabel="error", title="Averaging cuts variance, not bias")
    b.legend(fontsize=8)
    fig.tight_layout()
    return _finish(fig, path)


def plot_clinic_costs(costs, subtitle="", path=None):
    """Lesson 00: parameters and FLOPs per patient for each clinic (log scale).

    ``costs``: ``{clinic: (parameters, flops)}``.
    """
    plt = _plt()
    names = list(costs)
    params = np.array([costs[n][0] for n in names], float)
    flops = np.array([costs[n][1] for n in names], float)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(8, 3.6))
    ax.bar(x - 0.2, params, 0.4, label="parameters (what the clinic knows)", color="tab:green")
    ax.bar(x + 0.2, flops, 0.4, label="FLOPs per patient (what a visit costs)", color="tab:orange")
    ax.set_yscale("log")
    ax.set_xticks(x, names)
    ax.set_ylim(min(params.min(), flops.min()) / 3, max(params.max(), flops.max()) * 6)
    for xi, (p, f) in enumerate(zip(params, flops)):
        ax.text(xi - 0.2, p * 1.15, f"{p / 1e6:.1f}M", ha="center", fontsize=8)
        ax.text(xi + 0.2, f * 1.15, f"{f / 1e6:.1f}M", ha="center", fontsize=8)
    ax.set_title("Parameters ≠ compute" + (f"  ({subtitle})" if subtitle else ""))
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return _finish(fig, path)


def plot_step_sizes(hs, errors, path=None):
    """Lesson 01: relative error of a central difference against the step h.

    ``errors``: ``{label: array like hs}`` (e.g. float64 and float32).
    """
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for (label, err), m in zip(errors.items(), "os^"):
        ax.loglog(hs, np.maximum(err, 1e-17), m + "-", label=label)
    ax.axhline(1e-8, color="gray", ls=":", lw=1, label="pass line 1e-8")   # in the legend: no curve crosses it
    ax.invert_xaxis()
    ax.set(xlabel="step h (smaller to the right)", ylabel="relative error",
           title="Too big: truncation (∝ h²).  Too small: rounding (∝ ε/h).")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _finish(fig, path)


def plot_referral_map(xx, yy, probs_by_temp, points=None, path=None):
    """Lesson 02: which specialist the GP favours over a 2-D symptom plane.

    ``probs_by_temp``: ``{τ: probs (ny, nx, E)}``. Colour = the favourite expert,
    brightness = how sure the GP is (its largest gate).
    """
    plt = _plt()
    temps = list(probs_by_temp)
    E = next(iter(probs_by_temp.values())).shape[-1]
    cols = np.array([c[:3] for c in expert_colors(E)])
    fig, axes = plt.subplots(1, len(temps), figsize=(3.4 * len(temps), 3.4), squeeze=False)
    for ax, t in zip(axes[0], temps):
        p = probs_by_temp[t]
        best = p.argmax(-1)
        conf = p.max(-1, keepdims=True)
        sure = (conf - 1 / E) / (1 - 1 / E)                     # 0 = undecided, 1 = certain
        img = cols[best] * sure + (1 - sure) * 1.0              # fade to white when unsure
        ax.imshow(img, origin="lower", extent=(xx.min(), xx.max(), yy.min(), yy.max()), aspect="auto")
        if points is not None:
            ax.scatter(points[:, 0], points[:, 1], s=6, c="k", alpha=0.5)
        ax.set(title=f"temperature τ = {t:g}", xticks=[], yticks=[],
               xlim=(xx.min(), xx.max()), ylim=(yy.min(), yy.max()))
    axes[0][0].set_ylabel("symptom 2")
    for ax in axes[0]:
        ax.set_xlabel("symptom 1")
    fig.suptitle("The GP's referral map: colour = favourite specialist, pale = unsure", fontsize=10)
    fig.tight_layout()
    return _finish(fig, path)


def plot_gates(H_row, gates_by_name, path=None):
    """Lesson 03: one patient's scores and the weights each gate gives the specialists."""
    plt = _plt()
    E = len(H_row)
    cols = expert_colors(E)
    n = len(gates_by_name) + 1
    fig, axes = plt.subplots(1, n, figsize=(2.9 * n, 2.8), sharex=True)
    axes[0].bar(range(E), H_row, color=cols)
    axes[0].set(title="scores H", xlabel="expert")
    for ax, (name, g) in zip(axes[1:], gates_by_name.items()):
        ax.bar(range(E), g, color=cols)
        ax.set(title=f"{name}\nΣ = {np.sum(g):.3f}", xlabel="expert", ylim=(0, 1))
    fig.tight_layout()
    return _finish(fig, path)


def plot_router_learning(steps, panels, title, path=None):
    """Lesson 03: quantities over training steps, one curve per gate variant.

    ``panels``: ``{ylabel: {curve label: values per step}}``, one panel each.
    """
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (ylabel, curves) in zip(axes[0], panels.items()):
        for (label, ys), ls in zip(curves.items(), ["-", "--", ":", "-."]):
            ax.plot(steps, ys, ls, lw=2, label=label)
        ax.set(xlabel="training step", ylabel=ylabel)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _finish(fig, path)


def plot_exploration(counts_by_name, n_draws, path=None):
    """Lesson 04: how often each patient (row) is referred to each specialist (column).

    ``counts_by_name``: ``{title: counts (T, E)}`` over ``n_draws`` forward passes.
    """
    plt = _plt()
    n = len(counts_by_name)
    fig, axes = plt.subplots(1, n, figsize=(3.8 * n + 1, 3.8), squeeze=False, constrained_layout=True)
    for i, (ax, (name, c)) in enumerate(zip(axes[0], counts_by_name.items())):
        im = ax.imshow(c / n_draws, cmap="Greens", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
        ax.set(title=name, xlabel="specialist (expert)", ylabel="patient (token)" if i == 0 else None)
        ax.set_xticks(range(c.shape[1]))
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="fraction of visits")
    return _finish(fig, path)


def plot_kink(ts, losses, t_tie, h, title, path=None):
    """Lesson 04: a loss along one direction, with a tie between experts at ``t_tie``."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    ax.plot(ts, losses, lw=2, color="tab:purple")
    ax.axvline(t_tie, color="gray", ls=":", lw=1)
    ax.text(t_tie, np.mean(ax.get_ylim()), "  tie: the top-k set changes", va="center", fontsize=8,
            color="gray")
    ax.axvspan(t_tie - h, t_tie + h, color="tab:red", alpha=0.15, label=f"a finite difference of step {h:g}")
    ax.set(xlabel="distance moved along one logit", ylabel="loss", title=title)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    return _finish(fig, path)
