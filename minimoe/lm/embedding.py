"""Embeddings: turning token ids into vectors, and telling the model where each token sits.

A language model's first layer is a lookup table ``W (V, d)``: token id ``t``
becomes row ``W[t]``. It is the same as multiplying a one-hot vector by W, without
ever building the one-hot vector. In the analogy, the embedding is the intake
form: every patient (token) arrives as a name on a list and leaves intake with a
file of d numbers the doctors can read.

Attention is blind to order (permuting the tokens permutes its outputs), so a
*learned position embedding* ``W_pos (max_len, d)`` is added to the token vectors
(as in GPT-2): ``x[b, s] = W[ids[b, s]] + W_pos[s]``.

Backward passes:

* Token lookup: ``∂L/∂W[t] = Σ over every position where ids == t of dout`` — a
  token that appears five times in the batch collects five gradients. Plain fancy
  indexing (``dW[ids] += dout``) would silently keep only *one* of them, because
  repeated indices are written, not accumulated; ``np.add.at`` accumulates. (This
  is one of the classic hand-written-backward bugs; the tests catch it.)
* Position embedding: every sequence in the batch adds the same ``W_pos[s]``, so
  ``∂L/∂W_pos[s] = Σ_b dout[b, s]``; rows beyond S get zero.

Shapes: ids ``(B, S)`` (or any shape of integers), V vocabulary size, d width.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..core.layers import PairLayer
from ..validate import check_array, check_dtype, check_int, check_rng

__all__ = [
    "check_ids", "embedding_forward", "embedding_backward",
    "position_embedding_forward", "position_embedding_backward",
    "Embedding", "PositionEmbedding",
]


def check_ids(name, ids, vocab_size):
    """Check that ``ids`` is an integer array with every value in ``[0, vocab_size)``."""
    if not isinstance(ids, np.ndarray):
        raise TypeError(f"{name} must be a numpy array of integer token ids, got {type(ids).__name__}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"{name} must hold integer token ids, got dtype {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"{name} must be in [0, {vocab_size}) for a vocabulary of {vocab_size}; "
                         f"got values from {ids.min()} to {ids.max()}")
    return ids


# --------------------------------------------------------------------------- token lookup
class EmbeddingCache(NamedTuple):
    ids: np.ndarray   # (...) the looked-up ids
    W: np.ndarray     # (V, d), only its shape and dtype are needed


def embedding_forward(ids, W):
    """Look up one row of ``W`` per token id: ``out[...] = W[ids[...]]``.

    Args:
        ids: integer array of any shape, e.g. (B, S), values in ``[0, V)``.
        W: (V, d) embedding table.

    Returns:
        out: ``ids.shape + (d,)`` in W's dtype; cache for :func:`embedding_backward`.
    """
    check_array("W", W, ndim=2)
    check_ids("ids", ids, W.shape[0])
    return W[ids], EmbeddingCache(ids, W)


def embedding_backward(dout, cache):
    """Scatter-add ``dout`` into the rows that were looked up.

    Args:
        dout: ``ids.shape + (d,)`` upstream gradient.

    Returns:
        ``None`` (integer ids have no gradient) and ``{"W": (V, d)}``.
    """
    ids, W = cache
    check_array("dout", dout, shape=ids.shape + (W.shape[1],), finite=False)
    dW = np.zeros(W.shape, dtype=W.dtype)
    # np.add.at accumulates repeated ids; dW[ids] += dout would drop all but one.
    np.add.at(dW, ids.reshape(-1), dout.reshape(-1, W.shape[1]))
    return None, {"W": dW}


# --------------------------------------------------------------------------- positions
class PositionCache(NamedTuple):
    x_shape: tuple      # (B, S, d) or (S, d)
    W_pos_shape: tuple  # (max_len, d)


def position_embedding_forward(x, W_pos):
    """Add a learned vector per position: ``out[b, s] = x[b, s] + W_pos[s]``.

    Args:
        x: (B, S, d) or (S, d) token vectors.
        W_pos: (max_len, d) position table, ``max_len >= S``.

    Returns:
        out (same shape as x); cache for :func:`position_embedding_backward`.
    """
    check_array("x", x, ndim=(2, 3))
    check_array("W_pos", W_pos, ndim=2)
    S, d = x.shape[-2], x.shape[-1]
    max_len = W_pos.shape[0]
    if W_pos.shape[1] != d:
        raise ValueError(f"x has width {d} but W_pos has shape {W_pos.shape} (expected (max_len, {d}))")
    if S > max_len:
        raise ValueError(f"sequence length S = {S} (x.shape[-2]) exceeds max_len = {max_len} "
                         f"positions of W_pos; use shorter sequences or a longer position table")
    return x + W_pos[:S], PositionCache(x.shape, W_pos.shape)


def position_embedding_backward(dout, cache):
    """``dx = dout``; ``dW_pos[s] = Σ_b dout[b, s]`` for s < S and 0 beyond.

    Returns:
        dx (shape of x) and ``{"W_pos": (max_len, d)}``.
    """
    x_shape, (max_len, d) = cache
    check_array("dout", dout, shape=x_shape, finite=False)
    S = x_shape[-2]
    dW_pos = np.zeros((max_len, d), dtype=dout.dtype)
    dW_pos[:S] = dout.reshape(-1, S, d).sum(axis=0)
    return dout, {"W_pos": dW_pos}


# --------------------------------------------------------------------------- thin classes
def random_table(rows_name, rows, d_model, rng=None, dtype=np.float64, scale=1.0):
    """A (rows, d) table of N(0, scale²) entries; ``rows_name`` names the row count in errors."""
    n = check_int(rows_name, rows, low=1)
    d = check_int("d_model", d_model, low=1)
    rng = check_rng("rng", np.random.default_rng(0) if rng is None else rng)
    return (scale * rng.standard_normal((n, d))).astype(check_dtype("dtype", dtype))


class Embedding(PairLayer):
    """Token embedding table, ``params = {"W": (V, d)}``.

    ``forward(ids)`` takes integers, so ``backward`` returns ``None`` (nothing to pass
    further down) and fills ``grads["W"]``.

    Example:
        >>> emb = Embedding(vocab_size=10, d_model=4, rng=np.random.default_rng(0))
        >>> x = emb.forward(np.array([[1, 2, 1]]))   # (1, 3, 4)
        >>> emb.backward(np.ones_like(x))             # grads["W"][1] is 2s: id 1 appeared twice
    """

    pair_backward = staticmethod(embedding_backward)

    def __init__(self, vocab_size, d_model, rng=None, dtype=np.float64, scale=1.0):
        # N(0, scale²); scale=1 makes token vectors comparable in size to the
        # layer-normalised residual stream they join.
        self._keep_params({"W": random_table("vocab_size", vocab_size, d_model, rng, dtype, scale)})

    def forward(self, ids):
        """ids (B, S) ints -> x (B, S, d)."""
        x, self._cache = embedding_forward(ids, self.params["W"])
        return x


class PositionEmbedding(PairLayer):
    """Learned position embedding, ``params = {"W_pos": (max_len, d)}``; adds ``W_pos[:S]``."""

    pair_backward = staticmethod(position_embedding_backward)

    def __init__(self, max_len, d_model, rng=None, dtype=np.float64, scale=0.1):
        # Small at the start: the model first learns from token identity, then
        # grows the position signal as far as it helps.
        self._keep_params({"W_pos": random_table("max_len", max_len, d_model, rng, dtype, scale)})

    def forward(self, x):
        """x (B, S, d) -> x + W_pos[:S]."""
        y, self._cache = position_embedding_forward(x, self.params["W_pos"])
        return y
