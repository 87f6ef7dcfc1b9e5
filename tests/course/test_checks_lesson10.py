"""Graders of lesson 10, *The bug hunt*: each passes the learner's right check + fix, fails a
blank, fails the buggy code handed in as the fix, fails a check that lets the bug through,
and gives its targeted hint for a typical mistake. The right answers here are written
independently of minimoe/course/checks/lesson10.py and of the lesson's solution."""
import numpy as np
import pytest

from grader_cases import assert_crash_or_garbage_is_a_verdict, assert_fail, assert_pass, blank
from minimoe import MoELayer
from minimoe.course import bugs
from minimoe.course.checks import lesson10


def Phi(z):
    from math import erf, sqrt
    return 0.5 * (1 + np.vectorize(erf)(np.asarray(z) / sqrt(2)))


# ----------------------------------------------------------------------------- bug 1
def simulate(clean, noisy, sigma, k, rng, n, own_noise_only=True):
    """Load by simulation; with own_noise_only=False every expert's noise is redrawn (a mistake)."""
    T, E = clean.shape
    eps = rng.standard_normal((n, T, E))
    hits = np.zeros((T, E))
    for e in range(E):          # test code: a loop over experts is fine
        others = noisy if own_noise_only else clean + eps * sigma
        mine = clean[:, e] + eps[:, :, e] * sigma[:, e]                    # (n, T)
        rivals = np.delete(np.broadcast_to(others, (n, T, E)), e, axis=2)   # (n, T, E-1)
        hits[:, e] = np.mean((rivals > mine[..., None]).sum(-1) < k, axis=0)
    return hits.sum(axis=0)


def honest(smooth_load, clean, noisy, sigma, k, rng):
    return bool(np.all(np.abs(smooth_load(clean, noisy, sigma, k) - simulate(clean, noisy, sigma, k, rng, 4000))
                       <= 0.15))


def redraws_everything(smooth_load, clean, noisy, sigma, k, rng):
    sim = simulate(clean, noisy, sigma, k, rng, 4000, own_noise_only=False)
    return bool(np.all(np.abs(smooth_load(clean, noisy, sigma, k) - sim) <= 0.15))


def smooth_load(clean, noisy, sigma, k, thresholds_from=None):
    """Shazeer's smooth load, written with an explicit sort per row (independent of losses.py)."""
    src = noisy if thresholds_from is None else thresholds_from
    T, E = clean.shape
    order = np.argsort(-noisy, axis=1)
    rank = np.argsort(order, axis=1)                         # rank of each expert, 0 = best
    t = np.arange(T)[:, None]
    thr = np.where(rank < k, src[t, order[:, [k]]], src[t, order[:, [k - 1]]])
    return Phi((clean - thr) / sigma).sum(axis=0)


def test_mixed_units():
    g = lesson10.mixed_units
    assert_pass(g(honest, smooth_load), lesson="10")
    assert_fail(g(blank, smooth_load), "load_is_honest is not written yet")
    assert_fail(g(honest, blank), "fixed_smooth_load is not written yet")
    assert_fail(g(honest, lesson10.buggy_smooth_load), "still the bug")
    assert_fail(g(lambda *a: True, smooth_load), "lets the buggy estimator through")
    assert_fail(g(redraws_everything, smooth_load), "Redraw only expert e's own noise")
    assert_fail(g(honest, lambda c, n, s, k: smooth_load(c, n, s, k, thresholds_from=c)), "*noisy* scores H")
    assert_fail(g(lambda *a: np.ones(3), smooth_load), "should return True")


# ----------------------------------------------------------------------------- bug 2
def gradcheck(forward, backward, probs, first):
    probs = probs.copy()
    _, cache = forward(probs, first)
    a = backward(1.0, cache)[0]
    n = np.zeros_like(probs)
    for i in np.ndindex(probs.shape):       # central differences, by hand
        old = probs[i]
        probs[i] = old + 1e-6
        fp = forward(probs, first)[0]
        probs[i] = old - 1e-6
        fm = forward(probs, first)[0]
        probs[i] = old
        n[i] = (fp - fm) / 2e-6
    return bool(np.linalg.norm(a - n) <= 1e-6 * max(np.linalg.norm(a), np.linalg.norm(n), 1e-12))


