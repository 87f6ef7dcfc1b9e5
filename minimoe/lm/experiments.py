"""The real-text experiments of lesson 12: dense against sparse, more experts, what they learn, upcycling.

Every experiment trains minimoe's own :class:`~minimoe.lm.model.MoELM` on the text of
:mod:`minimoe.lm.text` (the Python documentation and the standard library, read from the
running Python), with characters as tokens and **bits per character** (bpc) as the score:

1. **Dense against sparse at equal cost** (:func:`compare_dense_sparse`). The sparse model
   is Switch-style: each block's FFN is E experts of width h, top-1 with the Switch gate and
   the Switch balancing loss. The dense model's FFN has the smallest width whose FLOPs are at
   least the MoE's (router, one expert, the gate: ``4d·h_dense ≥ 4d·h + 2d·E + 2d``), so the dense model
   never has *less* compute per character. Same steps, same batches, several seeds.
2. **More experts at fixed active compute** (:func:`sweep_experts`): the Switch Transformer's
   Fig. 1 in miniature — E ∈ {1, 2, 4, …}, the same expert width and k = 1, so the compute
   per character stays (almost: the router's 2dE grows) the same while the parameters grow E×.
3. **What the experts learn** (:mod:`minimoe.lm.routing`), against a hash-routed model.
4. **Sparse upcycling** (:mod:`minimoe.lm.upcycle`): the trained dense model made into an
   MoE (top-2, renormalised, so it starts exactly where the dense model is) and trained on,
   against the dense model trained on and an MoE of the same shape trained from scratch for
   the same total steps.

:data:`QUICK` runs in well under a minute on 2 cores (the lessons and the tests);
:data:`FULL` is ``python -m minimoe.lm`` (a few minutes; README's tables). Results are
reproducible for a given Python (whose text they read), NumPy and seed; both versions are recorded.

Shapes: B windows of S characters; V = 97 characters; d width; E experts.
"""
from __future__ import annotations

import math
import platform
import sys
import time
from typing import NamedTuple

import numpy as np

from . import routing, text
from .model import MoELM
from .upcycle import upcycle
from ..clinic.optim import make_optimizer
from ..clinic.train import check_training_loss, raise_if_diverged
from ..core.layers import cross_entropy_forward
from ..validate import check_choice, check_int

__all__ = ["FULL", "QUICK", "LN2", "Run", "dense_width", "build_model", "bits_per_char", "evaluate_bpc",
           "baseline_bpc", "train_text_lm", "eval_sets", "compare_dense_sparse", "sweep_experts", "what_experts_learn",
           "upcycling", "expert_text", "total_steps", "run_all", "format_tables"]

LN2 = math.log(2.0)

# The full run (python -m minimoe.lm) and the quick one (lessons, tests). Both use the same model
# shape; the quick one trains fewer steps, on fewer seeds and fewer expert counts.
FULL = dict(d_model=64, n_heads=4, n_layers=2, seq_len=64, batch_size=16, d_hidden=128, n_experts=8,
            lr=3e-3, balance_coef=0.01, steps=1000, seeds=(0, 1, 2), sweep=(1, 2, 4, 8, 16, 32),
            upcycle_experts=8, upcycle_k=2, upcycle_steps=500, eval_windows=128, test_windows=256,
            eval_every=100, dtype="float32")
QUICK = dict(FULL, steps=120, seeds=(0,), sweep=(1, 8), upcycle_steps=60, eval_windows=32, test_windows=64,
             eval_every=40)


# --------------------------------------------------------------------------- models
def dense_width(cfg, n_experts=None):
    """The dense FFN width of equal cost: the smallest h_dense with ``4d·h_dense ≥ 4d·h + 2d·E + 2d``
    (one Switch expert of width h, its router, and the gate's scaling of its output)."""
    d, h = cfg["d_model"], cfg["d_hidden"]
    E = cfg["n_experts"] if n_experts is None else n_experts
    return math.ceil((4 * d * h + 2 * d * E + 2 * d) / (4 * d))


