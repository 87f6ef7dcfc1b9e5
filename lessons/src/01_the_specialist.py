# %% [markdown]
# # Lesson 01 — The specialist
#
# **Difficulty** ★★☆☆☆ · **Prerequisites** lesson 00; the chain rule; matrix shapes ·
# **Time** about 55 minutes
#
# Every specialist in our clinic went through the same training and examines a patient
# the same way: look at the symptoms, think, write a report. What makes the cardiologist a
# cardiologist is only *which patients the GP sent them* while they learned. So before we
# build a GP, we build one specialist — a feed-forward network (FFN) — and, because
# minimoe writes every backward pass by hand, we learn how to **prove** a backward pass is
# right. Everything later rests on that.
#
# You will: write the expert's forward pass, derive and write its backward pass, write a
# central-difference gradient checker, see why it must run in float64 and measure
# *relative* error, and finally write the backward pass of the specialist that Mixtral,
# DeepSeek and Llama actually use (SwiGLU).
#
# **Code to read alongside:** `minimoe/core/layers.py` (`linear_forward`, `relu_forward`,
# `silu_forward`, `swiglu_forward` and their backwards), `minimoe/core/experts.py`
# (`ffn_forward`, `ffn_backward`) and `minimoe/core/gradcheck.py`.

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

from minimoe import experts, gradcheck, layers
from minimoe.course import viz
from minimoe.checks import lesson01 as check

# %% [markdown]
# ## 1. The forward pass
#
# A batch of $T$ patients (tokens) arrives as a matrix $x$ of shape $(T, d)$, one row each.
# The specialist widens each row to $h$ hidden features, keeps the positive ones, and maps
# back to width $d$:
#
# $$z = x W_1 + b_1 \;\; (T,h), \qquad a = \mathrm{relu}(z) = \max(z, 0) \;\; (T,h),
#   \qquad y = a W_2 + b_2 \;\; (T,d).$$
#
# with $W_1$ $(d,h)$, $b_1$ $(h,)$, $W_2$ $(h,d)$, $b_2$ $(d,)$. NumPy broadcasting adds a
# bias row to every token. Note there is no loop over tokens: one matrix product handles
# the whole batch.
#
# In minimoe every forward function returns its output **and a cache**: whatever the
# backward pass will need. Here that is `(x, z, a, W1, W2)`.
#
# ### Exercise 1 — the specialist's forward pass
#
# *Loops (the course's rule):* no Python loop over tokens — the check runs your function at two
# numbers of tokens and counts the Python lines it executes, which must not grow; loops over
# experts, choices or ranks are fine.

# %%
def ffn_forward(x, W1, b1, W2, b2):
    """One expert: y = relu(x W1 + b1) W2 + b2.

    Args:
        x: (T, d) tokens.  W1: (d, h), b1: (h,), W2: (h, d), b2: (d,).

    Returns:
        y: (T, d), and cache = (x, z, a, W1, W2) with z = x W1 + b1, a = relu(z).
    """
    ### BEGIN SOLUTION
    z = x @ W1 + b1
    a = np.maximum(z, 0)
    y = a @ W2 + b2
    return y, (x, z, a, W1, W2)
    ### END SOLUTION


# %%
check.ffn_forward(ffn_forward)

# %% [markdown]
# ## 2. The backward pass
#
# Training needs to know how a scalar loss $\mathcal{L}$ changes with every parameter.
# The layer above us hands down $dy = \partial\mathcal{L}/\partial y$, shape $(T,d)$; we
# return $dx$ (for the layer below) and $dW_1, db_1, dW_2, db_2$. The chain rule, read
# right to left:
#
# $$da = dy\, W_2^\top, \qquad dW_2 = a^\top dy, \qquad db_2 = \textstyle\sum_t dy_t$$
# $$dz = da \odot \mathbb{1}[z > 0]$$
# $$dx = dz\, W_1^\top, \qquad dW_1 = x^\top dz, \qquad db_1 = \textstyle\sum_t dz_t$$
#
# Two rules of thumb that catch most mistakes:
#
# * **A gradient has the shape of the thing it is the gradient of.** $dW_2$ must be
#   $(h,d)$; the only product of $a$ $(T,h)$ and $dy$ $(T,d)$ with that shape is $a^\top dy$.
# * **What is shared is summed.** Every token uses the same $b_2$, so each token's
#   gradient adds up: $db_2$ is a sum over tokens (not a mean). The same goes for
#   $W_1, W_2$: $x^\top dz$ is a sum of one outer product per token.
#
# The ReLU passes the gradient where it passed the input ($z > 0$) and blocks it elsewhere.
#
# ### Exercise 2 — the specialist's backward pass
#
# `cache` is the tuple your forward returned, `(x, z, a, W1, W2)`. (The check builds it
# itself, so this exercise does not depend on exercise 1.)
#
# *Loops (the course's rule):* no Python loop over tokens — the check runs your function at two
# numbers of tokens and counts the Python lines it executes, which must not grow; loops over
# experts, choices or ranks are fine.