def switch_backward(dloss, cache):
    T, E = cache.shape
    return dloss * E * np.tile(cache.f, (T, 1)) / T, {}


def test_no_gradient():
    g = lesson10.no_gradient
    assert_pass(g(gradcheck, switch_backward), lesson="10")
    assert_fail(g(blank, switch_backward), "switch_loss_gradcheck is not written yet")
    assert_fail(g(gradcheck, blank), "fixed_switch_loss_backward is not written yet")
    assert_fail(g(gradcheck, bugs.bug2_switch_loss_backward), "Still zero")
    assert_fail(g(lambda *a: True, switch_backward), "lets the detached loss through")
    nonzero = lambda fwd, bwd, p, f: bool(np.any(bwd(1.0, fwd(p, f)[1])[0] != 0))   # noqa: E731
    assert_fail(g(nonzero, switch_backward), "T times too large")
    assert_fail(g(gradcheck, lambda d, c: (d * c.shape[1] * np.tile(c.f, (c.shape[0], 1)), {})), "*mean*")
    assert_fail(g(gradcheck, lambda d, c: switch_backward(1.0, c)), "upstream gradient")


# ----------------------------------------------------------------------------- bug 3
def router_learns(layer, x, rng):
    y = layer.forward(x)
    layer.backward(rng.standard_normal(y.shape))
    return all(np.abs(layer.grads[n]).max() > 0 for n in ("W_gate", "W_noise") if n in layer.grads)


def test_dead_router():
    g = lesson10.dead_router
    live = lambda d, h, E, rng: MoELayer(d, h, E, k=1, balance="switch", rng=rng)  # noqa: E731
    assert_pass(g(router_learns, live), lesson="10")
    assert_pass(g(router_learns, lambda d, h, E, rng: MoELayer(d, h, E, k=1, gate="switch", rng=rng)),
                lesson="10")
    assert_fail(g(blank, live), "router_learns is not written yet")
    assert_fail(g(router_learns, blank), "fixed_top1_layer is not written yet")
    assert_fail(g(router_learns, lambda d, h, E, rng: bugs.bug3_dead_router_layer(d, h, E, rng)),
                "still gets no gradient")
    assert_fail(g(router_learns, lambda d, h, E, rng: MoELayer(d, h, E, k=1, balance="importance", rng=rng)),
                "importance loss acts on the gates")
    assert_fail(g(router_learns, lambda d, h, E, rng: MoELayer(d, h, E, k=2, rng=rng)), "Keep k = 1")
    assert_fail(g(router_learns, lambda d, h, E, rng: "a layer"), "should return an MoELayer")
    assert_fail(g(lambda *a: True, live), "exactly 0")
    assert_fail(g(lambda *a: False, live), "does not learn, but its router gradient is non-zero")


# ----------------------------------------------------------------------------- bug 4
def deterministic(predict):
    first = np.array(predict())                     # a copy: predict may hand back the same array
    return all(np.array_equal(first, np.asarray(predict())) for _ in range(2))


def logits(x, W_gate, W_noise, *, rng, train, scale=1.0, eval_noise=False):
    H = x @ W_gate
    if train or eval_noise:
        H = H + scale * rng.standard_normal(H.shape) * np.logaddexp(0, x @ W_noise)
    return H


def test_noisy_eval():
    g = lesson10.noisy_eval
    assert_pass(g(deterministic, logits), lesson="10")
    assert_fail(g(blank, logits), "eval_is_deterministic is not written yet")
    assert_fail(g(deterministic, blank), "fixed_router_logits_forward is not written yet")
    assert_fail(g(deterministic, lambda *a, **k: logits(*a, **k, eval_noise=True)), "still adds noise in eval")
    assert_fail(g(deterministic, lambda x, Wg, Wn, *, rng, train: x @ Wg), "must still explore")
    assert_fail(g(deterministic, lambda *a, **k: logits(*a, **k, scale=10.0)), "standard deviation")
    assert_fail(g(lambda predict: predict() is not None, logits), "passes a layer whose eval output changes")
    assert_fail(g(lambda predict: False, logits), "rejects minimoe's MoELayer")


