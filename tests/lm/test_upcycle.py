"""Sparse upcycling: every expert a copy of the dense FFN; for a gate that renormalises, the
upcycled model starts exactly where the dense one is (any k, either router start, with noise);
the Switch gate shrinks the FFN's output by the chosen probabilities; and the router learns
nothing until the copies drift apart."""
import numpy as np
import pytest

from minimoe.core.experts import Expert
from minimoe.core.moe import MoELayer
from minimoe.lm.model import MoELM
from minimoe.lm.upcycle import upcycle, upcycle_ffn


def _dense(seed=0, dtype=np.float64):
    return MoELM(31, d_model=12, n_heads=2, n_layers=2, max_len=10, ffn="dense", d_hidden=20,
                 rng=np.random.default_rng(seed), dtype=dtype)


IDS = np.random.default_rng(5).integers(0, 31, (3, 10))


@pytest.mark.parametrize("gate,k", [("topk", 1), ("topk", 2), ("topk", 4), ("dense", 4)])
@pytest.mark.parametrize("router_init", ["zero", "random"])
def test_a_renormalising_gate_starts_exactly_as_the_dense_model(gate, k, router_init):
    dense = _dense()
    want = dense.forward(IDS, train=False)
    moe = upcycle(dense, 4, k=k, gate=gate, router_init=router_init, rng=1)
    for train in (False, True):                     # with noise too: the gates sum to 1 whoever is chosen
        np.testing.assert_allclose(moe.forward(IDS, train=train), want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("k", [1, 2])
def test_the_switch_gate_shrinks_the_ffn_output_by_k_over_e_with_a_zero_router(k):
    """Why the Switch gate cannot start exactly: it keeps the top-k softmax probabilities,
    1/E each with a zero router, so y = (k/E)·FFN(x) — the residual around it is not scaled."""
    rng = np.random.default_rng(2)
    ffn = Expert(6, 9, rng=rng)
    for key in ("b1", "b2"):
        ffn.params[key][...] = rng.standard_normal(ffn.params[key].shape)
    layer = MoELayer(6, 9, 4, k=k, gate="switch", noisy=False, rng=3)
    for key, value in upcycle_ffn(ffn.params, 4, noisy=False).items():
        layer.params[key][...] = value
    x = rng.standard_normal((7, 6))
    np.testing.assert_allclose(layer.forward(x, train=False), (k / 4) * ffn.forward(x), rtol=1e-12, atol=1e-14)
    dense = _dense()
    moe = upcycle(dense, 4, k=k, gate="switch", rng=1)
    assert np.abs(moe.forward(IDS, train=False) - dense.forward(IDS, train=False)).max() > 1e-3


def test_a_capacity_limit_breaks_the_equality_dropped_tokens_get_no_ffn():
    dense = _dense()
    moe = upcycle(dense, 4, k=1, capacity_factor=0.5, rng=1)
    assert np.abs(moe.forward(IDS, train=False) - dense.forward(IDS, train=False)).max() > 1e-3
    assert moe.blocks[0].stats["dropped"] > 0


def test_every_expert_is_its_own_copy_and_the_dense_model_is_untouched():
    dense = _dense()
    before = {k: v.copy() for k, v in dense.params.items()}
    moe = upcycle(dense, 3, rng=0)
    W1 = moe.params["block1.ffn.W1"]
    for e in range(3):
        np.testing.assert_array_equal(W1[e], dense.params["block1.ffn.W1"])
        np.testing.assert_array_equal(moe.params["block1.ffn.b2"][e], dense.params["block1.ffn.b2"])
    W1[0] += 1.0                                     # training expert 0 must not move the others
    np.testing.assert_array_equal(W1[1], dense.params["block1.ffn.W1"])
    for key, value in before.items():
        np.testing.assert_array_equal(dense.params[key], value)
    assert not any(np.shares_memory(moe.params[k], v) for k in moe.params for v in dense.params.values())
    np.testing.assert_array_equal(moe.params["embed.W"], dense.params["embed.W"])
    np.testing.assert_array_equal(moe.params["block0.attn.W_qkv"], dense.params["block0.attn.W_qkv"])
    assert np.all(moe.params["block0.ffn.W_gate"] == 0) and np.all(moe.params["block0.ffn.W_noise"] == 0)


def test_upcycle_ffn_shapes_and_router_starts():
    p = Expert(5, 7, rng=np.random.default_rng(0)).params
    out = upcycle_ffn(p, 4)
    assert {k: v.shape for k, v in out.items()} == {"W_gate": (5, 4), "W_noise": (5, 4), "W1": (4, 5, 7),
                                                   "b1": (4, 7), "W2": (4, 7, 5), "b2": (4, 5)}
    rand = upcycle_ffn(p, 4, router_init="random", rng=0, noisy=False)
    assert "W_noise" not in rand and 0 < np.abs(rand["W_gate"]).max() < 0.5
    for name in ("W1", "b1", "W2", "b2"):
        assert not np.shares_memory(out[name], p[name])
        out[name][0] += 1.0                          # a broadcast view would be read-only, or move every expert
        np.testing.assert_array_equal(out[name][1], p[name])


def test_with_identical_experts_the_router_gets_no_gradient_until_noise_drives_them_apart():
    dense = _dense()
    moe = upcycle(dense, 4, k=2, rng=7)
    targets = np.roll(IDS, -1, axis=1)
    moe.forward_loss(IDS, targets, train=True)
    moe.backward()
    assert np.abs(moe.grads["block0.ffn.W_gate"]).max() < 1e-12
    assert np.abs(moe.grads["block0.ffn.W1"]).max() > 1e-4           # the experts do learn
    from minimoe.clinic.optim import make_optimizer
    opt = make_optimizer("adam", moe, lr=1e-2)
    for _ in range(3):
        moe.forward_loss(IDS, targets, train=True)
        moe.backward()
        opt.step()
    W1 = moe.params["block0.ffn.W1"]
    assert np.abs(W1[0] - W1[1]).max() > 1e-4                          # noise sent them different tokens
    moe.forward_loss(IDS, targets, train=True)
    moe.backward()
    assert np.abs(moe.grads["block0.ffn.W_gate"]).max() > 1e-8         # now the router can learn


def test_bad_input_is_refused_by_name():
    dense = _dense()
    with pytest.raises(TypeError, match="dense must be an MoELM"):
        upcycle(dense.blocks[0], 4)
    moe = upcycle(dense, 2)
    with pytest.raises(ValueError, match="dense FFN in every block"):
        upcycle(moe, 2)
    with pytest.raises(ValueError, match="missing \\['b2'\\]"):
        upcycle_ffn({"W1": np.zeros((2, 3)), "b1": np.zeros(3), "W2": np.zeros((3, 2))}, 2)
    with pytest.raises(ValueError, match="W1 \\(d,h\\)"):
        upcycle_ffn({"W1": np.zeros((2, 3)), "b1": np.zeros(3), "W2": np.zeros((2, 3)), "b2": np.zeros(2)}, 2)
    with pytest.raises(ValueError, match="router_init"):
        upcycle_ffn(dense.blocks[0].ffn.params, 2, router_init="ones")
    with pytest.raises(ValueError, match="n_experts"):
        upcycle_ffn(dense.blocks[0].ffn.params, 0)
