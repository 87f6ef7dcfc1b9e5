"""Causal multi-head self-attention: how a token reads the tokens before it.

The MoE layer replaces the transformer's feed-forward block and looks at each
token alone. Attention is the other half of the block: the only place where a
token gathers information from its context. In the analogy, attention is the
patient's file — before the GP refers a patient, the notes written earlier in
the visit are read, but never the notes that have not been written yet.

Scaled dot-product attention (Vaswani et al. 2017, eq. 1), per head:

    A = softmax( Q Kᵀ / √d_k  +  M )        O = A V

with the causal mask ``M_ij = 0`` for ``j ≤ i`` and ``−∞`` for ``j > i``: token i
attends to itself and to earlier tokens only, which is what lets a language
model be trained on every position of a sequence at once.

Parameters (GPT-2 layout, one fused input projection):

* ``W_qkv (d, 3d)``, ``b_qkv (3d,)`` — columns ``[0:d]`` give Q, ``[d:2d]`` K,
  ``[2d:3d]`` V; each is split into ``n_heads`` heads of width ``d_k = d / n_heads``
  (head j owns columns ``j·d_k:(j+1)·d_k`` of its block);
* ``W_o (d, d)``, ``b_o (d,)`` — the output projection that mixes the heads.

Shapes: ``x (B, S, d)`` — B sequences of S tokens; scores and attention weights
are ``(B, H, S, S)``, H = n_heads. Every step is a batched matmul: no loop over
tokens, none over heads.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from ..core.layers import PairLayer, linear_backward, linear_forward, softmax
from ..validate import check_array, check_shapes, check_dtype, check_int, check_rng

__all__ = [
    "causal_mask", "masked_softmax_forward", "masked_softmax_backward",
    "attention_forward", "attention_backward", "init_attention_params",
    "CausalSelfAttention",
]


def causal_mask(S):
    """(S, S) boolean, True where attention is allowed: ``mask[i, j] = j <= i``."""
    S = check_int("S", S, low=1)
    return np.tril(np.ones((S, S), dtype=bool))


# --------------------------------------------------------------------------- masked softmax
class MaskedSoftmaxCache(NamedTuple):
    p: np.ndarray  # (..., S) attention weights, exactly 0 where masked


def masked_softmax_forward(scores, mask):
    """Softmax over the last axis, restricted to the entries where ``mask`` is True.

    Masked entries are set to −∞ before :func:`minimoe.core.layers.softmax`, so they get
    weight exactly 0 (exp(−∞) = 0, no large-negative-constant approximation). A row
    with *no* allowed entry would be ``−∞ − (−∞) = NaN``; we guard it explicitly and
    give it all-zero weights (it attends to nothing and outputs 0). The causal mask
    never produces such a row — the diagonal is always allowed — but a padding mask
    could, and NaN must never escape.

    Args:
        scores: (..., S) real scores.
        mask: boolean, broadcastable to ``scores``; True = allowed.

    Returns:
        p (same shape and dtype as ``scores``), cache.
    """
    check_array("scores", scores, ndim=range(1, 8))
    mask = np.asarray(mask)
    if mask.dtype != bool:
        raise TypeError(f"mask must be a boolean array (True = allowed), got dtype {mask.dtype}")
    try:
        mask = np.broadcast_to(mask, scores.shape)
    except ValueError:
        raise ValueError(f"mask of shape {mask.shape} does not broadcast to scores of shape {scores.shape}") from None
    any_allowed = mask.any(axis=-1, keepdims=True)
    z = np.where(mask, scores, np.asarray(-np.inf, dtype=scores.dtype))
    z = np.where(any_allowed, z, np.zeros((), dtype=scores.dtype))   # placeholder, zeroed below
    p = np.where(any_allowed, softmax(z), np.zeros((), dtype=scores.dtype))
    return p, MaskedSoftmaxCache(p)


def masked_softmax_backward(dp, cache):
    """The usual softmax backward ``dz = p ⊙ (dp − ⟨dp, p⟩)`` (see ``layers.softmax_backward``).

    Masked entries have p = 0, so they receive exactly zero gradient, and a fully
    masked row (all p = 0) passes no gradient at all — no special case needed.
    """
    p = cache.p
    check_array("dp", dp, shape=p.shape, finite=False)
    return p * (dp - np.sum(dp * p, axis=-1, keepdims=True)), {}


# --------------------------------------------------------------------------- attention
class AttentionCache(NamedTuple):
    qkv: tuple          # cache of x W_qkv + b_qkv
    q: np.ndarray       # (B, H, S, d_k)
    k: np.ndarray       # (B, H, S, d_k)
    v: np.ndarray       # (B, H, S, d_k)
    attn: tuple         # masked-softmax cache: weights (B, H, S, S)
    out: tuple          # cache of ctx W_o + b_o
    scale: float        # 1 / √d_k


def _split_heads(t, H):
    """(B, S, d) -> (B, H, S, d/H)."""
    B, S, d = t.shape
    return t.reshape(B, S, H, d // H).transpose(0, 2, 1, 3)


def _merge_heads(t):
    """(B, H, S, d_k) -> (B, S, H·d_k): the inverse of :func:`_split_heads`."""
    B, H, S, dk = t.shape
    return t.transpose(0, 2, 1, 3).reshape(B, S, H * dk)


def attention_forward(x, W_qkv, b_qkv, W_o, b_o, n_heads):
    """Causal multi-head self-attention.

        [Q K V] = x W_qkv + b_qkv                      (B, S, 3d), split into H heads
        A_h     = masked_softmax(Q_h K_hᵀ / √d_k)      (B, H, S, S), causal
        O       = concat_h(A_h V_h) W_o + b_o          (B, S, d)

    Args:
        x: (B, S, d) sequences of token vectors.
        W_qkv: (d, 3d), b_qkv: (3d,), W_o: (d, d), b_o: (d,).
        n_heads: H, a positive integer dividing d.

    Returns:
        out (B, S, d) in the dtype of the inputs; cache for :func:`attention_backward`
        (``cache.attn.p`` holds the attention weights, handy for plotting).
    """
    check_array("x", x, ndim=3)
    B, S, d = x.shape
    H = check_int("n_heads", n_heads, low=1)
    if d % H:
        raise ValueError(f"d_model (x.shape[-1] = {d}) must be divisible by n_heads = {H}")
    check_shapes(W_qkv=(W_qkv, (d, 3 * d)), b_qkv=(b_qkv, (3 * d,)), W_o=(W_o, (d, d)), b_o=(b_o, (d,)))
    qkv, c_qkv = linear_forward(x, W_qkv, b_qkv)
    q, k, v = (_split_heads(t, H) for t in np.split(qkv, 3, axis=-1))
    # √d_k keeps the scores' variance ~1 whatever the head width, so the softmax
    # does not saturate (Vaswani et al. 2017, §3.2.1).
    scale = 1.0 / math.sqrt(d // H)
    scores = (q @ k.transpose(0, 1, 3, 2)) * scale            # (B, H, S, S)
    A, c_attn = masked_softmax_forward(scores, causal_mask(S))
    ctx = _merge_heads(A @ v)                                  # (B, S, d)
    out, c_out = linear_forward(ctx, W_o, b_o)
    return out, AttentionCache(c_qkv, q, k, v, c_attn, c_out, scale)


def attention_backward(dout, cache):
    """Backward of :func:`attention_forward`, the forward read bottom-up.

        dctx, dW_o, db_o = linear backward           (B, S, d)
        dA  = dO Vᵀ          dV = Aᵀ dO               per head
        dS  = A ⊙ (dA − ⟨dA, A⟩) · scale              masked softmax backward
        dQ  = dS K           dK = dSᵀ Q
        dx, dW_qkv, db_qkv = linear backward of concat(dQ, dK, dV)

    A token's key and value receive gradient from its own query and every later
    one that read them (dSᵀ Q and Aᵀ dO sum over queries); the causal zeros in A
    make sure an output never sends gradient to the inputs after it.

    Args:
        dout: (B, S, d) upstream gradient.

    Returns:
        dx (B, S, d) and ``{"W_qkv", "b_qkv", "W_o", "b_o"}``.
    """
    c_qkv, q, k, v, c_attn, c_out, scale = cache
    B, H, S, dk = q.shape
    check_array("dout", dout, shape=(B, S, H * dk), finite=False)
    dctx, g_out = linear_backward(dout, c_out)
    dO = _split_heads(dctx, H)                              # (B, H, S, d_k)
    A = c_attn.p
    dA = dO @ v.transpose(0, 1, 3, 2)                       # (B, H, S, S)
    dv = A.transpose(0, 1, 3, 2) @ dO
    dscores, _ = masked_softmax_backward(dA, c_attn)
    dscores = dscores * scale
    dq = dscores @ k
    dk = dscores.transpose(0, 1, 3, 2) @ q
    dqkv = np.concatenate([_merge_heads(dq), _merge_heads(dk), _merge_heads(dv)], axis=-1)
    dx, g_qkv = linear_backward(dqkv, c_qkv)
    return dx, {"W_qkv": g_qkv["W"], "b_qkv": g_qkv["b"], "W_o": g_out["W"], "b_o": g_out["b"]}


def init_attention_params(d_model, rng, dtype=np.float64):
    """Initial weights: ``W_qkv``, ``W_o`` ~ N(0, 1/d) (keeps each projection's output
    variance close to its input's), biases zero.

    Returns:
        dict with ``W_qkv (d, 3d)``, ``b_qkv (3d,)``, ``W_o (d, d)``, ``b_o (d,)``.
    """
    d = check_int("d_model", d_model, low=1)
    rng = check_rng("rng", rng)  # an int seed becomes a Generator (SPEC 7: validate.check_rng)
    dtype = check_dtype("dtype", dtype)
    return {
        "W_qkv": (rng.standard_normal((d, 3 * d)) / math.sqrt(d)).astype(dtype),
        "b_qkv": np.zeros(3 * d, dtype=dtype),
        "W_o": (rng.standard_normal((d, d)) / math.sqrt(d)).astype(dtype),
        "b_o": np.zeros(d, dtype=dtype),
    }


class CausalSelfAttention(PairLayer):
    """Causal multi-head self-attention with ``params``/``grads`` dicts of identical keys.

    Example:
        >>> att = CausalSelfAttention(d_model=8, n_heads=2, rng=np.random.default_rng(0))
        >>> y = att.forward(np.ones((2, 5, 8)))      # (B, S, d) -> (B, S, d)
        >>> dx = att.backward(np.ones_like(y))       # fills att.grads
        >>> att.attention.shape                      # (B, H, S, S) weights of the last forward
        (2, 2, 5, 5)
    """

    pair_backward = staticmethod(attention_backward)

    def __init__(self, d_model, n_heads, rng=None, dtype=np.float64):
        d = check_int("d_model", d_model, low=1)
        self.n_heads = check_int("n_heads", n_heads, low=1)
        if d % self.n_heads:
            raise ValueError(f"d_model = {d} must be divisible by n_heads = {self.n_heads}")
        rng = np.random.default_rng(0) if rng is None else rng
        self._keep_params(init_attention_params(d, rng, dtype))

    @property
    def attention(self):
        """(B, H, S, S) attention weights of the last forward pass (row i: who token i read)."""
        if self._cache is None:
            raise RuntimeError("call forward first")
        return self._cache.attn.p

    def forward(self, x):
        """x (B, S, d) -> y (B, S, d)."""
        y, self._cache = attention_forward(x, **self.params, n_heads=self.n_heads)
        return y
