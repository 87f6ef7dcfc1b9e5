"""Graders for lesson 08, *What specialists really learn*: how pure the GP's referrals are,
and the "ensemble of domain models" that an MoE is *not* — split by specialty, then
answered by the one member each patient is routed to.

The reference answers live here too (``*_ref``): the lesson's own cells use them after
each exercise, so a learner who is stuck can read on.
"""
from __future__ import annotations

import numpy as np

from ...clinic.data import Split, make_clinic
from ...clinic.models import Generalist
from .compare import expect_array, expect_number
from .grading import Fail, Lesson, call, no_token_loop
from .lesson01 import call_watching

LESSON = Lesson("08", "What specialists really learn")
progress = LESSON.progress


# --------------------------------------------------------------------------- references
def purity_ref(counts):
    """``(expert_purity, specialty_purity)`` of an (E, S) referral table.

    expert purity    = Σ_e max_s counts[e, s] / Σ counts   does each expert serve one specialty?
    specialty purity = Σ_s max_e counts[e, s] / Σ counts   is each specialty served by one expert?

    Both are 1 for a one-to-one referral; an expert that merges two specialties lowers the
    first, a specialty split between two experts lowers the second.
    """
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    return float(counts.max(axis=1).sum() / total), float(counts.max(axis=0).sum() / total)


def split_by_specialty_ref(split, n_specialties):
    """One :class:`~minimoe.clinic.data.Split` per specialty s = 0 … S−1 (empty if it has no patients),
    holding exactly that specialty's patients, in their original order."""
    return [Split(split.x[m], split.y[m], split.specialty[m])
            for m in (split.specialty == s for s in range(n_specialties))]


def referral_predict_ref(members, x, route):
    """Logits (N, C): patient i answered by ``members[route[i]]`` alone (a loop over members)."""
    out = None
    for s, member in enumerate(members):
        rows = np.flatnonzero(route == s)
        if rows.size == 0:
            continue
        logits = member.forward(x[rows])
        if out is None:
            out = np.zeros((x.shape[0], logits.shape[1]), dtype=logits.dtype)
        out[rows] = logits
    return out


# --------------------------------------------------------------------------- exercise 1
def _tables():
    """Referral tables: near one-to-one, merged (E < S, one idle expert), split (E > S), one expert."""
    rng = np.random.default_rng(80)
    one_to_one = rng.integers(0, 6, (4, 4)) + np.diag(rng.integers(40, 90, 4))
    merged = rng.integers(0, 4, (3, 5))
    merged[0, [0, 3]] += [50, 40]
    merged[1, [1, 2, 4]] += [30, 60, 45]
    merged[2] = 0                                              # an expert nobody is sent to
    split = rng.integers(0, 3, (6, 3))
    split[[0, 1, 2, 3, 4, 5], [0, 0, 1, 1, 2, 2]] += [70, 20, 35, 35, 5, 60]
    return [one_to_one, merged, split, np.array([[3, 9, 1]])]


@LESSON.exercise("purity", forbid=[purity_ref])
def purity(fn):
    for counts in _tables():
        got = call(fn, counts, name="purity")
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            raise Fail(f"purity should return two numbers, (expert_purity, specialty_purity), "
                       f"got {type(got).__name__}")
        want = purity_ref(counts)
        c = counts.astype(float)
        rows, cols = c.sum(1), c.sum(0)
        with np.errstate(all="ignore"):
            row_mean = float(np.nanmean(c.max(1) / rows))
            col_mean = float(np.nanmean(c.max(0) / cols))
        shape = f"for an (E, S) = {counts.shape} table"
        expect_number(f"expert_purity {shape}", got[0], want[0], mistakes=[
            (want[1], "You swapped the two: expert purity asks whether each *expert* (row) serves one "
                      "specialty, so take each row's largest count, counts.max(axis=1)."),
            (row_mean, "Weight each expert by how many patients it saw: add up the rows' largest counts "
                       "and divide by the total, rather than averaging the rows' shares."),
            (c.max(1).sum(), "Divide by the total number of referrals, counts.sum(), to get a fraction."),
        ])
        expect_number(f"specialty_purity {shape}", got[1], want[1], mistakes=[
            (want[0], "specialty purity asks the same question the other way round: each specialty's "
                      "(column's) largest count, counts.max(axis=0)."),
            (col_mean, "Weight each specialty by its patients: add up the columns' largest counts and "
                       "divide by the total, rather than averaging the columns' shares."),
            (c.max(0).sum(), "Divide by the total number of referrals, counts.sum(), to get a fraction."),
        ])
    return ("expert and specialty purity are right on 4 tables: one-to-one, experts that merge "
            "specialties (with an idle expert), experts that split them, and a single expert.")


