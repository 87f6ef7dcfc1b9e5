# %% [markdown]
# # Lesson 05 — Overworked specialists
#
# **Difficulty** ★★★★☆ · **Prerequisites** lesson 03 (top-k and Switch gates), lesson 04 (noisy
# scores) · **Time** about 60 minutes
#
# Word gets around. A specialist who happens to do well with the first few patients gets more
# referrals; more patients mean more practice, so they get better still, so the GP sends them
# even more. The other specialists sit in empty rooms, never practise, and never become worth
# sending anyone to. The rich get richer. In an MoE this is **expert collapse**: a router
# trained only on the task soon sends almost every token to a few experts: the model pays
# for $E$ experts and learns with a few.
#
# The cure is to tell the GP, in its loss, that an even spread of referrals is part of the
# job. You will write the four balancing terms that the big MoE papers use — the
# **importance** loss and the **smooth load** loss of Shazeer et al. (2017), each with its
# backward, and the **Switch** auxiliary loss (Fedus et al. 2021) — read the **router
# z-loss** (Zoph et al. 2022), then train the same clinic with each and compare.
#
# **Code to read alongside:** `minimoe/core/losses.py` — `cv_squared_forward/backward`,
# `importance_loss_forward/backward`, `normal_cdf`, `load_loss_forward/backward`,
# `switch_loss_forward/backward`, `z_loss_forward/backward`; and how `MoELayer.forward/backward`
# in `minimoe/core/moe.py` adds them to the task loss.

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

from minimoe import gradcheck, losses, router

from minimoe.course import viz
from minimoe.clinic.data import Split, make_clinic
from minimoe.clinic.models import Clinic, moe_block
from minimoe.clinic.train import evaluate, train
from minimoe.checks import lesson05 as check

# %% [markdown]
# ## 1. Collapse, live
#
# The clinic of lesson 00: patients from 8 hidden specialties, each with its own rule for
# the diagnosis. One twist: **every patient also walks in tired**. We add the same vector
# to everyone's symptoms, a shared complaint that says nothing about the specialty. (Real
# networks have this too: the hidden states of a transformer share a large common component.)
# A shared complaint means the GP's scores $x W_\text{gate}$ share a common part, so
# whatever the GP learns to like about one specialist, it likes for *every* patient.
#
# The model is an MoE clinic — embed the symptoms, $v = u + \mathrm{MoE}(u)$, read out a
# diagnosis — with $E = 8$ experts, top-2 routing with learned noise (lesson 04), and
# **no balancing at all**. `minimoe.clinic.train.train` records how many referrals each expert
# processed in each stretch of training.

# %%
data = make_clinic(n_train=3000, n_val=1000, n_test=0, seed=0)
tired = np.random.default_rng(7).standard_normal(data.n_symptoms)
tired *= 10 / np.linalg.norm(tired)                          # the complaint every patient shares
train_set = Split(data.train.x + tired, data.train.y, data.train.specialty)
val_set = Split(data.val.x + tired, data.val.y, data.val.specialty)


def clinic(seed=0, **balancing):
    """An MoE clinic: d = 16, E = 8 experts of width 16, noisy top-2 routing."""
    rng = np.random.default_rng(seed)
    block = moe_block(16, 16, 8, rng, k=2, gate="topk", noisy=True, **balancing)
    return Clinic(data.n_symptoms, data.n_classes, 16, block, rng)


runs = {}
model = clinic(balance=None)
runs["no balancing"] = (model, train(model, train_set, val_set, epochs=6, batch_size=100, lr=0.01, seed=0))
ev = evaluate(model, val_set)
print("referrals per expert (validation):", ev["load"])
print(f"experts with at least 1% of the referrals: {int(np.sum(ev['load'] >= 0.01 * ev['load'].sum()))} of 8")
fig = viz.plot_load_shares({"no balancing": runs["no balancing"][1]},
                           title="The rich get richer: referrals per expert during training")
plt.show()

