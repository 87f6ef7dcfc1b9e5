# %% [markdown]
# # Lesson 10 — The bug hunt
#
# **Difficulty** ★★★★☆ · **Prerequisites** lessons 01–06 (gradient checks, the router and its
# gates, noise, the balancing losses, capacity) · **Time** about 60 minutes
#
# Hospitals hold a *morbidity and mortality conference*: once a month the doctors sit down
# with the cases that went wrong, not to blame anyone but to find the step where it went
# wrong and the check that would have caught it. This lesson is the clinic's M&M conference.
#
# Public MoE code that many people learn from carries subtle bugs that no test caught. They
# share one cause: with automatic differentiation nobody writes the backward pass, so nobody
# checks it, and a layer whose router never learns still trains, still prints a falling loss,
# still ships. Below are seven such bugs — patterns seen in widely used implementations,
# reproduced in a few lines of NumPy in `minimoe/course/bugs.py` (written for this course, not
# copied, and clearly labelled as deliberately wrong). For each one you will
#
# 1. read the case (what the code does and what the clinic would notice),
# 2. **write the check that exposes it**, with the tools of earlier lessons — a gradient
#    check, a property test, a simulation, a determinism test — and
# 3. **fix it**.
#
# Each grader runs your check on the buggy code (it must fail) and on minimoe's own code (it
# must pass), then grades your fix. The point is the checks: each is a few lines, and each
# would have saved weeks.
#
# **Code to read alongside:** `minimoe/course/bugs.py` (the seven bugs and reference checks), and the
# correct versions in `minimoe/core/losses.py` and `minimoe/core/router.py`.

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
import inspect

import numpy as np
import matplotlib.pyplot as plt
from IPython.display import Code

from minimoe.course import bugs, viz

from minimoe import gradcheck, layers, losses, router
from minimoe.core.moe import MoELayer
from minimoe.checks import lesson10 as check


def show(fn):
    """Display a function's source code."""
    return Code(inspect.getsource(fn), language="python")

# %% [markdown]
# ## Case 1 — The referral letters weighed in the wrong units
#
# *The clinic wants to know, before the day starts, how busy each specialist will be. For
# each patient and specialist it asks: "if the GP's hesitation about this one specialist were
# rolled again, how likely is the specialist to make the short list?" — and adds those
# chances up. To answer, it compares the specialist's score with the bar set by the others.
# But the scores are written in points and the bar is read off a chart in percentages.*
#
# That is the **smooth load** of lesson 05 (Shazeer et al. 2017, appendix A). With clean
# scores $L$, noisy scores $H = L + \varepsilon\odot\sigma$ and $\Phi$ the normal CDF,
#
# $$P(t,e) = \Phi\!\left(\frac{L_{te} - \mathrm{kth\_excluding}(H_t, k, e)}{\sigma_{te}}\right), \qquad
#   \mathrm{Load}_e = \sum_t P(t,e),$$
#
# where $\mathrm{kth\_excluding}(H_t,k,e)$ is the $k$-th largest noisy score among the
# *other* experts. $P(t,e)$ is exactly the probability that $e$ lands in token $t$'s top $k$
# if $e$'s own noise $\varepsilon_{te}$ is drawn again. The buggy version takes the threshold
# from the router's **softmax probabilities** instead of from $H$ — a number in $[0, 1]$
# compared with a logit:

# %%
show(bugs.bug1_load_loss_forward)

# %% [markdown]
# It runs, and nothing looks wrong. Here is the load it reports next to minimoe's, for twelve
# patients and four specialists:

# %%
L, H, sigma = check.load_fixture(0)
k = 2
print("buggy smooth load  ", np.round(check.buggy_smooth_load(L, H, sigma, k), 2))
print("minimoe smooth load", np.round(check.minimoe_smooth_load(L, H, sigma, k), 2))

# %% [markdown]
# Different — but which one is right? Both are *estimates*, so neither printout proves
# anything. And a gradient check cannot tell either: the buggy backward is the exact
# derivative of the buggy forward. (Like minimoe's `losses.load_loss_backward`, it returns the
# gradients of its three inputs positionally, `d_clean, d_noisy, d_sigma`, then the dict of
# parameter gradients, here `{}`; `gradcheck.as_pair(backward, "noisy", "sigma")` names the
# last two so that `check_pair` checks all three.)

