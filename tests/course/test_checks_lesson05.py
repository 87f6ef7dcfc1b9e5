"""Lesson 05's graders: a blank exercise fails clearly, an independently written right answer
passes, each typical mistake gets its targeted hint, a crash is a verdict — and the graders'
reference functions agree with minimoe's losses and with brute force."""
import math

import numpy as np
import pytest

from grader_cases import GraderContract, assert_fail, calling
from minimoe import losses, router
from minimoe.course.checks import lesson05


# ----------------------------------------------------------------------------- independent answers
def cdf(z):
    return 0.5 * np.vectorize(math.erfc)(-np.asarray(z) / math.sqrt(2))


def pdf(z):
    return np.exp(-0.5 * np.asarray(z) ** 2) / math.sqrt(2 * math.pi)


def imp_loss(G, root=False, ddof=0, mean_sq=True, axis=0, count=False):
    v = (G > 0).sum(axis=axis) if count else G.sum(axis=axis)
    var = np.var(v, ddof=ddof)
    if root:
        return np.sqrt(var) / v.mean()
    return var / (v.mean() ** 2 if mean_sq else v.mean())


def imp_back(G, mean_const=False, factor=2.0, per_expert=False, over_T=False):
    v = G.sum(axis=0)
    E, m = v.size, v.mean()
    if mean_const:
        d = 2 * (v - m) / (E * m**2)
    else:
        u = v / m
        d = factor / (E * m) * (u - np.mean(u**2))
    if over_T:
        d = d / G.shape[0]
    return d if per_expert else np.tile(d, (G.shape[0], 1))


def threshold(H, k, self_incl=False, always_k1=False):
    """Brute force: the k-th largest of the *other* experts, one (t, e) at a time."""
    T, E = H.shape
    thr = np.empty((T, E))
    who = np.empty((T, E), dtype=int)
    for t in range(T):
        for e in range(E):
            others = [j for j in range(E) if self_incl or j != e]
            ranked = sorted(others, key=lambda j: -H[t, j])
            pick = ranked[k] if always_k1 else ranked[k - 1]
            thr[t, e], who[t, e] = H[t, pick], pick
    return thr, who


def threshold_vec(H, k):
    """The same thresholds without a loop over tokens: rank every row once."""
    T, E = H.shape
    ranked = np.argsort(-H, axis=1, kind="stable")
    rank = np.argsort(ranked, axis=1)                       # each expert's place in its row, 0 = best
    pick = np.where(rank < k, ranked[:, [k]], ranked[:, [k - 1]])
    return np.take_along_axis(H, pick, axis=1), pick


def cdf_vec(z):
    from minimoe.core.normal import normal_cdf             # Φ without np.vectorize (design.md §2)
    return normal_cdf(np.asarray(z, dtype=float))


def load_P_vec(L, H, s, k):
    return cdf_vec((L - threshold_vec(H, k)[0]) / s)


def load_back_vec(dP, L, H, s, k):
    thr, who = threshold_vec(H, k)
    z = (L - thr) / s
    dz = dP * pdf(z)
    dH = np.zeros_like(H)
    np.add.at(dH, (np.broadcast_to(np.arange(H.shape[0])[:, None], who.shape), who), -dz / s)
    return dz / s, dH, -dz * z / s


def load_P(L, H, s, k, numer=None, use_sigma=True, fn=cdf, **kw):
    thr, _ = threshold(H, k, **kw)
    num = (L if numer is None else numer) - thr
    return fn(num / s if use_sigma else num)


