"""Tests of the building blocks in minimoe/core/layers.py.

Every forward/backward pair gets a full gradient check (input and parameters) on
several seeded shapes; values are checked against independent hand computations;
bad input must fail with a message that names the argument.
"""
import math

import numpy as np
import pytest

from minimoe import gradcheck as gc
from minimoe import layers

# (leading shape of x, d_in, d_out): T=1, width 1, a plain batch, and a (B, S, d) batch.
LINEAR_SHAPES = [((1,), 3, 2), ((5,), 1, 1), ((4,), 6, 3), ((2, 3), 4, 5), ((), 3, 2)]


def _assert_passed(reports):
    assert reports and all(r.passed for r in reports), gc.format_reports(reports)


# --------------------------------------------------------------------------- linear
@pytest.mark.parametrize("lead, d_in, d_out", LINEAR_SHAPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_linear_gradcheck(lead, d_in, d_out, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(lead + (d_in,))
    params = {"W": rng.standard_normal((d_in, d_out)), "b": rng.standard_normal(d_out)}
    _assert_passed(gc.check_pair(layers.linear_forward, layers.linear_backward, x, params, rng=rng))


def test_linear_matches_a_hand_computation():
    x = np.array([[1.0, 2.0]])
    W = np.array([[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]])
    out, _ = layers.linear_forward(x, W, np.array([0.0, 1.0, 10.0]))
    np.testing.assert_array_equal(out, [[2.0, 5.0, 9.0]])


def test_linear_float32_in_float32_out(rng):
    x = rng.standard_normal((3, 4)).astype(np.float32)
    W, b = np.ones((4, 2), np.float32), np.zeros(2, np.float32)
    out, cache = layers.linear_forward(x, W, b)
    dx, g = layers.linear_backward(np.ones_like(out), cache)
    assert out.dtype == dx.dtype == g["W"].dtype == g["b"].dtype == np.float32


# --------------------------------------------------------------------------- relu / gelu
@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (6, 4), (2, 3, 5)])
@pytest.mark.parametrize("seed", [0, 1])
def test_relu_gradcheck(shape, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    # The mask is the selection: a step that crosses 0 would raise KinkError, not pass by luck.
    _assert_passed(gc.check_pair(layers.relu_forward, layers.relu_backward, x, rng=rng,
                                 selection=lambda out, cache: cache.positive))


def test_relu_values():
    out, _ = layers.relu_forward(np.array([-2.0, -0.0, 0.0, 3.5]))
    np.testing.assert_array_equal(out, [0.0, 0.0, 0.0, 3.5])
    dx, _ = layers.relu_backward(np.ones(4), layers.relu_forward(np.array([-1.0, 0.0, 1e-300, 2.0]))[1])
    np.testing.assert_array_equal(dx, [0.0, 0.0, 1.0, 1.0])   # derivative 0 at exactly 0


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (6, 4), (2, 3, 5)])
@pytest.mark.parametrize("seed", [0, 1])
def test_gelu_gradcheck(shape, seed):
    rng = np.random.default_rng(seed)
    x = 2.5 * rng.standard_normal(shape)
    _assert_passed(gc.check_pair(layers.gelu_forward, layers.gelu_backward, x, rng=rng))


def test_gelu_gradcheck_across_its_whole_range():
    x = np.linspace(-6.0, 6.0, 49)      # through the bend near −0.75 and both tails
    _assert_passed(gc.check_pair(layers.gelu_forward, layers.gelu_backward, x))


def _gelu_exact(x):
    """x Φ(x) with Φ(x) = ½(1 + erf(x/√2)) — the definition, computed independently."""
    return np.array([v * 0.5 * (1.0 + math.erf(v / math.sqrt(2.0))) for v in np.ravel(x)]).reshape(np.shape(x))


def test_gelu_tanh_form_is_within_1e_3_of_exact():
    x = np.linspace(-8.0, 8.0, 4001)
    out, _ = layers.gelu_forward(x)
    gap = np.abs(out - _gelu_exact(x))
    assert gap.max() < 1e-3            # the bound
    assert gap.max() < 5e-4            # the docstring's sharper claim


