# %% [markdown]
# # Lesson 12 — Real patients
#
# **Difficulty** ★★★★☆ · **Prerequisites** lesson 03 (renormalised and Switch gates), lesson 07
# (a generalist of equal cost), lesson 09 (the MoE language model, hash routing, mutual
# information) · **Time** about 60 minutes
#
# Until now every patient was invented: the clinic's specialties were built into the data, and
# the clinic notes of lesson 09 came from a grammar whose topics touch only a few words. Good
# teaching data — made to show a point. Today **the clinic opens its doors to the public**:
# text that nobody here wrote, and nobody made easy.
#
# It ships with every Python, so nothing is downloaded: the **documentation** that `help()`
# shows (English prose) and the **standard library's source code** (Python), read from the
# Python that runs this notebook. A tiny MoE transformer — minimoe's own `MoELM`, every
# gradient by hand — learns to predict it one character at a time, and we ask the two
# questions the field asks of real MoE language models:
#
# 1. **Do sparse experts buy anything at equal cost?** The Switch Transformer (Fedus et al.
#    2021, Fig. 1) found that at a fixed compute per token the loss falls as experts are added.
# 2. **What do the experts learn?** Mixtral (Jiang et al. 2024, §5) found that expert choice
#    barely depends on the *domain* of the text (ArXiv, GitHub, PubMed, …) but follows
#    *token types* and syntax — `self` in Python, indentation — and that neighbouring tokens
#    often go to the same expert.
#
# Then we turn a trained dense model into an MoE without losing what it knows (**sparse
# upcycling**, Komatsuzaki et al. 2022). You will write: bits per character from the loss,
# the mutual information between experts and labels from real routing, Mixtral's
# "same expert for the next token" measure, and the upcycling copy.
#
# **Code to read alongside:** `minimoe/lm/text.py` (the corpus), `minimoe/lm/experiments.py`
# (the experiments), `minimoe/lm/routing.py` (reading the routing), `minimoe/lm/upcycle.py`.

# %% [markdown]
# **Quick mode.** With `QUICK = True` (the default) the notebook trains four small models for
# a few hundred steps — about a minute on 2 CPU cores — enough to *see* everything, too short
# to *conclude* much: at this length the models have only just passed the simplest baselines.
# For conclusions, the notebook also shows the **full run** of `python -m minimoe.lm` (ten
# minutes of CPU time: three seeds, 1,000 steps, E from 1 to 32, upcycling), whose tables
# and figures are in the repository's `figures/` folder, if it can find them. Set
# `QUICK = False` to train the notebook's own models for 1,000 steps too (a few minutes).
#
# **One BLAS thread.** The matrices are small; as in lesson 09, the cell after the imports
# limits numpy's BLAS to one thread (with `threadpoolctl`, if installed).

# %%
try:  # the course's packages; if one is missing, say how to install them all
    import minimoe, matplotlib  # noqa: E401, F401
except ModuleNotFoundError as missing:
    raise ModuleNotFoundError(f"{missing.name} is not installed for this kernel: install the course with "
                              f"`pip install -r requirements.txt` in the repository (or `pip install "
                              f"'minimoe[course]'`), then restart the kernel") from None
if getattr(minimoe, "__file__", None) is None:  # a folder named minimoe (a clone, from its parent), not the package
    raise ImportError(f"`import minimoe` found the folder {next(iter(minimoe.__path__), '?')}, not the minimoe "
                      f"package (which is not installed for this kernel): start Jupyter inside the clone or in "
                      f"my-lessons/, or install the course with `pip install -r requirements.txt` in the "
                      f"repository, then restart the kernel")
QUICK = True

# %%
import json
import math
import os

import numpy as np
import matplotlib.pyplot as plt

from minimoe.course import viz
from minimoe.figures import default_dir
from minimoe.lm import experiments, routing, text
from minimoe.lm.upcycle import upcycle
from minimoe.checks import lesson12 as check

# %%
try:                                                     # small matrices: one BLAS thread is faster
    from threadpoolctl import threadpool_limits
    _blas_limit = threadpool_limits(limits=1, user_api="blas")
