"""Tests of the gradient checker itself: a checker that cannot fail proves nothing.

Each test below either feeds the checker a *wrong* gradient and expects it to
object, or feeds it a tricky *right* one (zero by design, a kink kept at a safe
distance) and expects it to accept.
"""
import re
from typing import NamedTuple

import numpy as np
import pytest

from minimoe import gradcheck as gc
from minimoe import layers


def _linear_params(rng, T=4, d_in=3, d_out=2):
    return rng.standard_normal((T, d_in)), {"W": rng.standard_normal((d_in, d_out)),
                                              "b": rng.standard_normal(d_out)}


# --------------------------------------------------------------------------- it passes, at both steps
def test_default_steps_are_1e5_and_1e6_and_both_pass(rng):
    x, params = _linear_params(rng)
    reports = gc.check_pair(layers.linear_forward, layers.linear_backward, x, params)
    assert gc.STEPS == (1e-5, 1e-6)
    assert {(r.name, r.h) for r in reports} == {(n, h) for n in ("x", "W", "b") for h in (1e-5, 1e-6)}
    assert all(r.passed for r in reports)
    assert max(r.normwise for r in reports) < gc.TOL_NORMWISE


def test_numerical_gradient_of_a_known_function():
    # f(x) = Σ x³  has gradient 3x²: an independent answer, not the code's own.
    x = np.array([[0.5, -1.0], [2.0, 0.0]])
    g = gc.numerical_gradient(lambda: float(np.sum(x**3)), x, h=1e-5)
    np.testing.assert_allclose(g, 3 * x**2, rtol=1e-9, atol=1e-9)


def test_numerical_gradient_restores_the_array_exactly(rng):
    x = rng.standard_normal((3, 4))
    before = x.copy()
    gc.numerical_gradient(lambda: float(np.sum(np.sin(x))), x, h=1e-5)
    assert np.array_equal(x, before)

    def boom():
        raise RuntimeError("loss failed")
    with pytest.raises(RuntimeError, match="loss failed"):
        gc.numerical_gradient(boom, x)
    assert np.array_equal(x, before)


# --------------------------------------------------------------------------- it fails on wrong gradients
@pytest.mark.parametrize("which", ["x", "W", "b"])
def test_gradient_scaled_by_1_001_is_caught(rng, which):
    x, params = _linear_params(rng)

    def wrong_backward(dout, cache):
        dx, grads = layers.linear_backward(dout, cache)
        if which == "x":
            dx = dx * 1.001
        else:
            grads = {**grads, which: grads[which] * 1.001}
        return dx, grads

    with pytest.raises(gc.GradCheckError, match=f"gradient check failed for {which}\\b"):
        gc.check_pair(layers.linear_forward, wrong_backward, x, params)


def test_classic_softmax_bug_is_caught(rng):
    # Forgetting the −p pᵀ part of the Jacobian: dz = p ⊙ dp.
    z = rng.standard_normal((3, 4))
    wrong = lambda dp, cache: (cache.p * dp, {})  # noqa: E731
    with pytest.raises(gc.GradCheckError, match="failed for x"):
        gc.check_pair(layers.softmax_forward, wrong, z)


def test_missing_gradient_key_is_reported(rng):
    x, params = _linear_params(rng)
    forgetful = lambda dout, cache: (layers.linear_backward(dout, cache)[0], {"W": np.zeros((3, 2))})  # noqa: E731
    with pytest.raises(gc.GradCheckError, match=r"no gradient for \['b'\]"):
        gc.check_pair(layers.linear_forward, forgetful, x, params)


def test_wrong_gradient_shape_is_reported():
    with pytest.raises(gc.GradCheckError, match=r"W: analytic gradient has shape \(2, 3\), expected \(3, 2\)"):
        gc.compare("W", np.zeros((2, 3)), np.zeros((3, 2)))


def test_elementwise_criterion_catches_one_bad_entry_the_norm_would_miss(rng):
    n = rng.standard_normal((100, 100))
    n[17, 42] = 0.01                       # a small entry, where the absolute tolerance rules
    a = n.copy()
    a[17, 42] += 5e-7                      # wrong by 5e-7 > 1e-7 + 1e-5·0.01
    r = gc.compare("W", a, n)
    assert r.normwise < gc.TOL_NORMWISE    # the normwise criterion alone would pass it ...
    assert not r.passed                    # ... the elementwise one does not,
    assert r.worst_index == (17, 42)       # and it points at the culprit.
    assert r.worst_excess > 1


