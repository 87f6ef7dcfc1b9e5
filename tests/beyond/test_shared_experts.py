"""Shared + fine-grained experts (DeepSeekMoE): gradient checks, always-on experts, equal compute."""
import numpy as np
import pytest

from minimoe.core.experts import ffn_forward, init_expert_params
from minimoe.core.gradcheck import check_layer, check_pair
from minimoe.core.moe import MoELayer
from minimoe.beyond.shared_experts import SharedExpertMoELayer, shared_experts_backward, shared_experts_forward


def _randomize_biases(layer, rng):
    for name, p in layer.params.items():
        if name.startswith("b"):
            p[:] = 0.1 * rng.standard_normal(p.shape)
    layer.params["W_gate"][:] = rng.standard_normal(layer.params["W_gate"].shape)


@pytest.mark.parametrize("n_shared", [1, 3])
def test_shared_pair_gradcheck(rng, n_shared):
    params = init_expert_params(n_shared, 4, 5, rng)
    params["b1"] += 0.1 * rng.standard_normal(params["b1"].shape)
    check_pair(shared_experts_forward, shared_experts_backward, rng.standard_normal((6, 4)), params, rng=rng)


@pytest.mark.parametrize("seed,n_shared,k,kw", [
    (0, 1, 1, {"noisy": False, "gate": "switch"}),
    (1, 2, 2, {"noisy": False}),
    (2, 0, 2, {"noisy": False, "balance": "switch"}),                  # fine-grained only, with an aux loss
    (3, 1, 2, {"noisy": True, "balance": "importance+load"}),          # noise given explicitly
    (4, 1, 2, {"noisy": False, "capacity_factor": 0.5}),               # dropping routed tokens
])
def test_layer_gradcheck(seed, n_shared, k, kw):
    rng = np.random.default_rng(seed)
    layer = SharedExpertMoELayer(4, 5, 4, k=k, n_shared=n_shared, rng=rng, **kw)
    _randomize_biases(layer, rng)
    x = rng.standard_normal((2, 3, 4))
    fk = {"noise": rng.standard_normal((6, 4))} if kw.get("noisy") else {}
    reports = check_layer(layer, x, forward_kwargs=fk, rng=rng)
    want = set(layer.params) | {"x"}
    assert {r.name for r in reports} == want
    assert ("W1_shared" in want) == (n_shared > 0)
    if "balance" in kw:
        assert layer.aux_loss > 0 and set(layer.stats["losses"]) >= {kw["balance"].split("+")[0]}


def test_shared_experts_serve_every_token(rng):
    """With the routed experts silenced, the output is exactly the sum of the shared FFNs."""
    layer = SharedExpertMoELayer(4, 6, 5, k=2, n_shared=2, noisy=False, rng=rng)
    _randomize_biases(layer, rng)
    layer.params["W2"][:] = 0.0
    layer.params["b2"][:] = 0.0
    x = rng.standard_normal((7, 4))
    p = layer.params
    want = sum(ffn_forward(x, p["W1_shared"][s], p["b1_shared"][s], p["W2_shared"][s], p["b2_shared"][s])[0]
               for s in range(2))
    np.testing.assert_allclose(layer.forward(x), want, rtol=1e-12, atol=1e-12)


def test_with_no_shared_experts_it_is_the_routed_layer(rng):
    layer = SharedExpertMoELayer(4, 6, 5, k=2, n_shared=0, noisy=False, rng=np.random.default_rng(3))
    plain = MoELayer(4, 6, 5, k=2, gate="switch", noisy=False, rng=np.random.default_rng(3))
    x = rng.standard_normal((8, 4))
    np.testing.assert_array_equal(layer.forward(x), plain.forward(x))
    assert layer.n_params == plain.n_params and layer.flops_per_token() == plain.flops_per_token()


@pytest.mark.parametrize("m,n_shared", [(1, 0), (2, 1), (4, 1), (4, 2)])
def test_fine_grained_keeps_the_expert_compute_and_weights(m, n_shared):
    d, h, E, k = 8, 32, 8, 2
    coarse = MoELayer(d, h, E, k=k, noisy=False)
    fine = SharedExpertMoELayer.fine_grained(d, h, E, k, granularity=m, n_shared=n_shared, noisy=False)
    assert fine.d_hidden == h // m and fine.n_shared == n_shared
    assert fine.n_experts == m * E - n_shared and fine.k == m * k - n_shared
    # Expert matmuls per token (4·d·width per expert used) are exactly those of the coarse layer...
    assert (fine.n_shared + fine.k) * 4 * d * fine.d_hidden == k * 4 * d * h
    # ...and so are the expert weight matrices (W1 and W2) in total.
    n_w = sum(fine.params[n].size for n in ("W1", "W2", "W1_shared", "W2_shared") if n in fine.params)
    assert n_w == coarse.params["W1"].size + coarse.params["W2"].size
    # The remaining FLOPs differ only by the router (2·d·E) and the weighted combine (2·d per routed expert).
    diff = fine.flops_per_token() - coarse.flops_per_token()
    assert diff == 2 * d * (fine.n_experts - E) + 2 * d * (fine.k - k)