def load_back(dP, L, H, s, k, dH_mode="right", phi=pdf, div_sigma=True, dsig="right", buffered=False):
    thr, who = threshold(H, k)
    z = (L - thr) / s
    dz = dP * phi(z)
    dL = dz / s if div_sigma else dz
    dz_s = dz / s
    dH = np.zeros_like(H)
    if dH_mode == "right":
        for t in range(H.shape[0]):
            for e in range(H.shape[1]):
                dH[t, who[t, e]] -= dz_s[t, e]
    elif dH_mode == "own":
        dH = -dz_s
    if buffered:                                    # the plain fancy-index update: repeated indices lose writes
        dH = np.zeros_like(H)
        dH[np.arange(H.shape[0])[:, None].repeat(H.shape[1], 1), who] -= dz_s
    dS = {"right": -dz * z / s, "sign": dz * z / s, "noL": -dz / s**2}[dsig]
    return dL, dH, dS


def sw(probs, first, E_factor=True, P_sum=False, P_as_f=False, grad="right", row=False, counted=False,
       minlength=True):
    T, E = probs.shape
    f = np.bincount(first, minlength=E if minlength else 0) / (1 if counted else T)
    P = probs.sum(0) if P_sum else probs.mean(0)
    loss = (P @ P if P_as_f else f @ P) * (E if E_factor else 1)
    g = {"right": E * f / T, "noT": E * f, "withf": E * (f + probs.mean(0)) / T, "wrt_f": E * probs.mean(0) / T}[grad]
    return loss, (g if row else np.tile(g, (T, 1)))


# (grader, right answer, [(typical mistake, fragment of its hint), ...])
CASES = [
    (lesson05.importance_loss, imp_loss, [
        (lambda G: imp_loss(G, root=True), "*square*"),
        (lambda G: imp_loss(G, ddof=1), "population variance"),
        (lambda G: imp_loss(G, mean_sq=False), "*square* of the mean"),
        (lambda G: imp_loss(G, count=True), "*load*"),
        (lambda G: imp_loss(G, axis=1), "axis=0"),
    ]),
    (lesson05.importance_loss_backward, imp_back, [
        (lambda G: imp_back(G, mean_const=True), "treated the mean as a constant"),
        (lambda G: imp_back(G, factor=1.0), "factor of 2"),
        (lambda G: imp_back(G, per_expert=True), "broadcast it"),
        (lambda G: imp_back(G, over_T=True), "Don't divide by T"),
    ]),
    (lesson05.smooth_load, load_P_vec, [
        (lambda L, H, s, k: load_P(L, H, s, k, self_incl=True), "(k+1)-th largest"),
        (lambda L, H, s, k: load_P(L, H, s, k, numer=H), "clean score L"),
        (lambda L, H, s, k: load_P(L, H, s, k, use_sigma=False), "Divide by σ"),
        (lambda L, H, s, k: load_P(L, H, s, k, fn=pdf), "density φ"),
        (lambda L, H, s, k: 1 - load_P(L, H, s, k), "Upside down"),
        (lambda L, H, s, k: load_P(L, H, s, k, self_incl=True, always_k1=True), "only for experts in the top k"),
    ]),
    (lesson05.smooth_load_backward, load_back_vec, [
        (lambda *a: load_back(*a, dH_mode="zero"), "*noisy* score"),
        (lambda *a: load_back(*a, dH_mode="own"), "not at e's own"),
        (lambda *a: load_back(*a, phi=cdf), "Wrong gradients for L, H and sigma. Φ' is the density"),
        (lambda *a: load_back(*a, div_sigma=False), "dL = dz/σ"),
        (lambda *a: load_back(*a, dsig="sign"), "Wrong sign"),
        (lambda *a: load_back(*a, dsig="noL"), "dropped (L − thr)"),
        (lambda *a: load_back(*a)[:2], "three arrays"),
        (lambda *a: load_back(*a, buffered=True), "np.add.at"),
    ]),
    (lesson05.switch_loss, sw, [
        (lambda p, f: sw(p, f, E_factor=False), "Multiply by E"),
        (lambda p, f: sw(p, f, P_sum=True), "*mean* router probability over tokens (not the sum)"),
        (lambda p, f: sw(p, f, P_as_f=True), "*first choice*"),
        (lambda p, f: sw(p, f, grad="noT"), "1/T"),
        (lambda p, f: sw(p, f, grad="withf"), "carries no gradient"),
        (lambda p, f: sw(p, f, grad="wrt_f"), "instead of P"),
        (lambda p, f: sw(p, f, row=True), "one row per token"),
        (lambda p, f: sw(p, f, counted=True), "*fraction* of the tokens"),
        (lambda p, f: sw(p, f, minlength=False), "minlength=E"),
    ]),
]


