"""The MoE transformer block: whole-block gradient checks for every FFN kind, structure, causality."""
import numpy as np
import pytest

from minimoe.core.gradcheck import check_layer
from minimoe.core.moe import MoELayer
from minimoe.lm.transformer import FFN_KINDS, MoETransformerBlock, make_ffn

B, S, D, H = 2, 3, 4, 2


def _block(rng, kind, **kw):
    args = {"d_hidden": 4}
    if kind != "dense":
        args.update(n_experts=3, k=2)
    args.update(kw)
    block = MoETransformerBlock(D, H, kind, rng=rng, **args)
    for name, p in block.params.items():           # move every parameter off its neat initial value
        if name.endswith(("beta", "b_qkv", "b_o", ".b1", ".b2", "b1_shared", "b2_shared")):
            p[:] = 0.1 * rng.standard_normal(p.shape)
        elif name.endswith("gamma"):
            p[:] = 1.0 + 0.1 * rng.standard_normal(p.shape)
        elif name.endswith("W_gate"):
            p[:] = 0.5 * rng.standard_normal(p.shape)     # spread-out router scores, not saturated
    return block


CASES = [
    ("moe", {"noisy": True, "balance": "importance+load", "k": 2}, {"noise": True}),
    ("hash", {}, {"ids": True}),
    ("expert_choice", {}, {}),
    ("lossfree", {"score": "sigmoid"}, {}),
    ("shared", {"noisy": False, "n_shared": 1}, {}),
]