# %% [markdown]
# A few bands swallow the others. The starved experts still exist (their parameters are
# paid for) but they see no patients, so they get no gradient and never improve, so the GP
# has no reason to try them: collapse feeds itself. The noise of lesson 04 is not enough
# to break the loop once the gaps between scores have grown.
#
# ## 2. Importance: spread the referral weight
#
# Shazeer et al. (2017, §4, eq. 6–7) measure how much each specialist matters to a batch by
# the total gate weight it receives, its **importance**,
#
# $$\mathrm{Importance}_e = \sum_{t} G_{te} \qquad (E,),$$
#
# and penalise its spread with the **squared coefficient of variation**
#
# $$\mathcal{L}_\text{importance} = w \cdot \mathrm{CV}(\mathrm{Importance})^2, \qquad
#   \mathrm{CV}(v)^2 = \frac{\mathrm{Var}(v)}{\mathrm{mean}(v)^2}
#   = \frac{\frac1E\sum_e (v_e - m)^2}{m^2}, \quad m = \tfrac1E \textstyle\sum_e v_e.$$
#
# Why CV² and not the variance? Dividing by $m^2$ makes it **scale-free**: the same spread of
# referrals gives the same loss in a batch of 100 or of 10 000 tokens, so one coefficient $w$
# (0.1 in the paper) works for any batch. It is 0 at perfect balance and grows as the referrals pile up on a few experts.
# Here $G$ is the dense $(T,E)$ gate matrix of lesson 03, zero where a token isn't sent.
#
# ### Exercise 1 — the importance loss (unweighted: $w = 1$)
#
# *Loops (the course's rule):* no Python loop over tokens — the check runs your function at two
# numbers of tokens and counts the Python lines it executes, which must not grow; loops over
# experts, choices or ranks are fine.

# %%
def importance_loss(G):
    """CV(Importance)^2 with Importance_e = sum_t G[t, e].

    Args:
        G: (T, E) dense gates (zeros for experts a token is not sent to).

    Returns:
        a float.
    """
    ### BEGIN SOLUTION
    imp = G.sum(axis=0)                                  # (E,) total referral weight per expert
    return np.var(imp) / np.mean(imp) ** 2
    ### END SOLUTION


# %%
check.importance_loss(importance_loss)

# %% [markdown]
# ### Exercise 2 — its backward
#
# Write $u = \mathrm{Importance}/m$. Then $\mathrm{CV}^2 = \mathrm{mean}(u^2) - 1$, and since
# $m$ itself moves when any $\mathrm{Importance}_e$ does (careful!),
#
# $$\frac{\partial\, \mathrm{CV}^2}{\partial\, \mathrm{Importance}_e} = \frac{2}{E\,m}\big(u_e - \mathrm{mean}(u^2)\big).$$
#
# (Derive it: $\partial u_j / \partial v_e = \delta_{je}/m - v_j/(E m^2)$.) Every gate $G_{te}$
# adds to $\mathrm{Importance}_e$ with weight 1, so return that number for every token:
# $dG$ has $G$'s shape.
#
# *Loops (the course's rule):* no Python loop over tokens — the check runs your function at two
# numbers of tokens and counts the Python lines it executes, which must not grow; loops over
# experts, choices or ranks are fine.

# %%
def importance_loss_backward(G):
    """Gradient of importance_loss(G) with respect to G, (T, E)."""
    ### BEGIN SOLUTION
    imp = G.sum(axis=0)
    E, m = imp.size, imp.mean()
    u = imp / m
    dimp = 2.0 / (E * m) * (u - np.mean(u**2))           # (E,)
    return np.broadcast_to(dimp, G.shape).copy()         # the same for every token
    ### END SOLUTION


# %%
check.importance_loss_backward(importance_loss_backward)

# %% [markdown]
# minimoe's `losses.importance_loss_forward/backward` do the same on the compact $(T,k)$
# gates. One more trap from lesson 03: with the **top-k gate and $k = 1$**, every gate is
# exactly 1, so the importance is just a count and its gradient stops dead at the gate — the
# router never feels it. With the Switch gate ($G = p_e < 1$) it gets through:

