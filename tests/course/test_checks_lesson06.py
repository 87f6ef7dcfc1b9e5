"""Lesson 06's graders: blank fails clearly, independently written right answers pass, typical
mistakes get their hints, crashes are verdicts — and the "no per-token Python loop" check
catches loops (over tokens, over slots, np.vectorize) but allows loops over experts, by
counting executed Python steps, never by timing."""
import math

import numpy as np

from grader_cases import GraderContract
from minimoe import dispatch
from minimoe.course.checks import lesson06


# ----------------------------------------------------------------------------- independent answers
def capacity(T, E, k, cf, rounding=True, ceil=True, use_k=True, floor1=True):
    if cf is None:
        return None
    x = cf * T * (k if use_k else 1) / E
    x = round(x, 9) if rounding else x
    c = math.ceil(x) if ceil else math.floor(x)
    return max(1, c) if floor1 else c


def plan_sorted(idx, E, C, token_first=False, stable=True, keep_last=False, offsets_mode="kept",
                apply_C=True):
    """A vectorised plan, with switchable mistakes."""
    T, k = idx.shape
    flat = idx.reshape(-1)
    key = flat if token_first else flat * k + np.tile(np.arange(k), T)
    order = np.argsort(key, kind="stable" if stable else "quicksort")
    counts = np.bincount(flat, minlength=E)
    kept = counts
    if C is not None and apply_C:
        starts = np.cumsum(counts) - counts
        place = np.arange(order.size) - starts[flat[order]]
        if keep_last:
            place = (counts[flat[order]] - 1) - place
            sel = place < C
            order = order[sel]
        else:
            order = order[place < C]
        kept = np.minimum(counts, C)
    if offsets_mode == "kept":
        offsets = np.concatenate([[0], np.cumsum(kept)])
    elif offsets_mode == "requested":
        offsets = np.concatenate([[0], np.cumsum(counts)])
    else:
        offsets = np.cumsum(kept)                       # no leading 0: shape (E,)
    return order, offsets