except ImportError:                                      # threadpoolctl is optional
    pass

# %% [markdown]
# ## 1. The waiting room
#
# `text.load_text()` reads both domains from this Python: every documentation page and every
# top-level module of the standard library is one **document**. Each document goes whole to
# the training, validation or test split (by a hash of its name), so the test text comes from
# pages and modules the models never saw. The numbers depend on the Python version, which is
# recorded with every result:

# %%
corpus = text.load_text()
print(f"Python {corpus.python}")
for domain, sizes in corpus.sizes().items():
    names = {s: len(corpus.split(s, domain).names) for s in text.SPLITS}
    print(f"{domain:>5}: " + ", ".join(f"{s} {n:,} characters in {names[s]} documents" for s, n in sizes.items()))

# %% [markdown]
# Characters are the tokens: the 95 printable ASCII characters, the newline, and one token
# for anything else (curly quotes and dashes are read as their ASCII forms first), so the
# vocabulary has $V = 97$ entries. Each character also carries a **type** — the answer key we
# will hold the experts against:

# %%
line = text.encode('    def area(self, r):\n        return 3.14 * r**2  # "pi r squared"\n')
types = text.char_types(line)
for start in (0, 23):
    print("".join(f"{c!r:>6}" for c in text.decode(line[start:start + 12])))
    print("".join(f"{text.TYPE_NAMES[t][:6]:>6}" for t in types[start:start + 12]))

# %% [markdown]
# ## 2. Bits per character
#
# The model's loss is the mean cross-entropy of the next character, in **nats** (natural
# logarithms). Text compression counts in **bits**: one bit is $\ln 2 \approx 0.693$ nats, so
#
# $$\text{bits per character} = \frac{\text{loss in nats per character}}{\ln 2}.$$
#
# A model that guesses uniformly among 97 characters scores $\log_2 97 \approx 6.6$ bits; one
# that knows only how often each character occurs (the *unigram* baseline) about 4.5 here;
# one that looks one character back (the *bigram* baseline) about 3.5.
#
# ### Exercise 1 — bits per character over batches
#
# An evaluation runs the text in batches and gets one mean loss per batch. The last batch is
# often shorter. Pool them correctly.

# %%
def bits_per_char(losses, counts):
    """Bits per character over several batches.

    Args:
        losses: (n,) mean cross-entropy of each batch, in nats per character.
        counts: (n,) characters scored in each batch.

    Returns:
        a float: the mean over all characters, in bits.
    """
    ### BEGIN SOLUTION
    losses, counts = np.asarray(losses, dtype=float), np.asarray(counts, dtype=float)
    return float(np.sum(losses * counts) / np.sum(counts) / np.log(2))
    ### END SOLUTION


# %%
check.bits_per_char(bits_per_char)

# %% [markdown]
# ## 3. Dense against sparse at equal cost
#
# Two models with the same embedding, attention and readout ($d = 64$, 4 heads, 2 blocks,
# windows of 64 characters), differing only in their feed-forward layers:
#
# * the **MoE** is Switch-style: 8 experts of width 128, **top-1** with the Switch gate (so the
#   router learns even with $k = 1$, lesson 03) and the Switch balancing loss;
# * the **dense** model has one FFN whose width is the smallest that costs *at least* as much
#   as the MoE's router + one expert + gate (lesson 07's rule):
#   $4d\,h_\text{dense} \ge 4dh + 2dE + 2d$, so $h_\text{dense} = 133$.
#
# Both are trained with Adam on the same batches (half prose, half code windows) for the
# same number of steps, and scored on the test documents:

# %%
CFG = experiments.QUICK if QUICK else experiments.FULL
CFG = dict(CFG, steps=200 if QUICK else 1000, upcycle_steps=100 if QUICK else 500)
sets = {"val": experiments.eval_sets(corpus, "val", CFG, CFG["eval_windows"]),
        "test": experiments.eval_sets(corpus, "test", CFG, CFG["test_windows"])}
