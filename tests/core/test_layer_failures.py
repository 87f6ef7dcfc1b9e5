"""Issue 14, items 3–7 and 12: the MoE layer classes fail loudly and leave no broken state.

Each test here failed on the code before the fix (the issue's cases, one by one):
a failed forward left the previous batch's cache behind; SharedExpertMoELayer blamed "W1"
for its shared weights and mixed the caches of two batches; the z-loss returned inf;
update_bias took NaN and negative loads; an eval forward with auto_update failed after
writing the grads; each class had its own dtype rule; nonsense constructor arguments
were accepted; ±0.0 hashed apart; eval-mode noise was validated although ignored.
"""
import numpy as np
import pytest

from minimoe import MoELayer
from minimoe.beyond.expert_choice import ExpertChoiceMoELayer
from minimoe.beyond.hash_router import HashMoELayer, content_ids
from minimoe.beyond.lossfree import LossFreeMoELayer
from minimoe.beyond.shared_experts import SharedExpertMoELayer
from moe_helpers import assert_same_state, layer_state

d, h, E = 4, 6, 4
CLASSES = {
    "moe": lambda **kw: MoELayer(d, h, E, k=2, rng=np.random.default_rng(0), **kw),
    "hash": lambda **kw: HashMoELayer(d, h, E, k=2, rng=np.random.default_rng(0), **kw),
    "expert_choice": lambda **kw: ExpertChoiceMoELayer(d, h, E, k=2, rng=np.random.default_rng(0), **kw),
    "lossfree": lambda **kw: LossFreeMoELayer(d, h, E, k=2, rng=np.random.default_rng(0), **kw),
    "shared": lambda **kw: SharedExpertMoELayer(d, h, E, k=2, n_shared=1, rng=np.random.default_rng(0), **kw),
}
ALL = pytest.mark.parametrize("kind", list(CLASSES))


# --------------------------------------------------------------------------- 14.3
@ALL
def test_a_failed_forward_leaves_the_layer_as_it_was(kind, rng):
    """Issue 21 item 5 replaces issue 14's rule ("a failed forward clears the cache"): a call
    that raises changes nothing — cache, stats, aux_loss, params and grads are as before."""
    layer = CLASSES[kind]()
    x = rng.standard_normal((6, d))
    layer.forward(x)
    layer.backward(np.ones((6, d)))                      # a good step first
    before = layer_state(layer)
    with pytest.raises(ValueError, match="x contains NaN or inf"):
        layer.forward(np.full((5, d), np.nan))
    assert_same_state(before, layer)
    y = layer.forward(x)                                 # and the layer still works
    assert layer.backward(np.ones_like(y)).shape == x.shape


# --------------------------------------------------------------------------- 14.4
def test_shared_expert_errors_name_the_shared_weights(rng):
    layer = CLASSES["shared"]()
    x = rng.standard_normal((6, d))
    for name in ("W1_shared", "b1_shared", "W2_shared", "b2_shared"):
        good = layer.params[name].copy()
        layer.params[name][...] = np.nan
        with pytest.raises(ValueError, match=f"{name} contains NaN or inf"):
            layer.forward(x)
        layer.params[name][...] = good
    layer.params["W2_shared"] = np.zeros((1, h + 1, d))
    with pytest.raises(ValueError, match=r"W2_shared must have shape \(1, 6, 4\), got \(1, 7, 4\)"):
        layer.forward(x)


def test_shared_expert_failure_leaves_the_layer_as_it_was(rng):
    layer = CLASSES["shared"]()
    x = rng.standard_normal((6, d))
    layer.forward(x)
    layer.backward(np.ones((6, d)))
    layer.params["W1_shared"][...] = np.inf              # the routed branch succeeds, the shared one fails
    before = layer_state(layer)
    with pytest.raises(ValueError, match="W1_shared"):
        layer.forward(rng.standard_normal((6, d)))
    assert_same_state(before, layer)


def test_shared_expert_layer_uses_the_params_it_holds(rng):
    """Issue 21, finding 4: SharedExpertMoELayer ignored routed parameters replaced through
    ``layer.params`` (even a NaN or wrongly shaped W1)."""
    layer = CLASSES["shared"]()
    x = rng.standard_normal((6, d))
    y0 = layer.forward(x, train=False)
    layer.params["W2"] = 2 * layer.params["W2"]
    assert not np.allclose(layer.forward(x, train=False), y0)
    layer.params["W1"] = np.zeros((E, h, d))
    with pytest.raises(ValueError, match=r"W1 must have shape \(4, 4, 6\)"):
        layer.forward(x)
    layer.params["W1"] = np.full((E, d, h), np.nan)
    with pytest.raises(ValueError, match="W1 contains NaN or inf"):
        layer.forward(x)


# --------------------------------------------------------------------------- 14.5
def test_z_loss_overflow_is_a_clear_error(rng):
    layer = MoELayer(d, h, E, k=2, z_loss_coef=1e-3, noisy=False, dtype=np.float32, rng=rng)
    x = np.full((3, d), 1e20, dtype=np.float32)
    with np.errstate(over="ignore", invalid="ignore"), \
            pytest.raises(FloatingPointError, match="z-loss overflowed"):
        layer.forward(x)
    with pytest.raises(RuntimeError, match="call forward before backward"):
        layer.backward(np.ones((3, d), dtype=np.float32))
    big = MoELayer(d, h, E, k=2, z_loss_coef=1e-3, noisy=False, rng=rng)
    big.params["W_gate"][...] = 1e200
    with np.errstate(over="ignore", invalid="ignore"), \
            pytest.raises(FloatingPointError, match="overflowed"):
        big.forward(rng.standard_normal((3, d)))


