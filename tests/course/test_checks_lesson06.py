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


def capacity_np_float(T, E, k, cf):
    """Right numbers, but np.ceil's float (3.0): C must be an int."""
    return None if cf is None else max(1.0, np.ceil(round(cf * T * k / E, 9)))


def capacity_ignores_none(T, E, k, cf):
    return max(1, math.ceil(round(cf * T * k / E, 9)))       # TypeError on capacity_factor=None


def plan_without_minlength(idx, E, C):
    order, offsets = plan_sorted(idx, E, C)
    counts = np.bincount(idx.reshape(-1))                    # no minlength: idle last experts vanish
    kept = counts if C is None else np.minimum(counts, C)
    return order, np.concatenate([[0], np.cumsum(kept)])


def plan_one_shape_only(idx, E, C):
    """Right when k = 2, wrong otherwise (the rank key is hard-wired)."""
    T, k = idx.shape
    if k == 2:
        return plan_sorted(idx, E, C)
    return plan_sorted(idx, E, C, token_first=True)


def comb_empty(yg, gates, order, T, fill=np.nan):
    """y from np.empty: turned-away tokens keep garbage (here NaN, -inf or a leftover value)."""
    k = gates.shape[1]
    y = np.full((T, yg.shape[1]), fill)
    token = order // k
    y[np.unique(token)] = 0.0
    np.add.at(y, token, gates.reshape(-1)[order][:, None] * yg)
    return y


def comb_back_one_shape(dy, yg, gates, order):
    dyg, dg = comb_back(dy, yg, gates, order)
    return (dyg, dg) if gates.shape[1] != 3 else (dyg, dg * 0.5)


def combine_by_minimoe(yg, gates, order, T):
    """Right, by way of minimoe's combine_forward (the exercise itself)."""
    idx = np.zeros((T, gates.shape[1]), dtype=int)          # any plan: the call itself is the cheat
    try:
        dispatch.combine_forward(yg, gates, dispatch.make_plan(idx, 1))
    except Exception:
        pass
    return comb(yg, gates, order, T)


def combine_backward_by_minimoe(dy, yg, gates, order):
    try:
        dispatch.combine_backward(dy, None)
    except Exception:
        pass
    return comb_back(dy, yg, gates, order)


class TestGraders(GraderContract):
    LESSONS = (lesson06.LESSON,)
    CASES = CASES
    NO_GENERIC_NEAR_MISS = ("expert_capacity", "dispatch_plan")      # integers: no float to nudge
    NEAR_MISSES = {
        "expert_capacity": [(capacity_np_float, "return an int"),
                            (lambda T, E, k, cf: None if cf is None else capacity(T, E, k, cf) + (T == 10), None)],
        "dispatch_plan": [(plan_without_minlength, "minlength=E"), (plan_one_shape_only, "A first choice beats")],
        "combine": [(lambda *a: comb_empty(*a, fill=np.nan), "np.zeros"),
                    (lambda *a: comb_empty(*a, fill=-np.inf), "NaN or ±inf"),
                    (lambda *a: comb_empty(*a, fill=1e-300), "leftover values")],
        "combine_backward": [(comb_back_one_shape, None)],
    }
    RULE_BREAKING = {
        "expert_capacity": [(capacity_ignores_none, "capacity_factor is None")],
        "dispatch_plan": [(plan_token_loop, "grows with the number of tokens")],
        "combine": [(comb_token_loop, "grows with the number of tokens"), (comb_vectorize, "np.vectorize"),
                    (combine_by_minimoe, "you called `minimoe.core.dispatch.combine_forward`")],
        "combine_backward": [(comb_back_loop, "grows with the number of tokens"),
                             (combine_backward_by_minimoe, "you called `minimoe.core.dispatch.combine_backward`")],
    }


def test_turned_away_slots_from_np_empty_fail_without_a_warning():
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")                      # a leaked RuntimeWarning would raise here
        for fill in (np.nan, -np.inf, np.inf):
            res = lesson06.combine(lambda *a: comb_empty(*a, fill=fill))
            assert not res.passed and "np.zeros" in res.message


def test_calling_minimoe_for_the_plan_or_the_combine_fails():
    from minimoe.core import dispatch as D

    def plan_by_minimoe(idx, E, C):
        p = D.make_plan(idx, E, C)
        return p.order, p.offsets
    assert not lesson06.dispatch_plan(plan_by_minimoe).passed
    assert "you called `minimoe.core.dispatch.make_plan`" in lesson06.dispatch_plan(plan_by_minimoe).message
    res = lesson06.expert_capacity(lambda T, E, k, cf: D.expert_capacity(T, E, k, cf))
    assert not res.passed and "minimoe.core.dispatch.expert_capacity" in res.message

