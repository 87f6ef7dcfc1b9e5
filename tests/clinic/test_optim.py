"""Optimizers: each update checked against steps computed by hand."""
import math

import numpy as np
import pytest

from minimoe.core.experts import Expert
from minimoe.clinic.optim import SGD, Adam, clip_grad_norm, global_norm, make_optimizer


class Box:
    """The smallest object an optimizer accepts: params and grads with identical keys."""

    def __init__(self, **params):
        self.params = {k: np.array(v, dtype=np.float64) for k, v in params.items()}
        self.grads = {k: np.zeros_like(v) for k, v in self.params.items()}


def test_sgd_plain_step_by_hand():
    box = Box(w=[1.0, 2.0], b=[[3.0]])
    box.grads["w"][...] = [0.5, -1.0]
    box.grads["b"][...] = [[2.0]]
    SGD(box, lr=0.1).step()
    np.testing.assert_allclose(box.params["w"], [0.95, 2.1], rtol=0, atol=1e-15)
    np.testing.assert_allclose(box.params["b"], [[2.8]], rtol=0, atol=1e-15)


def test_sgd_momentum_two_steps_by_hand():
    # v1 = g1 = 1;            p1 = 1 - 0.1*1 = 0.9
    # v2 = 0.9*1 + g2 = 0.9 + 2 = 2.9;  p2 = 0.9 - 0.1*2.9 = 0.61
    box = Box(w=[1.0])
    opt = SGD(box, lr=0.1, momentum=0.9)
    box.grads["w"][...] = [1.0]
    opt.step()
    assert box.params["w"][0] == pytest.approx(0.9, abs=1e-15)
    box.grads["w"][...] = [2.0]
    opt.step()
    assert box.params["w"][0] == pytest.approx(0.61, abs=1e-14)


def test_adam_first_step_is_lr_times_sign():
    # With bias correction m̂ = g and v̂ = g² at t=1, so the step is lr·g/(|g|+ε) ≈ lr·sign(g),
    # whatever the gradient's size.
    box = Box(w=[1.0, 1.0, 1.0])
    box.grads["w"][...] = [1e-3, -50.0, 7.0]
    Adam(box, lr=0.01).step()
    np.testing.assert_allclose(box.params["w"], [0.99, 1.01, 0.99], rtol=0, atol=1e-7)


