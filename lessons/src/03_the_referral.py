# %% [markdown]
# # Lesson 03 — The referral
#
# **Difficulty** ★★★☆☆ · **Prerequisites** lesson 02 (softmax and its backward) ·
# **Time** about 45 minutes
#
# A good GP doesn't send you to all fifty specialists. They pick the one or two who fit your
# case best, and you see only those. That is **top-k routing**, the step that makes a
# mixture of experts *sparse*: each token runs through $k$ of the $E$ experts, so the layer
# holds $E$ experts' worth of parameters for about $k$ experts' worth of compute.
#
# Choosing is a discrete act, and gradients don't flow through choices. This lesson builds
# the three standard ways to turn the GP's scores into referral weights, shows that two
# recipes you'll meet in papers are the same function, and walks into the trap that catches
# almost everyone who first writes a $k = 1$ router.
#
# **Code to read alongside:** `minimoe/core/router.py` — `topk_indices`, `keep_topk_forward`,
# `topk_gate_forward/backward`, `renormalize_forward/backward`, `switch_gate_forward/backward`.

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

from minimoe import layers, router
from minimoe.course import viz
from minimoe.core.moe import MoELayer
from minimoe.checks import lesson03 as check

# %% [markdown]
# ## 1. Keep the top k
#
# Write the GP's scores for $T$ tokens as $H$ $(T,E)$ (in lesson 04 they get noise; for now
# $H = L = x W_\text{gate}$). Shazeer et al. (2017, eq. 5) define
#
# $$\mathrm{KeepTopK}(H, k)_{te} = \begin{cases} H_{te} & \text{if } H_{te} \text{ is among the } k \text{ largest of row } t\\ -\infty & \text{otherwise.}\end{cases}$$
#
# Then $G = \mathrm{softmax}(\mathrm{KeepTopK}(H, k))$: the $-\infty$ entries get
# $e^{-\infty} = 0$, so a token's weight is shared among its $k$ specialists only.
# `np.argsort(H, axis=1)` sorts each row ascending (its last $k$ columns are the top $k$);
# `np.argpartition` does it without a full sort. `np.put_along_axis` or a boolean mask built
# with fancy indexing `mask[np.arange(T)[:, None], idx] = True` puts them back.
#
# ### Exercise 1 — KeepTopK
#
# *Loops (the course's rule):* no Python loop over tokens — the check runs your function at two
# numbers of tokens and counts the Python lines it executes, which must not grow; loops over
# experts, choices or ranks are fine.

# %%
def keep_topk(H, k):
    """Keep each row's k largest scores; set the others to -inf.

    Args:
        H: (T, E) scores. k: experts per token, 1 <= k <= E.

    Returns:
        (T, E) array: H where kept, -np.inf elsewhere.
    """
    ### BEGIN SOLUTION
    idx = np.argsort(H, axis=1)[:, -k:]                    # the k largest of each row
    out = np.full_like(H, -np.inf)
    rows = np.arange(H.shape[0])[:, None]
    out[rows, idx] = H[rows, idx]
    return out
    ### END SOLUTION


# %%
check.keep_topk(keep_topk)

# %% [markdown]
# ## 2. Two recipes, one function
#
# Many implementations (Mixtral's among them) do it in the other order: softmax over all $E$
# scores, keep the $k$ largest probabilities, and renormalise them to sum to 1. Same thing?
# For a kept expert $e$, with $Z = \sum_j e^{H_j}$ over all experts and $K$ the kept set,
#
# $$\frac{p_e}{\sum_{j\in K} p_j} = \frac{e^{H_e}/Z}{\sum_{j\in K} e^{H_j}/Z}
#   = \frac{e^{H_e}}{\sum_{j\in K} e^{H_j}} = \mathrm{softmax}(\mathrm{KeepTopK}(H,k))_e.$$
#
# $Z$ cancels. Same values — and since they are the same function of $H$ wherever the top-k
# set doesn't change, the same gradients too.
#
# ### Exercise 2 — the renormalise recipe
#
# Return the **dense** gate matrix $G$ $(T,E)$: the renormalised shares at each token's
# top $k$, and 0 elsewhere. (You may use `layers.softmax`.) The check compares it with
# `softmax(KeepTopK(H, k))`.
#
# *Loops (the course's rule):* no Python loop over tokens — the check runs your function at two
# numbers of tokens and counts the Python lines it executes, which must not grow; loops over
# experts, choices or ranks are fine.