# ----------------------------------------------------------------------------- bug 5
def sum_is_constant(forward, backward, p, idx):
    g, cache = forward(p, idx)
    return bool(np.max(np.abs(backward(np.ones_like(g), cache)[0])) < 1e-9)


def renorm_backward(dg, cache):
    g, s, idx, shape = cache
    dp = np.zeros(shape)
    for j in range(idx.shape[1]):           # one column of choices at a time
        dp[np.arange(shape[0]), idx[:, j]] = (dg[:, j] - (dg * g).sum(axis=1)) / s[:, 0]
    return dp, {}


def test_detached_sum():
    g = lesson10.detached_sum
    assert_pass(g(sum_is_constant, renorm_backward), lesson="10")
    assert_fail(g(blank, renorm_backward), "gates_sum_is_constant is not written yet")
    assert_fail(g(sum_is_constant, blank), "fixed_renormalize_backward is not written yet")
    assert_fail(g(sum_is_constant, bugs.bug5_renormalize_backward), "still the detached sum")
    assert_fail(g(sum_is_constant, lambda dg, c: (renorm_backward(dg, c)[0] * c[1].max(), {})),
                "off by a constant factor")
    assert_fail(g(lambda *a: True, renorm_backward), "lets the detached-sum backward through")
    assert_fail(g(lambda *a: False, renorm_backward), "rejects minimoe's renormalization")


@pytest.mark.parametrize("grader", list(lesson10.LESSON.exercises.values()), ids=list(lesson10.LESSON.exercises))
def test_crash_or_garbage_is_a_verdict_not_an_exception(grader):
    assert_crash_or_garbage_is_a_verdict(lambda answer: grader(answer, answer))   # both the check and the fix


def test_lesson_has_seven_exercises_in_order():
    assert list(lesson10.LESSON.exercises) == ["mixed_units", "no_gradient", "dead_router", "noisy_eval",
                                               "detached_sum", "constant_loss", "pooled_layers"]


# ----------------------------------------------------------------------------- the lesson's own solutions
@pytest.fixture(scope="module")
def solution():
    """The exercise functions of the solution build of lessons/src/10_the_bug_hunt.py (the import
    cell and the exercise cells only: defining them runs nothing)."""
    import re
    from pathlib import Path

    from minimoe.course.checks import build
    src = (Path(__file__).resolve().parents[2] / "lessons" / "src" / "10_the_bug_hunt.py").read_text("utf-8")
    cells = re.split(r"^# %%(.*)$", src, flags=re.M)        # jupytext percent format, without jupytext
    code = [body for head, body in zip(cells[1::2], cells[2::2]) if "[markdown]" not in head]
    ns = {}
    exec(code[0], ns)                                        # imports and show()
    for text in code:
        if build.BEGIN in text:
            exec(text, ns)
    return ns


def test_solution_checks_catch_each_bug_and_pass_minimoe(solution):
    from minimoe import losses, router
    L, H, s = lesson10.load_fixture(0)
    rng = lambda: np.random.default_rng(0)  # noqa: E731
    assert not solution["load_is_honest"](lesson10.buggy_smooth_load, L, H, s, 2, rng())
    assert solution["load_is_honest"](lesson10.minimoe_smooth_load, L, H, s, 2, rng())
    p, first = lesson10._switch_fixture(0)
    check2 = solution["switch_loss_gradcheck"]
    assert not check2(bugs.bug2_switch_loss_forward, bugs.bug2_switch_loss_backward, p, first)
    assert check2(losses.switch_loss_forward, losses.switch_loss_backward, p, first)
    x = np.random.default_rng(1).standard_normal((16, 6))
    assert not solution["router_learns"](bugs.bug3_dead_router_layer(6, 8, 4, rng()), x, rng())
    assert solution["router_learns"](MoELayer(6, 8, 4, k=1, gate="switch", rng=rng()), x, rng())
    bad, good = bugs.NoisyEvalMoE(6, 8, 4, rng=rng()), MoELayer(6, 8, 4, rng=rng())
    assert not solution["eval_is_deterministic"](lambda: bad.forward(x, train=False))
    assert solution["eval_is_deterministic"](lambda: good.forward(x, train=False))
    p5, idx = lesson10._renorm_fixture(0, 6, 4, 2)
    check5 = solution["gates_sum_is_constant"]
    assert not check5(bugs.bug5_renormalize_forward, bugs.bug5_renormalize_backward, p5, idx)
    assert check5(router.renormalize_forward, router.renormalize_backward, p5, idx)
    for k in (1, 2):
        assert not solution["loss_is_alive"](bugs.bug6_mixtral_loss, k)
        assert solution["loss_is_alive"](bugs.mixtral_layer_loss, k)
        assert not solution["layers_seen_apart"](bugs.bug7_model_balance_loss, k)
        assert solution["layers_seen_apart"](bugs.model_balance_loss, k)
        logits = np.random.default_rng(k).standard_normal((10, 5))
        assert solution["fixed_mixtral_loss"](logits, k) == pytest.approx(mixtral(logits, k), rel=1e-12)
        assert mixtral_vec(logits, k) == pytest.approx(mixtral(logits, k), rel=1e-12)
        assert solution["fixed_model_loss"]([logits, -logits], k) == pytest.approx(
            mixtral(logits, k) + mixtral(-logits, k), rel=1e-12)


