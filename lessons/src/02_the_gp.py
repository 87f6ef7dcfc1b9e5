# %% [markdown]
# # Lesson 02 — The GP
#
# **Difficulty** ★★☆☆☆ · **Prerequisites** lesson 01 (FFN backward, gradient checks) ·
# **Time** about 45 minutes
#
# The general practitioner doesn't treat you. They listen to your symptoms, form a view of
# which specialists fit your case, and weigh their advice. In an MoE the GP is the
# **router**: a single matrix that scores every expert for every token, and a softmax that
# turns the scores into shares of trust. In this lesson the GP consults *every* specialist
# and mixes their answers — a dense mixture of experts. Lesson 03 will make it choose.
#
# You will: write a numerically stable softmax, its backward pass as a Jacobian-vector
# product, the dense mixture of all experts, and its backward.
#
# **Code to read alongside:** `minimoe/core/layers.py` (`softmax`, `softmax_backward`),
# `minimoe/core/router.py` (`router_logits_forward`, `dense_gate_forward`, `dense_gate_backward`).

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

from minimoe import experts, gradcheck, layers, router
from minimoe.course import viz
from minimoe.core.moe import MoELayer
from minimoe.checks import lesson02 as check

# %% [markdown]
# ## 1. Scores and shares
#
# For $T$ patients $x$ $(T,d)$ and $E$ specialists, the GP's **logits** are one matrix
# product,
#
# $$L = x\, W_\text{gate}, \qquad W_\text{gate}\ (d,E), \quad L\ (T,E).$$
#
# $L_{te}$ says how well specialist $e$ fits patient $t$. Column $e$ of $W_\text{gate}$ is
# the GP's picture of a typical patient for specialist $e$: the score is a dot product, high
# when the symptoms point the same way. The **gates** turn scores into shares that are
# positive and sum to 1 over the experts:
#
# $$G_{te} = \mathrm{softmax}(L_t)_e = \frac{e^{L_{te}}}{\sum_{j} e^{L_{tj}}}.$$
#
# Computed literally, $e^{L}$ overflows to `inf` once a logit passes about 710 (float64), and
# `inf / inf` is `nan`. But softmax doesn't change if you subtract the same number from a
# whole row. Subtract the row's maximum: the largest exponent becomes $e^0 = 1$, nothing
# overflows, and at least one term of the sum is 1, so nothing divides by zero either.
#
# ### Exercise 1 — a stable softmax, row by row
#
# *Loops (the course's rule):* no Python loop over tokens — the check runs your function at two
# numbers of tokens and counts the Python lines it executes, which must not grow; loops over
# experts, choices or ranks are fine.

# %%
def softmax(z):
    """Row-wise softmax of z (T, E), stable for any finite logits."""
    ### BEGIN SOLUTION
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)
    ### END SOLUTION


# %%
check.softmax(softmax)

# %% [markdown]
# ## 2. How the shares respond: softmax backward
#
# Raising one score $z_j$ raises its own share and lowers all the others (they still sum to 1).
# The Jacobian of one row, $p = \mathrm{softmax}(z)$, is
#
# $$\frac{\partial p_i}{\partial z_j} = p_i(\delta_{ij} - p_j),
#   \qquad J = \mathrm{diag}(p) - p\,p^\top \quad (E \times E).$$
#
# Backward needs $dz = J^\top dp$ for each token. Building $J$ costs $E^2$ per token and
# is wasteful; multiply it out instead ($J$ is symmetric):
#
# $$dz_j = \sum_i dp_i\, p_i(\delta_{ij} - p_j) = p_j\Big(dp_j - \sum_i dp_i\, p_i\Big),
#   \qquad dz = p \odot \big(dp - \langle dp, p\rangle\big).$$
#
# One number per token, $\langle dp, p\rangle$, the $p$-weighted average of the upstream
# gradient: each logit's gradient is its share times how much its own upstream gradient
# beats that average. This is a **Jacobian-vector product**, the way every backward pass in
# minimoe is written.
#
# ### Exercise 2 — softmax backward
#
# Given $dp$ $(T,E)$ and the forward output $p$ $(T,E)$, return $dz$ $(T,E)$.
#
# *Loops (the course's rule):* no Python loop over tokens — the check runs your function at two
# numbers of tokens and counts the Python lines it executes, which must not grow; loops over
# experts, choices or ranks are fine.

# %%
def softmax_backward(dp, p):
    """dz = p ⊙ (dp − ⟨dp, p⟩) for each row: the Jacobian-vector product of softmax."""
    ### BEGIN SOLUTION
    return p * (dp - np.sum(dp * p, axis=-1, keepdims=True))
    ### END SOLUTION


# %%
check.softmax_backward(softmax_backward)

