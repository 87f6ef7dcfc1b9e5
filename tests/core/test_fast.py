"""The fast path (minimoe/core/fast.py) against the textbook (experts.py, dispatch.py).

Every MoE configuration — each gate, k=1 and k=E, noisy or not, every balance loss, the
z-loss, dropping, the three activations (SwiGLU included), float64 and float32 — runs through ``MoELayer(fast=True)``
and ``MoELayer(fast=False)`` with the same weights, input, noise and dy: the outputs, aux
losses, stats and every gradient must agree to 1e-12 (float64).
"""
import itertools

import numpy as np
import pytest

from minimoe import MoELayer
from minimoe.core import dispatch, experts, fast
from minimoe.core.moe import BALANCES

E, d, h, T = 4, 3, 5, 12


def _configs():
    for gate, k, noisy, balance, cf, act in itertools.product(
            ("topk", "dense", "switch"), (1, E), (True, False), BALANCES, (None, 0.6), ("relu", "gelu", "swiglu")):
        if balance in ("load", "importance+load") and (not noisy or gate == "dense"):
            continue                      # the constructor rejects these (tested in test_moe.py)
        if gate == "dense" and k == 1:
            continue                      # the dense gate ignores k: the k=E case covers it
        yield dict(gate=gate, k=k, noisy=noisy, balance=balance, capacity_factor=cf, activation=act,
                   z_loss_coef=0.01 if cf else 0.0)


CONFIGS = list(_configs()) + [   # the Switch-loss conventions, per-sequence groups (2-D: one group)
    dict(gate="topk", k=2, noisy=True, balance="switch", switch_fraction="all", activation="swiglu"),
    dict(gate="switch", k=2, noisy=True, balance="switch", switch_fraction="all/k", activation="gelu",
         capacity_factor=0.6),
    dict(gate="switch", k=2, noisy=True, balance="importance+load", balance_groups="sequence", activation="swiglu"),
    dict(gate="topk", k=1, noisy=True, balance="switch", balance_groups="sequence", activation="relu",
         z_loss_coef=0.01),
]


def _pair(seed, **kw):
    """Two layers with identical weights, one on each path."""
    layers = [MoELayer(d, h, E, rng=np.random.default_rng(seed), fast=f, **kw) for f in (True, False)]
    rng = np.random.default_rng(seed + 1)
    for name in layers[0].params:
        value = rng.standard_normal(layers[0].params[name].shape)
        for layer in layers:
            layer.params[name][...] = value
    return layers, rng


@pytest.mark.parametrize("kw", CONFIGS, ids=lambda kw: "-".join(f"{v}" for v in kw.values()))
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_fast_and_textbook_paths_agree(kw, train):
    (quick, plain), rng = _pair(len(kw["gate"]) + kw["k"] + len(kw["activation"]), **kw)
    x = rng.standard_normal((T, d))
    noise = rng.standard_normal((T, E)) if kw["noisy"] and train else None
    dy = rng.standard_normal((T, d))
    y = [layer.forward(x, train=train, noise=noise) for layer in (quick, plain)]
    dx = [layer.backward(dy) for layer in (quick, plain)]
    np.testing.assert_allclose(y[0], y[1], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx[0], dx[1], rtol=1e-12, atol=1e-12)
    assert quick.aux_loss == pytest.approx(plain.aux_loss, rel=1e-12, abs=1e-15)
    for key in ("load", "kept", "topk_idx"):
        np.testing.assert_array_equal(quick.stats[key], plain.stats[key])
    assert quick.grads.keys() == plain.grads.keys() == quick.params.keys()
    for name in quick.grads:
        np.testing.assert_allclose(quick.grads[name], plain.grads[name], rtol=1e-12, atol=1e-12, err_msg=name)


def test_a_wrong_fast_path_would_be_caught(monkeypatch):
    """The parity test can fail: a fast backward that forgets the bias gradient of one expert."""
    (quick, plain), rng = _pair(0, gate="topk", k=2, noisy=False)
    right = fast.experts_backward_fast

    def wrong(dy, cache):
        dx, g = right(dy, cache)
        g["b1"][0] *= 2
        return dx, g

    monkeypatch.setattr(fast, "experts_backward_fast", wrong)
    x, dy = rng.standard_normal((T, d)), rng.standard_normal((T, d))
    for layer in (quick, plain):
        layer.forward(x)
        layer.backward(dy)
    assert not np.allclose(quick.grads["b1"], plain.grads["b1"], rtol=1e-12, atol=1e-12)