def test_solution_fixes_pass_the_reference_checks_of_minimoe_bugs(solution):
    from types import SimpleNamespace

    from minimoe import router
    L, H, s = lesson10.load_fixture(1)
    as_forward = lambda *a: (None, SimpleNamespace(load=solution["fixed_smooth_load"](*a)))  # noqa: E731
    assert bugs.load_matches_sampling(as_forward, L, H, s, 2, np.random.default_rng(0))
    p, first = lesson10._switch_fixture(1)
    assert bugs.gradient_matches_finite_differences(
        bugs.bug2_switch_loss_forward, solution["fixed_switch_loss_backward"], p, kwargs={"first_choice": first})
    x = np.random.default_rng(1).standard_normal((16, 6))
    layer = solution["fixed_top1_layer"](6, 8, 4, np.random.default_rng(0))
    assert layer.k == 1 and bugs.router_gradient_is_nonzero(layer, x)
    Wg, Wn = np.random.default_rng(2).standard_normal((2, 6, 4))
    gen = np.random.default_rng(3)
    fixed4 = solution["fixed_router_logits_forward"]
    assert bugs.eval_is_deterministic(lambda: fixed4(x, Wg, Wn, rng=gen, train=False))
    assert not bugs.eval_is_deterministic(lambda: fixed4(x, Wg, Wn, rng=gen, train=True))
    for k in (1, 2, 3):
        p5, idx = lesson10._renorm_fixture(k, 6, 4, k)
        fixed5 = solution["fixed_renormalize_backward"]
        assert bugs.gates_sum_has_zero_gradient(bugs.bug5_renormalize_forward, fixed5, p5, idx)
        assert bugs.gradient_matches_finite_differences(bugs.bug5_renormalize_forward, fixed5, p5,
                                                        kwargs={"idx": idx})


# ----------------------------------------------------------------------------- near misses and rule-breaking answers
def _scaled(fix, factor):
    """A fix whose numbers are off by a relative ``factor - 1``: a near miss."""
    def near(*a, **k):
        out = fix(*a, **k)
        return (out[0] * factor, out[1]) if isinstance(out, tuple) else out * factor
    return near


@pytest.mark.parametrize("rel", [1e-3, 1e-6])
def test_near_misses_of_each_fix_fail(rel):
    f = 1 + rel
    assert_fail(lesson10.mixed_units(honest, _scaled(smooth_load, f)))
    assert_fail(lesson10.no_gradient(gradcheck, _scaled(switch_backward, f)))
    assert_fail(lesson10.detached_sum(sum_is_constant, _scaled(renorm_backward, f)))
    assert_fail(lesson10.noisy_eval(deterministic, lambda *a, **k: logits(*a, **k) * f))


def test_allclose_where_exactly_equal_is_asked_fails():
    assert_fail(lesson10.noisy_eval(lambda predict: bool(np.allclose(predict(), predict())), logits),
                "*exactly* equal", "np.array_equal")