# %%
print(bugs.gradient_matches_finite_differences(
    bugs.bug1_load_loss_forward, bugs.bug1_load_loss_backward, L, {"noisy": H, "sigma": sigma},
    kwargs={"k": k}, selection=lambda out, cache: cache.ranked))

# %% [markdown]
# A gradient check verifies that the backward matches the forward. It says nothing about
# whether the forward computes what the paper means. For that, compute the same quantity a
# second, independent way — here, by **simulation**: $P(t,e)$ *claims* to be a probability
# under redrawn noise, so redraw the noise and count.
#
# ### Exercise 1 — a simulation, then the fix
#
# **`load_is_honest`**: for each of `n_samples` draws, redraw only expert $e$'s own noise,
# $H'_{te} = L_{te} + \varepsilon'\sigma_{te}$ with $\varepsilon' \sim \mathcal N(0,1)$ from `rng`,
# keep the other experts' scores $H_{te'}$ as they are, and record whether fewer than $k$ of
# them beat $H'_{te}$ (then $e$ is in the top $k$). Averaging over draws gives $P(t,e)$;
# summing over tokens gives the load. Return `True` when every expert's load from
# `smooth_load(clean, noisy, sigma, k)` is within `tol` of the simulated one. (Broadcasting
# does all $T \times E$ pairs at once: compare an `(S, T, E, 1)` array with a `(1, T, 1, E)`
# one, then subtract each expert's comparison with itself.)
#
# **`fixed_smooth_load`**: the estimator the buggy code above should have been, with the bar
# read in the right units (which array did the formula say?). Return only the load $(E,)$.
#
# In every exercise of this lesson, minimoe's own checks and answers in `minimoe.course.bugs`
# (`load_matches_sampling`, `gradient_matches_finite_differences`, ...) are what you are
# writing: a check or a fix that calls one of them is refused. Calling the functions a check is
# *handed* to judge is its job.
#
# *Loops (the course's rule):* no Python loop over tokens in a fix — the check counts its Python
# steps at two numbers of tokens; loops over experts, choices or layers are fine, and a check may
# loop over the entries of its small fixture for finite differences, as
# `gradcheck.numerical_gradient` does.

# %%
def load_is_honest(smooth_load, clean, noisy, sigma, k, rng, n_samples=4000, tol=0.15):
    """True if smooth_load(clean, noisy, sigma, k) -> (E,) matches a simulation of P(t,e)."""
    ### BEGIN SOLUTION
    T, E = clean.shape
    redrawn = clean + rng.standard_normal((n_samples, T, E)) * sigma    # H'_te, (S,T,E)
    beats = noisy[None, :, None, :] > redrawn[..., None]               # (S,T,E,E'): e' beats e?
    others = beats.sum(axis=-1) - beats[..., np.arange(E), np.arange(E)]
    simulated = np.mean(others < k, axis=0).sum(axis=0)                 # (E,)
    return bool(np.all(np.abs(smooth_load(clean, noisy, sigma, k) - simulated) <= tol))
    ### END SOLUTION


def fixed_smooth_load(clean, noisy, sigma, k):
    """Shazeer et al.'s smooth load: (T, E) clean, noisy, sigma; k < E -> load (E,)."""
    ### BEGIN SOLUTION
    T, E = clean.shape
    t = np.arange(T)
    ranked = router.topk_indices(noisy, k + 1)
    in_topk = np.zeros((T, E), dtype=bool)
    in_topk[t[:, None], ranked[:, :k]] = True
    thr = np.where(in_topk, noisy[t, ranked[:, k]][:, None], noisy[t, ranked[:, k - 1]][:, None])
    return losses.normal_cdf((clean - thr) / sigma).sum(axis=0)
    ### END SOLUTION


# %% points=2
check.mixed_units(load_is_honest, fixed_smooth_load)

# %% [markdown]
# minimoe's `bugs.load_matches_sampling` is the reference version of your check:

# %%
for name, fwd in [("buggy", bugs.bug1_load_loss_forward), ("minimoe", losses.load_loss_forward)]:
    print(f"{name:>8}:", bugs.load_matches_sampling(fwd, L, H, sigma, k, np.random.default_rng(0)))

