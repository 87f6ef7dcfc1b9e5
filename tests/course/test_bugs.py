"""The bug hunt (minimoe/course/bugs.py): each check fails on its bug and passes on minimoe.

Each test pairs the deliberately buggy function with minimoe's own one and runs the
check lesson 10 teaches on both; where a check *cannot* see a bug (a gradient check
on a wrong forward, a determinism test that re-seeds), a test says so too.
"""
from types import SimpleNamespace

import numpy as np
import pytest

from minimoe import MoELayer, losses, router

from minimoe.course import bugs
from minimoe.core.gradcheck import check_layer, check_pair, numerical_gradient
from minimoe.core.layers import softmax
from moe_helpers import assert_margins, make_layer


def load_fixture(seed, T=12, E=4, k=2):
    """Clean logits, noise scale and noisy logits with no near-ties (margins >= 1e-3)."""
    rng = np.random.default_rng(seed)
    L = rng.standard_normal((T, E)) * 1.5
    sigma = rng.uniform(0.5, 1.5, size=(T, E))
    H = L + rng.standard_normal((T, E)) * sigma
    s = -np.sort(-H, axis=1)
    assert np.min(s[:, :-1] - s[:, 1:]) >= 1e-3, "near-tie in fixture; change the seed"
    return L, H, sigma


def test_finding_is_truthy_exactly_when_passed():
    assert bugs.Finding(True, "ok") and not bugs.Finding(False, "bad")
    assert str(bugs.Finding(False, "bad")) == "FAIL: bad"
    assert set(bugs.BUGS) == {1, 2, 3, 4, 5, 6, 7}


# --------------------------------------------------------------------------- bug 1
@pytest.mark.parametrize("k,seed", [(1, 0), (2, 1), (3, 2)])
def test_bug1_smooth_load_is_not_the_probability_it_claims(k, seed):
    L, H, sigma = load_fixture(seed, k=k)
    good = bugs.load_matches_sampling(losses.load_loss_forward, L, H, sigma, k, np.random.default_rng(9))
    bad = bugs.load_matches_sampling(bugs.bug1_load_loss_forward, L, H, sigma, k, np.random.default_rng(9))
    assert good, str(good)
    assert not bad, str(bad)


def test_load_sampling_check_agrees_with_a_closed_form_and_catches_a_small_error():
    """E = 2, k = 1: e is first iff L_te + εσ_te beats the other expert's noisy score, so
    P(t,e) = Φ((L_te − H_t,other)/σ_te) by hand — independent of losses.py."""
    L, H, sigma = load_fixture(3, T=10, E=2, k=1)
    P = losses.normal_cdf((L - H[:, ::-1]) / sigma)
    exact = lambda *a: (0.0, SimpleNamespace(load=P.sum(axis=0)))                # noqa: E731
    off = lambda *a: (0.0, SimpleNamespace(load=P.sum(axis=0) + [0.3, -0.3]))    # noqa: E731
    assert bugs.load_matches_sampling(exact, L, H, sigma, 1, np.random.default_rng(0))
    assert not bugs.load_matches_sampling(off, L, H, sigma, 1, np.random.default_rng(0))


@pytest.mark.parametrize("k,seed", [(1, 0), (1, 1), (2, 0), (2, 1)])
def test_bug1_backward_is_right_so_a_gradient_check_cannot_see_the_bug(k, seed):
    # (The gradient into `noisy` passes through the softmax and is small, ~1e-4, so on
    # some seeds the h = 1e-6 normwise test sits at float rounding; these seeds are clear.)
    L, H, sigma = load_fixture(seed, T=6, k=k)
    assert bugs.gradient_matches_finite_differences(
        bugs.bug1_load_loss_forward, bugs.bug1_load_loss_backward, L, {"noisy": H, "sigma": sigma},
        kwargs={"k": k}, selection=lambda out, c: c.ranked)


