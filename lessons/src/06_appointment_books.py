# %% [markdown]
# # Lesson 06 — Appointment books
#
# **Difficulty** ★★★☆☆ · **Prerequisites** lesson 03 (top-k referrals), lesson 05 (load) ·
# **Time** about 45 minutes
#
# A specialist's day has a fixed number of appointment slots. The GP can refer as many
# patients as it likes; when a specialist's book is full, the rest are **turned away**. On
# real hardware it is the same: each expert runs on a fixed-size block of memory, sized
# before anyone knows how the router will behave, so every expert gets a **capacity** of
# $C$ tokens per batch, and the tokens beyond it are dropped.
#
# This lesson sizes the books, decides who gets an appointment, and writes the machinery
# that makes sparse routing fast: a **sort-based dispatch** that groups every expert's
# patients with one sort, and the **combine** that brings their answers back — without a
# single Python loop over tokens. Then it asks what happens to the patients who were turned away.
#
# **Code to read alongside:** `minimoe/core/dispatch.py` — `expert_capacity`, `make_plan`,
# `dispatch_forward/backward`, `combine_forward/backward`, `dispatch_combine_forward`;
# `minimoe/core/experts.py` — `experts_forward` (one loop over experts, not tokens).

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
import time

import numpy as np
import matplotlib.pyplot as plt

from minimoe import dispatch, experts, router

from minimoe.course import viz
from minimoe.clinic.data import make_clinic
from minimoe.clinic.models import SparseMoE
from minimoe.clinic.train import train
from minimoe.checks import lesson06 as check

# %% [markdown]
# ## 1. How big is the book?
#
# A batch of $T$ tokens with $k$ referrals each makes $T k$ referrals. Shared perfectly
# evenly among $E$ experts, that is $Tk/E$ each. The **capacity factor** leaves some slack
# for an imperfect GP (GShard, Lepikhin et al. 2020 §2.2; Switch, Fedus et al. 2021 §2.2):
#
# $$C = \Big\lceil \text{capacity\_factor} \cdot \frac{T\,k}{E} \Big\rceil .$$
#
# Switch Transformers train with a factor of 1.0–1.25. A factor below 1 usually means drops
# even for a perfect GP, but not always: the ceiling can round the books back up. With
# $T = 10$, $E = 4$, $k = 1$ and a factor of 0.9, $C = \lceil 2.25 \rceil = 3$, so there are
# 12 slots for 10 patients. Only $C \cdot E < T k$ guarantees that someone is turned away.
# Round up, so that a perfectly balanced GP never turns anyone away.
# One trap: floating point. With $T = 100$, $k = 1$, $E = 10$ and a factor of 1.1,
# `1.1 * 100 * 1 / 10` is `11.000000000000002`, and `math.ceil` of that is 12 — a slot
# nobody meant to add. Round to a few decimals before the ceiling. By minimoe's convention
# `capacity_factor=None` means no limit (return `None`).
#
# ### Exercise 1 — the capacity
#
# *Loops (the course's rule):* no Python loop over tokens; this exercise has no token axis, so a
# loop over its few numbers is fine.

# %%
def expert_capacity(T, E, k, capacity_factor):
    """Appointments per expert, C = ceil(capacity_factor * T * k / E) >= 1, or None."""
    ### BEGIN SOLUTION
    if capacity_factor is None:
        return None
    return max(1, int(np.ceil(round(capacity_factor * T * k / E, 9))))
    ### END SOLUTION


# %%
check.expert_capacity(expert_capacity)

# %% [markdown]
# ## 2. Who gets an appointment?
#
# When a book overflows, someone decides who is seen. minimoe (like GShard's top-2 gating)
# uses two rules, and nothing else:
#
# 1. **A first choice beats a second opinion.** All patients who picked this specialist as
#    their *first* choice are booked before anyone who picked them second.
# 2. **First come, first served.** Within the same choice rank, earlier tokens first.
#
# minimoe's rule depends only on the referrals `idx` $(T,k)$ and the token positions, never
# on the gate values, so capacity adds no kinks of its own to the gradient (lesson 04): the
# booked set changes only when a referral does. That is a choice, not a law. V-MoE's *Batch
# Prioritized Routing* (Riquelme et al. 2021) books the most confident patients first, by
# their gate values, and so turns away the uncertain ones when the books are full. Ten
# patients, four specialists, $k = 2$, capacity factor 1:

# %%
T, E, k = 10, 4, 2
idx = check.referrals(3, T, E, k)                    # a GP that favours the low-numbered experts
C = check.expert_capacity_ref(T, E, k, 1.0)
plan = dispatch.make_plan(idx, E, C)
print("referrals (first choice, second choice) per patient:\n", idx.T)
print(f"C = {C}; requests per expert {np.bincount(idx.ravel(), minlength=E)}; booked {plan.load}; "
      f"turned away {plan.dropped}")
fig = viz.plot_appointment_book(idx, plan.order, plan.offsets, C)
plt.show()

# %% [markdown]
# Dark slots are first choices, light ones second choices. Expert 0 is popular: its book
# fills with first choices and the second opinions it was asked for are turned away — while
# expert 3 has empty slots. Capacity doesn't redirect anyone; it only refuses.
#
# ## 3. The plan: one sort instead of a loop
#
# Here is the plan written the obvious way. Every referral is a *flat assignment id*
# $a = t\,k + j$ (token $t$, choice rank $j$); `order` lists the booked ids expert by
# expert, each expert's in queue order, and `offsets` $(E{+}1,)$ marks where each expert's
# group starts, so expert $e$'s patients are `order[offsets[e]:offsets[e+1]]`.

# %%
def dispatch_plan_loop(idx, E, C):
    """The specification: correct, readable, and far too slow (two Python loops over tokens)."""
    T, k = idx.shape
    books = [[] for _ in range(E)]
    for j in range(k):                               # first choices first ...
        for t in range(T):                           # ... then first come, first served
            e = idx[t, j]
            if C is None or len(books[e]) < C:
                books[e].append(t * k + j)
    order = np.array([a for book in books for a in book], dtype=np.intp)
    offsets = np.cumsum([0] + [len(book) for book in books])
    return order, offsets


order, offsets = dispatch_plan_loop(idx, E, C)
print("same as minimoe:", np.array_equal(order, plan.order) and np.array_equal(offsets, plan.offsets))

# %% [markdown]
# Now without the loops. Give every assignment the sort key $\text{expert}\cdot k + j$:
# sorting by it groups the experts (expert 0's keys are $0..k{-}1$, expert 1's $k..2k{-}1$, …)
# and, inside a group, puts first choices before second choices. A **stable** sort
# (`np.argsort(key, kind="stable")`) keeps equal keys in their original order — token order
# — which is exactly "first come, first served". For capacity, each sorted assignment needs
# its **place in its expert's queue**: its position in the sorted list minus the position
# where its expert's group starts (`np.cumsum` of the request counts, `np.bincount`). Keep
# the places below $C$.
#
# ### Exercise 2 — the vectorised dispatch plan
#
# The check compares your plan with minimoe's on seven cases.
#
# *Loops (the course's rule):* no Python loop over tokens — the check runs your function at two
# numbers of tokens ($T = 256$ and $T = 4096$) and counts the Python lines it executes, which
# must not grow; loops over experts, choices or ranks are fine.

# %%
def dispatch_plan(idx, E, C):
    """Group the referrals by expert, in queue order, and apply the capacity.

    Args:
        idx: (T, k) int, each token's experts, best first. E: number of experts.
        C: capacity per expert (int), or None for no limit.

    Returns:
        order: (N,) int flat ids t * k + j of the booked referrals, grouped by expert.
        offsets: (E + 1,) int, expert e's group is order[offsets[e]:offsets[e + 1]].
    """
    ### BEGIN SOLUTION
    T, k = idx.shape
    expert = idx.reshape(-1)                             # (T*k,) expert of each flat id
    key = expert * k + np.tile(np.arange(k), T)          # group by expert, first choices first
    order = np.argsort(key, kind="stable")               # stable: earlier tokens first
    counts = np.bincount(expert, minlength=E)
    if C is not None:
        starts = np.cumsum(counts) - counts              # where each expert's group starts
        place = np.arange(order.size) - starts[expert[order]]
        order = order[place < C]
        counts = np.minimum(counts, C)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    return order, offsets
    ### END SOLUTION