# %% [markdown]
# ## 3. Temperature: how decisive is the GP?
#
# Divide the scores by a **temperature** $\tau$ before the softmax, $G = \mathrm{softmax}(L/\tau)$.
# The favourite specialist doesn't change — dividing by $\tau > 0$ keeps the order — but the
# GP's *confidence* does: a cold GP ($\tau \to 0$) gives all the trust to the favourite, a
# warm one ($\tau \to \infty$) spreads it evenly.
#
# Below, patients have two symptoms ($d = 2$) so we can draw every possible patient. Each
# point of the plane is coloured by the GP's favourite among $E = 5$ specialists, and faded
# to white where the GP is unsure. The regions are wedges: each score is linear in $x$,
# so the boundary between two favourites is a straight line through the origin.

# %%
rng = np.random.default_rng(3)
E = 5
angles = 2 * np.pi * np.arange(E) / E + 0.3
W_gate = np.stack([np.cos(angles), np.sin(angles)]) * np.array([1.0, 1.6, 1.2, 2.0, 1.4])  # (2, E)
xs = np.linspace(-3, 3, 121)
xx, yy = np.meshgrid(xs, xs)
plane = np.stack([xx.ravel(), yy.ravel()], axis=1)           # (121², 2): every patient
L = plane @ W_gate
temps = (0.25, 1.0, 4.0)
maps = {t: layers.softmax(L / t).reshape(len(xs), len(xs), E) for t in temps}
patients = np.clip(rng.standard_normal((60, 2)) * 1.2, -2.9, 2.9)
fig = viz.plot_referral_map(xx, yy, maps, patients)
plt.show()

for t in temps:
    print(f"τ = {t:4}: the favourite gets {maps[t].max(-1).mean():.2f} of the trust on average")

tau = 0.25
G = layers.softmax(L / tau)
dz, _ = layers.softmax_backward(rng.standard_normal(L.shape), layers.SoftmaxCache(G, -1))
dL = dz / tau                                            # chain rule through L / τ
sure = G.max(axis=1) > 0.99
print(f"\nat τ = {tau}: the GP is >99% sure for {sure.mean():.0%} of the plane; mean |dL| there "
      f"{np.abs(dL[sure]).mean():.4f}, elsewhere {np.abs(dL[~sure]).mean():.4f}")

# %% [markdown]
# Notice the last line: where the GP is very sure, it also **learns very little**. When one
# share is near 1 and the others near 0, $p \odot (dp - \langle dp,p\rangle)$ is near 0
# everywhere — a saturated softmax passes almost no gradient. Hold on to that: in lesson 03
# it becomes exactly zero.
#
# ## 4. Asking every specialist: the dense mixture
#
# With $E$ experts stacked as `W1 (E,d,h)`, `b1 (E,h)`, `W2 (E,h,d)`, `b2 (E,d)`, the dense
# mixture runs them all and weighs their answers:
#
# $$y_t = \sum_{e=1}^{E} G_{te}\, \mathrm{FFN}_e(x_t), \qquad G = \mathrm{softmax}(x W_\text{gate}).$$
#
# Loop over the experts (never over tokens): `experts.ffn_forward(x, W1[e], b1[e], W2[e], b2[e])`
# from minimoe gives each expert's answer for all $T$ tokens and its cache. Stack the answers
# into $Y$ $(E,T,d)$, then mix; `np.einsum("te,etd->td", G, Y)` or a sum of
# `G[:, e:e+1] * Y[e]` both work.
#
# ### Exercise 3 — the dense mixture, forward
#
# Return `y` and the cache `(x, W_gate, G, Y, ffn_caches)` (a list of the $E$ expert caches).
#
# *Loops (the course's rule):* no Python loop over tokens — the check runs your function at two
# numbers of tokens and counts the Python lines it executes, which must not grow; loops over
# experts, choices or ranks are fine.

# %%
def dense_moe_forward(x, W_gate, W1, b1, W2, b2):
    """Dense MoE: y = Σ_e G_e ⊙ FFN_e(x), G = softmax(x W_gate).

    Args:
        x: (T, d). W_gate: (d, E). W1: (E, d, h), b1: (E, h), W2: (E, h, d), b2: (E, d).

    Returns:
        y: (T, d), and cache = (x, W_gate, G, Y, ffn_caches) with G (T, E), Y (E, T, d).
    """
    ### BEGIN SOLUTION
    G = layers.softmax(x @ W_gate)                               # (T, E) the GP's shares
    outs = [experts.ffn_forward(x, W1[e], b1[e], W2[e], b2[e]) for e in range(W1.shape[0])]
    Y = np.stack([y_e for y_e, _ in outs])                       # (E, T, d) every opinion
    y = np.einsum("te,etd->td", G, Y)
    return y, (x, W_gate, G, Y, [c for _, c in outs])
    ### END SOLUTION


# %%
check.dense_moe_forward(dense_moe_forward)