@pytest.mark.parametrize("k,cv2_max", [(1, 0.03), (2, 0.01)])
def test_bug1_loss_goes_to_zero_but_the_real_load_stays_unbalanced(k, cv2_max):
    good = bugs.train_router_on_load_loss(losses.load_loss_forward, losses.load_loss_backward, k=k)
    bad = bugs.train_router_on_load_loss(bugs.bug1_load_loss_forward, bugs.bug1_load_loss_backward, k=k)
    before = np.var(good.load_before) / np.mean(good.load_before) ** 2
    assert before > 0.2                                  # the fixture really starts collapsed
    assert bad.loss[-1] < 0.1 * bad.loss[0]              # the buggy loss "works": it decreases...
    assert bad.real_cv2[-1] > cv2_max                    # ...but the clinic stays unbalanced,
    assert good.real_cv2[-1] < cv2_max
    assert bad.real_cv2[-1] > 5 * good.real_cv2[-1]      # far more than with minimoe's loss


def test_bug1_balances_real_load_check():
    assert bugs.balances_real_load(losses.load_loss_forward, losses.load_loss_backward, steps=150, T=256)
    bad = bugs.balances_real_load(bugs.bug1_load_loss_forward, bugs.bug1_load_loss_backward, steps=150, T=256)
    assert not bad and "real load" in bad.message


def test_bug1_rejects_k_equal_to_E():
    L, H, sigma = load_fixture(0)
    with pytest.raises(ValueError, match="k must be <= 3"):
        bugs.bug1_load_loss_forward(L, H, sigma, 4)


# --------------------------------------------------------------------------- bug 2
@pytest.mark.parametrize("seed", [0, 1])
def test_bug2_switch_loss_value_is_right_but_its_gradient_is_zero(seed):
    rng = np.random.default_rng(seed)
    probs = softmax(rng.standard_normal((8, 4)))
    first = probs.argmax(axis=1)
    assert bugs.bug2_switch_loss_forward(probs, first)[0] == pytest.approx(
        losses.switch_loss_forward(probs, first)[0], rel=1e-14)
    num = numerical_gradient(lambda: bugs.bug2_switch_loss_forward(probs, first)[0], probs)
    assert np.linalg.norm(num) > 0.1                     # the value does depend on the router...
    _, cache = bugs.bug2_switch_loss_forward(probs, first)
    assert not np.any(bugs.bug2_switch_loss_backward(1.0, cache)[0])   # ...but nothing flows back
    bad = bugs.gradient_matches_finite_differences(
        bugs.bug2_switch_loss_forward, bugs.bug2_switch_loss_backward, probs, kwargs={"first_choice": first})
    good = bugs.gradient_matches_finite_differences(
        losses.switch_loss_forward, losses.switch_loss_backward, probs, kwargs={"first_choice": first})
    assert not bad and "gradient check failed for x" in bad.message
    assert good, str(good)


# --------------------------------------------------------------------------- bug 3
def test_bug3_dead_router_gets_exactly_zero_gradient():
    x = np.random.default_rng(1).standard_normal((16, 6))
    layer = bugs.bug3_dead_router_layer(6, 8, 4, rng=np.random.default_rng(0))
    finding = bugs.router_gradient_is_nonzero(layer, x)
    assert not finding and "never train" in finding.message
    assert not np.any(layer.grads["W_gate"]) and not np.any(layer.grads["W_noise"])
    assert np.any(layer.grads["W1"])                     # the experts do learn


@pytest.mark.parametrize("kw", [{"gate": "switch"}, {"balance": "switch"}, {"balance": "load"}])
def test_bug3_fixes_give_the_router_a_gradient(kw):
    x = np.random.default_rng(1).standard_normal((16, 6))
    layer = MoELayer(6, 8, 4, **{"k": 1, "rng": np.random.default_rng(0), **kw})
    assert bugs.router_gradient_is_nonzero(layer, x)


def test_bug3_importance_loss_does_not_revive_the_router():
    """The importance loss acts on the gates, which are all exactly 1: it stops there too."""
    x = np.random.default_rng(1).standard_normal((16, 6))
    layer = MoELayer(6, 8, 4, k=1, balance="importance", rng=np.random.default_rng(0))
    assert not bugs.router_gradient_is_nonzero(layer, x)


