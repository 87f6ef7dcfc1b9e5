"""The fast path: the same mathematics as experts.py and dispatch.py, with every speed trick.

Read experts.py and dispatch.py first: they are the textbook (a loop over experts calling
``ffn_forward``/``ffn_backward``, fresh arrays everywhere). This file computes the same
numbers, written for speed, under names of their own (``*_fast``, so a traceback says which
path ran); ``MoELayer`` uses it by default (``MoELayer(..., fast=False)``
runs the textbook), and tests/core/test_fast.py runs every MoE configuration through both
and shows outputs and gradients equal to 1e-12.

Speed: the tricks, and why each pays (T=4096, d=128, h=512, k=2 in float64, the benchmark
of ``python -m minimoe.bench``; one hidden (N, h) array is 32 MiB at N = T·k = 8192):

* **One matmul per expert into a preallocated output** (``np.matmul(..., out=z[s:t])``):
  the bank's hidden activations are one (N, h) array written group by group, not E
  arrays concatenated; the biases are added in place.
* **ReLU in place** (:func:`_activation_forward_inplace`): z's buffer becomes a, so only
  one (N, h) array is allocated; the cache is the same ``ReluCache(z > 0)`` that
  ``layers.relu_forward`` makes. GELU's backward needs z itself: no shortcut there.
* **The backward one expert at a time, in one workspace**: da and dz are (n_e, h) blocks
  that stay in cache instead of (N, h) arrays, and one workspace, as tall as the largest
  group, holds them for every expert (a fresh multi-MiB block per expert costs page
  faults each time). ReLU's backward is a mask applied in place on that workspace.
* **np.empty, not np.zeros**, where every entry is written anyway: the weight gradients
  of experts with tokens (only idle experts are zeroed: zero-filling all of dW1 and dW2
  is 64 MiB of writes at E=64), and the combine's (T·k, d) slots when nothing was dropped.
* **The weights' values are checked through the output** (an N·d check, not E·d·h): a
  non-finite weight that no token reaches cannot spoil y, and is reported the first time
  a token does (the textbook's ``ffn_forward`` checks every expert's weights).
* **The combine's backward reuses its gathered buffer** for ``G · dy[token]``.

Measured on 2026-12-01 (2 shared, loaded cores, one BLAS thread, float64, T=4096, d=128,
h=512, k=2, E=8): the textbook path takes about 1.12× the time of this one (median of 7
interleaved forward+backward rounds each); with this path the benchmark's ``ceiling/moe``
was 0.94 and 0.96 in two runs of ``python -m minimoe.bench --threads 1``, against 0.93 and
0.96 for the code before the two paths were split (the same runs, interleaved).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .dispatch import GatherCache, CombineCache, make_plan
from .experts import check_bank, check_glu, check_output_finite
from .layers import (ActivationCache, ReluCache, SwigluCache, activation_backward, activation_forward, swiglu_backward,
                     swiglu_forward)
from ..validate import check_array, check_shapes

__all__ = ["experts_forward_fast", "experts_backward_fast", "dispatch_combine_forward_fast",
           "dispatch_combine_backward_fast", "FastBankCache", "FastDispatchCache"]


class FastBankCache(NamedTuple):
    x: np.ndarray        # (N, d) grouped input
    offsets: np.ndarray  # (E+1,) group boundaries
    a: np.ndarray        # (N, h) hidden activations
    act: ActivationCache  # activation cache, every field (N, h)
    W1: np.ndarray       # (E, d, h)
    W2: np.ndarray       # (E, h, d)
    W3: np.ndarray | None = None   # (E, d, h) SwiGLU's linear branch


# --------------------------------------------------------------------------- the bank
def _first_layer(x, offsets, W, b, h, dtype):
    """``x W_e + b_e`` for every group, into one preallocated (N, h) array."""
    z = np.empty((x.shape[0], h), dtype=dtype)
    for e in range(W.shape[0]):             # a loop over experts, not tokens
        s, t = offsets[e], offsets[e + 1]
        if s < t:
            np.matmul(x[s:t], W[e], out=z[s:t])
            z[s:t] += b[e]
    return z


def experts_forward_fast(x, offsets, W1, b1, W2, b2, activation="relu", *, W3=None, b3=None):
    """:func:`minimoe.core.experts.experts_forward`, into preallocated arrays (same arguments and y)."""
    activation = check_glu(activation, W3, b3)
    (E, d, h), offsets = check_bank(x, offsets, W1, b1, W2, b2, W3, b3)
    dtype = np.result_type(x, W1)
    z = _first_layer(x, offsets, W1, b1, h, dtype)
    if activation == "swiglu":              # silu(z1) ⊙ z3, one vectorized call for all groups
        z3 = _first_layer(x, offsets, W3, b3, h, dtype)
        check_output_finite(z, W1=W1, b1=b1)   # swiglu_forward would blame z1/z3: name the weight
        check_output_finite(z3, W3=W3, b3=b3)
        a, inner = swiglu_forward(z, z3)
        act_cache = ActivationCache("swiglu", inner)
    else:
        a, act_cache = _activation_forward_inplace(z, activation)   # one vectorized call for all groups
    y = np.empty((x.shape[0], d), dtype=dtype)
    for e in range(E):
        s, t = offsets[e], offsets[e + 1]
        if s < t:
            np.matmul(a[s:t], W2[e], out=y[s:t])
            y[s:t] += b2[e]
    check_output_finite(y, W1=W1, b1=b1, W2=W2, b2=b2, **({"W3": W3, "b3": b3} if W3 is not None else {}))
    return y, FastBankCache(x, offsets, a, act_cache, W1, W2, W3)


def experts_backward_fast(dy, cache):
    """:func:`minimoe.core.experts.experts_backward`, one expert at a time in one workspace.

    The gradients are fresh arrays (``np.empty``; every entry is written), never the last
    call's: a caller may keep them (to accumulate micro-batches, say).
    """
    x, offsets, a, act_cache, W1, W2, W3 = cache
    check_array("dy", dy, shape=(x.shape[0], W2.shape[2]), finite=False)
    E, d, h = W1.shape
    shapes = {"W1": W1.shape, "b1": (E, h), "W2": W2.shape, "b2": (E, d)}
    if W3 is not None:
        shapes.update(W3=W3.shape, b3=(E, h))
    out = {name: np.empty(shape, dtype=W1.dtype) for name, shape in shapes.items()}
    dW1, db1, dW2, db2 = out["W1"], out["b1"], out["W2"], out["b2"]
    if W3 is not None:
        return _swiglu_backward(dy, cache, out)
    dx = np.empty_like(x)
    work = np.empty((int(np.max(np.diff(offsets), initial=0)), h), dtype=np.result_type(dy, W2))
    for e in range(E):                      # ffn_backward on one group at a time
        s, t = offsets[e], offsets[e + 1]
        if s == t:                          # no tokens: an exactly zero gradient
            dW1[e], dW2[e], db1[e], db2[e] = 0, 0, 0, 0
            continue
        da = np.matmul(dy[s:t], W2[e].T, out=work[:t - s])      # (n_e, h)
        np.matmul(a[s:t].T, dy[s:t], out=dW2[e])
        db2[e] = dy[s:t].sum(axis=0)
        dz = _activation_backward_rows(da, act_cache, s, t)      # (n_e, h)
        np.matmul(dz, W1[e].T, out=dx[s:t])
        np.matmul(x[s:t].T, dz, out=dW1[e])
        db1[e] = dz.sum(axis=0)
    return dx, {"W1": dW1, "b1": db1, "W2": dW2, "b2": db2}


def _swiglu_backward(dy, cache, out):
    """The bank's backward for SwiGLU experts, one expert at a time (two first-layer matmuls)."""
    x, offsets, a, (_, inner), W1, W2, W3 = cache
    dx = np.empty_like(x)
    work = np.empty((int(np.max(np.diff(offsets), initial=0)), W1.shape[2]), dtype=np.result_type(dy, W2))
    for e in range(W1.shape[0]):
        s, t = offsets[e], offsets[e + 1]
        if s == t:                          # no tokens: an exactly zero gradient
            for name in out:           # only the bank's six gradients live in out
                out[name][e] = 0
            continue
        da = np.matmul(dy[s:t], W2[e].T, out=work[:t - s])      # (n_e, h)
        np.matmul(a[s:t].T, dy[s:t], out=out["W2"][e])
        out["b2"][e] = dy[s:t].sum(axis=0)
        dz1, dz3, _ = swiglu_backward(da, SwigluCache(inner.z1[s:t], inner.z3[s:t], inner.s[s:t]))
        np.matmul(dz1, W1[e].T, out=dx[s:t])
        dx[s:t] += dz3 @ W3[e].T                                 # x feeds both branches
        np.matmul(x[s:t].T, dz1, out=out["W1"][e])
        np.matmul(x[s:t].T, dz3, out=out["W3"][e])
        out["b1"][e] = dz1.sum(axis=0)
        out["b3"][e] = dz3.sum(axis=0)
    return dx, {name: out[name] for name in ("W1", "b1", "W2", "b2", "W3", "b3")}


