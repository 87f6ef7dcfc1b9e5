# %% [markdown]
# # Lesson 09 — Beyond the GP
#
# **Difficulty** ★★★★☆ · **Prerequisites** lesson 03 (top-k), lesson 05 (balancing losses, CV),
# lesson 06 (capacity, dropped tokens), lesson 08 (hash routing, mutual information) ·
# **Time** about 75 minutes
#
# For eight lessons the clinic has worked one way: a GP reads each patient's symptoms, refers
# them to $k$ specialists, a balancing loss keeps the referrals fair, and full appointment
# books turn the overflow away. Since the Switch Transformer, MoE research has questioned
# every part of that picture. This lesson builds four of the answers and then leaves the
# clinic for a language model:
#
# 1. **Hash routing** (Roller et al. 2021) — a receptionist with a fixed list who never reads
#    the chart (lesson 08): the baseline every learned router must beat.
# 2. **Expert choice** (Zhou et al. 2022) — the referral turned around: *the specialists pick
#    their patients from the waiting room*. Every specialist is exactly full; some patients
#    are picked by several, some by none.
# 3. **Loss-free balancing** (Wang et al. 2024, used in DeepSeek-V3) — no balancing loss at
#    all: *the receptionist quietly nudges the GP's referral list* until the work evens out.
# 4. **Shared and fine-grained experts** (DeepSeekMoE, Dai et al. 2024) — an always-on
#    *family doctor* for what every patient needs, plus many narrow specialists, at the same
#    cost per visit.
#
# You will write expert choice's selection and its backward, the loss-free bias update, a
# routing report, and the mutual information between experts and labels; compare every
# router on the same clinic; then put the specialists inside a transformer, train a tiny MoE
# language model on synthetic clinic notes, let it write, and ask what its experts learned.
#
# **Code to read alongside:** `minimoe/beyond/hash_router.py`, `minimoe/beyond/expert_choice.py`,
# `minimoe/beyond/lossfree.py`, `minimoe/beyond/shared_experts.py`, `minimoe/lm/transformer.py`
# (`MoETransformerBlock`), `minimoe/lm/model.py` (`MoELM`), `minimoe/lm/train.py` (`quick_lm`,
# `sample`, `expert_usage`) and `minimoe/lm/corpus.py` (the clinic notes).

# %% [markdown]
# **Quick mode.** With `QUICK = True` (the default) the notebook runs in under a minute on 2
# CPU cores (about 25 seconds when the machine is idle, longer when it is shared): one seed per
# clinic and the small language model of `lm_train.QUICK` (4 experts, 150 steps). Set
# `QUICK = False` for the full version — three seeds per clinic, language models with 8 experts
# trained for 1,000 steps on more notes, and every router kind inside the language model —
# which takes a few minutes.
#
# **One BLAS thread.** Every matrix here is small (at most a few thousand rows of width 32).
# For such matrices a multi-threaded BLAS spends more time waking and synchronising its
# threads than multiplying, and on a shared 2-core machine its threads fight the other
# programs for the cores: the cell after the imports limits numpy's BLAS to one thread (with
# `threadpoolctl`, if installed), which made this notebook several times faster on a busy
# machine and no slower on an idle one.

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
import math

import numpy as np
import matplotlib.pyplot as plt

from minimoe.lm import corpus

from minimoe import gradcheck, router

from minimoe.course import viz
from minimoe.clinic.data import Split, make_clinic
from minimoe.beyond.expert_choice import ExpertChoiceMoELayer
from minimoe.beyond.hash_router import HashMoELayer
from minimoe.core.layers import softmax
from minimoe.lm.train import expert_usage, quick_lm, sample
from minimoe.beyond.lossfree import LossFreeMoELayer
from minimoe.clinic.models import Clinic
from minimoe.core.moe import MoELayer
from minimoe.beyond.shared_experts import SharedExpertMoELayer
from minimoe.clinic.train import evaluate, train
from minimoe.lm.transformer import MoETransformerBlock
from minimoe.checks import lesson09 as check

# %%
try:                                                     # small matrices: one BLAS thread is faster
    from threadpoolctl import threadpool_limits
    _blas_limit = threadpool_limits(limits=1, user_api="blas")
except ImportError:                                      # threadpoolctl is optional
    pass

# %% [markdown]
# ## 1. The specialists pick their patients: expert choice
#
# Token choice — every router so far — lets each *patient* pick $k$ specialists. Nothing
# stops a popular specialist from being picked by half the waiting room, which is why we
# needed balancing losses (lesson 05) and turned patients away (lesson 06).
#
# Zhou et al. (2022, *Mixture-of-Experts with Expert Choice Routing*) turn the referral
# around. The GP still scores every (patient, specialist) pair,
#
# $$S = \mathrm{softmax}(x W_\text{gate}) \qquad (T, E),$$
#
# but now each **specialist walks into the waiting room with its column** $S_{:,e}$ and takes
# the $C$ patients it scores highest, with the affinity as the gate:
#
# $$I_e = \mathrm{TopC}(S_{:,e}), \qquad G_{e,c} = S_{I_{e,c},\, e}, \qquad
#   C = \Big\lceil \text{capacity\_factor}\cdot \frac{T k}{E} \Big\rceil .$$
#
# Every specialist is **exactly full** by construction — no balancing loss, no overflow. On
# average a patient is seen by $k \cdot$ capacity_factor specialists, the compute of top-$k$
# token choice. But the average hides the spread: a patient every specialist likes may be
# picked by several, and one nobody likes by **none** (its MoE output is 0, and the residual
# connection carries it on, like a dropped token).
#
# ### Exercise 1 — each specialist picks its patients
#
# Vectorised: one sort of the rows of $S^\top$, no loop over tokens (`np.argsort` sorts
# ascending; `np.take_along_axis` gathers along an axis).
#
# *Loops (the course's rule):* no Python loop over tokens — the check runs your function at two
# numbers of tokens and counts the Python lines it executes, which must not grow; loops over
# experts, choices or ranks are fine.

