# %% [markdown]
# # Lesson 11 — A network of clinics
#
# **Difficulty** ★★★★☆ · **Prerequisites** lesson 06 (capacity, the sort-based dispatch plan),
# lesson 07 (the whole layer's backward) · **Time** about 45 minutes
#
# One clinic cannot employ every specialist of a large MoE: Mixtral's or DeepSeek's experts
# do not fit on one device. So the town builds **a network of clinics**. Each clinic keeps a
# few of the specialists and receives its own share of the patients; each has its own GP,
# and all GPs follow the same referral rules (the router is *replicated*). When a GP refers a
# patient to a specialist who works across town, the referral becomes a **transfer**.
#
# Transfers are expensive, so they are never made one patient at a time. Once per step a
# shuttle runs between every pair of clinics, carrying all the patients for that clinic in
# one trip — the **all-to-all** — and later brings them home with the specialists' answers
# (GShard, Lepikhin et al. 2020 §3.2; Switch Transformers, Fedus et al. 2021 §2.2 and fig. 3).
# The capacity factor of lesson 06 becomes **the number of beds the other clinic keeps for you**.
#
# In this lesson you write the three pieces of bookkeeping that make the shuttle run — the
# send counts and displacements of the exchange, the permutation that groups the arrivals
# and brings the results home, and the backward of the exchange — then measure what travels,
# see why the capacity factor matters more across machines, and run the real thing: two
# processes talking over MPI.
#
# **Code to read alongside:** `minimoe/beyond/parallel.py` — `global_plan`, `ExpertTeam` (the
# team that runs `MoELayer`'s own pair with the experts on other ranks) and
# `ExpertParallelMoELayer`; `minimoe/beyond/ranks.py` — `Call` (a status meeting before every
# collective, so no rank waits forever) and `LocalComm` (P ranks as threads).

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

from minimoe import MoELayer
from minimoe.beyond.parallel import ExpertParallelMoELayer, run_ranks
from minimoe.course import viz
from minimoe.checks import lesson11 as check

# %% [markdown]
# ## 1. Who travels where
#
# MPI calls each clinic a **rank**: P processes, numbered 0 … P−1, running the same program.
# With E experts, rank r keeps the block of experts $r\,E/P, \dots, (r{+}1)\,E/P - 1$
# (`check.owner_of(e, E, P)` is $e \,/\!/\, (E/P)$). Every rank routes *its own* tokens with
# the same router, exactly as in lesson 03. Here is rank 0 of a two-clinic town, eight
# patients, four specialists (experts 0–1 at clinic 0, 2–3 at clinic 1), $k = 2$:

# %%
T, E, k, P = 8, 4, 2, 2
idx, kept = check.routing_case(5, T, E, k, P, cf=1.0)
owner = check.owner_of(idx, E, P)
print("referrals (first, second choice) of rank 0's patients:\n", idx.T)
print("the clinic each referral goes to:\n", owner.T)
print("booked (capacity):\n", kept.T.astype(int))
print(f"{int((owner[kept] != 0).sum())} of {int(kept.sum())} booked referrals leave clinic 0")

# %% [markdown]
# MPI's `Alltoallv` sends one buffer per rank. The rows for rank 0 come first, then those for
# rank 1, and so on, and two small arrays describe the buffer: **counts**`[r]`, how many rows
# go to rank r, and **displs**`[r]` (displacements), the row where rank r's part *starts* — the
# running sum of the counts before r. So the send buffer must be sorted by destination. Sort it
# by *expert* and you get that for free (each rank owns a contiguous block of experts), and the
# receiving clinic finds each specialist's patients together. Inside an expert, keep lesson 06's
# queue order: the key $\text{expert}\cdot k + j$ with a **stable** sort (first choices first,
# then earlier tokens). A referral turned away by capacity (`kept` is False) never travels.
#
# ### Exercise 1 — send counts and displacements
#
# *Loops (the course's rule):* no Python loop over tokens (here: over rows) — the check counts
# your function's Python steps at T = 256 and T = 4096 tokens; loops over the P ranks or the
# experts are fine.

