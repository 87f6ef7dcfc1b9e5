"""Balancing losses and z-loss: gradient checks, values from first principles, edge cases."""
import math

import numpy as np
import pytest

from minimoe import losses
from minimoe.core.layers import softmax
from minimoe.core.gradcheck import check_pair
from moe_helpers import as_pair


def test_cv_squared_matches_definition_and_gradcheck(rng):
    v = rng.uniform(0.5, 3.0, size=6)
    loss, _ = losses.cv_squared_forward(v)
    assert loss == pytest.approx(np.var(v) / np.mean(v) ** 2, rel=1e-12)
    check_pair(losses.cv_squared_forward, losses.cv_squared_backward, v, rng=rng)


def test_cv_squared_of_zeros_and_constants_is_zero_without_nan():
    for v in (np.zeros(4), np.full(4, 1e-200), np.full(4, 7.0)):
        loss, c = losses.cv_squared_forward(v)
        dv, _ = losses.cv_squared_backward(1.0, c)
        assert loss == 0.0 and np.all(np.isfinite(dv))
    _, c = losses.cv_squared_forward(np.zeros(4))
    assert np.all(losses.cv_squared_backward(1.0, c)[0] == 0)


# --------------------------------------------------------------------------- importance
@pytest.mark.parametrize("k,seed", [(1, 0), (2, 1), (4, 2)])
def test_importance_loss_gradcheck(k, seed):
    rng = np.random.default_rng(seed)
    T, E = 7, 4
    idx = np.argsort(rng.standard_normal((T, E)), axis=1)[:, :k]
    gates = rng.uniform(0.1, 1.0, size=(T, k))
    loss, c = losses.importance_loss_forward(gates, idx, E)
    imp = np.zeros(E)
    for t in range(T):  # the definition, one token at a time (test code only)
        for j in range(k):
            imp[idx[t, j]] += gates[t, j]
    np.testing.assert_allclose(c.importance, imp, rtol=1e-12)
    assert loss == pytest.approx(np.var(imp) / np.mean(imp) ** 2, rel=1e-12)
    check_pair(losses.importance_loss_forward, losses.importance_loss_backward, gates,
               kwargs={"idx": idx, "n_experts": E}, rng=rng)


# --------------------------------------------------------------------------- smooth load
def test_normal_cdf_and_pdf_known_values():
    z = np.array([-40.0, -1.959963984540054, 0.0, 1.0, 40.0])
    np.testing.assert_allclose(losses.normal_cdf(z), [0.0, 0.025, 0.5, 0.8413447460685429, 1.0],
                               rtol=1e-12, atol=1e-300)
    assert losses.normal_pdf(0.0) == pytest.approx(1 / math.sqrt(2 * math.pi))
    assert losses.normal_cdf(np.array([-30.0]))[0] > 0      # exact tail, not 1 - ½erfc


def noisy_fixture(rng, T, E, k):
    L = rng.standard_normal((T, E))
    sigma = rng.uniform(0.3, 1.5, size=(T, E))
    H = L + rng.standard_normal((T, E)) * sigma
    s = -np.sort(-H, axis=1)
    assert np.min(s[:, :-1] - s[:, 1:]) >= 1e-3, "near-tie in fixture; change the seed"
    return L, H, sigma


@pytest.mark.parametrize("k,E,seed", [(1, 4, 0), (2, 4, 1), (2, 6, 2), (3, 4, 3)])
def test_load_loss_gradcheck_into_clean_noisy_sigma(k, E, seed):
    rng = np.random.default_rng(seed)
    L, H, sigma = noisy_fixture(rng, 8, E, k)
    check_pair(losses.load_loss_forward, as_pair(losses.load_loss_backward, "noisy", "sigma"), L,
               {"noisy": H, "sigma": sigma}, kwargs={"k": k}, rng=rng,
               selection=lambda out, c: c.ranked)