# %% [markdown]
# Does it matter in practice? Take a clinic that has collapsed — almost every patient goes to
# specialist 0 — and train only its GP ($W_\text{gate}$ and $W_\text{noise}$) on each version
# of the load loss, 300 steps of gradient descent. Then count the **real** referrals.

# %%
runs = {
    "buggy load loss": bugs.train_router_on_load_loss(bugs.bug1_load_loss_forward, bugs.bug1_load_loss_backward),
    "minimoe's load loss": bugs.train_router_on_load_loss(losses.load_loss_forward, losses.load_loss_backward),
}
for name, run in runs.items():
    print(f"{name:>20}: loss {run.loss[0]:.3f} -> {run.loss[-1]:.2g}; "
          f"real load {run.load_before} -> {run.load_after} (CV² {run.real_cv2[-1]:.3f})")
fig = viz.plot_balance_runs(runs)
plt.show()

# %% [markdown]
# The buggy loss does its job perfectly — it falls to almost exactly zero — and the clinic is
# still unbalanced: it balanced a quantity that is not the load. A falling loss curve is
# evidence that the optimizer works, not that the loss means what you think.
#
# ## Case 2 — The workload written in a log book nobody reads
#
# *Each evening the clinic manager writes down how busy every specialist was. The numbers are
# right and they appear in every report. But the GP never sees the book.*
#
# The Switch Transformer's balancing loss (Fedus et al. 2021, eq. 4–6; lesson 05) is
# $\alpha \cdot E \sum_e f_e P_e$, with $f_e$ the fraction of first choices (a count, no
# gradient) and $P_e$ the mean router probability (differentiable: that is the whole point).
# The buggy version turns $P$ into plain Python floats — in a framework, a `.item()`,
# `.detach()` or `.numpy()` — so the value is right and logged, and the gradient is gone:

# %%
show(bugs.bug2_switch_loss_forward)

# %%
probs = layers.softmax(np.random.default_rng(1).standard_normal((8, 4)))
first = probs.argmax(axis=1)
print("buggy loss  ", bugs.bug2_switch_loss_forward(probs, first)[0])
print("minimoe loss", losses.switch_loss_forward(probs, first)[0])
_, cache = bugs.bug2_switch_loss_forward(probs, first)
print("buggy backward, largest |dprobs|:", np.abs(bugs.bug2_switch_loss_backward(1.0, cache)[0]).max())

# %% [markdown]
# The training logs look perfect: the loss is there with the right value. Only a gradient
# check compares the backward with what the forward actually does.
#
# ### Exercise 2 — a gradient check, then the fix
#
# **`switch_loss_gradcheck`**: return `True` when `backward(1.0, cache)[0]` matches the
# finite-difference gradient of `forward(probs, first_choice)[0]` with respect to `probs`.
# Use `gradcheck.numerical_gradient(f, probs)` (lesson 01; it perturbs `probs` in place, so
# work on a copy) and `gradcheck.rel_error`, with a pass below `1e-6`.
#
# **`fixed_switch_loss_backward`**: the backward the buggy code should have had. The cache
# holds `f` $(E,)$ and `shape` $= (T, E)$. Derive $\partial\,\text{loss}/\partial\,\text{probs}_{te}$
# yourself from $\text{loss} = E \sum_e f_e P_e$ (remember what $P_e$ is, and that $f$ is a
# count with no gradient), multiply by `dloss`, and return `(dprobs, {})` like minimoe.
#
# *Loops (the course's rule):* no Python loop over tokens in a fix — the check counts its Python
# steps at two numbers of tokens; loops over experts, choices or layers are fine, and a check may
# loop over the entries of its small fixture for finite differences, as
# `gradcheck.numerical_gradient` does.

# %%
def switch_loss_gradcheck(forward, backward, probs, first_choice):
    """True if backward's dprobs matches finite differences of forward's loss value."""
    ### BEGIN SOLUTION
    probs = probs.copy()
    _, cache = forward(probs, first_choice)
    analytic = backward(1.0, cache)[0]
    numeric = gradcheck.numerical_gradient(lambda: forward(probs, first_choice)[0], probs)
    return gradcheck.rel_error(analytic, numeric) < 1e-6
    ### END SOLUTION