# %%
rng = np.random.default_rng(0)
H = rng.standard_normal((16, 4))
for gate in ("topk", "switch"):
    routing, gcache = router.gate_forward(H, 1, gate)
    loss, icache = losses.importance_loss_forward(routing.gates, routing.idx, 4)
    dgates, _ = losses.importance_loss_backward(1.0, icache)
    dH, _ = router.gate_backward(dgates, gcache)
    print(f"{gate:>6} gate, k=1:  loss {loss:.3f}   largest |dG| {np.abs(dgates).max():.3f}   "
          f"largest |dH| reaching the router {np.abs(dH).max():.3f}")

# %% [markdown]
# ## 3. Load: spread the patients
#
# Importance counts weight, not patients. One specialist can see 10 patients at weight 0.1
# and another one patient at weight 1.0: equal importance, a tenfold difference in work.

# %%
G = np.zeros((11, 2))
G[:10, 0], G[10, 1] = 0.1, 1.0
print("importance:", G.sum(axis=0), "  loss", round(check.importance_loss_ref(G), 6))
print("load (patients):", (G > 0).sum(axis=0), "  CV² of the load", round(check.cv2_ref((G > 0).sum(axis=0)), 3))

# %% [markdown]
# What a specialist's room actually holds is the **load**, the number of patients, and that
# is a count: a step function of the scores with zero gradient almost everywhere. Shazeer et
# al. (2017, appendix A, eq. 8–10) replace it by its **expected value under the noise**.
# Patient $t$ reaches specialist $e$ if $e$'s noisy score beats the $k$-th best of the
# *other* specialists. Draw only $e$'s own noise again, $H_{te} = L_{te} + \varepsilon\,\sigma_{te}$,
# and that happens with probability
#
# $$P(t,e) = \Phi\!\left(\frac{L_{te} - \mathrm{kth\_excluding}(H_t, k, e)}{\sigma_{te}}\right),
#   \qquad \mathrm{Load}_e = \sum_t P(t,e), \qquad
#   \mathcal{L}_\text{load} = w \cdot \mathrm{CV}(\mathrm{Load})^2,$$
#
# with $\Phi$ the standard normal CDF. $\mathrm{kth\_excluding}(H_t, k, e)$ is the $k$-th
# largest noisy score among the experts other than $e$: for an $e$ outside the top $k$ that
# is the $k$-th largest of the whole row (the last one who got in); for an $e$ *inside* the
# top $k$, removing $e$ moves everyone up one place, so it is the $(k{+}1)$-th largest.
#
# $\Phi(z) = \tfrac12\,\mathrm{erfc}(-z/\sqrt2)$ is `losses.normal_cdf` (built on
# `math.erfc`, exact in both tails; a cheap approximation would break the gradient check).
# `np.argsort(-H, axis=1)` ranks each row's experts, best first.
#
# ### Exercise 3 — the smooth load probabilities
#
# *Loops (the course's rule):* no Python loop over tokens — the check runs your function at two
# numbers of tokens and counts the Python lines it executes, which must not grow; loops over
# experts, choices or ranks are fine.

# %%
def smooth_load(L, H, sigma, k):
    """P(t, e) = Phi((L - kth_excluding(H_t, k, e)) / sigma), (T, E).

    Args:
        L: (T, E) clean scores. H: (T, E) noisy scores. sigma: (T, E) noise widths > 0.
        k: experts per token, 1 <= k < E.
    """
    ### BEGIN SOLUTION
    T, E = H.shape
    ranked = np.argsort(-H, axis=1)                      # experts by noisy score, best first
    rows = np.arange(T)[:, None]
    in_top = np.zeros((T, E), dtype=bool)
    in_top[rows, ranked[:, :k]] = True
    kth = H[rows, ranked[:, [k - 1]]]                    # (T, 1) the k-th largest
    k1th = H[rows, ranked[:, [k]]]                       # (T, 1) the (k+1)-th largest
    threshold = np.where(in_top, k1th, kth)              # the bar e must clear
    return losses.normal_cdf((L - threshold) / sigma)
    ### END SOLUTION


