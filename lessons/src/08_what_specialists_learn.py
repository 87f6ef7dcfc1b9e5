# %% [markdown]
# # Lesson 08 — What specialists really learn
#
# **Difficulty** ★★★★☆ · **Prerequisites** lesson 07 (training the clinics) ·
# **Time** about 45 minutes
#
# We called the experts *specialists* and the router a *GP* for seven lessons. Time to check
# the analogy against what a trained clinic actually does. Our clinic data has a hidden
# answer key — every patient's true specialty — that no model ever trains on. So we can
# open the clinic's books and ask: which patients did each specialist end up seeing?
#
# Three findings, each with a misconception it corrects:
#
# 1. The experts form **their own clusters**, which need not match the human labels: one
#    expert takes two specialties, another shares a specialty with a colleague, and a
#    retrained clinic carves the patients up differently. *Experts define clusters, not
#    classes.*
# 2. A referral that never reads the symptoms — **hash routing**, a fixed random assignment
#    (Roller et al. 2021, *Hash Layers*) — is a serious baseline, and tells us how much of
#    the GP clinic's success is the *learned* referral.
# 3. A mixture of experts is **not an ensemble of domain models** trained separately on
#    human-labelled subjects and glued together. You will build that ensemble, and compare
#    what it costs, how well it does, what each member sees — and what it needed that the
#    MoE did not.
#
# **Code to read alongside:** `minimoe/clinic/train.py` (`specialty_routing`), `minimoe/lm/corpus.py`
# (`mutual_information`), `minimoe/beyond/hash_router.py` (`hash_route`, `HashMoELayer`),
# `minimoe/clinic/models.py` (`Clinic`, `Generalist`, `SparseMoE`), `minimoe/course/viz/specialties.py`
# (`plot_specialty_routing`).

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
from minimoe.lm.corpus import mutual_information
from minimoe.clinic.data import Split, bayes_accuracy, make_clinic
from minimoe.beyond.hash_router import HashMoELayer, content_ids
from minimoe.clinic.models import Clinic, Generalist, SparseMoE
from minimoe.clinic.train import evaluate, specialty_routing, train
from minimoe.checks import lesson08 as check

# %% [markdown]
# ## 1. Open the books
#
# The clinic of lesson 07: 4,000 patients from $S = 8$ hidden specialties, a GP clinic with
# $E = 8$ specialists, $k = 2$ per patient, trained for 10 epochs. `specialty_routing`
# counts, on the test patients, how many of each specialty every expert received — reading
# the specialty labels for the first time.

# %%
S = 8
data = make_clinic(4000, 1000, 2000, n_specialties=S, seed=0)
bayes = bayes_accuracy(data.noise, data.n_classes)
TRAIN = dict(epochs=10, batch_size=128, lr=1e-2, progress=False)


def gp_clinic(n_experts, seed=0):
    """The GP clinic of lesson 07 (d=16, experts of width 8, noisy top-2), trained with `seed`."""
    model = SparseMoE(data.n_symptoms, data.n_classes, d_model=16, d_hidden=8, n_experts=n_experts, k=2,
                      rng=np.random.default_rng(10_000 + seed))
    train(model, data.train, data.val, seed=seed, **TRAIN)
    return model


gp = gp_clinic(8)
print(f"GP clinic: test accuracy {evaluate(gp, data.test)['acc']:.3f}")
fig = viz.plot_specialty_routing(specialty_routing(gp, data.test),
                                 title="Every referral (k = 2): each expert's patients by specialty (%)")
plt.show()

# %% [markdown]
# With $k = 2$ every patient appears in two rows, which blurs the picture. To ask *whose
# patient is this?*, count only the GP's **first choice** — the expert with the largest
# gate:

# %%
def first_choice(model, x):
    """The expert each patient is referred to first, (N,) int (eval mode: no noise)."""
    model.forward(x, train=False)
    return model.moe.stats["topk_idx"][:, 0]


def referral_table(experts, specialty, n_experts):
    """(E, S) counts: how many patients of specialty s went (first) to expert e."""
    table = np.zeros((n_experts, S), dtype=np.int64)
    np.add.at(table, (experts, specialty), 1)
    return table


table = referral_table(first_choice(gp, data.test.x), data.test.specialty, 8)
print(table)