# %%
def expert_choice_select(S, C):
    """Each expert's C best tokens.

    Args:
        S: (T, E) affinities, S[t, e] = how well token t suits expert e.
        C: tokens per expert, 1 <= C <= T.

    Returns:
        idx: (E, C) int, the tokens expert e picked (best first).
        gates: (E, C), gates[e, c] = S[idx[e, c], e].
    """
    ### BEGIN SOLUTION
    idx = np.argsort(-S.T, axis=1)[:, :C]                # rank each expert's column, keep the top C
    gates = np.take_along_axis(S.T, idx, axis=1)         # the affinity of each pick
    return idx, gates
    ### END SOLUTION


# %%
check.expert_choice_select(expert_choice_select)

# %% [markdown]
# Eight patients, four specialists, $k = 1$ and capacity factor 1, so each specialist takes
# $C = \lceil 8 \cdot 1/4 \rceil = 2$ (minimoe's reference `check.expert_choice_select_ref`
# from here on):

# %%
rng = np.random.default_rng(3)
S_demo = softmax(1.5 * rng.standard_normal((8, 4)))
idx_demo, gates_demo = check.expert_choice_select_ref(S_demo, 2)
for e in range(4):
    print(f"specialist {e} picks patients {idx_demo[e].tolist()}  (gates {np.round(gates_demo[e], 2).tolist()})")
seen_by = np.bincount(idx_demo.ravel(), minlength=8)
print("specialists per patient:", seen_by.tolist(), "  nobody picked patients",
      np.flatnonzero(seen_by == 0).tolist())

# %% [markdown]
# ## 2. How the GP still learns
#
# The combine adds every pick's answer into its patient's row,
#
# $$y_t = \sum_{(e,c):\ I_{e,c} = t} G_{e,c}\; \mathrm{FFN}_e(x_t) .$$
#
# (One numpy trap: `y[idx.ravel()] += ...` adds only *once* per repeated index, and in
# expert choice the same patient can appear in several specialists' lists. minimoe loops
# over the specialists — within one list the patients are distinct — or `np.add.at` adds
# every repeat.) Write $y^g_{e,c} = \mathrm{FFN}_e(x_{I_{e,c}})$, stored $(E, C, d)$. Reading
# the sum backwards, for an upstream gradient $dy$ $(T, d)$:
#
# $$dy^g_{e,c} = G_{e,c}\, dy_{I_{e,c}}, \qquad dG_{e,c} = \big\langle dy_{I_{e,c}},\ y^g_{e,c}\big\rangle,
#   \qquad dS_{I_{e,c},\, e} = dG_{e,c} \ \ (0 \text{ where nobody picked}).$$
#
# The *selection* $I$ is piecewise constant and carries no gradient (a finite difference
# that changes a specialist's list crosses a kink, lesson 04); the router learns only through
# the gate values, and from $dS$ the softmax backward of lesson 02 takes it to $W_\text{gate}$.
#
# ### Exercise 2 — the combine backward
#
# `dy[idx]` gathers an $(E, C, d)$ block in one step; a pair of index arrays
# `dS[rows, cols] = values` scatters (each (patient, specialist) pair appears once).
#
# *Loops (the course's rule):* no Python loop over tokens — the check runs your function at two
# numbers of tokens and counts the Python lines it executes, which must not grow; loops over
# experts, choices or ranks are fine.

# %%
def expert_choice_combine_backward(dy, yg, gates, idx):
    """Backward of y[t] = sum over picks (e, c) of t of gates[e, c] * yg[e, c].

    Args:
        dy: (T, d) upstream gradient.  yg: (E, C, d) the experts' answers, pick by pick.
        gates: (E, C).  idx: (E, C) int, the picked tokens.

    Returns:
        dyg: (E, C, d), the gradient for the experts' answers.
        dS: (T, E), the gradient for the affinities (zero where expert e did not pick t).
    """
    ### BEGIN SOLUTION
    T, E = dy.shape[0], idx.shape[0]
    dy_picks = dy[idx]                                   # (E, C, d): each pick's token gradient
    dyg = gates[..., None] * dy_picks
    dS = np.zeros((T, E))
    dS[idx, np.arange(E)[:, None]] = np.sum(dy_picks * yg, axis=-1)
    return dyg, dS
    ### END SOLUTION


# %%
check.expert_choice_combine_backward(expert_choice_combine_backward)

# %% [markdown]
# minimoe's `ExpertChoiceMoELayer` is this selection and backward around the expert bank of
# lesson 01. Its whole gradient — the router through the gates, the experts, the input —
# passes the finite-difference check (the checker watches for a nudge that changes any
# specialist's list):

# %%
ec_layer = ExpertChoiceMoELayer(d_model=6, d_hidden=5, n_experts=4, k=2, rng=np.random.default_rng(0))
reports = gradcheck.check_layer(ec_layer, np.random.default_rng(1).standard_normal((10, 6)))
print(f"expert choice, all parameters and x: worst normwise relative error "
      f"{max(r.normwise for r in reports):.1e} (the pass line: 1e-8, plus the finite difference's own error)")
print("load:", ec_layer.stats["load"].tolist(), "  specialists per patient:",
      ec_layer.stats["experts_per_token"].tolist())

# %% [markdown]
# ### The catch: a specialist who reads ahead
#
# Which patients a specialist picks depends on **everyone in the waiting room** — in a
# language model, on every token of the batch, *including the later tokens of the same
# sentence*. A token-choice layer decides each token's referral from that token alone, so a
# causal transformer stays causal. Expert choice does not: change the *end* of a sentence and
# the specialists may pick differently for its *beginning*. Zhou et al. say so themselves;
# it is why decoder language models (which generate one token at a time, without a future to
# look at) mostly kept token choice. Two MoE transformer blocks, the same six tokens, then the
# last three replaced by tokens that outbid the first three:

# %%
x_seq = np.random.default_rng(4).standard_normal((1, 6, 8))
x_late = x_seq.copy()
x_late[:, 3:] = 5.0 * x_seq[:, :3]                       # later tokens the specialists like more
for kind, kw in (("moe", dict(k=1, noisy=False)), ("expert_choice", dict(k=1))):
    block = MoETransformerBlock(8, 2, kind, d_hidden=8, n_experts=4, rng=np.random.default_rng(5), **kw)
    change = np.abs(block.forward(x_late, train=False)[:, :3] - block.forward(x_seq, train=False)[:, :3]).max()
    print(f"{kind:>13}: change in the outputs of tokens 0-2 after editing tokens 3-5: {change:.2e}")

# %% [markdown]
# ## 3. The receptionist's nudge: loss-free balancing
#
# A balancing loss (lesson 05) works through the gradient, and that gradient *mixes with the
# task's*: a strong balance term pulls the GP away from the referrals that diagnose best.
# Wang et al. (2024, *Auxiliary-Loss-Free Load Balancing*) leave the objective alone. Each
# specialist gets a bias $b_e$ that is added to the GP's scores **only to decide who is
# chosen**:
#
# $$\text{idx}_t = \mathrm{TopK}(L_t + b,\ k), \qquad G_{te} = s_{te} \text{ for } e \in \text{idx}_t,
#   \qquad s = \mathrm{softmax}(L),\ L = x W_\text{gate}.$$
#
# The bias decides *who* sees the patient, never *how much* their advice weighs. After every
# training step the receptionist looks at the day's load and nudges each bias by a fixed step
# $\gamma$ against it (Algorithm 1):
#
# $$b_e \leftarrow b_e + \gamma \cdot \mathrm{sign}\big(\overline{\text{load}} - \text{load}_e\big).$$
#
# An overworked specialist becomes a little less attractive, an idle one a little more; one
# exactly at the mean is left alone. The bias is not a parameter: it has no gradient, the
# optimizer never sees it, and there is no auxiliary loss at all.
#
# ### Exercise 3 — the bias update
#
# *Loops (the course's rule):* no Python loop over tokens; this exercise has no token axis, so a
# loop over its few numbers is fine.

# %%
def bias_update(bias, load, rate):
    """One loss-free step.

    Args:
        bias: (E,) current biases.  load: (E,) tokens that chose each expert this step.
        rate: gamma >= 0, the size of every nudge.

    Returns:
        the new (E,) bias, a new array (don't change `bias` in place).
    """
    ### BEGIN SOLUTION
    load = np.asarray(load, dtype=float)
    return bias + rate * np.sign(load.mean() - load)
    ### END SOLUTION


# %%
check.bias_update(bias_update)

# %% [markdown]
# Watch the receptionist at work. A GP has collapsed: every patient walks in tired (lesson 05)
# and its scores favour specialists 0 and 1 for everyone, so with $k = 2$ the other six sit
# idle (load CV $= \sqrt 3 \approx 1.73$). Its weights are frozen; only the bias moves, by
# $\gamma = 0.02$ per step — **20 times the paper's** $u = 0.001$, so that 300 steps show the
# whole story (at the paper's rate each bias moves at most 0.3 in 300 steps; the cells just
# below run it for longer). Wang et al. add the bias to the *scores* $s$; for softmax
# scores minimoe adds it to the *logits* $L$ (it multiplies each probability by $e^{b}$). We
# try both (and DeepSeek-V3's sigmoid scores at the end of the section).

# %%
d, E, k = 8, 8, 2
rng = np.random.default_rng(0)
W_collapsed = 0.1 * rng.standard_normal((d, E))
tired = rng.standard_normal(d)
tired /= np.linalg.norm(tired)
W_collapsed[:, 0] += 3 * tired                           # everyone's scores favour experts 0 and 1
W_collapsed[:, 1] += 2 * tired


def steer(where, rate, steps=300, T=256, seed=1, score="softmax"):
    """Route fresh batches through the frozen GP, nudging the bias (on "logits" or "scores";
    the scores are softmax(L), or sigmoid(L) with score="sigmoid")."""
    rng = np.random.default_rng(seed)
    bias, cvs, history = np.zeros(E), [], []
    for _ in range(steps):                               # a loop over training steps
        L = (rng.standard_normal((T, d)) + 2 * tired) @ W_collapsed
        chooser = L if where == "logits" else softmax(L) if score == "softmax" else router.sigmoid(L)
        load = np.bincount(router.topk_indices(chooser + bias, k).ravel(), minlength=E)
        cvs.append(load.std() / load.mean())
        bias = check.bias_update_ref(bias, load, rate)
        history.append(bias)
    return {"cv": np.array(cvs), "bias": np.array(history)}


steering = {"no bias": {"cv": steer("logits", 0.0)["cv"], "bias": None},
            "bias on the logits (minimoe)": steer("logits", 0.02),
            "bias on the scores": steer("scores", 0.02)}
for name, run in steering.items():
    print(f"{name:<30} load CV: first step {run['cv'][0]:.2f}, mean of the last 100 steps "
          f"{run['cv'][-100:].mean():.2f}")
fig = viz.plot_bias_steering(steering)
plt.show()

# %% [markdown]
# On the logits, the bias walks down for the two busy specialists and up for the idle six
# until the load is nearly even — with the GP's weights untouched. On the scores, at this
# rate, it never settles: the whole waiting room swings from one group of specialists to
# another. Is that only the large step? At the paper's rate $\gamma = 0.001$, 20 times more
# steps give each bias the same distance to travel:

# %%
slow_runs = {where: steer(where, 0.001, steps=6000) for where in ("logits", "scores")}
slow = {where: run["cv"] for where, run in slow_runs.items()}
for where, cv in slow.items():
    print(f"γ = 0.001, bias on the {where:<7} load CV: mean of the last 1,000 of 6,000 steps "
          f"{cv[-1000:].mean():.2f}")

# %% [markdown]
# The slow receptionist gets the logit-scale load nearly even too, and the score scale stays
# far from balance: a smaller step shrinks the swings, not the problem. Why?
# What the bias competes with is how much the patients *differ*. Compare the spread of each
# specialist's logit and score across patients:

# %%
L = (np.random.default_rng(2).standard_normal((1000, d)) + 2 * tired) @ W_collapsed
print("spread over patients of the logits L:", np.round(L.std(axis=0), 2))
print("spread over patients of the scores s:", np.round(softmax(L).std(axis=0), 3))
print("mean score:                          ", np.round(softmax(L).mean(axis=0), 3))

# %% [markdown]
# Specialist 0's logit varies by about 3 from patient to patient — as much as the gaps
# between the specialists — so a bias of a few units sends away only the patients who like
# specialist 0 least, and lets each idle specialist take the patients who suit it best. On
# the score scale the idle specialists are squeezed together: their scores are about 0.015,
# differing between patients by a few hundredths, while the busy two sit near 0.8 and 0.1. A
# bias large enough to bring an idle specialist into anyone's top two is far larger than the
# differences between patients, so it brings it into *everyone's* top two at once — a
# receptionist who can only redirect the whole waiting room. That is why minimoe keeps the
# bias on the logits for softmax scores (`minimoe/beyond/lossfree.py` gives the measurements).
#
# ### DeepSeek-V3's rule: sigmoid scores
#
# DeepSeek-V3 (DeepSeek-AI 2024, §2.1.2, eq. 12–16) scores each specialist *on its own* with
# a sigmoid, adds the bias to those scores for the choice only, and divides the chosen
# **unbiased** scores by their sum, so that a patient's gates add up to 1:
#
# $$s_t = \sigma(L_t), \qquad \text{idx}_t = \mathrm{TopK}(s_t + b,\ k), \qquad
#   G_{te} = \frac{s_{te}}{\sum_{j \in \text{idx}_t} s_{tj}} \quad (e \in \text{idx}_t).$$
#
# That is `LossFreeMoELayer(score="sigmoid")` by default; `bias_on="logits"` keeps the older
# form (choose by $\mathrm{TopK}(L_t + b)$, gate by the raw $s$, no division). Choosing by
# $L + b$ never looks at the scores, so the logit run at the paper's rate above *is* that
# older rule for sigmoid scores too. The same collapsed GP, the same patients, the paper's
# rate $u = 0.001$, now with DeepSeek-V3's rule (2,000 steps: it needs far fewer):

# %%
def steps_to_balance(cv, below=0.25):
    """The first step (1, 2, ...) whose load CV is below `below`, or None if there is none."""
    hit = np.flatnonzero(np.asarray(cv) < below)
    return int(hit[0]) + 1 if hit.size else None


deepseek = steer("scores", 0.001, steps=2000, score="sigmoid")
race = {"sigmoid, bias on the scores (DeepSeek-V3)": deepseek["cv"],
        "sigmoid, bias on the logits": slow["logits"]}
for name, cv in race.items():
    n = steps_to_balance(cv)
    print(f"{name:<42} load CV below 0.25 after {'never' if n is None else f'{n:,}'} steps (of {len(cv):,})")
fig = viz.plot_balance_race(race, threshold=0.25)
plt.show()

# %% [markdown]
# Is the loop above really the library's layer? Give `LossFreeMoELayer` the collapsed GP's
# weights and each rule's final bias, and compare its choices and gates on new patients:

# %%
x_new = np.random.default_rng(3).standard_normal((256, d)) + 2 * tired
L_new = x_new @ W_collapsed
for bias_on, bias in (("scores", deepseek["bias"][-1]), ("logits", slow_runs["logits"]["bias"][-1])):
    layer = LossFreeMoELayer(d, 4, E, k=k, score="sigmoid", bias_on=bias_on, rng=np.random.default_rng(0))
    layer.params["W_gate"][...] = W_collapsed
    layer.bias = bias.copy()
    layer.forward(x_new, train=False)
    chooser = router.sigmoid(L_new) if bias_on == "scores" else L_new
    same = np.array_equal(np.sort(layer.stats["topk_idx"], axis=1),
                          np.sort(router.topk_indices(chooser + bias, k), axis=1))
    total = layer.stats["topk_gates"].sum(axis=1)
    print(f"bias_on={bias_on!r:<9} chooses as the loop does: {same}; a patient's gates sum to "
          f"{total.min():.3f} … {total.max():.3f}")

# %% [markdown]
# Why is DeepSeek-V3's rule so much faster here? Every step the receptionist lowers a busy
# specialist's bias by $u$ and raises an idle one's by $u$: the gap between them closes by
# $2u$ per step. How wide is the gap to close, on each scale?

# %%
gap_logits = (L[:, 0] - L[:, 2:].mean(axis=1)).mean()
gap_sigmoid = (router.sigmoid(L)[:, 0] - router.sigmoid(L)[:, 2:].mean(axis=1)).mean()
for name, gap in (("logits L", gap_logits), ("sigmoid scores s", gap_sigmoid)):
    print(f"mean gap between specialist 0 and an idle one, {name:<16} {gap:.2f}: "
          f"gap / 2u = {gap / 0.002:,.0f} steps")