@pytest.mark.parametrize("kind,kw,fwd", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_whole_block_gradcheck(kind, kw, fwd):
    rng = np.random.default_rng(len(kind) + len(kw))
    block = _block(rng, kind, **kw)
    if kind == "lossfree":
        block.ffn.bias[:] = 0.3 * rng.standard_normal(3)
    forward_kwargs = {}
    if fwd.get("noise"):
        forward_kwargs["noise"] = rng.standard_normal((B * S, 3))
    if fwd.get("ids"):
        forward_kwargs["ids"] = rng.integers(0, 5, size=(B, S))
    reports = check_layer(block, rng.standard_normal((B, S, D)), forward_kwargs=forward_kwargs, rng=rng)
    names = {r.name for r in reports}
    assert names == {"x"} | set(block.params)
    assert {"ln1.gamma", "attn.W_qkv", "ln2.beta", "ffn.W1"} <= names
    if kw.get("balance"):
        assert block.aux_loss > 0                    # the aux loss was part of the checked objective


def test_with_silent_sublayers_the_block_is_the_identity(rng):
    """Zero the attention output projection and the experts' output: both residuals carry x through."""
    block = _block(rng, "moe", noisy=False)
    for name in ("attn.W_o", "attn.b_o", "ffn.W2", "ffn.b2"):
        block.params[name][:] = 0.0
    x = rng.standard_normal((B, S, D))
    np.testing.assert_array_equal(block.forward(x), x)


def test_block_matches_the_formula_built_from_its_parts(rng):
    block = _block(rng, "moe", noisy=False)
    x = rng.standard_normal((B, S, D))
    y = block.forward(x)
    h = x + block.attn.forward(block.ln1.forward(x))
    np.testing.assert_allclose(y, h + block.ffn.forward(block.ln2.forward(h), train=False), rtol=1e-13)


def test_token_choice_block_is_causal(rng):
    block = _block(rng, "moe", noisy=False)
    x = rng.standard_normal((2, 6, D))
    y = block.forward(x)
    for t in range(1, 6):
        x2 = x.copy()
        x2[:, t:] += 3.0 * rng.standard_normal(x2[:, t:].shape)
        np.testing.assert_allclose(block.forward(x2)[:, :t], y[:, :t], rtol=0, atol=1e-13)


def test_expert_choice_block_is_not_causal(rng):
    """Expert choice ranks all tokens of the batch together, so later tokens can push an
    earlier token out of an expert (Zhou et al. 2022 name this limitation themselves)."""
    block = _block(rng, "expert_choice", k=1)
    x = rng.standard_normal((1, 6, D))
    y = block.forward(x)
    x2 = x.copy()
    x2[:, 3:] = x[:, :3] * 5.0          # later tokens that outbid the earlier ones
    assert not np.allclose(block.forward(x2)[:, :3], y[:, :3])


def test_params_share_the_sublayers_arrays_and_counts_add_up(rng):
    block = _block(rng, "moe", noisy=False)
    assert block.params["ffn.W1"] is block.ffn.params["W1"]
    assert block.params["attn.W_qkv"] is block.attn.params["W_qkv"]
    y = block.forward(rng.standard_normal((B, S, D)))
    block.backward(np.ones_like(y))
    assert block.grads["ffn.W1"] is block.ffn.grads["W1"] and set(block.grads) == set(block.params)
    att = 4 * D * D + 4 * D
    assert block.n_params == 4 * D + att + block.ffn.n_params
    assert block.n_active_params == 4 * D + att + block.ffn.n_active_params < block.n_params
    assert block.flops_per_token() == 8 * D * D + block.ffn.flops_per_token()
    assert block.flops_per_token(seq_len=5) == block.flops_per_token() + 2 * D * 6
    assert block.attention.shape == (B, H, S, S)
    dense = _block(rng, "dense")
    assert dense.n_active_params == dense.n_params and dense.routing_signature() is None


def test_a_ready_made_layer_can_be_passed(rng):
    ffn = MoELayer(D, 6, 3, k=1, noisy=False, rng=rng)
    block = MoETransformerBlock(D, H, ffn, rng=rng)
    assert block.ffn is ffn and block.forward(rng.standard_normal((1, 2, D))).shape == (1, 2, D)


def test_make_ffn_builds_every_kind(rng):
    for kind in FFN_KINDS:
        layer = make_ffn(kind, 4, 8, n_experts=4, k=2, rng=rng)
        y = layer.forward(rng.standard_normal((5, 4)))
        assert y.shape == (5, 4) and set(layer.params) == set(layer.grads)


@pytest.mark.parametrize("kind", [k for k in FFN_KINDS if k != "dense"])
def test_every_router_drops_into_a_clinic_and_trains(kind):
    """The layers share MoELayer's surface, so the clinic models and their training loop take any."""
    from minimoe.clinic.data import make_clinic
    from minimoe.clinic.models import Clinic
    from minimoe.clinic.train import train

    data = make_clinic(n_train=256, n_val=64, n_test=0, seed=0)
    rng = np.random.default_rng(0)
    kw = {"auto_update": True, "bias_update_rate": 0.01} if kind == "lossfree" else {}
    model = Clinic(data.train.x.shape[1], int(data.train.y.max()) + 1, 8,
                   make_ffn(kind, 8, 8, n_experts=4, k=2, rng=rng, **kw), rng)
    hist = train(model, data.train, data.val, epochs=1, batch_size=64, progress=False)
    assert np.isfinite(hist.val_loss[-1]) and hist.load_array().shape[1] == model.block.n_experts
    assert model.moe is model.block
    if kind == "lossfree":
        assert np.any(model.block.bias != 0)           # nudged once per step by backward


def test_bad_configurations_and_input_are_rejected(rng):
    with pytest.raises(ValueError, match="ffn must be one of"):
        MoETransformerBlock(D, H, "mystery", d_hidden=4, rng=rng)
    with pytest.raises(TypeError, match="needs d_hidden"):
        MoETransformerBlock(D, H, "moe", rng=rng)
    with pytest.raises(ValueError, match="divisible by n_heads"):
        MoETransformerBlock(D, 3, "moe", d_hidden=4, rng=rng)
    with pytest.raises(ValueError, match="ffn has d_model=6"):
        MoETransformerBlock(D, H, MoELayer(6, 4, 3), rng=rng)
    with pytest.raises(TypeError, match="only apply when ffn is a kind name"):
        MoETransformerBlock(D, H, MoELayer(D, 4, 3), d_hidden=4, rng=rng)
    with pytest.raises(TypeError, match="lacks"):
        MoETransformerBlock(D, H, object(), rng=rng)
    block = _block(rng, "moe", noisy=False)
    with pytest.raises(ValueError, match="3 dimensions"):
        block.forward(rng.standard_normal((S, D)))
    with pytest.raises(ValueError, match="d_model=4"):
        block.forward(rng.standard_normal((B, S, 5)))
    with pytest.raises(RuntimeError, match="forward before backward"):
        _block(rng, "moe").backward(np.zeros((B, S, D)))