# %% [markdown]
# Read the table row by row (experts) and column by column (specialties). Some experts are
# one specialty's doctor. But look for an expert whose row has two large entries — it has
# **merged** two specialties into one cluster of its own — and for a specialty whose column
# has two large entries — **split** between two experts. Nobody told the GP that there are
# eight specialties, or which patients belong together; it grouped patients in whatever
# way made the diagnoses easiest, under the pressure of the balancing loss.
#
# Two numbers summarise a table. **Expert purity** asks whether each expert serves one
# specialty; **specialty purity** whether each specialty is served by one expert:
#
# $$\text{expert purity} = \frac{1}{N}\sum_{e} \max_s n_{es}, \qquad
#   \text{specialty purity} = \frac{1}{N}\sum_{s} \max_e n_{es},$$
#
# with $n_{es}$ the table's counts and $N = \sum_{e,s} n_{es}$. Both are 1 for a one-to-one
# referral; merging lowers the first, splitting the second.
#
# ### Exercise 1 — purity
#
# *Loops (the course's rule):* no Python loop over tokens; this exercise has no token axis, so a
# loop over its few numbers is fine.

# %%
def purity(counts):
    """Expert purity and specialty purity of an (E, S) table of referral counts.

    Returns:
        (expert_purity, specialty_purity): two floats in (0, 1].
    """
    ### BEGIN SOLUTION
    counts = np.asarray(counts, dtype=float)
    total = counts.sum()
    return counts.max(axis=1).sum() / total, counts.max(axis=0).sum() / total
    ### END SOLUTION


# %%
check.purity(purity)

# %% [markdown]
# Purity looks at the largest entry only. **Mutual information** uses the whole table: how
# many nats of uncertainty about the patient's specialty are removed by knowing the expert,
#
# $$I(\text{expert}; \text{specialty}) = \sum_{e,s} p(e,s)\,\log\frac{p(e,s)}{p(e)\,p(s)} ,$$
#
# which is 0 for an expert choice independent of the specialty and $H(\text{specialty})$
# when the expert determines it. `minimoe.lm.corpus.mutual_information(a, b)` computes it from
# two label arrays; dividing by $H(S) = I(S; S)$ gives a fraction in $[0, 1]$.

# %%
def information(experts, specialty):
    """I(expert; specialty) / H(specialty): the share of the specialty the referral reveals."""
    return mutual_information(experts, specialty) / mutual_information(specialty, specialty)


e_purity, s_purity = check.purity_ref(table)
info = information(first_choice(gp, data.test.x), data.test.specialty)
print(f"GP clinic, E = 8: expert purity {e_purity:.2f}, specialty purity {s_purity:.2f}, "
      f"I(expert; specialty) / H(specialty) = {info:.2f}")

# %% [markdown]
# ## 2. Clusters, not classes
#
# If the experts were the specialties, the picture would not depend on how many experts we
# hire or on the luck of the initial weights. It does. Train the same clinic with 4 and with
# 16 experts, and once more with 8 experts from another random start (a few seconds):

# %%
clinics = {"E = 8": gp, "E = 8, another seed": gp_clinic(8, seed=1),
           "E = 4": gp_clinic(4), "E = 16": gp_clinic(16)}
tables = {}
for name, model in clinics.items():
    E = model.moe.n_experts
    experts = first_choice(model, data.test.x)
    tables[name] = referral_table(experts, data.test.specialty, E)
    e_purity, s_purity = check.purity_ref(tables[name])
    print(f"{name:<20} accuracy {evaluate(model, data.test)['acc']:.3f}   expert purity {e_purity:.2f}   "
          f"specialty purity {s_purity:.2f}   information {information(experts, data.test.specialty):.2f}")

fig = viz.plot_routing_tables(tables, ncols=2, title="The GP's first choice: each expert's patients by "
                                                      "hidden specialty (%)")
plt.show()