def test_gelu_known_values():
    out, _ = layers.gelu_forward(np.array([0.0, 20.0, -20.0]))
    np.testing.assert_allclose(out, [0.0, 20.0, 0.0], atol=1e-12)


# Issue 21: at huge |x| the true values are finite (gelu(x) = x or 0, slope 1 or 0), so no NaN
# and no overflow warning. Underflow (e^(−1000) → 0) is the right answer and stays allowed.
RAISE_ON_OVERFLOW = dict(over="raise", invalid="raise", divide="raise")
HUGE = {np.float64: [1e300, 1.4e154, 1e154, 6e102, 1e20, 1e3],   # x² overflows from 1.3e154, x³ from 5.6e102
        np.float32: [3e38, 1.9e19, 1.8e19, 7e12, 1e10, 1e3]}     # x² overflows from 1.8e19, x³ from 7e12


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_gelu_at_huge_inputs_is_x_or_0_with_slope_1_or_0(dtype):
    # For x ≥ 10, u = √(2/π)(x + 0.044715 x³) > 43 and 1 − tanh u < 1e-37: gelu(x) = x and its
    # slope is 1 to every bit of float32 and float64; gelu(−x) = −x e^(−2u)·… underflows to 0, slope 0.
    big = np.array(HUGE[dtype], dtype)
    x = np.concatenate([big, -big])
    with np.errstate(**RAISE_ON_OVERFLOW):
        out, cache = layers.gelu_forward(x)
        dx, _ = layers.gelu_backward(np.ones_like(x), cache)
    assert out.dtype == dx.dtype == dtype
    np.testing.assert_array_equal(out, np.concatenate([big, np.zeros_like(big)]))
    np.testing.assert_array_equal(dx, np.concatenate([np.ones_like(big), np.zeros_like(big)]))


def _gelu_slope_by_hand(v):
    """d gelu/dx of the tanh form at one Python float, with math's tanh (test code only)."""
    c = math.sqrt(2 / math.pi)
    t = math.tanh(c * (v + 0.044715 * v**3))
    return 0.5 * (1 + t) + 0.5 * v * (1 - t * t) * c * (1 + 3 * 0.044715 * v * v)


def test_gelu_backward_agrees_with_the_formula_through_the_saturation():
    # Whatever the fix does where tanh saturates, it must not change the slope where it does not.
    # (An absolute tolerance: 1 + tanh u and 1 − tanh²u cancel for x < 0, and their rounding, a few
    # ulps, is multiplied by ½x·du/dx ≈ 0.05x³; a slope changed by the fix would be off by 1e-9 or more.)
    x = np.concatenate([np.linspace(-14.0, 14.0, 2241), [-10.0, 10.0, np.nextafter(10.0, 11), -np.nextafter(10.0, 11)]])
    dx, _ = layers.gelu_backward(np.ones_like(x), layers.gelu_forward(x)[1])
    np.testing.assert_allclose(dx, [_gelu_slope_by_hand(v) for v in x], rtol=1e-14, atol=1e-13)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_softplus_sigmoid_silu_swiglu_at_huge_inputs(dtype):
    big = np.array(HUGE[dtype], dtype)
    x = np.concatenate([big, -big])
    ones, zeros = np.ones_like(big), np.zeros_like(big)
    with np.errstate(**RAISE_ON_OVERFLOW):
        sp, sg = layers.softplus(x), layers.sigmoid(x)
        out, cache = layers.silu_forward(x)
        dx, _ = layers.silu_backward(np.ones_like(x), cache)
        a, gcache = layers.swiglu_forward(x, np.full_like(x, 0.5))
        dz1, dz3, _ = layers.swiglu_backward(np.ones_like(x), gcache)
    assert sp.dtype == sg.dtype == out.dtype == dx.dtype == a.dtype == dtype
    # softplus(z) = z + log1p(e^−z) and e^−1000 is far below half an ulp of z: exactly z, or 0.
    np.testing.assert_array_equal(sp, np.concatenate([big, zeros]))
    np.testing.assert_array_equal(sg, np.concatenate([ones, zeros]))
    np.testing.assert_array_equal(out, np.concatenate([big, zeros]))       # silu = x σ(x)
    np.testing.assert_array_equal(dx, np.concatenate([ones, zeros]))       # σ(1 + x(1 − σ))
    np.testing.assert_array_equal(a, np.concatenate([big / 2, zeros]))     # silu(z1) z3
    np.testing.assert_array_equal(dz1, np.concatenate([ones / 2, zeros]))
    np.testing.assert_array_equal(dz3, np.concatenate([big, zeros]))