baselines = {d: dict(zip(("unigram", "bigram"), experiments.baseline_bpc(corpus.split("train", d).ids, x, y)))
             for d, (x, y, _) in sets["test"].items()}
runs, rows = {}, []
for kind in ("dense", "moe", "hash"):
    model = experiments.build_model(kind, CFG, seed=1000)
    runs[kind] = experiments.train_text_lm(model, corpus, CFG, CFG["steps"], seed=0, val_sets=sets["val"])
    rows.append({"kind": kind, "seed": 0, "test": experiments.evaluate_bpc(model, sets["test"]),
                 "curve": {"steps": runs[kind].steps, "val_mean": [v["mean"] for v in runs[kind].val]}})
b = {k: np.mean([v[k] for v in baselines.values()]) for k in ("unigram", "bigram")}
print(f"{CFG['steps']} steps of {CFG['batch_size']} windows of {CFG['seq_len']} characters.   "
      f"baselines (mean of prose and code): unigram {b['unigram']:.2f} bpc, bigram {b['bigram']:.2f} bpc")
for r in rows:
    m = runs[r["kind"]].model
    print(f"{r['kind']:>5}: test {r['test']['mean']:.3f} bpc (prose {r['test']['prose']:.3f}, code "
          f"{r['test']['code']:.3f})   {m.n_params:>7,} parameters, {m.n_active_params:,} active, "
          f"{m.flops_per_token(m.max_len):,} FLOPs per character")
fig = viz.plot_dense_vs_sparse([r for r in rows if r["kind"] != "hash"], baselines,
                               title=f"Dense against sparse at equal FLOPs ({CFG['steps']} steps, one seed)")
plt.show()

# %% [markdown]
# The MoE has almost four times the parameters for the same FLOPs per character (the hash-routed
# model, trained alongside for section 4, has the MoE's shape with a fixed router). In the
# quick run, after a couple of hundred steps, all three models are far below the unigram
# baseline but only about level with the bigram one, and within a tenth of a bit of each
# other — a race this short, with one seed, cannot say which architecture is better. So here
# is the full run, if the repository's `figures/` holds it:

# %%
full_path = os.path.join(default_dir(), "lm_realtext.json")
full = None
if os.path.exists(full_path):
    with open(full_path, encoding="utf-8") as f:
        full = json.load(f)
    print(experiments.format_tables(full, markdown=False))
    fig = viz.plot_loss_vs_experts(full["sweep"], dense=next((r["params"], r["test"]["mean"]) for r in full["compare"]
                                                             if r["kind"] == "dense"))
    plt.show()
else:
    print(f"No full run at {full_path}: run `python -m minimoe.lm --out {default_dir()}` (ten minutes of CPU "
          f"time) to see it here.")

