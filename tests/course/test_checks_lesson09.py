"""Lesson 09's graders: a blank exercise fails clearly, an independently written right answer
passes, each typical mistake gets its targeted hint, a crash is a verdict — and the graders'
references agree with minimoe (expert_choice.py, lossfree.py, moe.py, corpus.py)."""
import numpy as np
import pytest

from grader_cases import GraderContract, assert_fail
from minimoe.lm import corpus
from minimoe.course.checks import lesson09
from minimoe.beyond.expert_choice import (ExpertChoiceMoELayer, expert_choice_backward, expert_choice_capacity,
                                   expert_choice_forward)
from minimoe.core.experts import init_expert_params
from minimoe.core.layers import SoftmaxCache, softmax_backward
from minimoe.core.moe import MoELayer


# ----------------------------------------------------------------------------- independent answers
def select(S, C, *, order=1, rows=False, renorm=False, first=False, whole_rows=False, best_first=True):
    """Expert choice written with a loop over experts and argpartition, then sorted best first
    (``best_first=False``: argpartition's unordered picks, a near miss of the docstring's order)."""
    T, E = S.shape
    if rows:                                            # the mistake: token choice
        idx = np.argsort(-S, axis=1)[:, :C]
        return idx, np.take_along_axis(S, idx, axis=1)
    idx = np.zeros((E, C), dtype=np.int64)
    for e in range(E):
        idx[e] = np.argpartition(-order * S[:, e], C - 1)[:C] if C < T else np.arange(T)
        if best_first:
            idx[e] = idx[e][np.argsort(-order * S[idx[e], e], kind="stable")]
    if whole_rows:
        return idx, S[idx]
    gates = S.T[:, :C] if first else np.array([S[idx[e], e] for e in range(E)])
    return idx, gates / gates.sum(axis=1, keepdims=True) if renorm else gates


def combine_backward(dy, yg, gates, idx, *, gate_on_dyg=True, gate_on_dS=False, transpose=False,
                     compact=False, sign=1.0):
    E, C, d = yg.shape
    dyg = np.zeros_like(yg)
    dS = np.zeros((dy.shape[0], E))
    for e in range(E):                                  # a loop over experts
        rows = dy[idx[e]]                               # (C, d)
        dyg[e] = rows * (gates[e][:, None] if gate_on_dyg else 1.0)
        g = np.einsum("cd,cd->c", rows, yg[e])
        np.add.at(dS[:, e], idx[e], sign * g * (gates[e] if gate_on_dS else 1.0))
    if compact:
        dS = np.take_along_axis(dS.T, idx, axis=1)
    return dyg, dS.T if transpose else dS


def nudge(bias, load, rate, *, flip=False, proportional=False, strict=False, delta=False):
    load = np.asarray(load, float)
    err = load.mean() - load
    if proportional:
        step = rate * err
    elif strict:
        step = np.where(err < 0, -rate, rate)
    else:
        step = rate * np.sign(err)
    step = -step if flip else step
    return step if delta else bias + step


def report(idx, kept, E, *, requested=False, squared=False, ddof=0, unserved="none"):
    load = np.zeros(E, dtype=np.int64)
    for e in range(E):
        load[e] = np.sum((idx == e) & (True if requested else kept))
    cv = np.std(load, ddof=ddof) / np.mean(load)
    n = {"none": np.sum(kept.sum(axis=1) == 0), "refs": np.sum(~kept),
         "any": np.sum(kept.sum(axis=1) < kept.shape[1])}[unserved]
    return load, cv**2 if squared else cv, int(n)


def mi(counts, *, log=np.log, conditional=False, normalise=True, mask=True):
    n = np.asarray(counts, float)
    p = n / n.sum() if normalise else n
    pe, pk = p.sum(1, keepdims=True), p.sum(0, keepdims=True)
    with np.errstate(all="ignore"):
        terms = p * log(p / pe) if conditional else p * log(p / (pe * pk))
    if mask:
        terms = np.where(p > 0, terms, 0.0)
    value = -float(np.sum(terms)) if conditional else float(np.sum(terms))
    return 0.0 if abs(value) < 1e-14 else value         # an independent table: I = 0, not rounding noise