def test_load_probability_matches_its_definition(rng):
    """P(t,e) computed by sorting the *other* experts' noisy scores, one entry at a time."""
    T, E, k = 5, 4, 2
    L, H, sigma = noisy_fixture(rng, T, E, k)
    _, c = losses.load_loss_forward(L, H, sigma, k)
    expected = np.zeros(E)
    for t in range(T):
        for e in range(E):
            others = np.sort(np.delete(H[t], e))[::-1]
            expected[e] += 0.5 * math.erfc(-(L[t, e] - others[k - 1]) / sigma[t, e] / math.sqrt(2))
    np.testing.assert_allclose(c.load, expected, rtol=1e-12)


def test_load_with_k_equal_E_is_flat_and_extreme_inputs_do_not_nan(rng):
    L, H, sigma = noisy_fixture(rng, 5, 3, 3)
    loss, c = losses.load_loss_forward(L, H, sigma, 3)
    assert loss == 0.0 and np.all(c.load == 5)
    # logits of ±1e4 and a σ that underflowed to 0
    L = rng.choice([-1e4, 1e4], size=(6, 4))
    sigma = np.full((6, 4), 1e-3)
    sigma[0] = 0.0
    loss, c = losses.load_loss_forward(L, L, sigma, 2)
    dL, dH, dsigma, _ = losses.load_loss_backward(1.0, c)
    assert np.isfinite(loss) and all(np.all(np.isfinite(a)) for a in (dL, dH, dsigma))


# --------------------------------------------------------------------------- Switch
def test_switch_loss_value_and_gradcheck(rng):
    T, E = 8, 4
    probs = softmax(rng.standard_normal((T, E)))
    first = probs.argmax(axis=1)
    loss, _ = losses.switch_loss_forward(probs, first)
    f = np.array([np.mean(first == e) for e in range(E)])
    assert loss == pytest.approx(E * np.sum(f * probs.mean(0)), rel=1e-12)
    check_pair(losses.switch_loss_forward, losses.switch_loss_backward, probs,
               kwargs={"first_choice": first}, rng=rng)


def test_switch_loss_is_one_at_perfect_balance_and_E_at_collapse():
    E = 4
    uniform = np.full((8, E), 1.0 / E)
    assert losses.switch_loss_forward(uniform, np.arange(8) % E)[0] == pytest.approx(1.0)
    onehot = np.zeros((8, E))
    onehot[:, 0] = 1.0
    assert losses.switch_loss_forward(onehot, np.zeros(8, int))[0] == pytest.approx(E)


# --------------------------------------------------------------------------- z-loss
def test_z_loss_value_gradcheck_and_huge_logits(rng):
    L = rng.standard_normal((6, 4))
    loss, _ = losses.z_loss_forward(L)
    assert loss == pytest.approx(np.mean(np.log(np.exp(L).sum(1)) ** 2), rel=1e-12)
    check_pair(losses.z_loss_forward, losses.z_loss_backward, L, rng=rng)
    big = np.array([[1e4, -1e4, 0.0]])
    loss, c = losses.z_loss_forward(big)
    assert loss == pytest.approx(1e8) and np.all(np.isfinite(losses.z_loss_backward(1.0, c)[0]))


# --------------------------------------------------------------------------- bad input
def test_loss_bad_inputs_name_the_argument(rng):
    L = rng.standard_normal((4, 3))
    with pytest.raises(ValueError, match=r"noisy must have shape \(4, 3\)"):
        losses.load_loss_forward(L, L[:, :2], np.ones((4, 3)), 1)
    with pytest.raises(ValueError, match="k must be <= 3"):
        losses.load_loss_forward(L, L, np.ones((4, 3)), 4)
    with pytest.raises(ValueError, match="n_experts must be >= 1"):
        losses.importance_loss_forward(np.ones((4, 1)), np.zeros((4, 1), int), 0)
    with pytest.raises(ValueError, match="logits contains NaN or inf"):
        losses.z_loss_forward(np.full((2, 2), np.inf))