# %% [markdown]
# **What the full run shows** (Python 3.11.7, 1,000 steps of 1,024 characters, three seeds;
# `figures/lm_realtext.md` has every number):
#
# * **At equal FLOPs the MoE wins, by a little.** Over three seeds its test loss is lower than
#   the dense model's on prose and on code, and on average by more than the seeds' spread:
#   2.69 ± 0.02 against 2.75 ± 0.04 bits per character, about 0.06 bits for four times the
#   parameters.
# * **More experts at fixed compute help, at first.** From E = 1 to E = 4 the loss falls by
#   about 0.09 bits, as in the Switch Transformer's Fig. 1; at 8, 16 and 32 experts it stays
#   within a few hundredths of E = 4, no more than one seed's noise. With top-1 routing each
#   of many experts sees only a small share of the million characters — too few to use its
#   parameters.
# * **The hash-routed model beats them all**: 2.56 bits, 0.15 below the learned MoE of the
#   same shape. Sending each character to a fixed expert gives every expert a consistent set
#   of characters from the first step, while a learned router must find its assignment as the
#   experts change under it (its noise and balancing loss keep it moving). Roller et al.
#   (2021) found hash layers competitive with learned routing; at this scale hashing wins.
# * **Upcycling** (section 5): 500 steps after upcycling, the upcycled model is ahead of the
#   dense model trained on (2.50 against 2.55 bits), at 1.4 times its FLOPs — but an MoE of
#   the same shape trained from scratch for the same 1,500 steps is far ahead of both (2.36).
#   A dense model trained for only 1,000 steps has little head start to give; Komatsuzaki et
#   al.'s gains are for dense models trained long and upcycled for a fraction of that budget.
#
# All of these are statements about *this* budget: every curve is still falling steeply at
# the last step. The Switch Transformer's curves come from models a thousand times larger
# trained a thousand times longer; ours are the same experiments at a size that fits on a laptop.
#
# ## 4. What the experts learn
#
# `routing.route_windows` runs a model over the test windows and records, for every block,
# the experts each character was sent to — an array `experts (W, S, k)` per block, $-1$
# where capacity dropped an assignment (no capacity limit here, so none). For Mixtral's
# question we need the mutual information of lesson 09 between the expert and a label —
# the character's **domain** (prose or code) or its **type** — now straight from the
# routing rather than from a count table.
#
# ### Exercise 2 — I(expert; label) from real routing
#
# Count every kept (token, expert) assignment: with $k$ experts per token, a token's label
# appears once per kept expert. Then
# $I = \sum_{e,\ell} p(e,\ell) \log \frac{p(e,\ell)}{p(e)\,p(\ell)}$ in nats, as in lesson 09.
# Vectorised: no loop over tokens.

# %%
def expert_label_information(experts, labels):
    """I(expert; label) in nats over every kept assignment.

    Args:
        experts: (N, k) int, the experts of each of N tokens; -1 where an assignment was dropped.
        labels: (N,) int >= 0, a label of each token (its domain, its type, ...).

    Returns:
        a float >= 0.
    """
    ### BEGIN SOLUTION
    kept = experts >= 0
    e = experts[kept]
    lab = np.broadcast_to(labels[:, None], experts.shape)[kept]     # each token's label, once per kept expert
    counts = np.zeros((e.max() + 1, lab.max() + 1))
    np.add.at(counts, (e, lab), 1)
    p = counts / counts.sum()
    outer = p.sum(axis=1, keepdims=True) * p.sum(axis=0, keepdims=True)
    nz = p > 0
    return float(np.sum(p[nz] * np.log(p[nz] / outer[nz])))
    ### END SOLUTION


# %%
check.expert_label_information(expert_label_information)

# %% [markdown]
# minimoe's `routing.expert_information` computes the same for a routed model, with the
# labels' entropies: $I/H$ is the share of a label's uncertainty that knowing the expert
# removes. Lesson 09's lesson applies: a routing that is a **fixed function of the current
# character** reveals its type for free (a character determines its type), so the learned
# router must be held against the **hash-routed** model, whose "router" is a random function
# of the character:

# %%
models = {"learned": runs["moe"].model, "hash": runs["hash"].model}
routed = {name: routing.route_windows(m, [(x, t, i) for i, (x, _, t) in enumerate(sets["test"].values())])
          for name, m in models.items()}
info_rows = []
for name, r in routed.items():
    for layer in range(r.experts.shape[0]):
        info = routing.expert_information(r, layer)
        first = r.experts[layer][..., 0]
        info_rows.append({"model": name, "layer": layer, **info,
                          "same_next": dict(zip(text.DOMAINS, routing.same_expert_fraction(first, r.domain))),
                          "same_chance": dict(zip(text.DOMAINS, routing.chance_same_expert(
                              first, r.domain, r.n_experts[layer])))})
        print(f"{name:>7}, block {layer}:  I(expert; domain) {info['mi_domain']:.3f} nats "
              f"({100 * info['frac_domain']:4.1f}% of H)   I(expert; type) {info['mi_type']:.3f} nats "
              f"({100 * info['frac_type']:4.1f}% of H)")

