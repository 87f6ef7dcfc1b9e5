# %% [markdown]
# # Lesson 00 — The clinic
#
# **Difficulty** ★☆☆☆☆ · **Prerequisites** Python, NumPy arrays, a matrix product ·
# **Time** about 30 minutes
#
# You feel tired all the time and you don't know why. (It is your eyes, but you don't know
# that yet.) Where do you go for advice? This lesson walks through four clinics, and by the
# end you will know what a *Mixture of Experts* is, why it is built the way it is, and the
# one distinction that explains why many of today's largest language models (Mixtral,
# DeepSeek-V3, Switch Transformer) are built from one: **parameters are not compute**.
#
# | clinic | what it is in a network |
# |---|---|
# | a second opinion from another cardiologist | an **ensemble** of copies of the same model |
# | one generalist doctor | a **dense** feed-forward layer (FFN) |
# | ask every specialist, weigh their advice | a **dense mixture of experts** |
# | the GP's referral to one or two specialists | a **sparse mixture of experts** (MoE) |
#
# **How the exercises work.** Each exercise is a function with a `# YOUR CODE HERE` line.
# Write the body, run the cell, then run the check cell below it: it calls your function on
# fresh random inputs, compares with minimoe's own answer, and prints ✔ with what it
# checked, or ✘ with what is wrong. The cells after an exercise never use your answer, so
# if you are stuck you can read on and come back. The last cell shows your progress.

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
import numpy as np
import matplotlib.pyplot as plt

from minimoe.course import viz
from minimoe.checks import lesson00 as check

# %% [markdown]
# ## 1. A second opinion from the same specialty
#
# Your friend the cardiologist says it's your heart. You ask a second cardiologist, and a
# third, and average what they say. Does that help?
#
# It helps with one kind of error and not the other. Picture each doctor as a *predictor*:
# trained on the patients they happened to meet, they give a prediction $\hat f(x)$ for a
# patient with symptoms $x$. If we could rerun history $R$ times — each time with
# different patients, so a differently trained doctor — we'd get $R$ predictions per
# patient. Their error splits into two parts:
#
# $$\underbrace{\mathbb{E}\big[(\hat f(x) - f(x))^2\big]}_{\text{mean squared error}}
#   = \underbrace{\big(\mathbb{E}[\hat f(x)] - f(x)\big)^2}_{\text{bias}^2}
#   + \underbrace{\mathbb{E}\big[(\hat f(x) - \mathbb{E}[\hat f(x)])^2\big]}_{\text{variance}}$$
#
# **Bias** is how wrong the *average* doctor of this kind is: the way they were taught to
# think. **Variance** is how much one doctor differs from another: a bad day, the particular
# patients they happened to meet. Averaging $M$ independent doctors divides the variance by
# $M$. The bias does not move: every cardiologist looks at your heart.
#
# ### Exercise 1 — bias and variance
#
# `preds` has shape `(R, n)`: row $r$ holds trial $r$'s predictions for $n$ patients; `truth`
# has shape `(n,)`. Return `(bias2, variance)`, each averaged over the patients. Use the
# mean over trials for $\mathbb{E}$ (and so `ddof=0` for the variance).
#
# *Loops (the course's rule):* no Python loop over patients or trials (here the patients are the
# tokens) — the check runs your function on two sizes and counts the Python lines it executes,
# which must not grow.

# %%
def bias_variance(preds, truth):
    """Bias² and variance of a predictor, from R independent trials.

    Args:
        preds: (R, n) predictions, one row per trial.
        truth: (n,) the true values.

    Returns:
        (bias2, variance): two floats, each a mean over the n patients.
    """
    ### BEGIN SOLUTION
    mean = preds.mean(axis=0)                       # the average doctor, per patient
    bias2 = np.mean((mean - truth) ** 2)
    variance = np.mean(preds.var(axis=0))
    return float(bias2), float(variance)
    ### END SOLUTION


# %%
check.bias_variance(bias_variance)

