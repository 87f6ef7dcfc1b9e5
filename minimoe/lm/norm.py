"""Layer normalisation: give every token the same scale before it sees the next block.

In a transformer each sublayer (attention, then the feed-forward experts) reads a
*normalised* copy of the residual stream (the "pre-LN" arrangement of GPT-2 and of
the visual guide's decoder block). Layer norm (Ba, Kiros & Hinton 2016, eq. 4)
standardises each token's d features on their own, then lets the layer choose a
new scale and shift per feature:

    μ = (1/d) Σ_i x_i                σ² = (1/d) Σ_i (x_i − μ)²
    x̂ = (x − μ) / √(σ² + ε)          y = γ ⊙ x̂ + β

In the analogy: before any doctor (attention or a specialist) looks at a patient,
the nurse takes the vital signs in standard units, so that one loud patient does
not drown out the rest of the ward.

Shapes: ``x`` is ``(..., d)`` — tokens ``(T, d)`` or sequences ``(B, S, d)``; the
statistics are taken over the last axis only, so every token is normalised alone
(no information flows between tokens, unlike batch norm).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..core.layers import PairLayer
from ..validate import check_array, check_shapes, check_dtype, check_int, check_positive_float

__all__ = ["layernorm_forward", "layernorm_backward", "LayerNorm"]


class LayerNormCache(NamedTuple):
    xhat: np.ndarray   # (..., d) the standardised input
    rstd: np.ndarray   # (..., 1) 1 / √(σ² + ε), one per token
    gamma: np.ndarray  # (d,)


def layernorm_forward(x, gamma, beta, eps=1e-5):
    """Normalise each row of ``x`` to zero mean and unit variance, then scale and shift.

    Args:
        x: (..., d) inputs; each row (token) is normalised on its own.
        gamma: (d,) per-feature scale (γ, initialised to 1).
        beta: (d,) per-feature shift (β, initialised to 0).
        eps: ε > 0 added to the variance so a constant row does not divide by zero
            (its x̂ is then exactly 0 and y = β).

    Returns:
        y: (..., d), same dtype as ``x`` (float32 stays float32); cache for
        :func:`layernorm_backward`.
    """
    check_shapes(x=(x, ("...", "d")), gamma=(gamma, ("d",)), beta=(beta, ("d",)))
    eps = check_positive_float("eps", eps)
    mu = x.mean(axis=-1, keepdims=True)
    xc = x - mu
    var = np.mean(xc * xc, axis=-1, keepdims=True)   # biased variance (1/d), as in the paper
    rstd = 1.0 / np.sqrt(var + eps)
    xhat = xc * rstd
    return gamma * xhat + beta, LayerNormCache(xhat, rstd, gamma)


def layernorm_backward(dy, cache):
    """Backward of layer norm, in the compact form that needs only x̂ and 1/σ.

    With ``g = dy ⊙ γ`` (the gradient reaching x̂), differentiating
    x̂ = (x − μ)/σ through μ and σ gives, row by row,

        dx = (1/σ) · ( g − mean(g) − x̂ · mean(g ⊙ x̂) )

    Read it as: the part of g that would shift the whole row (its mean) and the
    part that would stretch it (its projection on x̂) are removed, because
    normalisation undoes shifts and stretches. The parameters collect over all
    tokens: ``dγ = Σ dy ⊙ x̂``, ``dβ = Σ dy``.

    Args:
        dy: (..., d) upstream gradient.

    Returns:
        dx (..., d) and ``{"gamma": (d,), "beta": (d,)}``.
    """
    xhat, rstd, gamma = cache
    check_array("dy", dy, shape=xhat.shape, finite=False)
    g = dy * gamma
    dx = rstd * (g - g.mean(axis=-1, keepdims=True)
                 - xhat * np.mean(g * xhat, axis=-1, keepdims=True))
    d = xhat.shape[-1]
    dgamma = (dy * xhat).reshape(-1, d).sum(axis=0)
    dbeta = dy.reshape(-1, d).sum(axis=0)
    return dx, {"gamma": dgamma, "beta": dbeta}


class LayerNorm(PairLayer):
    """Layer norm with ``params = {"gamma": (d,), "beta": (d,)}`` and matching ``grads``.

    Example:
        >>> ln = LayerNorm(8)
        >>> y = ln.forward(np.random.default_rng(0).standard_normal((2, 5, 8)))
        >>> dx = ln.backward(np.ones_like(y))      # fills ln.grads
    """

    pair_backward = staticmethod(layernorm_backward)

    def __init__(self, d_model, eps=1e-5, dtype=np.float64):
        d = check_int("d_model", d_model, low=1)
        self.eps = check_positive_float("eps", eps)
        dtype = check_dtype("dtype", dtype)
        self._keep_params({"gamma": np.ones(d, dtype=dtype), "beta": np.zeros(d, dtype=dtype)})

    def forward(self, x):
        """x (..., d) -> y (..., d)."""
        y, self._cache = layernorm_forward(x, **self.params, eps=self.eps)
        return y