def test_the_quotient_rule_with_its_sign_flipped_is_named():
    def plus(dg, cache):
        g, s, idx, shape = cache
        dp = np.zeros(shape)
        dp[np.arange(shape[0])[:, None], idx] = (dg + (dg * g).sum(axis=1, keepdims=True)) / s
        return dp, {}
    assert_fail(lesson10.detached_sum(sum_is_constant, plus), "Sign flip", "subtracted")


@pytest.mark.parametrize("wrong, fragment", [
    (lambda x, Wg, Wn, *, rng, train: x @ Wg + (rng.standard_normal((x.shape[0], Wg.shape[1])) if train else 0),
     "ε alone"),
    (lambda x, Wg, Wn, *, rng, train: x @ Wg + (rng.standard_normal((x.shape[0], Wg.shape[1])) * (x @ Wn)
                                                if train else 0), "can be negative"),
    (lambda x, Wg, Wn, *, rng, train: x @ Wg + (rng.standard_normal((x.shape[0], Wg.shape[1]))
                                                / np.logaddexp(0, x @ Wn) if train else 0), "you divided ε"),
])
def test_the_noise_mistakes_are_named_not_a_bare_standard_deviation(wrong, fragment):
    res = lesson10.noisy_eval(deterministic, wrong)
    assert_fail(res, fragment)
    assert "yours divided by" not in res.message


def test_a_fix_that_calls_minimoes_own_version_fails():
    from minimoe import losses, router
    res = lesson10.mixed_units(honest, lambda c, n, s, k: losses.load_loss_forward(c, n, s, k)[1].load)
    assert_fail(res, "you called `minimoe.core.losses.load_loss_forward`", "write it yourself")

    def switch_by_minimoe(dloss, cache):
        try:
            losses.switch_loss_backward(dloss, cache)
        except Exception:
            pass
        return switch_backward(dloss, cache)
    assert_fail(lesson10.no_gradient(gradcheck, switch_by_minimoe), "minimoe.core.losses.switch_loss_backward")
    res = lesson10.noisy_eval(deterministic, lambda x, Wg, Wn, *, rng, train:
                              router.router_logits_forward(x, Wg, Wn, rng=rng, train=train)[0])
    assert_fail(res, "you called `minimoe.core.router.router_logits_forward`")
    assert_fail(lesson10.detached_sum(sum_is_constant, router.renormalize_backward),
                "you called `minimoe.core.router.renormalize_backward`")


def test_the_checks_may_still_run_minimoe_code_they_are_handed():
    """Only the fixes are forbidden to call minimoe's version: each check is *given* minimoe's
    functions (and the buggy ones) to judge, and calling them is its job."""
    assert_pass(lesson10.detached_sum(sum_is_constant, renorm_backward), lesson="10")
    assert_pass(lesson10.no_gradient(gradcheck, switch_backward), lesson="10")


# ----------------------------------------------------------------------------- bugs 6 and 7
def mixtral(logits, k, first_only=False, per_slot=False):
    """Mixtral's loss one token at a time (independent of minimoe): E Σ f P, f over all k choices."""
    T, E = logits.shape
    f, P = np.zeros(E), np.zeros(E)
    for t in range(T):                                   # test code: a loop over tokens is fine
        z = np.exp(logits[t] - logits[t].max())
        P += z / z.sum() / T
        chosen = np.argsort(-logits[t])[:1 if first_only else k]
        f[chosen] += 1.0 / T / (k if per_slot else 1)
    return float(E * f @ P)


def mixtral_vec(logits, k, first_only=False, per_slot=False):
    """The same loss without the loop over tokens (a fix must not loop over tokens)."""
    T, E = logits.shape
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    P = (z / z.sum(axis=1, keepdims=True)).mean(axis=0)
    chosen = np.argsort(-logits, axis=1)[:, :1 if first_only else k]
    f = np.bincount(chosen.ravel(), minlength=E) / T / (k if per_slot else 1)
    return float(E * f @ P)