# %%
check.smooth_load(smooth_load)

# %% [markdown]
# Is it a good estimate? Take a small noisy GP, draw the noise 300 times, and compare the
# average real load (how many patients each specialist actually got) with the average of
# the smooth load (minimoe's `losses.load_loss_forward` returns it as `cache.load`):

# %%
rng = np.random.default_rng(1)
T, d, E, k = 200, 6, 6, 2
x = rng.standard_normal((T, d)) + 0.5
W_gate, W_noise = 0.6 * rng.standard_normal((d, E)), 0.3 * rng.standard_normal((d, E))
real, smooth = np.zeros(E), np.zeros(E)
for _ in range(300):
    H, lc = router.router_logits_forward(x, W_gate, W_noise, rng=rng)
    real += np.bincount(router.topk_indices(H, k).ravel(), minlength=E) / 300
    smooth += losses.load_loss_forward(lc.clean, H, lc.sigma, k)[1].load / 300
fig = viz.plot_load_estimate(real, smooth)
plt.show()

# %% [markdown]
# They agree: averaged over the noise, $P(t,e)$ is exactly the chance that $t$ lands on $e$.
# But unlike the count, it is smooth in $L$, $H$ and $\sigma$.
#
# ## 4. The backward of the smooth load
#
# With $z = (L - \mathrm{thr})/\sigma$ and $dP$ the upstream gradient, $\Phi' = \varphi$ (the
# normal density, `losses.normal_pdf`) gives $dz = dP \odot \varphi(z)$, then
#
# $$dL = dz/\sigma, \qquad d\sigma = -dz \odot z/\sigma, \qquad d\,\mathrm{thr} = -dz/\sigma.$$
#
# The interesting one is the last. The threshold of $(t,e)$ *is* a noisy score — another
# expert's. So $d\,\mathrm{thr}_{te}$ is added to $dH$ at that other expert's column, and since
# several experts share the same threshold expert, those contributions **add up**.
# This is how the load loss reaches the experts who are crowding $e$ out: it can lower their
# scores, not only raise $e$'s. `check.threshold_ref(H, k)` returns the threshold $(T,E)$ and
# which expert's score it is, $(T,E)$ int — use it so this exercise doesn't depend on the
# previous one. (`np.add.at` adds at repeated indices.)
#
# ### Exercise 4 — smooth load backward
#
# Treat $L$, $H$ and $\sigma$ as three independent inputs (the layer adds their gradients up
# where they came from: $H = L + \varepsilon\sigma$).
#
# *Loops (the course's rule):* no Python loop over tokens — the check runs your function at two
# numbers of tokens and counts the Python lines it executes, which must not grow; loops over
# experts, choices or ranks are fine.

# %%
def smooth_load_backward(dP, L, H, sigma, k):
    """Backward of smooth_load. Returns (dL, dH, dsigma), each (T, E)."""
    ### BEGIN SOLUTION
    thr, who = check.threshold_ref(H, k)
    z = (L - thr) / sigma
    dz = dP * losses.normal_pdf(z)                       # Φ' = φ
    dL = dz / sigma
    dsigma = -dz * z / sigma
    dH = np.zeros_like(H)
    rows = np.broadcast_to(np.arange(H.shape[0])[:, None], H.shape)
    np.add.at(dH, (rows, who), -dL)                      # d thr lands on the threshold expert
    return dL, dH, dsigma
    ### END SOLUTION


# %%
check.smooth_load_backward(smooth_load_backward)