# %%
check.dispatch_plan(dispatch_plan)

# %% [markdown]
# How much does the loop cost? minimoe's `make_plan` is the vectorised version (with a
# shortcut when no book overflows). At the size of a real batch:

# %%
idx_big = check.referrals(0, 4096, 8, 2)
C_big = check.expert_capacity_ref(4096, 8, 2, 1.25)
for name, fn in [("Python loops", dispatch_plan_loop), ("one stable sort (minimoe)", dispatch.make_plan)]:
    t0 = time.perf_counter()
    fn(idx_big, 8, C_big)
    print(f"{name:>26}: {1e3 * (time.perf_counter() - t0):7.2f} ms")

# %% [markdown]
# ## 4. Dispatch, experts, combine
#
# With the plan, the rest is gathering and scattering rows:
#
# * **dispatch** (gather): row $n$ of the grouped input is token `order[n] // k`, so
#   `x_g = x[order // k]` — one fancy-indexing gather;
# * **experts**: `experts.experts_forward(x_g, offsets, W1, b1, W2, b2)` runs each expert
#   *once* on its contiguous block of rows — one pair of matmuls per expert (a loop over
#   the $E$ experts, not the tokens);
# * **combine** (scatter): each answer goes back to its token, weighed by its gate,
#
# $$y_t = \sum_{j\ \text{booked}} G_{tj}\; \mathrm{FFN}_{\mathrm{idx}_{tj}}(x_t),$$
#
# and a token none of whose referrals was booked gets $y_t = 0$. The gate of grouped row
# $n$ is `gates.reshape(-1)[order[n]]`. One trap: with $k > 1$ a token appears in up to $k$
# rows, and `y[token] += rows` with a repeated index adds only *once* (NumPy buffers the
# fancy-index `+=`). `np.add.at(y, token, rows)` adds at every repeat.
#
# ### Exercise 3 — combine
#
# *Loops (the course's rule):* no Python loop over tokens — the check runs your function at two
# numbers of tokens and counts the Python lines it executes, which must not grow; loops over
# experts, choices or ranks are fine.

