"""Properties of MoELayer that must hold for every configuration (hypothesis), and edge cases."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minimoe import MoELayer
from minimoe.core.moe import BALANCES

from moe_helpers import make_layer

FAST = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def configs(draw):
    E = draw(st.integers(2, 5))
    gate = draw(st.sampled_from(["topk", "dense", "switch"]))
    noisy = draw(st.booleans())
    allowed = [b for b in BALANCES if (noisy and gate != "dense") or b not in ("load", "importance+load")]
    return dict(seed=draw(st.integers(0, 10_000)), E=E, k=draw(st.integers(1, E)), gate=gate, noisy=noisy,
                balance=draw(st.sampled_from(allowed)), z_loss_coef=draw(st.sampled_from([0.0, 0.01])),
                T=draw(st.integers(1, 12)))


def build(cfg, **extra):
    kw = {k: v for k, v in cfg.items() if k not in ("seed", "T", "E")}
    layer, rng = make_layer(cfg["seed"], E=cfg["E"], **{**kw, **extra})
    x = rng.standard_normal((cfg["T"], 3))
    noise = rng.standard_normal((cfg["T"], cfg["E"])) if layer.noisy else None
    return layer, rng, x, noise


def run(layer, x, noise, dy):
    y = layer.forward(x, noise=noise)
    dx = layer.backward(dy)
    return y, dx, {k: v.copy() for k, v in layer.grads.items()}, layer.aux_loss


@FAST
@given(configs())
def test_backward_is_affine_in_dy_and_zero_dy_leaves_only_the_aux_gradient(cfg):
    layer, rng, x, noise = build(cfg)
    dy1, dy2 = rng.standard_normal(x.shape), rng.standard_normal(x.shape)
    _, d0, g0, aux = run(layer, x, noise, np.zeros_like(x))
    _, d1, g1, _ = run(layer, x, noise, dy1)
    _, d2, g2, _ = run(layer, x, noise, dy2)
    _, d3, g3, _ = run(layer, x, noise, 2.0 * dy1 - 3.0 * dy2)
    np.testing.assert_allclose(d3 - d0, 2.0 * (d1 - d0) - 3.0 * (d2 - d0), atol=1e-10)
    for k in g0:
        np.testing.assert_allclose(g3[k] - g0[k], 2.0 * (g1[k] - g0[k]) - 3.0 * (g2[k] - g0[k]), atol=1e-10)
    if aux == 0.0 and layer.balance is None and layer.z_loss_coef == 0:
        assert np.all(d0 == 0) and all(np.all(g == 0) for g in g0.values())


@FAST
@given(configs())
def test_large_capacity_factor_is_identical_to_none(cfg):
    layer, rng, x, noise = build(cfg)
    big, _, _, _ = build(cfg, capacity_factor=cfg["E"] / min(cfg["k"], cfg["E"]) + 0.5)
    dy = rng.standard_normal(x.shape)
    y0, d0, g0, a0 = run(layer, x, noise, dy)
    y1, d1, g1, a1 = run(big, x, noise, dy)
    assert big.stats["dropped"] == 0 and a0 == a1
    np.testing.assert_array_equal(y0, y1)
    np.testing.assert_array_equal(d0, d1)
    for k in g0:
        np.testing.assert_array_equal(g0[k], g1[k])


@FAST
@given(configs())
def test_gates_and_stats_are_consistent(cfg):
    layer, rng, x, noise = build(cfg, capacity_factor=1.0)
    layer.forward(x, noise=noise)
    s = layer.stats
    if layer.gate in ("topk", "dense"):
        np.testing.assert_allclose(s["topk_gates"].sum(axis=1), 1.0, rtol=1e-12)
    else:
        assert np.all(s["topk_gates"].sum(axis=1) <= 1.0 + 1e-12)
    assert s["load"].sum() == s["kept"].sum() and s["dropped"] == s["kept"].size - s["kept"].sum()
    assert np.all(s["load"] <= s["capacity"])


@FAST
@given(configs(), st.randoms(use_true_random=False))
def test_routing_is_invariant_to_token_order_without_capacity(cfg, rnd):
    layer, rng, x, noise = build(cfg)
    perm = np.array(rnd.sample(range(cfg["T"]), cfg["T"]))
    dy = rng.standard_normal(x.shape)
    y0, d0, g0, a0 = run(layer, x, noise, dy)
    s0 = dict(layer.stats)
    y1, d1, g1, a1 = run(layer, x[perm], None if noise is None else noise[perm], dy[perm])
    np.testing.assert_allclose(y1, y0[perm], rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(d1, d0[perm], rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(layer.stats["topk_idx"], s0["topk_idx"][perm])
    np.testing.assert_array_equal(layer.stats["load"], s0["load"])
    assert a1 == pytest.approx(a0, rel=1e-12, abs=1e-15)
    for k in g0:
        np.testing.assert_allclose(g1[k], g0[k], rtol=1e-9, atol=1e-12)


@FAST
@given(st.integers(0, 10_000), st.integers(1, 2), st.sampled_from([0.5, 0.75, 1.0]))
def test_with_capacity_the_earliest_requests_are_kept(seed, k, cf):
    """Up to capacity priority, routing ignores token order: the per-token choices are the
    same, and each expert keeps its requests in (choice rank, position) order."""
    layer, rng = make_layer(seed, k=k, capacity_factor=cf, noisy=False)
    x = rng.standard_normal((12, 3))
    layer.forward(x)
    idx, kept, C = layer.stats["topk_idx"], layer.stats["kept"], layer.stats["capacity"]
    for e in range(layer.n_experts):     # the rule, request by request (test code only)
        requests = sorted((j, t) for t in range(12) for j in range(k) if idx[t, j] == e)
        for rank, (j, t) in enumerate(requests):
            assert kept[t, j] == (rank < C)
    rev = x[::-1]
    layer.forward(rev)
    np.testing.assert_array_equal(layer.stats["topk_idx"], idx[::-1])


# --------------------------------------------------------------------------- no NaN, ever
@pytest.mark.parametrize("balance", ["importance", "load", "importance+load", "switch"])
@pytest.mark.parametrize("train", [True, False])
def test_no_nan_with_an_unused_expert_a_zero_batch_or_huge_logits(balance, train):
    layer, rng = make_layer(0, k=2, balance=balance, z_loss_coef=1e-3, capacity_factor=1.0)
    layer.params["W_gate"][:, 3] = -50.0                        # expert 3 never wins...
    x = np.abs(rng.standard_normal((16, 3)))                    # ...for these patients
    cases = {"unused expert": x, "all-zero batch": np.zeros((16, 3))}
    for name, xs in cases.items():
        y = layer.forward(xs, train=train)
        dx = layer.backward(np.ones_like(y))
        vals = [y, dx, layer.aux_loss, layer.stats["probs"], layer.stats["importance"], *layer.grads.values()]
        assert all(np.all(np.isfinite(v)) for v in vals), name
    layer.forward(x, train=train)
    assert layer.stats["load"][3] == 0 and np.all(layer.grads["W1"][3] == 0)
    layer.params["W_gate"][...] = 1e4 * np.sign(rng.standard_normal((3, 4)))   # logits ~ ±1e4
    y = layer.forward(x, train=train)
    dx = layer.backward(np.ones_like(y))
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(dx)) and np.isfinite(layer.aux_loss)
    assert all(np.all(np.isfinite(g)) for g in layer.grads.values())


def test_dense_gate_with_one_expert_and_single_token():
    layer = MoELayer(3, 4, 1, k=1, gate="dense", balance="importance", rng=np.random.default_rng(0))
    y = layer.forward(np.ones((1, 3)))
    dx = layer.backward(np.ones_like(y))
    assert layer.aux_loss == 0.0 and np.all(np.isfinite(dx))