def test_one_bad_entry_is_caught_end_to_end(rng):
    # The same, through check_pair on a 40×30 weight: corrupt the smallest entry of dW.
    x = rng.standard_normal((6, 40))
    W, b = rng.standard_normal((40, 30)), rng.standard_normal(30)

    def one_bad_entry(dout, cache):
        dx, g = layers.linear_backward(dout, cache)
        dW = g["W"].copy()
        dW[np.unravel_index(np.argmin(np.abs(dW)), dW.shape)] += 5e-7
        return dx, {"W": dW, "b": g["b"]}

    with pytest.raises(gc.GradCheckError, match="failed for W") as info:
        gc.check_pair(layers.linear_forward, one_bad_entry, x, {"W": W}, kwargs={"b": b},
                      wrt_x=False, h=1e-5)
    # The report table shows the normwise error would have passed on its own.
    row = re.search(r"^W\s+\(40, 30\)\s+1e-05\s+(\S+)\s.*NO$", str(info.value), re.M)
    assert row is not None and float(row.group(1)) < gc.TOL_NORMWISE


# --------------------------------------------------------------------------- zero by design
def test_zero_gradient_with_roundoff_noise_passes_by_the_zero_norm_rule():
    n = np.array([3e-10, 0.0, -1e-11, 0.0])      # what finite differences give for a true 0
    r = gc.compare("c", np.zeros(4), n)
    assert r.normwise == 1.0                      # noise over noise: the normwise ratio is useless
    assert r.passed                               # so the elementwise test decides


def test_zero_norm_rule_does_not_hide_a_real_error():
    r = gc.compare("c", np.zeros(4), np.array([1e-3, 0, 0, 0]))
    assert not r.passed


class _ShiftCache(NamedTuple):
    softmax: tuple


def _shifted_softmax_forward(z, c):
    """p = softmax(z + c) with one shift c_t per row: p does not depend on c at all."""
    p, cache = layers.softmax_forward(z + c[:, None])
    return p, _ShiftCache(cache)


def _shifted_softmax_backward(dp, cache):
    dz, _ = layers.softmax_backward(dp, cache.softmax)
    return dz, {"c": np.zeros(dz.shape[0])}      # exactly zero, by the invariance


def test_zero_by_design_passes_end_to_end():
    rng = np.random.default_rng(0)
    z, c = 3 * rng.standard_normal((20, 4)), 10 * rng.standard_normal(20)
    reports = gc.check_pair(_shifted_softmax_forward, _shifted_softmax_backward, z, {"c": c}, rng=rng)
    c_reports = [r for r in reports if r.name == "c"]
    assert all(r.passed for r in reports)
    # The numeric gradient really is roundoff noise, not exactly 0 (else this test proves nothing):
    assert any(r.numeric != 0 and r.normwise >= gc.TOL_NORMWISE for r in c_reports)


# --------------------------------------------------------------------------- kinks
def _max_loss(x):
    """L = max(x) with selection argmax(x); dL/dx is one-hot at the argmax."""
    return lambda: (float(np.max(x)), int(np.argmax(x)))


def _onehot_at_max(x):
    g = np.zeros_like(x)
    g[np.argmax(x)] = 1.0
    return g


@pytest.mark.parametrize("margin", [1e-7, 5e-6])
def test_kink_closer_than_the_step_raises_kink_error(margin):
    x = np.array([0.3, 1.0, 1.0 - margin, -0.5])
    before = x.copy()
    with pytest.raises(gc.KinkError, match=r"perturbing x\[\d\] .* changed the discrete selection"):
        gc.check_gradients(_max_loss(x), {"x": x}, {"x": _onehot_at_max(x)})
    assert np.array_equal(x, before)


@pytest.mark.parametrize("margin", [1e-3, 0.5])
def test_kink_at_safe_margin_passes(margin):
    x = np.array([0.3, 1.0, 1.0 - margin, -0.5])
    reports = gc.check_gradients(_max_loss(x), {"x": x}, {"x": _onehot_at_max(x)})
    assert all(r.passed for r in reports) and len(reports) == 2


def test_without_a_selection_a_crossed_kink_reports_a_bogus_error():
    # Why the selection signature exists: without it the jump looks like a gradient error.
    x = np.array([0.3, 1.0, 1.0 - 1e-7, -0.5])
    with pytest.raises(gc.GradCheckError):
        gc.check_gradients(lambda: float(np.max(x)), {"x": x}, {"x": _onehot_at_max(x)})