# %% [markdown]
# Now the experiment. The truth is a curve, $f(x) = \sin(2.5x)$. A "cardiologist" fits a
# **straight line** to the 12 noisy patients they have met: a simple way of thinking,
# always the same. We train 32 of them, average the first $M$, and repeat the whole thing
# $R = 400$ times to measure bias² and variance. (This cell uses minimoe's reference
# answer, `check.bias_variance_ref`, not yours.)

# %%
rng = np.random.default_rng(0)
R, M_max, n_seen = 400, 32, 12
grid = np.linspace(-1, 1, 41)
truth = np.sin(2.5 * grid)

x = rng.uniform(-1, 1, (R, M_max, n_seen))                       # the patients each doctor met
y = np.sin(2.5 * x) + 0.5 * rng.standard_normal(x.shape)         # ...and their noisy outcomes
xm, ym = x.mean(-1, keepdims=True), y.mean(-1, keepdims=True)
slope = ((x - xm) * (y - ym)).sum(-1) / ((x - xm) ** 2).sum(-1)  # least-squares line, (R, M)
intercept = ym[..., 0] - slope * xm[..., 0]
doctors = slope[..., None] * grid + intercept[..., None]         # (R, M, n) every opinion

Ms = [1, 2, 4, 8, 16, 32]
bv = np.array([check.bias_variance_ref(doctors[:, :M].mean(axis=1), truth) for M in Ms])
for M, (b2, var) in zip(Ms, bv):
    print(f"M = {M:2d} cardiologists:  bias² = {b2:.4f}   variance = {var:.4f}")

fig = viz.plot_ensemble(grid, truth, doctors[0, :6], doctors[0].mean(axis=0), Ms, bv[:, 0], bv[:, 1])
plt.show()

# %% [markdown]
# Thirty-two cardiologists disagree far less than one — the variance falls like $1/M$ —
# but they are all *confidently wrong in the same way*: a straight line cannot bend.
# An ensemble buys **robustness, not new knowledge**. To fix bias you need a different
# kind of doctor.

# %% [markdown]
# ## 2. Three more clinics
#
# In a transformer, the part of each block that "knows things" is the feed-forward
# network (FFN). We'll call one FFN a **doctor**. For a patient (a token) $x$ of width $d$,
#
# $$\mathrm{FFN}(x) = \mathrm{relu}(x W_1 + b_1)\, W_2 + b_2,
#   \qquad W_1 \in \mathbb{R}^{d\times h},\; W_2 \in \mathbb{R}^{h\times d}.$$
#
# * **The generalist** is one FFN. Every patient sees the same doctor, who must know a
#   little of everything. This is a *dense* layer: every parameter works on every token.
# * **Ask every specialist.** $E$ FFNs, $\mathrm{FFN}_1,\dots,\mathrm{FFN}_E$, each free to
#   specialise. A GP weighs their advice with gates $G(x)$ that sum to 1:
#   $y = \sum_{e=1}^{E} G_e(x)\,\mathrm{FFN}_e(x)$. The GP is one matrix,
#   $L = x W_\text{gate}$ with $W_\text{gate} \in \mathbb{R}^{d\times E}$, and $G = \mathrm{softmax}(L)$.
#   This is a *dense mixture of experts*: good advice, but every patient sees all $E$ doctors.
# * **The GP's referral.** The same $E$ specialists and the same GP, but the GP keeps only
#   the $k$ largest gates (usually $k = 1$ or $2$) and sends the patient to those
#   specialists alone: $y = \sum_{e \in \text{top-}k} G_e(x)\,\mathrm{FFN}_e(x)$. The other
#   $E - k$ are never run. This is a **sparse MoE**, the layer minimoe builds.
#
# The referral clinic *knows* as much as the every-specialist clinic (same parameters) but a
# visit *costs* about as much as seeing $k$ doctors. That's the whole trick.
#
# ### Exercise 2 — what each clinic costs
#
# Count, for each clinic, its **parameters** (every weight and bias it stores) and its
# **FLOPs per patient**. Conventions (the usual ones, e.g. Kaplan et al. 2020):
# a multiply-add is **2 FLOPs**, so $x W$ with $W \in \mathbb{R}^{d\times h}$ costs $2dh$;
# count the matrix products only — $x W_1$, $a W_2$ and the GP's $x W_\text{gate}$ — and
# leave out the biases, the ReLU, the softmax and the GP's weighted sum of the answers (a
# vanishing fraction; `MoELayer` counts the weighted sum, and we compare with it below).
# The second-opinion clinic has 3 doctors (your cardiologist and two more, as in the demo
# `python -m minimoe`); the GP has $W_\text{gate}$ and no bias.
#
# *Loops (the course's rule):* no Python loop over tokens; this exercise has no token axis, so a
# loop over its few numbers is fine.

