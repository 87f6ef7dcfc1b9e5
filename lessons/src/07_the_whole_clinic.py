# %% [markdown]
# # Lesson 07 — The whole clinic
#
# **Difficulty** ★★★★☆ · **Prerequisites** lesson 00 (parameters ≠ compute), lessons 03–06
# (the referral, the noisy GP, balancing, capacity) · **Time** about 45 minutes
#
# Six lessons built the parts: the specialist, the GP, the referral, the GP's doubt, the
# balancing rules and the appointment books. Today the clinic opens. Real patients arrive,
# every doctor learns on the job, and at the end of the day we compare the four clinics of
# lesson 00 on the only terms that matter: **how often they get the diagnosis right, and
# what a visit costs**.
#
# You will: size a generalist so that it costs exactly what the GP clinic costs per patient;
# write the one training step that every clinic takes thousands of times; and read the
# learning curves like an experimenter — including the measurement the Switch Transformer
# paper made famous, *how much sooner* the sparse model reaches the dense model's quality.
# The last section grows the number of specialists at a fixed number per patient and
# watches knowledge come apart from compute.
#
# **Code to read alongside:** `minimoe/clinic/data.py` (`make_clinic`, `bayes_accuracy`),
# `minimoe/clinic/models.py` (`Clinic`, `Generalist`, `Ensemble`, `DenseMoE`, `SparseMoE`),
# `minimoe/clinic/train.py` (`train`, `evaluate`), `minimoe/clinic/optim.py` (`Adam`, `clip_grad_norm`),
# and `build_clinics` in `minimoe/__main__.py` (the demo `python -m minimoe` is this
# lesson at full size).

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
import math

import numpy as np
import matplotlib.pyplot as plt

from minimoe.course import viz
from minimoe.__main__ import build_clinics
from minimoe.clinic.data import bayes_accuracy, make_clinic
from minimoe.clinic.models import SparseMoE
from minimoe.clinic.train import evaluate, train
from minimoe.checks import lesson07 as check

# %% [markdown]
# ## 1. The patients
#
# `make_clinic` draws the clinic's records. Every patient belongs to one of $S = 8$ hidden
# **specialties**; specialty $s$ has a typical presentation $\mu_s$, and its patients have
# symptoms $x = \mu_s + z$ with $z \sim \mathcal N(0, I)$. Inside a specialty the diagnosis
# follows that specialty's own rule, a small random network
#
# $$y = \arg\max_c \big[\tanh(z A_s + c_s)\, B_s - o_s\big]_c ,$$
#
# so "diagnosis 2" means something different in every specialty. A generalist must fit all
# eight rules with one set of hidden units; a GP who can tell the specialties apart can hand
# each rule to its own specialist. 5% of the records carry a random diagnosis, which caps
# the best possible accuracy at $1 - 0.05 \cdot \tfrac{3}{4} = 0.9625$. No model ever sees
# the specialty labels: they are kept for analysis only.
#
# The demo (`python -m minimoe`) trains on 16,000 patients for 20 epochs. A lesson should
# run in seconds, so we use 4,000 patients, 10 epochs and a larger learning rate.

# %%
CFG = dict(n_train=4000, n_val=1000, n_test=2000, n_specialties=8, n_classes=4, n_symptoms=8,
           rule_width=6, noise=0.05, d_model=16, d_hidden=8, n_experts=8, k=2, n_members=3,
           epochs=10, batch_size=128, lr=1e-2)
data = make_clinic(CFG["n_train"], CFG["n_val"], CFG["n_test"], n_specialties=CFG["n_specialties"],
                   n_classes=CFG["n_classes"], n_symptoms=CFG["n_symptoms"],
                   rule_width=CFG["rule_width"], noise=CFG["noise"], seed=0)
bayes = bayes_accuracy(CFG["noise"], CFG["n_classes"])
print(f"{len(data.train)} training, {len(data.val)} validation, {len(data.test)} test patients; "
      f"{data.n_symptoms} symptoms, {data.n_classes} diagnoses; best possible accuracy {bayes:.4f}")
fig = viz.plot_clinic_data(data.test, data.centers)
plt.show()