class _KeepMaxCache(NamedTuple):
    mask: np.ndarray  # (T, n) one-hot of each row's argmax


def _keep_max_forward(x):
    mask = (np.arange(x.shape[-1]) == np.argmax(x, axis=-1)[:, None]).astype(x.dtype)
    return x * mask, _KeepMaxCache(mask)


def _keep_max_backward(dout, cache):
    return dout * cache.mask, {}


def test_check_pair_selection_detects_a_kink_and_passes_far_from_one():
    sel = lambda out, cache: cache.mask  # noqa: E731
    near = np.array([[2.0, 2.0 - 1e-8, 0.0], [0.0, 1.0, -1.0]])
    with pytest.raises(gc.KinkError):
        gc.check_pair(_keep_max_forward, _keep_max_backward, near, selection=sel)
    far = np.array([[2.0, 2.0 - 1e-3, 0.0], [0.0, 1.0, -1.0]])
    assert all(r.passed for r in gc.check_pair(_keep_max_forward, _keep_max_backward, far, selection=sel))


# --------------------------------------------------------------------------- bad arguments
def test_checker_refuses_float32():
    x32 = np.ones((2, 3), dtype=np.float32)
    with pytest.raises(TypeError, match="gradient checks need float64, but x has dtype float32"):
        gc.numerical_gradient(lambda: 0.0, x32)
    with pytest.raises(TypeError, match="but W has dtype float32"):
        gc.check_pair(layers.linear_forward, layers.linear_backward, np.ones((2, 3)),
                      {"W": np.ones((3, 2), np.float32), "b": np.zeros(2)})


def test_checker_rejects_bad_steps_and_missing_gradients():
    x = np.ones(3)
    with pytest.raises(ValueError, match="h must be a positive step"):
        gc.check_gradients(lambda: float(x.sum()), {"x": x}, {"x": np.ones(3)}, h=0.0)
    with pytest.raises(gc.GradCheckError, match=r"no analytic gradient for \['x'\]"):
        gc.check_gradients(lambda: float(x.sum()), {"x": x}, {})


def test_format_reports_marks_failures():
    good = gc.compare("W", np.ones(3), np.ones(3), 1e-5)
    bad = gc.compare("b", np.ones(3), 1.001 * np.ones(3), 1e-5)
    table = gc.format_reports([good, bad])
    lines = table.splitlines()
    assert lines[0].split()[:2] == ["param", "shape"]
    assert lines[1].startswith("W") and lines[1].endswith("yes")
    assert lines[2].startswith("b") and lines[2].endswith("NO")
    assert "pass: normwise < 1e-08" in lines[-1]


def test_rel_error_values():
    assert gc.rel_error(np.zeros(3), np.zeros(3)) == 0.0
    assert gc.rel_error([3.0, 4.0], [0.0, 0.0]) == 1.0
    assert gc.rel_error([1.0, 0.0], [1.0, 1e-6]) == pytest.approx(1e-6)


# --------------------------------------------------------------------------- issue 14: it cannot be fooled
def _doubled_linear_backward(dout, cache):
    """linear_backward, every gradient 2× too big."""
    dx, grads = layers.linear_backward(dout, cache)
    return 2 * dx, {k: 2 * v for k, v in grads.items()}


@pytest.mark.parametrize("dout_scale", [1e-3, 1e-6, 1e-9, 1e-12])
def test_a_2x_wrong_backward_fails_however_small_dout_is(rng, dout_scale):
    # With dout scaled down, every gradient (and the finite-difference noise) shrinks
    # with it; an absolute tolerance alone would wave the 2× error through.
    x, params = _linear_params(rng)
    dout = dout_scale * rng.standard_normal((4, 2))
    with pytest.raises(gc.GradCheckError, match="gradient check failed for W, b, x"):
        gc.check_pair(layers.linear_forward, _doubled_linear_backward, x, params, dout)


@pytest.mark.parametrize("dout_scale", [1e-3, 1e-6, 1e-9, 1e-12])
def test_a_right_backward_still_passes_with_small_dout(rng, dout_scale):
    # The scaled tolerance is not a stricter rule in disguise: the right gradient passes.
    x, params = _linear_params(rng)
    dout = dout_scale * rng.standard_normal((4, 2))
    reports = gc.check_pair(layers.linear_forward, layers.linear_backward, x, params, dout)
    assert all(r.passed for r in reports)


