"""Real patients: the MoE language model on Python's own documentation and source code.

Figures of lesson 12 and ``python -m minimoe.lm``: dense against sparse at equal cost, loss
against the number of experts, what the experts' choice reveals (domain or character type),
the text coloured by expert (Mixtral's Fig. 8; also as HTML), and sparse upcycling. Every
function takes plain data (the result dicts of :mod:`minimoe.lm.experiments`), draws one
figure, saves it if given a ``path`` and returns the ``Figure``.
"""
from __future__ import annotations

import html

import numpy as np

from ._style import _finish, _plt, expert_colors

__all__ = ["plot_dense_vs_sparse", "plot_loss_vs_experts", "plot_domain_vs_type", "plot_expert_text",
           "expert_text_html", "plot_upcycling"]


def _baselines(ax, baselines):
    """Dashed lines at the mean unigram and bigram bpc (``{domain: {"unigram", "bigram"}}``)."""
    for key, label in (("unigram", "unigram"), ("bigram", "bigram (one character back)")):
        v = float(np.mean([b[key] for b in baselines.values()]))
        ax.axhline(v, color="k", ls="--", lw=0.9)
        ax.annotate(label, (0.99, v), xycoords=("axes fraction", "data"), xytext=(0, 3),
                    textcoords="offset points", ha="right", fontsize=8)