CASES = [
    (lesson09.expert_choice_select, select, [
        (lambda S, C: select(S, C, rows=True), "that is token choice"),
        (lambda S, C: select(S, C, order=-1), "likes *least*"),
        (lambda S, C: select(S, C, renorm=True), "don't renormalise"),
        (lambda S, C: select(S, C, first=True), "first C tokens"),
        (lambda S, C: select(S, C, whole_rows=True), "picks whole rows"),
    ]),
    (lesson09.expert_choice_combine_backward, combine_backward, [
        (lambda *a: combine_backward(*a, gate_on_dyg=False), "scaled by its gate"),
        (lambda *a: combine_backward(*a, gate_on_dS=True), "Don't multiply it by the gate"),
        (lambda *a: combine_backward(*a, transpose=True), "(E, T)"),
        (lambda *a: combine_backward(*a, compact=True), "scatter it"),
        (lambda *a: combine_backward(*a, sign=-1.0), "Wrong sign"),
    ]),
    (lesson09.bias_update, nudge, [
        (lambda b, l, r: nudge(b, l, r, flip=True), "Upside down"),
        (lambda b, l, r: nudge(b, l, r, proportional=True), "sign of the error"),
        (lambda b, l, r: nudge(b, l, r, strict=True), "exactly at the mean"),
        (lambda b, l, r: nudge(b, l, r, delta=True), "not the nudge"),
    ]),
    (lesson09.routing_report, report, [
        (lambda i, k, E: report(i, k, E, requested=True), "Count only the kept"),
        (lambda i, k, E: report(i, k, E, squared=True), "CV²"),
        (lambda i, k, E: report(i, k, E, ddof=1), "population std"),
        (lambda i, k, E: report(i, k, E, unserved="refs"), "counts referrals turned away"),
        (lambda i, k, E: report(i, k, E, unserved="any"), "*at least one*"),
    ]),
    (lesson09.mutual_information, mi, [
        (lambda c: mi(c, log=np.log2), "bits"),
        (lambda c: mi(c, conditional=True), "H(label | expert)"),
        (lambda c: mi(c, normalise=False), "probabilities first"),
        (lambda c: mi(c, mask=False), "0 · log 0"),
    ]),
]


def select_token_loop(S, C):
    """Right, best first, but with a Python loop over the tokens (an insertion into each list)."""
    T, E = S.shape
    lists = [[] for _ in range(E)]
    for t in range(T):
        for e in range(E):
            lists[e].append((S[t, e], t))
    idx = np.array([[t for _, t in sorted(lst, key=lambda p: -p[0])[:C]] for lst in lists], dtype=np.int64)
    return idx, np.take_along_axis(S.T, idx, axis=1)


def combine_backward_token_loop(dy, yg, gates, idx):
    E, C, d = yg.shape
    dyg, dS = np.zeros_like(yg), np.zeros((dy.shape[0], E))
    for e in range(E):
        for c in range(C):                              # one pick at a time: a loop over tokens
            t = idx[e, c]
            dyg[e, c] = gates[e, c] * dy[t]
            dS[t, e] = dy[t] @ yg[e, c]
    return dyg, dS


def select_for_one_shape(S, C):
    """Right when C < T; when an expert takes every token (C = T) it forgets to sort."""
    T, E = S.shape
    return select(S, C, best_first=C < T)


def report_without_minlength(idx, kept, E):
    load, cv, n = report(idx, kept, E)
    load = np.bincount(idx[kept])
    return load, load.std() / load.mean(), n


def calling(f, right):
    def cheat(*a):
        try:
            f(*a)
        except Exception:
            pass
        return right(*a)
    return cheat


class TestGraders(GraderContract):
    LESSONS = (lesson09.LESSON,)
    CASES = CASES
    NEAR_MISSES = {
        "expert_choice_select": [(lambda S, C: select(S, C, best_first=False), "best first"),
                                 (select_for_one_shape, "best first")],
        "routing_report": [(report_without_minlength, "minlength=n_experts")],
    }
    RULE_BREAKING = {
        "expert_choice_select": [(select_token_loop, "grows with the number of tokens")],
        "expert_choice_combine_backward": [(combine_backward_token_loop, "grows with the number of tokens")],
    }


def test_calling_minimoe_for_the_bias_update_fails():
    from minimoe.beyond import lossfree
    for f in (lossfree.bias_update, lesson09.bias_update_ref):
        res = lesson09.bias_update(calling(f, nudge))
        assert not res.passed and f"you called `{f.__module__}.{f.__qualname__}`" in res.message
    assert lesson09.bias_update(nudge).passed


def test_in_place_changes_are_caught():
    def in_place(bias, load, rate):
        bias += rate * np.sign(np.mean(load) - load)
        return bias
    assert_fail(lesson09.bias_update(in_place), "changed its input")


def test_selection_with_the_wrong_experts_names_the_expert():
    def off_by_one(S, C):
        idx, _ = select(S, C)                             # the learner's own (calling the reference is forbidden)
        idx = idx.copy()
        idx[-1] = np.argsort(-S[:, -1])[1:C + 1]          # the last expert skips its best token
        return idx, np.take_along_axis(S.T, idx, axis=1)
    assert_fail(lesson09.expert_choice_select(off_by_one), "expert 3 picked tokens", "C largest affinities")