# %% [markdown]
# * With **4 experts** for 8 specialties, every expert must merge: expert purity drops,
#   specialty purity stays high. Which specialties share an expert is arbitrary — it is
#   whatever pairing the GP found first.
# * With **16 experts**, nearly every expert serves a single specialty (expert purity close
#   to 1), some specialties are split between two or three experts, and a few experts are
#   almost idle as first choice. A split follows some direction *inside* a specialty that
#   helps its diagnosis rule — a cluster no human label names.
# * With **another seed**, the same 8 experts group the specialties differently: other
#   merges, other splits, a different accuracy.
#
# Douglas Orr's essay on the mixture-of-experts metaphor (*Deep Learning Metaphors*, 2023,
# douglasorr.github.io/2023-03-deep-metaphors/mixture_of_experts.html) puts it in four
# words: experts define **clusters, not classes**.
# An expert "for cardiology" is a story we tell after the fact; sometimes it fits well,
# sometimes it is a fuzzy match, sometimes there is no human word for the cluster at all.
#
# ## 3. A receptionist instead of a GP: hash routing
#
# Is the learned referral doing the work, or would *any* fixed assignment of patients to
# specialists do? Roller et al. (2021, *Hash Layers For Large Sparse Models*) replaced the
# router of a language model with a **fixed hash of the token's id**: every occurrence of
# a word goes to the same expert(s), chosen at random once and for all, never learned —
# and found it competitive with learned routing. (`minimoe/beyond/hash_router.py`: `hash_route`
# picks $k$ distinct experts from a splitmix64 hash of each id; the $k$ gates are $1/k$.)
#
# A patient has no word id. We try two receptionists who never read the chart:
#
# * **by record number** — a unique, meaningless id per patient (here: a hash of the bytes
#   of their symptoms, `content_ids`). Two patients with the same illness get unrelated
#   referrals.
# * **by intake form** — five yes/no questions ("is symptom $j$ above normal?"), so
#   $2^5 = 32$ possible answer codes, each hashed to $k = 2$ specialists. Like a word id, the
#   code is crude but not meaningless: similar patients tend to tick the same boxes.
#
# The block of a `Clinic` only sees the embedded symptoms, so `HashClinic` computes the id
# from the raw symptoms and hands it to its `HashMoELayer`:

# %%
class IdReferral(HashMoELayer):
    """A HashMoELayer that reads the ids the clinic set for this batch (the block sees only u)."""
    ids = None

    def forward(self, u, train=True, noise=None):
        return super().forward(u, train=train, noise=noise, ids=self.ids)


class HashClinic(Clinic):
    """The GP clinic with a receptionist: patients are referred by a fixed hash of id_of(x)."""
    kind = "hash"

    def __init__(self, id_of, n_experts=8, k=2, rng=None):
        self.id_of = id_of                                 # symptoms (N, n_symptoms) -> ids (N,)
        rng = np.random.default_rng(10_000) if rng is None else rng
        super().__init__(data.n_symptoms, data.n_classes, 16, IdReferral(16, 8, n_experts, k=k, rng=rng), rng)

    def forward(self, x, train=False, rng=None, noise=None):
        self.block.ids = self.id_of(x)
        return super().forward(x, train=train, rng=rng, noise=noise)


def record_number(x):
    return content_ids(x)


def intake_code(x):
    return ((x[:, :5] > 0).astype(np.int64) << np.arange(5)).sum(axis=1)   # 5 yes/no answers -> 0..31


receptionists = {"hash: record number": HashClinic(record_number),
                 "hash: intake form": HashClinic(intake_code)}
for name, model in receptionists.items():
    train(model, data.train, data.val, seed=0, **TRAIN)
    experts = first_choice(model, data.test.x)
    tables[name] = referral_table(experts, data.test.specialty, 8)
    print(f"{name:<20} accuracy {evaluate(model, data.test)['acc']:.3f}   "
          f"information {information(experts, data.test.specialty):.2f}")

fig = viz.plot_routing_tables({n: tables[n] for n in ("E = 8", "hash: record number", "hash: intake form")},
                              title="Who each specialist sees: learned GP vs two receptionists (%)")
plt.show()