# %%
def ffn_backward(dy, cache):
    """Backward of ffn_forward.

    Args:
        dy: (T, d) upstream gradient ∂L/∂y.
        cache: (x, z, a, W1, W2) from ffn_forward.

    Returns:
        dx: (T, d), and grads = {"W1": (d,h), "b1": (h,), "W2": (h,d), "b2": (d,)}.
    """
    x, z, a, W1, W2 = cache
    ### BEGIN SOLUTION
    da = dy @ W2.T
    dW2 = a.T @ dy
    db2 = dy.sum(axis=0)
    dz = da * (z > 0)
    dx = dz @ W1.T
    dW1 = x.T @ dz
    db1 = dz.sum(axis=0)
    return dx, {"W1": dW1, "b1": db1, "W2": dW2, "b2": db2}
    ### END SOLUTION


# %%
check.ffn_backward(ffn_backward)

# %% [markdown]
# ## 3. How do we *know* a backward pass is right?
#
# A derivative is a slope. Nudge one entry $\theta_i$ of an input or parameter by a tiny
# step $h$ each way and watch the loss:
#
# $$\frac{\partial \mathcal{L}}{\partial \theta_i} \approx
#   \frac{\mathcal{L}(\theta + h e_i) - \mathcal{L}(\theta - h e_i)}{2h}.$$
#
# This **central difference** has error $O(h^2)$; the one-sided
# $(\mathcal{L}(\theta + h e_i) - \mathcal{L}(\theta))/h$ only $O(h)$. It costs two loss
# evaluations per entry, so its cost grows with the number of parameters: cheap for the small
# FFN below, but a layer with a million weights would need two million forward passes for
# every training step, where the backward costs about one. Useless for training, ideal for
# checking on small inputs.
# To test a layer with output $y$, minimoe uses the loss $\mathcal{L} = \sum y \odot dy$
# for a fixed random $dy$, whose gradient with respect to $y$ is exactly $dy$.
#
# ### Exercise 3 — a gradient checker
#
# `f` takes no arguments and reads `x`, so you perturb `x` **in place**: change one entry,
# call `f()`, and put the entry back exactly as it was. `x` may have any shape.
#
# *Loops (the course's rule):* no Python loop over tokens — with one exception, this exercise: a
# finite-difference checker perturbs one entry of x at a time, so its loop over the entries of x is
# the point (that is why gradient checks run on small arrays).

# %%
def numerical_gradient(f, x, h=1e-5):
    """Central-difference gradient of the scalar function f() with respect to x.

    Args:
        f: callable with no arguments returning a float; it reads x.
        x: float64 array of any shape, perturbed in place and restored.
        h: the step.

    Returns:
        grad: array of x's shape.
    """
    ### BEGIN SOLUTION
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        old = x[i]
        x[i] = old + h
        f_plus = f()
        x[i] = old - h
        f_minus = f()
        x[i] = old                                  # restore exactly
        grad[i] = (f_plus - f_minus) / (2 * h)
    return grad
    ### END SOLUTION


# %%
check.numerical_gradient(numerical_gradient)