# %% [markdown]
# ## 5. The Switch Transformer's loss
#
# Fedus et al. (2021, §2.2, eq. 4–6) wanted something cheaper, with no noise model. With
# $f_e$ the fraction of tokens whose **first choice** is $e$ and $P_e$ the mean over tokens of
# the router's full softmax $p = \mathrm{softmax}(H)$,
#
# $$\mathcal{L}_\text{switch} = \alpha \cdot E \sum_e f_e\, P_e .$$
#
# $f$ is the real load, a count, and carries **no gradient**; $P$ is its smooth stand-in and
# carries all of it. Minimising $\sum_e f_e P_e$ lowers the probability of the experts that
# are already overloaded. At perfect balance $f_e = P_e = 1/E$, and the factor $E$ makes the
# loss exactly 1 for any number of experts ($\alpha = 0.01$ in the paper).
#
# ### Exercise 5 — the Switch loss and its gradient (unweighted: $\alpha = 1$)
#
# *Loops (the course's rule):* no Python loop over tokens — the check runs your function at two
# numbers of tokens and counts the Python lines it executes, which must not grow; loops over
# experts, choices or ranks are fine.

# %%
def switch_loss(probs, first_choice):
    """E * sum_e f_e * P_e, and its gradient with respect to probs.

    Args:
        probs: (T, E) full softmax of the router scores.
        first_choice: (T,) int, each token's top expert.

    Returns:
        (loss, dprobs) with dprobs (T, E).
    """
    ### BEGIN SOLUTION
    T, E = probs.shape
    f = np.bincount(first_choice, minlength=E) / T       # real share of first choices: no gradient
    P = probs.mean(axis=0)                               # mean router probability: the gradient path
    dprobs = np.broadcast_to(E * f / T, (T, E)).copy()
    return E * np.dot(f, P), dprobs
    ### END SOLUTION


# %%
check.switch_loss(switch_loss)

# %% [markdown]
# ### Three conventions for $k > 1$: which choices does $f$ count?
#
# With top-2 routing each token makes two choices, and the field counts them in three ways:
#
# * **First choices only** (GShard, Lepikhin et al. 2020; minimoe's default,
#   `MoELayer(balance="switch", switch_fraction="first")`): what you just wrote. $f$ sums to 1,
#   and at perfect balance the loss is exactly **1**.
# * **Every choice** (Hugging Face transformers' `load_balancing_loss_func`, which Mixtral's
#   model uses, on one layer's router logits; flaxformer's `_load_balancing_loss` per group;
#   `switch_fraction="all"`): $f_e$ is the number of tokens that put $e$ among their $k$
#   choices, divided by $T$. Each token adds $k$ choices, so $f$ **sums to $k$**; at perfect
#   balance $f_e = k/E$ and $P_e = 1/E$, so $E\sum_e f_e P_e = E\cdot E\cdot\frac{k}{E}\cdot\frac1E = k$.
#   This loss is **k** at balance.
# * **Every choice, over $k$** (Megatron-core's `switch_load_balancing_loss_func`,
#   `switch_fraction="all/k"`): every choice counted, but divided by $T\cdot k$, so $f$ sums to 1
#   again and the loss is **1** at balance — the "every choice" curve below, divided by $k$.
#
# None is wrong, but the same coefficient $\alpha$ weighs the second $k$ times more than the
# others, and a number copied from one framework's log is not comparable with another's.
#
# In code they differ by one index and one divisor: with `idx` $(T, k)$ the chosen experts,
# `np.bincount(idx[:, 0], minlength=E) / T` is GShard's $f$,
# `np.bincount(idx.ravel(), minlength=E) / T` is Mixtral's, and Megatron's divides that by $k$.
#
# The first two conventions on the same router, from a balanced batch to one where every token's
# favourite is expert 0 ($E = 8$, $k = 2$, $T = 64$; minimoe's `losses.switch_loss_forward` takes
# the first choices $(T,)$ or all choices $(T, k)$):

# %%
from minimoe import MoELayer, layers


def logits_with_favourite_share(share, T=64, E=8, seed=0):
    """Router logits where a `share` of the tokens favour expert 0, the rest spread over 1..E-1."""
    rng = np.random.default_rng(seed)
    L = 0.5 * rng.standard_normal((T, E))
    n0 = int(round(share * T))
    favourite = np.concatenate([np.zeros(n0, int), np.arange(T - n0) % (E - 1) + 1])
    L[np.arange(T), favourite] += 3.0
    return L