# %%
def renormalized_gate(H, k):
    """softmax over all experts -> keep the top k -> renormalise. Returns G (T, E)."""
    ### BEGIN SOLUTION
    p = layers.softmax(H)
    keep = np.zeros(H.shape, dtype=bool)
    keep[np.arange(H.shape[0])[:, None], np.argsort(H, axis=1)[:, -k:]] = True
    G = np.where(keep, p, 0.0)
    return G / G.sum(axis=1, keepdims=True)
    ### END SOLUTION


# %%
check.renormalized_gate(renormalized_gate)

# %% [markdown]
# minimoe has both recipes in `router.py`, each with a hand-written backward. Their gradients
# agree to the last few bits:

# %%
rng = np.random.default_rng(0)
H = check.scores(0, T=6, E=5)
dgates = rng.standard_normal((6, 2))

routing, cache = router.topk_gate_forward(H, k=2)                 # softmax over the kept scores
dH_topk, _ = router.topk_gate_backward(dgates, cache)

p, sm_cache = layers.softmax_forward(H)                           # softmax -> keep -> renormalise
g, rn_cache = router.renormalize_forward(p, routing.idx)
dp, _ = router.renormalize_backward(dgates, rn_cache)
dH_renorm, _ = layers.softmax_backward(dp, sm_cache)

print("gates differ by at most      ", np.abs(routing.gates - g).max())
print("gradients differ by at most  ", np.abs(dH_topk - dH_renorm).max())

# %% [markdown]
# ## 3. Three gates
#
# | gate | $G$ at the chosen experts | sums to | used by |
# |---|---|---|---|
# | dense | $\mathrm{softmax}(H)$, all $E$ | 1 | lesson 02 |
# | top-k | $\mathrm{softmax}(\mathrm{KeepTopK}(H,k))$ | 1 | Shazeer et al. 2017, Mixtral |
# | Switch | $\mathrm{softmax}(H)$ read at the top $k$, **not** renormalised | < 1 | Switch Transformer (Fedus et al. 2021), k = 1 |
#
# One patient, five specialists:

# %%
H1 = np.array([[1.2, -0.3, 2.0, 0.4, 1.7]])
p1 = layers.softmax(H1)[0]
top2 = np.isin(np.arange(5), router.topk_indices(H1, 2)[0])
fig = viz.plot_gates(H1[0], {
    "dense": p1,
    "top-2 (renormalised)": check.topk_gate_ref(H1, 2)[0],
    "Switch, top-2": np.where(top2, p1, 0.0),
})
plt.show()

# %% [markdown]
# ## 4. The backward pass of the top-k gate
#
# The top-k gate is a softmax over the kept scores, so its backward is the softmax backward
# of lesson 02 — with $G$ in place of $p$. Because $G$ is 0 at the dropped experts, the
# formula takes care of them by itself:
#
# $$dH = G \odot \big(dG - \langle dG, G\rangle\big).$$
#
# (Strictly, KeepTopK is only piecewise differentiable: where two scores tie for the $k$-th
# place the choice flips. Lesson 04 deals with that. Everywhere else this is exact.)
#
# ### Exercise 3 — top-k gate backward
#
# `dG` and `G` are dense $(T,E)$ matrices; return $dH$ $(T,E)$.
#
# *Loops (the course's rule):* no Python loop over tokens — the check runs your function at two
# numbers of tokens and counts the Python lines it executes, which must not grow; loops over
# experts, choices or ranks are fine.

