"""Causal self-attention: gradient checks, causality, a loop reference, numerics, bad input."""
import numpy as np
import pytest

from minimoe.lm.attention import (
    CausalSelfAttention, attention_backward, attention_forward, causal_mask,
    init_attention_params, masked_softmax_backward, masked_softmax_forward,
)
from minimoe.core.gradcheck import GradCheckError, check_layer, check_pair


def _params(rng, d):
    p = init_attention_params(d, rng)
    p["b_qkv"] = 0.1 * rng.standard_normal(3 * d)   # non-zero biases, so their gradients are tested
    p["b_o"] = 0.1 * rng.standard_normal(d)
    return p


def _reference(x, W_qkv, b_qkv, W_o, b_o, n_heads):
    """Attention written the slow, obvious way: loops over batch, head and query."""
    B, S, d = x.shape
    dk = d // n_heads
    qkv = x @ W_qkv + b_qkv
    q, k, v = qkv[..., :d], qkv[..., d:2 * d], qkv[..., 2 * d:]
    ctx = np.zeros((B, S, d))
    for b in range(B):
        for h in range(n_heads):
            cols = slice(h * dk, (h + 1) * dk)
            for i in range(S):
                s = np.array([q[b, i, cols] @ k[b, j, cols] for j in range(i + 1)]) / np.sqrt(dk)
                w = np.exp(s - s.max())
                w /= w.sum()
                ctx[b, i, cols] = w @ v[b, :i + 1, cols]
    return ctx @ W_o + b_o


CONFIGS = [(1, 1, 4, 1), (1, 1, 4, 2), (2, 3, 4, 2), (1, 4, 6, 3), (2, 4, 4, 1), (1, 3, 8, 4)]


@pytest.mark.parametrize("B,S,d,H", CONFIGS)
def test_attention_gradcheck(B, S, d, H):
    rng = np.random.default_rng(100 * B + 10 * S + d + H)
    x = rng.standard_normal((B, S, d))
    reports = check_pair(attention_forward, attention_backward, x, _params(rng, d),
                         kwargs={"n_heads": H}, rng=rng)
    assert {r.name for r in reports} == {"x", "W_qkv", "b_qkv", "W_o", "b_o"}
    assert all(r.passed for r in reports)


def test_class_gradcheck(rng):
    att = CausalSelfAttention(d_model=6, n_heads=2, rng=rng)
    att.params.update(_params(rng, 6))
    assert all(r.passed for r in check_layer(att, rng.standard_normal((2, 3, 6)), rng=rng))


def test_gradcheck_catches_a_backward_without_the_score_scale(rng):
    def wrong_backward(dout, cache):           # forgets the 1/√d_k on the way back
        return attention_backward(dout, cache._replace(scale=1.0))

    with pytest.raises(GradCheckError, match="W_qkv"):
        check_pair(attention_forward, wrong_backward, rng.standard_normal((1, 3, 4)), _params(rng, 4),
                   kwargs={"n_heads": 1})


@pytest.mark.parametrize("B,S,d,H", [(2, 5, 8, 2), (1, 1, 4, 4), (3, 4, 6, 1)])
def test_matches_loop_reference(B, S, d, H):
    rng = np.random.default_rng(S * d)
    x, p = rng.standard_normal((B, S, d)), _params(rng, d)
    out, _ = attention_forward(x, **p, n_heads=H)
    np.testing.assert_allclose(out, _reference(x, **p, n_heads=H), rtol=1e-12, atol=1e-12)


def test_changing_a_later_token_leaves_earlier_outputs_unchanged(rng):
    x, p = rng.standard_normal((2, 6, 8)), _params(rng, 8)
    out, _ = attention_forward(x, **p, n_heads=2)
    for t in range(6):
        x2 = x.copy()
        x2[:, t:] += 5.0 * rng.standard_normal(x2[:, t:].shape)
        out2, _ = attention_forward(x2, **p, n_heads=2)
        np.testing.assert_allclose(out2[:, :t], out[:, :t], rtol=0, atol=1e-13)
        assert np.abs(out2[:, t:] - out[:, t:]).min() > 0     # ...and later ones do change


def test_no_gradient_flows_from_earlier_outputs_to_later_inputs(rng):
    x, p = rng.standard_normal((1, 5, 4)), _params(rng, 4)
    out, cache = attention_forward(x, **p, n_heads=2)
    dout = np.zeros_like(out)
    dout[:, 2] = rng.standard_normal(4)            # only output 2 matters to the loss
    dx, _ = attention_backward(dout, cache)
    assert np.all(dx[:, 3:] == 0) and np.all(np.abs(dx[:, :3]).sum(axis=-1) > 0)