def alive(layer_loss, k):
    bal, col = bugs.routing_fixture(16, 4), bugs.routing_fixture(16, 4, 0)
    if not layer_loss(col, k) > layer_loss(bal, k):
        return False
    h, x = 1e-5, col.copy()
    for i in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[i] += h
        down[i] -= h
        if abs(layer_loss(up, k) - layer_loss(down, k)) > 1e-12:
            return True
    return False


def apart(model_loss, k):
    A, B = bugs.routing_fixture(16, 4, 0, seed=1), bugs.routing_fixture(16, 4, 1, seed=2)
    return abs(model_loss([A, B], k) - model_loss([A], k) - model_loss([B], k)) < 1e-9


def model(layer_logits, k, mean=False):
    per = [mixtral_vec(v, k) for v in layer_logits]
    return float(np.mean(per) if mean else np.sum(per))


def test_constant_loss():
    g = lesson10.constant_loss
    assert_pass(g(alive, mixtral_vec), lesson="10")
    assert_fail(g(blank, mixtral_vec), "loss_is_alive is not written yet")
    assert_fail(g(alive, blank), "fixed_mixtral_loss is not written yet")
    assert_fail(g(alive, bugs.bug6_mixtral_loss), "still the constant")
    assert_fail(g(lambda *a: True, mixtral_vec), "lets the constant loss through")
    assert_fail(g(lambda *a: False, mixtral_vec), "rejects Mixtral's loss")
    reacts_only = lambda fn, k: fn(bugs.routing_fixture(16, 4, 0), k) > fn(bugs.routing_fixture(16, 4), k)  # noqa: E731
    assert_fail(g(reacts_only, mixtral_vec), "counts f alone", "finite-difference gradient")
    assert_fail(g(alive, lambda L, k: mixtral_vec(L, k, first_only=True)), "first choice (GShard")
    assert_fail(g(alive, lambda L, k: mixtral_vec(L, k, per_slot=True)), "divided f by k")


def test_pooled_layers():
    g = lesson10.pooled_layers
    assert_pass(g(apart, model), lesson="10")
    assert_fail(g(blank, model), "layers_seen_apart is not written yet")
    assert_fail(g(apart, blank), "fixed_model_loss is not written yet")
    assert_fail(g(apart, bugs.bug7_model_balance_loss), "still pools")
    assert_fail(g(apart, lambda v, k: model(v, k, mean=True)), "averaged the layers")
    assert_fail(g(lambda *a: True, model), "lets the pooled loss through")
    same_layer_twice = lambda fn, k: abs(fn([bugs.routing_fixture(16, 4, 0)] * 2, k)  # noqa: E731
                                         - 2 * fn([bugs.routing_fixture(16, 4, 0)], k)) < 1e-9
    assert_fail(g(same_layer_twice, model), "multiplied by the number of layers", "*different*")


@pytest.mark.parametrize("rel", [1e-3, 1e-6])
def test_near_misses_of_the_mixtral_fixes_fail(rel):
    assert_fail(lesson10.constant_loss(alive, lambda L, k: mixtral_vec(L, k) * (1 + rel)))
    assert_fail(lesson10.pooled_layers(apart, lambda v, k: model(v, k) * (1 + rel)))


def test_the_mixtral_fixes_may_not_call_minimoes_answers():
    from minimoe import losses, router
    from minimoe.core.layers import softmax
    assert_fail(lesson10.constant_loss(alive, bugs.mixtral_layer_loss),
                "you called `minimoe.course.bugs.mixtral_layer_loss`")
    assert_fail(lesson10.constant_loss(alive, lambda L, k: losses.switch_loss_forward(
        softmax(L), router.topk_indices(L, k))[0]), "you called `minimoe.core.losses.switch_loss_forward`")
    assert_fail(lesson10.pooled_layers(apart, bugs.model_balance_loss),
                "you called `minimoe.course.bugs.model_balance_loss`")
    # the building block the exercise offers is allowed
    assert_pass(lesson10.pooled_layers(apart, lambda v, k: sum(bugs.mixtral_layer_loss(x, k) for x in v)))