# %% [markdown]
# ## 2. Four clinics at the same price per visit
#
# All four clinics share one skeleton (`models.Clinic`): embed the symptoms, one residual
# block, read out a diagnosis,
#
# $$u = x W_\text{emb} + b_\text{emb}, \qquad v = u + \text{block}(u), \qquad
#   \text{logits} = v W_\text{out} + b_\text{out},$$
#
# and differ only in the block. The GP clinic's block is an `MoELayer` with $E$ experts of
# width $h$, $k$ per patient. Counting FLOPs as in lesson 00 (2 per multiply-add, matrix
# products only), one patient costs
#
# $$F_\text{GP} = \underbrace{2dE}_\text{the GP's scores} + \underbrace{k \cdot 4dh}_{k\text{ experts}}
#   + \underbrace{2kd}_\text{weighted sum},$$
#
# while a generalist FFN of width $h_g$ costs $4 d h_g$. A fair fight gives the generalist
# the **smallest width that costs at least as much** as the GP clinic's block — so if the GP
# clinic wins, it is not because it computed more.
#
# ### Exercise 1 — match the compute
#
# Return that width $h_g$ (an `int`).
#
# *Loops (the course's rule):* no Python loop over tokens; this exercise has no token axis, so a
# loop over its few numbers is fine.

# %%
def matched_width(d, h, E, k):
    """The smallest generalist width h_g with 4·d·h_g >= the sparse MoE block's FLOPs per patient.

    Args:
        d: model width; h: each expert's hidden width; E: number of experts; k: experts per patient.

    Returns:
        h_g, an int.
    """
    ### BEGIN SOLUTION
    gp_flops = 2 * d * E + k * 4 * d * h + 2 * k * d       # scores, k experts, weighted sum
    return math.ceil(gp_flops / (4 * d))
    ### END SOLUTION


# %%
check.matched_width(matched_width)

# %% [markdown]
# `build_clinics` (in `minimoe/__main__.py`) sizes the demo's clinics this way. The other
# two clinics are *not* at equal compute, on purpose: the second opinion runs three
# generalists and the dense MoE runs all eight experts, about 3× the price of a visit. If
# the GP clinic still keeps up with them, that is the point.

# %%
clinics, desc = build_clinics(CFG, seed=0, n_symptoms=data.n_symptoms, n_classes=data.n_classes)
print(f"{'clinic':<11} {'parameters':>10} {'active':>7} {'FLOPs/patient':>14}   what it is")
for kind, model in clinics.items():
    print(f"{kind:<11} {model.n_params:>10,} {model.n_active_params:>7,} {model.flops_per_token():>14,}   "
          f"{desc[kind]}")
print(f"\ncheck.matched_width_ref(16, 8, 8, 2) = {check.matched_width_ref(16, 8, 8, 2)}: "
      f"the generalist's width above")

# %% [markdown]
# The GP clinic employs about 3× the generalist's parameters and charges the same per
# patient: only the GP and 2 of the 8 specialists touch a patient ("active" parameters).
#
# ## 3. One training step
#
# Every clinic learns the same way. For a minibatch of patients the objective is the mean
# cross-entropy of the diagnoses plus, for the GP clinic, the balancing loss of lesson 05
# (importance + smooth load, weight 0.05):
#
# $$J = \underbrace{-\frac1T \sum_t \log \mathrm{softmax}(\text{logits}_t)_{y_t}}_\text{task loss}
#   \;+\; \underbrace{w \big(\mathrm{CV}(\text{importance})^2
#   + \mathrm{CV}(\text{load})^2\big)}_\text{balancing loss}.$$
#
# The pieces are already written:
#
# * `model.forward_loss(x, y, train=True, rng=rng)` runs the clinic in **training mode** —
#   the GP adds its exploration noise (lesson 04), drawn from `rng` — returns the task loss
#   and leaves the balancing loss in `model.aux_loss`;
# * `model.backward()` fills `model.grads` with $\partial J / \partial \theta$ for every
#   parameter (both terms);
# * `optimizer.step()` clips the gradients to a global norm of 1 (`optim.clip_grad_norm`) and
#   applies Adam (Kingma & Ba 2015, Algorithm 1), updating `model.params` **in place**.
#
# ### Exercise 2 — the training step
#
# Put them together, and return the objective $J$ of this step as a float.
#
# *Loops (the course's rule):* no Python loop over tokens — the check runs your function at two
# numbers of tokens and counts the Python lines it executes, which must not grow; loops over
# experts, choices or ranks are fine.

# %%
def train_step(model, optimizer, x, y, rng):
    """One optimisation step on the minibatch (x, y).

    Args:
        model: a clinic from minimoe.clinic.models. optimizer: e.g. Adam(model, lr, clip).
        x: (T, n_symptoms) symptoms. y: (T,) int diagnoses.
        rng: numpy.random.Generator for the router's training noise.

    Returns:
        The objective of this step, task loss + balancing loss (a float).
    """
    ### BEGIN SOLUTION
    loss = model.forward_loss(x, y, train=True, rng=rng)
    model.backward()
    optimizer.step()
    return float(loss + model.aux_loss)
    ### END SOLUTION


# %%
check.train_step(train_step)