# %% [markdown]
# ## 5. The dense mixture, backward
#
# Follow $y_t = \sum_e G_{te} Y_{et}$ back. It is a product, so each factor gets the upstream
# gradient times the other:
#
# $$dY_{e} = G_{:,e} \odot dy \quad (T,d), \qquad dG_{te} = \langle dy_t, Y_{et}\rangle \quad (T,E).$$
#
# Then: each expert backward with its own upstream $dY_e$ (`experts.ffn_backward(dY_e, cache_e)`
# returns $dx_e$ and the gradients of its `W1[e], b1[e], W2[e], b2[e]`); the gates back
# through the softmax, $dL = G \odot (dG - \langle dG, G\rangle)$; and the scores back
# through $L = x W_\text{gate}$: $dW_\text{gate} = x^\top dL$. Finally, $x$ reached the
# output by $E + 1$ paths — through each expert and through the GP — so
#
# $$dx = dL\, W_\text{gate}^\top + \sum_e dx_e.$$
#
# ### Exercise 4 — the dense mixture, backward
#
# Return `dx` and a dict with `"W_gate"`, and the stacked `"W1"`, `"b1"`, `"W2"`, `"b2"`
# (same shapes as the parameters).
#
# *Loops (the course's rule):* no Python loop over tokens — the check runs your function at two
# numbers of tokens and counts the Python lines it executes, which must not grow; loops over
# experts, choices or ranks are fine.

# %%
def dense_moe_backward(dy, cache):
    """Backward of dense_moe_forward.

    Args:
        dy: (T, d). cache: (x, W_gate, G, Y, ffn_caches).

    Returns:
        dx (T, d) and {"W_gate": (d,E), "W1": (E,d,h), "b1": (E,h), "W2": (E,h,d), "b2": (E,d)}.
    """
    x, W_gate, G, Y, ffn_caches = cache
    ### BEGIN SOLUTION
    dG = np.einsum("td,etd->te", dy, Y)                          # how each share moved the loss
    dx = np.zeros_like(x)
    per_expert = []
    for e, c in enumerate(ffn_caches):
        dx_e, g_e = experts.ffn_backward(G[:, e:e + 1] * dy, c)  # expert e's answer was scaled by G_e
        dx += dx_e
        per_expert.append(g_e)
    dL = G * (dG - np.sum(dG * G, axis=1, keepdims=True))        # softmax backward
    dx += dL @ W_gate.T                                          # the path through the GP
    grads = {name: np.stack([g[name] for g in per_expert]) for name in ("W1", "b1", "W2", "b2")}
    grads["W_gate"] = x.T @ dL
    return dx, grads
    ### END SOLUTION


# %%
check.dense_moe_backward(dense_moe_backward)

# %% [markdown]
# ## 6. minimoe's version
#
# `MoELayer(..., gate="dense")` is the same layer inside minimoe: `router.py` computes
# $L$ and the dense gate, `dispatch.py` and `experts.py` run the experts. Here is its full
# gradient check — every parameter and the input, at two step sizes:

# %%
layer = MoELayer(d_model=3, d_hidden=4, n_experts=3, gate="dense", noisy=False,
                 rng=np.random.default_rng(0))
x = np.random.default_rng(1).standard_normal((4, 3))
reports = gradcheck.check_layer(layer, x, rng=np.random.default_rng(2))
worst = max(r.normwise for r in reports)
print(f"{len(reports)} checks passed; worst normwise relative error {worst:.1e}")
print(f"compute per token: {layer.flops_per_token()} FLOPs — all {layer.n_experts} experts ran")

# %% [markdown]
# The dense mixture is good advice at full price: every patient sees every specialist. The
# next lesson gives the GP the power to *refer* — and shows how easily that breaks its
# ability to learn.
#
# ## Questions to think about
#
# 1. Why is it safe to subtract the row maximum inside softmax, but not a different number
#    for each expert?
# 2. With $E = 2$, softmax is a sigmoid of $L_1 - L_2$. What does $W_\text{gate}$'s second
#    column add that the first doesn't? (Hint: how many parameters does the GP really need?)
# 3. A temperature $\tau$ can be folded into $W_\text{gate}$. So why do papers ever add one?
# 4. In the dense mixture, every expert gets a gradient from every token. What will change
#    when each token sees only $k$ of them?

# %% [markdown]
# ### BEGIN SOLUTION
# **Some answers.**
# 1. Softmax is invariant to adding the same constant to every entry of a row: it multiplies
#    numerator and denominator by the same $e^{-c}$. Different constants per expert change
#    the scores' differences, and so the answer.
# 2. Only $L_1 - L_2 = x(w_1 - w_2)$ matters: one direction. In general one column of
#    $W_\text{gate}$ is redundant (adding a vector to every column changes nothing);
#    harmless, and it keeps the experts symmetric.
# 3. As a *fixed* schedule (e.g. annealing from soft to hard routing) or as a knob at
#    inference time, without retraining; and because the scale of learned logits drifts,
#    which the z-loss of lesson 05 controls.
# 4. An expert's weights get gradient only from the tokens routed to it; an expert that is
#    never chosen never learns — the start of the load-balancing story.
# ### END SOLUTION

# %%
check.progress()