def test_attention_weights_are_causal_rows_summing_to_one(rng):
    att = CausalSelfAttention(8, 4, rng=rng)
    att.forward(rng.standard_normal((2, 5, 8)))
    A = att.attention
    assert A.shape == (2, 4, 5, 5)
    np.testing.assert_allclose(A.sum(axis=-1), 1.0, rtol=1e-12)
    assert np.all(A[..., ~causal_mask(5)] == 0)
    np.testing.assert_array_equal(A[..., 0, 0], 1.0)        # the first token can only read itself


def test_single_token_output_is_its_value_projection(rng):
    # With S = 1 every head attends to the one token with weight 1: out = (x W_v + b_v) W_o + b_o.
    p = _params(rng, 4)
    x = rng.standard_normal((3, 1, 4))
    out, _ = attention_forward(x, **p, n_heads=2)
    v = x @ p["W_qkv"][:, 8:] + p["b_qkv"][8:]
    np.testing.assert_allclose(out, v @ p["W_o"] + p["b_o"], rtol=1e-12)


def test_huge_scores_stay_finite_and_float32_stays_float32(rng):
    att = CausalSelfAttention(8, 2, rng=rng, dtype=np.float32)
    x = (1e3 * rng.standard_normal((2, 4, 8))).astype(np.float32)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        y = att.forward(x)
        dx = att.backward(np.ones_like(y))
    assert y.dtype == dx.dtype == np.float32
    assert all(g.dtype == np.float32 for g in att.grads.values())
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(dx))


def test_fully_masked_row_gives_zero_weights_and_no_nan(rng):
    scores = rng.standard_normal((2, 3, 4))
    mask = np.ones((3, 4), dtype=bool)
    mask[1] = False                                   # row 1 may attend to nothing
    mask[2, :2] = False
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        p, cache = masked_softmax_forward(scores, mask)
        dz, _ = masked_softmax_backward(rng.standard_normal(p.shape), cache)
    np.testing.assert_array_equal(p[:, 1], 0.0)
    np.testing.assert_array_equal(dz[:, 1], 0.0)
    np.testing.assert_array_equal(p[:, 2, :2], 0.0)
    np.testing.assert_allclose(p[:, [0, 2]].sum(axis=-1), 1.0)
    reports = check_pair(masked_softmax_forward, masked_softmax_backward, scores, kwargs={"mask": mask})
    assert all(r.passed for r in reports)


def test_bad_input_messages(rng):
    p = _params(rng, 4)
    x = rng.standard_normal((2, 3, 4))
    with pytest.raises(ValueError, match=r"x must have 3 dimensions, got shape \(3, 4\)"):
        attention_forward(x[0], **p, n_heads=2)
    with pytest.raises(ValueError, match=r"d_model \(x.shape\[-1\] = 4\) must be divisible by n_heads = 3"):
        attention_forward(x, **p, n_heads=3)
    with pytest.raises(ValueError, match="n_heads must be >= 1"):
        attention_forward(x, **p, n_heads=0)
    with pytest.raises(TypeError, match="n_heads must be an integer"):
        attention_forward(x, **p, n_heads=2.0)
    with pytest.raises(ValueError, match=r"W_qkv must have shape \(4, 12\)"):
        attention_forward(x, **{**p, "W_qkv": np.ones((4, 8))}, n_heads=2)
    with pytest.raises(ValueError, match=r"b_o must have shape \(4,\)"):
        attention_forward(x, **{**p, "b_o": np.ones(3)}, n_heads=2)
    _, cache = attention_forward(x, **p, n_heads=2)
    with pytest.raises(ValueError, match=r"dout must have shape \(2, 3, 4\)"):
        attention_backward(np.ones((2, 4, 4)), cache)
    with pytest.raises(ValueError, match="d_model = 6 must be divisible by n_heads = 4"):
        CausalSelfAttention(6, 4)
    with pytest.raises(TypeError, match="mask must be a boolean array"):
        masked_softmax_forward(np.ones((2, 2)), np.ones((2, 2)))
    with pytest.raises(ValueError, match="does not broadcast"):
        masked_softmax_forward(np.ones((2, 2)), np.ones((3, 3), dtype=bool))
    with pytest.raises(RuntimeError, match="forward before backward"):
        CausalSelfAttention(4, 2).backward(np.ones((1, 1, 4)))