def fixed_switch_loss_backward(dloss, cache):
    """Backward of E * sum_e f_e P_e: returns (dprobs (T, E), {})."""
    ### BEGIN SOLUTION
    T, E = cache.shape
    return np.broadcast_to(dloss * E * cache.f / T, (T, E)).copy(), {}
    ### END SOLUTION


# %% points=2
check.no_gradient(switch_loss_gradcheck, fixed_switch_loss_backward)

# %% [markdown]
# ## Case 3 — The GP whose letters always say "100 % sure"
#
# *Each patient sees exactly one specialist, and the GP's letter always says "I am 100 %
# sure". Whatever happens next, the letter was right, so the GP never revises anything.*
#
# You met this in lesson 03: top-1 routing with the gate renormalized, $g = p_e / p_e = 1$,
# and no auxiliary loss. The task gradient into the router is exactly zero, and nothing else
# reaches it. The experts still learn, the loss still falls — which is why this one ships.

# %%
show(bugs.bug3_dead_router_layer)

# %% [markdown]
# ### Exercise 3 — is anybody training the GP?
#
# **`router_learns`**: run one training forward pass of `layer` on `x`
# (`layer.forward(x, train=True)`: the layer draws its router noise from its own generator, so
# `forward` takes no `rng`), then a backward pass with a random `dy` of the output's shape
# drawn from `rng` — that is all `rng` is for — and return `True` if `layer.grads["W_gate"]`
# — and `layer.grads["W_noise"]` if the layer has it — is not *exactly* zero.
#
# **`fixed_top1_layer`**: return an `MoELayer(d, h, E, ...)` with `k=1` and `rng=rng` whose
# router does learn. (Two ways; lesson 03 shows one, lesson 05 the other.)
#
# *Loops (the course's rule):* no Python loop over tokens in a fix — the check counts its Python
# steps at two numbers of tokens; loops over experts, choices or layers are fine, and a check may
# loop over the entries of its small fixture for finite differences, as
# `gradcheck.numerical_gradient` does.

# %%
def router_learns(layer, x, rng):
    """True if one forward/backward gives the router (W_gate, W_noise) a non-zero gradient."""
    ### BEGIN SOLUTION
    y = layer.forward(x, train=True)
    layer.backward(rng.standard_normal(y.shape))
    names = [n for n in ("W_gate", "W_noise") if n in layer.params]
    return all(np.any(layer.grads[n] != 0) for n in names)
    ### END SOLUTION


def fixed_top1_layer(d, h, E, rng):
    """A top-1 MoELayer whose router learns."""
    ### BEGIN SOLUTION
    return MoELayer(d, h, E, k=1, gate="switch", rng=rng)
    ### END SOLUTION


# %% points=2
check.dead_router(router_learns, fixed_top1_layer)

# %% [markdown]
# One more trap: the importance loss of lesson 05 does *not* revive a top-1 renormalized
# router. It acts on the gates, and the gates are all exactly 1:

# %%
x = np.random.default_rng(7).standard_normal((16, 6))
for label, kw in [("top-k gate, no loss", {}), ("top-k gate + importance loss", {"balance": "importance"}),
                  ("top-k gate + load loss", {"balance": "load"}), ("Switch gate", {"gate": "switch"})]:
    layer = MoELayer(6, 8, 4, k=1, rng=np.random.default_rng(0), **kw)
    print(f"{label:>30}:", bugs.router_gradient_is_nonzero(layer, x))

# %% [markdown]
# ## Case 4 — The GP who rolls a die on exam day
#
# *During training the GP is encouraged to hesitate, so that close calls sometimes go to the
# other specialist and both learn (lesson 04). On the day of the real exam the hesitation is
# still there: the same patient, seen twice, is sent to different specialists.*
#
# The noise of noisy top-k is for exploration while training. The buggy code adds it
# whenever the router *has* noise weights, and ignores the `train` flag:

# %%
show(bugs.bug4_router_logits_forward)

# %%
layer = bugs.NoisyEvalMoE(6, 8, 4, rng=np.random.default_rng(0))
for call_no in range(3):
    layer.forward(x, train=False)
    print(f"eval call {call_no}: first choice of patients 0-9:", layer.stats["topk_idx"][:10, 0])