def build_model(kind, cfg, seed, n_experts=None):
    """A fresh model of ``kind``: "dense" (width :func:`dense_width`), "moe" (Switch-style top-1 of
    E experts of width h, Switch gate and loss) or "hash" (top-1 of E experts chosen by a hash of
    the character). Weights from ``np.random.default_rng(seed)``."""
    check_choice("kind", kind, ("dense", "moe", "hash"))
    E = cfg["n_experts"] if n_experts is None else check_int("n_experts", n_experts, low=1)
    common = dict(vocab_size=len(text.VOCAB), d_model=cfg["d_model"], n_heads=cfg["n_heads"],
                  n_layers=cfg["n_layers"], max_len=cfg["seq_len"], rng=np.random.default_rng(seed),
                  dtype=np.dtype(cfg["dtype"]).type)
    if kind == "dense":
        return MoELM(ffn="dense", d_hidden=dense_width(cfg, E), **common)
    if kind == "hash":
        return MoELM(ffn="hash", d_hidden=cfg["d_hidden"], n_experts=E, k=1, **common)
    return MoELM(ffn="moe", d_hidden=cfg["d_hidden"], n_experts=E, k=1, gate="switch", balance="switch",
                 balance_coef=cfg["balance_coef"], **common)


# --------------------------------------------------------------------------- measuring
def bits_per_char(loss_nats):
    """A mean cross-entropy per character in nats -> bits per character: ``loss / ln 2``."""
    return float(loss_nats) / LN2


