# %% [markdown]
# # Lesson 04 — A noisy GP
#
# **Difficulty** ★★★☆☆ · **Prerequisites** lesson 03 (top-k gates and their backward) ·
# **Time** about 45 minutes
#
# A GP who always refers the same kind of patient to the same specialist never finds out
# whether another specialist would have done better. Worse, a specialist who is never sent
# anyone never gets any practice, so never gets better, so is never chosen: the rich get
# richer. Shazeer et al. (2017) gave the GP a little **doubt**: before choosing, add random
# noise to each score, with a size the GP itself learns. Close calls then go sometimes to
# one specialist, sometimes to the other, and both learn.
#
# You will: write a stable softplus, the noisy scores and their backward pass, and a
# function that tells a gradient checker whether it is about to step across a tie.
#
# **Code to read alongside:** `minimoe/core/router.py` — `softplus`, `router_logits_forward`,
# `router_logits_backward`; `minimoe/core/gradcheck.py` — `KinkError`.

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

from minimoe import gradcheck, router
from minimoe.course import viz
from minimoe.core.moe import MoELayer
from minimoe.checks import lesson04 as check

# %% [markdown]
# ## 1. Noise with a learned width
#
# For tokens $x$ $(T,d)$ the clean scores are $L = x W_\text{gate}$ as before. A second
# matrix $W_\text{noise}$ $(d,E)$ sets how unsure the GP is, per token and specialist
# (Shazeer et al. 2017, eq. 4):
#
# $$\sigma = \mathrm{softplus}(x\, W_\text{noise}), \qquad H = L + \varepsilon \odot \sigma,
#   \qquad \varepsilon \sim \mathcal{N}(0, 1)\ \text{of shape } (T,E).$$
#
# The GP then routes on $H$ with any gate from lesson 03. The width $\sigma$ must be
# positive, hence **softplus**, $\mathrm{softplus}(z) = \log(1 + e^z)$: a smooth ReLU whose
# derivative is the sigmoid, $1/(1 + e^{-z})$. Like softmax, it needs care: $e^{z}$
# overflows for $z > 709$, and for very negative $z$, $1 + e^z$ rounds to exactly 1.
# `np.logaddexp(0, z)` $= \log(e^0 + e^z)$ avoids both.
#
# ### Exercise 1 — softplus
#
# *Loops (the course's rule):* no Python loop over tokens — the check runs your function at two
# numbers of tokens and counts the Python lines it executes, which must not grow; loops over
# experts, choices or ranks are fine.

# %%
def softplus(z):
    """log(1 + e^z), elementwise, without overflow or lost digits."""
    ### BEGIN SOLUTION
    return np.logaddexp(0, z)
    ### END SOLUTION


# %%
check.softplus(softplus)

# %% [markdown]
# ### Exercise 2 — noisy scores, forward
#
# The noise $\varepsilon$ is passed in (minimoe never reads hidden global random state, so
# the same $\varepsilon$ gives the same $H$). Return $H$ and the cache
# `(x, W_gate, W_noise, eps, z)` with $z = x W_\text{noise}$ before the softplus.
#
# *Loops (the course's rule):* no Python loop over tokens — the check runs your function at two
# numbers of tokens and counts the Python lines it executes, which must not grow; loops over
# experts, choices or ranks are fine.

# %%
def noisy_logits_forward(x, W_gate, W_noise, eps):
    """H = x W_gate + eps ⊙ softplus(x W_noise).

    Args:
        x: (T, d). W_gate, W_noise: (d, E). eps: (T, E) standard normal noise.

    Returns:
        H: (T, E), and cache = (x, W_gate, W_noise, eps, z) with z = x W_noise.
    """
    ### BEGIN SOLUTION
    z = x @ W_noise
    H = x @ W_gate + eps * np.logaddexp(0, z)
    return H, (x, W_gate, W_noise, eps, z)
    ### END SOLUTION


# %%
check.noisy_logits_forward(noisy_logits_forward)

# %% [markdown]
# ## 2. Backward through the noise
#
# Treat $\varepsilon$ as a constant that was drawn before the forward pass (this is the
# *reparameterisation* trick: the randomness is an input, so the path through $\sigma$ is
# an ordinary product). From $H = L + \varepsilon \odot \sigma$:
#
# $$dL = dH, \qquad d\sigma = \varepsilon \odot dH, \qquad dz = d\sigma \odot \mathrm{sigmoid}(z),$$
# $$dW_\text{gate} = x^\top dL, \qquad dW_\text{noise} = x^\top dz, \qquad
#   dx = dL\, W_\text{gate}^\top + dz\, W_\text{noise}^\top.$$
#
# Through $\sigma$ the GP learns *how unsure to be*: if a bit of noise on a score tends to
# help the loss, its width grows, and vice versa.
#
# ### Exercise 3 — noisy scores, backward
#
# *Loops (the course's rule):* no Python loop over tokens — the check runs your function at two
# numbers of tokens and counts the Python lines it executes, which must not grow; loops over
# experts, choices or ranks are fine.