# %%
def topk_gate_backward(dG, G):
    """Backward of G = softmax(KeepTopK(H, k)), given the dense gates G (T, E)."""
    ### BEGIN SOLUTION
    return G * (dG - np.sum(dG * G, axis=1, keepdims=True))
    ### END SOLUTION


# %%
check.topk_gate_backward(topk_gate_backward)

# %% [markdown]
# ## 5. The trap: k = 1
#
# Now set $k = 1$ — one specialist per patient, the cheapest referral of all. The kept set is
# one expert, so its weight is $e^{H_e}/e^{H_e} = 1$, *whatever the score*. Put $G_e = 1$ in
# the formula above:
#
# $$dH_e = 1 \cdot (dG_e - dG_e \cdot 1) = 0.$$
#
# The GP's scores get **exactly zero gradient** from the task. The router never learns; the
# referrals stay whatever the random initialisation made them. Check it with minimoe:

# %%
H = rng.standard_normal((8, 4))
routing, cache = router.topk_gate_forward(H, k=1)
dH, _ = router.topk_gate_backward(rng.standard_normal((8, 1)), cache)
print("top-1 gates:", routing.gates.ravel())
print("largest |dH| with the top-k gate, k = 1:", np.abs(dH).max())

routing, cache = router.switch_gate_forward(H, k=1)
dH, _ = router.switch_gate_backward(rng.standard_normal((8, 1)), cache)
print("largest |dH| with the Switch gate, k = 1:", np.abs(dH).max())

# %% [markdown]
# The Switch Transformer's answer is the third gate: don't renormalise. With $k=1$ the weight
# is $p_e < 1$, which still depends on every score through the softmax, so the gradient
# survives. (A softmax over all $E$ experts is also what the load-balancing losses of
# lesson 05 need.)
#
# Here is the difference during training. Four clusters of patients, each needing a
# different linear treatment; three layers of 4 experts, identical except for the gate,
# trained with plain gradient descent. The left panel shows how far the GP's $W_\text{gate}$
# moved from where it started.

# %%
rng = np.random.default_rng(0)
T, d, E = 128, 4, 4
cluster = rng.integers(0, E, T)
x = 3 * np.eye(d)[cluster] + rng.standard_normal((T, d))          # four clusters of patients
A = rng.standard_normal((E, d, d))
target = np.einsum("td,tdo->to", x, A[cluster])                   # each cluster's own treatment

drift, loss = {}, {}
for name, gate, k in [("top-k gate, k=1", "topk", 1), ("Switch gate, k=1", "switch", 1),
                      ("top-k gate, k=2", "topk", 2)]:
    layer = MoELayer(d, 16, E, k=k, gate=gate, noisy=False, rng=np.random.default_rng(1))
    W0 = layer.params["W_gate"].copy()
    drift[name], loss[name] = [], []
    for step in range(200):
        err = layer.forward(x) - target
        loss[name].append(np.mean(err ** 2))
        layer.backward(2 * err / err.size)                        # gradient of the mean squared error
        for n in layer.params:
            layer.params[n] -= 0.1 * layer.grads[n]
        drift[name].append(np.linalg.norm(layer.params["W_gate"] - W0))
    print(f"{name:>17}: router moved {drift[name][-1]:.3f}, final loss {loss[name][-1]:.3f}")

fig = viz.plot_router_learning(np.arange(200), {"‖W_gate − W_gate(0)‖": drift, "task loss (MSE)": loss},
                               "The top-1 GP never learns; the Switch GP does")
fig.axes[1].set_yscale("log")
plt.show()