# %% [markdown]
# By record number, every specialist sees a random slice of *every* specialty: the
# information is ~0, each expert must learn all eight rules from an eighth of the data, and
# the clinic does clearly worse than a single generalist. By intake form the referral
# carries a third of the specialty's information, and the clinic climbs back to about a
# generalist's accuracy — with no router to train, nothing to balance, nothing to collapse,
# and a fixed, perfectly predictable referral.
#
# That is the lesson of Hash Layers: a stable random assignment works **as well as the id
# it hashes is informative**. In a language model the id is the word itself, which already
# says a lot about what the FFN must do with it, so hashing words is a strong baseline. Here
# the two steps are visible separately: *consistency* — similar patients to the same
# specialist — lifts the receptionist from far below a generalist up to its level; *choosing
# good clusters*, which needs reading all the symptoms and learning from the diagnoses,
# takes the GP the rest of the way.
#
# ## 4. Not an ensemble of domain models
#
# A common picture of MoE goes: *team 1 trains a medical model on medical data, team 2 a
# legal model on legal data, …, and a "mixture of experts" glues them together*. Let's
# build exactly that clinic — one small generalist per **human-labelled** specialty, each
# trained only on its specialty's patients — and compare. It needs the specialty labels
# at training time, which the MoE never had.
#
# ### Exercise 2 — split the records by specialty
#
# Return a list of $S$ `Split`s; item $s$ holds exactly the patients of specialty $s$
# (`x`, `y` and `specialty` together, in their original order; an empty `Split` if there
# are none).
#
# *Loops (the course's rule):* no Python loop over patients (the tokens here) — the check runs your
# function on two numbers of patients and counts the Python lines it executes, which must not
# grow; a loop over specialties or members is fine.

# %%
def split_by_specialty(split, n_specialties):
    """One minimoe.clinic.data.Split per specialty s = 0 ... n_specialties-1."""
    ### BEGIN SOLUTION
    out = []
    for s in range(n_specialties):                         # a loop over specialties, not patients
        mask = split.specialty == s
        out.append(Split(split.x[mask], split.y[mask], split.specialty[mask]))
    return out
    ### END SOLUTION


# %%
check.split_by_specialty(split_by_specialty)

# %% [markdown]
# Each member is a whole `Generalist` (its own embedding, FFN of width 21, readout): the
# same cost per patient as the GP clinic (lesson 07's matched width). Each trains, for the
# same 10 epochs, on its own ~500 patients — so all eight together cost as much training
# as one generalist on everything. Then a **triage classifier** learns to predict the
# specialty from the symptoms, from the labels, to route new patients.

# %%
by_specialty = check.split_by_specialty_ref(data.train, S)
val_by_specialty = check.split_by_specialty_ref(data.val, S)
members = []
for s in range(S):                                        # one team per specialty, trained apart
    member = Generalist(data.n_symptoms, data.n_classes, d_model=16, d_hidden=21,
                        rng=np.random.default_rng(100 + s))
    train(member, by_specialty[s], val_by_specialty[s], seed=s, **TRAIN)
    members.append(member)

triage = Generalist(data.n_symptoms, S, d_model=8, d_hidden=2, rng=np.random.default_rng(7))   # a small model
train(triage, Split(data.train.x, data.train.specialty, data.train.specialty),
      Split(data.val.x, data.val.specialty, data.val.specialty), seed=0, **dict(TRAIN, epochs=3))
triaged = np.argmax(triage.forward(data.test.x), axis=1)
print(f"members trained on {[len(b) for b in by_specialty]} patients; "
      f"triage accuracy on test patients {np.mean(triaged == data.test.specialty):.3f}")

# %% [markdown]
# ### Exercise 3 — one member per patient
#
# `route[i]` says which member answers patient $i$. Return the logits $(N, C)$, with row $i$
# computed by `members[route[i]]` alone. Ask each member **once**, with all of its
# patients (a loop over members, not patients — lesson 06's dispatch in miniature).
#
# *Loops (the course's rule):* no Python loop over patients (the tokens here) — the check runs your
# function on two numbers of patients and counts the Python lines it executes, which must not
# grow; a loop over specialties or members is fine.

# %%
def referral_predict(members, x, route):
    """Logits (N, C): patient i answered by members[route[i]].forward(...) only.

    Args:
        members: list of models with forward(x) -> logits (n, C).
        x: (N, n_symptoms). route: (N,) int, values in [0, len(members)).
    """
    ### BEGIN SOLUTION
    logits = None
    for s, member in enumerate(members):
        rows = np.flatnonzero(route == s)
        if rows.size == 0:
            continue
        answer = member.forward(x[rows])
        if logits is None:
            logits = np.zeros((x.shape[0], answer.shape[1]))
        logits[rows] = answer
    return logits
    ### END SOLUTION


