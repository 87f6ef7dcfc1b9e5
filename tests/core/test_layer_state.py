"""Issue 21, items 5 and 6: a call that raises changes nothing, and nothing is silently wrong.

The failure-injection test raises inside every function of minimoe that a forward or a
backward calls, one at a time (the n-th call of a minimoe function raises, for every n), and
compares the layer's whole state — params, grads, stats, aux_loss, cache, config — with what
it was before the call. The other tests are the findings of the issue, each of which failed
on the code before its fix.
"""
import inspect
import sys
from pathlib import Path

import numpy as np
import pytest

import minimoe
from minimoe import MoELayer
from moe_helpers import assert_same_state, layer_state, make_layer

PACKAGE = str(Path(minimoe.__file__).resolve().parent)


class Injected(Exception):
    """The fault the tests inject."""


def _counts(frame):
    """A call of a minimoe function (not a generator's resumption or closing, where an
    exception raised by a tracer is only reported, never propagated)."""
    return (frame.f_code.co_filename.startswith(PACKAGE)
            and not frame.f_code.co_flags & (inspect.CO_GENERATOR | inspect.CO_COROUTINE))


def calls_inside(fn):
    """How many calls of functions defined in minimoe's source ``fn()`` makes."""
    count = [0]

    def tracer(frame, event, arg):
        if event == "call" and _counts(frame):
            count[0] += 1
        return None

    sys.settrace(tracer)
    try:
        fn()
    finally:
        sys.settrace(None)
    return count[0]


def raise_at_call(fn, n):
    """Run ``fn()`` and raise :class:`Injected` as the n-th minimoe function is entered."""
    count = [0]

    def tracer(frame, event, arg):
        if event == "call" and _counts(frame):
            count[0] += 1
            if count[0] == n:
                sys.settrace(None)
                raise Injected(frame.f_code.co_name)
        return None

    sys.settrace(tracer)
    try:
        fn()
    finally:
        sys.settrace(None)


CONFIGS = [
    dict(fast=True, balance="importance+load", z_loss_coef=0.01, capacity_factor=0.75),
    dict(fast=False, balance="importance+load", z_loss_coef=0.01, capacity_factor=0.75),
    dict(fast=True, gate="switch", balance="switch", switch_fraction="all/k", activation="swiglu",
         balance_groups="sequence"),
    dict(fast=False, gate="switch", balance="switch", switch_fraction="all", activation="swiglu",
         balance_groups="sequence"),
]


@pytest.mark.parametrize("kw", CONFIGS, ids=lambda kw: "-".join(str(v) for v in kw.values()))
def test_a_fault_anywhere_in_forward_or_backward_changes_nothing(kw):
    layer, rng = make_layer(0, d=3, h=4, E=4, k=2, **kw)
    x = rng.standard_normal((2, 4, 3))
    noise = rng.standard_normal((2, 4, 4))
    dy = rng.standard_normal((2, 4, 3))
    layer.forward(x, noise=noise)
    layer.backward(dy)                                   # a good step first: there is state to keep
    x2, noise2, dy2 = 2 * x, -noise, 3 * dy
    for what, call in (("forward", lambda: layer.forward(x2, noise=noise2)), ("backward", lambda: layer.backward(dy2))):
        n_calls = calls_inside(call)
        assert n_calls > 20, (what, n_calls)             # the tracer does see the inner functions
        for n in range(1, n_calls + 1):
            layer.forward(x, noise=noise)               # the state that must survive each fault
            layer.backward(dy)                          # (anew each time: a fault must not hide
            before = layer_state(layer)                 #  behind the last fault's leftovers)
            with pytest.raises(Injected):
                raise_at_call(call, n)
            assert_same_state(before, layer, f"{what}, fault at call {n} of {n_calls}")


def test_gradients_are_fresh_arrays_each_backward():
    """Issue 21, finding 4: the fast path's gradient arrays were the same objects after every
    backward, so a user who kept last step's gradients (micro-batch accumulation) got 2× the
    new batch."""
    for fast in (True, False):
        layer, rng = make_layer(1, d=3, h=4, E=4, fast=fast)
        x, noise, dy = rng.standard_normal((6, 3)), rng.standard_normal((6, 4)), rng.standard_normal((6, 3))
        layer.forward(x, noise=noise)
        layer.backward(dy)
        first = dict(layer.grads)
        kept = {k: v.copy() for k, v in first.items()}
        layer.forward(x, noise=noise)
        layer.backward(dy)
        for name in first:
            assert layer.grads[name] is not first[name], (fast, name)
            np.testing.assert_array_equal(first[name], kept[name], err_msg=f"fast={fast} {name}")