# %%
def send_layout(idx, kept, E, P):
    """What this rank puts on the shuttle.

    Args:
        idx: (T, k) int, each token's experts, best first. kept: (T, k) bool, booked referrals.
        E: experts. P: ranks (rank r owns experts r*E/P ... (r+1)*E/P - 1).

    Returns:
        order: (N,) int flat ids t * k + j of the kept referrals, sorted by (expert, j, t).
        counts: (P,) int, rows sent to each rank.   displs: (P,) int, where each rank's rows start.
    """
    ### BEGIN SOLUTION
    T, k = idx.shape
    expert = idx.reshape(-1)
    order = np.argsort(expert * k + np.tile(np.arange(k), T), kind="stable")   # lesson 06's queue
    order = order[kept.reshape(-1)[order]]                                     # the dropped stay home
    counts = np.bincount(check.owner_of(expert[order], E, P), minlength=P)
    displs = np.cumsum(counts) - counts
    return order, counts, displs
    ### END SOLUTION


# %%
check.send_layout(send_layout)

# %% [markdown]
# Before the rows travel, the **counts travel first**: a rank cannot receive rows without
# knowing how many will come. minimoe's layer sends every rank's table of "how many of my
# j-th choices go to expert e" to every other rank (one small `allgather`). That table is
# enough for every rank to work out every transfer, *and* the global capacity: more below.
#
# ## 2. At the other clinic
#
# Rank r receives rows from rank 0, then from rank 1, and so on — and each source's rows are
# grouped by expert. But each specialist wants *all* its patients in one block, to see them
# in one sitting (one pair of matmuls per expert, as in lesson 06). If `blocks[s, e]` rows came
# from source s for local expert e, the arrivals look like this (rank 1 of a 3-clinic town,
# two local experts):

# %%
blocks = np.array([[2, 1], [0, 3], [1, 1]])                     # blocks[s, e]
arrived_from = np.repeat(np.repeat(np.arange(3), 2), blocks.reshape(-1))
arrived_for = np.repeat(np.tile(np.arange(2), 3), blocks.reshape(-1))
print("row:            ", np.arange(blocks.sum()))
print("came from rank: ", arrived_from)
print("for expert:     ", arrived_for)

# %% [markdown]
# We need a permutation `perm` with `received[perm]` grouped by expert (and, inside an
# expert, sources in rank order), and its inverse `home`, with `grouped[home]` back in arrival
# order — so that the results ride the shuttle home in the very slots their patients came in.
# Label each row with its expert (`np.repeat`), sort the labels stably; the inverse of a
# permutation is one scatter, `home[perm] = np.arange(N)`.
#
# With $k = 1$, sources in rank order inside an expert is the global token order (rank 0's
# patients first), the order of the single-process layer. With $k > 1$ each source sends an
# expert its first choices, then its second choices, so the layer sorts by one more label:
# (expert, choice, source rank) — all first choices, from every rank in rank order, before any
# second choice, as one process orders them (`_arrival_order` in `minimoe/beyond/parallel.py`).
# Here the blocks carry no choice label: one block per (source, expert), as with $k = 1$.
#
# ### Exercise 2 — the permutation that brings results home
#
# *Loops (the course's rule):* no Python loop over tokens (here: over rows) — the check counts
# your function's Python steps at T = 256 and T = 4096 tokens; loops over the P ranks or the
# experts are fine.

# %%
def arrival_permutation(blocks):
    """Group the arrivals by expert, and the way back.

    Args:
        blocks: (P, E_r) int, blocks[s, e] rows arrived from rank s for local expert e
            (source 0's first, each source's grouped by expert).

    Returns:
        perm: (N,) int, received[perm] is grouped by expert (sources in rank order inside).
        home: (N,) int, the inverse: grouped[home] is in arrival order again.
    """
    ### BEGIN SOLUTION
    P, Er = blocks.shape
    expert_of_row = np.repeat(np.tile(np.arange(Er), P), blocks.reshape(-1))
    perm = np.argsort(expert_of_row, kind="stable")
    home = np.empty_like(perm)
    home[perm] = np.arange(perm.size)
    return perm, home
    ### END SOLUTION