# %% [markdown]
# Evaluation numbers drift from run to run, generated text changes with the same prompt and
# settings, and a benchmark is a little worse than it should be (each patient gets a noisier
# referral than the GP's best guess).
#
# ### Exercise 4 — a determinism test, then the fix
#
# **`eval_is_deterministic`**: `predict` takes no arguments (for example
# `lambda: layer.forward(x, train=False)`). Call it a few times and return `True` only if every
# output is *exactly* equal to the first.
#
# **`fixed_router_logits_forward`**: the router scores of lesson 04 done right: $L = x
# W_\text{gate}$; in training add $\varepsilon \odot \mathrm{softplus}(x W_\text{noise})$ with
# $\varepsilon$ drawn from `rng`; in eval (`train=False`) return $L$ unchanged. Return `H`
# (minimoe's version also returns a cache; you need not).
#
# *Loops (the course's rule):* no Python loop over tokens in a fix — the check counts its Python
# steps at two numbers of tokens; loops over experts, choices or layers are fine, and a check may
# loop over the entries of its small fixture for finite differences, as
# `gradcheck.numerical_gradient` does.

# %%
def eval_is_deterministic(predict):
    """True if predict() returns exactly the same array on repeated calls."""
    ### BEGIN SOLUTION
    outs = [np.array(predict()) for _ in range(3)]
    return all(np.array_equal(o, outs[0]) for o in outs[1:])
    ### END SOLUTION


def fixed_router_logits_forward(x, W_gate, W_noise, *, rng, train):
    """Router scores H (T, E): noisy in training only."""
    ### BEGIN SOLUTION
    L = x @ W_gate
    if not train:
        return L
    return L + rng.standard_normal(L.shape) * router.softplus(x @ W_noise)
    ### END SOLUTION


# %% points=2
check.noisy_eval(eval_is_deterministic, fixed_router_logits_forward)

# %% [markdown]
# A warning about how *not* to write this test: if `predict` re-seeds its generator on every
# call, the noise is the same each time and the test passes on the buggy code. Determinism is
# not enough; eval routing should also equal the **noise-free** routing.

# %%
x4, W4g, W4n = (np.random.default_rng(5).standard_normal(s) for s in [(8, 5), (5, 4), (5, 4)])
reseeded = lambda: bugs.bug4_router_logits_forward(x4, W4g, W4n, rng=np.random.default_rng(0), train=False)[0]
print("re-seeded each call:", bugs.eval_is_deterministic(reseeded))
print("equal to the clean scores x W_gate:", np.allclose(reseeded(), x4 @ W4g))

# %% [markdown]
# ## Case 5 — Shares rescaled by a number written down in advance
#
# *The GP splits a referral between two specialists and rescales the shares so they add up
# to 100 %. But the total used for the rescaling was written down before the shares changed:
# when one share goes up, the rescaling doesn't notice that the other must go down.*
#
# Top-k with renormalization: $g_j = p_j / s$ with $s = \sum_{j \in \text{top-}k} p_j$
# (lesson 03). If $s$ is treated as a constant (detached), the forward value is exactly right
# and the backward misses the quotient rule's second term:

# %%
show(bugs.bug5_renormalize_backward)

# %% [markdown]
# You could catch it with a gradient check. Here is a check that needs no finite
# differences at all — a **property test**. Each token's gates sum to exactly 1, *whatever*
# $p$ is. A function that is constant has zero gradient, so feeding `dg = ones` (the upstream
# gradient of $\sum_j g_j$) into the backward must give $dp = 0$.
#
# ### Exercise 5 — a property test, then the fix
#
# **`gates_sum_is_constant`**: run `forward(p, idx)`, then `backward(np.ones_like(g), cache)`,
# and return `True` if the resulting `dp` is zero up to rounding (say `atol=1e-10`).
#
# **`fixed_renormalize_backward`**: the correct backward for the cache `(g, s, idx, shape)`.
# Apply the quotient rule to $g_j = p_j / s$ with $s = \sum_{j'} p_{j'}$ over the chosen
# experts — every chosen $p$ appears in $s$ too — and write the result with $g$ and $s$; the
# experts not chosen get 0. Your property test above tells you whether you got it right.
# Return `(dp, {})`.
#
# *Loops (the course's rule):* no Python loop over tokens in a fix — the check counts its Python
# steps at two numbers of tokens; loops over experts, choices or layers are fine, and a check may
# loop over the entries of its small fixture for finite differences, as
# `gradcheck.numerical_gradient` does.