# %%
def clinic_costs(d, h, E, k):
    """Parameters and FLOPs per patient of the four clinics.

    Args:
        d: model width; h: each doctor's hidden width; E: number of specialists;
        k: specialists per patient in the referral clinic.

    Returns:
        dict {"second opinion", "generalist", "every specialist", "referral"}
        -> (parameters, flops_per_patient).
    """
    ### BEGIN SOLUTION
    doctor_params = d * h + h + h * d + d          # W1, b1, W2, b2
    doctor_flops = 2 * d * h + 2 * h * d           # x W1, then a W2
    gp_params, gp_flops = d * E, 2 * d * E         # x W_gate
    return {
        "second opinion": (3 * doctor_params, 3 * doctor_flops),
        "generalist": (doctor_params, doctor_flops),
        "every specialist": (E * doctor_params + gp_params, E * doctor_flops + gp_flops),
        "referral": (E * doctor_params + gp_params, k * doctor_flops + gp_flops),
    }
    ### END SOLUTION


# %%
check.clinic_costs(clinic_costs)

# %% [markdown]
# A clinic the size of a small transformer block: $d = 512$, $h = 2048$, $E = 8$, $k = 2$.

# %%
costs = check.clinic_costs_ref(d=512, h=2048, E=8, k=2)
for name, (params, flops) in costs.items():
    print(f"{name:>17}: {params / 1e6:6.1f}M parameters, {flops / 1e6:6.1f}M FLOPs per patient")
fig = viz.plot_clinic_costs(costs, "d=512, h=2048, E=8, k=2")
plt.show()

# %% [markdown]
# minimoe's own sparse layer, `MoELayer`, counts the same way (here a small one). Its
# `flops_per_token()` also counts the GP's weighted sum of the $k$ answers, $2kd$ FLOPs,
# which we left out; `n_active_params` is what one patient's visit touches.

# %%
from minimoe.core.moe import MoELayer

d, h, E, k = 16, 64, 8, 2
layer = MoELayer(d_model=d, d_hidden=h, n_experts=E, k=k, noisy=False)
params, flops = check.clinic_costs_ref(d, h, E, k)["referral"]
print(f"parameters:      MoELayer {layer.n_params:>7}   referral clinic {params:>7}")
print(f"FLOPs per token: MoELayer {layer.flops_per_token():>7}   referral clinic {flops:>7}"
      f"   (difference {layer.flops_per_token() - flops} = 2kd = {2 * k * d})")
print(f"active parameters per token: {layer.n_active_params} of {layer.n_params}")

# %% [markdown]
# The referral clinic stores 8× the generalist's knowledge and charges about 2× per visit.
# In the analogy: more knowledge (parameters) without more thinking per patient (compute).
# Whether the extra knowledge *helps* depends on the GP sending each patient to the right
# specialist — which is what the next four lessons build.