def _activation_forward_inplace(z, activation):
    """``layers.activation_forward``, except that ReLU overwrites z. Returns (a, cache)."""
    if activation != "relu":
        return activation_forward(z, activation)
    positive = z > 0
    return np.maximum(z, 0, out=z), ActivationCache("relu", ReluCache(positive))


def _activation_backward_rows(da, act_cache, s, t):
    """``layers.activation_backward`` for rows s:t of the bank; for ReLU it overwrites da."""
    name, inner = act_cache
    if name == "relu":
        return np.multiply(da, inner.positive[s:t], out=da)
    rows = inner._make(field[s:t] for field in inner)   # every field of the cache is (N, h)
    return activation_backward(da, ActivationCache(name, rows))[0]


# --------------------------------------------------------------------------- the whole trip
def _sum_slots(rows, plan, dtype):
    """``dispatch._sum_slots`` with np.empty when no slot was dropped (every slot is written)."""
    T, k = plan.kept.shape
    full = (np.empty if plan.dropped == 0 else np.zeros)((T * k, rows.shape[1]), dtype=dtype)
    full[plan.order] = rows
    return full.reshape(T, k, -1).sum(axis=1) if k > 1 else full


class FastDispatchCache(NamedTuple):
    """The fields of ``dispatch.DispatchCache``, under a type of its own: the backward that
    reads it, and a traceback, say which path ran."""
    plan: object
    gather: GatherCache
    experts: FastBankCache
    combine: CombineCache