def test_the_cache_does_not_depend_on_the_callers_x():
    """Issue 21, finding 4: the router cached a view of x, so the in-place residual
    ``x += layer.forward(x)`` changed the W_gate gradient of that very step."""
    for fast in (True, False):
        layer, rng = make_layer(2, d=3, h=4, E=4, fast=fast)
        x, noise, dy = rng.standard_normal((6, 3)), rng.standard_normal((6, 4)), rng.standard_normal((6, 3))
        layer.forward(x.copy(), noise=noise)
        layer.backward(dy)
        want = {k: v.copy() for k, v in layer.grads.items()}
        x_res = x.copy()
        x_res += layer.forward(x_res, noise=noise)        # the residual, in place
        layer.backward(dy)
        for name in want:
            np.testing.assert_allclose(layer.grads[name], want[name], rtol=1e-13, atol=1e-15, err_msg=name)


@pytest.mark.parametrize("bad", ["False", 0, 1, None, np.array(True)])
def test_train_must_be_a_bool(bad):
    """Issue 21, finding 4: forward(train="False") ran a noisy training forward."""
    layer, rng = make_layer(3)
    before = layer_state(layer)
    with pytest.raises(TypeError, match="train must be True or False"):
        layer.forward(rng.standard_normal((5, 3)), train=bad)
    assert_same_state(before, layer)


@pytest.mark.parametrize("fast", [True, False])
def test_a_float64_dy_beyond_float32_is_an_error_not_inf(fast):
    """Issue 21, finding 4: a float64 dy beyond float32's range gave inf/NaN gradients in a
    float32 layer without a word."""
    layer = MoELayer(3, 4, 4, k=2, dtype=np.float32, fast=fast, rng=0)
    x = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)
    layer.forward(x)
    layer.backward(np.ones((5, 3)))
    before = layer_state(layer)
    with pytest.raises(ValueError, match="dy does not fit in float32"):
        layer.backward(np.full((5, 3), 1e300))
    assert_same_state(before, layer)


@pytest.mark.parametrize("fast", [True, False])
def test_a_float64_dy_gives_what_its_float32_cast_gives(fast):
    """Issue 26's surviving mutant: without the cast of dy to the layer's dtype, a float32 layer
    given a float64 dy returned float64 gradients (textbook) or differently rounded ones (fast)."""
    layer = MoELayer(3, 4, 4, k=2, dtype=np.float32, fast=fast, balance="switch", rng=0)
    rng = np.random.default_rng(1)
    x, dy = rng.standard_normal((5, 3)).astype(np.float32), rng.standard_normal((5, 3))
    noise = rng.standard_normal((5, 4)).astype(np.float32)
    layer.forward(x, noise=noise)
    dx64 = layer.backward(dy)
    g64 = {k: v.copy() for k, v in layer.grads.items()}
    dx32 = layer.backward(dy.astype(np.float32))
    assert dx64.dtype == np.float32
    np.testing.assert_array_equal(dx64, dx32)
    for name, g in layer.grads.items():
        assert g64[name].dtype == np.float32, name
        np.testing.assert_array_equal(g64[name], g, err_msg=name)


def test_a_gradient_the_dtype_cannot_hold_is_an_error():
    """A finite float32 dy can still give a gradient beyond float32 (huge weights): an error."""
    layer = MoELayer(3, 4, 4, k=2, dtype=np.float32, noisy=False, rng=0)
    layer.params["W2"][...] = 1e30
    layer.params["W_gate"][...] = 0.0
    x = np.ones((5, 3), dtype=np.float32)
    layer.forward(x)                                      # y ≈ 4e30: fine in float32
    before = layer_state(layer)
    with np.errstate(over="ignore", invalid="ignore"), \
            pytest.raises(FloatingPointError, match="overflowed in float32"):
        layer.backward(np.full((5, 3), 1e10, dtype=np.float32))    # dy W2ᵀ ≈ 1e40: beyond float32
    assert_same_state(before, layer)


def test_option_changes_are_checked_and_leave_the_layer_as_it_was():
    """Options live in one frozen config: setting one builds a checked copy (lesson 06 sets
    capacity_factor on a trained layer); a bad value changes nothing."""
    layer, rng = make_layer(4, capacity_factor=1.0)
    cfg = layer.cfg
    layer.capacity_factor = 0.5
    assert layer.cfg is not cfg and layer.cfg.capacity_factor == 0.5 and cfg.capacity_factor == 1.0
    before = layer_state(layer)
    with pytest.raises(ValueError, match="capacity_factor must be"):
        layer.capacity_factor = -1.0
    with pytest.raises(ValueError, match="switch_fraction must be one of"):
        layer.switch_fraction = "most"
    assert_same_state(before, layer)
    with pytest.raises(AttributeError):
        layer.no_such_option


