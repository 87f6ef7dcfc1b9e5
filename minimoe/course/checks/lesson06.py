"""Graders for lesson 06, *Appointment books*: the capacity, the sort-based dispatch plan,
and the combine back to tokens with its backward.

Besides the right numbers, the dispatch and combine exercises must have **no per-token
Python loop**. That is graded by behaviour, not by a stopwatch (a shared, noisy machine
makes timings unreliable): :func:`~minimoe.course.checks.grading.python_steps` counts the Python lines and calls
the learner's function executes (``sys.settrace``) at T = 256 and at T = 4096 tokens. A
vectorised function runs the same few dozen lines for both; a loop over tokens, or over
appointment slots, runs thousands more at the larger size. Loops over the E experts or
the k choices are fine: E and k are the same in both runs.

References: :func:`minimoe.core.dispatch.expert_capacity`, :func:`minimoe.core.dispatch.make_plan`,
:func:`minimoe.core.dispatch.combine_forward` (and finite differences of it for the backward).
"""
from __future__ import annotations

import math

import numpy as np

from ...core import dispatch, router
from .compare import expect_array, expect_grads, numeric_grads
from .grading import Fail, Lesson, call, no_token_loop, python_steps  # noqa: F401 (python_steps: re-exported)

LESSON = Lesson("06", "Appointment books")
progress = LESSON.progress

SMALL_T, LARGE_T = 256, 4096


# --------------------------------------------------------------------------- references
def expert_capacity_ref(T, E, k, capacity_factor):
    """``C = ceil(capacity_factor · T · k / E)`` (at least 1), or None for no limit."""
    return dispatch.expert_capacity(T, E, k, capacity_factor)


def dispatch_plan_ref(idx, E, C):
    """``(order, offsets)`` of :func:`minimoe.core.dispatch.make_plan`."""
    plan = dispatch.make_plan(idx, E, C)
    return plan.order, plan.offsets