# %%
def gates_sum_is_constant(forward, backward, p, idx):
    """True if the gradient of sum_j g_j (which is always 1) is zero."""
    ### BEGIN SOLUTION
    g, cache = forward(p, idx)
    dp = backward(np.ones_like(g), cache)[0]
    return bool(np.allclose(dp, 0.0, atol=1e-10))
    ### END SOLUTION


def fixed_renormalize_backward(dg, cache):
    """Backward of g = p[idx] / sum(p[idx]): dg (T, k) -> (dp (T, E), {})."""
    g, s, idx, shape = cache
    ### BEGIN SOLUTION
    dp = np.zeros(shape)
    dp[np.arange(shape[0])[:, None], idx] = (dg - np.sum(dg * g, axis=1, keepdims=True)) / s
    return dp, {}
    ### END SOLUTION


# %% points=2
check.detached_sum(gates_sum_is_constant, fixed_renormalize_backward)

# %% [markdown]
# And the gradient check agrees, for every $k$ — including $k = 1$, where the true gradient
# is exactly zero (the dead router of case 3) and the detached sum quietly gives it one:

# %%
rng = np.random.default_rng(3)
p = layers.softmax(rng.standard_normal((6, 4)))
for k in (1, 2, 3):
    idx = router.topk_indices(p, k)
    for name, backward in [("detached sum", bugs.bug5_renormalize_backward),
                           ("minimoe", router.renormalize_backward)]:
        found = bugs.gradient_matches_finite_differences(router.renormalize_forward, backward, p,
                                                         kwargs={"idx": idx}, rng=rng)
        print(f"k = {k}, {name:>12}: gradient check {'passes' if found else 'FAILS'}")

# %% [markdown]
# ## Case 6 — The weekly report that always says "balanced"
#
# *Every week the clinic's report says the specialists were exactly as busy as each other —
# including the week every patient went to the same one.*
#
# Mixtral's balancing loss is the Switch loss of lesson 05 in its "all choices" form: with
# $f_e$ the number of tokens that put $e$ among their top $k$, divided by $T$ (so $f$ sums to
# $k$), and $P_e$ the mean router probability, $\text{loss} = E\sum_e f_e P_e$, which is $k$ at
# perfect balance. In December 2023 users of Hugging Face transformers reported that its
# Mixtral version "always return[s] a constant" (issue #28093). Here is the pattern, in NumPy:

# %%
show(bugs.bug6_mixtral_loss)

# %%
balanced, collapsed = bugs.routing_fixture(16, 4, None), bugs.routing_fixture(16, 4, 0)
for name, fn in [("buggy", bugs.bug6_mixtral_loss), ("right", bugs.mixtral_layer_loss)]:
    print(f"{name:>6}: balanced batch {fn(balanced, 2):.3f}   collapsed batch {fn(collapsed, 2):.3f}")

# %% [markdown]
# A constant has a zero gradient, and a gradient check compares zero with zero: it passes. A
# flat loss curve looks like a converged one. What exposes it is the question a balancing
# loss exists to answer: *is it larger when the routing is worse — and does it push back?*
#
# ### Exercise 6 — a liveness check, then the fix
#
# **`loss_is_alive`**: `layer_loss(logits, k)` returns a float. Return `True` when (a) it is
# larger on a batch collapsed onto one expert than on a balanced batch (`bugs.routing_fixture(T,
# E)` gives a balanced batch, `bugs.routing_fixture(T, E, 0)` one collapsed onto expert 0; take
# T = 16, E = 4), **and** (b) its finite-difference gradient with respect to the collapsed
# batch's logits is not zero (`gradcheck.numerical_gradient`; no backward is given). Why both?
# A loss of the counts $f$ alone reacts to a collapse, yet gives the router nothing to learn.
#
# **`fixed_mixtral_loss`**: Mixtral's loss on one layer's logits $(T, E)$, as described above
# (use `router.topk_indices` and `layers.softmax`).
#
# *Loops (the course's rule):* no Python loop over tokens in a fix — the check counts its Python
# steps at two numbers of tokens; loops over experts, choices or layers are fine, and a check may
# loop over the entries of its small fixture for finite differences, as
# `gradcheck.numerical_gradient` does.