def plan_expert_loop(idx, E, C):
    """Right, with a Python loop over the *experts* (allowed)."""
    T, k = idx.shape
    flat = idx.reshape(-1)
    groups = []
    for e in range(E):
        a = np.flatnonzero(flat == e)
        a = a[np.argsort((a % k) * T + a // k, kind="stable")]
        groups.append(a if C is None else a[:C])
    sizes = [g.size for g in groups]
    return np.concatenate(groups).astype(np.intp), np.concatenate([[0], np.cumsum(sizes)])


def plan_token_loop(idx, E, C):
    """Right, with Python loops over the tokens (the lesson's specification)."""
    T, k = idx.shape
    books = [[] for _ in range(E)]
    for j in range(k):
        for t in range(T):
            e = idx[t, j]
            if C is None or len(books[e]) < C:
                books[e].append(t * k + j)
    order = np.array([a for b in books for a in b], dtype=np.intp)
    return order, np.cumsum([0] + [len(b) for b in books])


def comb(yg, gates, order, T, weigh=True, buffered=False, unsorted_gates=False, empty=False):
    k = gates.shape[1]
    token = order // k
    g = gates.reshape(-1) if unsorted_gates else gates.reshape(-1)[order]
    rows = g[:, None] * yg if weigh else yg
    y = np.full((T, yg.shape[1]), 7.0) if empty else np.zeros((T, yg.shape[1]))
    if empty:
        y[np.unique(token)] = 0.0
    if buffered:
        y[token] += rows
    else:
        np.add.at(y, token, rows)
    return y


def comb_token_loop(yg, gates, order, T):
    k = gates.shape[1]
    y = np.zeros((T, yg.shape[1]))
    for n, a in enumerate(order):
        y[a // k] += gates.reshape(-1)[a] * yg[n]
    return y


def comb_vectorize(yg, gates, order, T):
    k = gates.shape[1]
    y = np.zeros((T, yg.shape[1]))
    w = np.vectorize(lambda a: gates.reshape(-1)[a])(order)
    np.add.at(y, order // k, w[:, None] * yg)
    return y


def comb_back(dy, yg, gates, order, gate=True, flat_dg=False):
    k = gates.shape[1]
    rows = dy[order // k]
    dyg = gates.reshape(-1)[order][:, None] * rows if gate else rows
    dg = np.zeros(gates.size)
    dg[order] = (rows * yg).sum(1)
    return dyg, (dg[order] if flat_dg else dg.reshape(gates.shape))


def comb_back_loop(dy, yg, gates, order):
    k = gates.shape[1]
    dyg = np.empty_like(yg)
    dg = np.zeros(gates.size)
    for n, a in enumerate(order):
        dyg[n] = gates.reshape(-1)[a] * dy[a // k]
        dg[a] = dy[a // k] @ yg[n]
    return dyg, dg.reshape(gates.shape)


CASES = [
    (lesson06.expert_capacity, capacity, [
        (lambda T, E, k, cf: capacity(T, E, k, cf, rounding=False), "floating point"),
        (lambda T, E, k, cf: capacity(T, E, k, cf, ceil=False), "round *up*"),
        (lambda T, E, k, cf: capacity(T, E, k, cf, use_k=False), "k = 2 referrals"),
        (lambda T, E, k, cf: capacity(T, E, k, 1.0 if cf is None else cf), "no limit"),
        (lambda T, E, k, cf: None if cf is None else cf * T * k / E, "whole number"),
    ]),
    (lesson06.dispatch_plan, plan_sorted, [
        (plan_token_loop, "grows with the number of tokens"),
        (lambda i, E, C: plan_sorted(i, E, C, token_first=True), "A first choice beats"),
        (lambda i, E, C: plan_sorted(i, E, C, stable=False), "kind='stable'"),
        (lambda i, E, C: plan_sorted(i, E, C, apply_C=False), "you kept all"),
        (lambda i, E, C: plan_sorted(i, E, C, keep_last=True), "*first* C"),
        (lambda i, E, C: plan_sorted(i, E, C, offsets_mode="requested"), "*keeps*"),
        (lambda i, E, C: plan_sorted(i, E, C, offsets_mode="no0"), "E + 1"),
    ]),
    (lesson06.combine, comb, [
        (comb_token_loop, "grows with the number of tokens"),
        (comb_vectorize, "np.vectorize"),
        (lambda *a: comb(*a, buffered=True), "buffered"),
        (lambda *a: comb(*a, weigh=False), "Weigh each expert's answer"),
        (lambda *a: comb(*a, unsorted_gates=True), "expert order"),
        (lambda *a: comb(*a, empty=True), "np.zeros"),
    ]),
    (lesson06.combine_backward, comb_back, [
        (comb_back_loop, "grows with the number of tokens"),
        (lambda *a: comb_back(*a, gate=False), "forgot the gate"),
        (lambda *a: comb_back(*a, flat_dg=True), "gates' shape"),
    ]),
]


class TestGraders(GraderContract):
    LESSONS = (lesson06.LESSON,)
    CASES = CASES


# ----------------------------------------------------------------------------- the loop detector
def test_a_loop_over_experts_is_allowed():
    res = lesson06.dispatch_plan(plan_expert_loop)
    assert res.passed, res.message


def test_python_steps_counts_work_not_time():
    idx_small, idx_big = lesson06.referrals(1, 256, 8, 2), lesson06.referrals(1, 4096, 8, 2)
    n_small, out = lesson06.python_steps(plan_sorted, idx_small, 8, 64)
    n_big, _ = lesson06.python_steps(plan_sorted, idx_big, 8, 1024)
    assert n_small == n_big > 0                          # vectorised: the same lines at any T
    np.testing.assert_array_equal(out[0], dispatch.make_plan(idx_small, 8, 64).order)
    l_small, _ = lesson06.python_steps(plan_token_loop, idx_small, 8, 64)
    l_big, _ = lesson06.python_steps(plan_token_loop, idx_big, 8, 1024)
    assert l_big > 10 * l_small > 10 * 512               # ≥ one step per referral
    again, _ = lesson06.python_steps(plan_token_loop, idx_small, 8, 64)
    assert again == l_small                              # deterministic


def test_references_agree_with_minimoe_and_the_loop_specification():
    for seed, (T, E, k, cf) in enumerate([(12, 4, 2, 1.0), (40, 5, 3, 0.7), (9, 3, 1, None)]):
        idx = lesson06.referrals(seed, T, E, k)
        C = lesson06.expert_capacity_ref(T, E, k, cf)
        assert C == capacity(T, E, k, cf)
        order, offsets = lesson06.dispatch_plan_ref(idx, E, C)
        lo, loff = plan_token_loop(idx, E, C)
        np.testing.assert_array_equal(order, lo)
        np.testing.assert_array_equal(offsets, loff)
        plan = dispatch.make_plan(idx, E, C)
        yg = np.random.default_rng(seed).standard_normal((order.size, 3))
        gates = np.random.default_rng(seed + 1).uniform(size=(T, k))
        want, _ = dispatch.combine_forward(yg, gates, plan)
        np.testing.assert_allclose(lesson06.combine_ref(yg, gates, order, T), want, rtol=1e-13, atol=1e-14)
        np.testing.assert_allclose(comb_token_loop(yg, gates, order, T), want, rtol=1e-13, atol=1e-14)