def test_bug3_zero_gradient_is_the_true_gradient_so_gradcheck_passes():
    layer, rng = make_layer(2, k=1, gate="topk", noisy=True, balance=None)
    x = rng.standard_normal((6, 3))
    noise = rng.standard_normal((6, 4))
    assert_margins(layer, x, noise)
    check_layer(layer, x, forward_kwargs={"noise": noise}, rng=rng)


def test_router_gradient_check_needs_router_parameters():
    class NoRouter:
        params, grads = {"W": np.ones(2)}, {"W": np.ones(2)}
        forward = staticmethod(lambda x, train=True: x)
        backward = staticmethod(lambda dy: dy)
    finding = bugs.router_gradient_is_nonzero(NoRouter(), np.ones((2, 2)))
    assert not finding and "none of the router parameters" in finding.message


# --------------------------------------------------------------------------- bug 4
def router_weights(seed=0, T=8, d=5, E=4):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((T, d)), rng.standard_normal((d, E)), rng.standard_normal((d, E))


def test_bug4_router_noise_in_eval_is_caught_by_a_determinism_test():
    x, Wg, Wn = router_weights()
    rng = np.random.default_rng(0)
    bad = bugs.eval_is_deterministic(lambda: bugs.bug4_router_logits_forward(x, Wg, Wn, rng=rng, train=False)[0])
    good = bugs.eval_is_deterministic(lambda: router.router_logits_forward(x, Wg, Wn, rng=rng, train=False)[0])
    assert not bad and good
    assert bugs.bug4_router_logits_backward is router.router_logits_backward


def test_bug4_reseeding_inside_the_call_hides_the_bug():
    """A determinism test that re-creates the generator each call sees the same noise
    twice and passes — so compare with the noise-free scores as well."""
    x, Wg, Wn = router_weights()
    predict = lambda: bugs.bug4_router_logits_forward(x, Wg, Wn, rng=np.random.default_rng(0), train=False)[0]  # noqa: E731
    assert bugs.eval_is_deterministic(predict)
    assert not np.allclose(predict(), x @ Wg)


def test_bug4_noisy_eval_layer_changes_its_predictions():
    x = np.random.default_rng(1).standard_normal((16, 6))
    bad = bugs.NoisyEvalMoE(6, 8, 4, rng=np.random.default_rng(0))
    good = MoELayer(6, 8, 4, rng=np.random.default_rng(0))
    assert not bugs.eval_is_deterministic(lambda: bad.forward(x, train=False))
    assert bugs.eval_is_deterministic(lambda: good.forward(x, train=False))
    assert not bugs.eval_is_deterministic(lambda: good.forward(x, train=True))   # training is noisy


def test_eval_check_rejects_a_single_call():
    with pytest.raises(ValueError, match="n_calls must be >= 2"):
        bugs.eval_is_deterministic(lambda: np.zeros(2), n_calls=1)


# --------------------------------------------------------------------------- bug 5
def renorm_fixture(seed, k, T=6, E=4):
    rng = np.random.default_rng(seed)
    p = softmax(rng.standard_normal((T, E)))
    return p, router.topk_indices(p, k), rng


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_bug5_forward_matches_minimoe_exactly(k):
    p, idx, _ = renorm_fixture(k, k)
    np.testing.assert_array_equal(bugs.bug5_renormalize_forward(p, idx)[0], router.renormalize_forward(p, idx)[0])


@pytest.mark.parametrize("k", [2, 3, 4])
def test_bug5_gradient_check_fails_for_k_at_least_2(k):
    p, idx, rng = renorm_fixture(10 + k, k)
    bad = bugs.gradient_matches_finite_differences(bugs.bug5_renormalize_forward, bugs.bug5_renormalize_backward,
                                                   p, kwargs={"idx": idx}, rng=rng)
    good = bugs.gradient_matches_finite_differences(router.renormalize_forward, router.renormalize_backward,
                                                    p, kwargs={"idx": idx}, rng=rng)
    assert not bad and good