# %%
def combine(yg, gates, order, T):
    """Scatter the weighted expert outputs back to their tokens.

    Args:
        yg: (N, d) expert outputs, in grouped order. gates: (T, k) gate values.
        order: (N,) flat ids of the booked referrals. T: number of tokens.

    Returns:
        y: (T, d), zero for tokens with no booked referral.
    """
    ### BEGIN SOLUTION
    k = gates.shape[1]
    g = gates.reshape(-1)[order]                         # (N,) the gate of each grouped row
    y = np.zeros((T, yg.shape[1]), dtype=yg.dtype)
    np.add.at(y, order // k, g[:, None] * yg)            # adds at repeated tokens
    return y
    ### END SOLUTION


# %%
check.combine(combine)

# %% [markdown]
# ### Exercise 4 — combine backward
#
# From $y_t = \sum G_{tj}\, y_{g,n}$ over the rows $n$ of token $t$:
#
# $$dy_{g,n} = G_{tj}\; dy_t, \qquad dG_{tj} = \langle dy_t,\ y_{g,n}\rangle \quad (0 \text{ for a turned-away slot}),$$
#
# with $t = $ `order[n] // k` and $(t,j)$ the flat position `order[n]`. Here there are no
# repeated indices to worry about: each flat position is booked at most once.
#
# *Loops (the course's rule):* no Python loop over tokens — the check runs your function at two
# numbers of tokens and counts the Python lines it executes, which must not grow; loops over
# experts, choices or ranks are fine.

# %%
def combine_backward(dy, yg, gates, order):
    """Backward of combine. Returns (dyg (N, d), dgates (T, k))."""
    ### BEGIN SOLUTION
    k = gates.shape[1]
    dy_rows = dy[order // k]                             # (N, d) each row's upstream gradient
    dyg = gates.reshape(-1)[order][:, None] * dy_rows
    dgates = np.zeros(gates.size)
    dgates[order] = np.sum(dy_rows * yg, axis=1)
    return dyg, dgates.reshape(gates.shape)
    ### END SOLUTION


# %%
check.combine_backward(combine_backward)

# %% [markdown]
# minimoe's `dispatch_combine_forward` is the whole trip — plan, gather, experts, combine —
# and `dispatch_combine_backward` the way back; `MoELayer` calls them. (Its combine avoids
# `np.add.at`, which is slow: since every token owns exactly $k$ slots, it scatters the rows
# to a $(Tk, d)$ array and sums each token's $k$ slots. Read `_sum_slots`.)
#
# ## 5. The patients who were turned away
#
# A dropped token gets $y_t = 0$ from the layer. On its own that would be a disaster — a
# patient sent home with no diagnosis at all. But an MoE layer always sits inside a
# **residual connection**, $v = u + \mathrm{MoE}(u)$: a turned-away patient leaves with the
# notes they came in with, $v = u$, and the next layer (the next doctor) still sees them.
#
# Let's measure it. We train the clinic (top-2, with balancing, capacity factor 1.25 during
# training), then evaluate 2000 patients in one session with smaller and smaller books.

# %%
data = make_clinic(n_train=4000, n_val=2000, n_test=0, seed=0)
model = SparseMoE(data.n_symptoms, data.n_classes, n_experts=8, k=2, capacity_factor=1.25,
                  rng=np.random.default_rng(0))
train(model, data.train, data.val, epochs=6, batch_size=100, lr=0.01, seed=0)
x, y = data.val.x, data.val.y

for cf in (None, 2.0, 1.25, 1.0, 0.75, 0.5, 0.25):
    model.moe.capacity_factor = cf                          # the same GP, different books
    pred = model.forward(x).argmax(axis=1)
    kept = model.moe.stats["kept"]                          # (T, k) bool
    served = kept.sum(axis=1)                               # referrals booked per patient
    line = f"capacity factor {str(cf):>4}: accuracy {np.mean(pred == y):.3f}"
    for n, label in ((2, "both booked"), (1, "one booked"), (0, "turned away")):
        m = served == n
        line += f" | {label} {m.mean():4.0%}" + (f" acc {np.mean(pred[m] == y[m]):.2f}" if m.any() else "")
    print(line)

# %% [markdown]
# Shrinking the books costs accuracy, and a patient who loses one of two referrals still
# does almost as well. But the patients turned away by *both* specialists are diagnosed at
# about chance (1 in 4): this clinic has a single MoE layer, so after it there is no other
# specialist to see them, and the readout alone cannot apply the specialties' rules.
#
# So what does the residual buy them? It keeps their notes intact. Without it, a
# turned-away patient's $v$ would be exactly the zero vector — the same for every such
# patient, all information gone. With it, $v = u$, and a later layer (a second GP, in a
# deeper model) can still tell what they need. A quick test: which specialty is each
# turned-away patient closest to, judged from $v$ alone?

# %%
model.moe.capacity_factor = 0.25
u = x @ model.params["embed.W"] + model.params["embed.b"]          # the notes the patient brings
moe_out = model.moe.forward(u, train=False)
away = ~model.moe.stats["kept"].any(axis=1)                          # turned away by both
u_train = data.train.x @ model.params["embed.W"] + model.params["embed.b"]
centres = np.stack([u_train[data.train.specialty == s].mean(axis=0) for s in range(data.n_specialties)])


def specialty_readable(v):
    """Fraction of turned-away patients whose v is nearest to their own specialty's centre."""
    dist = ((v[away][:, None, :] - centres[None]) ** 2).sum(axis=-1)
    return np.mean(dist.argmin(axis=1) == data.val.specialty[away])


print(f"{away.sum()} patients turned away by both specialists; their MoE output is exactly 0: "
      f"{np.all(moe_out[away] == 0)}")
print(f"specialty still readable with the residual, v = u + MoE(u): {specialty_readable(u + moe_out):.0%}")
print(f"specialty readable without it,              v = MoE(u):     {specialty_readable(moe_out):.0%}")
model.moe.capacity_factor = 1.25

# %% [markdown]
# ## 6. How many are turned away?
#
# It depends on the capacity factor, on $k$, and above all on how balanced the GP is. We take
# the GP we just trained (with balancing) and one trained without, score the 2000 validation
# patients, let each refer every patient to its top $k$, and count the referrals that don't
# fit in the books.

# %%
unbalanced = SparseMoE(data.n_symptoms, data.n_classes, n_experts=8, k=2, balance=None,
                       rng=np.random.default_rng(0))
train(unbalanced, data.train, data.val, epochs=6, batch_size=100, lr=0.01, seed=0)

factors = np.round(np.arange(0.25, 3.01, 0.125), 3)
rates = {}
for title, m in (("GP trained with balancing", model), ("GP trained without balancing", unbalanced)):
    u = x @ m.params["embed.W"] + m.params["embed.b"]      # what the GP reads
    H = u @ m.params["block.W_gate"]                       # its clean scores (eval mode)
    rates[title] = {}
    for kk in (1, 2, 4):
        top = router.topk_indices(H, kk)
        rates[title][f"k = {kk}"] = [
            dispatch.make_plan(top, 8, check.expert_capacity_ref(len(x), 8, kk, cf)).dropped / top.size
            for cf in factors]
fig = viz.plot_drop_rates(factors, rates)
plt.show()

# %% [markdown]
# At factor 1 even the balanced GP turns some patients away: a batch is never perfectly
# even. Larger $k$ spreads the referrals over more experts and smooths the load, so fewer
# are dropped at the same factor. The unbalanced GP needs much bigger books to serve
# everyone, especially at $k = 1$ — memory and compute spent on slots that stay empty for
# the experts it neglects.
# Balancing (lesson 05) and capacity are two halves of one design.
#
# ## Questions to think about
#
# 1. Capacity is per *batch*. Why does the same GP drop more tokens with small batches?
# 2. At inference, many systems run with no capacity limit (or a large factor). What could go
#    wrong if a model trained with factor 1.0 is served with no limit — and the other way round?
# 3. Our priority rule favours earlier tokens. In a language model, which tokens would be
#    dropped most often, and why might that be a problem? (Think of a long prompt.)
# 4. Instead of dropping, a full specialist's patient could be sent to their *next* choice
#    that has room. What would that cost in the sort-based plan?
# 5. minimoe's priority rule ignores the gate values; V-MoE's batch-prioritised routing uses
#    them. What does a gate-based priority change for the gradient, and what does it buy?

# %% [markdown]
# ### BEGIN SOLUTION
# **Some answers.**
# 1. Relative fluctuations of the per-expert counts shrink like $1/\sqrt{T}$: with few tokens,
#    the busiest expert is further above its average share, so it overflows a book sized
#    from the average.
# 2. Served without a limit, tokens that were dropped in training now get an expert's answer
#    the model never learned to use with them, so outputs shift (usually mildly). Served with
#    a tight limit, tokens the model relied on being processed are dropped, and quality
#    falls — and depends on what else is in the batch, which makes outputs non-deterministic
#    across requests.
# 3. The last tokens of a batch — the end of a long sequence, or the last requests packed
#    into a batch — are dropped first, and in a causal model those are often the ones that
#    matter for the next prediction. Some systems randomise or use router confidence as the
#    priority (Batch Prioritized Routing, Riquelme et al. 2021).
# 4. A second pass: take the dropped assignments, re-route them to the next-best expert with
#    room, and plan again — more sorting, more data movement, and it can cascade. Dropping is
#    the cheap rule; rerouting trades speed for fewer losses.
# 5. With a gate-based priority the booked set also changes when two patients' gates swap
#    order, so there are more kinks (lesson 04) in the loss, and the priority is something the
#    router can learn to game. Depending only on `idx` and positions, the kept set changes only
#    when a referral does. What it buys (Riquelme et al. 2021): when books are full, the
#    patients the GP is least sure about are turned away rather than the late ones, which
#    lets V-MoE run with capacity factors well below 1 and lose little accuracy.
# ### END SOLUTION

# %%
check.progress()