# %% [markdown]
# In every block of both models the expert says several times more about the character's
# **type** than about the text's **domain** — Mixtral's finding, at our scale. And the hash
# router, which never looks at the text, reveals about as much about the type as the learned
# router's first block, and more than its second: much of the "specialisation in types" comes
# from routing being a function of the current character. (The hash model's two blocks use
# the same hash, so they route alike.)
#
# ### Exercise 3 — does the next character go to the same expert?
#
# Mixtral measured how often consecutive tokens are sent to the same expert (their Table 5),
# against what chance would give. Here: for windows of characters, the share of pairs of
# neighbours (inside a window) whose **first-choice** expert is the same, per domain. Leave
# out the pairs where either choice was dropped ($-1$). Vectorised: compare two shifted
# views of the array at once.

# %%
def same_expert_fraction(first, domain):
    """Share of neighbouring characters with the same first-choice expert, per domain.

    Args:
        first: (W, S) int, the first-choice expert of each character of W windows; -1 if dropped.
        domain: (W,) int in {0, 1}, the domain of each window (0 prose, 1 code).

    Returns:
        (2,) float: the share for prose and for code.
    """
    ### BEGIN SOLUTION
    valid = (first[:, :-1] >= 0) & (first[:, 1:] >= 0)           # both neighbours were routed
    same = (first[:, :-1] == first[:, 1:]) & valid
    pairs = np.bincount(domain, weights=valid.sum(axis=1), minlength=2)
    return np.bincount(domain, weights=same.sum(axis=1), minlength=2) / pairs
    ### END SOLUTION


# %%
check.same_expert_fraction(same_expert_fraction)

# %% [markdown]
# Chance here is $\sum_e p_e^2$: the share of pairs that would share an expert if each
# character's expert were drawn independently from the domain's load (the reference for
# Mixtral's numbers too, with a balanced load: $1/E$). minimoe's `routing.same_expert_fraction`
# and `routing.chance_same_expert`, for both models:

# %%
for r in info_rows:
    print(f"{r['model']:>7}, block {r['layer']}:  same expert next — prose {r['same_next']['prose']:.2f} "
          f"(chance {r['same_chance']['prose']:.2f}), code {r['same_next']['code']:.2f} "
          f"(chance {r['same_chance']['code']:.2f})")
fig = viz.plot_domain_vs_type(info_rows, title=f"What the expert reveals ({CFG['steps']} steps)")
plt.show()

# %% [markdown]
# In code, neighbouring characters go to the same expert more often than chance in every
# block of both models — about twice as often for the learned router: code has long runs of
# one type (indentation, names) and a router that follows types keeps a run with one expert.
# The hash router shows it too, since a run of spaces is one character repeated. In prose,
# whose runs are shorter, the share is lower than in code in every block.
#
# Now the picture to remember (Mixtral's Fig. 8): a paragraph of documentation and a
# function of library code, from the test split, each character on the colour of its
# first-choice expert in the learned model's last block:

# %%
snips = text.snippets(corpus)
last = len(models["learned"].blocks) - 1
panels = {f"{'documentation' if d == 'prose' else 'library code'} ({name})":
          (snippet, routing.route_snippet(models["learned"], text.encode(snippet), layer=last))
          for d, (name, snippet) in snips.items()}
fig = viz.plot_expert_text(panels, CFG["n_experts"], width=76,
                           title=f"Each character coloured by its expert (block {last}, {CFG['steps']} steps)")
plt.show()
if full is not None:
    E = full["config"]["n_experts"]
    full_last = full["config"]["n_layers"] - 1
    fig = viz.plot_expert_text({n: (v["text"], v["experts"]) for n, v in full["expert_text"].items()
                                if v["layer"] == full_last}, E, width=76,
                               title=f"The full run's model (block {full_last}, {full['config']['steps']} steps)")
    plt.show()