# %%
check.referral_predict(referral_predict)

# %% [markdown]
# Now the comparison. Besides the perfect-triage (oracle) and learned-triage ensembles, a
# third hospital organises its departments by a label that is easy to write down but is
# not the structure of the problem: the answers to the first three intake questions. And a
# single generalist as the baseline.

# %%
def accuracy(logits, split):
    return float(np.mean(np.argmax(logits, axis=1) == split.y))


generalist = Generalist(data.n_symptoms, data.n_classes, d_model=16, d_hidden=21,
                        rng=np.random.default_rng(1))
train(generalist, data.train, data.val, seed=0, **TRAIN)

def department(x):
    return intake_code(x) % 8                              # the first three yes/no answers: 8 departments


# The same split as before, with the department in the place of the specialty.
dept_train = check.split_by_specialty_ref(Split(data.train.x, data.train.y, department(data.train.x)), S)
dept_val = check.split_by_specialty_ref(Split(data.val.x, data.val.y, department(data.val.x)), S)
dept_members = []
for s in range(S):
    member = Generalist(data.n_symptoms, data.n_classes, d_model=16, d_hidden=21,
                        rng=np.random.default_rng(200 + s))
    train(member, dept_train[s], dept_val[s], seed=s, **TRAIN)
    dept_members.append(member)

test = data.test
results = [
    dict(name="hash: record number", acc=evaluate(receptionists["hash: record number"], test)["acc"],
         info=information(first_choice(receptionists["hash: record number"], test.x), test.specialty)),
    dict(name="hash: intake form", acc=evaluate(receptionists["hash: intake form"], test)["acc"],
         info=information(first_choice(receptionists["hash: intake form"], test.x), test.specialty)),
    dict(name="GP clinic (MoE)", acc=evaluate(gp, test)["acc"],
         info=information(first_choice(gp, test.x), test.specialty)),
    dict(name="departments by intake",
         acc=accuracy(check.referral_predict_ref(dept_members, test.x, department(test.x)), test),
         info=information(department(test.x), test.specialty), labels=True),
    dict(name="domain ensemble, triage",
         acc=accuracy(check.referral_predict_ref(members, test.x, triaged), test),
         info=information(triaged, test.specialty), labels=True),
    dict(name="domain ensemble, oracle",
         acc=accuracy(check.referral_predict_ref(members, test.x, test.specialty), test),
         info=1.0, labels=True),
]
base = evaluate(generalist, test)["acc"]
print(f"{'':<26}{'accuracy':>9}{'information':>13}   one generalist: {base:.3f}")
for r in results:
    print(f"{r['name']:<26}{r['acc']:>9.3f}{r['info']:>13.2f}")
fig = viz.plot_accuracy_vs_information(results, baseline=base)
plt.show()

# %% [markdown]
# The clinics line up on one rising curve: the more a referral knows about the hidden
# specialty, the better it diagnoses. And the domain ensemble with perfect labels is at the
# top. Look at what it was given, though:
#
# | | GP clinic (MoE) | domain ensemble |
# |---|---|---|
# | labels needed to train | none | every patient's specialty |
# | who decides the split | the loss, during training | people, before training |
# | what each doctor sees | its own learned cluster (section 2) | exactly one labelled specialty |
# | what the doctors share | the embedding, the readout, the residual stream | nothing |
# | trained | together with the GP, end to end | apart, then glued with a triage model |
# | a referral is made | per token, in every MoE layer | once per input |
#
# and the costs:

# %%
rows = [("GP clinic (MoE)", gp.n_params, gp.flops_per_token()),
        ("domain ensemble + triage", sum(m.n_params for m in members) + triage.n_params,
         members[0].flops_per_token() + triage.flops_per_token()),
        ("one generalist", generalist.n_params, generalist.flops_per_token())]
for name, params, flops in rows:
    print(f"{name:<26} {params:>6,} parameters   {flops:>5,} FLOPs per patient")