def test_a_right_softmax_backward_passes_with_small_dout(rng):
    # A nonlinear pair, where finite differences carry truncation error too.
    z = rng.standard_normal((5, 4))
    dout = 1e-9 * rng.standard_normal((5, 4))
    assert all(r.passed for r in gc.check_pair(layers.softmax_forward, layers.softmax_backward, z, dout=dout))


def test_zero_dout_is_refused_not_passed(rng):
    x, params = _linear_params(rng)
    with pytest.raises(gc.GradientsTooSmallError, match="gradients too small to check: scale dout"):
        gc.check_pair(layers.linear_forward, _doubled_linear_backward, x, params, np.zeros((4, 2)))


def test_check_gradients_refuses_when_every_gradient_is_below_zero_norm():
    # A generic loss_fn whose loss is 1e-9 × a linear function: the checker cannot know the
    # loss's size, so at the default scale it refuses rather than pass a 2× error.
    x = np.array([0.3, -1.2, 0.7])
    w = 1e-9 * np.array([1.0, 2.0, -0.5])
    with pytest.raises(gc.GradientsTooSmallError, match="gradients too small to check: scale dout"):
        gc.check_gradients(lambda: float(w @ x), {"x": x}, {"x": 2 * w})
    # Told the loss's size, it judges (and rejects) the same 2× error:
    with pytest.raises(gc.GradCheckError, match="failed for x"):
        gc.check_gradients(lambda: float(w @ x), {"x": x}, {"x": 2 * w}, scale=1e-9)


def test_scaled_tolerances_in_compare():
    n = 1e-9 * np.array([1.0, -2.0, 0.5])
    assert gc.compare("W", 2 * n, n).passed                     # §4's absolute rule alone cannot tell
    assert not gc.compare("W", 2 * n, n, scale=1e-9).passed     # scaled to the loss, it can
    assert gc.compare("W", n * (1 + 1e-10), n, scale=1e-9).passed
    with pytest.raises(ValueError, match=r"scale must be in \(0, 1\]"):
        gc.compare("W", n, n, scale=0.0)


def test_normwise_rule_rejects_a_1e6_relative_error():
    # 1e-6 relative everywhere passes the elementwise rule (1e-6|n| <= 1e-7 + 1e-5|n|): only
    # the normwise rule (< 1e-8) rejects it. Loosening that rule to 1e-4 would pass it.
    n = np.random.default_rng(3).uniform(0.5, 2.0, size=(20, 10))
    r = gc.compare("W", n * (1 + 1e-6), n)
    assert r.worst_excess <= 1.0                      # the elementwise rule is satisfied ...
    assert r.normwise == pytest.approx(1e-6, rel=1e-3)
    assert not r.passed                               # ... and still it fails
    assert gc.compare("W", n * (1 + 1e-9), n).passed  # while 1e-9 relative passes
    assert gc.TOL_NORMWISE == 1e-8


def test_normwise_rule_rejects_a_1e6_relative_error_end_to_end(rng):
    x, params = _linear_params(rng)

    def slightly_off(dout, cache):
        dx, g = layers.linear_backward(dout, cache)
        return dx, {**g, "W": g["W"] * (1 + 1e-6)}

    with pytest.raises(gc.GradCheckError, match=r"failed for W\b"):
        gc.check_pair(layers.linear_forward, slightly_off, x, params)


# --------------------------------------------------------------------------- issue 14: misuse gets named errors
def test_backward_returning_only_dx_is_named(rng):
    x, params = _linear_params(rng)
    only_dx = lambda dout, cache: layers.linear_backward(dout, cache)[0]  # noqa: E731
    with pytest.raises(TypeError, match=r"backward must return a pair \(dx, grads\).*got a ndarray of shape \(4, 3\)"):
        gc.check_pair(layers.linear_forward, only_dx, x, params)


def test_grads_as_a_list_is_named(rng):
    x, params = _linear_params(rng)

    def as_list(dout, cache):
        dx, g = layers.linear_backward(dout, cache)
        return dx, [g["W"], g["b"]]

    with pytest.raises(TypeError, match=r"gradients as a dict \{name: array\} with the keys of params \['W', 'b'\], got list"):
        gc.check_pair(layers.linear_forward, as_list, x, params)