# %% [markdown]
# On the sigmoid scale the gap is about 0.5 — an idle specialist's score sits near
# $\sigma(0) = 0.5$ and a busy one's can never pass 1, however collapsed the GP — so about 240
# steps; on the logit scale it is about 6, which takes about 3,200 steps: close to the
# measured 257 and 3,313. DeepSeek-V3's rule balances about 13× sooner, and the more the GP
# collapses the larger the logit gap grows while the sigmoid gap stays below 1. (Softmax scores
# are the opposite case, as above: a collapsed softmax squeezes every idle specialist's score
# towards 0 together, and the bias on those scores could only move the whole waiting room.)
# The bias on the scores changes who is chosen, never the gates: DeepSeek-V3's gates of each
# patient sum to 1, the older form's are the raw sigmoid scores.
#
# ## 4. The family doctor and the narrow specialists
#
# DeepSeekMoE (Dai et al. 2024) changes *which* experts there are, not how they are chosen:
#
# * **Fine-grained segmentation** (§3.1): cut each of the $E$ specialists (hidden width $h$)
#   into $m$ narrower ones (width $h/m$) and refer each patient to $m k$ of the $m E$ — the
#   same parameters, the same expert FLOPs, but far more ways to combine specialists, so each
#   can be narrower.
# * **Shared experts** (§3.2): $K_s$ experts see *every* patient with gate 1, no router —
#   the always-on **family doctor** who handles what everyone needs (grammar, frequent words),
#   so the routed specialists need not all learn it. To keep the cost, each patient gets
#   $K_s$ fewer routed referrals.
#
# $$y_t = \sum_{s=1}^{K_s} \mathrm{FFN}_s(x_t) + \sum_{e \in \mathrm{TopK}(t)} G_{te}\,\mathrm{FFN}_e(x_t).$$
#
# `SharedExpertMoELayer.fine_grained` converts a coarse design into the DeepSeekMoE one at the
# same expert compute. The books of the clinic's top-2-of-8 layer ($d = 16$, $h = 8$) and its
# fine-grained versions:

# %%
coarse = MoELayer(16, 8, 8, k=2, rng=np.random.default_rng(0))
designs = {"top-2 of 8 (width 8)": (coarse, 0)}
for m, s in ((2, 1), (4, 1)):
    layer = SharedExpertMoELayer.fine_grained(16, 8, 8, k=2, granularity=m, n_shared=s, rng=np.random.default_rng(0))
    designs[f"m = {m}: {s} shared + top-{layer.k} of {layer.n_experts} (width {layer.d_hidden})"] = (layer, s)
print(f"{'design':<42} {'parameters':>10} {'active':>7} {'FLOPs/token':>11} {'combinations':>13}")
for name, (layer, s) in designs.items():
    print(f"{name:<42} {layer.n_params:>10,} {layer.n_active_params:>7,} {layer.flops_per_token():>11,} "
          f"{math.comb(layer.n_experts, layer.k):>13,}")

# %% [markdown]
# The same expert work per patient (the FLOPs differ only by the GP's scores, $2dE$ for more,
# smaller experts, and the combine), more parameters — each expert's output bias $b_2$ ($d$
# numbers, and there are more experts) and, at $m = 4$, a larger GP: of the 624 extra, 384 are
# output biases and 240 the router's (31 experts to score, not 8) — and a referral that can
# choose among hundreds or thousands of combinations instead of 28.
#
# ## 5. One clinic, seven referral systems
#
# Time to compare them all on the same patients: the **tired clinic** of lesson 05 (everyone
# shares a complaint, so an unbalanced GP collapses), $E = 8$ specialists of width 8, two
# referrals per patient on average, and appointment books of capacity factor 1 for every
# router — so an unbalanced referral costs turned-away patients. Three numbers per clinic:
# the test accuracy, the **load CV** (std / mean of the specialists' kept loads: 0 is perfect
# balance), and the share of patients **no specialist saw**. Careful with that last one: a
# patient with two referrals who loses one is still seen.
#
# ### Exercise 4 — the routing report
#
# `idx` and `kept` come from a layer's `stats["topk_idx"]` and `stats["kept"]`: $(T, k)$ for
# token choice, and for expert choice $(T, E)$ — every specialist listed for every patient,
# `kept` marking the ones who picked them.
#
# *Loops (the course's rule):* no Python loop over tokens — the check runs your function at two
# numbers of tokens and counts the Python lines it executes, which must not grow; loops over
# experts, choices or ranks are fine.

# %%
def routing_report(idx, kept, n_experts):
    """Load, load CV and unserved tokens of one forward.

    Args:
        idx: (T, k) int experts of each assignment.  kept: (T, k) bool, True if it was served.
        n_experts: E.

    Returns:
        load: (E,) int, kept assignments per expert.
        cv: float, std(load) / mean(load) (population std).
        unserved: int, tokens none of whose assignments was kept.
    """
    ### BEGIN SOLUTION
    load = np.bincount(idx[kept], minlength=n_experts)
    cv = load.std() / load.mean()
    unserved = int(np.sum(~kept.any(axis=1)))
    return load, cv, unserved
    ### END SOLUTION


# %%
check.routing_report(routing_report)

# %% [markdown]
# The seven clinics. The receptionist of lesson 08 hashes the intake form (five yes/no
# answers); the loss-free GP gets its bias nudged once per training step (`auto_update=True`,
# since `minimoe.clinic.train.train` knows nothing about biases), and a control with $\gamma = 0$
# shows what the nudges add. (Training all seven takes a few seconds per seed.)

# %%
SEEDS = [0] if QUICK else [0, 1, 2]
d, h, E, k, CF = 16, 8, 8, 2, 1.0


class IntakeReferral(HashMoELayer):
    """Hash routing on the intake form: the clinic sets `ids` before each forward."""
    ids = None

    def forward(self, u, train=True, noise=None):
        return super().forward(u, train=train, noise=noise, ids=self.ids)


class IntakeClinic(Clinic):
    def forward(self, x, train=False, rng=None, noise=None):
        self.block.ids = ((x[:, :5] > 0).astype(np.int64) << np.arange(5)).sum(axis=1)   # 32 answer codes
        return super().forward(x, train=train, rng=rng, noise=noise)