# %%
check.arrival_permutation(arrival_permutation)

# %% [markdown]
# ## 3. The round trip, on simulated clinics
#
# With these two pieces the whole trip is lesson 06's dispatch with a shuttle in the middle:
#
# 1. each rank gathers its rows in `order` and sends `counts[r]` of them to rank r;
# 2. each rank groups what arrived (`perm`), runs each local expert once on its block, and
#    puts the answers back in arrival order (`home`);
# 3. the shuttle runs the other way, with the counts transposed, and each rank combines the
#    answers into its tokens' outputs as in lesson 06.
#
# `check.exchange(sends, counts)` is the all-to-all of P ranks simulated in one process
# (`counts[s, r]` rows from rank s to rank r). minimoe's `ExpertParallelMoELayer` does all of
# this with MPI. Its `LocalComm` plays the P ranks as threads of one process, and
# `run_ranks(P, fn)` runs `fn(comm)` once per rank — so we can check the layer here against the
# single-process `MoELayer` on the whole batch (rank 0's patients first):

# %%
rng = np.random.default_rng(0)
single = MoELayer(8, 16, 8, k=2, balance="switch", capacity_factor=1.0, rng=rng)
single.params["W_gate"] *= 10                                     # an opinionated GP: books overflow
x, noise, dy = rng.standard_normal((64, 8)), rng.standard_normal((64, 8)), rng.standard_normal((64, 8))
y_single = single.forward(x, noise=noise)
dx_single = single.backward(dy)


