"""Graders for lesson 09, *Beyond the GP*: expert-choice selection and its combine backward,
the loss-free bias update, a routing report (load, load CV, patients nobody saw), and the
mutual information between experts and labels from a count table.

The reference answers live here too (``*_ref``): the lesson's own cells use them after
each exercise, so a learner who is stuck can read on. They agree with minimoe's layers
(``expert_choice.py``, ``lossfree.py``, ``corpus.mutual_information``), which the tests check.
"""
from __future__ import annotations

import numpy as np

from ...core.layers import softmax
from ...beyond.lossfree import bias_update as _bias_update
from .compare import expect_array, expect_grads, expect_number, numeric_grads
from .grading import Fail, Lesson, call, no_token_loop

LESSON = Lesson("09", "Beyond the GP")
progress = LESSON.progress


# --------------------------------------------------------------------------- references
def expert_choice_select_ref(S, C):
    """Each expert's C best tokens: ``idx (E, C)`` (best first) and ``gates[e, c] = S[idx[e, c], e]``."""
    idx = np.argsort(-S.T, axis=1, kind="stable")[:, :C]
    return idx, np.take_along_axis(S.T, idx, axis=1)


def expert_choice_combine_ref(yg, gates, idx, T):
    """``y[t] = Σ_{(e,c): idx[e,c] = t} gates[e,c] · yg[e,c]``, (T, d); yg is (E, C, d)."""
    y = np.zeros((T, yg.shape[-1]))
    np.add.at(y, idx.reshape(-1), (gates[..., None] * yg).reshape(-1, yg.shape[-1]))
    return y


def expert_choice_combine_backward_ref(dy, yg, gates, idx):
    """``(dyg (E, C, d), dS (T, E))``: each pick gets its token's gradient times its gate; the gate
    of pick (e, c) gets ⟨dy[idx[e,c]], yg[e,c]⟩, placed at ``dS[idx[e,c], e]`` (0 where not picked)."""
    dy_picks = dy[idx]                                     # (E, C, d)
    dS = np.zeros((dy.shape[0], idx.shape[0]))
    dS[idx, np.arange(idx.shape[0])[:, None]] = np.sum(dy_picks * yg, axis=-1)
    return gates[..., None] * dy_picks, dS


def bias_update_ref(bias, load, rate):
    """``b + rate · sign(mean(load) − load)`` (Wang et al. 2024, Algorithm 1): minimoe's own."""
    return _bias_update(np.asarray(bias, dtype=np.float64), load, rate)


def routing_report_ref(idx, kept, n_experts):
    """``(load (E,) int, load CV, unserved)`` of one forward.

    load_e counts the *kept* assignments to e; CV = std/mean of the load (population std; 0 if
    nothing was kept); unserved = tokens none of whose assignments was kept. Works for token
    choice (idx, kept (T, k)) and expert choice (idx = every expert, kept (T, E) = the picks).
    """
    idx, kept = np.asarray(idx), np.asarray(kept, dtype=bool)
    load = np.bincount(idx[kept], minlength=n_experts)
    cv = float(load.std() / load.mean()) if load.mean() > 0 else 0.0
    return load, cv, int(np.sum(~kept.any(axis=1)))


def mutual_information_ref(counts):
    """``I(expert; label)`` in nats from an (E, K) table of counts (zero cells contribute 0)."""
    p = np.asarray(counts, dtype=np.float64)
    p = p / p.sum()
    outer = p.sum(axis=1, keepdims=True) * p.sum(axis=0, keepdims=True)
    nz = p > 0
    return float(max(np.sum(p[nz] * np.log(p[nz] / outer[nz])), 0.0))


def _affinities(seed, T, E):
    """Softmax affinities (T, E) whose columns have no near-ties (ranks ≥ 1e-3 apart)."""
    rng = np.random.default_rng(seed)
    for _ in range(100):
        S = softmax(1.5 * rng.standard_normal((T, E)))
        gaps = np.diff(np.sort(S, axis=0), axis=0)
        if T == 1 or gaps.min() > 1e-3:
            return S
    raise RuntimeError("could not draw tie-free affinities")   # pragma: no cover