def test_bug5_at_k1_the_true_gradient_is_zero_and_the_bug_is_not():
    """With k = 1, g = p/p = 1: the true gradient is 0, the detached sum gives dg/p. So the
    gradient check catches bug 5 at k = 1 too (it is the dead-router case, revived by accident)."""
    p, idx, rng = renorm_fixture(0, 1)
    dg = rng.standard_normal((6, 1))
    _, cache = bugs.bug5_renormalize_forward(p, idx)
    dp = bugs.bug5_renormalize_backward(dg, cache)[0]
    np.testing.assert_allclose(dp[np.arange(6), idx[:, 0]], dg[:, 0] / p[np.arange(6), idx[:, 0]])
    assert not np.any(router.renormalize_backward(dg, router.renormalize_forward(p, idx)[1])[0])
    assert not bugs.gradient_matches_finite_differences(
        bugs.bug5_renormalize_forward, bugs.bug5_renormalize_backward, p, kwargs={"idx": idx}, rng=rng)


def test_bug5_misses_exactly_the_quotient_rule_term():
    p, idx, rng = renorm_fixture(5, 2)
    dg = rng.standard_normal((6, 2))
    g, cache = bugs.bug5_renormalize_forward(p, idx)
    s = cache[1]
    missing = router.renormalize_backward(dg, router.renormalize_forward(p, idx)[1])[0] - \
        bugs.bug5_renormalize_backward(dg, cache)[0]
    expected = np.zeros_like(p)
    expected[np.arange(6)[:, None], idx] = -np.sum(dg * g, axis=1, keepdims=True) / s
    np.testing.assert_allclose(missing, expected, rtol=1e-12, atol=1e-15)


def test_gradient_check_wrapper_reports_like_check_pair(rng):
    p, idx, _ = renorm_fixture(3, 2)
    finding = bugs.gradient_matches_finite_differences(
        router.renormalize_forward, router.renormalize_backward, p, kwargs={"idx": idx}, rng=rng)
    assert finding and "worst normwise error" in finding.message
    check_pair(router.renormalize_forward, router.renormalize_backward, p, kwargs={"idx": idx}, rng=rng)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_bug5_property_check_sum_of_gates_is_constant(k):
    """No finite differences: Σ_j g_j ≡ 1, so backward(ones) must be exactly 0 (up to rounding)."""
    p, idx, _ = renorm_fixture(20 + k, k)
    assert bugs.gates_sum_has_zero_gradient(router.renormalize_forward, router.renormalize_backward, p, idx)
    bad = bugs.gates_sum_has_zero_gradient(bugs.bug5_renormalize_forward, bugs.bug5_renormalize_backward, p, idx)
    assert not bad and "must be 0" in bad.message


# ----------------------------------------------------------------------------- lesson 10 gives nothing away
def test_the_buggy_code_lesson_10_shows_does_not_state_its_fix():
    """Lesson 10 prints each buggy function with show() before the exercise that asks for the fix;
    what it prints names the bug, never the fix (that is bugs.FIXES, which the lesson never shows)."""
    import inspect
    import re
    from pathlib import Path
    src = (Path(__file__).resolve().parents[2] / "lessons" / "src" / "10_the_bug_hunt.py").read_text("utf-8")
    shown = re.findall(r"show\(bugs\.(\w+)\)", src)
    assert len(shown) >= 7
    giveaways = ["load_loss_forward) reads", "reads the bar off H", 'gate="switch"', "gate='switch'",
                 'balance="switch"', "⟨dg, g⟩", "E · f_e / T", "E*f/T", "Fixes:", "only when train",
                 "full softmax", "softmax(logits).mean", "on its own tokens", "summed over the layers"]
    for name in shown:
        text = inspect.getsource(getattr(bugs, name))
        assert not [g for g in giveaways if g in text], (name, [g for g in giveaways if g in text])
    assert "bugs.FIXES" not in src and set(bugs.FIXES) == set(bugs.BUGS)