def plot_dense_vs_sparse(compare, baselines, path=None, title="Dense against sparse at equal FLOPs per character"):
    """Validation bpc (mean of prose and code) against step, one line per (kind, seed); and the
    test bpc per domain, mean ± std over seeds, as bars.

    ``compare``: the rows of :func:`minimoe.lm.experiments.compare_dense_sparse` (``kind``, ``seed``,
    ``test``, ``curve``); ``baselines``: ``{domain: {"unigram", "bigram"}}``.
    """
    plt = _plt()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 3.9), gridspec_kw={"width_ratios": [1.5, 1]})
    colors = {"dense": "#e07b39", "moe": "#2a9d5c"}
    names = {"dense": "dense FFN", "moe": "MoE (top-1 Switch)"}
    for r in compare:
        ax.plot(r["curve"]["steps"], r["curve"]["val_mean"], "-", color=colors[r["kind"]], lw=1.3, alpha=0.85,
                label=names[r["kind"]] if r["seed"] == compare[0]["seed"] else None)
    _baselines(ax, baselines)
    ax.set(xlabel="training step", ylabel="validation bits per character", title="learning curves (every seed)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    domains = ("prose", "code", "mean")
    x = np.arange(len(domains))
    for i, kind in enumerate(("dense", "moe")):
        vals = np.array([[r["test"][d] for d in domains] for r in compare if r["kind"] == kind])
        m, s = vals.mean(axis=0), vals.std(axis=0)
        bars = bx.bar(x + (i - 0.5) * 0.38, m, 0.36, yerr=s, capsize=3, color=colors[kind], alpha=0.85,
                      label=names[kind])
        for b, v, e in zip(bars, m, s):
            bx.text(b.get_x() + b.get_width() / 2, v + e, f"{v:.3f}", ha="center", va="bottom", fontsize=7)
    lo = min(r["test"][d] for r in compare for d in domains)
    hi = max(r["test"][d] for r in compare for d in domains) + 0.02
    bx.set_ylim(lo - 0.25 * (hi - lo) - 0.05, hi + 0.35 * (hi - lo) + 0.05)
    bx.set_xticks(x, domains)
    bx.set(ylabel="test bits per character", title="test (mean ± std over seeds)\naxis zoomed")
    bx.grid(axis="y", alpha=0.3)
    bx.legend(fontsize=8, loc="upper right")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _finish(fig, path)


def plot_loss_vs_experts(sweep, path=None, dense=None,
                         title="More experts at fixed compute per character (Switch Transformer, Fig. 1)"):
    """Test bpc against the number of experts E (left) and against the parameters (right).

    ``sweep``: rows with ``E``, ``params``, ``flops_per_char`` and ``test`` (``{"mean", "prose", "code"}``).
    ``dense``: optionally ``(params, bpc)`` of the dense model, marked on the right panel.
    """
    plt = _plt()
    E = np.array([r["E"] for r in sweep])
    P = np.array([r["params"] for r in sweep])
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for key, style in (("mean", "o-"), ("prose", "s:"), ("code", "^:")):
        v = [r["test"][key] for r in sweep]
        axes[0].plot(E, v, style, lw=1.5 if key == "mean" else 1, label=key)
        axes[1].plot(P, v, style, lw=1.5 if key == "mean" else 1, label=key)
    for e, p, r in zip(E, P, sweep):
        axes[1].annotate(f"E={e}", (p, r["test"]["mean"]), xytext=(3, 4), textcoords="offset points", fontsize=7)
    if dense is not None:
        axes[1].plot([dense[0]], [dense[1]], "D", color="#e07b39", label="dense FFN")
    axes[0].set_xscale("log", base=2)
    axes[0].set_xticks(E, [str(e) for e in E])
    axes[0].set(xlabel="experts E (top-1, same width)", ylabel="test bits per character")
    axes[1].set_xscale("log")
    axes[1].set(xlabel="parameters (log scale)", ylabel="test bits per character")
    f0, f1 = sweep[0]["flops_per_char"], sweep[-1]["flops_per_char"]
    axes[0].set_title(f"against E (FLOPs/char {f0:,} … {f1:,})", fontsize=9)
    axes[1].set_title("against parameters", fontsize=9)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _finish(fig, path)


def plot_domain_vs_type(rows, path=None, title="What the expert reveals: the text's domain, or the character's type?"):
    """Left: I(expert; domain)/H and I(expert; type)/H per (model, block); right: the share of
    characters whose first-choice expert is also the next one's, per domain, beside chance.

    ``rows``: the routing rows of :func:`minimoe.lm.experiments.what_experts_learn`.
    """
    plt = _plt()
    names = [f"{r['model']}, block {r['layer']}" for r in rows]
    y = np.arange(len(rows))
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 1.2 + 0.5 * len(rows)))
    for off, key, label, color in ((-0.2, "frac_type", "character type", "tab:purple"),
                                   (0.2, "frac_domain", "domain (prose or code)", "tab:orange")):
        vals = np.array([r[key] for r in rows])
        ax.barh(y + off, vals, 0.38, color=color, alpha=0.85, label=label)
        for yi, v in zip(y + off, vals):
            ax.text(v, yi, f" {100 * v:.1f}%", va="center", fontsize=7)
    ax.set_yticks(y, names, fontsize=8)
    ax.invert_yaxis()
    ax.set(xlabel="I(expert; label) / H(label)", xlim=(0, max(max(r["frac_type"], r["frac_domain"]) for r in rows) * 1.25))
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    for off, dom, color in ((-0.2, "prose", "tab:blue"), (0.2, "code", "tab:green")):
        vals = np.array([r["same_next"][dom] for r in rows])
        chance = np.array([r["same_chance"][dom] for r in rows])
        bx.barh(y + off, vals, 0.38, color=color, alpha=0.85, label=f"{dom}")
        bx.scatter(chance, y + off, marker="|", s=120, color="k", zorder=3,
                   label="chance, Σ p²" if dom == "prose" else None)
    bx.set_yticks(y, [""] * len(rows))
    bx.invert_yaxis()
    bx.set(xlabel="share of characters whose next character has the same first-choice expert", xlim=(0, 1))
    bx.legend(fontsize=8, loc="lower right")
    bx.grid(axis="x", alpha=0.3)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _finish(fig, path)


def _lines(chars, experts, width):
    """Split a text into display lines (at newlines, and every ``width`` characters)."""
    out, cur = [], []
    for c, e in zip(chars, experts):               # display only: a loop over a few hundred characters
        if c == "\n":
            cur.append(("⏎", e))
            out.append(cur)
            cur = []
            continue
        cur.append((c, e))
        if len(cur) >= width:
            out.append(cur)
            cur = []
    if cur:
        out.append(cur)
    return out