def _by_token(idx, gates):
    """Each row's picks sorted by token, so any order of the same picks compares equal."""
    order = np.argsort(idx, axis=1)
    return np.take_along_axis(idx, order, axis=1), np.take_along_axis(gates, order, axis=1)


# --------------------------------------------------------------------------- exercise 1
def _check_select(out, S, C):
    """Compare a learner's (idx, gates) with the reference and explain the difference."""
    T, E = S.shape
    if not isinstance(out, tuple) or len(out) != 2:
        raise Fail("expert_choice_select should return a pair (idx, gates), each of shape (E, C).")
    idx, gates = (None if a is None else np.asarray(a) for a in out)
    if idx is None or gates is None:
        raise Fail("idx or gates is None — did you forget to return both?")
    what = f"for T={T} tokens, E={E} experts, C={C}"
    if idx.shape == (T, C) and (T, C) != (E, C):
        raise Fail(f"idx has shape {idx.shape} = (T, C) {what}: you gave each *token* its best C "
                   f"experts — that is token choice. In expert choice each *expert* ranks all tokens "
                   f"by its column S[:, e]: sort the rows of S.T, giving idx of shape (E, C).")
    if gates.shape == (E, C, E):
        raise Fail("gates has shape (E, C, E): S[idx] picks whole rows of S. The gate of pick (e, c) "
                   "is the single affinity S[idx[e, c], e]: np.take_along_axis(S.T, idx, axis=1).")
    if idx.shape != (E, C) or gates.shape != (E, C):
        raise Fail(f"idx and gates should both have shape (E, C) = {(E, C)} {what}; "
                   f"got {idx.shape} and {gates.shape}.")
    if not np.issubdtype(idx.dtype, np.integer):
        raise Fail(f"idx should hold integer token indices, got dtype {idx.dtype}.")
    if idx.min() < 0 or idx.max() >= T:
        raise Fail(f"idx should hold token indices in [0, {T}) {what}; got values from "
                   f"{idx.min()} to {idx.max()}.")
    want_idx, want_gates = expert_choice_select_ref(S, C)
    worst = np.argsort(S.T, axis=1, kind="stable")[:, :C]
    if C < T and np.array_equal(np.sort(idx, 1), np.sort(worst, 1)):
        raise Fail(f"idx is wrong {what}: each expert picked the C tokens it likes *least*. "
                   f"np.argsort sorts ascending: sort -S.T (or reverse the order) to get the best first.")
    got_i, got_g = _by_token(idx, gates)
    ref_i, ref_g = _by_token(want_idx, want_gates)
    if not np.array_equal(got_i, ref_i):
        e = int(np.flatnonzero(np.any(got_i != ref_i, axis=1))[0])
        raise Fail(f"idx is wrong {what}: expert {e} picked tokens {sorted(got_i[e].tolist())}, but "
                   f"its C largest affinities S[:, {e}] are at tokens {sorted(ref_i[e].tolist())}.")
    picked = np.take_along_axis(S.T, idx, axis=1)
    expect_array(f"gates {what}", gates, picked, shape_desc="(E, C)", mistakes=[
        (picked / picked.sum(axis=1, keepdims=True),
         "The gate is the affinity itself, S[idx[e, c], e]: don't renormalise an expert's C picks "
         "to sum to 1 (the router learns through these values, lesson 03)."),
        (S.T[:, :C], "S.T[:, :C] is the affinity of the first C tokens, not of the tokens each "
                     "expert picked: gather at idx, np.take_along_axis(S.T, idx, axis=1)."),
    ])
    if not np.array_equal(idx, want_idx):             # the right picks, in another order
        e = int(np.flatnonzero(np.any(idx != want_idx, axis=1))[0])
        raise Fail(f"idx has the right tokens {what}, but not best first: expert {e}'s list is "
                   f"{idx[e].tolist()}, its affinities in that order {np.round(S[idx[e], e], 3).tolist()}. "
                   f"The docstring asks for each expert's picks best first: sort -S.T (np.argpartition "
                   f"leaves the top C unordered).")


