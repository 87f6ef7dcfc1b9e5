"""MoELayer: whole-layer gradient checks, the public contract, the k=1 trap, bad input."""
import doctest

import numpy as np
import pytest

import minimoe
import minimoe.core.balance
from minimoe import MoELayer
from minimoe.core.gradcheck import GradCheckError, KinkError, check_layer

from moe_helpers import assert_margins, make_layer


CONFIGS = [  # (id, layer kwargs, x shape, train)
    ("topk-k2-noisy-importance", dict(k=2, balance="importance"), (8, 3), True),
    ("topk-k1-clean-switch-z", dict(k=1, noisy=False, balance="switch", z_loss_coef=0.1), (8, 3), True),
    ("switch-k1-noisy-load-drops", dict(k=1, gate="switch", balance="load", capacity_factor=1.0), (8, 3), True),
    ("dense-clean-importance-z-BSd", dict(gate="dense", noisy=False, balance="importance", z_loss_coef=0.05),
     (2, 3, 3), True),
    ("topk-kE-noisy-importance", dict(k=4, balance="importance", z_loss_coef=0.01), (6, 3), True),
    ("topk-k2-imp+load-drops-gelu-BSd", dict(k=2, balance="importance+load", capacity_factor=0.75,
                                             activation="gelu"), (2, 4, 3), True),
    ("switch-k2-clean-switchloss-drops", dict(k=2, gate="switch", noisy=False, balance="switch",
                                              capacity_factor=0.5), (8, 3), True),
    ("topk-k2-eval-load", dict(k=2, balance="load", balance_coef=10.0, z_loss_coef=0.01), (8, 3), False),
    ("dense-noisy-switchloss", dict(gate="dense", balance="switch"), (6, 3), True),
]


