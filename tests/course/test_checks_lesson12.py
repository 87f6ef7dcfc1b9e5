"""Lesson 12's graders: a blank fails clearly, an independently written right answer passes,
each typical mistake gets its hint, near misses and calls to minimoe's own answer fail — and
the graders' references agree with minimoe (experiments, routing, upcycle)."""
import math

import numpy as np
import pytest

from grader_cases import GraderContract, assert_fail
from minimoe.course.checks import lesson09, lesson12
from minimoe.core.experts import Expert
from minimoe.lm import experiments, routing, upcycle


# ----------------------------------------------------------------------------- independent answers
def bpc(losses, counts, *, weighted=True, unit=math.log(2), invert=False):
    losses, counts = np.asarray(losses, float), np.asarray(counts, float)
    nats = np.dot(losses, counts) / counts.sum() if weighted else losses.mean()
    return nats * unit if invert else nats / unit


def _entropy(*columns):
    """Plug-in joint entropy (nats) of one or more label columns, through np.unique."""
    _, counts = np.unique(np.stack(columns, axis=1), axis=0, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def info(experts, labels, *, first_only=False, keep_dropped=False, base=math.e, normalise=False,
         conditional=False):
    experts, labels = np.asarray(experts), np.asarray(labels)
    if first_only:
        experts = experts[:, :1]
    lab = np.repeat(labels, experts.shape[1])
    e = experts.ravel()
    if not keep_dropped:
        lab, e = lab[e >= 0], e[e >= 0]
    h_l, h_e, h_el = _entropy(lab), _entropy(e), _entropy(e, lab)
    mi = max(h_l + h_e - h_el, 0.0)
    mi = 0.0 if mi < 1e-13 else mi
    if conditional:
        return (h_el - h_e) / math.log(base)
    return mi / h_l if normalise else mi / math.log(base)


def same_next(first, domain, *, across=False, count_dropped=False, by_s=False, per_window=False):
    first, domain = np.asarray(first), np.asarray(domain)
    onehot = np.eye(2)[domain]                                      # (W, 2)
    if across:
        f = first.ravel()
        valid = (f[:-1] >= 0) & (f[1:] >= 0)
        same = (np.diff(f) == 0) & valid
        d = np.repeat(domain, first.shape[1])[:-1]
        return np.eye(2)[d].T @ same / (np.eye(2)[d].T @ valid)
    valid = (first[:, :-1] >= 0) & (first[:, 1:] >= 0)
    same = np.diff(first, axis=1) == 0
    if not count_dropped:
        same = same & valid
    else:
        valid = np.ones_like(valid)
    if per_window:
        with np.errstate(all="ignore"):
            share = same.sum(1) / valid.sum(1)
        return np.array([np.nanmean(share[domain == k]) for k in range(2)])
    pairs = np.full(len(first), first.shape[1]) if by_s else valid.sum(1)
    return onehot.T @ same.sum(1) / (onehot.T @ pairs)


def copies(params, E, *, view=False, scale=1.0, axis=0, gate=None, noise=True):
    d = params["W1"].shape[0]
    out = {"W_gate": np.zeros((d, E)) if gate is None else gate(d, E)}
    if noise:
        out["W_noise"] = np.zeros((d, E))
    for k in ("W1", "b1", "W2", "b2"):
        p = np.asarray(params[k])
        if view:
            out[k] = np.broadcast_to(p, (E,) + p.shape)
        elif axis == 1 and p.ndim == 2:
            out[k] = np.stack([p] * E, axis=1) * scale
        else:
            out[k] = np.stack([p.copy() for _ in range(E)]) * scale
    return out


CASES = [
    (lesson12.bits_per_char, bpc, [
        (lambda l, n: bpc(l, n, weighted=False), "Weight each batch"),
        (lambda l, n: bpc(l, n, unit=1.0), "still in nats"),
        (lambda l, n: bpc(l, n, invert=True), "Upside down"),
        (lambda l, n: bpc(l, n, unit=math.log(10)), "not ln 10"),
        (lambda l, n: float(np.log2(bpc(l, n, unit=1.0))), "already a logarithm"),
        (lambda l, n: float(np.dot(l, n)) / math.log(2), "*per* character"),
    ]),
    (lesson12.expert_label_information, info, [
        (lambda e, l: info(e, l, first_only=True), "all k of them"),
        (lambda e, l: info(e, l, keep_dropped=True), "A dropped assignment (-1) is not an expert"),
        (lambda e, l: info(e, l, base=2), "bits"),
        (lambda e, l: info(e, l, normalise=True), "not I / H(label)"),
        (lambda e, l: info(e, l, conditional=True), "H(label | expert)"),
    ]),
    (lesson12.same_expert_fraction, same_next, [
        (lambda f, d: same_next(f, d, across=True), "inside a window"),
        (lambda f, d: same_next(f, d, count_dropped=True), "dropped (-1)"),
        (lambda f, d: same_next(f, d, by_s=True), "S − 1 pairs"),
        (lambda f, d: same_next(f, d, per_window=True), "Pool the pairs"),
        (lambda f, d: float(same_next(f, d).mean()), "two, one per domain"),
    ]),
    (lesson12.upcycle_ffn, copies, [
        (lambda p, E: copies(p, E, view=True), "broadcast view"),
        (lambda p, E: copies(p, E, scale=1.0 / E), "Don't divide the copies by E"),
        (lambda p, E: copies(p, E, axis=1), "stacked along the first axis"),
        (lambda p, E: copies(p, E, gate=lambda d, E: np.full((d, E), 0.01)), "zero router"),
        (lambda p, E: copies(p, E, noise=False), "lacks ['W_noise']"),
    ]),
]


def info_token_loop(experts, labels):
    """Right, but counting the (expert, label) pairs one token at a time."""
    counts = {}
    for t in range(len(labels)):
        for e in experts[t]:
            if e >= 0:
                counts[(int(e), int(labels[t]))] = counts.get((int(e), int(labels[t])), 0) + 1
    table = np.zeros((max(e for e, _ in counts) + 1, max(lab for _, lab in counts) + 1))
    for (e, lab), n in counts.items():
        table[e, lab] = n
    return info(experts, labels)


def same_next_char_loop(first, domain):
    same, pairs = np.zeros(2), np.zeros(2)
    for w in range(first.shape[0]):
        for s in range(first.shape[1] - 1):
            a, b = first[w, s], first[w, s + 1]
            if a >= 0 and b >= 0:
                pairs[domain[w]] += 1
                same[domain[w]] += a == b
    return same / pairs


def info_with_lesson09(experts, labels):
    """Right, through lesson 09's reference on a count table: minimoe's answer, so forbidden."""
    kept = experts >= 0
    e, lab = experts[kept], np.broadcast_to(labels[:, None], experts.shape)[kept]
    table = np.zeros((e.max() + 1, lab.max() + 1))
    np.add.at(table, (e, lab), 1)
    return lesson09.mutual_information_ref(table)


def upcycle_in_place(params, E):
    """Right values, but it turns the learner's own params into the copies (changes the input)."""
    out = copies(params, E)
    params["W1"] *= 1.0 + 0 * params["W1"]
    params["b1"] += 1.0
    return out


class TestGraders(GraderContract):
    LESSONS = (lesson12.LESSON,)
    CASES = CASES
    NEAR_MISSES = {
        "upcycle_ffn": [(lambda p, E: copies(p, E, gate=lambda d, E: np.full((d, E), 1e-9)), "zero router")],
    }
    RULE_BREAKING = {
        "expert_label_information": [(info_token_loop, "grows with the number of tokens"),
                                     (info_with_lesson09, "you called `minimoe.course.checks.lesson09."
                                                          "mutual_information_ref`")],
        "same_expert_fraction": [(same_next_char_loop, "loop over windows or characters")],
        "upcycle_ffn": [(upcycle_in_place, "changed its input")],
    }


# ----------------------------------------------------------------------------- references vs minimoe
def test_bits_per_char_ref_is_experiments_bits_per_char_of_the_pooled_loss():
    losses, counts = np.array([2.0, 1.0]), np.array([3, 1])
    assert lesson12.bits_per_char_ref(losses, counts) == pytest.approx(experiments.bits_per_char(1.75))
    assert lesson12.bits_per_char_ref([math.log(97)], [5]) == pytest.approx(math.log2(97))


def test_information_ref_matches_routing_expert_information():
    rng = np.random.default_rng(0)
    experts = rng.integers(0, 4, (2, 3, 5, 2))
    experts[rng.random(experts.shape) < 0.1] = -1
    types = rng.integers(0, 12, (3, 5))
    dom = np.array([0, 1, 1])
    r = routing.RoutedText(np.zeros((3, 5), dtype=np.int64), types, dom, experts, (4, 4))
    for layer in range(2):
        got = routing.expert_information(r, layer)
        flat = experts[layer].reshape(-1, 2)
        assert lesson12.expert_label_information_ref(flat, types.ravel()) == pytest.approx(got["mi_type"])
        assert lesson12.expert_label_information_ref(flat, np.repeat(dom, 5)) == pytest.approx(got["mi_domain"])


def test_same_expert_ref_matches_routing():
    rng = np.random.default_rng(1)
    first = rng.integers(-1, 3, (7, 6))
    dom = rng.integers(0, 2, 7)
    np.testing.assert_allclose(lesson12.same_expert_fraction_ref(first, dom),
                               routing.same_expert_fraction(first, dom))


def test_upcycle_ref_matches_upcycle_ffn():
    p = Expert(4, 5, rng=np.random.default_rng(2)).params
    want = upcycle.upcycle_ffn(p, 3)
    got = lesson12.upcycle_ffn_ref(p, 3)
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])


def test_a_random_router_is_named():
    res = lesson12.upcycle_ffn(lambda p, E: copies(p, E, gate=lambda d, E: np.random.default_rng(0).standard_normal((d, E))))
    assert_fail(res, "is not zero")