def _check_select_loose(out, S, C):
    """At the loop detector's sizes: the gates must be each expert's C largest affinities, best first."""
    if not isinstance(out, tuple) or len(out) != 2:
        raise Fail("expert_choice_select should return a pair (idx, gates), each of shape (E, C).")
    expect_array("gates", out[1], -np.sort(-S.T, axis=1)[:, :C], shape_desc="(E, C)")


@LESSON.exercise("expert_choice_select", forbid=[expert_choice_select_ref])
def expert_choice_select(fn):
    for seed, (T, E, C) in enumerate([(8, 4, 4), (1, 3, 1), (10, 5, 3), (6, 2, 6), (12, 3, 5)]):
        S = _affinities(900 + seed, T, E)
        _check_select(call(fn, S, C, name="expert_choice_select"), S, C)

    def make(T):
        return softmax(np.random.default_rng(T).standard_normal((T, 8))), T // 4
    small, big = no_token_loop(fn, "expert_choice_select", make, _check_select_loose,
                               hint="Rank every expert's column in one call, np.argsort(-S.T, axis=1)[:, :C], "
                                    "and gather the gates with np.take_along_axis.",
                               loops="a loop over tokens (or over each expert's picks)")
    return ("each expert's top-C tokens, best first, by its own column of affinities, and their gates "
            f"S[idx[e,c], e], on 5 cases (including one token and C = T); vectorised ({small} Python steps "
            f"at T = 64, {big} at T = 1024).")


# --------------------------------------------------------------------------- exercise 2
def _check_combine_backward_loose(out, dy, yg, gates, idx):
    """At the loop detector's sizes: compare with the reference (no finite differences)."""
    if not isinstance(out, tuple) or len(out) != 2:
        raise Fail("expert_choice_combine_backward should return a pair (dyg, dS).")
    want_dyg, want_dS = expert_choice_combine_backward_ref(dy, yg, gates, idx)
    expect_array("dyg", out[0], want_dyg, shape_desc="(E, C, d)")
    expect_array("dS", out[1], want_dS, shape_desc="(T, E)")