# %%
def loss_is_alive(layer_loss, k):
    """True if layer_loss(logits, k) is larger on a collapsed batch and has a non-zero gradient."""
    ### BEGIN SOLUTION
    balanced, collapsed = bugs.routing_fixture(16, 4), bugs.routing_fixture(16, 4, 0)
    if not layer_loss(collapsed, k) > layer_loss(balanced, k) + 1e-9:
        return False
    x = collapsed.copy()
    g = gradcheck.numerical_gradient(lambda: layer_loss(x, k), x)
    return bool(np.max(np.abs(g)) > 1e-9)
    ### END SOLUTION


def fixed_mixtral_loss(logits, k):
    """E * sum_e f_e P_e for one layer's router logits (T, E); f counts all k choices."""
    ### BEGIN SOLUTION
    T, E = logits.shape
    f = np.bincount(router.topk_indices(logits, k).ravel(), minlength=E) / T
    P = layers.softmax(logits).mean(axis=0)
    return float(E * np.dot(f, P))
    ### END SOLUTION


# %% points=2
check.constant_loss(loss_is_alive, fixed_mixtral_loss)

# %% [markdown]
# ## Case 7 — One audit for the whole group of clinics
#
# *A group runs two clinics. In one, every patient goes to the cardiologist; in the other,
# every patient goes to the dermatologist. The group audits all its books at once — and finds
# the two specialists perfectly balanced.*
#
# A model has a router in every MoE layer, and each layer's experts are its own. The same
# transformers code concatenated all layers' router logits into one $(L\cdot T, E)$ array
# and computed one loss on it; in issue #28255 users pointed out that the loss should be per
# layer — the Switch Transformer adds "for each Switch layer" its auxiliary loss — because
# pooled, one layer's imbalance can cancel another's:

# %%
show(bugs.bug7_model_balance_loss)

# %%
layer_a, layer_b = bugs.routing_fixture(16, 4, 0, seed=1), bugs.routing_fixture(16, 4, 1, seed=2)
pooled = bugs.bug7_model_balance_loss([layer_a, layer_b], 2)
per_layer = [bugs.mixtral_layer_loss(v, 2) for v in (layer_a, layer_b)]
print(f"each layer on its own: {per_layer[0]:.3f} and {per_layer[1]:.3f} (each 2 at perfect balance), "
      f"together {sum(per_layer):.3f} (4 at perfect balance)")
print(f"the two layers pooled: {pooled:.3f} (one loss on the pooled tokens: 2 at perfect balance)")
shares = np.array([np.bincount(router.topk_indices(v, 2).ravel(), minlength=4) / 32
                   for v in (layer_a, layer_b, np.concatenate([layer_a, layer_b]))])
shares[2] /= 2
fig = viz.plot_pooled_balance(shares, ["layer 1", "layer 2", "pooled"],
                              title="Two collapsed layers look balanced when pooled")
plt.show()

# %% [markdown]
# Each collapsed layer on its own costs about 1.5 more than at perfect balance, 3.0 more for the
# two. Pooled, the two collapses cost 0.77 more than the pooled loss's own value at perfect
# balance (2): they mostly cancel out, and the loss tells the optimizer that all is nearly
# well. The check asks for the property the model loss must have: each layer's balance counts
# on its own, so the model's loss of two layers is the sum of what each costs alone.
#
# ### Exercise 7 — an additivity check, then the fix
#
# **`layers_seen_apart`**: `model_loss(layer_logits, k)` takes a list of $(T, E)$ arrays.
# Return `True` when, for two layers collapsed onto *different* experts (use
# `bugs.routing_fixture(16, 4, 0, seed=1)` and `bugs.routing_fixture(16, 4, 1, seed=2)`),
# `model_loss([A, B], k)` equals `model_loss([A], k) + model_loss([B], k)` (relative
# tolerance 1e-9). Why different experts? On two copies of one layer, a pooled loss times the
# number of layers looks right.
#
# **`fixed_model_loss`**: the model loss the buggy code should have computed. You may use
# `bugs.mixtral_layer_loss(logits, k)`, one layer's loss.
#
# *Loops (the course's rule):* no Python loop over tokens in a fix — the check counts its Python
# steps at two numbers of tokens; loops over experts, choices or layers are fine, and a check may
# loop over the entries of its small fixture for finite differences, as
# `gradcheck.numerical_gradient` does.