ROUTERS = {
    "token choice, no balancing": lambda rng: MoELayer(d, h, E, k=k, balance=None, capacity_factor=CF, rng=rng),
    "token choice + balancing loss": lambda rng: MoELayer(d, h, E, k=k, balance="importance+load",
                                                          balance_coef=0.1, capacity_factor=CF, rng=rng),
    "hash (intake form)": lambda rng: IntakeReferral(d, h, E, k=k, capacity_factor=CF, rng=rng),
    "expert choice": lambda rng: ExpertChoiceMoELayer(d, h, E, k=k, capacity_factor=CF, rng=rng),
    "loss-free, γ = 0 (control)": lambda rng: LossFreeMoELayer(d, h, E, k=k, bias_update_rate=0.0,
                                                               auto_update=True, capacity_factor=CF, rng=rng),
    "loss-free, γ = 0.03": lambda rng: LossFreeMoELayer(d, h, E, k=k, bias_update_rate=0.03,
                                                        auto_update=True, capacity_factor=CF, rng=rng),
    "shared + fine-grained": lambda rng: SharedExpertMoELayer.fine_grained(
        d, h, E, k, granularity=2, n_shared=1, balance="importance+load", balance_coef=0.1,
        capacity_factor=CF, rng=rng),
}

scores, served = {name: [] for name in ROUTERS}, {}
for seed in SEEDS:
    data = make_clinic(4000, 1000, 2000, seed=seed)
    shift = np.random.default_rng(7).standard_normal(data.n_symptoms)
    shift *= 10 / np.linalg.norm(shift)                              # the complaint everyone shares
    tired_train, tired_val, tired_test = (Split(s.x + shift, s.y, s.specialty)
                                          for s in (data.train, data.val, data.test))
    for name, make in ROUTERS.items():
        rng = np.random.default_rng(10_000 + seed)
        model = (IntakeClinic if name.startswith("hash") else Clinic)(data.n_symptoms, data.n_classes, d,
                                                                       make(rng), rng)
        train(model, tired_train, tired_val, epochs=10, batch_size=128, lr=1e-2, seed=seed, progress=False)
        acc = evaluate(model, tired_test)["acc"]
        model.forward(tired_test.x, train=False)                       # all 2,000 test patients at once
        st = model.moe.stats
        load, cv, unserved = check.routing_report_ref(st["topk_idx"], st["kept"], model.moe.n_experts)
        scores[name].append((acc, cv, unserved / len(tired_test)))
        if seed == SEEDS[0]:
            served[name] = np.asarray(st["kept"]).sum(axis=1)          # specialists who saw each patient

rows = []
print(f"{'':<30} {'accuracy':>14} {'load CV':>8} {'nobody saw':>11}")
for name, runs in scores.items():
    acc, cv, unserved = np.array(runs).T
    rows.append(dict(name=name, acc=acc.mean(), acc_std=acc.std(), n_seeds=len(acc), cv=cv.mean(),
                     unserved=unserved.mean()))
    spread = f"± {acc.std():.3f}" if len(acc) > 1 else "(n = 1)"          # one seed has no spread to show
    print(f"{name:<30} {acc.mean():>8.3f} {spread} {cv.mean():>8.2f} {100 * unserved.mean():>10.1f}%")
fig = viz.plot_router_comparison(rows, title=f"Seven referral systems on the tired clinic "
                                             f"({len(SEEDS)} seed{'s' if len(SEEDS) > 1 else ''})")
plt.show()

# %% [markdown]
# How many specialists saw each patient (first seed)? Token choice sees each patient twice
# unless a book was full; expert choice spreads the same total work unevenly over patients:

# %%
fig = viz.plot_experts_per_token({n: served[n] for n in ("token choice + balancing loss", "expert choice",
                                                         "loss-free, γ = 0.03")})
plt.show()

# %% [markdown]
# What to read off (with one seed, differences of ±0.02 in accuracy are noise — run with
# `QUICK = False` for three):
#
# * **No balancing collapses** — a few specialists get everyone, their books overflow, about
#   a quarter of the patients are seen by nobody, and the accuracy drops far below the others.
# * **The balancing loss** (lesson 05) and **the loss-free bias** both spread the load evenly
#   and see everyone; the bias does it with no term in the objective, and the $\gamma = 0$
#   control (collapsing, turning patients away) shows the nudges are what does it. In this
#   short run the loss-free clinic diagnoses somewhat worse (by about 0.05 with the first
#   seed, 0.03 on average over three, less than the seeds' spread); Wang et al. found it
#   better than the loss in long language-model training.
# * **Expert choice** is perfectly balanced by construction (CV 0, nothing overflows) and
#   diagnoses as well as the balanced GP — but look at the bar chart: the same average of two
#   specialists per patient is spread from one to five, and a few patients see nobody.
# * **The hash receptionist** has no balancing machinery at all, and its load is only as even
#   as the intake codes: the shared complaint makes a few answer codes very common, their
#   specialists' books overflow, and a third of the patients are turned away everywhere. It
#   cannot learn better clusters either: it diagnoses about as badly as the collapsed GP
#   (within 0.02 of it), far below every balanced clinic.
# * **Shared + fine-grained** (with DeepSeekMoE's routing: softmax affinities, not
#   renormalised, no noise) diagnoses about as well as the balanced GP, a little better with
#   the first seed (by 0.02, the size of one seed's noise). Its promise — finer
#   specialisation at equal compute — needs more data and experts than this toy clinic.
#
# One more caveat for expert choice: at test time its picks depend on *which* patients share
# the batch. We evaluated all 2,000 test patients at once; in batches of one, every patient
# would be picked by every specialist ($C = T$ caps at 1 patient).
#
# ## 6. Into a language model
#
# An MoE language model is a stack of **transformer blocks** whose feed-forward network is an
# MoE layer (GShard; Switch; Mixtral), in the pre-LN arrangement of `minimoe/lm/transformer.py`:
#
# $$h = x + \mathrm{Attn}(\mathrm{LN}_1(x)), \qquad y = h + \mathrm{MoE}(\mathrm{LN}_2(h)) \qquad (B, S, d).$$
#
# Attention lets each token *read its context* (only earlier tokens: it is causal); the MoE
# layer then sends each token, on its own, to its specialists. `MoELM` stacks such blocks
# between a token + position embedding and a readout to the vocabulary; every backward is
# hand-written and the whole model passes the gradient check (`tests/test_lm.py`).
#
# The text is synthetic **clinic notes** from a small grammar (`minimoe/lm/corpus.py`: no
# download). Every word has a known **class** (function word, verb, symptom, body part, …)
# and every note a known **topic** (its specialty) — two answer keys we will need later:

# %%
notes, topics = corpus.generate_corpus(8, np.random.default_rng(0), return_topics=True)   # 2 notes of 4 sentences
ends = np.flatnonzero(notes == corpus.WORD_TO_ID["."])[3::4] + 1
for note, topic in zip(np.split(notes, ends[:-1]), np.split(topics, ends[:-1])):
    print(f"[{corpus.TOPIC_NAMES[topic[0]]}] {corpus.decode(note)}")
print("classes of the first 8 words:", [corpus.CLASS_NAMES[c] for c in corpus.token_classes(notes[:8])])

# %% [markdown]
# `quick_lm` generates a corpus, builds a two-block `MoELM` and trains it with Adam
# (`lm_train.QUICK`: $d = 32$, 4 experts of width 32, top-2, 150 steps of 16 windows of 24
# tokens; the full version: 8 experts, 1,000 steps). We train two: learned token-choice routing, and **hash routing on the word id**
# (Roller et al.'s setting: every occurrence of a word goes to the same specialists, in every
# block). Two baselines frame the loss: the *unigram* model (word frequencies only) and the
# *bigram* model (one word back). A few seconds each:

# %%
LM = {} if QUICK else dict(n_sentences=8000, steps=1000, n_experts=8)
lms = {"learned (top-2)": quick_lm("moe", seed=0, progress=False, **LM),
       "hash on the word": quick_lm("hash", seed=0, progress=False, **LM)}
if not QUICK:
    lms.update({"expert choice": quick_lm("expert_choice", seed=0, progress=False, **LM),
                "loss-free": quick_lm("lossfree", seed=0, progress=False, bias_update_rate=0.01, **LM),
                "shared + fine-grained": quick_lm("fine_grained", seed=0, progress=False, **LM)})
first = lms["learned (top-2)"]
print(f"unigram baseline {first.history.unigram:.2f} nats, bigram baseline {first.history.bigram:.2f} nats")
for name, q in lms.items():
    m = q.model
    print(f"{name:<22} validation loss {q.history.val_loss[-1]:.3f} nats   {m.n_params:,} parameters, "
          f"{m.n_active_params:,} active, {m.flops_per_token(m.max_len):,} FLOPs per token")
fig = viz.plot_lm_curves({name: q.history for name, q in lms.items()})
plt.show()

# %% [markdown]
# Both models beat the bigram baseline: they use more than the previous word (the last
# sentence of a note refers the patient to the note's specialty, which only context can
# predict). The hash-routed model is as good as the learned one — Roller et al.'s finding,
# in miniature. (In the full run, expert choice's validation loss should be taken with a
# grain of salt: its routing reads the future of each window, section 2.)
#
# Let the learned model write. `sample` feeds its own output back one token at a time; the
# temperature divides the logits (lower: more predictable):

# %%
model = first.model
for temperature in (0.0, 0.8):
    text = corpus.decode(sample(model, "patient reports", 40, np.random.default_rng(1), temperature=temperature))
    print(f"temperature {temperature}: {text}\n")

# %% [markdown]
# ## 7. What do the language model's specialists serve?
#
# The popular story: each expert becomes a *topic* specialist — one for cardiology notes, one
# for skin. Studies of trained MoE language models (ST-MoE, Zoph et al. 2022; Mixtral, Jiang
# et al. 2024) found something else: experts specialise in **token types** — punctuation,
# numbers, particular words — more than in topics. Our corpus has both answer keys.
# `expert_usage` runs the model over the validation notes and counts, for one block, every
# (token, expert) assignment by the token's class and by its note's topic: two tables,
# $(E, \text{classes})$ and $(E, \text{topics})$.
#
# The mutual information of lesson 08 measures how much the expert reveals about a label.
# From a table of counts $n_{ek}$, with $p(e,k) = n_{ek} / \sum n$ and its marginals,
#
# $$I(\text{expert}; \text{label}) = \sum_{e,k:\ p(e,k) > 0} p(e,k) \log \frac{p(e,k)}{p(e)\,p(k)}
#   \quad \text{(nats)} .$$
#
# ### Exercise 5 — mutual information from a count table
#
# *Loops (the course's rule):* no Python loop over tokens; this exercise has no token axis, so a
# loop over its few numbers is fine.

# %%
def mutual_information(counts):
    """I(expert; label) in nats from an (E, K) table of counts.

    Args:
        counts: (E, K) non-negative counts, counts[e, k] = assignments to expert e with label k.

    Returns:
        a float >= 0 (empty cells contribute 0).
    """
    ### BEGIN SOLUTION
    p = counts / counts.sum()
    pe = p.sum(axis=1, keepdims=True)                    # (E, 1) p(expert)
    pk = p.sum(axis=0, keepdims=True)                    # (1, K) p(label)
    nz = p > 0                                           # 0 · log 0 = 0
    return float(np.sum(p[nz] * np.log(p[nz] / (pe * pk)[nz])))
    ### END SOLUTION


# %%
check.mutual_information(mutual_information)