# %% [markdown]
# The flat line at zero is not "learning slowly": it is *no* learning. The experts adapt to
# whatever patients the random GP sends them, and the loss still falls — which is exactly why
# this bug survives for so long in real code.
#
# ## 6. The Switch gate's backward
#
# The Switch gate is $G = p \odot m$ with $p = \mathrm{softmax}(H)$ and $m$ the 0/1 mask of
# the top $k$. Only the kept entries of $p$ reach the output, so the upstream gradient of
# $p$ is $dG \odot m$; then it is the full softmax's backward:
#
# $$dH = p \odot \big(dG\odot m - \langle dG\odot m,\ p\rangle\big).$$
#
# ### Exercise 4 — Switch gate backward
#
# *Loops (the course's rule):* no Python loop over tokens — the check runs your function at two
# numbers of tokens and counts the Python lines it executes, which must not grow; loops over
# experts, choices or ranks are fine.

# %%
def switch_gate_backward(dG, p, mask):
    """Backward of G = softmax(H) * mask (the Switch gate, not renormalised).

    Args:
        dG: (T, E) upstream gradient of the dense gates.
        p: (T, E) softmax(H).  mask: (T, E) bool, True at each token's top k.

    Returns:
        dH: (T, E).
    """
    ### BEGIN SOLUTION
    dp = dG * mask
    return p * (dp - np.sum(dp * p, axis=1, keepdims=True))
    ### END SOLUTION


# %%
check.switch_gate_backward(switch_gate_backward)

# %% [markdown]
# ## 7. What sparsity saves
#
# With $k$ of $E$ experts per token, a fraction $1 - k/E$ of the expert compute is skipped.
# `MoELayer.flops_per_token()` counts the matrix products (router, $k$ experts, the
# weighted sum); here for a small layer, $d = 64$, $h = 256$ (the ratios barely depend on
# the size):

# %%
d, h = 64, 256
print(f"{'E':>3} {'k':>2} {'parameters':>11} {'FLOPs/token':>12} {'vs dense MoE':>13}")
for E in (8, 64):
    dense = MoELayer(d, h, E, gate="dense", noisy=False).flops_per_token()
    for k in (1, 2):
        layer = MoELayer(d, h, E, k=k, noisy=False)
        print(f"{E:>3} {k:>2} {layer.n_params / 1e6:>10.2f}M {layer.flops_per_token() / 1e3:>11.1f}k "
              f"{layer.flops_per_token() / dense:>12.1%}")

# %% [markdown]
# Going from 8 to 64 experts multiplies the parameters by 8 and leaves the cost per token
# almost unchanged. That is the deal sparse MoE offers — if the GP routes well.
#
# ## Questions to think about
#
# 1. With $k = 2$ and the top-k gate, the router does get a gradient. What exactly does it
#    learn from — and what can it never learn about the experts it did *not* pick?
# 2. Mixtral uses top-2 with renormalisation; Switch uses top-1 without. Why would
#    renormalising be the natural choice at $k = 2$ and a bug at $k = 1$?
# 3. With the Switch gate at $k=1$ the output is $p_e \cdot \mathrm{FFN}_e(x)$. If the
#    router is unsure ($p_e \approx 1/E$), what happens to the layer's output scale?
# 4. Sparsity saves FLOPs. What does it *not* save (think about memory and communication)?

# %% [markdown]
# ### BEGIN SOLUTION
# **Some answers.**
# 1. It learns how to split trust *between the two chosen* experts: the gradient says which
#    of the two answers helped more. It gets no signal about unchosen experts, which could
#    have been better — the exploration problem of lesson 04.
# 2. At $k = 2$ renormalised gates still vary with the two scores' difference, so they carry
#    a gradient; at $k=1$ renormalising pins the only gate to 1 and kills it.
# 3. It shrinks by about $1/E$; the next layers (and the residual stream) see a small,
#    noisy update until the router becomes confident. Switch relies on the router learning
#    quickly; some implementations rescale.
# 4. Memory: all $E$ experts' weights must be stored (and, in training, their optimizer
#    state). Communication: with experts on different devices, tokens must be sent to their
#    experts and back (all-to-all), which dense layers never need.
# ### END SOLUTION

# %%
check.progress()