def _back_via_minimoe(dP, L, H, s, k):
    _, cache = losses.load_loss_forward(L, H, s, k)
    losses.load_loss_backward(1.0, cache)
    return load_back_vec(dP, L, H, s, k)


def sw_all(probs, first, k=2, over_k=False):
    """Mixtral's (or, over k, Megatron-core's) count: every one of each token's k choices."""
    T, E = probs.shape
    top = np.argsort(-probs, axis=1)[:, :k]
    f = np.bincount(top.ravel(), minlength=E) / T / (k if over_k else 1)
    return E * f @ probs.mean(0), np.tile(E * f / T, (T, 1))


def sw_P_by_token(probs, first):
    """P averaged over the experts (axis=1) instead of over the tokens."""
    T, E = probs.shape
    f = np.bincount(first, minlength=E) / T
    return E * np.dot(f, probs.mean(axis=1)), np.tile(E * f / T, (T, 1))


def imp_loss_loop(G):
    v = np.zeros(G.shape[1])
    for row in G:                                       # one token at a time
        v = v + row
    return np.var(v) / v.mean() ** 2


def imp_back_loop(G):
    out = np.zeros_like(G)
    d = imp_back(G)[0]
    for t in range(G.shape[0]):                         # one token at a time
        out[t] = d
    return out


def load_P_loop(L, H, s, k):
    return load_P(L, H, s, k, fn=cdf_vec)               # the brute-force thresholds: a loop over (t, e)


def load_back_loop(dP, L, H, s, k):
    dL, _, dS = load_back_vec(dP, L, H, s, k)
    thr, who = threshold_vec(H, k)
    dz_s = dP * pdf((L - thr) / s) / s
    dH = np.zeros_like(H)
    for t in range(H.shape[0]):                         # the scatter, one token at a time
        np.add.at(dH[t], who[t], -dz_s[t])
    return dL, dH, dS


def sw_loop(probs, first):
    T, E = probs.shape
    f = np.zeros(E)
    for e in first:                                     # counting one token at a time
        f[e] += 1.0 / T
    return E * f @ probs.mean(0), np.tile(E * f / T, (T, 1))


class TestGraders(GraderContract):
    LESSONS = (lesson05.LESSON,)
    CASES = CASES
    RULE_BREAKING = {
        "switch_loss": [(sw_loop, "grows with the number of tokens")],
        "importance_loss": [
            (imp_loss_loop, "grows with the number of tokens"),
            (lambda G: calling(lambda g: losses.importance_loss_forward(
                np.ones((G.shape[0], 1)), np.zeros((G.shape[0], 1), int), G.shape[1]), imp_loss)(G),
             "you called `minimoe.core.losses.importance_loss_forward`")],
        "importance_loss_backward": [
            (imp_back_loop, "grows with the number of tokens"),
            (lambda G: calling(lambda g: losses.cv_squared_backward(1.0, losses.cv_squared_forward(g.sum(0))[1]),
                               imp_back)(G), "you called `minimoe.core.losses.cv_squared_"),
            (lambda G: calling(lambda g: losses.importance_loss_backward(1.0, losses.importance_loss_forward(
                np.ones((g.shape[0], 1)), np.zeros((g.shape[0], 1), int), g.shape[1])[1]), imp_back)(G),
             "you called `minimoe.core.losses.importance_loss_"),
        ],
        "smooth_load": [
            (load_P_loop, "grows with the number of tokens"),
            (lambda L, H, s, k: calling(lambda *a: lesson05.threshold_ref(H, k), load_P)(L, H, s, k),
             "you called `minimoe.course.checks.lesson05.threshold_ref`"),
            (lambda L, H, s, k: lesson05.smooth_load_ref(L, H, s, k),
             "you called `minimoe.course.checks.lesson05.smooth_load_ref`")],
        "smooth_load_backward": [
            (load_back_loop, "grows with the number of tokens"),
            (_back_via_minimoe, "you called `minimoe.core.losses.load_loss_"),
            (lambda dP, L, H, s, k: calling(lambda *a: lesson05.smooth_load_ref(L, H, s, k), load_back)(
                dP, L, H, s, k), "you called `minimoe.course.checks.lesson05.smooth_load_ref`")],
    }