# %% [markdown]
# A little more compute per patient (the triage), nearly 3× the MoE's parameters (eight
# whole networks), and the same training compute as one generalist. The
# ensemble's win is real *in this clinic*, because we built the clinic so that the labels
# are exactly its structure — the answer key was handed to it. Give the hospital labels that
# are merely plausible ("departments by intake") and its advantage shrinks to what those
# labels happen to share with the real structure. A language model has no answer key at
# all: nobody labels each *token* with the specialty that would make it easiest to predict,
# and Mixtral's authors, looking for topic experts after training, found none (Jiang et
# al. 2024, *Mixtral of Experts*, §5: no obvious expert per subject such as biology or
# philosophy; the clearest patterns were syntactic). A sparse MoE is a way to grow
# parameters at fixed compute *without* knowing the split. Whether separately trained
# domain models could be merged into something as good is a different question — and the
# answer, whatever it is, is not the MoE layer.
#
# ## 5. The honest limits of the doctor analogy
#
# * **An expert is not a doctor.** It is one FFN inside one network, sharing the embedding,
#   the readout (and in a transformer, attention and every other layer). Take it out and it
#   diagnoses no one.
# * **The specialties are found, not assigned** — and they are clusters, not classes
#   (section 2). "The cardiology expert" is a label we put on afterwards, when it fits.
# * **Per token, per layer.** In a language model every token of a sentence is referred
#   separately, in every MoE layer, often to different experts. There is no "patient" who
#   sees one specialist for the whole visit.
# * **The GP and the doctors learn together.** The GP sends patients to whoever is slightly
#   better; the patients make that specialist better still (lessons 04–05). A real GP knows
#   the specialties before the specialists are trained.
# * **Quotas.** No real GP is told to send every specialist the same number of patients;
#   balancing losses and capacity (lessons 05–06) do exactly that, for the hardware's sake,
#   and it shapes what the experts learn.
# * **Mixed advice.** With $k = 2$ the layer's answer is a gate-weighted *sum* of two
#   specialists' outputs — not a choice between two opinions.
# * **Referral without reading.** A receptionist with a fixed list (hash routing) runs a
#   reasonable clinic if the intake id is informative. Much of what the analogy credits to
#   the GP's wisdom is consistency.
#
# Keep the analogy for intuition about *cost* (who does the work per patient) and about
# *specialisation* (experts do become different). Drop it when reasoning about *what* an
# expert knows.

# %% [markdown]
# ## Questions to think about
#
# 1. In section 2, why does the specialty purity stay high with 4 experts but the expert
#    purity fall? What would you expect with 8 experts and $k = 1$?
# 2. Hashing by record number did worse than one generalist of the same compute. Why, given
#    that it has 8× the expert parameters?
# 3. The domain ensemble's members never share anything. Name one thing an MoE's experts
#    get from sharing the embedding and readout, and one thing they lose.
# 4. Someone shows you a trained MoE language model in which expert 5 fires on most tokens
#    of legal documents, and claims it is "the legal expert". What two measurements would
#    you make before agreeing?

# %% [markdown]
# ### BEGIN SOLUTION
# **Some answers.**
# 1. With 4 experts each specialty can still go (mostly) to one expert — columns stay
#    concentrated — but every expert must take about two specialties, so its row has two
#    large entries. With $k = 1$ there is no second referral to blur the table, but the
#    grouping is still the GP's own: expect similar merges and splits, and a dead-router
#    risk with the renormalised top-k gate (lesson 03).
# 2. Each specialist sees a random eighth of the patients of *every* specialty, so it must
#    learn all eight rules from an eighth of the data with a width of 8 — a weaker
#    generalist. The two consulted experts are averaged (gates 1/2), which helps a little,
#    like a second opinion, but no patient ever meets a specialist of their specialty.
# 3. Gained: every patient trains the shared embedding and readout, so each expert learns
#    from features shaped by all the data (and a rare cluster is not starved). Lost:
#    independence — the experts cannot be trained by separate teams, and a shared layer can
#    be pulled in conflicting directions by different clusters.
# 4. How much of the expert's traffic is legal text (purity of the expert), and how much of
#    legal text goes to it (purity of the class) — ideally mutual information on held-out
#    data — compared with a baseline such as a frequency-matched set of tokens: it may be
#    firing on a token type (e.g. punctuation or capitalised words) that legal text happens
#    to be rich in.
# ### END SOLUTION

# %%
check.progress()