def dispatch_combine_forward_fast(x, idx, gates, W1, b1, W2, b2, *, capacity=None, activation="relu",
                                  W3=None, b3=None):
    """:func:`minimoe.core.dispatch.dispatch_combine_forward` on the fast bank (same y, same cache fields)."""
    check_shapes(x=(x, ("T", "d")), gates=(gates, ("T", np.shape(idx)[-1])))
    plan = make_plan(idx, W1.shape[0], capacity)
    yg, ecache = experts_forward_fast(np.take(x, plan.token, axis=0), plan.offsets, W1, b1, W2, b2, activation,
                                 W3=W3, b3=b3)
    g = gates.reshape(-1)[plan.order]
    y = _sum_slots(yg * g[:, None], plan, yg.dtype)
    return y, FastDispatchCache(plan, GatherCache(plan, x.shape, x.dtype), ecache,
                                CombineCache(yg, g, plan, gates.shape))


def dispatch_combine_backward_fast(dy, cache):
    """:func:`minimoe.core.dispatch.dispatch_combine_backward` on the fast bank: returns
    ``dx (T,d), dgates (T,k), {"W1", "b1", "W2", "b2"}`` (fresh arrays)."""
    yg, g, plan, shape = cache.combine
    dy_rows = np.take(dy, plan.token, axis=0)                 # (N,d), a fresh array
    dgates = np.zeros(shape[0] * shape[1], dtype=yg.dtype)
    dgates[plan.order] = np.einsum("nd,nd->n", dy_rows, yg)
    dy_rows *= g[:, None]                                     # reuse the gathered buffer
    dxg, grads = experts_backward_fast(dy_rows, cache.experts)
    return _sum_slots(dxg, plan, cache.gather.dtype), dgates.reshape(shape), grads