def test_the_routed_half_is_an_moe_layer_with_the_same_weights(rng):
    """The routed experts are MoELayer's pair on this layer's params: an MoELayer with the same
    options and routed weights gives the layer's output minus the shared experts'."""
    layer = SharedExpertMoELayer(4, 6, 5, k=2, n_shared=0, rng=rng)
    assert set(layer.params) == set(layer.grads)
    twin = MoELayer(4, 6, 5, k=2, gate="switch", noisy=False, rng=0)
    for name in twin.params:
        twin.params[name][...] = layer.params[name]
    x = rng.standard_normal((3, 4))
    y = layer.forward(x)
    np.testing.assert_array_equal(y, twin.forward(x))
    layer.backward(np.ones_like(y))
    twin.backward(np.ones_like(y))
    for name in twin.grads:
        np.testing.assert_array_equal(layer.grads[name], twin.grads[name])
    assert set(layer.stats) >= {"load", "importance", "dropped", "topk_idx", "kept"}
    shared = SharedExpertMoELayer(4, 6, 5, k=2, n_shared=1, rng=rng)
    per = 4 * 6 + 6 + 6 * 4 + 4
    assert shared.n_active_params == layer.n_active_params + per


@pytest.mark.parametrize("kwargs,match", [
    ({"d_hidden": 30, "granularity": 4}, "d_hidden=30 must be divisible by granularity=4"),
    ({"n_shared": 8, "granularity": 4}, "n_shared=8 must be smaller than granularity·k = 8"),
    ({"granularity": 0}, "granularity must be >= 1"),
    ({"n_shared": -1}, "n_shared must be >= 0"),
])
def test_bad_fine_grained_configurations_are_rejected(kwargs, match):
    args = dict(d_model=4, d_hidden=32, n_experts=4, k=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        SharedExpertMoELayer.fine_grained(**args)


def test_bad_layer_configurations_and_input_are_rejected(rng):
    with pytest.raises(ValueError, match="n_shared must be >= 0"):
        SharedExpertMoELayer(4, 5, 4, n_shared=-2)
    with pytest.raises(ValueError, match="k must be <= 4"):
        SharedExpertMoELayer(4, 5, 4, k=5)
    layer = SharedExpertMoELayer(4, 5, 4, noisy=False, rng=rng)
    with pytest.raises(ValueError, match="d_model=4"):
        layer.forward(rng.standard_normal((3, 5)))


# --------------------------------------------------------------------------- DeepSeekMoE's routing, by hand
def test_defaults_are_deepseekmoe_eq_9_to_11(rng):
    """eq. 9–11, one token at a time: s = softmax over the routed experts, g = s at the top
    mK − K_s (not renormalised), plus every shared expert with gate 1. No noise: a training
    forward equals the eval forward."""
    layer = SharedExpertMoELayer(4, 5, 6, k=2, n_shared=2, rng=rng)
    assert (layer.gate, layer.noisy) == ("switch", False) and "W_noise" not in layer.params
    _randomize_biases(layer, rng)
    p = layer.params
    p["W_gate"][:] = rng.standard_normal(p["W_gate"].shape)
    x = rng.standard_normal((9, 4))
    y = layer.forward(x)
    np.testing.assert_array_equal(y, layer.forward(x, train=False))

    def ffn(v, W1, b1, W2, b2):
        return np.maximum(v @ W1 + b1, 0) @ W2 + b2

    for t in range(9):
        logits = [float(x[t] @ p["W_gate"][:, e]) for e in range(6)]
        z = sum(np.exp(l) for l in logits)
        s = [np.exp(l) / z for l in logits]                               # eq. 11
        top = sorted(range(6), key=lambda e: -s[e])[:2]                   # eq. 10
        want = sum(ffn(x[t], p["W1_shared"][i], p["b1_shared"][i], p["W2_shared"][i], p["b2_shared"][i])
                   for i in range(2))                                     # eq. 9, shared
        want = want + sum(s[e] * ffn(x[t], p["W1"][e], p["b1"][e], p["W2"][e], p["b2"][e]) for e in top)
        np.testing.assert_allclose(y[t], want, rtol=1e-11, atol=1e-13)
    assert np.all(layer.stats["topk_gates"].sum(axis=1) < 1)             # not renormalised


def test_load_balancing_turns_the_noise_on_and_old_defaults_stay_reachable(rng):
    assert SharedExpertMoELayer(4, 5, 4, balance="importance+load", rng=rng).noisy
    old = SharedExpertMoELayer(4, 5, 4, gate="topk", noisy=True, rng=rng)
    assert (old.gate, old.noisy) == ("topk", True)