def test_float32_paths_agree_and_stay_float32():
    (quick, plain), rng = _pair(3, gate="switch", k=2, balance="importance+load", capacity_factor=0.8,
                                dtype=np.float32)
    x = rng.standard_normal((T, d)).astype(np.float32)
    noise = rng.standard_normal((T, E)).astype(np.float32)
    dy = rng.standard_normal((T, d)).astype(np.float32)
    for layer in (quick, plain):
        assert layer.forward(x, noise=noise).dtype == np.float32
        assert layer.backward(dy).dtype == np.float32
        assert all(g.dtype == np.float32 for g in layer.grads.values())
    for name in quick.grads:
        np.testing.assert_allclose(quick.grads[name], plain.grads[name], rtol=1e-4, atol=1e-5)


def test_the_default_is_the_fast_path_and_fast_must_be_a_bool():
    assert MoELayer(d, h, E).fast is True
    assert MoELayer(d, h, E, fast=False).fast is False
    with pytest.raises(TypeError, match="fast must be True or False, got 'no'"):
        MoELayer(d, h, E, fast="no")


def test_dispatch_functions_agree_with_the_textbook(rng):
    """The functional pair as well: fast.dispatch_combine_* and dispatch.dispatch_combine_*."""
    x = rng.standard_normal((T, d))
    idx = np.argsort(rng.standard_normal((T, E)), axis=1)[:, :2]
    gates = rng.uniform(size=(T, 2))
    dy = rng.standard_normal((T, d))
    for cap, act in itertools.product((None, 4), ("relu", "swiglu")):
        p = experts.init_expert_params(E, d, h, rng, activation=act)
        p["b1"] += rng.standard_normal(p["b1"].shape)
        if act == "swiglu":
            p["b3"] += rng.standard_normal(p["b3"].shape)
        y0, c0 = fast.dispatch_combine_forward_fast(x, idx, gates, **p, capacity=cap, activation=act)
        y1, c1 = dispatch.dispatch_combine_forward(x, idx, gates, **p, capacity=cap, activation=act)
        assert c1.experts.ffn[0].act.name == act
        np.testing.assert_allclose(y0, y1, rtol=1e-12, atol=1e-14)
        g0, g1 = fast.dispatch_combine_backward_fast(dy, c0), dispatch.dispatch_combine_backward(dy, c1)
        for a, b in zip(g0[:2], g1[:2]):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
        for name in g1[2]:
            np.testing.assert_allclose(g0[2][name], g1[2][name], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("E_big", [2, 7])
def test_swiglu_with_an_idle_expert_on_the_fast_path(E_big):
    """Issue 21, finding 2: with SwiGLU experts on the fast path, an expert that gets no token
    made backward zero row e of the router's gradients (or raise IndexError for e ≥ d_model),
    because the idle-expert branch zeroed every key of the gradient dict it wrote into."""
    layers = [MoELayer(3, 4, E_big + 1, k=1, activation="swiglu", noisy=False, fast=f, rng=0) for f in (True, False)]
    rng = np.random.default_rng(5)
    for name in layers[0].params:
        value = rng.standard_normal(layers[0].params[name].shape)
        for layer in layers:
            layer.params[name][...] = value
    for layer in layers:
        layer.params["W_gate"][:, -1] = -50.0          # the last expert: nobody's first choice
    x = np.abs(rng.standard_normal((6, 3))) + 0.1      # so x · W_gate[:, -1] is far below the rest
    dy = rng.standard_normal((6, 3))
    for layer in layers:
        layer.forward(x)
        assert layer.stats["load"][-1] == 0
        layer.backward(dy)
    for name in layers[0].grads:
        np.testing.assert_allclose(layers[0].grads[name], layers[1].grads[name], rtol=1e-12, atol=1e-14,
                                   err_msg=name)


def test_the_two_paths_have_names_of_their_own():
    """A traceback and a grep say which path ran: the fast functions end in _fast."""
    for name in fast.__all__:
        assert name.endswith("_fast") or name.startswith("Fast"), name
    assert not hasattr(fast, "experts_forward") and not hasattr(fast, "dispatch_combine_forward")