def combine_ref(yg, gates, order, T):
    """``y_t = Σ_j G_tj · yg[row(t, j)]`` over the kept assignments, (T, d)."""
    k = gates.shape[1]
    y = np.zeros((T, yg.shape[1]), dtype=np.float64)
    np.add.at(y, np.asarray(order) // k, gates.reshape(-1)[order][:, None] * yg)
    return y


def referrals(seed, T, E, k, skew=1.5, unused=None):
    """Top-k referrals (T, k) of a GP that favours low-numbered experts (so books overflow).

    ``unused``: an expert that no one is sent to (to test empty groups).
    """
    rng = np.random.default_rng(seed)
    H = rng.standard_normal((T, E)) - skew * np.linspace(0, 1, E)
    if unused is not None:
        H[:, unused] = -1e3
    return router.topk_indices(H, k)


def _no_token_loop(fn, name, make_args, check_out, hint):
    """Run ``fn`` at T = 256 and T = 4096; fail if its Python work grows with T
    (the shared :func:`~minimoe.course.checks.grading.no_token_loop`)."""
    return no_token_loop(fn, name, make_args, check_out, hint, sizes=(SMALL_T, LARGE_T),
                         loops="a loop over tokens (or over appointment slots)")


# --------------------------------------------------------------------------- graders
@LESSON.exercise("expert_capacity", forbid=[dispatch.expert_capacity, expert_capacity_ref])
def expert_capacity(fn):
    cases = [(100, 10, 1, 1.1), (64, 8, 2, 1.25), (100, 8, 1, 1.0), (3, 8, 1, 1.0), (12, 4, 2, 0.5),
             (48, 6, 2, 2.0), (70, 7, 1, 1.1), (5, 4, 2, None), (10, 4, 1, 0.9)]
    for T, E, k, cf in cases:
        try:
            got = call(fn, T, E, k, cf, name="expert_capacity")
        except Fail as e:
            if cf is None and "TypeError" in str(e):
                raise Fail(f"{e}. With capacity_factor=None (no limit) there is nothing to multiply: "
                           f"check `if capacity_factor is None: return None` first.") from None
            raise
        want = expert_capacity_ref(T, E, k, cf)
        where = f"for T={T}, E={E}, k={k}, capacity_factor={cf}"
        if want is None:
            if got is not None:
                raise Fail(f"capacity_factor=None means no limit: return None, not {got!r}.")
            continue
        if got is None:
            raise Fail(f"expert_capacity returned None {where} — did you forget a `return`? (Only "
                       f"capacity_factor=None means no limit.)")
        if isinstance(got, (float, np.floating)) and np.isfinite(got) and float(got) != int(got):
            raise Fail(f"C must be a whole number of appointments, got {got!r} {where}: round up with math.ceil.")
        if isinstance(got, (bool, np.bool_)) or not isinstance(got, (int, np.integer)):
            if isinstance(got, (float, np.floating)) and np.isfinite(got):
                raise Fail(f"expert_capacity returned the float {got!r} {where}; C counts appointment slots, "
                           f"so return an int: np.ceil returns a float, wrap it in int(...) (or use "
                           f"math.ceil, which returns an int). A float C breaks slicing and np.arange later.")
            raise Fail(f"expert_capacity should return an int, got {type(got).__name__} {got!r:.40} {where}")
        g = int(got)
        x = cf * T * k / E
        if g == want:
            continue
        if g == math.ceil(x) and g == want + 1:
            raise Fail(f"{where} you return {g}, expected {want}: in floating point {cf} · {T} · {k} / {E} "
                       f"= {x!r}, just above {want}, and the ceiling adds a whole slot. Round to a few "
                       f"decimals first: math.ceil(round(x, 9)).")
        if g == math.floor(x) and g < want:
            raise Fail(f"{where} you return {g}, expected {want}: round *up* (math.ceil), so that a "
                       f"perfectly balanced GP never turns anyone away.")
        if g == max(1, math.ceil(round(cf * T / E, 9))) and k > 1:
            raise Fail(f"{where} you return {g}, expected {want}: each token makes k = {k} referrals, "
                       f"so the books must hold capacity_factor · T · k / E.")
        raise Fail(f"{where} you return {g}, expected C = ceil(capacity_factor · T · k / E) = {want}.")
    return "C = ceil(capacity_factor · T · k / E), None for no limit — right on 9 cases, " \
           "including 1.1 · 100 / 10 (which is 11.000000000000002 in floating point)."


def _check_plan(out, idx, E, C):
    """Compare a learner's (order, offsets) with make_plan's and explain the difference."""
    T, k = idx.shape
    want_order, want_offsets = dispatch_plan_ref(idx, E, C)
    if not isinstance(out, tuple) or len(out) != 2:
        raise Fail("dispatch_plan should return a pair (order, offsets)")
    order, offsets = (np.asarray(a) for a in out)
    if order.ndim != 1 or (order.size and not np.issubdtype(order.dtype, np.integer)):
        raise Fail(f"order should be a 1-D integer array (flat assignment ids a = t·k + j), got "
                   f"{order.dtype} {order.shape}")
    if offsets.ndim == 1 and offsets.size < E + 1 and np.bincount(idx.reshape(-1)).size < E:
        raise Fail(f"offsets has {offsets.size} entries, expected E + 1 = {E + 1}: the last expert(s) "
                   f"got no referral here, and np.bincount(idx.reshape(-1)) stops at the largest expert "
                   f"it sees. Pass minlength=E, so idle experts get their (empty) group.")
    if offsets.shape == (E,):
        raise Fail(f"offsets should have E + 1 = {E + 1} entries, starting with 0: expert e's patients "
                   f"are order[offsets[e]:offsets[e+1]].")
    if order.size and (order.min() < 0 or order.max() >= T * k or np.unique(order).size != order.size):
        raise Fail(f"order should hold distinct flat assignment ids a = t·k + j in [0, {T * k}); "
                   f"yours has repeats or values out of range.")
    flat = idx.reshape(-1)
    requested = np.bincount(flat, minlength=E)
    if order.size == T * k and want_order.size < T * k:
        raise Fail(f"you kept all {T * k} referrals, but with C = {C} some books overflow "
                   f"(requests per expert: {requested.tolist()}). Keep only the first C of each "
                   f"expert's queue.")
    experts = flat[order]
    if np.any(np.diff(experts) < 0):
        raise Fail("order must group the assignments by expert (all of expert 0's, then expert 1's, ...): "
                   "sort by idx.reshape(-1).")
    within = experts[:-1] == experts[1:]
    t, j = order // k, order % k
    queue = (j * T + t)                                    # the priority: choice rank, then token
    if np.any(within & (np.diff(queue) < 0)):
        token_first = np.all(~within | (np.diff(order) > 0))
        if token_first and k > 1:
            raise Fail("Within each expert you ordered the patients by token only. A first choice "
                       "beats another patient's second opinion: sort by the key expert · k + j "
                       "(j = choice rank), so all first choices come before any second choice.")
        raise Fail("Within each expert, patients must be in queue order (first choices first, then "
                   "earlier tokens first). np.argsort's default quicksort is not stable: use "
                   "kind='stable', so equal keys keep their token order.")
    if not np.array_equal(np.sort(order), np.sort(want_order)):
        if C is not None and order.size == want_order.size:
            raise Fail(f"You kept {order.size} referrals, as many as expected, but not the right ones. "
                       f"Keep the *first* C = {C} of each expert's queue (rank in the group < C), "
                       f"not the last.")
        raise Fail(f"You kept {order.size} referrals; the right plan keeps {want_order.size} "
                   f"(each expert takes min(requests, C) with C = {C}).")
    if not np.array_equal(order, want_order):
        raise Fail("order has the right referrals but not in the right sequence.")
    expect_array("offsets", offsets, want_offsets, shape_desc="(E + 1,)", mistakes=[
        (np.concatenate([[0], np.cumsum(requested)]),
         "offsets must count the patients each expert *keeps*, min(requests, C), not all requests."),
    ])


@LESSON.exercise("dispatch_plan", forbid=[dispatch.make_plan, dispatch_plan_ref])
def dispatch_plan(fn):
    cases = [(12, 4, 2, 4, None), (1, 3, 1, 1, None), (40, 5, 2, None, None), (30, 4, 1, 5, None),
             (300, 6, 3, 120, None), (25, 5, 2, 6, 4), (200, 8, 2, 40, None)]   # (25, 5, …, 4): idle last expert
    for seed, (T, E, k, C, unused) in enumerate(cases):
        idx = referrals(600 + seed, T, E, k, unused=unused)
        out = call(fn, idx, E, C, name="dispatch_plan")
        _check_plan(out, idx, E, C)
    E, k = 8, 2

    def make(T):
        return referrals(650 + T, T, E, k), E, expert_capacity_ref(T, E, k, 1.0)
    small, big = _no_token_loop(fn, "dispatch_plan", make, _check_plan,
                                "Let one np.argsort(key, kind='stable') on the key expert · k + j "
                                "put every queue in order, and compute each assignment's place in its "
                                "queue (its position minus where its expert's group starts) to apply C.")
    return (f"the plan is right on 7 cases (k = 1 to 3, with and without capacity, an unused expert), "
            f"and vectorised: {small} Python steps at T = {SMALL_T}, {big} at T = {LARGE_T}.")


def _plan_case(seed, T, E, k, cf):
    idx = referrals(seed, T, E, k)
    plan = dispatch.make_plan(idx, E, expert_capacity_ref(T, E, k, cf))
    rng = np.random.default_rng(seed + 1)
    yg = rng.standard_normal((plan.order.size, 3))
    gates = rng.uniform(0.1, 1.0, (T, k))
    return plan, yg, gates


_COMBINE_CASES = [(9, 3, 2, None), (10, 4, 2, 0.6), (1, 3, 1, 1.0), (16, 4, 1, None), (24, 6, 3, 0.8)]


def _check_combine(y, yg, gates, order, T):
    k = gates.shape[1]
    want = combine_ref(yg, gates, order, T)
    token = np.asarray(order) // k
    w = gates.reshape(-1)[order][:, None]
    lossy = np.zeros_like(want)
    lossy[token] += w * yg                                 # buffered: repeated tokens keep one write
    unweighted = np.zeros_like(want)
    np.add.at(unweighted, token, yg)
    mistakes = [
        (lossy, "y[token] += ... writes each token once even if it appears in several rows (with "
                "k > 1 a token has up to k): NumPy's fancy-index += is buffered and keeps only the "
                "last write. Use np.add.at(y, token, rows), which adds at repeated indices, or sum "
                "each token's k slots."),
        (unweighted, "Weigh each expert's answer by its gate: gates.reshape(-1)[order] gives the gate "
                     "of each grouped row."),
    ]
    if len(order) == gates.size:
        wrong = np.zeros_like(want)
        np.add.at(wrong, token, gates.reshape(-1)[:, None] * yg)
        mistakes.append((wrong, "The rows of yg are in expert order, not token order: the gate of row n "
                                "is gates.reshape(-1)[order[n]]."))
    try:
        got = None if y is None else np.asarray(y, dtype=float)
    except (TypeError, ValueError):
        got = None
    if got is not None and got.shape == want.shape:
        served = np.zeros(T, dtype=bool)
        served[token] = True
        with np.errstate(all="ignore"):          # np.empty garbage may hold NaN or ±inf: no warning leaks
            junk = ~np.isfinite(got[~served]).all()
            if (~served).any() and np.allclose(got[served], want[served]) and not np.array_equal(
                    got[~served], want[~served]):
                raise Fail("The served tokens are right, but a token whose referrals were all turned away must "
                           "get y = 0 (the residual connection carries it on)"
                           + ("; yours got NaN or ±inf there" if junk else "; yours got leftover values there")
                           + ": start from np.zeros, not np.empty (which keeps whatever was in memory).")
    with np.errstate(all="ignore"):
        expect_array("y", y, want, shape_desc="(T, d)", mistakes=mistakes)


@LESSON.exercise("combine", forbid=[dispatch.combine_forward, combine_ref])
def combine(fn):
    for seed, (T, E, k, cf) in enumerate(_COMBINE_CASES):
        plan, yg, gates = _plan_case(660 + seed, T, E, k, cf)
        y = call(fn, yg, gates, plan.order, T, name="combine")
        _check_combine(y, yg, gates, plan.order, T)

    def make(T):
        plan, yg, gates = _plan_case(680 + T, T, 8, 2, 1.0)
        return yg, gates, plan.order, T
    small, big = _no_token_loop(fn, "combine", make, _check_combine,
                                "Gather each row's gate with gates.reshape(-1)[order], weigh the rows, "
                                "and scatter-add them with np.add.at(y, order // k, rows).")
    return (f"y = Σ_j G_tj · FFN(x_t) over the kept referrals is right on 5 cases (dropped tokens get 0), "
            f"and vectorised: {small} Python steps at T = {SMALL_T}, {big} at T = {LARGE_T}.")


def _check_combine_backward(out, dy, yg, gates, order):
    if not isinstance(out, tuple) or len(out) != 2:
        raise Fail("combine_backward should return a pair (dyg, dgates)")
    dyg, dgates = out
    T, k = gates.shape
    d = np.asarray(dgates) if dgates is not None else None
    if d is not None and d.shape == (len(order),) and (len(order),) != gates.shape:
        raise Fail(f"dgates has shape {d.shape}, one number per grouped row; it must have the gates' "
                   f"shape {gates.shape} = (T, k): put each row's ⟨dy_t, yg_n⟩ back at flat position "
                   f"order[n] (and leave 0 at turned-away slots).")
    token = np.asarray(order) // k
    arrays = {"yg": yg.copy(), "gates": gates.copy()}
    num = numeric_grads(lambda: combine_ref(arrays["yg"], arrays["gates"], order, T), arrays, dy)
    return expect_grads({"yg": dyg, "gates": dgates}, num, names=["yg", "gates"], mistakes={
        "yg": [(dy[token], "y = gate · yg, so dyg = gate · dy[token]: you forgot the gate.")],
    })


@LESSON.exercise("combine_backward", forbid=[dispatch.combine_backward])
def combine_backward(fn):
    worst = 0.0
    for seed, (T, E, k, cf) in enumerate(_COMBINE_CASES):
        plan, yg, gates = _plan_case(700 + seed, T, E, k, cf)
        dy = np.random.default_rng(710 + seed).standard_normal((T, yg.shape[1]))
        out = call(fn, dy, yg, gates, plan.order, name="combine_backward")
        worst = max(worst, _check_combine_backward(out, dy, yg, gates, plan.order))

    def make(T):
        plan, yg, gates = _plan_case(720 + T, T, 8, 2, 1.0)
        return np.random.default_rng(T).standard_normal((T, yg.shape[1])), yg, gates, plan.order

    def light_check(out, dy, yg, gates, order):            # the full gradient check is too slow at T = 4096
        k = gates.shape[1]
        if not isinstance(out, tuple) or len(out) != 2:
            raise Fail("combine_backward should return a pair (dyg, dgates)")
        want_dg = np.zeros(gates.size)
        want_dg[order] = np.einsum("nd,nd->n", dy[order // k], yg)
        expect_array("dgates", out[1], want_dg.reshape(gates.shape), shape_desc="(T, k)")
        expect_array("dyg", out[0], gates.reshape(-1)[order][:, None] * dy[order // k], shape_desc="(N, d)")
    small, big = _no_token_loop(fn, "combine_backward", make, light_check,
                                "Gather dy[order // k] once for all rows; dgates at the flat positions "
                                "order is the row-wise dot product np.sum(dy_rows * yg, axis=1).")
    return (f"dyg and dgates pass the gradient check on 5 cases (worst relative error {worst:.1e}), "
            f"and the backward is vectorised ({small} Python steps at T = {SMALL_T}, {big} at T = {LARGE_T}).")