# ----------------------------------------------------------------------------- references vs minimoe
@pytest.mark.parametrize("T,E,k,cf", [(12, 4, 2, 1.0), (7, 3, 1, 2.0), (5, 5, 2, 1.0)])
def test_references_match_expert_choice_forward_and_backward(T, E, k, cf):
    rng = np.random.default_rng(T)
    d, h = 3, 4
    x = rng.standard_normal((T, d))
    W_gate = rng.standard_normal((d, E))
    p = init_expert_params(E, d, h, rng)
    C = expert_choice_capacity(T, E, k, cf)
    y, cache = expert_choice_forward(x, W_gate, **p, capacity=C)
    idx, gates = lesson09.expert_choice_select_ref(cache.probs, C)
    np.testing.assert_array_equal(idx, cache.idx)
    np.testing.assert_allclose(gates, cache.gates, rtol=1e-14)
    yg = cache.yg.reshape(E, C, d)
    np.testing.assert_allclose(lesson09.expert_choice_combine_ref(yg, gates, idx, T), y, rtol=1e-12, atol=1e-14)
    # The router gradient minimoe computes equals x^T softmax_backward(dS) with the reference's dS.
    dy = rng.standard_normal((T, d))
    _, grads = expert_choice_backward(dy, cache)
    _, dS = lesson09.expert_choice_combine_backward_ref(dy, yg, gates, idx)
    dL, _ = softmax_backward(dS, SoftmaxCache(cache.probs, -1))
    np.testing.assert_allclose(x.T @ dL, grads["W_gate"], rtol=1e-10, atol=1e-13)


def test_routing_report_agrees_with_the_layers_stats():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((40, 6)) + 2.0                      # a shared offset: an unbalanced router
    tc = MoELayer(6, 4, 4, k=2, noisy=False, capacity_factor=0.75, rng=rng)
    tc.params["W_gate"][:, 0] += 0.5
    tc.forward(x, train=False)
    load, cv, unserved = lesson09.routing_report_ref(tc.stats["topk_idx"], tc.stats["kept"], 4)
    np.testing.assert_array_equal(load, tc.stats["load"])
    assert tc.stats["dropped"] == int(np.sum(~tc.stats["kept"])) > 0   # MoELayer counts referrals...
    assert 0 <= unserved <= tc.stats["dropped"]                          # ...the report counts patients
    ec = ExpertChoiceMoELayer(6, 4, 4, k=1, rng=rng)
    ec.forward(x)
    load, cv, unserved = lesson09.routing_report_ref(ec.stats["topk_idx"], ec.stats["kept"], 4)
    np.testing.assert_array_equal(load, ec.stats["load"])
    assert cv == 0.0 and unserved == ec.stats["dropped"]


def test_bias_update_ref_by_hand():
    new = lesson09.bias_update_ref(np.zeros(4), np.array([10, 2, 4, 0]), 0.01)
    np.testing.assert_allclose(new, [-0.01, 0.01, 0.0, 0.01])        # mean 4: busy down, idle up, at-mean stays


def test_mutual_information_ref_matches_corpus():
    rng = np.random.default_rng(5)
    a, b = rng.integers(0, 4, 500), rng.integers(0, 6, 500)
    b = np.where(rng.random(500) < 0.5, a, b)                        # dependent labels
    counts = np.zeros((4, 6), dtype=np.int64)
    np.add.at(counts, (a, b), 1)
    assert lesson09.mutual_information_ref(counts) == pytest.approx(corpus.mutual_information(a, b), rel=1e-12)
    assert lesson09.mutual_information_ref(np.outer([1, 2], [3, 4, 5])) == pytest.approx(0.0, abs=1e-15)
    assert lesson09.mutual_information_ref(np.eye(3) * 7) == pytest.approx(np.log(3))


# ----------------------------------------------------------------------------- issue 22
def test_a_floored_mean_load_is_named():
    def floored(bias, load, rate):
        return bias + rate * np.sign(np.sum(load) // len(load) - np.asarray(load))
    assert_fail(lesson09.bias_update(floored), "floor", "mean load")


def _mi_normalised(counts, axis):
    n = np.asarray(counts, float)
    p = n / n.sum(axis=axis, keepdims=True)              # each row (or column) turned into probabilities
    outer = p.sum(1, keepdims=True) * p.sum(0, keepdims=True)
    with np.errstate(all="ignore"):
        return float(np.sum(np.where(p > 0, p * np.log(p / outer), 0.0)))


def test_mutual_information_from_row_or_column_normalised_counts_is_named():
    assert_fail(lesson09.mutual_information(lambda c: _mi_normalised(c, 1)), "each row", "counts.sum()")
    assert_fail(lesson09.mutual_information(lambda c: _mi_normalised(c, 0)), "each column", "counts.sum()")


def report_token_loop(idx, kept, E):
    load = np.zeros(E, dtype=np.int64)
    unserved = 0
    for t in range(idx.shape[0]):                       # one patient at a time
        load += np.bincount(idx[t][kept[t]], minlength=E)
        unserved += not kept[t].any()
    return load, load.std() / load.mean() if load.mean() > 0 else 0.0, unserved


def test_a_routing_report_with_a_token_loop_fails():
    assert_fail(lesson09.routing_report(report_token_loop), "grows with the number of tokens")