def eval_sets(corpus, split, cfg, n_windows):
    """Fixed, evenly spaced, non-overlapping windows of ``split`` for each domain:
    ``{domain: (inputs (W,S), targets (W,S), types (W,S))}`` (W ≤ n_windows: at most as many as fit)."""
    out = {}
    S = cfg["seq_len"]
    for domain in text.DOMAINS:
        part = corpus.split(split, domain)
        W = min(n_windows, (part.ids.size - 1) // S)
        x, y, pos = text.eval_windows(part.ids, S, W)
        out[domain] = (x, y, part.types[pos])
    return out


def evaluate_bpc(model, sets, batch_size=64):
    """Bits per character of ``model`` (eval mode) on each domain's windows, and their mean:
    ``{"prose": bpc, "code": bpc, "mean": (prose + code) / 2}``."""
    out = {}
    for domain, (x, y, _) in sets.items():
        total = 0.0
        for s in range(0, len(x), batch_size):         # a loop over batches of windows
            total += model.forward_loss(x[s:s + batch_size], y[s:s + batch_size], train=False) * y[s:s + batch_size].size
        out[domain] = bits_per_char(total / y.size)
    out["mean"] = float(np.mean([out[d] for d in sets]))
    return out


def baseline_bpc(train_ids, inputs, targets, alpha_unigram=1.0, alpha_bigram=0.1):
    """The unigram and bigram models' bits per character on the same (input, target) pairs
    the language model is scored on: ``(unigram, bigram)``.

    unigram: add-α character frequencies of ``train_ids``; bigram: add-α counts of
    (previous, next) pairs, ``p(target | input)`` — the best one can do looking one
    character back (lesson 09's baselines, per target).
    """
    V = len(text.VOCAB)
    tr = np.asarray(train_ids)
    uni = np.bincount(tr, minlength=V) + alpha_unigram
    uni = np.log(uni / uni.sum())
    bi = np.bincount(tr[:-1] * V + tr[1:], minlength=V * V).reshape(V, V) + alpha_bigram
    bi = np.log(bi) - np.log(bi.sum(axis=1, keepdims=True))
    return float(-uni[targets].mean() / LN2), float(-bi[inputs, targets].mean() / LN2)


class Run(NamedTuple):
    """One training run: the model, its optimizer (to train on), and its history —
    ``steps``, ``train_bpc`` (mean over each interval), ``val`` (a dict per evaluation)."""
    model: MoELM
    optimizer: object
    steps: list
    train_bpc: list
    val: list


def train_text_lm(model, corpus, cfg, steps, seed, val_sets=None, optimizer=None, bar=None, desc=None,
                  step0=0, history=None):
    """Train ``model`` with Adam on random windows, half prose and half code; return a :class:`Run`.

    Batches come from :func:`minimoe.lm.text.batches` seeded by ``seed``, so models trained with
    the same seed see the same batches. ``optimizer``/``history``/``step0``: continue an earlier
    :class:`Run` (its Adam state kept). ``bar``: a tqdm bar advanced once per step.
    """
    steps = check_int("steps", steps, low=0)
    opt = optimizer or make_optimizer("adam", model, lr=cfg["lr"], clip=1.0)
    streams = [corpus.split("train", d).ids for d in text.DOMAINS]
    data = text.batches(streams, cfg["batch_size"], cfg["seq_len"], np.random.default_rng(seed), n_batches=steps)
    run = history or Run(model, opt, [], [], [])
    run = run._replace(model=model, optimizer=opt)
    losses, start, step = [], None, step0
    if bar is not None and desc:
        bar.set_description(desc)
    try:
        for step, (x, y, _) in enumerate(data, start=step0 + 1):
            loss = model.forward_loss(x, y, train=True)
            check_training_loss(loss + model.aux_loss, start, step, cfg["lr"])
            start = loss + model.aux_loss if start is None else start
            model.backward()
            opt.step()
            model.after_step()
            losses.append(loss)
            if val_sets is not None and (step % cfg["eval_every"] == 0 or step == step0 + steps):
                run.steps.append(step)
                run.train_bpc.append(bits_per_char(np.mean(losses)))
                run.val.append(evaluate_bpc(model, val_sets))
                losses = []
            if bar is not None:
                bar.update(1)
    except ValueError as err:
        raise_if_diverged(err, step, cfg["lr"])
        raise
    return run


def _counts(model):
    return {"params": model.n_params, "active_params": model.n_active_params,
            "flops_per_char": model.flops_per_token(model.max_len)}


# --------------------------------------------------------------------------- the experiments
def compare_dense_sparse(corpus, cfg, sets, bar=None):
    """Experiment 1: dense and Switch-style MoE, equal FLOPs, one pair per seed.

    Returns ``(rows, runs)``: one row per (kind, seed) with the test bpc per domain, the counts and
    the validation curve; ``runs[(kind, seed)]`` the :class:`Run` (the models are used later)."""
    rows, runs = [], {}
    for seed in cfg["seeds"]:
        for kind in ("dense", "moe"):
            model = build_model(kind, cfg, seed=1000 + seed)
            run = train_text_lm(model, corpus, cfg, cfg["steps"], seed, sets["val"], bar=bar,
                                desc=f"{kind}, seed {seed}")
            runs[(kind, seed)] = run
            rows.append({"kind": kind, "seed": seed, **_counts(model), "test": evaluate_bpc(model, sets["test"]),
                         "curve": {"steps": run.steps, "val_mean": [v["mean"] for v in run.val]}})
    return rows, runs


def sweep_experts(corpus, cfg, sets, runs, bar=None):
    """Experiment 2: loss against E at fixed expert width and k = 1 (seed cfg["seeds"][0]);
    reuses the comparison's MoE when E matches. Returns one row per E."""
    seed, rows = cfg["seeds"][0], []
    for E in cfg["sweep"]:
        if E == cfg["n_experts"] and ("moe", seed) in runs:
            model = runs[("moe", seed)].model
        else:
            model = build_model("moe", cfg, seed=1000 + seed, n_experts=E)
            train_text_lm(model, corpus, cfg, cfg["steps"], seed, None, bar=bar, desc=f"E = {E}")
        rows.append({"E": E, **_counts(model), "test": evaluate_bpc(model, sets["test"])})
    return rows


def what_experts_learn(models, sets):
    """Experiment 3: for each named routed model and block, I(expert; domain) and I(expert; type)
    on the test windows, and the consecutive-character same-expert fraction per domain with its
    chance level. Returns ``(rows, routed)``, ``routed[name]`` the :class:`~minimoe.lm.routing.RoutedText`."""
    rows, routed = [], {}
    for name, model in models.items():
        r = routing.route_windows(model, [(x, t, i) for i, (x, _, t) in enumerate(sets.values())])
        routed[name] = r
        for layer in range(r.experts.shape[0]):
            info = routing.expert_information(r, layer)
            first = r.experts[layer][..., 0]
            same = routing.same_expert_fraction(first, r.domain)
            chance = routing.chance_same_expert(first, r.domain, r.n_experts[layer])
            rows.append({"model": name, "layer": layer, **{k: info[k] for k in (
                "mi_domain", "mi_type", "h_domain", "h_type", "frac_domain", "frac_type", "n")},
                "same_next": dict(zip(text.DOMAINS, same.tolist())),
                "same_chance": dict(zip(text.DOMAINS, chance.tolist()))})
    return rows, routed


def upcycling(corpus, cfg, sets, dense_run, bar=None):
    """Experiment 4: sparse upcycling of the trained dense model (seed cfg["seeds"][0]).

    Three runs of ``upcycle_steps`` more steps on the same batches: the dense model trained on
    (its Adam state kept), the upcycled MoE (a fresh Adam), and an MoE of the upcycled shape
    trained from scratch for ``steps + upcycle_steps``. Returns a dict of curves and final test bpc.
    """
    seed, S, U = cfg["seeds"][0], cfg["steps"], cfg["upcycle_steps"]
    E, k = cfg["upcycle_experts"], cfg["upcycle_k"]
    moe_kw = dict(balance="switch", balance_coef=cfg["balance_coef"])
    dense = dense_run.model
    up = upcycle(dense, E, k=k, gate="topk", rng=np.random.default_rng(2000 + seed), **moe_kw)
    start = evaluate_bpc(up, sets["val"])
    before = evaluate_bpc(dense, sets["val"])
    up_run = train_text_lm(up, corpus, cfg, U, seed + 100, sets["val"], bar=bar, desc="upcycled", step0=S)
    dense_more = train_text_lm(dense, corpus, cfg, U, seed + 100, sets["val"], optimizer=dense_run.optimizer,
                               bar=bar, desc="dense, on", step0=S,
                               history=Run(dense, dense_run.optimizer, [], [], []))
    scratch = MoELM(len(text.VOCAB), cfg["d_model"], cfg["n_heads"], cfg["n_layers"], cfg["seq_len"], ffn="moe",
                    rng=np.random.default_rng(3000 + seed), dtype=np.dtype(cfg["dtype"]).type,
                    d_hidden=dense.blocks[0].ffn.d_hidden, n_experts=E, k=k, gate="topk", **moe_kw)
    scratch_run = train_text_lm(scratch, corpus, cfg, S + U, seed, sets["val"], bar=bar, desc="MoE from scratch")
    def curve(r, first):        # each continuation starts at the upcycling step, from its own value there
        return {"steps": [S] + list(r.steps), "val_mean": [first] + [v["mean"] for v in r.val]}
    return {"experts": E, "k": k, "dense_width": dense.blocks[0].ffn.d_hidden,
            "start_gap": abs(start["mean"] - before["mean"]), "dense_at_upcycle": before["mean"],
            "flops_per_char": {"dense": dense.flops_per_token(dense.max_len), "moe": up.flops_per_token(up.max_len)},
            "params": {"dense": dense.n_params, "moe": up.n_params},
            "curves": {"dense, trained on": curve(dense_more, before["mean"]), "upcycled": curve(up_run, start["mean"]),
                       "MoE from scratch": {"steps": list(scratch_run.steps),
                                            "val_mean": [v["mean"] for v in scratch_run.val]},
                       "dense (first steps)": {"steps": list(dense_run.steps),
                                               "val_mean": [v["mean"] for v in dense_run.val]}},
            "test": {"dense, trained on": evaluate_bpc(dense, sets["test"]),
                     "upcycled": evaluate_bpc(up, sets["test"]),
                     "MoE from scratch": evaluate_bpc(scratch, sets["test"])}}


def expert_text(model, corpus):
    """The coloured text's data: a paragraph of documentation and a function of library code from
    the test split, with each character's first-choice expert in every block of ``model``.

    Returns ``{title: {"text": str, "experts": [int, ...], "layer": int}}`` (JSON-ready).
    """
    out = {}
    for domain, (name, snippet) in text.snippets(corpus).items():
        ids = text.encode(snippet)
        what = "documentation" if domain == "prose" else "library code"
        for layer in range(len(model.blocks)):
            out[f"{what} ({name}), block {layer}"] = {
                "text": text.decode(ids), "layer": layer,
                "experts": routing.route_snippet(model, ids, layer).tolist()}
    return out


def total_steps(cfg):
    """Every training step of :func:`run_all` (for the progress bar)."""
    n_sweep = sum(1 for E in cfg["sweep"] if E != cfg["n_experts"])
    return cfg["steps"] * (2 * len(cfg["seeds"]) + n_sweep + 1) + 2 * cfg["upcycle_steps"] + \
        cfg["steps"] + cfg["upcycle_steps"]


def run_all(cfg=QUICK, progress=None, corpus=None, log=None):
    """All four experiments; returns ``(results, extras)``.

    ``results`` is JSON-ready (config, versions, corpus sizes, baselines, the four experiments'
    tables, seconds taken); ``extras`` holds what figures need and JSON cannot (the models of
    seed ``cfg["seeds"][0]``, the routed test windows, the corpus).
    ``progress``: a tqdm bar over every training step (None: only on a terminal).
    """
    t0, c0 = time.perf_counter(), time.process_time()
    corpus = text.load_text() if corpus is None else corpus
    sets = {"val": eval_sets(corpus, "val", cfg, cfg["eval_windows"]),
            "test": eval_sets(corpus, "test", cfg, cfg["test_windows"])}
    baselines = {}
    for domain, (x, y, _) in sets["test"].items():
        uni, bi = baseline_bpc(corpus.split("train", domain).ids, x, y)
        baselines[domain] = {"unigram": uni, "bigram": bi}
    bar = None
    if sys.stderr.isatty() if progress is None else progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total_steps(cfg), desc="real text", unit="step", dynamic_ncols=True)
    phases = {}

    def lap(name, since):
        phases[name] = round(time.perf_counter() - since, 1)
        return time.perf_counter()
    try:
        t = time.perf_counter()
        compare, runs = compare_dense_sparse(corpus, cfg, sets, bar)
        t = lap("dense vs sparse", t)
        sweep = sweep_experts(corpus, cfg, sets, runs, bar)
        t = lap("loss vs E", t)
        seed = cfg["seeds"][0]
        hashed = build_model("hash", cfg, seed=1000 + seed)
        train_text_lm(hashed, corpus, cfg, cfg["steps"], seed, None, bar=bar, desc="hash-routed")
        hash_test = evaluate_bpc(hashed, sets["test"])
        models = {"learned": runs[("moe", seed)].model, "hash": hashed}
        learn_rows, routed = what_experts_learn(models, sets["test"])
        t = lap("routing (and the hash model)", t)
        up = upcycling(corpus, cfg, sets, runs[("dense", seed)], bar)
        lap("upcycling", t)
    finally:
        if bar is not None:
            bar.close()
    results = {"config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
               "python": corpus.python, "numpy": np.__version__, "platform": platform.platform(),
               "corpus": corpus.sizes(), "vocab_size": len(text.VOCAB), "dense_width": dense_width(cfg),
               "test_chars": {d: int(y.size) for d, (_, y, _) in sets["test"].items()},
               "baselines": baselines, "compare": compare, "sweep": sweep, "hash_test": hash_test,
               "routing": learn_rows, "expert_text": expert_text(models["learned"], corpus), "upcycle": up,
               "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0, "phases": phases}
    extras = {"models": {**models, "dense": runs[("dense", seed)].model}, "routed": routed, "corpus": corpus,
              "sets": sets}
    return results, extras


# --------------------------------------------------------------------------- tables
def _mean_std(values):
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std())