# %%
def layers_seen_apart(model_loss, k):
    """True if model_loss([A, B], k) == model_loss([A], k) + model_loss([B], k) for two layers
    collapsed onto different experts."""
    ### BEGIN SOLUTION
    A, B = bugs.routing_fixture(16, 4, 0, seed=1), bugs.routing_fixture(16, 4, 1, seed=2)
    both, alone = model_loss([A, B], k), model_loss([A], k) + model_loss([B], k)
    return bool(np.isclose(both, alone, rtol=1e-9, atol=0))
    ### END SOLUTION


def fixed_model_loss(layer_logits, k):
    """The model's balance loss for a list of layers' router logits, each (T_l, E)."""
    ### BEGIN SOLUTION
    return float(sum(bugs.mixtral_layer_loss(logits, k) for logits in layer_logits))
    ### END SOLUTION


# %% points=2
check.pooled_layers(layers_seen_apart, fixed_model_loss)

# %% [markdown]
# In minimoe's language model (`minimoe.lm`) every MoE layer computes its balancing loss on its
# own tokens, in `MoELayer.forward`, and the model adds the layers' `aux_loss`: nothing is ever
# pooled across layers.
#
# ## What the seven cases have in common
#
# | case | what the logs showed | what was wrong | the check |
# |---|---|---|---|
# | 1. wrong units | a falling load loss | the loss measures something else | simulate what it claims to estimate |
# | 2. no gradient | the right loss value | nothing reaches the router | gradient check vs finite differences |
# | 3. dead router | a falling task loss | the router gradient is exactly 0 | is the router gradient non-zero? |
# | 4. noisy eval | good training curves | eval changes from run to run | call eval twice, compare exactly |
# | 5. detached sum | the right gates | the gradient is wrong for every k | a constant has zero gradient |
# | 6. constant loss | a flat balance loss | it is the same number for any routing | larger when collapsed, with a gradient |
# | 7. pooled layers | a low balance loss | layers cancel each other's imbalance | the layers' losses add up |
#
# In every case the forward looked right and training "worked". Only a check of the
# *meaning* — of a gradient, a probability, a property — found the bug. That is why every
# backward pass in minimoe is written by hand and checked, and why `tests/course/test_bugs.py` runs
# each of these checks on each bug and on minimoe's own code.
#
# ## Questions to think about
#
# 1. Case 1's buggy backward passes the gradient check. Name another bug a gradient check can
#    never catch, and the check that would.
# 2. In case 2, the loss value is right. Which line of a training log would have shown that
#    the Switch loss was doing nothing — and how long would you have to train to see it?
# 3. Your determinism test in case 4 compares outputs *exactly*. When would exact comparison
#    be too strict for a correct layer?
# 4. The property test of case 5 needs no finite differences. Think of one property of the
#    top-k gate, the load loss or the dispatch that could serve as a test the same way.

# %% [markdown]
# ### BEGIN SOLUTION
# **Some answers.**
# 1. Any bug in the forward: a wrong formula, a wrong constant, the wrong loss. The backward
#    matches the (wrong) forward perfectly. Compare the forward with an independent
#    computation of the same quantity: a definition written one token at a time, a
#    simulation, a known value at a special point (e.g. the Switch loss is exactly 1 at
#    perfect balance).
# 2. The router's share of first choices $f$ (or the load CV), logged over training: it
#    would stay as unbalanced with the loss as without it. The gradient norm of `W_gate` from
#    the auxiliary loss alone is a sharper signal: it is exactly 0 from the first step.
# 3. On a GPU or with multithreaded BLAS, summation order can change between calls, so
#    floating-point results may differ in the last bits. Then compare with a tiny tolerance,
#    and separately check that the *routing* (the top-k indices) is identical.
# 4. Examples: the gates of a token sum to 1 (top-k gate) or to at most 1 (Switch gate);
#    the smooth load with $k = E$ is exactly $T$ for every expert; with no capacity limit,
#    each expert's load equals the number of tokens routed to it; backward is linear in
#    `dout`, and `backward(0) = 0`.
# ### END SOLUTION

# %%
check.progress()