E8, k2 = 8, 2
shares = np.linspace(1 / E8, 1.0, 15)
conv = {"first": [], "all": []}
for share in shares:
    L = logits_with_favourite_share(share)
    probs, idx = layers.softmax(L), router.topk_indices(L, k2)
    conv["first"].append(losses.switch_loss_forward(probs, idx[:, 0])[0])
    conv["all"].append(losses.switch_loss_forward(probs, idx)[0])
uniform = np.full((E8, E8), 1 / E8)                       # perfect balance: P = 1/E, every expert chosen k times
perfect = (np.arange(E8)[:, None] + np.arange(k2)) % E8
at_balance = {"first": losses.switch_loss_forward(uniform, perfect[:, 0])[0],
              "all": losses.switch_loss_forward(uniform, perfect)[0]}
print(f"at perfect balance: first choices {at_balance['first']:.3f}, all choices {at_balance['all']:.3f} (k = {k2})")
print(f"every token's favourite is expert 0: first choices {conv['first'][-1]:.3f}, all choices {conv['all'][-1]:.3f}")
fig = viz.plot_switch_conventions(shares, conv["first"], conv["all"], k2)
plt.show()

# %% [markdown]
# ### Balanced per batch, or per sequence?
#
# A batch of $B$ sequences of $S$ tokens is $B\cdot S$ tokens. Pool them into one loss and you
# ask the *batch* to be balanced. Hugging Face's Switch Transformers averages the loss of
# each group (sequence), and DeepSeek-V3 adds a sequence-wise balance loss: each *sequence*
# must be balanced. They differ exactly when sequences specialise: below, sequence $b$ sends
# all its tokens to expert $b$. Pooled, every expert gets a quarter of the batch — perfect
# balance — while every single sequence is collapsed.
# `MoELayer(..., balance_groups="sequence")` takes a $(B, S, d)$ input and averages the
# per-sequence losses; `"batch"` (the default) pools.

# %%
B, S, E4 = 4, 16, 4
xs = 3 * np.repeat(np.eye(E4)[:B, None, :], S, axis=1) + 0.3 * np.random.default_rng(0).standard_normal((B, S, E4))
group_loss = {}
for groups in ("batch", "sequence"):
    layer = MoELayer(E4, 8, E4, k=2, noisy=False, balance="switch", balance_coef=1.0,
                     balance_groups=groups, rng=np.random.default_rng(1))
    layer.params["W_gate"][...] = 2 * np.eye(E4)            # sequence b's tokens favour expert b
    layer.forward(xs, train=True)
    group_loss[groups] = layer.aux_loss                     # α = 1: the unweighted Switch loss
first_of = router.topk_indices(xs.reshape(-1, E4) @ (2 * np.eye(E4)), 1)[:, 0].reshape(B, S)
seq_shares = np.array([np.bincount(first_of[b], minlength=E4) / S for b in range(B)])
pooled_share = np.bincount(first_of.ravel(), minlength=E4) / (B * S)
print(f"Switch loss pooled over the batch: {group_loss['batch']:.3f};  "
      f"averaged per sequence: {group_loss['sequence']:.3f}  (1 at perfect balance)")
fig = viz.plot_pooled_balance(np.vstack([seq_shares, pooled_share]),
                              [f"sequence {b + 1}" for b in range(B)] + ["pooled batch"],
                              title="Each sequence collapsed, the batch balanced")
plt.show()

# %% [markdown]
# Which to want depends on the model: per-sequence balance is stricter (it also stops a
# sequence from overloading one expert's device at inference time), per-batch balance lets
# experts specialise by topic. Lesson 10 meets the same trap one level up: pooling several
# *layers* into one loss.

# %%
# The sentences above, checked on this run's numbers.
assert at_balance["first"] == 1.0 and at_balance["all"] == k2
assert conv["first"][0] < 1.05 and abs(conv["all"][0] - k2) < 0.05 and conv["all"][-1] > conv["first"][-1] > 3
assert np.allclose(pooled_share, 1 / E4) and np.all(seq_shares.max(axis=1) == 1.0)
assert group_loss["batch"] < 1.01 and group_loss["sequence"] > 3