@pytest.mark.parametrize("h", ["1e-5", None, [1e-5, "x"], True, -1e-5, float("nan"), ()])
def test_bad_steps_are_named(rng, h):
    x, params = _linear_params(rng)
    with pytest.raises(ValueError, match=r"h must be a positive step \(a number such as 1e-5\)"):
        gc.check_pair(layers.linear_forward, layers.linear_backward, x, params, h=h)


def test_an_int_seed_is_a_valid_rng(rng):
    x, params = _linear_params(rng)
    a = gc.check_pair(layers.linear_forward, layers.linear_backward, x, params, rng=7)
    b = gc.check_pair(layers.linear_forward, layers.linear_backward, x, params, rng=np.random.default_rng(7))
    assert a == b and all(r.passed for r in a)
    with pytest.raises(TypeError, match="rng must be an int seed, a numpy.random.SeedSequence or a numpy.random.Generator, got str"):
        gc.check_pair(layers.linear_forward, layers.linear_backward, x, params, rng="seven")


def test_empty_arrays_are_refused(rng):
    _, params = _linear_params(rng)
    with pytest.raises(ValueError, match=r"x is empty \(shape \(0, 3\)\): there is no gradient to check"):
        gc.check_pair(layers.linear_forward, layers.linear_backward, np.zeros((0, 3)), params)
    with pytest.raises(ValueError, match=r"x is empty"):
        gc.numerical_gradient(lambda: 0.0, np.zeros(0))
    with pytest.raises(ValueError, match="arrays is empty: there is nothing to check"):
        gc.check_gradients(lambda: 0.0, {}, {})


def test_read_only_arrays(rng):
    x, params = _linear_params(rng)
    x.flags.writeable = False
    params["W"].flags.writeable = False
    # check_pair works on copies: read-only inputs are fine and stay untouched.
    assert all(r.passed for r in gc.check_pair(layers.linear_forward, layers.linear_backward, x, params))
    # check_gradients perturbs the caller's arrays: a read-only one gets a named error.
    with pytest.raises(ValueError, match="W is read-only: the checker perturbs it in place"):
        gc.check_gradients(lambda: float(np.sum(params["W"])), {"W": params["W"]}, {"W": np.ones((3, 2))})


class _NoisyScale:
    """A layer y = x·w + ε with fresh noise ε on every forward (unless ``noise`` is given)."""

    def __init__(self):
        self.params = {"w": np.array([1.5])}
        self.grads = {}
        self.rng = np.random.default_rng(0)

    def forward(self, x, noise=None):
        self.x = x
        eps = self.rng.standard_normal(x.shape) if noise is None else noise
        return x * self.params["w"] + eps

    def backward(self, dy):
        self.grads = {"w": np.array([np.sum(dy * self.x)])}
        return dy * self.params["w"]


def test_noise_redrawn_on_every_call_is_named(rng):
    x = rng.standard_normal((4, 3))
    with pytest.raises(ValueError, match="noise is redrawn on every call"):
        gc.check_layer(_NoisyScale(), x)
    # With the noise fixed, the same layer checks fine.
    assert all(r.passed for r in gc.check_layer(_NoisyScale(), x, forward_kwargs={"noise": np.ones((4, 3))}))


def test_noisy_moe_layer_without_fixed_noise_is_named(rng):
    from minimoe.core.moe import MoELayer
    layer = MoELayer(6, 8, 4, k=2, noisy=True, rng=np.random.default_rng(0))
    x = rng.standard_normal((5, 6))
    with pytest.raises(ValueError, match=r"MoELayer.forward gave different outputs .* noise is redrawn on every call"):
        gc.check_layer(layer, x)


def test_a_nondeterministic_loss_fn_is_named():
    x = np.ones(3)
    draws = np.random.default_rng(0)
    with pytest.raises(ValueError, match="loss_fn.. is not deterministic.*noise is redrawn on every call"):
        gc.check_gradients(lambda: float(np.sum(x) + draws.standard_normal()), {"x": x}, {"x": np.ones(3)})


def test_zero_by_design_with_a_small_loss_still_passes():
    # A softmax of one entry is constant: its gradient is exactly 0, the backward says 0,
    # and that is checkable (a backward claiming 0.5 would fail). Not a refusal.
    z = np.array([[0.7]])
    assert all(r.passed for r in gc.check_pair(layers.softmax_forward, layers.softmax_backward, z))
    wrong = lambda dp, cache: (np.full_like(dp, 0.5), {})  # noqa: E731
    with pytest.raises(gc.GradCheckError, match="failed for x"):
        gc.check_pair(layers.softmax_forward, wrong, z)