@pytest.mark.parametrize("name", ["relu", "gelu"])
def test_activation_dispatch_matches_the_named_function(rng, name):
    x = rng.standard_normal((3, 4))
    fwd, bwd = layers.ACTIVATIONS[name]
    out, cache = layers.activation_forward(x, name)
    np.testing.assert_array_equal(out, fwd(x)[0])
    dout = rng.standard_normal(out.shape)
    np.testing.assert_array_equal(layers.activation_backward(dout, cache)[0], bwd(dout, fwd(x)[1])[0])


@pytest.mark.parametrize("fwd", [layers.relu_forward, layers.gelu_forward, layers.softmax_forward])
def test_elementwise_float32_in_float32_out(fwd):
    out, _ = fwd(np.linspace(-3, 3, 12, dtype=np.float32).reshape(3, 4))
    assert out.dtype == np.float32


# --------------------------------------------------------------------------- softmax
@pytest.mark.parametrize("shape, axis", [((1, 1), -1), ((1, 5), -1), ((4, 3), -1), ((4, 3), 0), ((2, 3, 4), 1)])
@pytest.mark.parametrize("seed", [0, 1])
def test_softmax_gradcheck(shape, axis, seed):
    rng = np.random.default_rng(seed)
    z = 2 * rng.standard_normal(shape)
    _assert_passed(gc.check_pair(layers.softmax_forward, layers.softmax_backward, z, rng=rng,
                                 kwargs={"axis": axis}))


def test_softmax_helper_gives_masked_minus_inf_entries_zero_probability_and_gradient(rng):
    # Top-k masks the experts it did not pick with −∞ and calls layers.softmax directly.
    z = rng.standard_normal((3, 4))
    z[0, 1] = z[2, 0] = z[2, 3] = -np.inf
    p = layers.softmax(z)
    assert p[0, 1] == p[2, 0] == p[2, 3] == 0.0
    assert p[2, 1] + p[2, 2] == pytest.approx(1.0, abs=1e-15) and np.all(np.isfinite(p))
    dz, _ = layers.softmax_backward(rng.standard_normal(z.shape), layers.SoftmaxCache(p, -1))
    assert dz[0, 1] == dz[2, 0] == dz[2, 3] == 0.0


def test_softmax_is_exact_at_logits_of_1e4():
    z = np.array([[1e4, -1e4, 0.0], [1e4, 1e4, -1e4], [-1e4, -1e4 + 1.0, -1e4]])
    p, _ = layers.softmax_forward(z)
    e = math.e
    expected = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [1 / (e + 2), e / (e + 2), 1 / (e + 2)]])
    assert np.all(np.isfinite(p))
    np.testing.assert_array_equal(p[:2], expected[:2])
    np.testing.assert_allclose(p[2], expected[2], rtol=1e-15)


def test_softmax_rows_sum_to_one_and_shift_invariance(rng):
    z = 5 * rng.standard_normal((6, 8))
    p, _ = layers.softmax_forward(z)
    np.testing.assert_allclose(p.sum(axis=-1), 1.0, rtol=0, atol=1e-15)
    shifted, _ = layers.softmax_forward(z + 1e3 * rng.standard_normal((6, 1)))
    np.testing.assert_allclose(shifted, p, rtol=0, atol=1e-12)