# --------------------------------------------------------------------------- exercise 2
def _splits():
    data = make_clinic(40, 0, 0, n_symptoms=5, n_specialties=4, n_classes=4, seed=8)
    s = data.train
    keep = s.specialty != 2                                     # a specialty with no patients at all
    return [(s, 4), (Split(s.x[keep], s.y[keep], s.specialty[keep]), 4)]


def _as_split(item, i):
    if isinstance(item, Split):
        return item
    if isinstance(item, (tuple, list)) and len(item) == 3:
        raise Fail(f"item {i} of your list is a plain {type(item).__name__} of three arrays. It unpacks like a "
                   f"Split, but the code that trains the members reads member_split.x and .y, which a "
                   f"plain {type(item).__name__} does not have: build Split(x[mask], y[mask], specialty[mask]) "
                   f"(from minimoe.clinic.data import Split).")
    raise Fail(f"item {i} of your list should be a minimoe.clinic.data.Split (x, y, specialty), "
               f"got {type(item).__name__}")


@LESSON.exercise("split_by_specialty", forbid=[split_by_specialty_ref])
def split_by_specialty(fn):
    for split, S in _splits():
        given = Split(split.x.copy(), split.y.copy(), split.specialty.copy())
        try:
            got = call(fn, given, S, name="split_by_specialty")
        except Fail as err:
            # Split refuses arrays of different lengths (minimoe.clinic.data.Split): that is the
            # typical mistake of filtering x and specialty but not y (or the other way round).
            if "raised ValueError: Split: x has" in str(err):
                raise Fail(f"{err}. Filter x, y and specialty with the same mask, split.specialty == s, "
                           f"so each Split holds one entry per patient in all three.") from None
            raise
        if any(not np.array_equal(a, b) for a, b in zip(given, split)):
            raise Fail("split_by_specialty changed the split it was given; select with a mask "
                       "(split.x[mask]) instead of modifying arrays in place.")
        want = split_by_specialty_ref(split, S)
        if got is None:
            raise Fail("split_by_specialty returned None — did you forget a `return`?")
        if not isinstance(got, (list, tuple)):
            raise Fail(f"split_by_specialty should return a list of S = {S} Splits, got {type(got).__name__}")
        missing = [s for s in range(S) if not np.any(split.specialty == s)]
        if len(got) != S:
            extra = (f" Specialty {missing[0]} has no patients here: it still gets its (empty) Split, "
                     f"so that item s always belongs to specialty s." if missing else "")
            raise Fail(f"split_by_specialty returned {len(got)} items; expected one per specialty, "
                       f"S = {S}.{extra}")
        by_diagnosis = [Split(split.x[split.y == s], split.y[split.y == s], split.specialty[split.y == s])
                        for s in range(S)]
        for s, (item, ref, wrong) in enumerate(zip(got, want, by_diagnosis)):
            item = _as_split(item, s)
            for name, a, b in zip(("x", "y", "specialty"), item, ref):
                if np.shape(a) == np.shape(b) and np.array_equal(a, b):
                    continue
                if all(np.shape(p) == np.shape(q) and np.array_equal(p, q) for p, q in zip(item, wrong)):
                    raise Fail("You split the patients by their diagnosis y. The members are trained one "
                               "per *specialty*: select with split.specialty == s.")
                other = [o for o, r in enumerate(want) if o != s and len(r) and
                         np.shape(item.x) == np.shape(r.x) and np.array_equal(item.x, r.x)]
                if other:
                    raise Fail(f"item {s} holds the patients of specialty {other[0]}. Keep the order "
                               f"s = 0, 1, …, S−1, so that item s is specialty s's Split.")
                if np.shape(a)[:1] != np.shape(b)[:1]:
                    raise Fail(f"Split {s}: {name} has {np.shape(a)[0] if np.ndim(a) else 0} patients, "
                               f"expected {np.shape(b)[0]} (those of specialty {s}). Filter x, y and "
                               f"specialty with the same mask, split.specialty == {s}.")
                raise Fail(f"Split {s}: {name} holds the wrong patients. Keep exactly the patients of "
                           f"specialty {s}, in their original order (boolean-mask indexing does both).")
    def make(n):
        return make_clinic(n, 0, 0, n_symptoms=5, n_specialties=4, n_classes=4, seed=9).train, 4

    def check(out, split, S):
        want = split_by_specialty_ref(split, S)
        if not isinstance(out, (list, tuple)) or len(out) != S:
            raise Fail(f"split_by_specialty should return a list of S = {S} Splits")
        for s, (item, ref) in enumerate(zip(out, want)):
            for name, a, b in zip(("x", "y", "specialty"), _as_split(item, s), ref):
                expect_array(f"Split {s}'s {name}", a, b)
    no_token_loop(fn, "split_by_specialty", make, check, loops="a loop over patients",
                  hint="One boolean mask per specialty, split.specialty == s, selects all its patients at once.")
    return ("one Split per specialty, each with exactly its own patients (x, y and specialty "
            "together), including a specialty with no patients; no loop over patients.")