def test_lesson_10_exercise_text_does_not_spell_out_the_backward_formulas():
    from pathlib import Path
    src = (Path(__file__).resolve().parents[2] / "lessons" / "src" / "10_the_bug_hunt.py").read_text("utf-8")
    student = src.split("### BEGIN SOLUTION")[0]          # nothing of the answers before the first exercise
    assert "= E f_e / T" not in src and "(dg_j - \\langle dg, g\\rangle)/s" not in src
    assert "forward` takes no `rng`" in src                # router_learns: rng is only for dy
    assert student


# ----------------------------------------------------------------------------- bugs 6 and 7
def _mixtral_by_hand(logits, k):
    """One token at a time: f_e = #(tokens with e in their top k)/T, P_e = mean softmax."""
    T, E = logits.shape
    f, P = np.zeros(E), np.zeros(E)
    for t in range(T):
        z = np.exp(logits[t] - logits[t].max())
        P += z / z.sum() / T
        f[np.argsort(-logits[t])[:k]] += 1 / T
    return E * f @ P


@pytest.mark.parametrize("k", [1, 2, 3])
def test_mixtral_layer_loss_matches_a_per_token_loop_and_is_k_at_balance(k):
    logits = np.random.default_rng(k).standard_normal((9, 5))
    assert bugs.mixtral_layer_loss(logits, k) == pytest.approx(_mixtral_by_hand(logits, k), rel=1e-12)
    # perfect balance: uniform probabilities (P = 1/E) and every expert chosen equally often
    E, T = 4, 8
    flat = np.zeros((T, E))
    flat[np.arange(T)[:, None], (np.arange(T)[:, None] + np.arange(k)) % E] = 1e-12 * (k - np.arange(k))
    assert bugs.mixtral_layer_loss(flat, k) == pytest.approx(k, rel=1e-9)


@pytest.mark.parametrize("k", [1, 2])
def test_bug6_is_the_constant_E_for_any_routing_and_its_check_catches_it(k):
    for seed in range(3):
        assert bugs.bug6_mixtral_loss(np.random.default_rng(seed).standard_normal((7, 4)) * 3, k) == pytest.approx(4.0)
    assert bugs.balance_loss_reacts(bugs.mixtral_layer_loss, k)
    bad = bugs.balance_loss_reacts(bugs.bug6_mixtral_loss, k)
    assert not bad and "does not see the collapse" in bad.message and "no gradient" in bad.message


def test_routing_fixture_is_balanced_or_collapsed_without_ties():
    bal, col = bugs.routing_fixture(16, 4), bugs.routing_fixture(16, 4, 2)
    assert np.array_equal(np.bincount(bal.argmax(1), minlength=4), [4, 4, 4, 4])
    assert np.all(col.argmax(1) == 2)
    s = -np.sort(-col, axis=1)
    assert np.min(s[:, :-1] - s[:, 1:]) >= 0.5


@pytest.mark.parametrize("k", [1, 2])
def test_bug7_pooling_cancels_two_opposite_layers_and_its_check_catches_it(k):
    A, B = bugs.routing_fixture(16, 4, 0, seed=1), bugs.routing_fixture(16, 4, 1, seed=2)
    alone = _mixtral_by_hand(A, k) + _mixtral_by_hand(B, k)
    assert bugs.model_balance_loss([A, B], k) == pytest.approx(alone, rel=1e-12)
    pooled = bugs.bug7_model_balance_loss([A, B], k)
    assert pooled == pytest.approx(_mixtral_by_hand(np.concatenate([A, B]), k), rel=1e-12)
    assert pooled < alone / 2                           # the two collapses cancel out
    assert bugs.bug7_model_balance_loss([A], k) == pytest.approx(bugs.model_balance_loss([A], k))
    assert bugs.layers_are_balanced_apart(bugs.model_balance_loss, k)
    bad = bugs.layers_are_balanced_apart(bugs.bug7_model_balance_loss, k)
    assert not bad and "cancels" in bad.message
