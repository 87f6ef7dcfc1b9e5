"""Layer norm: gradient checks, the normalisation property, invariances, bad input."""
import numpy as np
import pytest

from minimoe.core.gradcheck import GradCheckError, check_layer, check_pair
from minimoe.lm.norm import LayerNorm, layernorm_backward, layernorm_forward


def _params(rng, d):
    return {"gamma": 1.0 + 0.5 * rng.standard_normal(d), "beta": rng.standard_normal(d)}


# d = 2 is left out on purpose: two numbers standardised are always (−1, +1), so
# the input gradient is O(ε) and finite differences cannot resolve it to 1e-8.
@pytest.mark.parametrize("shape", [(1, 1, 4), (2, 3, 6), (5, 3), (7,)])
def test_layernorm_gradcheck(shape):
    rng = np.random.default_rng(sum(shape))
    x = rng.standard_normal(shape) * 2.0 + 1.0
    reports = check_pair(layernorm_forward, layernorm_backward, x, _params(rng, shape[-1]), rng=rng)
    assert {r.name for r in reports} == {"x", "gamma", "beta"}
    assert all(r.passed for r in reports)


def test_layernorm_class_gradcheck(rng):
    ln = LayerNorm(5)
    ln.params.update(_params(rng, 5))
    reports = check_layer(ln, rng.standard_normal((2, 3, 5)), rng=rng)
    assert all(r.passed for r in reports)


def test_gradcheck_catches_a_backward_that_forgets_the_stretch_term(rng):
    # The classic mistake: treating σ as a constant, i.e. dropping  − x̂·mean(g x̂).
    def wrong_backward(dy, cache):
        g = dy * cache.gamma
        dx = cache.rstd * (g - g.mean(axis=-1, keepdims=True))
        _, grads = layernorm_backward(dy, cache)
        return dx, grads

    x = rng.standard_normal((3, 4))
    with pytest.raises(GradCheckError, match="x"):
        check_pair(layernorm_forward, wrong_backward, x, _params(rng, 4))


def test_output_rows_have_zero_mean_and_unit_variance(rng):
    x = 3.0 * rng.standard_normal((4, 6, 16)) - 2.0
    eps = 1e-5
    y, _ = layernorm_forward(x, np.ones(16), np.zeros(16), eps=eps)
    np.testing.assert_allclose(y.mean(axis=-1), 0.0, atol=1e-12)
    # Variance is σ²/(σ²+ε): one up to ε's effect, computed independently with np.var.
    v = x.var(axis=-1)
    np.testing.assert_allclose(y.var(axis=-1), v / (v + eps), rtol=1e-12)
    assert np.all(np.abs(y.var(axis=-1) - 1.0) < 1e-5)


def test_invariant_to_shift_and_scale_of_a_row(rng):
    x = rng.standard_normal((3, 8))
    p = _params(rng, 8)
    y1, _ = layernorm_forward(x, **p, eps=1e-12)
    y2, _ = layernorm_forward(7.0 * x - 4.0, **p, eps=1e-12)
    np.testing.assert_allclose(y1, y2, atol=1e-9)


def test_input_gradient_of_each_row_sums_to_zero(rng):
    # Shifting a whole row does not change the output, so the gradient has no
    # component along (1, ..., 1): an independent property of the backward.
    x = rng.standard_normal((2, 5, 7))
    y, cache = layernorm_forward(x, **_params(rng, 7))
    dx, _ = layernorm_backward(rng.standard_normal(y.shape), cache)
    np.testing.assert_allclose(dx.sum(axis=-1), 0.0, atol=1e-12)


def test_constant_row_gives_beta_and_no_nan():
    beta = np.array([0.5, -1.0, 2.0])
    y, cache = layernorm_forward(np.full((2, 3), 4.0), np.ones(3), beta)
    np.testing.assert_array_equal(y, np.tile(beta, (2, 1)))
    dx, grads = layernorm_backward(np.ones((2, 3)), cache)
    assert np.all(np.isfinite(dx)) and np.all(np.isfinite(grads["gamma"]))


def test_float32_stays_float32(rng):
    ln = LayerNorm(6, dtype=np.float32)
    x = rng.standard_normal((2, 3, 6)).astype(np.float32)
    y = ln.forward(x)
    dx = ln.backward(np.ones_like(y))
    assert y.dtype == dx.dtype == ln.grads["gamma"].dtype == ln.grads["beta"].dtype == np.float32


def test_bad_input_messages():
    g, b = np.ones(4), np.zeros(4)
    with pytest.raises(ValueError, match="x must have 1 to 7 dimensions"):
        layernorm_forward(np.array(1.0), g, b)
    with pytest.raises(TypeError, match="x must have a floating dtype"):
        layernorm_forward(np.ones((2, 4), dtype=int), g, b)
    with pytest.raises(ValueError, match=r"gamma must have shape \(4,\)"):
        layernorm_forward(np.ones((2, 4)), np.ones(3), b)
    with pytest.raises(ValueError, match=r"beta must have shape \(4,\)"):
        layernorm_forward(np.ones((2, 4)), g, np.zeros((1, 4)))
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        layernorm_forward(np.ones((2, 4)), g, b, eps=0.0)
    with pytest.raises(ValueError, match="x contains NaN"):
        layernorm_forward(np.full((2, 4), np.nan), g, b)
    _, cache = layernorm_forward(np.ones((2, 4)), g, b)
    with pytest.raises(ValueError, match=r"dy must have shape \(2, 4\)"):
        layernorm_backward(np.ones((4, 2)), cache)
    with pytest.raises(RuntimeError, match="forward before backward"):
        LayerNorm(4).backward(np.ones((1, 4)))
    with pytest.raises(TypeError, match="dtype must be a floating dtype"):
        LayerNorm(4, dtype=np.int32)