# %% [markdown]
# ## 6. The router z-loss
#
# Balancing losses push *where* the referrals go; the **router z-loss** of ST-MoE (Zoph et al.
# 2022, arXiv:2202.08906, §3.3 "constraining activations and gradients", eq. 5) keeps the
# GP's scores *small*:
#
# $$\mathcal{L}_z = c \cdot \frac1T \sum_t \Big(\log \sum_e e^{L_{te}}\Big)^2,
#   \qquad \frac{\partial \mathcal{L}_z}{\partial L_{te}} = c\cdot\frac{2}{T}\,\mathrm{lse}_t\; \mathrm{softmax}(L_t)_e ,$$
#
# since the derivative of logsumexp is the softmax. The task only cares about the
# differences between a token's scores, so nothing in it stops the scores from drifting and
# growing; large logits make the softmax saturate and, in float32 or bfloat16, lose
# precision. The z-loss pulls $\mathrm{lse}$ towards 0 ($c = 10^{-3}$ in the paper). It says
# nothing about balance.
# minimoe's pair passes a gradient check, even at logits of $\pm 10^4$ where a naive
# logsumexp would overflow:

# %%
logits = 3 * np.random.default_rng(2).standard_normal((6, 4))
value, zc = losses.z_loss_forward(logits)
num = gradcheck.numerical_gradient(lambda: losses.z_loss_forward(logits)[0], logits)
print(f"z-loss {value:.3f};  relative error of the hand-written gradient: "
      f"{gradcheck.rel_error(losses.z_loss_backward(1.0, zc)[0], num):.1e}")
print("z-loss at logits of ±1e4:", losses.z_loss_forward(np.array([[1e4, -1e4, 0.0, 5.0]]))[0])

# %% [markdown]
# ## 7. The same clinic, five ways
#
# `MoELayer(balance=..., balance_coef=..., z_loss_coef=...)` adds these terms to `aux_loss`
# and their gradients in `backward` (read `MoELayer.backward`: importance acts on the gates,
# the load loss on $L$, $H$ and $\sigma$, Switch on the full softmax, z-loss on the clean
# logits). We retrain the tired clinic under each option, same seed, and measure on the
# validation set the load CV, the accuracy, and the router's z-loss.

# %%
options = {
    "importance (w=0.1)": dict(balance="importance", balance_coef=0.1),
    "load (w=0.1)": dict(balance="load", balance_coef=0.1),
    "importance + load (w=0.1)": dict(balance="importance+load", balance_coef=0.1),
    "Switch (α=0.01)": dict(balance="switch", balance_coef=0.01),
    "Switch (α=0.1)": dict(balance="switch", balance_coef=0.1),
    "z-loss only (c=1e-3)": dict(balance=None, z_loss_coef=1e-3),
}
for name, kw in options.items():
    model = clinic(**kw)
    runs[name] = (model, train(model, train_set, val_set, epochs=6, batch_size=100, lr=0.01, seed=0))

results = {}
for name, (model, hist) in runs.items():
    ev = evaluate(model, val_set)
    u = val_set.x @ model.params["embed.W"] + model.params["embed.b"]       # what the GP reads
    z = losses.z_loss_forward(u @ model.params["block.W_gate"])[0]
    results[name] = {"cv": ev["cv"], "acc": ev["acc"], "z": z, "load": np.asarray(ev["load"])}
    print(f"{name:>26}: load CV {ev['cv']:.2f}   accuracy {ev['acc']:.3f}   z-loss {z:6.1f}   "
          f"loads {ev['load']}")

fig = viz.plot_load_shares({"no balancing": runs["no balancing"][1],
                            "importance + load": runs["importance + load (w=0.1)"][1]},
                           title="Balancing keeps every specialist in work")
plt.show()
fig = viz.plot_balance_options(results)
plt.show()

