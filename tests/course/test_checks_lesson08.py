"""Lesson 08's graders: a blank exercise fails clearly, an independently written right answer
passes, each typical mistake gets its targeted hint, a crash is a verdict — and the graders'
references agree with brute force and with minimoe (purity against a per-patient count,
the domain ensemble's prediction against one member at a time)."""
import numpy as np
import pytest

from grader_cases import GraderContract, assert_fail
from minimoe.course.checks import lesson08
from minimoe.lm.corpus import mutual_information
from minimoe.clinic.data import Split, make_clinic
from minimoe.clinic.models import Generalist


# ----------------------------------------------------------------------------- independent answers
def purity(t, swap=False, unweighted=False, normalise=True):
    t = np.asarray(t, dtype=float)
    n = t.sum() if normalise else 1.0
    if unweighted:
        e = np.mean([r.max() / r.sum() for r in t if r.sum() > 0])
    else:
        e = sum(max(r) for r in t) / n
    s = sum(max(c) for c in t.T) / n
    return (s, e) if swap else (e, s)


def split(sp, S, by="specialty", skip_empty=False, filter_y=True):
    labels = sp.specialty if by == "specialty" else sp.y
    out = []
    for s in range(S):
        m = labels == s
        if skip_empty and not m.any():
            continue
        out.append(Split(sp.x[m], sp.y[m] if filter_y else sp.y, sp.specialty[m]))
    return out


def predict(members, x, route, mode="route"):
    if mode == "average":
        return np.mean([m.forward(x) for m in members], axis=0)
    if mode == "first":
        return members[0].forward(x)
    if mode == "per_patient":
        return np.concatenate([members[r].forward(x[i:i + 1]) for i, r in enumerate(route)])
    parts = [(np.flatnonzero(route == s), m.forward(x[route == s])) for s, m in enumerate(members)]
    if mode == "member_order":
        return np.concatenate([p for _, p in parts])
    out = np.zeros((len(x), parts[0][1].shape[1]))
    for rows, p in parts:
        out[rows] = p
    return out


CASES = [
    (lesson08.purity, purity, [
        (lambda t: purity(t, swap=True), "You swapped the two"),
        (lambda t: purity(t, unweighted=True), "Weight each expert"),
        (lambda t: purity(t, normalise=False), "Divide by the total"),
        (lambda t: (purity(t)[0], purity(t)[0]), "the other way round"),
    ]),
    (lesson08.split_by_specialty, split, [
        (lambda sp, S: split(sp, S, by="diagnosis"), "by their diagnosis y"),
        (lambda sp, S: split(sp, S, skip_empty=True), "still gets its (empty) Split"),
        (lambda sp, S: split(sp, S, filter_y=False), "with the same mask"),
        (lambda sp, S: split(sp, S)[::-1], "holds the patients of specialty"),
        (lambda sp, S: [tuple(s) for s in split(sp, S)], "plain tuple"),
        (lambda sp, S: [list(s) for s in split(sp, S)], "plain list"),
        (lambda sp, S: [Split(p.x[::-1], p.y[::-1], p.specialty) for p in split(sp, S)],
         "holds the wrong patients"),
    ]),
    (lesson08.referral_predict, predict, [
        (lambda m, x, r: predict(m, x, r, "average"), "second opinion"),
        (lambda m, x, r: predict(m, x, r, "first"), "members[0]"),
        (lambda m, x, r: predict(m, x, r, "member_order"), "member order"),
        (lambda m, x, r: predict(m, x, r, "per_patient"), "never over patients"),
    ]),
]


def predict_everyone_everywhere(members, x, route):
    """Right logits, but every member examines every patient (one call each) and one answer is
    kept: the dense MoE's cost dressed as a referral."""
    every = np.stack([m.forward(x) for m in members])          # (M, N, C)
    return every[route, np.arange(len(route))]