@pytest.mark.parametrize("name,kw,shape,train", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_layer_gradcheck(name, kw, shape, train):
    layer, rng = make_layer(sum(map(ord, name)) % 1000, **kw)
    x = rng.standard_normal(shape)
    noise = rng.standard_normal(shape[:-1] + (layer.n_experts,)) if layer.noisy else None
    assert_margins(layer, x, noise, train)
    layer.forward(x, train=train, noise=noise)
    if "drops" in name:
        assert layer.stats["dropped"] > 0, "this configuration is meant to drop tokens"
    if kw.get("balance") or kw.get("z_loss_coef"):
        assert layer.aux_loss > 0
    # A small dout keeps ⟨dy, y⟩ small, so its round-off does not swamp the (small)
    # gradients that only the auxiliary losses produce, such as W_noise's in eval mode.
    dout = 0.1 * rng.standard_normal(x.shape)
    check_layer(layer, x, dout, forward_kwargs={"train": train, "noise": noise})


def test_layer_gradcheck_catches_a_wrong_aux_gradient(monkeypatch):
    """The check must be able to fail: lose the importance loss's gradient and it does."""
    layer, rng = make_layer(3, k=2, balance="importance", balance_coef=1.0)
    x, noise = rng.standard_normal((8, 3)), rng.standard_normal((8, 4))
    right = minimoe.core.balance.cv_squared_backward
    monkeypatch.setattr(minimoe.core.balance, "cv_squared_backward", lambda d, c: (0 * right(d, c)[0], {}))
    with pytest.raises(GradCheckError, match="gradient check failed for W_gate"):
        check_layer(layer, x, forward_kwargs={"noise": noise}, rng=rng)


def test_layer_kink_detected_through_routing_signature():
    """Experts 0 and 1 score within 1e-9 of each other and above the rest for every token:
    the finite difference flips the choice, and check_layer must refuse to judge."""
    layer, rng = make_layer(0, k=1, noisy=False)
    x = np.abs(rng.standard_normal((4, 3))) + 0.1
    W = layer.params["W_gate"]
    W[:, 0], W[:, 1], W[:, 2:] = 1.0, 1.0 + 1e-9, -1.0
    with pytest.raises(KinkError, match="changed the discrete selection"):
        check_layer(layer, x, rng=rng)


def test_whole_layer_along_random_directions():
    """A bigger layer: the directional derivative matches ⟨grad, v⟩ for random v."""
    layer, rng = make_layer(11, d=8, h=16, E=8, k=2, balance="importance+load", z_loss_coef=0.01,
                            capacity_factor=1.25)
    x = rng.standard_normal((4, 16, 8))
    noise = rng.standard_normal((4, 16, 8))
    dy = rng.standard_normal(x.shape)
    arrays = {"x": x, **layer.params}

    def f():
        return float(np.sum(layer.forward(x, noise=noise) * dy)) + layer.aux_loss

    f()
    sig = layer.routing_signature()
    grads = {"x": layer.backward(dy), **{k: v.copy() for k, v in layer.grads.items()}}
    for trial in range(3):
        v = {k: rng.standard_normal(a.shape) for k, a in arrays.items()}
        h = 1e-6
        for k, a in arrays.items():
            a += h * v[k]
        fp = f()
        assert all(np.array_equal(s, t) for s, t in zip(sig, layer.routing_signature()))
        for k, a in arrays.items():
            a -= 2 * h * v[k]
        fm = f()
        for k, a in arrays.items():
            a += h * v[k]
        analytic = sum(np.sum(grads[k] * v[k]) for k in arrays)
        assert (fp - fm) / (2 * h) == pytest.approx(analytic, rel=1e-6, abs=1e-8)


# --------------------------------------------------------------------------- the k = 1 trap
def test_k1_topk_router_gets_exactly_zero_task_gradient():
    layer, rng = make_layer(5, k=1, gate="topk")
    x, noise = rng.standard_normal((10, 3)), rng.standard_normal((10, 4))
    layer.forward(x, noise=noise)
    layer.backward(rng.standard_normal((10, 3)))
    assert np.all(layer.grads["W_gate"] == 0) and np.all(layer.grads["W_noise"] == 0)
    assert np.abs(layer.grads["W1"]).max() > 0                  # the experts still learn


def test_k1_switch_router_gets_task_gradient():
    layer, rng = make_layer(5, k=1, gate="switch")
    x, noise = rng.standard_normal((10, 3)), rng.standard_normal((10, 4))
    layer.forward(x, noise=noise)
    layer.backward(rng.standard_normal((10, 3)))
    assert np.abs(layer.grads["W_gate"]).max() > 1e-3 and np.abs(layer.grads["W_noise"]).max() > 1e-3


@pytest.mark.parametrize("balance,reaches", [("load", True), ("switch", True), ("importance", False)])
def test_k1_topk_balancing_losses_reach_the_router(balance, reaches):
    """With the task gradient dead, load and Switch losses still train the router; the
    importance loss does not (it too flows through the gates, which are all 1)."""
    layer, rng = make_layer(6, k=1, gate="topk", balance=balance)
    x, noise = rng.standard_normal((10, 3)), rng.standard_normal((10, 4))
    layer.forward(x, noise=noise)
    assert layer.aux_loss > 0
    layer.backward(np.zeros((10, 3)))
    assert (np.abs(layer.grads["W_gate"]).max() > 0) == reaches


# --------------------------------------------------------------------------- the contract
def test_stats_contract_and_shapes():
    layer, rng = make_layer(7, k=2, capacity_factor=0.75)
    x = rng.standard_normal((2, 5, 3))
    y = layer.forward(x)
    s, T, E = layer.stats, 10, 4
    assert y.shape == x.shape
    assert s["load"].shape == (E,) and np.issubdtype(s["load"].dtype, np.integer)
    assert s["topk_idx"].shape == s["topk_gates"].shape == s["kept"].shape == (T, 2)
    assert s["kept"].dtype == bool and s["probs"].shape == (T, E)
    assert s["load"].sum() + s["dropped"] == T * 2 and s["dropped"] == np.sum(~s["kept"])
    assert s["capacity"] == 4 and np.all(s["load"] <= 4)
    np.testing.assert_allclose(s["importance"].sum(), T)                   # top-k gates sum to 1
    np.testing.assert_allclose(s["topk_gates"].sum(axis=1), 1.0)
    np.testing.assert_allclose(s["probs"].sum(axis=1), 1.0)
    for e in range(E):
        assert s["load"][e] == np.sum((s["topk_idx"] == e) & s["kept"])
        assert s["requested"][e] == np.sum(s["topk_idx"] == e)
    dense, _ = make_layer(7, gate="dense")
    dense.forward(rng.standard_normal((5, 3)))
    assert dense.k == 4 and dense.stats["topk_idx"].shape == (5, 4)


def test_param_counts_and_flops():
    layer = MoELayer(16, 64, 8, k=2)
    expert = 16 * 64 + 64 + 64 * 16 + 16
    assert layer.n_params == 2 * 16 * 8 + 8 * expert
    assert layer.n_active_params == 2 * 16 * 8 + 2 * expert
    assert layer.flops_per_token() == 2 * 16 * 8 + 2 * (2 * 16 * 64 * 2) + 2 * 2 * 16
    assert set(layer.grads) == set(layer.params) == {"W_gate", "W_noise", "W1", "b1", "W2", "b2"}
    assert "W_noise" not in MoELayer(16, 64, 8, noisy=False).params


def test_eval_is_deterministic_and_training_noise_comes_from_rng():
    layer, rng = make_layer(8, k=2)
    x = rng.standard_normal((12, 3))
    y1 = layer.forward(x, train=False)
    layer.forward(x)                                            # advances the layer's rng
    y2 = layer.forward(x, train=False, noise=rng.standard_normal((12, 4)))   # noise ignored in eval
    np.testing.assert_array_equal(y1, y2)
    a, b = layer.forward(x), layer.forward(x)
    assert not np.array_equal(a, b)                             # fresh ε each training call
    l1, _ = make_layer(9, k=2)
    l2, _ = make_layer(9, k=2)
    np.testing.assert_array_equal(l1.forward(x), l2.forward(x))   # same seed, same noise


def test_float32_layer_stays_float32():
    layer = MoELayer(8, 16, 4, k=2, balance="importance+load", z_loss_coef=1e-3,
                     capacity_factor=1.0, dtype=np.float32, rng=np.random.default_rng(0))
    x = np.random.default_rng(1).standard_normal((32, 8))     # float64 input is cast
    y = layer.forward(x)
    dx = layer.backward(np.ones_like(y))
    assert y.dtype == dx.dtype == np.float32
    assert all(g.dtype == np.float32 for g in layer.grads.values())


def test_help_tells_a_newcomer_how_to_use_it():
    doc = minimoe.MoELayer.__doc__
    for word in ("forward", "backward", "aux_loss", "stats", "capacity_factor", "k=1", "Example"):
        assert word in doc
    # and its example runs and prints what it says
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner()
    for test in finder.find(minimoe.MoELayer, "MoELayer", globs={}):
        runner.run(test)
    assert runner.summarize(verbose=False).failed == 0
    assert runner.summarize(verbose=False).attempted >= 8


# --------------------------------------------------------------------------- bad input
def test_bad_constructor_arguments_name_the_argument():
    with pytest.raises(ValueError, match="k must be >= 1"):
        MoELayer(4, 8, 4, k=0)
    with pytest.raises(ValueError, match="k must be <= 4"):
        MoELayer(4, 8, 4, k=5)
    with pytest.raises(ValueError, match="capacity_factor must be a finite number > 0"):
        MoELayer(4, 8, 4, capacity_factor=0)
    with pytest.raises(ValueError, match="capacity_factor must be a finite number > 0"):
        MoELayer(4, 8, 4, capacity_factor=-1.5)
    with pytest.raises(ValueError, match="gate must be one of 'topk', 'dense', 'switch'; got 'top2'"):
        MoELayer(4, 8, 4, gate="top2")
    with pytest.raises(ValueError, match="balance must be one of .*'switch'; got 'aux'"):
        MoELayer(4, 8, 4, balance="aux")
    with pytest.raises(ValueError, match="balance='load' needs noisy=True"):
        MoELayer(4, 8, 4, noisy=False, balance="load")
    with pytest.raises(ValueError, match="needs a sparse gate"):
        MoELayer(4, 8, 4, gate="dense", balance="importance+load")
    with pytest.raises(ValueError, match="activation must be one of"):
        MoELayer(4, 8, 4, activation="tanh")
    with pytest.raises(TypeError, match="rng must be a numpy.random.Generator"):
        MoELayer(4, 8, 4, rng="42")   # an int seed is fine (SPEC 7)


def test_bad_forward_arguments_name_the_argument():
    layer, rng = make_layer(0, k=2)
    with pytest.raises(ValueError, match="x must have width d_model=3"):
        layer.forward(rng.standard_normal((5, 4)))
    with pytest.raises(ValueError, match="x must have 2 or 3 dimensions"):
        layer.forward(rng.standard_normal(3))
    with pytest.raises(ValueError, match="x contains NaN or inf"):
        layer.forward(np.array([[0.0, np.inf, 1.0]]))
    with pytest.raises(ValueError, match=r"noise must have shape \(5, 4\)"):
        layer.forward(rng.standard_normal((5, 3)), noise=np.zeros((5, 3)))
    with pytest.raises(ValueError, match="noise was given but the layer was built with noisy=False"):
        make_layer(0, noisy=False)[0].forward(rng.standard_normal((5, 3)), noise=np.zeros((5, 4)))
    with pytest.raises(RuntimeError, match="call forward before backward"):
        make_layer(1)[0].backward(np.zeros((5, 3)))
    layer.forward(rng.standard_normal((5, 3)))
    with pytest.raises(ValueError, match=r"dy must have shape \(5, 3\)"):
        layer.backward(np.zeros((5, 4)))


def test_the_last_batch_is_let_go_once_the_new_one_has_its_cache():
    """Speed note in MoEBase._finish_forward: the last batch's cache is let go only when the
    new one exists (so its memory is not handed back to the OS and re-faulted), and a failed
    forward keeps it (a call that raises changes nothing)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 8))
    for layer in (MoELayer(8, 16, 4, k=2, rng=0), minimoe.HashMoELayer(8, 16, 4, k=2, seed=0),
                  minimoe.LossFreeMoELayer(8, 16, 4, k=2, rng=0), minimoe.ExpertChoiceMoELayer(8, 16, 4, rng=0)):
        layer.forward(x)
        first = layer._cache
        with pytest.raises(ValueError):
            layer.forward(np.full((16, 8), np.nan))
        assert layer._cache is first, type(layer).__name__
        layer.forward(x)
        assert layer._cache is not first and layer._cache is not None, type(layer).__name__