# %% [markdown]
# ## 3. A real clinic: Mixtral 8x7B
#
# Mistral AI's Mixtral 8x7B (Jiang et al. 2024, *Mixtral of Experts*, arXiv:2401.04088)
# replaces the FFN of each of its 32 transformer blocks with 8 experts and a router that
# picks the top 2. Mistral's announcement gives **46.7B parameters in total** and
# **12.9B active per token** (the paper's abstract rounds them to 47B and 13B). Not 8 × 7B =
# 56B: only the FFNs are copied eight times; attention, embeddings and the routers are
# shared by all experts. So
#
# $$\text{total} = S + E\,P, \qquad \text{active} = S + k\,P,$$
#
# with $S$ the shared parameters and $P$ one expert's parameters (summed over the layers).
#
# ### Exercise 3 — inside Mixtral
#
# Given the two published numbers and $E$, $k$, solve for $S$ and $P$.
#
# *Loops (the course's rule):* no Python loop over tokens; this exercise has no token axis, so a
# loop over its few numbers is fine.

# %%
def split_params(total, active, E, k):
    """Shared and per-expert parameter counts of a sparse MoE model.

    Args:
        total: all parameters; active: parameters used per token;
        E: experts per layer; k: experts used per token.

    Returns:
        (shared, per_expert): two floats.
    """
    ### BEGIN SOLUTION
    per_expert = (total - active) / (E - k)        # the E - k idle experts make the difference
    shared = total - E * per_expert
    return shared, per_expert
    ### END SOLUTION


# %%
check.split_params(split_params)

# %% [markdown]
# Can we trust it? Mixtral's published configuration has width $d = 4096$, expert hidden
# width $h = 14336$ and 32 layers. Its experts use SwiGLU, which has three matrices
# (two $d \times h$, one $h \times d$) and no biases. Count one expert directly:

# %%
shared, per_expert = check.split_params_ref(46.7e9, 12.9e9, E=8, k=2)
d, h, n_layers = 4096, 14336, 32
counted = 3 * d * h * n_layers
print(f"solved from the two published numbers: one expert = {per_expert / 1e9:.3f}B, shared = {shared / 1e9:.2f}B")
print(f"counted from the configuration:        one expert = {counted / 1e9:.3f}B")
print(f"a token uses {12.9 / 46.7:.0%} of the parameters and sees 2 of 8 experts in every layer")

# %% [markdown]
# The two agree to within the rounding of "46.7" and "12.9". Each token pays for about
# 13B parameters of compute while the model holds 47B.
#
# ## 4. Two warnings before we build one
#
# * **An MoE is not an ensemble of domain models.** Nobody trains a "medical" expert and a
#   "legal" expert and glues them together. All experts and the GP are trained *together*,
#   end to end, on the same data; what each expert ends up handling is discovered, not
#   assigned — and it is often not a human topic at all.
# * **Experts define clusters, not classes.** "Cardiologist" is a useful picture, but a
#   trained expert's specialty is a region of input space the GP learned to send it, like
#   "tokens that follow an opening bracket". Keep the analogy, hold it loosely.

# %% [markdown]
# ## Questions to think about
#
# 1. The ensemble of cardiologists reduced variance. Would averaging the *generalist* and a
#    cardiologist reduce bias? When might it make things worse?
# 2. The referral clinic with $k = E$ — what is it, and what does it cost?
# 3. Parameters are stored in memory even when unused. Why might a sparse MoE be *harder* to
#    serve than a dense model with the same compute per token?
# 4. Mixtral's shared part is only ~1.6B of 46.7B. Where else could a designer put the
#    "experts"?

# %% [markdown]
# ### BEGIN SOLUTION
# **Some answers.**
# 1. Averaging two *different* kinds of doctor can reduce bias when their errors point in
#    different directions; it can also blur a right answer with a wrong one — which is why a
#    GP that *chooses* beats a fixed average.
# 2. A dense MoE: $k = E$ runs every expert, so it costs $E$ doctors per patient (plus the GP).
# 3. All $E$ experts must sit in (GPU) memory, so memory scales with total parameters while
#    compute scales with active ones; batches also spread unevenly over experts.
# 4. Anywhere there is a large per-token computation: attention heads (mixture-of-attention),
#    or finer-grained experts (many small FFNs, as in DeepSeekMoE).
# ### END SOLUTION

# %%
check.progress()