# %% [markdown]
# ## 4. Comparing two gradients: relative error
#
# Is an analytic gradient $a$ "close" to the numerical one $n$? An absolute difference means
# nothing on its own: $10^{-6}$ is superb for a gradient of size $10^{3}$ and awful for one
# of size $10^{-6}$. So we divide by the size of the gradients — the **normwise relative
# error**, one number per parameter:
#
# $$\mathrm{rel}(a, n) = \frac{\lVert a - n\rVert}{\max(\lVert a\rVert, \lVert n\rVert, \text{tiny})}.$$
#
# Using the larger of the two norms makes it symmetric and at most 2; the tiny floor (say
# $10^{-300}$) makes $\mathrm{rel}(0, 0) = 0$ instead of $0/0$. Why not the elementwise ratio
# $|a_i - n_i| / |n_i|$? Where a gradient entry is almost zero, that ratio is noise divided
# by almost nothing. minimoe's pass rule (docs/design.md §4) is normwise $< 10^{-8}$ *and* every
# entry within $|a_i - n_i| \le 10^{-7} + 10^{-5} |n_i|$.
#
# ### Exercise 4 — relative error
#
# *Loops (the course's rule):* no Python loop over tokens; this exercise has no token axis, so a
# loop over its few numbers is fine.

# %%
def rel_error(a, n):
    """Normwise relative error ‖a − n‖ / max(‖a‖, ‖n‖, 1e-300), a float."""
    ### BEGIN SOLUTION
    return float(np.linalg.norm(a - n) / max(np.linalg.norm(a), np.linalg.norm(n), 1e-300))
    ### END SOLUTION


# %%
check.rel_error(rel_error)

# %% [markdown]
# ## 5. Using it: checking the specialist
#
# minimoe's `gradcheck.check_pair` does what you just wrote, for every parameter and the
# input, at two step sizes ($10^{-5}$ and $10^{-6}$: a right gradient passes at both).
# Here it checks minimoe's own expert:

# %%
rng = np.random.default_rng(0)
T, d, h = 5, 4, 6
x = rng.standard_normal((T, d))
params = {"W1": rng.standard_normal((d, h)), "b1": rng.standard_normal(h),
          "W2": rng.standard_normal((h, d)), "b2": rng.standard_normal(d)}
reports = gradcheck.check_pair(experts.ffn_forward, experts.ffn_backward, x, params, rng=rng)
print(gradcheck.format_reports(reports))

# %% [markdown]
# And here is what a bug looks like. This backward forgets the ReLU mask — the most common
# mistake of all. The checker points at exactly the gradients that are wrong, and says by
# how much:

# %%
def buggy_ffn_backward(dy, cache):
    da, g2 = layers.linear_backward(dy, cache.lin2)     # minimoe's FFNCache
    dx, g1 = layers.linear_backward(da, cache.lin1)     # BUG: skipped the activation's backward
    return dx, {"W1": g1["W"], "b1": g1["b"], "W2": g2["W"], "b2": g2["b"]}


try:
    gradcheck.check_pair(experts.ffn_forward, buggy_ffn_backward, x, params, rng=rng, h=1e-5)
except gradcheck.GradCheckError as err:
    print(err)

# %% [markdown]
# ## 6. Why float64?
#
# A central difference has two errors pulling in opposite directions. **Truncation**: the
# formula is exact only as $h \to 0$; its error shrinks like $h^2$. **Rounding**: the two
# losses agree in their leading digits, and subtracting them cancels those digits, leaving
# an error of about $\varepsilon\,|\mathcal{L}| / h$, with $\varepsilon$ the machine
# precision: $2\cdot 10^{-16}$ in float64, $10^{-7}$ in float32. The best $h$ balances the
# two, near $\varepsilon^{1/3}$.
#
# The experiment below compares a central difference along one random direction with the
# exact slope from minimoe's backward, for many $h$, in both precisions. (It uses the
# smooth GELU activation, so the ReLU's kinks don't blur the $h^2$ trend.)

# %%
rng = np.random.default_rng(1)
T, d, h_width = 8, 6, 10
x = rng.standard_normal((T, d))
W = {"W1": rng.standard_normal((d, h_width)) / np.sqrt(d), "b1": 0.1 * rng.standard_normal(h_width),
     "W2": rng.standard_normal((h_width, d)) / np.sqrt(h_width), "b2": 0.1 * rng.standard_normal(d)}
dy = rng.standard_normal((T, d))
v = rng.standard_normal((T, d))
v /= np.linalg.norm(v)                                       # a random unit direction

y, cache = experts.ffn_forward(x, **W, activation="gelu")
dx, _ = experts.ffn_backward(dy, cache)
exact = np.sum(dx * v)                                       # the exact directional slope