# %% [markdown]
# Read the colours against the table above: does indentation keep one colour? Do the letters
# inside a name? Does the same character get the same colour in the documentation and in the
# code — and where it does not, what is different about its context? (The HTML version of the
# full run's picture, for both blocks, is `figures/lm_expert_text.html`.)
#
# ## 5. Sparse upcycling
#
# Training an MoE from scratch throws away any dense model you already have. Komatsuzaki et
# al. (2022) start the MoE *from* it: each block's dense FFN becomes $E$ experts that are all
# **copies** of it, behind a new router; everything else is kept. With all experts equal,
#
# $$y = \sum_{e \in \text{top-}k} G_e\, \mathrm{FFN}_e(x) = \Big(\sum_{e \in \text{top-}k} G_e\Big)\,\mathrm{FFN}(x),$$
#
# so a gate whose weights sum to 1 — top-$k$ renormalised — computes **exactly** the dense
# FFN, whichever experts are chosen. A zero router makes every expert equally likely at first,
# and the router's noise (σ = softplus(0) ≈ 0.69, lesson 04) sends tokens to random copies,
# which then learn from different tokens and drift apart.
#
# ### Exercise 4 — the upcycling copy
#
# Return the parameters of an MoE layer (the names of `MoELayer.params`) whose experts are
# copies of the dense FFN, with a zero router. Real copies, please: training one expert must
# not move the others.

# %%
def upcycle_ffn(params, n_experts):
    """An MoE layer's parameters made from one dense FFN.

    Args:
        params: the dense FFN, {"W1" (d, h), "b1" (h,), "W2" (h, d), "b2" (d,)}.
        n_experts: E.

    Returns:
        {"W_gate" (d, E) zeros, "W_noise" (d, E) zeros,
         "W1" (E, d, h), "b1" (E, h), "W2" (E, h, d), "b2" (E, d)}: expert e is a copy of the FFN.
    """
    ### BEGIN SOLUTION
    d = params["W1"].shape[0]
    out = {"W_gate": np.zeros((d, n_experts)), "W_noise": np.zeros((d, n_experts))}
    for key in ("W1", "b1", "W2", "b2"):
        out[key] = np.repeat(params[key][None], n_experts, axis=0)    # a new (E, ...) array
    return out
    ### END SOLUTION


# %%
check.upcycle_ffn(upcycle_ffn)

# %% [markdown]
# minimoe's `upcycle` does this for every block of a trained dense `MoELM`. Top-2 of 8
# copies with the renormalised gate starts where the dense model is — exactly, up to the
# rounding of float32 (about $10^{-6}$), in which these models run; the Switch gate keeps the
# chosen softmax probabilities, $1/E$ each with a zero router, and so starts with every FFN
# output shrunk $E/k$-fold, logits changed by whole units:

# %%
dense = runs["dense"].model
x_val, y_val, _ = sets["val"]["code"]
want = dense.forward(x_val[:8], train=False)
for gate in ("topk", "switch"):
    moe = upcycle(dense, CFG["upcycle_experts"], k=CFG["upcycle_k"], gate=gate, rng=2000)
    gap = np.abs(moe.forward(x_val[:8], train=True) - want).max()
    print(f"gate={gate!r:<9} largest change of any logit at the start (training mode, noise on): {gap:.1e}")

# %% [markdown]
# Now train on: the upcycled model, and the dense model itself for the same extra steps
# (its Adam state kept), on the same batches. The upcycled model has twice the FFN compute
# per character (top-2 of copies of the whole FFN) — upcycling buys a head start, not a free
# lunch:

# %%
S, U = CFG["steps"], CFG["upcycle_steps"]
up = upcycle(dense, CFG["upcycle_experts"], k=CFG["upcycle_k"], gate="topk", rng=2000, balance="switch",
             balance_coef=CFG["balance_coef"])
start = experiments.evaluate_bpc(up, sets["val"])["mean"]
up_run = experiments.train_text_lm(up, corpus, CFG, U, seed=100, val_sets=sets["val"], step0=S)
on_run = experiments.train_text_lm(dense, corpus, CFG, U, seed=100, val_sets=sets["val"], step0=S,
                                   optimizer=runs["dense"].optimizer,
                                   history=experiments.Run(dense, runs["dense"].optimizer, [], [], []))