def test_softmax_matches_the_naive_formula_on_small_logits(rng):
    z = rng.standard_normal((3, 5))
    naive = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(layers.softmax_forward(z)[0], naive, rtol=1e-14)


def test_log_softmax_is_finite_where_log_of_softmax_is_not():
    z = np.array([1e4, -1e4])
    np.testing.assert_array_equal(layers.log_softmax(z), [0.0, -2e4])
    with np.errstate(divide="ignore"):
        assert np.isneginf(np.log(layers.softmax(z))[1])


# --------------------------------------------------------------------------- cross-entropy
@pytest.mark.parametrize("lead, C", [((1,), 1), ((1,), 4), ((5,), 3), ((2, 3), 4), ((), 5)])
@pytest.mark.parametrize("seed", [0, 1])
def test_cross_entropy_gradcheck(lead, C, seed):
    rng = np.random.default_rng(seed)
    logits = 2 * rng.standard_normal(lead + (C,))
    labels = rng.integers(0, C, size=lead)
    _assert_passed(gc.check_pair(layers.cross_entropy_forward, layers.cross_entropy_backward, logits,
                                 rng=rng, kwargs={"labels": labels}))


@pytest.mark.parametrize("C", [1, 2, 7, 1000])
def test_cross_entropy_of_uniform_logits_is_log_C(C):
    loss, _ = layers.cross_entropy_forward(np.full((3, C), 0.25), np.zeros(3, dtype=int))
    assert loss == pytest.approx(math.log(C), rel=1e-14, abs=1e-15)


def test_cross_entropy_hand_example():
    # Row 1: logits (0, ln 3) -> p = (1/4, 3/4), label 1 -> −ln(3/4).
    # Row 2: the same logits, label 0 -> −ln(1/4). Mean = (ln(4/3) + ln 4) / 2.
    logits = np.array([[0.0, math.log(3.0)], [0.0, math.log(3.0)]])
    loss, cache = layers.cross_entropy_forward(logits, np.array([1, 0]))
    assert loss == pytest.approx((math.log(4 / 3) + math.log(4)) / 2, rel=1e-14)
    # (p − onehot) / N with N = 2, times dloss = 2:
    dlogits, grads = layers.cross_entropy_backward(2.0, cache)
    np.testing.assert_allclose(dlogits, [[0.25, -0.25], [-0.75, 0.75]], rtol=1e-14)
    assert grads == {}


def test_cross_entropy_is_finite_at_huge_logits():
    loss, _ = layers.cross_entropy_forward(np.array([[1e4, -1e4]]), np.array([1]))
    assert loss == 2e4


def test_cross_entropy_empty_batch_is_zero_not_nan():
    loss, cache = layers.cross_entropy_forward(np.zeros((0, 3)), np.zeros(0, dtype=int))
    dlogits, _ = layers.cross_entropy_backward(1.0, cache)
    assert loss == 0.0 and dlogits.shape == (0, 3)


# --------------------------------------------------------------------------- bad input
def test_linear_bad_input_messages():
    x, W, b = np.ones((4, 3)), np.ones((3, 2)), np.zeros(2)
    with pytest.raises(TypeError, match="x must be a numpy array, got list"):
        layers.linear_forward([[1.0, 2.0, 3.0]], W, b)
    with pytest.raises(TypeError, match="x must have a floating dtype .* got int64"):
        layers.linear_forward(np.ones((4, 3), dtype=np.int64), W, b)
    with pytest.raises(ValueError, match=r"x must have 1 to 7 dimensions, got shape \(\)"):
        layers.linear_forward(np.array(1.0), W, b)
    with pytest.raises(ValueError, match=r"W must have 2 dimensions, got shape \(3,\)"):
        layers.linear_forward(x, np.ones(3), b)
    with pytest.raises(ValueError, match=r"b must have shape \(2,\), got \(3,\)"):
        layers.linear_forward(x, W, np.zeros(3))
    with pytest.raises(ValueError, match=r"x has width 5 but W expects 3 \(W has shape \(3, 2\)\)"):
        layers.linear_forward(np.ones((4, 5)), W, b)
    with pytest.raises(ValueError, match="x contains NaN or inf"):
        layers.linear_forward(np.where(np.eye(4, 3) > 0, np.nan, 1.0), W, b)
    with pytest.raises(ValueError, match="W contains NaN or inf"):
        layers.linear_forward(x, np.full((3, 2), np.inf), b)