# %%
def noisy_logits_backward(dH, cache):
    """Backward of noisy_logits_forward.

    Returns:
        dx (T, d) and {"W_gate": (d, E), "W_noise": (d, E)}.
    """
    x, W_gate, W_noise, eps, z = cache
    ### BEGIN SOLUTION
    dz = eps * dH / (1 + np.exp(-z))                 # softplus'(z) = sigmoid(z)
    dx = dH @ W_gate.T + dz @ W_noise.T
    return dx, {"W_gate": x.T @ dH, "W_noise": x.T @ dz}
    ### END SOLUTION


# %%
check.noisy_logits_backward(noisy_logits_backward)

# %% [markdown]
# ## 3. Why noise helps: exploration
#
# Twelve patients who look alike (their symptoms share a common direction), six specialists,
# top-2 referrals. The GP starts like minimoe's `MoELayer` does: $W_\text{noise} = 0$, so
# $\sigma = \mathrm{softplus}(0) = \log 2 \approx 0.69$ everywhere. We count, over 500
# visits, how often each patient is sent to each specialist — with the clean scores
# (evaluation) and with noisy ones (training). minimoe's `router_logits_forward` does the
# work.

# %%
rng = np.random.default_rng(4)
T, d, E, k = 12, 6, 6, 2
common = rng.standard_normal(d)
x = common + 0.4 * rng.standard_normal((T, d))               # patients who look alike
W_gate = 0.5 * rng.standard_normal((d, E))
W_noise = np.zeros((d, E))
rows = np.arange(T)[:, None]
visits = 500

clean = np.zeros((T, E))
H, _ = router.router_logits_forward(x, W_gate, W_noise, train=False)   # eval: no noise
clean[rows, router.topk_indices(H, k)] += visits
noisy = np.zeros((T, E))
for _ in range(visits):
    H, _ = router.router_logits_forward(x, W_gate, W_noise, rng=rng)    # train: fresh ε each visit
    noisy[rows, router.topk_indices(H, k)] += 1

print("specialists who ever see a patient:  clean", int((clean.sum(0) > 0).sum()),
      "of", E, "   noisy", int((noisy.sum(0) > 0).sum()), "of", E)
fig = viz.plot_exploration({"clean scores (eval)": clean, "noisy scores (training)": noisy}, visits)
plt.show()

# %% [markdown]
# Without noise, every patient always sees the same two specialists, a couple of
# specialists do nearly all the work, and some see no one at all — and since an expert's
# weights only get gradient from the tokens it is sent, those would never improve. With noise the close calls are shared: the runner-ups get patients, gradient,
# and a chance to become good at something. The decisive cases (a big gap between scores)
# stay where they were.
#
# ## 4. Training and evaluation
#
# Noise is for learning, not for answering. At evaluation time the GP routes on the clean
# scores, so the same patient always gets the same referral. In minimoe that is the `train`
# flag:

# %%
layer = MoELayer(d_model=6, d_hidden=8, n_experts=6, k=2, noisy=True, rng=np.random.default_rng(0))
y_train_1 = layer.forward(x, train=True)
y_train_2 = layer.forward(x, train=True)
y_eval_1 = layer.forward(x, train=False)
y_eval_2 = layer.forward(x, train=False)
print("two training passes agree:", np.allclose(y_train_1, y_train_2))
print("two eval passes agree:    ", np.array_equal(y_eval_1, y_eval_2))

# %% [markdown]
# For a gradient check, the noise must also be fixed: `layer.forward(x, noise=eps)` takes
# an explicit $\varepsilon$ of shape $(T,E)$, so every nudged forward pass sees the same draw.
#
# ## 5. Ties: where finite differences break
#
# Top-k is a *choice*, and a choice is a step function. Slide one specialist's score up past
# the $k$-th best and the referral changes all at once: a new specialist's answer replaces the
# old one in the mix. The loss **jumps**. Below, one patient's 3rd-best score rises through
# the 2nd (with $k = 2$):

# %%
rng = np.random.default_rng(5)
E, d = 4, 3
H0 = np.array([[1.0, 0.4, 0.1, -0.5]])            # experts 0 and 1 chosen; expert 2 is third
answers = rng.standard_normal((E, d))              # each specialist's answer for this patient
dy = rng.standard_normal(d)


def loss(shift):
    """<dy, y> with y the top-2 mix, after raising expert 2's score by `shift`."""
    H = H0.copy()
    H[0, 2] += shift
    routing, _ = router.topk_gate_forward(H, k=2)
    y = (routing.gates[0][:, None] * answers[routing.idx[0]]).sum(0)
    return float(dy @ y)