def one_clinic(comm):
    """What every rank runs: its own slice of the patients, its own E/P specialists."""
    r, n = comm.Get_rank(), comm.Get_size()
    mine = slice(r * 64 // n, (r + 1) * 64 // n)
    layer = ExpertParallelMoELayer.from_layer(single, comm)
    y = layer.forward(x[mine], noise=noise[mine])
    dx = layer.backward(dy[mine])
    return y, dx, layer.aux_loss, layer.stats["dropped"], list(layer.expert_ids)


for n in (2, 4):
    runs = run_ranks(n, one_clinic)
    err_y = np.abs(np.concatenate([r[0] for r in runs]) - y_single).max()
    err_dx = np.abs(np.concatenate([r[1] for r in runs]) - dx_single).max()
    assert err_y < 1e-12 and err_dx < 1e-12 and runs[0][3] == single.stats["dropped"]
    print(f"P = {n}: experts per clinic {[r[4] for r in runs]}; max |Δy| {err_y:.1e}, max |Δdx| {err_dx:.1e}, "
          f"dropped {runs[0][3]} = {single.stats['dropped']} (single process)")

# %% [markdown]
# ## 4. The way back: the backward of an exchange
#
# The exchange moves rows; it adds nothing and multiplies nothing. It is a *permutation* of
# all the rows of all the ranks, a linear map $y = \Pi x$, and the gradient of a linear map
# is its transpose: $dx = \Pi^\top dy$. The transpose of a permutation is its inverse — every
# row's gradient travels back to the rank, and the place, it came from. And the inverse of an
# all-to-all is again an all-to-all, with the counts transposed: what rank r received from rank
# s is exactly what s must get back from r. That is why the layer's backward is "the same two
# exchanges in reverse": $dy$ travels to the experts as $x$ did, $dx$ comes home as $y$ did.
#
# ### Exercise 3 — the backward of the exchange
#
# Given the gradients `d_received[r]` of what each rank received, return the gradient
# `d_sent[s]` of what each rank sent (the same shape as its send buffer). `check.exchange`
# may help. The check also verifies the adjoint identity $\langle \Pi a, b\rangle = \langle a, \Pi^\top b\rangle$.
#
# *Loops (the course's rule):* no Python loop over tokens (here: over rows) — the check counts
# your function's Python steps at T = 256 and T = 4096 tokens; loops over the P ranks or the
# experts are fine.

# %%
def exchange_backward(d_received, counts):
    """Backward of check.exchange(sends, counts).

    Args:
        d_received: list of P arrays, d_received[r] (rows rank r received, d).
        counts: (P, P) int, counts[s, r] rows went from rank s to rank r.

    Returns:
        d_sent: list of P arrays, d_sent[s] with the shape of rank s's send buffer.
    """
    ### BEGIN SOLUTION
    return check.exchange(d_received, np.asarray(counts).T)      # the transpose is the way back
    ### END SOLUTION


# %%
check.exchange_backward(exchange_backward)

# %% [markdown]
# ## 5. Beds kept for you: capacity across the network
#
# Capacity is now a promise between clinics: clinic 1 keeps $C$ beds per specialist for the
# whole town, $C = \lceil \text{cf}\cdot T_\text{global}\, k / E\rceil$, and the drop priority
# must be the town's, not each clinic's, or the answer would depend on how patients were split
# between clinics: all first choices before second choices, then by global token order (clinic
# 0's patients first). The table of counts that travelled first gives every rank the queue
# ahead of its own patients, so every rank decides *before the shuttle leaves* which of its
# referrals get a bed: a dropped referral never travels. That is `global_plan` in
# `minimoe/beyond/parallel.py`; the balancing losses are global in the same way (their
# per-expert sums are added over the ranks before the loss is taken).
#
# What does the shuttle carry? Each rank sends the rows of its $T_r k$ referrals that go
# to other clinics — with a uniform GP a fraction $(P-1)/P$ — four times per training step
# (forward out and back, backward out and back), each row $d$ numbers:
#
# $$\text{bytes} \approx 4 \cdot T_r\, k\, \tfrac{P-1}{P}\, d \cdot \text{itemsize}.$$
#
# Many accelerator implementations send fixed-size buffers instead (static shapes): $C$ rows
# per expert whether or not they are used, which multiplies the bytes by the capacity factor.
# `check.cost_model` is this formula; the dots are `stats["sent_bytes"]` of the real layer,
# run on simulated clinics (1024 patients per clinic, $d = 16$, float64).

# %%
def measured_bytes(E=8, P=2, k=2, cf=None, T_local=1024, d=16):
    """Mean bytes one rank sent in one forward + backward of the expert-parallel layer,
    with T_local patients per clinic (so P clinics see P * T_local in all)."""
    T_global = T_local * P
    rng = np.random.default_rng(1)
    layer = MoELayer(d, 16, E, k=k, capacity_factor=cf, rng=rng)
    x = rng.standard_normal((T_global, d))

    def rank(comm):
        r = comm.Get_rank()
        par = ExpertParallelMoELayer.from_layer(layer, comm)
        y = par.forward(x[r * T_global // P:(r + 1) * T_global // P], train=False)
        par.backward(np.ones_like(y))
        return par.stats["sent_bytes"]
    return float(np.mean(run_ranks(P, rank)))


def model(E=8, P=2, k=2, cf=None, padded=False, T_local=1024, d=16):
    return check.cost_model(T_local, d, k, P, capacity_factor=cf, padded=padded)


Es, Ps, ks, cfs = [4, 8, 16, 32, 64], [1, 2, 4, 8], [1, 2, 3, 4], [0.5, 0.75, 1.0, 1.25, 1.5, 2.0]
panels = [
    {"xlabel": "experts E (P = 2, k = 2)", "x": Es, "curves": {"cost model": [model(E=e) for e in Es]},
     "points": {"measured": (Es, [measured_bytes(E=e) for e in Es])}},
    {"xlabel": "ranks P (E = 8, k = 2)", "x": Ps, "curves": {"cost model": [model(P=p) for p in Ps]},
     "points": {"measured": (Ps, [measured_bytes(P=p) for p in Ps])}},
    {"xlabel": "experts per token k (E = 8, P = 2)", "x": ks, "curves": {"cost model": [model(k=kk) for kk in ks]},
     "points": {"measured": (ks, [measured_bytes(k=kk) for kk in ks])}},
    {"xlabel": "capacity factor (E = 8, P = 2, k = 2)", "x": cfs,
     "curves": {"only kept rows travel (minimoe)": [model() for c in cfs],
                "fixed buffers of C rows per expert": [model(cf=c, padded=True) for c in cfs]},
     "points": {"measured": (cfs, [measured_bytes(cf=c) for c in cfs])}},
]
fig = viz.plot_bytes_moved(panels)
plt.show()
by_E, by_P, by_k, by_cf = (p["points"]["measured"][1] for p in panels)     # what the text below says:
assert max(by_E) < 1.1 * min(by_E) and np.all(np.diff(by_P) > 0) and np.all(np.diff(by_k) > 0)
assert by_cf[0] < by_cf[2] < model() and max(by_cf) <= model() * 1.05

# %% [markdown]
# Read the panels left to right. **E does not matter**: a token's row travels once per
# chosen expert however many experts there are — adding specialists adds parameters, not
# traffic. **P saturates**: with more clinics a larger share of referrals leave home, up to
# all of them. **k is linear**: every extra referral is another row on the shuttle, which is
# why expert parallelism favours small k. **The capacity factor** caps the traffic: below 1
# the dropped referrals stay home (the dots fall below the line); above 1 minimoe sends only
# what is booked, but fixed-size buffers carry the empty beds too.
#
# ## 6. Why the capacity factor matters more across machines
#
# A step of an expert-parallel layer is compute plus exchange, and the exchange waits for
# the *slowest* rank — the one whose specialists are most popular, which receives the most
# rows. Capacity bounds that: no rank receives more than cf times the average. A simple model
# for one exchange: a latency $\alpha$ per partner plus bytes over bandwidth $\beta$,
# $t = \alpha\,(P-1) + \text{bytes}/\beta$. The numbers below are *assumptions* of the
# right order (not measurements): one Mixtral-sized layer ($d = 4096$, $h = 14336$, $k = 2$,
# SwiGLU experts: $6dh$ FLOPs per row, lesson 01), 8192 tokens per rank, bfloat16, 8 ranks,
# 400 TFLOP/s per device; links of 300 GB/s (inside one machine) and 25 GB/s (between
# machines).

# %%
d_, h_, k_, T_, P_, flops = 4096, 14336, 2, 8192, 8, 400e12
# a SwiGLU expert (lesson 01) is three matrices, W1, W3 (d, h) and W2 (h, d): 2 · 3dh = 6dh FLOPs a row
compute = 3 * T_ * k_ * (6 * d_ * h_) / flops                  # fwd + bwd ≈ 3 × forward FLOPs of k experts
for link, bw, alpha in (("inside one machine", 300e9, 5e-6), ("between machines", 25e9, 20e-6)):
    for cf in (1.0, 1.25, 2.0):
        sent = check.cost_model(T_, d_, k_, P_, capacity_factor=cf, itemsize=2, padded=True)
        exchange_s = 4 * alpha * (P_ - 1) + sent / bw
        print(f"{link:>19}, cf {cf:4}: compute {1e3 * compute:5.1f} ms, exchanges {1e3 * exchange_s:5.1f} ms "
              f"-> {exchange_s / (compute + exchange_s):4.0%} of the step")

# %% [markdown]
# Inside one machine the exchange is a small share of the step (4 to 7%), and a generous
# capacity factor costs little. Between machines the same bytes take twelve times as long: the
# exchange is about a third of every step at a capacity factor of 1 and nearly half at 2, and
# every extra bed the capacity factor keeps
# free is paid for in the slowest resource of the system. That is why large MoEs train with
# capacity factors near 1 (or without capacity but with tight balancing), why they place the
# ranks of one expert-parallel group inside one machine when they can, and why balancing
# (lesson 05) is not only about quality: an unbalanced GP makes one clinic the straggler
# everyone waits for.
#
# ## 7. The real thing: two processes over MPI
#
# Everything so far ran in one process. `check.launch(2)` starts
# `mpiexec -n 2 python -m minimoe.course.checks.lesson11`: two Python processes, each with
# half of 512 patients and four of the eight specialists, talking through MPI (`pip install
# mpi4py mpich` brings a real MPI library). Each compares its slice with the single-process
# layer on the whole batch. If MPI is not installed, the same code runs on simulated ranks
# instead, so this cell always works; the first line says which one ran.

# %%
result, how = check.launch(2)
print("ran on:", how)
for key in ("experts_per_rank", "rows_treated", "sent_bytes", "dropped", "dropped_single"):
    print(f"{key:>17}: {result[key]}")
print(f"max |Δy| {result['max_diff_y']:.1e}, max |Δdx| {result['max_diff_dx']:.1e}, "
      f"W_gate gradient (relative) {result['max_rel_diff_W_gate_grad']:.1e}, "
      f"aux loss {result['aux_loss']:.6f} vs {result['aux_loss_single']:.6f}")
assert max(result["max_diff_y"], result["max_diff_dx"], result["max_rel_diff_W_gate_grad"]) < 1e-12

# %% [markdown]
# The same numbers as one process, to rounding. On several machines only the launch changes:
# `mpiexec -n 16 -f hosts python train.py`, with a host file listing the machines (see the
# README, *Several processes or machines*).
#
# ## Questions to think about
#
# 1. The router is replicated and its gradient summed over ranks. What would go wrong if
#    one rank's router weights drifted by one rounding error? (minimoe checks a digest of
#    them before every forward.)
# 2. Why must the counts travel before the rows? What would an implementation with fixed-size
#    buffers gain by skipping that step, and what does it pay?
# 3. With k = 2, a token whose two experts live on the same remote rank travels twice. How
#    could you send it once? What would the combine on the way back need to change?
# 4. The all-to-all cost does not grow with E, but the number of ranks P usually does. What
#    limits P for a fixed E, and what happens when E/P < 1?
# 5. Why does the drop priority have to be computed over the global batch? Construct a
#    two-rank example where per-rank capacities drop different tokens than the global rule.

# %% [markdown]
# ### BEGIN SOLUTION
# **Some answers.**
# 1. The replicas would route the same token differently depending on its rank, and their
#    updates would diverge further every step: the "one model" would silently become P
#    models. Summed gradients keep the replicas bitwise equal only if they start equal.
# 2. A receive buffer must be sized before the rows arrive, and capacity drops can only be
#    decided knowing the queue ahead. Fixed-size buffers (C rows per expert) skip the count
#    exchange (one small latency-bound message) but pay with padding: empty beds travel too.
# 3. Deduplicate per destination rank: send each token once to each rank that owns any of its
#    experts, with the list of local experts; the owner runs each, sums the gated answers
#    (it needs the gates too), and sends one row back. Less traffic for more bookkeeping.
# 4. P ≤ E if each rank owns whole experts; beyond that, an expert must itself be split
#    (tensor parallelism inside an expert) or replicated (data parallelism), and the
#    all-to-all then runs within groups of ranks.
# 5. Otherwise the result would depend on how the batch was split: two ranks each under
#    their own capacity C/2 might keep tokens the global queue drops. E.g. E = 2, k = 1, C = 2:
#    rank 0 sends tokens 0, 1 to expert 0 and rank 1 sends token 2; the global rule keeps 0, 1
#    and drops 2, per-rank books of 1 bed would keep 0 and 2 and drop 1.
# ### END SOLUTION

# %%
check.progress()