def _aligned(md):
    """Markdown tables -> plain columns, each padded to its widest cell (for a terminal)."""
    out, block = [], []

    def flush():
        if block:
            widths = [max(len(r[i]) for r in block) for i in range(len(block[0]))]
            out.extend("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in block)
            block.clear()
    for line in md.split("\n"):
        if line.startswith("|---"):
            continue
        if line.startswith("| "):
            block.append([c.strip() for c in line.strip("|").split(" | ")])
            continue
        flush()
        out.append(line)
    flush()
    return "\n".join(out)


def format_tables(res, markdown=True):
    """The results as text: the dense/sparse table, loss against E, the routing table, upcycling
    (markdown tables, or aligned columns with ``markdown=False``)."""
    if not markdown:
        return _aligned(format_tables(res, markdown=True))
    c = res["config"]
    lines = [f"Real text: Python {res['python']}'s documentation (prose) and standard library (code), "
             f"characters as tokens (V = {res['vocab_size']}); numpy {res['numpy']}.",
             f"Model: {c['n_layers']} blocks, d = {c['d_model']}, {c['n_heads']} heads, windows of "
             f"{c['seq_len']} characters, batches of {c['batch_size']} (half prose, half code), Adam lr "
             f"{c['lr']}, {c['steps']} steps ({c['steps'] * c['batch_size'] * c['seq_len']:,} characters), "
             f"{c['dtype']}. Test: {res['test_chars']['prose']:,} prose and {res['test_chars']['code']:,} "
             f"code characters from documents never trained on. Bits per character (bpc), lower is better.",
             ""]
    def row(cells):
        return "| " + " | ".join(cells) + " |"

    def rule(n):
        return ["|" + "---|" * n]

    b = res["baselines"]
    lines += [row(["model", "prose bpc", "code bpc", "mean bpc", "params", "active params", "FLOPs/char"]), *rule(7)]
    lines.append(row(["unigram", f"{b['prose']['unigram']:.3f}", f"{b['code']['unigram']:.3f}",
                      f"{(b['prose']['unigram'] + b['code']['unigram']) / 2:.3f}", "", "", ""]))
    lines.append(row(["bigram", f"{b['prose']['bigram']:.3f}", f"{b['code']['bigram']:.3f}",
                      f"{(b['prose']['bigram'] + b['code']['bigram']) / 2:.3f}", "", "", ""]))
    for kind, label in (("dense", f"dense FFN (width {res['dense_width']})"),
                        ("moe", f"MoE, top-1 of {c['n_experts']} (width {c['d_hidden']})")):
        rs = [r for r in res["compare"] if r["kind"] == kind]
        cells = [label]
        for dom in ("prose", "code", "mean"):
            m, s = _mean_std([r["test"][dom] for r in rs])
            cells.append(f"{m:.3f} ± {s:.3f}" if len(rs) > 1 else f"{m:.3f}")
        cells += [f"{rs[0]['params']:,}", f"{rs[0]['active_params']:,}", f"{rs[0]['flops_per_char']:,}"]
        lines.append(row(cells))
    lines += ["", f"(mean ± std over seeds {', '.join(map(str, c['seeds']))}; FLOPs per character of the "
                  f"forward pass, from flops_per_token(S={c['seq_len']}))", ""]
    lines += [row(["experts E", "mean bpc", "prose", "code", "params", "FLOPs/char"]), *rule(6)]
    for r in res["sweep"]:
        lines.append(row([str(r["E"]), f"{r['test']['mean']:.3f}", f"{r['test']['prose']:.3f}",
                          f"{r['test']['code']:.3f}", f"{r['params']:,}", f"{r['flops_per_char']:,}"]))
    lines += ["", f"(top-1, Switch gate and loss, experts of width {c['d_hidden']}, seed {c['seeds'][0]}; "
                  f"the hash-routed model of E = {c['n_experts']}: {res['hash_test']['mean']:.3f} bpc)", ""]
    lines += [row(["model, block", "I(expert; domain)", "% of H", "I(expert; type)", "% of H",
                   "same next, prose", "same next, code", "chance (prose / code)"]), *rule(8)]
    for r in res["routing"]:
        lines.append(row([f"{r['model']}, block {r['layer']}", f"{r['mi_domain']:.3f}",
                          f"{100 * r['frac_domain']:.1f}", f"{r['mi_type']:.3f}", f"{100 * r['frac_type']:.1f}",
                          f"{r['same_next']['prose']:.2f}", f"{r['same_next']['code']:.2f}",
                          f"{r['same_chance']['prose']:.2f} / {r['same_chance']['code']:.2f}"]))
    lines += ["", "(nats, over the test characters' (character, expert) assignments; 'same next': the share of "
                  "characters whose first-choice expert is also the next character's)", ""]
    u = res["upcycle"]
    lines += [row(["after upcycling", "mean bpc", "prose", "code", "steps", "FLOPs/char"]), *rule(6)]
    steps = {"dense, trained on": c["steps"] + c["upcycle_steps"], "upcycled": c["steps"] + c["upcycle_steps"],
             "MoE from scratch": c["steps"] + c["upcycle_steps"]}
    for name, t in u["test"].items():
        fl = u["flops_per_char"]["dense" if name.startswith("dense") else "moe"]
        lines.append(row([name, f"{t['mean']:.3f}", f"{t['prose']:.3f}", f"{t['code']:.3f}",
                          f"{c['steps']} + {c['upcycle_steps']}" if name != "MoE from scratch" else str(steps[name]),
                          f"{fl:,}"]))
    lines += ["", f"(the dense model after {c['steps']} steps made into top-{u['k']} of {u['experts']} copies of "
                  f"its FFN; at the start it differs from the dense model by {u['start_gap']:.1e} bpc)",
              "", f"Python {res['python']}; {res['seconds']:.0f} s ({res['cpu_seconds']:.0f} s of CPU time)."]
    return "\n".join(lines)