@pytest.mark.parametrize("fwd", [layers.relu_forward, layers.gelu_forward])
def test_activation_bad_input_messages(fwd):
    with pytest.raises(ValueError, match="x contains NaN or inf"):
        fwd(np.array([1.0, np.nan]))
    with pytest.raises(ValueError, match="x contains NaN or inf"):
        fwd(np.array([-np.inf, 1.0]))            # gelu(−inf) would be −inf·0 = NaN
    with pytest.raises(TypeError, match="x must have a floating dtype"):
        fwd(np.array([1, 2]))


def test_unknown_activation_is_named():
    with pytest.raises(ValueError, match=r"activation must be one of 'relu', 'gelu'; got 'tanh'"):
        layers.activation_forward(np.ones(3), "tanh")


def test_softmax_bad_input_messages():
    for bad in (np.nan, np.inf, -np.inf):
        with pytest.raises(ValueError, match="z contains NaN or inf"):
            layers.softmax_forward(np.array([[0.0, 1.0], [bad, 0.0]]))
    with pytest.raises(ValueError, match="z must have at least one entry along axis -1"):
        layers.softmax_forward(np.zeros((3, 0)))
    with pytest.raises(TypeError, match="z must have a floating dtype"):
        layers.softmax_forward(np.array([[1, 2]]))
    with pytest.raises(ValueError, match=r"axis must be an integer in \[-2, 2\) for z of shape \(3, 4\), got 2"):
        layers.softmax_forward(np.zeros((3, 4)), axis=2)


def test_cross_entropy_bad_input_messages():
    logits = np.zeros((3, 4))
    with pytest.raises(TypeError, match="labels must be integers, got dtype float64"):
        layers.cross_entropy_forward(logits, np.array([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 4\) for 4 classes; got values from 0 to 4"):
        layers.cross_entropy_forward(logits, np.array([0, 4, 1]))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 4\) .* from -1 to 2"):
        layers.cross_entropy_forward(logits, np.array([-1, 2, 1]))
    with pytest.raises(ValueError, match=r"labels must have shape \(3,\) \(one per row of logits\), got \(2,\)"):
        layers.cross_entropy_forward(logits, np.array([0, 1]))
    with pytest.raises(ValueError, match="logits contains NaN or inf"):
        layers.cross_entropy_forward(np.array([[0.0, np.nan]]), np.array([0]))
    with pytest.raises(ValueError, match="logits must have at least one class"):
        layers.cross_entropy_forward(np.zeros((2, 0)), np.array([0, 0]))
    _, cache = layers.cross_entropy_forward(logits, np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="dloss must be a scalar"):
        layers.cross_entropy_backward(np.ones(3), cache)


def test_backward_rejects_a_wrong_shaped_dout():
    # Without the check, (4,) would broadcast against (3, 4) and silently give a wrong answer.
    x = np.ones((3, 4))
    for fwd, bwd, name in [(layers.relu_forward, layers.relu_backward, "dout"),
                           (layers.gelu_forward, layers.gelu_backward, "dout"),
                           (layers.softmax_forward, layers.softmax_backward, "dp")]:
        _, cache = fwd(x)
        with pytest.raises(ValueError, match=rf"{name} must have shape \(3, 4\), got \(4,\)"):
            bwd(np.ones(4), cache)
    _, cache = layers.linear_forward(x, np.ones((4, 2)), np.zeros(2))
    with pytest.raises(ValueError, match=r"dout must have shape \(3, 2\), got \(3, 4\)"):
        layers.linear_backward(np.ones((3, 4)), cache)
