"""A bug the random gradient-check study found (issue 21), in core/fast.py, left for its owner.

``fast._swiglu_backward`` zeroes the gradients of an expert that received no token with
``for name in out: out[name][e] = 0``, where ``out`` is the layer's whole ``grads`` dict: it
also writes row e of ``W_gate`` (d, E), an IndexError whenever an empty expert's index e is
>= d_model (and a silently zeroed router row otherwise, overwritten later by MoELayer.backward).
The loop should run over the expert keys only (``shapes``). When it is fixed this test
XPASSes, which strict=True turns into a failure: then remove the mark.
"""
import numpy as np
import pytest

from minimoe import MoELayer


@pytest.mark.xfail(raises=IndexError, strict=True, reason="core/fast.py _swiglu_backward zeroes every grads key")
def test_swiglu_fast_backward_with_an_empty_expert_beyond_d_model():
    # d = 2 < E = 4, k = 1, two tokens: at least two experts get no token, and all four
    # gradients of an empty expert must be exactly zero.
    layer = MoELayer(2, 2, 4, k=1, noisy=False, activation="swiglu", fast=True,
                     rng=np.random.default_rng(0))
    x = np.array([[1.0, 0.5], [-0.3, 2.0]])
    y = layer.forward(x)
    empty = np.setdiff1d(np.arange(4), layer.stats["topk_idx"].ravel())
    assert empty.max() >= 2                       # an empty expert whose index is >= d_model
    layer.backward(np.ones_like(y))
    for name in ("W1", "b1", "W2", "b2", "W3", "b3"):
        assert not np.any(layer.grads[name][empty]), name