tie = H0[0, 1] - H0[0, 2]                           # the shift at which experts 1 and 2 tie
shifts = np.linspace(0, 2 * tie, 401)
fig = viz.plot_kink(shifts, [loss(s) for s in shifts], tie, 0.02,
                    "Top-k makes the loss jump where two scores tie")
plt.show()

h = 1e-5
print(f"slope just before the tie:                 {(loss(tie - 2 * h) - loss(tie - 4 * h)) / (2 * h):+.4f}")
print(f"slope just after the tie:                  {(loss(tie + 4 * h) - loss(tie + 2 * h)) / (2 * h):+.4f}")
print(f"a central difference straddling the tie:   {(loss(tie + h) - loss(tie - h)) / (2 * h):+.1f}")

# %% [markdown]
# A central difference that straddles the tie divides a jump by $2h$ and reports a huge,
# meaningless "slope". The analytic gradient is right on both sides; it's the *check* that
# breaks. So before trusting a finite difference, measure how far each token is from a tie:
# the **top-k margin**, the gap between the $k$-th largest score (the last one chosen) and
# the $(k+1)$-th (the first one left out). A nudge of size $h$ to one score changes a gap by
# at most $h$, so a margin larger than $h$ is safe. minimoe's fixtures keep margins
# $\ge 10^{-3}$, a hundred times the step.
#
# ### Exercise 4 — the top-k margin
#
# *Loops (the course's rule):* no Python loop over tokens — the check runs your function at two
# numbers of tokens and counts the Python lines it executes, which must not grow; loops over
# experts, choices or ranks are fine.

# %%
def topk_margin(H, k):
    """Gap between each row's k-th and (k+1)-th largest score.

    Args:
        H: (T, E) scores. k: 1 <= k < E.

    Returns:
        (T,) margins, all >= 0.
    """
    ### BEGIN SOLUTION
    s = -np.sort(-H, axis=1)                         # each row, largest first
    return s[:, k - 1] - s[:, k]
    ### END SOLUTION


# %%
check.topk_margin(topk_margin)

# %% [markdown]
# minimoe's gradient checker does something more direct: it records the routing (which
# experts each token chose) before the check and after every nudge, and raises `KinkError`
# if a nudge changed it, instead of reporting a bogus gradient error. Here we build a layer
# whose first token has its 2nd and 3rd scores $10^{-7}$ apart, and ask for a check:

# %%
layer = MoELayer(d_model=3, d_hidden=4, n_experts=4, k=2, noisy=False, rng=np.random.default_rng(0))
x = np.random.default_rng(1).standard_normal((3, 3))
L = x @ layer.params["W_gate"]
second, third = np.argsort(-L[0])[1:3]
gap = L[0, second] - L[0, third]
layer.params["W_gate"][:, third] += (gap - 1e-7) * x[0] / (x[0] @ x[0])   # close the gap to 1e-7
print("top-2 margins:", check.topk_margin_ref(x @ layer.params["W_gate"], 2))
try:
    gradcheck.check_layer(layer, x)
except gradcheck.KinkError as err:
    print("KinkError:", err)

# %% [markdown]
# ## Questions to think about
#
# 1. Why is the noise's width *learned* rather than fixed? What would the GP do with
#    $W_\text{noise}$ if the noise only ever hurt the loss?
# 2. The exploration figure had one common direction in all the patients. Why does that make
#    the no-noise GP's choices so uniform?
# 3. With continuous random inputs, exact ties have probability zero. Why do they still matter
#    in practice — think of float32, of repeated tokens, of a freshly initialised router.
# 4. The Switch Transformer dropped the learned noise. What else could make a GP explore?

# %% [markdown]
# ### BEGIN SOLUTION
# **Some answers.**
# 1. So the GP can be uncertain where it helps and sure where it doesn't; if noise only hurt,
#    the gradient through $\sigma$ would push $x W_\text{noise}$ negative and
#    $\sigma = \mathrm{softplus}(\cdot) \to 0$: the noise switches itself off.
# 2. The scores $x W_\text{gate}$ of similar patients are similar, so they all rank the
#    specialists the same way; only the small differences between patients can change the
#    ranking, and without noise nothing else does.
# 3. Float32 scores tie far more often than float64; repeated tokens (padding, common words)
#    produce identical scores on every copy; and a near-zero initial router makes all scores
#    nearly equal, so many tokens sit close to a tie at the start of training.
# 4. Load-balancing losses (lesson 05) that push the router to spread tokens; multiplicative
#    "jitter" on the inputs (Switch); capacity limits that overflow tokens to other experts;
#    or a selection bias adjusted from the observed loads (lesson 09).
# ### END SOLUTION

# %%
check.progress()