def test_a_loss_that_is_zero_by_design_passes_and_a_tiny_one_is_refused(rng):
    # Cross-entropy over one class is log 1 = 0 whatever the logits: gradient 0, backward 0.
    logits = rng.standard_normal((3, 1))
    labels = np.zeros(3, dtype=int)
    assert all(r.passed for r in gc.check_pair(layers.cross_entropy_forward, layers.cross_entropy_backward,
                                               logits, kwargs={"labels": labels}))
    # dout of 1e-200 still has all its digits: the 2× error is caught ...
    x, params = _linear_params(rng)
    with pytest.raises(gc.GradCheckError, match="failed for W, b, x"):
        gc.check_pair(layers.linear_forward, _doubled_linear_backward, x, params,
                      1e-200 * rng.standard_normal((4, 2)))
    # ... at 1e-300, near the subnormals, the check refuses rather than pass.
    with pytest.raises(gc.GradientsTooSmallError, match="gradients too small to check: scale dout"):
        gc.check_pair(layers.linear_forward, _doubled_linear_backward, x, params,
                      1e-300 * rng.standard_normal((4, 2)))


# --------------------------------------------------------------------------- as_pair: several inputs
def _mul_forward(a, b, c):
    """out = a ⊙ b + W·c with a parameter-free second and third input, c's weight fixed."""
    return a * b + 3.0 * c, (a, b)


def _mul_backward(dout, cache):
    a, b = cache
    return dout * b, dout * a, 3.0 * dout, {}


def test_as_pair_names_the_extra_inputs_and_check_pair_checks_them(rng):
    a, b, c = (rng.standard_normal((3, 2)) for _ in range(3))
    pair = gc.as_pair(_mul_backward, "b", "c")
    dx, grads = pair(np.ones((3, 2)), (a, b))
    np.testing.assert_array_equal(dx, b)          # d(a⊙b)/da = b, by hand
    assert set(grads) == {"b", "c"}
    np.testing.assert_array_equal(grads["b"], a)
    np.testing.assert_array_equal(grads["c"], np.full((3, 2), 3.0))
    reports = gc.check_pair(_mul_forward, pair, a, {"b": b, "c": c}, rng=rng)
    assert {r.name for r in reports} == {"x", "b", "c"}


def test_as_pair_lets_check_pair_catch_a_wrong_second_input_gradient(rng):
    a, b, c = (rng.standard_normal((3, 2)) for _ in range(3))

    def wrong(dout, cache):
        da, db, dc, g = _mul_backward(dout, cache)
        return da, db * 1.001, dc, g
    with pytest.raises(gc.GradCheckError, match="b"):
        gc.check_pair(_mul_forward, gc.as_pair(wrong, "b", "c"), a, {"b": b, "c": c}, rng=rng)


def test_as_pair_keeps_parameter_gradients_and_refuses_a_miscount():
    pair = gc.as_pair(lambda d, c: (d, 2 * d, {"W": 5 * d}), "noisy")
    dx, grads = pair(np.ones(2), None)
    assert set(grads) == {"noisy", "W"} and np.all(grads["W"] == 5)
    with pytest.raises(TypeError, match=r"returned 3 input gradient\(s\) but as_pair was given names for 2"):
        gc.as_pair(_mul_backward, "b")(np.ones(2), (np.ones(2), np.ones(2)))
    with pytest.raises(TypeError, match=r"must return the input gradients then a dict.*\(dx, d_b, grads\)"):
        gc.as_pair(lambda d, c: (d, d), "b")(np.ones(2), None)
    with pytest.raises(TypeError, match="distinct strings"):
        gc.as_pair(_mul_backward, "b", "b")
    with pytest.raises(TypeError, match=r"\['W'\] are also parameter-gradient keys"):
        gc.as_pair(lambda d, c: (d, d, {"W": d}), "W")(np.ones(2), None)