# %% [markdown]
# `minimoe.clinic.train.train` is this step in a loop over shuffled minibatches, plus a record of
# what happened: every few steps it logs the training loss and accuracy, the balancing
# loss, how many patients each specialist saw, and the validation accuracy **in eval mode**
# (no router noise — a GP on duty does not flip coins). One generator, seeded by `seed`,
# drives the shuffling and the noise, so a run can be repeated bit for bit.
#
# Now train the four clinics on the same patients. (This is the slowest cell of the lesson:
# a few seconds.)

# %%
histories, rows = {}, []
for kind, model in clinics.items():
    histories[kind] = train(model, data.train, data.val, epochs=CFG["epochs"],
                            batch_size=CFG["batch_size"], lr=CFG["lr"], seed=0, progress=False)
    ev = evaluate(model, data.test)
    rows.append(dict(kind=kind, acc=ev["acc"], params=model.n_params, active=model.n_active_params,
                     flops=model.flops_per_token()))
    print(f"{kind:<11} test accuracy {ev['acc']:.3f}   ({model.flops_per_token():,} FLOPs per patient)")

fig = viz.plot_learning_curves(histories, bayes=bayes)
plt.show()

# %% [markdown]
# ## 4. Reading the curves
#
# Three things to look for in any set of learning curves:
#
# * **The plateau.** The generalist flattens early, far below the dashed ceiling, and more
#   epochs lift it only slowly (the full demo, with 4× the patients and 2× the epochs, gets
#   it to about 0.65 and the GP clinic to 0.81): with one budget of hidden units it cannot
#   represent eight rules well. That is *bias* (lesson 00), and the second opinion — three
#   generalists averaged — shares it: it buys a little, at 3× the price.
# * **The gap.** Compare each clinic's training and validation accuracy below. A clinic
#   that memorises its 4,000 patients shows a large gap (*variance*); here the gaps are a few
#   points, so the clinics are limited by what they can represent, not by overfitting. (The
#   training accuracy is averaged over the last logging interval and, for the GP clinic,
#   measured with router noise, so it can even sit *below* the validation accuracy.)
# * **The speed.** Fedus et al. (2022, *Switch Transformers*, §3.1) measured the benefit of
#   sparsity as *time to quality*: how many steps the sparse model needs to reach the dense
#   model's final quality (about 7× fewer, at the same FLOPs per token).

# %%
for kind, h in histories.items():
    print(f"{kind:<11} final training accuracy {h.train_acc[-1]:.3f}   validation {h.val_acc[-1]:.3f}   "
          f"gap {h.train_acc[-1] - h.val_acc[-1]:+.3f}")

# %% [markdown]
# ### Exercise 3 — time to quality
#
# `History` logs the epoch of each record (`h.epoch`, fractional: it logs about 40 times in
# all) and the validation accuracy (`h.val_acc`). Return the **first** logged epoch at which
# the validation accuracy is at least `target`, or `None` if it never gets there.
#
# *Loops (the course's rule):* no Python loop over tokens; this exercise has no token axis, so a
# loop over its few numbers is fine.

# %%
def epochs_to_reach(epochs, val_acc, target):
    """The first epoch at which val_acc >= target.

    Args:
        epochs: list of logged epochs (floats, increasing). val_acc: list, same length.
        target: the accuracy to reach.

    Returns:
        That epoch (a float, taken from `epochs`), or None if val_acc never reaches target.
    """
    ### BEGIN SOLUTION
    for epoch, acc in zip(epochs, val_acc):
        if acc >= target:
            return float(epoch)
    return None
    ### END SOLUTION


# %%
check.epochs_to_reach(epochs_to_reach)

# %% [markdown]
# The target is the generalist's final validation accuracy. (Validation curves are noisy;
# a fuller study would smooth them or average over seeds.)

# %%
target = histories["generalist"].val_acc[-1]
base = check.epochs_to_reach_ref(histories["generalist"].epoch, histories["generalist"].val_acc, target)
print(f"target: the generalist's final validation accuracy, {target:.3f} (it got there at epoch {base:.2f})")
for kind, h in histories.items():
    if kind == "generalist":
        continue
    reached = check.epochs_to_reach_ref(h.epoch, h.val_acc, target)
    if reached is None:
        print(f"{kind:<11} never reaches it")
    else:
        print(f"{kind:<11} reaches it at epoch {reached:5.2f}   ({base / reached:.1f}× sooner)")

# %% [markdown]
# The GP clinic gets to the generalist's final quality in about half the epochs, at the same
# cost per step; the dense MoE gets there about as fast, at 3× the cost per step. (In this
# small clinic the speed-up is about 2×, not Switch's 7×: a smaller model, far fewer
# steps, and one noisy seed.) Did the GP share the work? The share of referrals each
# specialist received, logged during training (lesson 05's balancing loss at work):