# ----------------------------------------------------------------------------- issue 22: the detectors' holes
def test_a_check_that_calls_minimoes_reference_check_fails():
    """The reference checks of minimoe.course.bugs are the exercises' answers."""
    from types import SimpleNamespace
    cases = [
        (lesson10.mixed_units, lambda fn, c, n, s, k, rng: bool(bugs.load_matches_sampling(
            lambda *a: (None, SimpleNamespace(load=fn(*a))), c, n, s, k, rng)), smooth_load, "load_matches_sampling"),
        (lesson10.no_gradient, lambda fwd, bwd, p, f: bool(bugs.gradient_matches_finite_differences(
            fwd, bwd, p, kwargs={"first_choice": f})), switch_backward, "gradient_matches_finite_differences"),
        (lesson10.dead_router, lambda layer, x, rng: bool(bugs.router_gradient_is_nonzero(layer, x, rng=rng)),
         lambda d, h, E, rng: MoELayer(d, h, E, k=1, gate="switch", rng=rng), "router_gradient_is_nonzero"),
        (lesson10.noisy_eval, bugs.eval_is_deterministic, logits, "eval_is_deterministic"),
        (lesson10.detached_sum, bugs.gates_sum_has_zero_gradient, renorm_backward, "gates_sum_has_zero_gradient"),
        (lesson10.constant_loss, bugs.balance_loss_reacts, mixtral_vec, "balance_loss_reacts"),
        (lesson10.pooled_layers, bugs.layers_are_balanced_apart, model, "layers_are_balanced_apart"),
    ]
    for grader, check, fix, name in cases:
        assert_fail(grader(check, fix), f"you called `minimoe.course.bugs.{name}`", "write it yourself")


RIGHT = {"mixed_units": (honest, smooth_load), "no_gradient": (gradcheck, switch_backward),
         "dead_router": (router_learns, lambda d, h, E, rng: MoELayer(d, h, E, k=1, gate="switch", rng=rng)),
         "noisy_eval": (deterministic, logits), "detached_sum": (sum_is_constant, renorm_backward),
         "constant_loss": (alive, mixtral_vec), "pooled_layers": (apart, model)}


@pytest.mark.parametrize("exercise", list(RIGHT))
def test_handing_in_any_function_of_course_bugs_fails(exercise):
    """GraderContract's check on both halves of each exercise: a check, or a fix, that returns
    what a function of minimoe.course.bugs returns fails."""
    from grader_cases import assert_calls_to_bugs_fail
    grader = lesson10.LESSON.exercises[exercise]
    check, fix = RIGHT[exercise]
    assert_pass(grader(check, fix), lesson="10")
    assert_calls_to_bugs_fail(lambda c: grader(c, fix), check)
    assert_calls_to_bugs_fail(lambda f: grader(check, f), fix)


def test_a_router_check_that_looks_at_w_gate_only_fails():
    def gate_only(layer, x, rng):
        y = layer.forward(x, train=True)
        layer.backward(rng.standard_normal(y.shape))
        return bool(np.any(layer.grads["W_gate"] != 0))
    assert_fail(lesson10.dead_router(gate_only, RIGHT["dead_router"][1]), "W_noise", "every router weight")


def test_a_router_check_in_eval_mode_fails():
    def in_eval(layer, x, rng):
        y = layer.forward(x, train=False)
        layer.backward(rng.standard_normal(y.shape))
        return all(np.any(layer.grads[n] != 0) for n in ("W_gate", "W_noise") if n in layer.params)
    assert_fail(lesson10.dead_router(in_eval, RIGHT["dead_router"][1]), "train=True")


def test_an_eval_check_that_keeps_a_reference_to_the_first_output_fails():
    def no_copy(predict):
        first = predict()
        return all(np.array_equal(first, predict()) for _ in range(2))
    assert_fail(lesson10.noisy_eval(no_copy, logits), "same array", "copy")


def test_a_property_check_that_only_sums_the_gradient_fails():
    def sums_to_zero(forward, backward, p, idx):
        g, cache = forward(p, idx)
        return bool(abs(np.sum(backward(np.ones_like(g), cache)[0])) < 1e-9)
    assert_fail(lesson10.detached_sum(sums_to_zero, renorm_backward), "transposed", "every entry")


