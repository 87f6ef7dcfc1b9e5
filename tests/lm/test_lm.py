"""The tiny MoE language model (minimoe.lm.model): whole-model gradient checks, routing by token ids,
parameter and FLOP counts, bad input. Training, sampling and the expert analysis: test_lm_train.py."""
import numpy as np
import pytest

from minimoe.lm import corpus
from minimoe.beyond.hash_router import HashMoELayer, hash_route
from minimoe.lm.model import MoELM, check_lm_gradients
from minimoe.lm.train import expert_usage


def _tiny(rng, ffn="moe", **kw):
    """A model small enough for a per-entry check of every parameter (V=5, d=4, 2 blocks)."""
    args = dict(vocab_size=5, d_model=4, n_heads=2, n_layers=2, max_len=3, rng=rng)
    if not callable(ffn):
        args.update(d_hidden=2, n_experts=3, k=2)
    args.update(kw)
    model = MoELM(ffn=ffn, **args)
    for name, p in model.params.items():          # move parameters off their neat initial values
        if name.endswith(("beta", "b_qkv", "b_o", ".b1", ".b2", "readout.b")):
            p[:] = 0.1 * rng.standard_normal(p.shape)
        elif name.endswith("gamma"):
            p[:] = 1.0 + 0.1 * rng.standard_normal(p.shape)
        elif name.endswith("W_gate"):
            p[:] = 0.5 * rng.standard_normal(p.shape)
    model.params["readout.W"][:] *= 2.0
    return model


# --------------------------------------------------------------------------- whole-model gradient checks
# Whole-model finite differences sit close to float64's floor: the loss is O(1), so at h = 1e-6
# each numerical entry carries ~1e-10 of rounding, and a parameter array whose gradient norm is
# ~0.02 reaches the 1e-8 normwise limit. Over 20 seeds of these fixtures the worst normwise
# error at h = 1e-6 ranged from 1e-9 to 3e-7; the seed below has a ≥ 5x margin at both steps
# (and elementwise every entry passes for every seed). The block-level checks in
# test_transformer.py cover each router kind (hash, expert choice, ...) with comfortable margins.
def test_whole_lm_gradcheck_token_choice_with_aux_loss():
    rng = np.random.default_rng(0)
    model = _tiny(rng, ffn="moe", noisy=False, gate="switch", balance="switch")
    ids, targets = rng.integers(0, 5, size=(1, 3)), rng.integers(0, 5, size=(1, 3))
    reports = check_lm_gradients(model, ids, targets)
    assert {r.name for r in reports} == set(model.params) and len(model.blocks) == 2
    assert model.aux_loss > 0


def test_hash_blocks_route_by_the_token_ids(rng):
    """The model hands its token ids to every hash-routed block (Roller et al. hash the word itself)."""
    model = MoELM(12, d_model=4, n_heads=1, n_layers=2, max_len=5, ffn="hash", d_hidden=4, n_experts=4, k=1,
                  rng=rng)
    ids = rng.integers(0, 12, size=(3, 5))
    model.forward(ids)
    for block in model.blocks:
        np.testing.assert_array_equal(block.stats["topk_idx"], hash_route(ids.reshape(-1), 4, 1))


def test_check_lm_gradients_catches_a_wrong_backward(rng):
    from minimoe.core.gradcheck import GradCheckError

    model = _tiny(rng, ffn="dense", n_layers=1)
    ids, targets = rng.integers(0, 5, size=(1, 3)), rng.integers(0, 5, size=(1, 3))
    original = model.ln_f.backward
    model.ln_f.backward = lambda dy: 2.0 * original(dy)        # a factor-2 bug below the readout
    with pytest.raises(GradCheckError, match="embed.W"):
        check_lm_gradients(model, ids, targets, h=1e-5)