def test_a_transposed_or_foreign_weight_is_named():
    """Issue 21, finding 6: a transposed W1 was reported as "x must have shape…"; a W1 given as
    a list gave a raw AttributeError; a float32 W1 in a float64 layer failed on the fast path
    only, naming out['W1']."""
    for fast in (True, False):
        layer, rng = make_layer(5, d=3, h=4, E=4, fast=fast)
        x = rng.standard_normal((5, 3))
        good = layer.params["W1"]
        cases = [(good.transpose(0, 2, 1).copy(), ValueError, r"W1 must have shape \(4, 3, 4\)"),
                 (good.tolist(), TypeError, "W1 must be a numpy array, got list"),
                 (good.astype(np.float32), TypeError, "W1 must be float64 like the layer"),
                 (good[:, :, :2].copy(), ValueError, r"W1 must have shape \(4, 3, 4\)")]
        for bad, err, msg in cases:
            layer.params["W1"] = bad
            before = layer_state(layer)
            with pytest.raises(err, match=msg):
                layer.forward(x)
            assert_same_state(before, layer)
        layer.params["W1"] = good
        for name in ("W_gate", "W_noise"):
            keep = layer.params[name]
            layer.params[name] = keep.T.copy()
            with pytest.raises(ValueError, match=rf"{name} must have shape \(3, 4\)"):
                layer.forward(x)
            layer.params[name] = keep


# --------------------------------------------------------------------------- the beyond classes too
from minimoe import ExpertChoiceMoELayer, HashMoELayer, LossFreeMoELayer, SharedExpertMoELayer  # noqa: E402

BEYOND = {
    "hash": lambda: HashMoELayer(3, 4, 4, k=2, rng=0, capacity_factor=0.75),
    "expert_choice": lambda: ExpertChoiceMoELayer(3, 4, 4, k=2, rng=0),
    "lossfree": lambda: LossFreeMoELayer(3, 4, 4, k=2, rng=0, auto_update=True, score="sigmoid"),
    "shared": lambda: SharedExpertMoELayer(3, 4, 4, k=2, n_shared=1, rng=0, balance="importance+load",
                                           activation="swiglu"),
}


@pytest.mark.parametrize("kind", list(BEYOND))
def test_a_fault_anywhere_changes_nothing_in_the_beyond_classes(kind):
    layer = BEYOND[kind]()
    rng = np.random.default_rng(9)
    for p in layer.params.values():
        p[...] = rng.standard_normal(p.shape)
    x, dy = rng.standard_normal((2, 4, 3)), rng.standard_normal((2, 4, 3))
    kw = {"noise": rng.standard_normal((2, 4, 4))} if kind == "shared" else {}
    for what, call in (("forward", lambda: layer.forward(2 * x, **kw)), ("backward", lambda: layer.backward(3 * dy))):
        layer.forward(x, **kw)
        layer.backward(dy)
        layer.forward(x, **kw)                          # a pending load for lossfree's auto_update
        n_calls = calls_inside(call)
        assert n_calls > 10, (what, n_calls)
        for n in range(1, n_calls + 1):
            layer.forward(x, **kw)                      # a clean state anew before each fault
            layer.backward(dy)
            layer.forward(x, **kw)
            before = layer_state(layer)
            with pytest.raises(Injected):
                raise_at_call(call, n)
            assert_same_state(before, layer, f"{kind} {what}, fault at call {n} of {n_calls}")


@pytest.mark.parametrize("kind", list(BEYOND))
def test_train_must_be_a_bool_in_every_class(kind):
    layer = BEYOND[kind]()
    before = layer_state(layer)
    with pytest.raises(TypeError, match="train must be True or False"):
        layer.forward(np.ones((4, 3)), train="False")
    assert_same_state(before, layer)


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("name", ["W1", "b1", "W3", "b3", "W2", "b2"])
def test_nan_in_a_swiglu_weight_is_named(fast, name):
    """Issue 21, finding 6: NaN in SwiGLU weights was reported as z1/z3 on the fast path."""
    layer = MoELayer(3, 4, 4, activation="swiglu", fast=fast, rng=0)
    layer.params[name][...] = np.nan
    with pytest.raises(ValueError, match=f"^{name} contains NaN or inf"):
        layer.forward(np.ones((5, 3)))