# %% [markdown]
# What to read off:
#
# * **No balancing** collapses — the most unequal load of all: the clinic pays for 8
#   specialists and uses a couple. It and the z-loss alone (which does not balance either)
#   are the two worst diagnosticians; which of the two is last is a matter of the seed.
# * **Importance alone** evens out the *weight*, not the patients; some experts can still be
#   left idle. **Load** spreads the patients; the two together (Shazeer's recipe) are best here.
# * **Switch at α = 0.01** is too gentle for this small, short run (the paper's value was
#   tuned on huge batches and long training); at α = 0.1 it balances well — the
#   coefficient is a real hyperparameter.
# * **The z-loss** cuts the router's z-loss several-fold (its logits stay small) and does
#   nothing for balance: it is about numerical health, and is used *with* a balancing loss.

# %%
# The claims above, checked on this run's numbers (the notebook tests execute this cell).
cv, acc, zl = ({n: r[key] for n, r in results.items()} for key in ("cv", "acc", "z"))
load_of = {n: r["load"] for n, r in results.items()}
assert max(cv, key=cv.get) == "no balancing", cv                         # the most unequal
assert np.sum(load_of["no balancing"] > 0.1 * load_of["no balancing"].sum()) <= 2  # uses a couple
assert set(sorted(acc, key=acc.get)[:2]) == {"no balancing", "z-loss only (c=1e-3)"}, acc
assert load_of["importance (w=0.1)"].min() < 0.05 * load_of["importance (w=0.1)"].mean()  # idle experts
assert max(acc, key=acc.get) == min(cv, key=cv.get) == "importance + load (w=0.1)", (acc, cv)
assert cv["Switch (α=0.1)"] < cv["Switch (α=0.01)"] / 2                  # the coefficient matters
assert zl["z-loss only (c=1e-3)"] < zl["no balancing"] / 3 and cv["z-loss only (c=1e-3)"] > 1
print("every claim above holds on this run")

# %% [markdown]
# ## Questions to think about
#
# 1. Why is CV² scale-free, and why does that matter when the batch size changes between
#    training and fine-tuning?
# 2. The importance loss can be zero while one expert gets ten times the patients of
#    another. Can the load loss be zero while the *importance* is badly unbalanced?
# 3. The smooth load needs noise ($\sigma > 0$). What happens to $P(t,e)$ and its gradient as
#    $\sigma \to 0$? Why is that the right limit?
# 4. In the Switch loss, $f$ has no gradient. Why not use $\sum_e P_e^2$ instead, which is fully
#    differentiable and also minimal at balance?
# 5. A perfectly balanced router could send tokens to experts *at random*. What stops the
#    balancing losses from making the GP useless?

# %% [markdown]
# ### BEGIN SOLUTION
# **Some answers.**
# 1. Multiplying every entry by $c$ multiplies the variance by $c^2$ and the squared mean by
#    $c^2$: the ratio is unchanged. So the same coefficient means the same pressure at any
#    batch size, and the balancing term doesn't swamp (or vanish beside) the task loss when
#    the batch changes.
# 2. Yes: equal patient counts with very different gate weights (one expert always picked
#    confidently, another always as a hesitant second choice). That is why Shazeer et al.
#    use both.
# 3. $z = (L - \mathrm{thr})/\sigma \to \pm\infty$, so $P \to$ 0 or 1 — the real, hard load — and
#    its gradient $\varphi(z)/\sigma \to 0$ almost everywhere. Without noise there is no
#    uncertainty to differentiate; the estimate becomes the count it replaced.
# 4. $\sum_e P_e^2$ is minimised when the *average* probabilities are equal, and a router can
#    get as close to that as it likes while still sending every token to one expert: make each
#    token's softmax nearly uniform with a tiny edge for the favourite. The loss is then near
#    its minimum while the real load is fully collapsed. Weighting by the real fraction $f$
#    puts the pressure where the patients actually are.
# 5. The task loss: the balancing coefficient is small, so among the many balanced routings
#    the GP still picks one that helps the diagnosis. Too large a coefficient does hurt
#    accuracy — it is a trade-off, not a free lunch.
# ### END SOLUTION

# %%
check.progress()