curves = {"dense (first steps)": rows[0]["curve"],
          "dense, trained on": {"steps": [S] + on_run.steps,
                                "val_mean": [rows[0]["curve"]["val_mean"][-1]] + [v["mean"] for v in on_run.val]},
          "upcycled": {"steps": [S] + up_run.steps, "val_mean": [start] + [v["mean"] for v in up_run.val]}}
print(f"validation bpc at step {S}: dense {rows[0]['curve']['val_mean'][-1]:.3f}, upcycled {start:.3f}")
print(f"after {U} more steps:       dense {on_run.val[-1]['mean']:.3f}, upcycled {up_run.val[-1]['mean']:.3f}   "
      f"(FLOPs per character: dense {dense.flops_per_token(dense.max_len):,}, "
      f"upcycled {up.flops_per_token(up.max_len):,})")
fig = viz.plot_upcycling({"curves": curves}, baselines)
plt.show()

# %% [markdown]
# The upcycled model starts at the dense model's loss — nothing it knew was lost. In the quick
# run it then falls a little behind the dense model trained on (by a few hundredths of a bit
# after 100 steps): it starts with a fresh Adam, whose first steps have full size in every
# weight, attention and embeddings included, while the dense model keeps its optimizer's
# state; and its experts only begin to differ once the noise has sent them different
# characters. The full run (section 3, and its table "after upcycling") follows all three —
# the dense model trained on, the upcycled model, and an MoE of the same shape trained from
# scratch for the same total steps — for 500 steps.
#
# ## Questions to think about
#
# 1. The MoE has four times the dense model's parameters at the same FLOPs per character.
#    Why can it not use them all after a thousand steps, and which would you grow — steps,
#    data or experts — to see the Switch Transformer's gap?
# 2. The hash router reveals as much about the character type as the learned one. What
#    measurement would show that the learned router has learned *something* the hash
#    router cannot (think of context: the same character in two roles)?
# 3. In the coloured text, which runs of one colour would you expect in *any* router that
#    follows the current character? Which would surprise you?
# 4. Why does the Switch gate spoil the exact start of upcycling, and how would you rescale
#    the copies to repair it for a zero router? Would the repair still be exact once the
#    router has learned?
# 5. Upcycling gives the MoE the dense model's knowledge for free, but every character now
#    pays for k experts. When is that trade worth it?

# %% [markdown]
# ### BEGIN SOLUTION
# **Some answers.**
# 1. Top-1 routing gives each expert about 1/E of the characters, so each expert has seen
#    only about a million / 8 characters: its parameters are far from used. Growing the
#    *training* (steps × batch) lets every expert see enough; growing E further only thins
#    each expert's share (the sweep flattens). The Switch Transformer's gaps appear at
#    billions of tokens.
# 2. Split a character type by context: e.g. the I(expert; type) *within* one character (a
#    space at the start of a line vs inside a sentence; a quote that opens or closes), or the
#    mutual information with a label the current character cannot give away, such as the
#    domain of the same character (a `(` in prose vs in code). A hash router has zero
#    information beyond the character by construction.
# 3. Runs of spaces (indentation), of letters inside one word or name, of digits: any
#    character-following router colours them alike. A change of colour *inside* a run of the
#    same character, or the same character coloured differently in prose and code, would
#    show the router reading context.
# 4. The Switch gate's weights sum to the top-k probabilities, k/E with a zero router, so
#    every FFN output is multiplied by k/E. Scaling W2 and b2 of every copy by E/k repairs the
#    start exactly — but only while the router stays uniform; once its probabilities move,
#    the sum of the chosen ones changes per token and the model is no longer the dense one
#    (which is fine: it is learning).
# 5. When the dense model already exists and the extra compute per token is affordable: the
#    upcycled model starts from a trained network instead of a random one, which saves most
#    of the steps an MoE from scratch needs to catch up; if compute per token is the
#    constraint, a top-1 upcycling (with the k = 1 trap in mind) or fewer, smaller experts.
# ### END SOLUTION

# %%
check.progress()