# --------------------------------------------------------------------------- exercise 3
class _Counted:
    """A member that counts how often it is asked (to catch a loop over patients)."""

    def __init__(self, model):
        self._model, self.calls, self.rows = model, 0, 0

    def forward(self, x, *args, **kwargs):
        self.calls += 1
        self.rows += int(np.shape(x)[0]) if np.ndim(x) else 0
        return self._model.forward(x, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._model, name)


@LESSON.exercise("referral_predict", forbid=[referral_predict_ref])
def referral_predict(fn):
    for seed, (N, M) in enumerate([(30, 4), (1, 3), (25, 5)]):
        rng = np.random.default_rng(90 + seed)
        members = [Generalist(6, 3, d_model=5, d_hidden=4, rng=np.random.default_rng(200 + 10 * seed + m))
                   for m in range(M)]
        x = rng.standard_normal((N, 6))
        route = rng.integers(0, M - 1, N)                      # the last member gets no patient
        counted = [_Counted(m) for m in members]
        got = call_watching(fn, counted, x, route, name="referral_predict", labels=("members",))
        calls = sum(c.calls for c in counted)
        rows = sum(c.rows for c in counted)
        if calls > M:
            raise Fail(f"your members were asked {calls} times for {N} patients. Ask each member once, "
                       f"with all of its patients at once (x[route == s]): a loop over members, never "
                       f"over patients.")
        want = referral_predict_ref(members, x, route)
        each = np.stack([m.forward(x) for m in members])      # (M, N, C) every member's answer
        order = np.argsort(route, kind="stable")
        expect_array("logits", got, want, shape_desc="(N, C)", mistakes=[
            (each.mean(axis=0), "You averaged every member's answer: that is a second opinion "
                                "(lesson 00), not a referral. Each patient sees only members[route[i]]."),
            (np.log(np.mean([np.exp(z - z.max(1, keepdims=True)) / np.exp(z - z.max(1, keepdims=True)).sum(
                1, keepdims=True) for z in each], axis=0)),
             "You averaged every member's probabilities: that is a second opinion (lesson 00), not a "
             "referral. Each patient sees only members[route[i]]."),
            (each[0], "Every patient went to members[0]; patient i should see members[route[i]]."),
            (want[order], "The answers are in member order. Put each member's answers back in its "
                          "patients' rows: logits[route == s] = members[s].forward(x[route == s])."),
        ])
        if rows > N:
            raise Fail(f"your members examined {rows} patients in all, for {N} patients: you ran every member "
                       f"on every patient and kept one answer each. That is the opposite of a sparse MoE "
                       f"(asking every specialist, then discarding), costing {M}× the compute of a "
                       f"referral. Give each member only its own patients: members[s].forward(x[route == s]).")
    members = [Generalist(6, 3, d_model=5, d_hidden=4, rng=np.random.default_rng(300 + m)) for m in range(4)]

    def make(n):
        rng = np.random.default_rng(n)
        return members, rng.standard_normal((n, 6)), rng.integers(0, 4, n)
    no_token_loop(fn, "referral_predict", make,
                  lambda out, ms, x, route: expect_array("logits", out, referral_predict_ref(ms, x, route)),
                  loops="a loop over patients",
                  hint="Loop over the members; route == s selects all of member s's patients at once.")
    return ("each patient is answered by its own member only, one forward call per member, "
            "answers back in the patients' rows (3 cases, one member left idle).")