# --------------------------------------------------------------------------- issue 26: the surviving mutant
def test_too_small_to_resolve_is_measured_against_the_loss_not_an_absolute_1e7():
    # Gradients of a loss of size 1e-9 are ~1e-9: below the absolute ZERO_NORM = 1e-7, but
    # not "too small to resolve" once that threshold is scaled by the loss (scale·ZERO_NORM).
    # A 1e-6 relative error passes the elementwise rule, so only the normwise rule can reject
    # it: a checker that skipped it here (threshold not scaled) would pass this error.
    n = 1e-9 * np.random.default_rng(3).uniform(0.5, 2.0, size=(20, 10))
    r = gc.compare("W", n * (1 + 1e-6), n, scale=1e-9)
    assert r.worst_excess <= 1.0                          # elementwise: satisfied
    assert np.linalg.norm(n) < gc.ZERO_NORM               # below the unscaled threshold ...
    assert not r.passed                                   # ... and still judged, and rejected
    assert gc.compare("W", n * (1 + 1e-10), n, scale=1e-9).passed


def test_a_1e6_relative_error_is_caught_with_a_tiny_dout_end_to_end(rng):
    x, params = _linear_params(rng)
    dout = 1e-9 * rng.standard_normal((4, 2))

    def slightly_off(dout, cache):
        dx, g = layers.linear_backward(dout, cache)
        return dx, {**g, "W": g["W"] * (1 + 1e-6)}

    with pytest.raises(gc.GradCheckError, match=r"failed for W\b"):
        gc.check_pair(layers.linear_forward, slightly_off, x, params, dout)


# --------------------------------------------------------------------------- issue 21: the error budget
class _BigAndSmallCache(NamedTuple):
    x: np.ndarray
    v: np.ndarray


def _big_and_small_forward(x, W, v):
    """out = x W + 1e-3 tanh(v): W's gradient is O(|x|), v's is ~1e-3, the loss O(1e3)."""
    return x @ W + 1e-3 * np.tanh(v), _BigAndSmallCache(x, v)


def _big_and_small_backward(dout, cache):
    dv = 1e-3 * (1 - np.tanh(cache.v) ** 2) * dout.sum(axis=0)
    return None, {"W": cache.x.T @ dout, "v": dv}          # dx: not checked (wrt_x=False)


def _big_and_small(rng):
    x = 50 * rng.standard_normal((8, 3))
    return x, {"W": rng.standard_normal((3, 2)), "v": rng.standard_normal(2)}


class _BigAndSmallLayer:
    """The same as a layer object (params, grads, forward, backward), for check_layer."""

    def __init__(self, params):
        self.params, self.grads = {k: np.array(v) for k, v in params.items()}, {}

    def forward(self, x):
        out, self.cache = _big_and_small_forward(x, **self.params)
        return out

    def backward(self, dy):
        dx, self.grads = _big_and_small_backward(dy, self.cache)
        return dx


def test_a_small_gradient_in_a_large_loss_is_not_failed_for_roundoff(rng):
    # v's gradient is right, but ~1e-3 beside a loss of size Λ ~ 1e3: the rounding error of
    # the central difference, ≈ u·Λ/h ≈ 1e-7 at h = 1e-6, is 1e-4 of it — far above 1e-8, so
    # the normwise rule alone fails a correct gradient. The error budget allows for it.
    x, params = _big_and_small(rng)
    reports = gc.check_pair(_big_and_small_forward, _big_and_small_backward, x, params, wrt_x=False)
    assert all(r.passed for r in reports)
    v_worst = max(r.normwise for r in reports if r.name == "v")
    assert v_worst > gc.TOL_NORMWISE            # the plain normwise rule would have failed it
    # The budget is set by Λ = Σ|out ⊙ dout|, the size of the terms, not by |L|: with dout
    # orthogonal to out, L = 0 at the point but its rounding error is the same.
    out = _big_and_small_forward(x, **params)[0]
    dout = rng.standard_normal(out.shape)
    dout -= out * np.sum(out * dout) / np.sum(out * out)
    assert abs(np.sum(out * dout)) < 1e-9 * np.sum(np.abs(out * dout))
    assert all(r.passed for r in gc.check_pair(_big_and_small_forward, _big_and_small_backward, x, params, dout,
                                               wrt_x=False))
    layer = _BigAndSmallLayer(params)
    assert all(r.passed for r in gc.check_layer(layer, x, dout, wrt_x=False))
    # ... while an error in the same check is still found, in W and in v:
    for name, factor in (("W", 1 + 1e-6), ("v", 1 + 1e-2)):
        def wrong(dout, cache, name=name, factor=factor):
            dx, g = _big_and_small_backward(dout, cache)
            return dx, {**g, name: g[name] * factor}
        with pytest.raises(gc.GradCheckError, match=rf"failed for {name}\b"):
            gc.check_pair(_big_and_small_forward, wrong, x, params, wrt_x=False)