hs = np.logspace(-1, -12, 34)
errors = {}
for dtype in (np.float64, np.float32):
    Wt = {k: w.astype(dtype) for k, w in W.items()}
    xt, vt, dyt = x.astype(dtype), v.astype(dtype), dy.astype(dtype)

    def loss(xx):
        return np.sum(experts.ffn_forward(xx, **Wt, activation="gelu")[0] * dyt, dtype=dtype)
    fd = np.array([(loss(xt + dtype(s) * vt) - loss(xt - dtype(s) * vt)) / dtype(2 * s) for s in hs])
    errors[np.dtype(dtype).name] = np.abs(fd - exact) / abs(exact)

for name, err in errors.items():
    print(f"{name}: best relative error {err.min():.1e} at h = {hs[err.argmin()]:.0e}")
fig = viz.plot_step_sizes(hs, errors)
plt.show()

# %% [markdown]
# In float64 the error bottoms out around $10^{-11}$ for $h$ between $10^{-4}$ and
# $10^{-5}$, far under the $10^{-8}$ pass line, and climbs again as $h$ shrinks further:
# rounding takes over. In float32 the *best possible* relative error is about $10^{-6}$, and
# below $h \approx 10^{-7}$ the step is lost entirely ($x + h = x$). A correct backward pass
# could never pass a strict check in float32, and a wrong one with a small error could hide.
# That is why every gradient check in minimoe runs in float64
# (`dtype` is a parameter everywhere) and why `gradcheck` refuses float32 arrays.

# %% [markdown]
# ## 7. Mixtral's specialist: SwiGLU
#
# The specialists of Mixtral, DeepSeek, Qwen and Llama-style models are not ReLU FFNs but
# **SwiGLU** FFNs (Shazeer 2020, *GLU Variants Improve Transformer*): two input matrices
# instead of one, and the hidden layer is one branch *gating* the other,
#
# $$z_1 = x W_1, \qquad z_3 = x W_3, \qquad a = \mathrm{silu}(z_1) \odot z_3, \qquad y = a W_2,$$
#
# with $\mathrm{silu}(z) = z\,\sigma(z)$ (the "swish") and $\sigma$ the logistic sigmoid.
# $W_1, W_3$ are $(d, h)$ and $W_2$ is $(h, d)$ — Mixtral's `w1` (the silu branch), `w3` (the
# linear branch) and `w2`, with no biases. Three matrices: $3dh$ weights and $6dh$ FLOPs per
# token instead of $2dh$ and $4dh$, so models using it shrink $h$ to about 2/3 to keep the
# cost (Llama: $h = \tfrac{2}{3} \cdot 4d$).
# minimoe's version is `experts.ffn_forward(..., activation="swiglu", W3=..., b3=...)`.
#
# The backward pass is the chain rule again, with two new steps. The product
# $a = \mathrm{silu}(z_1) \odot z_3$ sends $da$ to each factor times the *other* factor, and
# the derivative of $\mathrm{silu}$ needs the product rule once more:
#
# $$\mathrm{silu}'(z) = \sigma(z) + z\,\sigma(z)(1 - \sigma(z)) = \sigma(z)\,\big(1 + z(1 - \sigma(z))\big).$$
#
# And $x$ feeds *both* branches, so its gradient has two terms.
#
# ### Exercise 5 — the SwiGLU specialist's backward pass
#
# Write `swiglu_backward(dy, cache)` for the forward below. Vectorised over the tokens, without
# minimoe's `silu_backward`, `swiglu_backward` or `ffn_backward` (you may compute $\sigma$
# however you like).
#
# *Loops (the course's rule):* no Python loop over tokens — the check runs your function at two
# numbers of tokens and counts the Python lines it executes, which must not grow; loops over
# experts, choices or ranks are fine.

# %%
def swiglu_forward(x, W1, W3, W2):
    """y = (silu(x W1) ⊙ (x W3)) W2 for x (T, d), W1, W3 (d, h), W2 (h, d); returns y (T, d) and the cache."""
    z1, z3 = x @ W1, x @ W3
    a = z1 / (1 + np.exp(-z1)) * z3                     # silu(z1) ⊙ z3
    return a @ W2, (x, z1, z3, W1, W3, W2)


