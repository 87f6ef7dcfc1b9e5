"""Sparse upcycling: turn a trained dense language model into an MoE one (Komatsuzaki et al. 2022).

Training an MoE from scratch throws away a dense model one may already have. *Sparse
Upcycling* starts the MoE from it instead: every block's dense FFN becomes E experts that
are all **copies** of it, a new router is added, and everything else (embeddings,
attention, layer norms, readout) is kept as it was. Then training goes on.

    W1_e = W1,  b1_e = b1,  W2_e = W2,  b2_e = b2      for every expert e     (E copies)
    W_gate = 0 (or small random),  W_noise = 0          a new router; noise σ = softplus(0) ≈ 0.69

**Why the start is exact, for a gate that renormalises.** The MoE layer computes
``y = Σ_{e∈top-k} G_e · FFN_e(x)``. All experts are the same function, so
``y = (Σ_{e∈top-k} G_e) · FFN(x)``, and a gate whose weights sum to 1 — the top-k gate
(softmax renormalised over the k chosen) and the dense gate (softmax over all E) — gives
``y = FFN(x)``: the upcycled model computes exactly what the dense one did, whichever
experts the router picks, with or without noise. Nothing is lost at the start.

**The Switch gate does not renormalise**: it keeps the softmax probabilities of the k
chosen, which sum to less than 1 (with a zero router, p_e = 1/E, so the FFN's output is
multiplied by k/E). The upcycled model then starts as a *different* model, its FFN
outputs shrunk — the residual stream is not — and training must first undo the damage.
Dropped tokens (a capacity factor) break the equality too: their FFN output is 0. So
:func:`upcycle` uses no capacity limit unless asked.

**Why noise.** With identical experts the router gets no gradient: for a renormalised
gate, ∂loss/∂logit_e = G_e (⟨dy, FFN_e(x)⟩ − Σ_j G_j ⟨dy, FFN_j(x)⟩) = 0 when every
FFN_e(x) is the same. Router noise sends each token to random experts, which then see
different tokens, get different gradients and drift apart; only then can the router
learn to tell them apart.
"""
from __future__ import annotations

import numpy as np

from ..core.experts import Expert
from .model import MoELM
from ..validate import check_choice, check_int, check_rng

__all__ = ["upcycle_ffn", "upcycle", "ROUTER_INITS"]

ROUTER_INITS = ("zero", "random")


def upcycle_ffn(params, n_experts, router_init="zero", rng=None, noisy=True):
    """The parameters of an MoE layer whose E experts are copies of one dense FFN.

    Args:
        params: the dense FFN's ``{"W1" (d,h), "b1" (h,), "W2" (h,d), "b2" (d,)}``.
        n_experts: E ≥ 1.
        router_init: "zero" (``W_gate = 0``: every expert equally likely) or "random"
            (N(0, 0.01/d), small enough to barely tilt the first choices).
        rng: for router_init="random".  noisy: add ``W_noise (d,E) = 0`` (noise σ = softplus(0)).

    Returns:
        ``{"W_gate" (d,E), ["W_noise" (d,E),] "W1" (E,d,h), "b1" (E,h), "W2" (E,h,d), "b2" (E,d)}``:
        new arrays (each expert its own copy, so training one never changes another).
    """
    missing = [k for k in ("W1", "b1", "W2", "b2") if k not in params]
    if missing:
        raise ValueError(f"params must hold a dense FFN's W1, b1, W2, b2; missing {missing}")
    E = check_int("n_experts", n_experts, low=1)
    check_choice("router_init", router_init, ROUTER_INITS)
    W1, b1, W2, b2 = (np.asarray(params[k]) for k in ("W1", "b1", "W2", "b2"))
    if W1.ndim != 2 or W2.shape != W1.shape[::-1] or b1.shape != W1.shape[1:] or b2.shape != W1.shape[:1]:
        raise ValueError(f"params must have shapes W1 (d,h), b1 (h,), W2 (h,d), b2 (d,); got W1 {W1.shape}, "
                         f"b1 {b1.shape}, W2 {W2.shape}, b2 {b2.shape}")
    d = W1.shape[0]
    if router_init == "zero":
        W_gate = np.zeros((d, E), dtype=W1.dtype)
    else:
        W_gate = (check_rng("rng", rng).standard_normal((d, E)) * np.sqrt(0.01 / d)).astype(W1.dtype)
    out = {"W_gate": W_gate}
    if noisy:
        out["W_noise"] = np.zeros((d, E), dtype=W1.dtype)
    # np.repeat makes new arrays (a broadcast view would share one buffer among all experts)
    out.update(W1=np.repeat(W1[None], E, axis=0), b1=np.repeat(b1[None], E, axis=0),
               W2=np.repeat(W2[None], E, axis=0), b2=np.repeat(b2[None], E, axis=0))
    return out


def upcycle(dense, n_experts, k=2, gate="topk", router_init="zero", rng=None, **moe_kwargs):
    """An :class:`MoELM` made from the dense ``MoELM`` ``dense``: the same weights everywhere, and
    each block's FFN turned into ``n_experts`` copies of it behind a new router.

    Args:
        dense: an MoELM whose blocks all have a dense FFN (ffn="dense", ReLU).
        n_experts: E.  k: experts per token.  gate: "topk" or "dense" start exactly as ``dense``
            (their gates sum to 1); "switch" does not (see the module docstring).
        router_init: "zero" or "random" (see :func:`upcycle_ffn`).  rng: the new model's
            generator (router noise; random router weights).
        **moe_kwargs: for :class:`~minimoe.core.moe.MoELayer` (noisy=True by default, balance,
            balance_coef, capacity_factor=None, ...).

    Returns:
        the new MoELM (the dense model is not changed).
    """
    if not isinstance(dense, MoELM):
        raise TypeError(f"dense must be an MoELM, got {type(dense).__name__}")
    not_dense = [i for i, b in enumerate(dense.blocks) if type(b.ffn) is not Expert]
    if not_dense:
        raise ValueError(f"dense must have a dense FFN in every block; blocks {not_dense} are not dense")
    if any(b.ffn.activation != "relu" for b in dense.blocks):
        raise ValueError("upcycle copies ReLU FFNs; this model's FFN activation is "
                         f"{dense.blocks[0].ffn.activation!r}")
    rng = np.random.default_rng(0) if rng is None else check_rng("rng", rng)
    ffn0 = dense.blocks[0].ffn
    moe = MoELM(dense.vocab_size, dense.d_model, dense.blocks[0].attn.n_heads, len(dense.blocks), dense.max_len,
                ffn="moe", rng=rng, dtype=dense.dtype, d_hidden=ffn0.d_hidden, n_experts=n_experts, k=k,
                gate=gate, **moe_kwargs)
    noisy = moe.blocks[0].ffn.cfg.noisy
    for i, block in enumerate(dense.blocks):
        new = upcycle_ffn(block.ffn.params, n_experts, router_init, rng, noisy=noisy)
        for key, value in new.items():
            moe.params[f"block{i}.ffn.{key}"][...] = value        # in place: the layer holds these arrays
    for key, value in dense.params.items():                        # everything that is not an FFN
        if ".ffn." not in key:
            moe.params[key][...] = value
    return moe
