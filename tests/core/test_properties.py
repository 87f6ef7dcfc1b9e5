"""Property tests (hypothesis) of the foundation's forward/backward pairs.

A backward pass is the transpose of a Jacobian applied to ``dout``, so for a fixed
forward it must be **linear in dout**:

    backward(α·d1 + β·d2) = α·backward(d1) + β·backward(d2),    backward(0) = 0.

A backward that adds a constant, squares something, or reads a stale cache breaks
one of these, whatever the shapes. Hypothesis draws the shapes, the seed and α, β.
"""
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from minimoe import layers
from minimoe.core.experts import experts_backward, experts_forward, ffn_backward, ffn_forward

FAST = settings(max_examples=25, deadline=None)

PAIRS = ["linear", "relu", "gelu", "softmax", "cross_entropy", "ffn_relu", "ffn_gelu", "experts"]


@st.composite
def configs(draw):
    """A pair's name, a seed, and small dimensions: T tokens, d width, h hidden, E experts' group sizes."""
    return dict(name=draw(st.sampled_from(PAIRS)), seed=draw(st.integers(0, 2**32 - 1)),
                T=draw(st.integers(1, 6)), d=draw(st.integers(1, 5)), h=draw(st.integers(1, 5)),
                sizes=draw(st.lists(st.integers(0, 3), min_size=1, max_size=4)))


def _forward(name, seed, T, d, h, sizes):
    """Run one forward of the named pair; return (shape of out, backward as a function of dout)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, d))
    if name == "linear":
        out, cache = layers.linear_forward(x, rng.standard_normal((d, h)), rng.standard_normal(h))
        back = layers.linear_backward
    elif name in ("relu", "gelu", "softmax"):
        fwd, back = {"relu": (layers.relu_forward, layers.relu_backward),
                     "gelu": (layers.gelu_forward, layers.gelu_backward),
                     "softmax": (layers.softmax_forward, layers.softmax_backward)}[name]
        out, cache = fwd(3 * x)
    elif name == "cross_entropy":
        out, cache = layers.cross_entropy_forward(x, rng.integers(0, d, size=T))
        back = layers.cross_entropy_backward
    elif name.startswith("ffn"):
        p = dict(W1=rng.standard_normal((d, h)), b1=rng.standard_normal(h),
                 W2=rng.standard_normal((h, d)), b2=rng.standard_normal(d))
        out, cache = ffn_forward(x, **p, activation=name[4:])
        back = ffn_backward
    else:
        E, N = len(sizes), sum(sizes)
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        out, cache = experts_forward(rng.standard_normal((N, d)), offsets,
                                     rng.standard_normal((E, d, h)), rng.standard_normal((E, h)),
                                     rng.standard_normal((E, h, d)), rng.standard_normal((E, d)))
        back = experts_backward
    return np.shape(out), lambda dout: _flat(back(dout, cache))


def _flat(result):
    """(dx, grads) -> [dx, grads in key order], so results can be compared as one list."""
    dx, grads = result
    return [np.asarray(dx)] + [np.asarray(grads[k]) for k in sorted(grads)]


@FAST
@given(cfg=configs(), alpha=st.floats(-3, 3), beta=st.floats(-3, 3))
def test_backward_is_linear_in_dout(cfg, alpha, beta):
    shape, backward = _forward(**cfg)
    rng = np.random.default_rng(cfg["seed"] + 1)
    d1, d2 = rng.standard_normal(shape), rng.standard_normal(shape)
    lhs = backward(alpha * d1 + beta * d2)
    g1, g2 = backward(d1), backward(d2)
    for left, a, b in zip(lhs, g1, g2):
        rhs = alpha * a + beta * b
        scale = 1.0 + np.abs(alpha * a).max(initial=0) + np.abs(beta * b).max(initial=0)
        np.testing.assert_allclose(left, rhs, rtol=0, atol=1e-12 * scale)


@FAST
@given(cfg=configs())
def test_backward_of_zero_is_exactly_zero(cfg):
    shape, backward = _forward(**cfg)
    for g in backward(np.zeros(shape)):
        assert np.all(g == 0.0)


# --------------------------------------------------------------------------- softmax
logit_rows = hnp.arrays(np.float64, hnp.array_shapes(min_dims=2, max_dims=2, max_side=6),
                        elements=st.floats(-1e4, 1e4))


@FAST
@given(z=logit_rows, shift=st.floats(-1e4, 1e4))
def test_softmax_sums_to_one_and_ignores_a_shift_per_row(z, shift):
    p, _ = layers.softmax_forward(z)
    assert np.all((p >= 0) & (p <= 1))
    np.testing.assert_allclose(p.sum(axis=-1), 1.0, rtol=0, atol=1e-14)
    shifts = shift * np.linspace(-1, 1, z.shape[0])[:, None]      # a different constant per row
    q, _ = layers.softmax_forward(z + shifts)
    # z + shift is rounded to ~ulp(2e4) ≈ 4e-12, which moves p by about that much.
    np.testing.assert_allclose(q, p, rtol=0, atol=1e-10)


@FAST
@given(z=logit_rows, seed=st.integers(0, 2**32 - 1))
def test_softmax_and_cross_entropy_gradients_sum_to_zero_per_row(z, seed):
    # Adding a constant to a row of logits changes nothing, so the gradient is orthogonal to (1,…,1).
    rng = np.random.default_rng(seed)
    p, cache = layers.softmax_forward(z)
    dp = rng.standard_normal(z.shape)
    dz, _ = layers.softmax_backward(dp, cache)
    np.testing.assert_allclose(dz.sum(axis=-1), 0.0, rtol=0, atol=1e-12 * (1 + np.abs(dp).max()))
    _, ce_cache = layers.cross_entropy_forward(z, rng.integers(0, z.shape[1], size=z.shape[0]))
    dlogits, _ = layers.cross_entropy_backward(1.0, ce_cache)
    np.testing.assert_allclose(dlogits.sum(axis=-1), 0.0, rtol=0, atol=1e-14)