def test_adam_two_steps_by_hand():
    # A scalar Adam written out with Python floats (Kingma & Ba 2015, Algorithm 1).
    lr, b1, b2, eps = 0.1, 0.9, 0.999, 1e-8
    p, m, v = 2.0, 0.0, 0.0
    for t, g in enumerate([0.5, -1.5], start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p -= lr * (m / (1 - b1**t)) / (math.sqrt(v / (1 - b2**t)) + eps)
    box = Box(w=[2.0])
    opt = Adam(box, lr=lr, beta1=b1, beta2=b2, eps=eps)
    for g in [0.5, -1.5]:
        box.grads["w"][...] = [g]
        opt.step()
    assert box.params["w"][0] == pytest.approx(p, abs=1e-14)
    # and the value itself, derived on paper: step 1 moves -0.1; step 2 has
    # m̂ = (0.9*0.05 - 0.15)/0.19 = -0.55263, v̂ = (0.999*0.00025 + 0.00225)/0.001999 = 1.25050,
    # so p = 1.9 + 0.1 * 0.55263/1.11826 = 1.949419
    assert p == pytest.approx(1.949419, abs=1e-6)


def test_updates_are_in_place():
    box = Box(w=[1.0, 2.0])
    w = box.params["w"]
    box.grads["w"][...] = [1.0, 1.0]
    for opt in (SGD(box, lr=0.1, momentum=0.5), Adam(box, lr=0.1)):
        opt.step()
        assert box.params["w"] is w


def test_clip_grad_norm_by_hand():
    grads = {"a": np.array([3.0, 0.0]), "b": np.array([[4.0]])}
    assert global_norm(grads) == pytest.approx(5.0)
    before = clip_grad_norm(grads, 1.0)
    assert before == pytest.approx(5.0)
    np.testing.assert_allclose(grads["a"], [0.6, 0.0])
    np.testing.assert_allclose(grads["b"], [[0.8]])
    assert global_norm(grads) == pytest.approx(1.0)


def test_clip_leaves_small_gradients_alone():
    grads = {"a": np.array([0.3, 0.4])}
    assert clip_grad_norm(grads, 1.0) == pytest.approx(0.5)
    np.testing.assert_array_equal(grads["a"], [0.3, 0.4])


def test_optimizer_clips_before_stepping():
    box = Box(w=[0.0, 0.0])
    box.grads["w"][...] = [30.0, 40.0]          # norm 50, clipped to 5: [3, 4]
    opt = SGD(box, lr=0.1, clip=5.0)
    opt.step()
    np.testing.assert_allclose(box.params["w"], [-0.3, -0.4])
    assert opt.last_grad_norm == pytest.approx(50.0)


def test_adam_trains_an_expert_towards_a_target(rng):
    # An integration check: repeated forward/backward/step lowers a squared error.
    ex = Expert(4, 8, rng=rng)
    x, target = rng.standard_normal((32, 4)), rng.standard_normal((32, 4))
    opt = Adam(ex, lr=1e-2)

    def loss():
        return 0.5 * float(np.sum((ex.forward(x) - target) ** 2))

    start = loss()
    for _ in range(200):
        y = ex.forward(x)
        ex.backward(y - target)
        opt.step()
    assert loss() < 0.5 * start


def test_make_optimizer():
    box = Box(w=[1.0])
    assert isinstance(make_optimizer("adam", box, lr=0.1), Adam)
    assert isinstance(make_optimizer("sgd", box, lr=0.1, momentum=0.9), SGD)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        make_optimizer("rmsprop", box, lr=0.1)


@pytest.mark.parametrize("kwargs, exc, msg", [
    (dict(lr=-1.0), ValueError, "lr must be a finite number > 0"),
    (dict(lr=0.0), ValueError, "lr must be a finite number > 0"),
    (dict(lr=0.1, momentum=1.0), ValueError, r"momentum must be in \[0, 1\)"),
    (dict(lr=0.1, momentum=-0.1), ValueError, "momentum must be a finite number >= 0"),
    (dict(lr=0.1, clip=0.0), ValueError, "clip must be a finite number > 0"),
    (dict(lr="fast"), TypeError, "lr must be a number"),
])
def test_sgd_bad_arguments(kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        SGD(Box(w=[1.0]), **kwargs)


def test_adam_bad_betas():
    with pytest.raises(ValueError, match=r"beta1 must be in \[0, 1\)"):
        Adam(Box(w=[1.0]), beta1=1.0)
    with pytest.raises(ValueError, match=r"beta2 must be in \[0, 1\)"):
        Adam(Box(w=[1.0]), beta2=1.5)


def test_bad_targets():
    with pytest.raises(TypeError, match="needs an object with dicts .params and .grads"):
        SGD(object(), lr=0.1)
    box = Box(w=[1.0])
    box.grads = {"v": np.zeros(1)}
    with pytest.raises(ValueError, match="params and grads must have the same keys"):
        SGD(box, lr=0.1)
    box = Box(w=[1.0])
    box.grads["w"] = np.zeros(2)
    with pytest.raises(ValueError, match="gradient 'w' has shape"):
        SGD(box, lr=0.1).step()


def test_nan_gradient_is_reported_when_clipping():
    grads = {"a": np.array([np.nan, 1.0])}
    with pytest.raises(ValueError, match="gradient norm is NaN or inf"):
        clip_grad_norm(grads, 1.0)


# --------------------------------------------------------------------------- issue 14: no half-done step
def _state(opt):
    """Everything a step may change: parameters, gradients, moments / velocity, t."""
    arrays = {f"p.{k}": v.copy() for k, v in opt.target.params.items()}
    arrays.update({f"g.{k}": np.array(v, copy=True) for k, v in opt.target.grads.items()})
    for attr in ("m", "v", "velocity"):
        arrays.update({f"{attr}.{k}": v.copy() for k, v in getattr(opt, attr, {}).items()})
    return arrays, opt.t


def _assert_unchanged(opt, before):
    arrays, t = _state(opt)
    assert t == before[1]
    assert arrays.keys() == before[0].keys()
    for k in arrays:
        assert np.array_equal(arrays[k], before[0][k], equal_nan=True), k


@pytest.mark.parametrize("make", [lambda b: SGD(b, lr=0.1, momentum=0.9), lambda b: Adam(b, lr=0.1),
                                  lambda b: Adam(b, lr=0.1, clip=0.5)])
@pytest.mark.parametrize("bad", ["shape", "nan", "inf", "list", "missing"])
def test_a_bad_second_gradient_leaves_everything_unchanged(make, bad):
    box = Box(a=[1.0, 2.0], b=[3.0, 4.0])
    opt = make(box)
    box.grads = {"a": np.array([10.0, -10.0]), "b": np.array([1.0, 1.0])}
    opt.step()                                    # one good step, so the moments are non-zero
    box.grads = {"a": np.array([10.0, -10.0]),    # the first gradient is fine (and big: clipping would scale it)
                 "b": {"shape": np.ones(3), "nan": np.array([np.nan, 1.0]), "inf": np.array([1.0, np.inf]),
                       "list": [1.0, 1.0], "missing": None}[bad]}
    if bad == "missing":
        del box.grads["b"]
    before = _state(opt)
    msg = {"shape": r"gradient 'b' has shape \(3,\) but the parameter has \(2,\)",
           "nan": "gradient 'b' contains NaN or inf", "inf": "gradient 'b' contains NaN or inf",
           "list": "gradient 'b' must be a numpy array, got list",
           "missing": "gradient 'b' must be a numpy array, got NoneType"}[bad]
    with pytest.raises((ValueError, TypeError), match=msg):
        opt.step()
    _assert_unchanged(opt, before)


# --------------------------------------------------------------------------- issue 21: every parameter checked first
MAKERS = {"sgd": lambda b: SGD(b, lr=0.1, clip=0.5),
          "sgd-momentum": lambda b: SGD(b, lr=0.1, momentum=0.9, clip=0.5),
          "adam": lambda b: Adam(b, lr=0.1, clip=0.5)}


def _spoil(box, bad):
    """Make parameter 'b' (or a new 'c') bad in one way; 'a', checked first, stays fine."""
    p = box.params
    if bad == "read-only":
        p["b"].flags.writeable = False
    elif bad == "read-only view":
        p["b"] = np.broadcast_to(np.array(3.0), (2,))
    elif bad == "integer":
        p["b"] = np.array([3, 4])
    elif bad == "list":
        p["b"] = [3.0, 4.0]
    elif bad == "reshaped":                      # parameter and gradient both (2, 1): consistent, but not the (2,) it was
        p["b"] = p["b"].reshape(2, 1)
        box.grads["b"] = box.grads["b"].reshape(2, 1)
    elif bad == "reshaped parameter":            # only the parameter: its gradient no longer fits
        p["b"] = p["b"].reshape(1, 2)
    elif bad == "nan parameter":
        p["b"][0] = np.nan
    elif bad == "complex gradient":
        box.grads["b"] = np.array([1.0 + 1j, 1.0])
    elif bad == "integer gradient":
        box.grads["b"] = np.array([1, 1])
    elif bad == "read-only gradient":            # clip scales gradients in place
        box.grads["b"].flags.writeable = False
    elif bad == "late":
        p["c"] = np.array([5.0])
        box.grads["c"] = np.array([1.0])
    elif bad == "late, no gradient":
        p["c"] = np.array([5.0])


BAD = {
    "read-only": "parameter 'b' is read-only",
    "read-only view": "parameter 'b' is read-only",
    "integer": "parameter 'b' must be a floating numpy array, got an array of dtype int64",
    "list": "parameter 'b' must be a floating numpy array, got list",
    "reshaped": r"parameter 'b' has shape \(2, 1\) but had \(2,\) when the optimizer was made",
    "reshaped parameter": r"parameter 'b' has shape \(1, 2\) but had \(2,\) when the optimizer was made",
    "nan parameter": "parameter 'b' contains NaN or inf",
    "complex gradient": "gradient 'b' must have a floating dtype, got complex128",
    "integer gradient": "gradient 'b' must have a floating dtype, got int64",
    "read-only gradient": "gradient 'b' is read-only, and clip scales gradients in place",
    "late": r"parameter 'c' is new: the optimizer was made for \['a', 'b'\]; make a new optimizer to train it",
    "late, no gradient": r"parameter 'c' is new: the optimizer was made for \['a', 'b'\]",
}


@pytest.mark.parametrize("make", MAKERS.values(), ids=MAKERS.keys())
@pytest.mark.parametrize("bad", BAD)
def test_a_bad_second_parameter_fails_before_anything_changes(make, bad):
    box = Box(a=[1.0, 2.0], b=[3.0, 4.0])
    opt = make(box)
    box.grads = {"a": np.array([10.0, -10.0]), "b": np.array([1.0, 1.0])}
    opt.step()                                    # one good step, so the moments are non-zero
    box.grads = {"a": np.array([10.0, -10.0]), "b": np.array([1.0, 1.0])}   # 'a' fine, big: clipping would scale it
    _spoil(box, bad)
    before = _state(opt)
    with pytest.raises((ValueError, TypeError), match=BAD[bad]):
        opt.step()
    _assert_unchanged(opt, before)


@pytest.mark.parametrize("make", MAKERS.values(), ids=MAKERS.keys())
def test_after_a_refused_step_the_fixed_model_steps_as_if_nothing_happened(make):
    # The refused step left no trace: fixing the parameter and stepping again gives exactly the
    # parameters of a twin optimizer that never saw the bad step.
    boxes = [Box(a=[1.0, 2.0], b=[3.0, 4.0]) for _ in range(2)]
    opts = [make(b) for b in boxes]
    for box, opt in zip(boxes, opts):
        box.grads = {"a": np.array([10.0, -10.0]), "b": np.array([1.0, 1.0])}
        opt.step()
        box.grads = {"a": np.array([3.0, -1.0]), "b": np.array([0.5, 2.0])}
    boxes[0].params["b"].flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        opts[0].step()
    boxes[0].params["b"].flags.writeable = True
    for opt in opts:
        opt.step()
    for k in "ab":
        np.testing.assert_array_equal(boxes[0].params[k], boxes[1].params[k])


def test_a_float32_parameter_takes_a_float64_gradient():
    # Gradients of another float dtype are cast (same kind), not refused.
    box = Box(w=[1.0, 2.0])
    box.params["w"] = box.params["w"].astype(np.float32)
    box.grads["w"] = np.array([1.0, -1.0])
    SGD(box, lr=0.5).step()
    assert box.params["w"].dtype == np.float32
    np.testing.assert_array_equal(box.params["w"], np.array([0.5, 2.5], np.float32))


def test_a_read_only_parameter_is_refused_when_the_optimizer_is_made():
    box = Box(w=[1.0, 2.0])
    box.params["w"].flags.writeable = False
    for make in MAKERS.values():
        with pytest.raises(ValueError, match="parameter 'w' is read-only; an optimizer updates parameters in place"):
            make(box)


def test_a_removed_parameter_is_simply_no_longer_trained():
    box = Box(a=[1.0], b=[2.0])
    opt = Adam(box, lr=0.1)
    b = box.params.pop("b")
    del box.grads["b"]
    box.grads["a"][...] = 1.0
    opt.step()
    assert box.params["a"][0] == pytest.approx(0.9) and b[0] == 2.0


def test_clip_grad_norm_checks_every_gradient_before_scaling_any():
    grads = {"a": np.array([30.0, 40.0]), "b": np.array([1.0, 1.0])}
    grads["b"].flags.writeable = False
    with pytest.raises(ValueError, match="gradient 'b' is read-only, and clip scales gradients in place"):
        clip_grad_norm(grads, 1.0)
    np.testing.assert_array_equal(grads["a"], [30.0, 40.0])
    grads = {"a": np.array([30.0, 40.0]), "b": np.array([1, 1])}
    with pytest.raises(TypeError, match="gradient 'b' must have a floating dtype, got int64"):
        clip_grad_norm(grads, 1.0)
    np.testing.assert_array_equal(grads["a"], [30.0, 40.0])