def _exp_forward(x):
    """out = exp(30 x)/30: slope exp(30x), third derivative 900 exp(30x) — a curved function."""
    return np.exp(30 * x) / 30, x


def _exp_backward(dout, x):
    return dout * np.exp(30 * x), {}


def test_a_curved_function_is_not_failed_for_truncation(rng):
    # Central differences err by h²/6·f''' (relative 1.5e-8 here at h = 1e-5): above 1e-8.
    # The two steps measure it (the larger step's result moves by it, the smaller one's by
    # 1/100 of it) and the budget allows it; a 1e-6 relative error is still caught.
    x = rng.uniform(-0.1, 0.1, size=(3, 4))
    reports = gc.check_pair(_exp_forward, _exp_backward, x)
    assert all(r.passed for r in reports)
    at_1e5 = [r for r in reports if r.h == 1e-5]
    assert at_1e5[0].normwise > gc.TOL_NORMWISE         # the plain rule fails it at h = 1e-5
    off = lambda dout, c: (_exp_backward(dout, c)[0] * (1 + 1e-6), {})  # noqa: E731
    with pytest.raises(gc.GradCheckError, match="failed for x"):
        gc.check_pair(_exp_forward, off, x)


def test_compare_allows_the_error_budget_entry_by_entry():
    n = np.array([1.0, 0.0])
    a = np.array([1.0, 3e-7])                     # off by 3e-7 where the gradient is 0
    assert not gc.compare("b", a, n).passed       # beyond 1e-7 + 1e-5·|n|, and normwise
    assert gc.compare("b", a, n, fd_error=np.array([0.0, 5e-7])).passed   # within the budget there
    wrong_entry = gc.compare("b", a, n, fd_error=np.array([5e-7, 0.0]))  # the same ‖e‖, the wrong entry:
    assert wrong_entry.normwise < wrong_entry.allowed and not wrong_entry.passed  # normwise ok, elementwise not
    # The normwise allowance is 1e-8 + ‖e‖/max(‖a‖, ‖n‖):
    m = np.random.default_rng(3).uniform(0.5, 2.0, size=(20, 10))
    r = gc.compare("W", m * (1 + 1e-6), m, fd_error=2e-6 * np.abs(m))
    assert r.passed and r.allowed == pytest.approx(gc.TOL_NORMWISE + 2e-6 / (1 + 1e-6))
    assert not gc.compare("W", m * (1 + 1e-6), m, fd_error=1e-7 * np.abs(m)).passed
    with pytest.raises(ValueError, match="fd_error must be finite and >= 0"):
        gc.compare("W", m, m, fd_error=-1.0)


def test_the_error_budget_is_rounding_plus_measured_truncation():
    from minimoe.core.gradcheck_guards import U, fd_error
    numeric = {1e-5: {"x": np.array([2.0 + 3e-10, 1.0])}, 1e-6: {"x": np.array([2.0 + 3e-12, 1.0])}}
    c = (3e-10 - 3e-12) / (1e-10 - 1e-12)                  # n(h) = 2 + c h²: c = 3
    for h in (1e-5, 1e-6):
        rounding = gc.ROUNDOFF * U * 50.0 / h
        np.testing.assert_allclose(fd_error(numeric, "x", h, 50.0), [rounding + c * h**2, rounding], rtol=1e-6)
    one_step = {1e-5: numeric[1e-5]}                        # one step: nothing to measure c from
    np.testing.assert_allclose(fd_error(one_step, "x", 1e-5, 50.0), gc.ROUNDOFF * U * 50.0 / 1e-5)


def test_loss_size_is_checked_and_defaults_to_the_loss(rng):
    x = rng.standard_normal(5)
    loss = lambda: float(np.sum(np.exp(x)))  # noqa: E731   (positive terms: Λ = |L|)
    r1 = gc.check_gradients(loss, {"x": x}, {"x": np.exp(x)})
    r2 = gc.check_gradients(loss, {"x": x}, {"x": np.exp(x)}, loss_size=loss())
    assert r1 == r2
    with pytest.raises(ValueError, match="loss_size must be a finite number >= 0"):
        gc.check_gradients(loss, {"x": x}, {"x": np.exp(x)}, loss_size=-1.0)
    with pytest.raises(gc.GradCheckError, match=r"x: analytic gradient has shape \(4,\), expected \(5,\)"):
        gc.check_gradients(loss, {"x": x}, {"x": np.exp(x[:4])})