# --------------------------------------------------------------------------- 14.6
@pytest.mark.parametrize("load, what", [
    ([1.0, np.nan, 2.0, 3.0], "finite counts"), ([1, -2, 3, 4], "finite counts"),
    ([1, 2, 3], r"shape \(4,\)"), (["a", "b", "c", "d"], r"shape \(4,\)")])
def test_update_bias_validates_load(load, what):
    layer = CLASSES["lossfree"]()
    before = layer.bias.copy()
    with pytest.raises(ValueError, match=what):
        layer.update_bias(np.array(load))
    np.testing.assert_array_equal(layer.bias, before)


def test_eval_forward_then_backward_with_auto_update(rng):
    layer = CLASSES["lossfree"](auto_update=True, bias_update_rate=0.1)
    x = rng.standard_normal((8, d))
    y = layer.forward(x, train=False)
    dx = layer.backward(np.ones_like(y))                 # no training load: the bias stays
    assert dx.shape == x.shape and np.all(layer.bias == 0)
    layer.forward(x)                                     # a training step does move it
    layer.backward(np.ones_like(y))
    assert np.any(layer.bias != 0)


# --------------------------------------------------------------------------- 14.7
@ALL
@pytest.mark.parametrize("dtype", [np.float16, np.longdouble, "banana", np.int64])
def test_one_dtype_rule_for_every_class(kind, dtype):
    with pytest.raises(TypeError, match="dtype must be"):
        CLASSES[kind](dtype=dtype)


@ALL
def test_every_class_accepts_float32_and_float64_and_keeps_float32_grads(kind, rng):
    for dtype in (np.float32, "float64"):
        layer = CLASSES[kind](dtype=dtype)
        y = layer.forward(rng.standard_normal((6, d)))
        dx = layer.backward(np.ones_like(y))
        assert y.dtype == dx.dtype == np.dtype(dtype)
        assert all(g.dtype == np.dtype(dtype) for g in layer.grads.values()), kind


def test_float32_w_noise_gradient_of_the_load_loss_at_k_equal_E(rng):
    layer = MoELayer(d, h, E, k=E, balance="load", dtype=np.float32, rng=rng)
    y = layer.forward(rng.standard_normal((6, d)).astype(np.float32))
    layer.backward(np.ones_like(y))
    assert layer.grads["W_noise"].dtype == np.float32


@pytest.mark.parametrize("kind", ["moe", "hash", "lossfree", "shared"])
def test_huge_capacity_factor_is_rejected_in_the_constructor(kind):
    with pytest.raises(ValueError, match="capacity_factor must be at most"):
        CLASSES[kind](capacity_factor=1e308)


def test_expert_choice_rejects_a_huge_capacity_factor_too():
    with pytest.raises(ValueError, match="capacity_factor must be at most"):
        ExpertChoiceMoELayer(d, h, E, capacity_factor=1e308)


def test_hash_seed_must_fit_64_bits():
    with pytest.raises(ValueError, match=r"seed must be <= 18446744073709551615"):
        HashMoELayer(d, h, E, seed=2**64)
    HashMoELayer(d, h, E, seed=2**64 - 1).forward(np.ones((2, d)))


@pytest.mark.parametrize("flag", ["noisy", "fast"])
def test_moe_flags_must_be_bools(flag):
    with pytest.raises(TypeError, match=f"{flag} must be True or False, got 'no'"):
        MoELayer(d, h, E, **{flag: "no"})


def test_lossfree_auto_update_must_be_a_bool():
    with pytest.raises(TypeError, match="auto_update must be True or False"):
        CLASSES["lossfree"](auto_update="no")


# --------------------------------------------------------------------------- 14.12 (in these files)
def test_plus_and_minus_zero_hash_to_the_same_expert():
    x = np.array([[0.0, 1.0, 2.0, 3.0], [-0.0, 1.0, 2.0, 3.0]])
    assert x[0, 0] == x[1, 0]
    ids = content_ids(x)
    assert ids[0] == ids[1]
    layer = CLASSES["hash"]()
    layer.forward(x)
    np.testing.assert_array_equal(layer.stats["topk_idx"][0], layer.stats["topk_idx"][1])


def test_eval_mode_ignores_noise_as_documented(rng):
    layer = CLASSES["moe"]()
    x = rng.standard_normal((6, d))
    y = layer.forward(x, train=False)
    np.testing.assert_array_equal(layer.forward(x, train=False, noise=np.ones((3, 3))), y)


def test_noise_shape_message_does_not_repeat_itself(rng):
    layer = CLASSES["moe"]()
    with pytest.raises(ValueError) as err:
        layer.forward(rng.standard_normal((6, d)), noise=np.ones((6, 3)))
    assert str(err.value).startswith("noise must have shape (6, 4) (one ε per token")
    with pytest.raises(ValueError, match=r"noise must have shape \(2, 3, 4\) or \(6, 4\)"):
        layer.forward(rng.standard_normal((2, 3, d)), noise=np.ones((6, 3)))


def test_float32_moe_layers_return_float32_everywhere():
    """Every MoELayer configuration of test_fast.py, both paths, train and eval."""
    from test_fast import CONFIGS
    x = np.random.default_rng(1).standard_normal((12, 3)).astype(np.float32)
    for kw in CONFIGS:
        for fast in (True, False):
            for train in (True, False):
                layer = MoELayer(3, 5, 4, rng=np.random.default_rng(0), dtype=np.float32, fast=fast, **kw)
                y = layer.forward(x, train=train)
                dx = layer.backward(np.ones_like(y))
                assert y.dtype == dx.dtype == np.float32, (kw, fast, train)
                wrong = {n: g.dtype for n, g in layer.grads.items() if g.dtype != np.float32}
                assert not wrong, (kw, fast, train, wrong)