def split_patient_loop(sp, S):
    """Right Splits, built one patient at a time."""
    rows = [[] for _ in range(S)]
    for i, s in enumerate(sp.specialty):
        rows[s].append(i)
    return [Split(sp.x[np.array(r, dtype=int)], sp.y[np.array(r, dtype=int)], sp.specialty[np.array(r, dtype=int)])
            for r in rows]


def predict_patient_bookkeeping(members, x, route):
    """One call per member, but each member's patients gathered one patient at a time."""
    groups = [[] for _ in members]
    for i, r in enumerate(route):
        groups[r].append(i)
    out = None
    for m, rows in zip(members, groups):
        if rows:
            z = m.forward(x[np.array(rows)])
            out = np.zeros((len(route), z.shape[1])) if out is None else out
            out[np.array(rows)] = z
    return out


class TestGraders(GraderContract):
    LESSONS = (lesson08.LESSON,)
    CASES = CASES
    NO_GENERIC_NEAR_MISS = ("split_by_specialty",)    # it selects patients: nudging x would be a different mistake
    NEAR_MISSES = {
        "split_by_specialty": [(lambda sp, S: [Split(p.x * (1 + 1e-6), p.y, p.specialty) for p in split(sp, S)],
                                "holds the wrong patients")],
    }
    RULE_BREAKING = {
        "referral_predict": [(predict_everyone_everywhere, "opposite of a sparse MoE"),
                             (predict_patient_bookkeeping, "grows with the number of")],
        "split_by_specialty": [(split_patient_loop, "grows with the number of")],
    }


def test_split_that_modifies_its_input_is_caught():
    def sorts_in_place(sp, S):
        sp.x[:] = sp.x[np.argsort(sp.specialty, kind="stable")]
        return split(sp, S)
    assert_fail(lesson08.split_by_specialty(sorts_in_place), "changed the split it was given")


# ----------------------------------------------------------------------------- references
def test_purity_ref_against_a_count_per_patient():
    rng = np.random.default_rng(0)
    expert, specialty = rng.integers(0, 5, 300), rng.integers(0, 3, 300)
    table = np.zeros((5, 3), dtype=int)
    np.add.at(table, (expert, specialty), 1)
    # expert purity: the fraction of patients who share their expert's most common specialty
    major = {e: np.bincount(specialty[expert == e], minlength=3).argmax() for e in range(5)}
    share = np.mean([specialty[i] == major[expert[i]] for i in range(300)])
    e, s = lesson08.purity_ref(table)
    assert e == pytest.approx(share)
    assert lesson08.purity_ref(table.T) == pytest.approx((s, e))
    assert lesson08.purity_ref(np.eye(4) * 7) == (1.0, 1.0)


def test_purity_and_information_agree_at_the_extremes():
    spec = np.repeat(np.arange(4), 25)
    assert mutual_information(spec, spec) == pytest.approx(np.log(4))          # one-to-one: I = H(S)
    assert mutual_information(np.zeros(100, int), spec) == pytest.approx(0.0)  # one expert: I = 0
    assert lesson08.purity_ref(np.ones((1, 4)) * 25) == (0.25, 1.0)


def test_referral_predict_ref_is_one_member_per_patient():
    rng = np.random.default_rng(1)
    members = [Generalist(4, 3, d_model=5, d_hidden=3, rng=np.random.default_rng(s)) for s in range(3)]
    x, route = rng.standard_normal((12, 4)), rng.integers(0, 3, 12)
    got = lesson08.referral_predict_ref(members, x, route)
    for i in range(12):                                                       # patient by patient
        np.testing.assert_allclose(got[i], members[route[i]].forward(x[i:i + 1])[0], rtol=1e-12)


def test_split_by_specialty_ref_partitions_the_patients():
    data = make_clinic(60, 0, 0, n_specialties=3, seed=2)
    parts = lesson08.split_by_specialty_ref(data.train, 4)                   # specialty 3 is empty
    assert [len(p) for p in parts][3] == 0
    assert sum(len(p) for p in parts) == 60
    for s, p in enumerate(parts):
        assert np.all(p.specialty == s)