# %% [markdown]
# Now the two answer keys, for every block of every model. Dividing by the label's entropy
# turns each into the share of the label's uncertainty that knowing the expert removes (the
# reference gives the same number as minimoe's own `mutual_information` of the label arrays):

# %%
usage, mi_rows = {}, []
for name, q in lms.items():
    for layer in range(len(q.model.blocks)):
        u = expert_usage(q.model, q.val_ids, q.val_topics, layer=layer)
        usage[(name, layer)] = u
        mi_class, mi_topic = check.mutual_information_ref(u.counts_class), check.mutual_information_ref(u.counts_topic)
        assert np.isclose(mi_class, u.mi_class) and np.isclose(mi_topic, u.mi_topic)
        mi_rows.append(dict(name=f"{name}, block {layer}", class_frac=mi_class / u.h_class,
                            topic_frac=mi_topic / u.h_topic))
        load = u.counts_class.sum(axis=1)                # assignments per expert
        print(f"{name + ', block ' + str(layer):<32} I(expert; class) {mi_class:.3f} nats "
              f"({100 * mi_class / u.h_class:4.1f}% of H)   I(expert; topic) {mi_topic:.4f} nats "
              f"({100 * mi_topic / u.h_topic:4.1f}% of H)   load CV {load.std() / load.mean():.2f}")
fig = viz.plot_class_vs_topic(mi_rows)
plt.show()

# %% [markdown]
# In every block of every model the expert says far more about the word's **class** than
# about the note's **topic** — the topic information is almost nil. Note the load CV too:
# in the quick run the learned model's block 1 is far from balanced (load CV about 0.5,
# against about 0.2 in block 0). The quick language model trains with no balancing loss, so
# nothing stops a block from favouring some experts; keep that in mind when comparing its
# blocks. Where does each class go?

# %%
fig = viz.plot_expert_classes({"learned, block 0": usage[("learned (top-2)", 0)].counts_class,
                               "learned, block 1": usage[("learned (top-2)", 1)].counts_class,
                               "hash on the word, block 0": usage[("hash on the word", 0)].counts_class},
                              corpus.CLASS_NAMES, k=model.blocks[0].ffn.k)
plt.show()

# %% [markdown]
# Some classes go mostly to one or two experts (the specialty names, durations, punctuation…):
# the specialists look like *syntax* specialists, as in ST-MoE and Mixtral. (The hash model's
# two blocks hash the same word with the same hash, so they route identically.)
#
# **Now the honest caveat.** Look at the hash model. Its routing is a fixed function of the
# current word, chosen at random before training, and it reveals about as much about the
# word class in block 0 as the learned router does. That is no accident: a word *determines*
# its class, so any routing that is a function of the current token — learned or random —
# carries class information, and a routing that barely depends on the context carries almost
# none about the topic. In the first block, the learned router's input is little more than
# the token's embedding (plus its position and one attention step), so "experts specialise
# in syntax, not topics" is largely explained by **routing being a function of the current
# token**, not by the experts discovering syntax. Deeper blocks, whose inputs mix in more
# context, are where a learned router could show more. In the quick run block 1 reveals a
# little more about the class than block 0 (while less balanced, above) and no more about the
# topic: in every block the topic stays under 1% of its entropy. Before crediting a router
# with specialisation, compare it with a hash baseline on the same tokens.

# %% [markdown]
# ## Questions to think about
#
# 1. Expert choice guarantees every specialist is exactly full. Why is that not the same as
#    guaranteeing every patient is treated equally? What could you add to limit the number of
#    specialists per patient?
# 2. In an expert-choice language model, a later token can change which specialists an
#    earlier token gets. Why does that matter at *generation* time even if training works?
# 3. The loss-free update uses the *sign* of the load error with a fixed step $\gamma$. What
#    goes wrong with a proportional update $\gamma(\overline{\text{load}} - \text{load}_e)$
#    early in training, and what limits how fast the sign update can react?
# 4. A shared expert gets gate 1 and no router. Why might it learn the frequent, generic
#    patterns, and what does that free the routed experts to do?
# 5. A colleague reports that in their MoE language model "expert 3 is the punctuation
#    expert". Which baseline from this lesson would you ask them to run, and what result
#    would make their claim interesting?

# %% [markdown]
# ### BEGIN SOLUTION
# **Some answers.**
# 1. Full specialists say nothing about the patients: a patient every specialist likes gets
#    several opinions, a patient nobody likes gets none (its MoE output is 0). Zhou et al.
#    discuss capping the specialists per token (solving a small matching/linear program); one
#    can also reserve a token-choice fallback for unpicked tokens.
# 2. At generation time the future does not exist yet: the model is run on a prefix, so the
#    picks for earlier tokens differ from those made in training with the whole sequence
#    visible. The model was trained with information it won't have (and its training loss
#    flatters it), and its outputs for a prefix can change as tokens are appended.
# 3. Early on the loads are very uneven, so a proportional step is huge and overshoots
#    (and its size depends on the batch size); later the errors are small and it barely
#    moves. With the sign, each step is at most $\gamma$, so a bias needs about
#    $\Delta L/\gamma$ steps to overcome a logit gap $\Delta L$: $\gamma$ trades reaction
#    speed against jitter.
# 4. It sees every token with full weight, so the gradient it gets is dominated by what is
#    common to all tokens — exactly the knowledge every routed expert would otherwise
#    duplicate. The routed experts can then spend their parameters on what distinguishes
#    their tokens.
# 5. A hash-routed model (or, at least, the same MI for a routing that is a random function
#    of the word) on the same tokens. If hashing the word gives a "punctuation expert" just as
#    clearly, the finding is about routing by the current token, not about learned
#    specialisation; it becomes interesting if the learned router reveals clearly more —
#    e.g. splits a word class by context, or carries topic information the hash cannot.
# ### END SOLUTION

# %%
check.progress()