def test_counts(rng):
    model = MoELM(20, d_model=8, n_heads=2, n_layers=2, max_len=5, ffn="moe", d_hidden=8, n_experts=4, k=1, rng=rng)
    block = model.blocks[0]
    assert model.n_params == 20 * 8 + 5 * 8 + 2 * block.n_params + 2 * 8 + 8 * 20 + 20
    assert model.n_active_params == model.n_params - 20 * 8 + 8 - 2 * (block.n_params - block.n_active_params)
    assert model.flops_per_token() == 2 * block.flops_per_token() + 2 * 8 * 20
    f32 = MoELM(20, d_model=8, n_heads=2, n_layers=1, max_len=5, d_hidden=8, dtype=np.float32, rng=rng)
    ids = rng.integers(0, 20, size=(2, 5))
    assert f32.forward(ids).dtype == np.float32 and np.isfinite(f32.forward_loss(ids, ids))
    f32.backward()
    assert all(g.dtype == np.float32 for g in f32.grads.values())
    dense = MoELM(20, d_model=8, n_heads=2, n_layers=1, max_len=5, ffn="dense", rng=rng)
    with pytest.raises(ValueError, match="vocabulary"):
        expert_usage(dense, np.arange(10), layer=0)


# --------------------------------------------------------------------------- bad input
def test_bad_configurations_and_input_are_rejected(rng):
    with pytest.raises(ValueError, match="n_layers must be >= 1"):
        MoELM(10, n_layers=0)
    with pytest.raises(ValueError, match="ffn must be one of"):
        MoELM(10, ffn="mystery")
    with pytest.raises(TypeError, match="only apply when ffn is a kind name"):
        MoELM(10, d_model=4, ffn=lambda i, r: HashMoELayer(4, 4, 2, rng=r), d_hidden=4)
    model = _tiny(rng)
    with pytest.raises(ValueError, match="exceed max_len=3"):
        model.forward(np.zeros((1, 4), dtype=np.int64))
    with pytest.raises(ValueError, match=r"shape \(B, S\)"):
        model.forward(np.zeros(3, dtype=np.int64))
    with pytest.raises(ValueError, match=r"ids must be in \[0, 5\)"):
        model.forward(np.full((1, 3), 5))
    with pytest.raises(ValueError, match="one entry per block"):
        model.forward(np.zeros((1, 3), dtype=np.int64), noise=[None])
    with pytest.raises(RuntimeError, match="forward_loss before backward"):
        _tiny(rng).backward()


# --------------------------------------------------------------------------- aux losses: per layer, summed
def _switch_loss_ref(logits):
    """The Switch loss of HF's load_balancing_loss_func at k = 1, from logits (N, E), a loop."""
    N, E = logits.shape
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    f = np.zeros(E)
    for t in range(N):
        f[np.argmax(p[t])] += 1.0 / N
    return float(E * np.sum(f * p.mean(axis=0)))


def test_aux_losses_are_per_layer_and_summed_not_concatenated():
    """Two layers, each collapsed onto a different one of E = 2 experts: each layer's Switch loss
    is near its maximum 2, so the sum is near 4; one loss over the concatenated logits (HF
    transformers issues #28255, #28093) would be near 1 — perfect balance — and miss both."""
    d, E = 8, 2
    model = MoELM(len(corpus.VOCAB), d_model=d, n_heads=2, n_layers=2, max_len=8, ffn="moe", d_hidden=8,
                  n_experts=E, k=1, noisy=False, balance="switch", balance_coef=1.0,
                  rng=np.random.default_rng(0))
    v = np.ones(d) / np.sqrt(d)
    seen = []
    for layer, block in enumerate(model.blocks):
        block.ln2.params["gamma"][:] = 0.01          # every token's router input is ≈ beta = v
        block.ln2.params["beta"][:] = v
        W = block.ffn.params["W_gate"]
        W[:] = 0.0
        W[:, layer] = 8 * v                           # layer 0 -> expert 0, layer 1 -> expert 1
        forward = block.ffn.forward

        def recording(x, _forward=forward, _W=W, **kw):
            seen.append(x.reshape(-1, d) @ _W)        # this layer's router logits
            return _forward(x, **kw)
        block.ffn.forward = recording
    ids = np.random.default_rng(1).integers(0, len(corpus.VOCAB), size=(3, 8))
    model.forward(ids)
    per_layer = [_switch_loss_ref(L) for L in seen]
    concatenated = _switch_loss_ref(np.concatenate(seen))
    assert model.aux_loss == pytest.approx(sum(per_layer), rel=1e-10)
    assert all(v > 1.99 for v in per_layer)           # each layer: collapsed
    assert concatenated == pytest.approx(1.0, abs=0.01)   # together: looks balanced
    assert model.aux_loss > 3.9
