"""Token and position embeddings: gradient checks, repeated ids, one-hot parity, bad input."""
import numpy as np
import pytest

from minimoe.lm.embedding import (
    Embedding, PositionEmbedding, embedding_backward, embedding_forward,
    position_embedding_backward, position_embedding_forward,
)
from minimoe.core.gradcheck import GradCheckError, check_gradients, check_layer, check_pair

_DUMMY = np.zeros(1)   # ids are integers, so the pair is checked w.r.t. W only (wrt_x=False)


def _check_lookup(ids, W, backward=embedding_backward, rng=None):
    forward = lambda _x, W: embedding_forward(ids, W)    # noqa: E731  ids held fixed
    return check_pair(forward, backward, _DUMMY, {"W": W}, wrt_x=False, rng=rng)


@pytest.mark.parametrize("V,d,shape", [(5, 3, (1, 1)), (7, 4, (2, 5)), (3, 2, (4, 6)), (6, 3, (8,))])
def test_lookup_gradcheck(V, d, shape):
    rng = np.random.default_rng(V * d)
    ids = rng.integers(0, V, size=shape)
    reports = _check_lookup(ids, rng.standard_normal((V, d)), rng=rng)
    assert [r.name for r in reports] == ["W", "W"] and all(r.passed for r in reports)


def test_gradcheck_catches_fancy_index_assignment_that_drops_repeats(rng):
    def wrong_backward(dout, cache):          # dW[ids] += dout keeps one write per repeated id
        dW = np.zeros_like(cache.W)
        dW[cache.ids.reshape(-1)] += dout.reshape(-1, cache.W.shape[1])
        return None, {"W": dW}

    ids = np.array([[1, 2, 1, 1]])
    with pytest.raises(GradCheckError, match="W"):
        _check_lookup(ids, rng.standard_normal((4, 3)), backward=wrong_backward)


def test_repeated_ids_accumulate_by_hand():
    out, cache = embedding_forward(np.array([[1, 2, 1]]), np.arange(12.0).reshape(4, 3))
    np.testing.assert_array_equal(out[0, 0], [3.0, 4.0, 5.0])
    _, grads = embedding_backward(np.ones((1, 3, 3)), cache)
    np.testing.assert_array_equal(grads["W"], [[0, 0, 0], [2, 2, 2], [1, 1, 1], [0, 0, 0]])


def test_lookup_equals_one_hot_matmul(rng):
    V, d = 9, 4
    W = rng.standard_normal((V, d))
    ids = rng.integers(0, V, size=(3, 5))
    onehot = np.eye(V)[ids.reshape(-1)]                      # (15, V)
    out, cache = embedding_forward(ids, W)
    np.testing.assert_allclose(out.reshape(-1, d), onehot @ W)
    dout = rng.standard_normal(out.shape)
    _, grads = embedding_backward(dout, cache)
    np.testing.assert_allclose(grads["W"], onehot.T @ dout.reshape(-1, d), rtol=1e-12)


@pytest.mark.parametrize("x_shape,max_len", [((1, 1, 3), 4), ((2, 4, 3), 4), ((3, 2), 5), ((2, 3, 2), 3)])
def test_position_gradcheck(x_shape, max_len):
    rng = np.random.default_rng(max_len + len(x_shape))
    x = rng.standard_normal(x_shape)
    W_pos = rng.standard_normal((max_len, x_shape[-1]))
    reports = check_pair(position_embedding_forward, position_embedding_backward, x, {"W_pos": W_pos}, rng=rng)
    assert {r.name for r in reports} == {"x", "W_pos"} and all(r.passed for r in reports)


def test_unused_positions_get_zero_gradient(rng):
    out, cache = position_embedding_forward(rng.standard_normal((2, 3, 4)), rng.standard_normal((10, 4)))
    _, grads = position_embedding_backward(np.ones_like(out), cache)
    np.testing.assert_array_equal(grads["W_pos"][:3], 2.0)     # two sequences per position
    np.testing.assert_array_equal(grads["W_pos"][3:], 0.0)


def test_classes_gradcheck(rng):
    emb = Embedding(6, 4, rng=rng)
    ids = rng.integers(0, 6, size=(2, 5))
    dout = rng.standard_normal((2, 5, 4))
    emb.forward(ids)
    assert emb.backward(dout) is None          # integer ids: nothing to pass further down
    reports = check_gradients(lambda: float(np.sum(emb.forward(ids) * dout)),
                              emb.params, dict(emb.grads))
    assert all(r.passed for r in reports)
    pos = PositionEmbedding(8, 4, rng=rng)
    assert all(r.passed for r in check_layer(pos, rng.standard_normal((2, 5, 4)), rng=rng))


def test_float32_stays_float32(rng):
    emb, pos = Embedding(5, 4, dtype=np.float32), PositionEmbedding(6, 4, dtype=np.float32)
    x = pos.forward(emb.forward(np.array([[0, 4, 4]])))
    emb.backward(pos.backward(np.ones_like(x)))
    assert x.dtype == emb.grads["W"].dtype == pos.grads["W_pos"].dtype == np.float32


def test_bad_input_messages(rng):
    W = rng.standard_normal((5, 3))
    with pytest.raises(TypeError, match="ids must hold integer token ids, got dtype float64"):
        embedding_forward(np.array([[1.0, 2.0]]), W)
    with pytest.raises(TypeError, match="ids must be a numpy array"):
        embedding_forward([1, 2], W)
    with pytest.raises(ValueError, match=r"ids must be in \[0, 5\).*from 0 to 5"):
        embedding_forward(np.array([0, 5]), W)
    with pytest.raises(ValueError, match=r"ids must be in \[0, 5\).*from -1 to 2"):
        embedding_forward(np.array([-1, 2]), W)
    with pytest.raises(ValueError, match="W must have 2 dimensions"):
        embedding_forward(np.array([0]), np.ones(5))
    _, cache = embedding_forward(np.array([[0, 1]]), W)
    with pytest.raises(ValueError, match=r"dout must have shape \(1, 2, 3\)"):
        embedding_backward(np.ones((2, 3)), cache)
    W_pos = np.zeros((4, 3))
    with pytest.raises(ValueError, match="sequence length S = 5 .* exceeds max_len = 4"):
        position_embedding_forward(np.zeros((2, 5, 3)), W_pos)
    with pytest.raises(ValueError, match=r"x has width 2 but W_pos has shape \(4, 3\)"):
        position_embedding_forward(np.zeros((2, 3, 2)), W_pos)
    with pytest.raises(ValueError, match="x must have 2 or 3 dimensions"):
        position_embedding_forward(np.zeros(3), W_pos)
    with pytest.raises(ValueError, match="vocab_size must be >= 1"):
        Embedding(0, 4)
    with pytest.raises(RuntimeError, match="forward before backward"):
        Embedding(3, 2).backward(np.ones((1, 1, 2)))