def swiglu_backward(dy, cache):
    """Backward of swiglu_forward.

    Args:
        dy: (T, d) gradient of the loss with respect to y.
        cache: (x, z1, z3, W1, W3, W2) as swiglu_forward returns it.

    Returns:
        dx (T, d) and the dict {"W1": (d, h), "W3": (d, h), "W2": (h, d)} of gradients.
    """
    ### BEGIN SOLUTION
    x, z1, z3, W1, W3, W2 = cache
    s = 1 / (1 + np.exp(-z1))                           # σ(z1)
    g = z1 * s                                          # silu(z1)
    da = dy @ W2.T                                      # through y = a W2
    dz1 = da * z3 * s * (1 + z1 * (1 - s))              # through silu(z1) ⊙ z3, to the silu branch
    dz3 = da * g                                        # ... and to the linear branch
    dx = dz1 @ W1.T + dz3 @ W3.T                        # x feeds both branches
    return dx, {"W1": x.T @ dz1, "W3": x.T @ dz3, "W2": (g * z3).T @ dy}
    ### END SOLUTION


# %%
check.swiglu_backward(swiglu_backward)

# %% [markdown]
# minimoe's SwiGLU expert passes the same gradient check as the ReLU one (its biases $b_1$,
# $b_3$, $b_2$ are optional extras, zero at initialisation; Mixtral has none):

# %%
rng = np.random.default_rng(2)
T, d, h = 5, 4, 6
x = rng.standard_normal((T, d))
params = {"W1": rng.standard_normal((d, h)), "b1": np.zeros(h), "W2": rng.standard_normal((h, d)),
          "b2": np.zeros(d), "W3": rng.standard_normal((d, h)), "b3": np.zeros(h)}
reports = gradcheck.check_pair(lambda x, **p: experts.ffn_forward(x, activation="swiglu", **p),
                               experts.ffn_backward, x, params, rng=rng)
print(gradcheck.format_reports(reports))

# %% [markdown]
# ## Questions to think about
#
# 1. Checking a parameter with $N$ entries costs $2N$ loss evaluations. How long would a
#    gradient check take for a $4096 \times 14336$ matrix? What could you check instead?
# 2. At $z = 0$ exactly, ReLU has no derivative. Why does this almost never bother the
#    gradient check — and when could it?
# 3. A backward pass that returns $2\times$ the right gradient would still train (with a
#    different learning rate). Why insist on the exact gradient anyway?
# 4. The checker uses $\mathcal{L} = \sum y \odot dy$ with a *random* $dy$. Why random rather
#    than all ones?
# 5. For large negative $z$, $\mathrm{silu}(z) \approx 0$ but $\mathrm{silu}'(z)$ is slightly
#    *negative* (silu dips below 0 near $z \approx -1.28$). What does that mean for a hidden
#    unit, compared with a ReLU's dead region?

# %% [markdown]
# ### BEGIN SOLUTION
# **Some answers.**
# 1. $2 \cdot 58.7\text{M}$ forward passes — hours. Check small instances of the same code,
#    or compare directional derivatives along a few random directions (one pair of
#    evaluations each), as in section 6.
# 2. A finite difference only crosses $z = 0$ if some pre-activation lies within $h$ of
#    zero, which random float inputs almost never do. Inputs with exact zeros (padding,
#    all-zero rows) or a huge $h$ can hit the kink.
# 3. Bugs are rarely a clean factor of 2: a wrong gradient is usually wrong in *direction*
#    for some parameters, and an exact check is the only way to know which. Later lessons
#    compose many backward passes; an error in one corrupts them all.
# 4. With $dy$ all ones, errors that cancel in a sum (a wrong sign on one output column,
#    a swapped pair of columns) would be invisible. A random $dy$ weighs every output
#    differently.
# 5. A ReLU unit with $z < 0$ passes no gradient at all (it can "die"); a silu unit's
#    gradient is never exactly 0 (it only fades for very negative $z$), so a unit pushed far
#    down can still come back, and its output can be negative. The sign flip below
#    $z \approx -1.28$ means that pushing $z$ further down there *raises* silu back towards 0.
#    (And the linear branch $z_3$ gets gradient wherever $\mathrm{silu}(z_1) \ne 0$.)
# ### END SOLUTION

# %%
check.progress()