# %%
fig = viz.plot_expert_load(histories["sparse_moe"],
                           title="GP referral: share of patients each specialist saw")
plt.show()

# %% [markdown]
# ## 5. Knowledge and compute come apart
#
# Lesson 00's slogan — *parameters are not compute* — can now be measured. Keep $k = 2$
# specialists per patient and the same expert width, and hire more specialists:
# $E = 2, 4, 8, 16$. Each new specialist adds $2dh + h + d$ parameters; the cost of a visit
# grows only by the GP's extra scores, $2d$ FLOPs per specialist.

# %%
sweep = []
for E in (2, 4, 8, 16):
    if E == CFG["n_experts"]:
        model = clinics["sparse_moe"]                            # already trained above
    else:
        model = SparseMoE(data.n_symptoms, data.n_classes, CFG["d_model"], CFG["d_hidden"], E, CFG["k"],
                          rng=np.random.default_rng(10_000))
        train(model, data.train, data.val, epochs=CFG["epochs"], batch_size=CFG["batch_size"],
              lr=CFG["lr"], seed=0, progress=False)
    acc = evaluate(model, data.test)["acc"]
    sweep.append(dict(E=E, acc=acc, params=model.n_params, flops=model.flops_per_token()))
    print(f"E = {E:2d}: {model.n_params:6,} parameters, {model.flops_per_token():5,} FLOPs per patient, "
          f"test accuracy {acc:.3f}")

fig = viz.plot_knowledge_vs_compute(rows, sweep)
plt.show()

# %% [markdown]
# Read the two panels together. On the left (compute), the GP clinics stand almost on one
# vertical line: from $E = 2$ to $E = 16$ a visit costs barely more. On the right
# (parameters), the same points spread out: 6× the parameters, and the accuracy climbs with
# them. That is what Shazeer et al. (2017) meant by conditional computation, and what
# Fedus et al. (2022) scaled to a trillion parameters: **more knowledge at the same price
# per visit**. (A way of putting it often credited to Noam Shazeer: parameters are knowledge,
# compute is intelligence — both words used loosely.)
#
# The honest small print:
#
# * **Knowledge needs patients.** Sixteen specialists share the same 4,000 patients, so each
#   sees fewer: with more experts, data per expert — not compute — becomes the limit.
#   (Try $E = 32$: it is not better here.)
# * **The GP is not free.** Its scores cost $2dE$ FLOPs, negligible for large experts, but
#   in this toy clinic they grow visibly with $E$. Fine-grained MoEs with hundreds of
#   experts must care about it.
# * **Parameters cost memory, not FLOPs.** All $E$ specialists must be stored (and, in
#   training, their optimizer state: Adam keeps two more numbers per parameter).
# * **One seed.** Differences of ±0.02 between runs here are noise; `python -m minimoe
#   --seed 0 1 2` repeats the full-size experiment over seeds.

# %% [markdown]
# ## Questions to think about
#
# 1. The dense MoE consults every specialist and mixes their advice. It costs ~3× the GP
#    clinic per patient — why is it not ~3× better?
# 2. Why is the validation accuracy logged in eval mode, without router noise? What would
#    the curves look like with it?
# 3. The GP clinic reached the generalist's final accuracy sooner *per epoch*. Each epoch
#    also costs both clinics the same FLOPs. Would the comparison change if you measured
#    wall-clock time in minimoe — and on a GPU cluster?
# 4. In the sweep, suppose $E = 16$ had been *worse* than $E = 8$. Name two reasons that
#    could be, and an experiment that tells them apart.

# %% [markdown]
# ### BEGIN SOLUTION
# **Some answers.**
# 1. Most of its extra compute is spent on specialists who know nothing about the patient's
#    specialty: the GP's weights are near zero for them. What matters is that the *right*
#    specialist is consulted — the referral already does that.
# 2. Eval mode is how the clinic will be used: each patient is routed deterministically to
#    the top-k experts. Noisy routing would send close calls to a second-best specialist and
#    lower (and jitter) the curve; it is only there during training, to explore.
# 3. Per FLOP the comparison stands, but time is not FLOPs: minimoe's dispatch (sorting,
#    gathering, scattering) adds overhead a dense matmul doesn't have, and on a cluster
#    experts live on different devices, so tokens travel (all-to-all communication) and
#    uneven loads make some devices wait.
# 4. Too few patients per expert (data-limited: more data or fewer epochs per expert would
#    tell), or an unbalanced or collapsed GP (look at the load plot and the load CV); also
#    plain seed noise — repeat over seeds first.
# ### END SOLUTION

# %%
check.progress()