def test_an_input_changed_in_place_is_caught():
    def sneaky(G):
        G /= G.sum()
        return imp_loss(G)
    assert_fail(lesson05.importance_loss(sneaky), "in place")


# ----------------------------------------------------------------------------- the references
@pytest.mark.parametrize("T,E,k", [(6, 4, 2), (1, 5, 1), (9, 6, 3), (5, 3, 2)])
def test_threshold_and_smooth_load_match_brute_force_and_minimoe(T, E, k):
    L, H, s = lesson05.load_inputs(7, T, E)
    thr, who = lesson05.threshold_ref(H, k)
    bthr, bwho = threshold(H, k)
    np.testing.assert_array_equal(who, bwho)
    np.testing.assert_array_equal(thr, bthr)
    P = lesson05.smooth_load_ref(L, H, s, k)
    np.testing.assert_allclose(P, cdf((L - bthr) / s), rtol=1e-13, atol=1e-15)
    # minimoe's load loss sums exactly these probabilities over tokens
    _, cache = losses.load_loss_forward(L, H, s, k)
    np.testing.assert_allclose(cache.load, P.sum(axis=0), rtol=1e-12)


def test_importance_and_switch_references_match_minimoe_on_compact_gates():
    H = lesson05.scores(3, 7, 5)
    routing, _ = router.topk_gate_forward(H, 2)
    G = lesson05.topk_gate_ref(H, 2)
    want, _ = losses.importance_loss_forward(routing.gates, routing.idx, 5)
    assert lesson05.importance_loss_ref(G) == pytest.approx(want, rel=1e-12)
    assert lesson05.importance_loss_ref(G) == pytest.approx(imp_loss(G), rel=1e-12)
    p = routing.probs
    loss, d = lesson05.switch_loss_ref(p, routing.idx[:, 0])
    wl, wd = sw(p, routing.idx[:, 0])
    assert loss == pytest.approx(wl, rel=1e-12)
    np.testing.assert_allclose(d, wd, rtol=1e-12)
    # perfect balance: exactly 1
    assert lesson05.switch_loss_ref(np.full((4, 4), 0.25), np.arange(4))[0] == pytest.approx(1.0)


# ----------------------------------------------------------------------------- issue 22
def test_switch_loss_counting_every_choice_is_named():
    assert_fail(lesson05.switch_loss(sw_all), "every choice", "Mixtral", "first choices only")
    assert_fail(lesson05.switch_loss(lambda p, f: sw_all(p, f, over_k=True)), "Megatron", "first choices only")


def test_switch_loss_with_P_averaged_over_the_experts_is_named():
    assert_fail(lesson05.switch_loss(sw_P_by_token), "axis=0", "mean over the tokens")


def test_vectorised_right_answers_agree_with_brute_force():
    for seed, (T, E, k) in enumerate([(6, 4, 2), (9, 6, 3), (1, 5, 1)]):
        L, H, s = lesson05.load_inputs(seed, T, E)
        np.testing.assert_allclose(load_P_vec(L, H, s, k), load_P(L, H, s, k), rtol=1e-12)
        dP = np.random.default_rng(seed).standard_normal((T, E))
        for a, b in zip(load_back_vec(dP, L, H, s, k), load_back(dP, L, H, s, k)):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)