def test_the_transposed_quotient_rule_is_named():
    def transposed(dg, cache):
        g, s, idx, shape = cache
        dp = np.zeros(shape)
        dp[np.arange(shape[0])[:, None], idx] = (dg - g * dg.sum(axis=1, keepdims=True)) / s
        return dp, {}
    assert_fail(lesson10.detached_sum(sum_is_constant, transposed), "transposed")


def test_a_liveness_check_of_the_gradient_half_only_fails():
    def gradient_only(layer_loss, k):
        x = bugs.routing_fixture(16, 4, 0)
        h = 1e-5
        for i in np.ndindex(x.shape):
            up, down = x.copy(), x.copy()
            up[i] += h
            down[i] -= h
            if abs(layer_loss(up, k) - layer_loss(down, k)) > 1e-12:
                return True
        return False
    assert_fail(lesson10.constant_loss(gradient_only, mixtral_vec), "the same number on the balanced", "(a)")


def test_a_liveness_check_with_at_least_instead_of_larger_fails():
    def at_least(layer_loss, k):
        bal, col = bugs.routing_fixture(16, 4), bugs.routing_fixture(16, 4, 0)
        return layer_loss(col, k) >= layer_loss(bal, k) and _gradient_half(layer_loss, k)
    assert_fail(lesson10.constant_loss(at_least, mixtral_vec), "larger", "not >=")


def _gradient_half(layer_loss, k):
    x, h = bugs.routing_fixture(16, 4, 0), 1e-5
    for i in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[i] += h
        down[i] -= h
        if abs(layer_loss(up, k) - layer_loss(down, k)) > 1e-12:
            return True
    return False


def test_rejecting_the_right_loss_says_which_half_and_names_the_gradient_at_balance():
    def gradient_at_balance(layer_loss, k):
        bal, col = bugs.routing_fixture(16, 4), bugs.routing_fixture(16, 4, 0)
        if not layer_loss(col, k) > layer_loss(bal, k):
            return False
        return _gradient_half_at(layer_loss, k, bal)
    res = lesson10.constant_loss(gradient_at_balance, mixtral_vec)
    assert_fail(res, "rejects Mixtral's loss, which is right", "perfect balance", "exactly 0", "collapsed batch")
    assert "as it should be" not in res.message

    def too_strict(layer_loss, k):                     # (a) with a tolerance larger than the gap
        bal, col = bugs.routing_fixture(16, 4), bugs.routing_fixture(16, 4, 0)
        return layer_loss(col, k) > layer_loss(bal, k) + 100.0 and _gradient_half(layer_loss, k)
    res = lesson10.constant_loss(too_strict, mixtral_vec)
    assert_fail(res, "rejects Mixtral's loss, which is right", "(a)", "(b)")
    assert "as it should be" not in res.message


def _gradient_half_at(layer_loss, k, x):
    h = 1e-5
    for i in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[i] += h
        down[i] -= h
        if abs(layer_loss(up, k) - layer_loss(down, k)) > 1e-9:
            return True
    return False


def test_rejecting_the_right_model_loss_says_what_the_two_sides_were():
    res = lesson10.pooled_layers(lambda fn, k: False, model)
    assert_fail(res, "rejects the sum of the layers' own losses", "one at a time")


def test_the_mixtral_softmax_over_the_wrong_axis_is_named():
    def wrong_axis(L, k):
        T, E = L.shape
        f = np.bincount(np.argsort(-L, axis=1)[:, :k].ravel(), minlength=E) / T
        z = np.exp(L - L.max(axis=0))
        return float(E * f @ (z / z.sum(axis=0)).mean(axis=0))
    assert_fail(lesson10.constant_loss(alive, wrong_axis), "axis")


def test_a_fixed_mixtral_loss_with_a_token_loop_fails():
    assert_fail(lesson10.constant_loss(alive, mixtral), "grows with the number of tokens")


def test_in_place_changes_of_the_fixes_arguments_fail():
    from grader_cases import scribbling
    assert_fail(lesson10.detached_sum(sum_is_constant, scribbling(renorm_backward)), "in place")
    assert_fail(lesson10.no_gradient(gradcheck, scribbling(switch_backward)), "in place")
    assert_fail(lesson10.pooled_layers(apart, scribbling(model)), "in place")