def plot_expert_text(snippets, n_experts, path=None, width=72, title="Each character coloured by its expert"):
    """Mixtral's Fig. 8: text with each character's background the colour of its first-choice expert.

    ``snippets``: ``{panel title: (text str, experts (N,) int)}``, one panel each, top to bottom;
    newlines are shown as ⏎. ``n_experts``: E (the legend's colours).
    """
    plt = _plt()
    colors = expert_colors(n_experts)
    panels = {name: _lines(t, np.asarray(e), width) for name, (t, e) in snippets.items()}
    n_lines = sum(len(v) + 2 for v in panels.values())
    fig = plt.figure(figsize=(0.105 * width + 0.6, 0.2 * n_lines + 1.0))
    ax = fig.add_axes([0, 0, 1, 1])
    ax.set_axis_off()
    ax.set(xlim=(-1, width + 1), ylim=(n_lines + 1.5, -1.5))
    row = 0
    for name, lines in panels.items():
        ax.text(0, row, name, fontsize=9, fontweight="bold", va="center")
        row += 1.2
        for line in lines:
            for col, (c, e) in enumerate(line):
                if e >= 0:
                    ax.add_patch(plt.Rectangle((col - 0.5, row - 0.5), 1, 1, color=colors[e], alpha=0.55, lw=0))
                ax.text(col, row, c, fontsize=7.5, family="monospace", ha="center", va="center")
            row += 1
        row += 0.8
    step = max(6, min(9, width // max(n_experts, 1)))             # legend entries side by side
    for e in range(n_experts):
        x0, y0 = (e % (width // step)) * step, row + e // (width // step)
        ax.add_patch(plt.Rectangle((x0 - 0.5, y0 - 0.5), 1, 1, color=colors[e], alpha=0.55, lw=0))
        ax.text(x0 + 0.8, y0, f"expert {e}", fontsize=7, va="center")
    ax.text(width, -1.2, title, ha="right", fontsize=9, style="italic")
    return _finish(fig, path)


def expert_text_html(snippets, n_experts, title="Each character coloured by its expert"):
    """The same as :func:`plot_expert_text`, as a self-contained HTML page (a str)."""
    colors = expert_colors(n_experts)
    css = ["#%02x%02x%02x" % tuple(int(255 * (0.45 + 0.55 * c)) for c in col[:3]) for col in colors]
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>pre{font:13px/1.5 monospace;white-space:pre-wrap}span{padding:0 0}</style></head><body>",
             f"<h3>{html.escape(title)}</h3>"]
    for name, (t, e) in snippets.items():
        parts.append(f"<h4>{html.escape(name)}</h4><pre>")
        e = np.asarray(e)
        start = 0
        for i in range(1, len(t) + 1):               # runs of one expert become one span
            if i == len(t) or e[i] != e[start]:
                bg = css[e[start]] if e[start] >= 0 else "#ffffff"
                parts.append(f"<span style='background:{bg}' title='expert {e[start]}'>"
                             f"{html.escape(t[start:i])}</span>")
                start = i
        parts.append("</pre>")
    parts.append("<p>" + " ".join(f"<span style='background:{c}'>&nbsp;expert {i}&nbsp;</span>"
                                  for i, c in enumerate(css)) + "</p></body></html>")
    return "".join(parts)


def plot_upcycling(upcycle, baselines=None, path=None, title="Sparse upcycling: the dense model's FFN copied into experts"):
    """Validation bpc against step: the dense model's first steps, then the dense model trained on,
    the upcycled MoE, and an MoE trained from scratch for the same total steps.

    ``upcycle``: the dict of :func:`minimoe.lm.experiments.upcycling` (``curves``: name ->
    ``{"steps", "val_mean"}``).
    """
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 3.9))
    styles = {"dense (first steps)": ("#e07b39", "-"), "dense, trained on": ("#e07b39", "--"),
              "upcycled": ("#2a9d5c", "-"), "MoE from scratch": ("#4c8bc4", ":")}
    for name, c in upcycle["curves"].items():
        color, ls = styles.get(name, (None, "-"))
        ax.plot(c["steps"], c["val_mean"], ls, color=color, lw=1.6, label=name)
    first = upcycle["curves"]["dense (first steps)"]["steps"]
    if first:
        ax.axvline(first[-1], color="gray", lw=0.8, ls=":")
        ax.annotate("upcycled here", (first[-1], 1.0), xycoords=("data", "axes fraction"), xytext=(3, -12),
                    textcoords="offset points", fontsize=8, color="gray")
    vals = [v for c in upcycle["curves"].values() for v in c["val_mean"]]
    lo, hi = min(vals) - 0.1, float(np.percentile(vals, 90)) + 0.2
    ax.set_ylim(lo, hi)
    if baselines is not None:                      # the bigram line, when it is in view
        v = float(np.mean([b["bigram"] for b in baselines.values()]))
        if lo < v < hi:
            ax.axhline(v, color="k", ls="--", lw=0.9)
            ax.annotate("bigram", (0.99, v), xycoords=("axes fraction", "data"), xytext=(0, 3),
                        textcoords="offset points", ha="right", fontsize=8)
    ax.set(xlabel="training step", ylabel="validation bits per character", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _finish(fig, path)