@LESSON.exercise("expert_choice_combine_backward", forbid=[expert_choice_combine_backward_ref])
def expert_choice_combine_backward(fn):
    worst = 0.0
    for seed, (T, E, C, d) in enumerate([(6, 3, 4, 2), (1, 2, 1, 3), (9, 4, 5, 2), (5, 5, 2, 1)]):
        rng = np.random.default_rng(930 + seed)
        S = _affinities(940 + seed, T, E)
        idx, gates = expert_choice_select_ref(S, C)
        yg, dy = rng.standard_normal((E, C, d)), rng.standard_normal((T, d))
        out = call(fn, dy, yg, gates, idx, name="expert_choice_combine_backward")
        if not isinstance(out, tuple) or len(out) != 2:
            raise Fail("expert_choice_combine_backward should return a pair (dyg, dS): dyg (E, C, d) "
                       "and dS (T, E).")
        dyg, dS = out
        if dS is not None and np.shape(dS) == (E, T) and E != T:
            raise Fail(f"dS has shape {np.shape(dS)} = (E, T). S is (T, E), token by expert, and a gradient "
                       f"has its array's shape: put pick (e, c)'s gradient at dS[idx[e, c], e].")
        if dS is not None and np.shape(dS) == (E, C) and (E, C) != (T, E):
            raise Fail(f"dS has shape {np.shape(dS)} = (E, C): one number per pick, the gate gradient. S is "
                       f"(T, E): scatter it, dS[idx[e, c], e] = dG[e, c], leaving 0 where nobody picked.")
        arrays = {"yg": yg.copy(), "S": S.copy()}
        num = numeric_grads(lambda: expert_choice_combine_ref(
            arrays["yg"], np.take_along_axis(arrays["S"].T, idx, axis=1), idx, T), arrays, dy)
        dy_picks = dy[idx]
        dgates = np.sum(dy_picks * yg, axis=-1)
        dS_with, dS_right = np.zeros((T, E)), np.zeros((T, E))
        dS_with[idx, np.arange(E)[:, None]] = gates * dgates
        dS_right[idx, np.arange(E)[:, None]] = dgates
        worst = max(worst, expect_grads({"yg": dyg, "S": dS}, num, names=["yg", "S"], mistakes={
            "yg": [(dy_picks, "Each pick's output was scaled by its gate in the forward pass "
                              "(y[t] += G[e,c]·yg[e,c]), so its gradient is too: dyg = G[e,c]·dy[idx[e,c]]."),
                   (-gates[..., None] * dy_picks, "Wrong sign: dyg = +G[e,c]·dy[idx[e,c]].")],
            "S": [(dS_with, "The gate's gradient is ⟨dy[idx[e,c]], yg[e,c]⟩ — how much that expert's "
                            "answer mattered. Don't multiply it by the gate itself."),
                  (-dS_right, "Wrong sign: dS[idx[e,c], e] = +⟨dy[idx[e,c]], yg[e,c]⟩.")],
        }))

    def make(T):
        rng = np.random.default_rng(T)
        idx, gates = expert_choice_select_ref(softmax(rng.standard_normal((T, 8))), T // 4)
        return rng.standard_normal((T, 3)), rng.standard_normal((8, T // 4, 3)), gates, idx
    small, big = no_token_loop(fn, "expert_choice_combine_backward", make, _check_combine_backward_loose,
                               hint="Gather dy[idx] once, an (E, C, d) block; scatter the gate gradients with "
                                    "one fancy assignment, dS[idx, np.arange(E)[:, None]] = ....",
                               loops="a loop over tokens (or over each expert's picks)")
    return (f"dyg = G·dy[idx] and dS[idx[e,c], e] = ⟨dy[idx[e,c]], yg[e,c]⟩ (0 where nobody picked) pass "
            f"the gradient check on 4 cases (worst relative error {worst:.1e}), vectorised ({small} Python "
            f"steps at T = 64, {big} at T = 1024).")


# --------------------------------------------------------------------------- exercise 3
@LESSON.exercise("bias_update", forbid=[_bias_update, bias_update_ref])
def bias_update(fn):
    cases = [(np.zeros(4), np.array([10, 2, 4, 0]), 0.01),
             (np.array([0.3, -0.2, 0.0, 0.1, -0.05]), np.array([6, 4, 5, 5, 5]), 0.1),   # two at the mean
             (np.array([1.0, -1.0]), np.array([7, 7]), 0.5),                              # balanced
             (np.array([0.2]), np.array([3]), 0.02),                                      # one expert
             (np.array([0.1, 0.0, -0.1]), np.array([3, 2, 2]), 0.05)]                     # mean 7/3: not an integer
    for bias, load, rate in cases:
        got = call(fn, bias, load, rate, name="bias_update")
        want = bias_update_ref(bias, load, rate)
        m = load.mean()
        expect_array(f"the new bias for load {load.tolist()}", got, want, shape_desc="(E,)", mistakes=[
            (bias + rate * np.sign(load - m),
             "Upside down: an overworked specialist (load above the mean) must become *less* attractive, "
             "so its bias goes down: b + γ·sign(mean − load)."),
            (bias + rate * (m - load), "Use the sign of the error, not its size: every nudge is exactly ±γ "
                                       "(Wang et al. 2024), so one very busy step cannot throw the bias far."),
            (bias + rate * (m - load) / m, "Use the sign of the error, not its (relative) size: each nudge "
                                           "is exactly ±γ."),
            (bias + np.where(load > m, -rate, rate),
             "An expert exactly at the mean load needs no nudge: np.sign(0) = 0 leaves it alone."),
            (rate * np.sign(m - load), "Return the new bias, b + Δ, not the nudge Δ alone."),
            (bias - rate * np.sign(m - load), "Upside down: b + γ·sign(mean − load) lifts an idle expert."),
            (bias + rate * np.sign(load.sum() // load.size - load),
             "The mean load is not always a whole number: load.sum() // E floors it (here 7 // 3 = 2, not "
             "2.33), so experts just under the mean look exactly at it. Use load.mean() (or / E)."),
        ])
    return ("b + γ·sign(mean load − load): the busy specialists' bias goes down, the idle ones' up, "
            "one at the mean stays put (5 cases, one with a mean load that is not a whole number).")


# --------------------------------------------------------------------------- exercise 4
def _report_cases():
    """(idx, kept, E): token choice with turned-away referrals, expert choice, a single token."""
    rng = np.random.default_rng(960)
    idx = np.array([[0, 1], [0, 2], [0, 1], [0, 3], [1, 0], [2, 0], [0, 1]])
    kept = np.array([[1, 1], [1, 1], [1, 1], [0, 1], [1, 0], [1, 0], [0, 0]], dtype=bool)
    S = _affinities(961, 9, 3)
    ec_idx, _ = expert_choice_select_ref(S, 4)
    ec_kept = np.zeros((9, 3), dtype=bool)
    ec_kept[ec_idx, np.arange(3)[:, None]] = True
    tc = np.argsort(-rng.standard_normal((12, 5)), axis=1)[:, :2]
    tc_kept = rng.random((12, 2)) > 0.3
    idle_last = np.array([[0, 1], [1, 0], [0, 2], [2, 1]])          # expert 3 never asked
    return [(idx, kept, 4), (np.broadcast_to(np.arange(3), (9, 3)), ec_kept, 3), (tc, tc_kept, 5),
            (np.array([[2]]), np.array([[True]]), 3), (idle_last, np.ones((4, 2), dtype=bool), 4)]


@LESSON.exercise("routing_report", forbid=[routing_report_ref])
def routing_report(fn):
    for idx, kept, E in _report_cases():
        out = call(fn, idx, kept, E, name="routing_report")
        if not isinstance(out, tuple) or len(out) != 3:
            raise Fail("routing_report should return three things: (load, cv, unserved).")
        load, cv, unserved = out
        want_load, want_cv, want_unserved = routing_report_ref(idx, kept, E)
        asked = np.bincount(idx.reshape(-1), minlength=E)
        what = f"for idx of shape {idx.shape} and E={E}"
        if np.ndim(load) == 1 and 0 < np.size(load) < E:
            raise Fail(f"load has {np.size(load)} entries {what}, expected E = {E}: the last expert(s) "
                       f"served nobody, and np.bincount stops at the largest expert it sees. Pass "
                       f"minlength=n_experts, so an idle expert counts as 0.")
        expect_array(f"load {what}", load, want_load, shape_desc="(E,)", mistakes=[
            (asked, "Count only the kept assignments, np.bincount(idx[kept], minlength=E): a referral "
                    "that was turned away never reached the specialist."),
            (np.bincount(idx[kept], minlength=E)[:E] / max(kept.sum(), 1),
             "Return the counts themselves, not shares."),
        ])
        expect_number(f"cv {what}", cv, want_cv, rtol=1e-8, mistakes=[
            (want_cv ** 2, "That is CV², lesson 05's loss. The report uses the CV itself, std / mean."),
            (asked.std() / asked.mean(), "Take the CV of the kept load (what the experts actually did), "
                                         "not of the referrals asked for."),
            (want_load.std(ddof=1) / want_load.mean() if E > 1 else np.nan,
             "Use the population std (np.std's default, ddof=0): the E experts are all of them."),
            (want_load.var() / want_load.mean(), "CV = std / mean, not var / mean."),
        ])
        expect_number(f"unserved {what}", unserved, want_unserved, mistakes=[
            (np.sum(~kept), "That counts referrals turned away. A patient with two referrals, one turned "
                            "away, is still seen: count tokens with *no* kept assignment, ~kept.any(axis=1)."),
            (np.sum(~kept.all(axis=1)), "That counts tokens that lost *at least one* referral. Unserved "
                                        "means none was kept: ~kept.any(axis=1)."),
            (np.sum(kept.any(axis=1)), "That counts the tokens that *were* served; we want the others."),
        ])
    def make(T):
        rng = np.random.default_rng(T)
        return np.argsort(-rng.standard_normal((T, 6)), axis=1)[:, :2], rng.random((T, 2)) > 0.2, 6

    def check(out, idx, kept, E):
        if not isinstance(out, tuple) or len(out) != 3:
            raise Fail("routing_report should return three things: (load, cv, unserved).")
        want = routing_report_ref(idx, kept, E)
        expect_array("load", out[0], want[0], shape_desc="(E,)")
        expect_number("unserved", out[2], want[2])
    small, big = no_token_loop(fn, "routing_report", make, check,
                               hint="np.bincount(idx[kept], minlength=E) counts every kept assignment at once; "
                                    "~kept.any(axis=1) marks the patients nobody saw.")
    return ("load (kept assignments), load CV (std/mean) and unserved tokens (no assignment kept) are right "
            f"for token choice with dropping, expert choice and a single token; vectorised ({small} Python "
            f"steps at T = 64, {big} at T = 1024).")


# --------------------------------------------------------------------------- exercise 5
def _count_tables():
    rng = np.random.default_rng(970)
    syntax = rng.integers(0, 5, (4, 6)) + np.array([[60, 0, 0, 0, 0, 0], [0, 40, 30, 0, 0, 0],
                                                    [0, 0, 0, 50, 0, 0], [0, 0, 0, 0, 45, 35]])
    independent = np.outer([30, 10, 20], [5, 1, 4, 2]) * 3          # I = 0 exactly
    sparse = np.array([[12, 0, 0], [0, 7, 3], [0, 0, 0], [1, 0, 9]])  # zero cells and an idle expert
    return [syntax, independent, sparse, np.array([[5, 2, 0, 1]])]


def _normalised_by(counts, axis):
    """The MI formula applied to counts normalised along one axis only (the typical slip)."""
    n = np.asarray(counts, dtype=np.float64)
    sums = n.sum(axis=axis, keepdims=True)
    p = np.divide(n, sums, out=np.zeros_like(n), where=sums > 0)
    outer = p.sum(axis=1, keepdims=True) * p.sum(axis=0, keepdims=True)
    nz = p > 0
    return float(np.sum(p[nz] * np.log(p[nz] / outer[nz])))


@LESSON.exercise("mutual_information", forbid=[mutual_information_ref])
def mutual_information(fn):
    for counts in _count_tables():
        got = call(fn, counts, name="mutual_information")
        want = mutual_information_ref(counts)
        p = counts / counts.sum()
        pe = p.sum(1, keepdims=True)
        nz = p > 0
        with np.errstate(all="ignore"):
            cond = p / pe
            h_k_given_e = float(-np.sum(p[nz] * np.log(cond[nz])))
            n = counts.astype(float)
            outer_n = n.sum(1, keepdims=True) * n.sum(0, keepdims=True)
            unnorm = float(np.sum(n[nz] * np.log(n[nz] / outer_n[nz])))       # counts used as probabilities
        try:
            is_nan = bool(np.isnan(float(got)))
        except (TypeError, ValueError):
            is_nan = False                                  # not a number: expect_number says so
        if is_nan and np.any(counts == 0):
            raise Fail("mutual_information is NaN on a table with empty cells: 0 · log 0 counts as 0. "
                       "Sum only over the cells with p(e, k) > 0 (a boolean mask).")
        expect_number(f"I(expert; label) for a {counts.shape} table", got, want, rtol=1e-7, atol=1e-10,
                      mistakes=[
            (want / np.log(2), "That is in bits (log2). minimoe measures information in nats: use np.log."),
            (h_k_given_e, "That is H(label | expert), the uncertainty that *remains* once you know the "
                          "expert. I = H(label) − H(label | expert) = Σ p(e,k) log[p(e,k) / (p(e) p(k))]."),
            (-h_k_given_e, "Divide by both marginals: log[p(e,k) / (p(e) p(k))], not log p(k | e)."),
            (unnorm, "Turn the counts into probabilities first: p(e, k) = counts / counts.sum()."),
            (_normalised_by(counts, 1), "You normalised each row (each expert's counts sum to 1): that is "
                                        "p(label | expert), and the table's entries then add up to E, not 1. "
                                        "The joint p(e, k) divides by the whole table's total, counts.sum()."),
            (_normalised_by(counts, 0), "You normalised each column (each label's counts sum to 1): that is "
                                        "p(expert | label), not the joint. Divide by the whole table's total, "
                                        "counts.sum()."),
        ])
    return ("I(expert; label) in nats from a count table: right for a syntax-like table, an independent "
            "one (exactly 0), one with empty cells and an idle expert, and a single expert (0).")
