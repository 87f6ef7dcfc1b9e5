"""The MoE transformer block: where the specialists sit in a language model.

A decoder-only transformer (GPT-2; the visual guide's decoder block) is a stack of
identical blocks. Each block lets every token first *read its context*
(attention), then *think on its own* (the feed-forward network, FFN). An MoE
transformer replaces that FFN by a layer of experts — any of minimoe's routers
will do — and changes nothing else (GShard, Lepikhin et al. 2020; Switch,
Fedus et al. 2021). We use the pre-LN arrangement (Xiong et al. 2020), which
trains without learning-rate warm-up:

    h = x + Attn(LN1(x))          (B,S,d)   read the patient's file (causal: earlier notes only)
    y = h + MoE(LN2(h))           (B,S,d)   refer to specialists, token by token

The residual connections matter twice over: they carry the signal (and its
gradient) around each sublayer, and they carry on any token the MoE dropped
(its MoE output is 0, so ``y = h``). Backward, each residual *adds* two gradient
paths — the straight one and the one through the sublayer:

    dh = dy + LN2ᵀ(MoEᵀ(dy))          dx = dh + LN1ᵀ(Attnᵀ(dh))

where ``Fᵀ`` stands for F's hand-written backward (attention.py, norm.py and the
MoE layer's own). Nothing new is derived here: the block is the chain rule
applied to parts that are already gradient-checked, and the whole block is
checked again in tests/lm/test_transformer.py.

Shapes: B sequences of S tokens, width d; the MoE sees the B·S tokens as T = B·S.
"""
from __future__ import annotations

import numpy as np

from .attention import CausalSelfAttention
from ..beyond.expert_choice import ExpertChoiceMoELayer
from ..beyond.hash_router import HashMoELayer
from ..beyond.lossfree import LossFreeMoELayer
from ..core.experts import Expert
from ..core.moe import MoELayer
from .norm import LayerNorm
from ..beyond.shared_experts import SharedExpertMoELayer
from ..validate import check_array, check_choice, check_dtype, check_int, check_rng

__all__ = ["FFN_KINDS", "make_ffn", "MoETransformerBlock"]

FFN_KINDS = ("dense", "moe", "hash", "expert_choice", "lossfree", "shared", "fine_grained")


def make_ffn(kind, d_model, d_hidden, n_experts=4, k=2, *, rng=None, dtype=np.float64, **kwargs):
    """Build the block's feed-forward layer by name.

    Args:
        kind: one of :data:`FFN_KINDS` —
            "dense" (one FFN of width d_hidden; ``n_experts``/``k`` unused),
            "moe" (:class:`~minimoe.core.moe.MoELayer`, token-choice top-k),
            "hash" (:class:`~minimoe.beyond.hash_router.HashMoELayer`),
            "expert_choice" (:class:`~minimoe.beyond.expert_choice.ExpertChoiceMoELayer`),
            "lossfree" (:class:`~minimoe.beyond.lossfree.LossFreeMoELayer`),
            "shared" (:class:`~minimoe.beyond.shared_experts.SharedExpertMoELayer`, widths as given),
            "fine_grained" (``SharedExpertMoELayer.fine_grained``: the DeepSeekMoE layer with the
            expert compute of a "moe" layer built from the same d_hidden, n_experts, k).
        d_model: d.  d_hidden: h.  n_experts: E.  k: experts per token.
        rng, dtype: as everywhere.  **kwargs: passed on to the layer's constructor.

    Returns:
        a layer with ``params``, ``grads``, ``forward(x, train, noise)``, ``backward(dy)``,
        ``aux_loss``, ``n_params``, ``n_active_params``, ``flops_per_token()``.
    """
    check_choice("ffn", kind, FFN_KINDS)
    rng = np.random.default_rng(0) if rng is None else check_rng("rng", rng)
    if kind == "dense":
        check_int("d_model", d_model, low=1)
        check_int("d_hidden", d_hidden, low=1)
        return Expert(d_model, d_hidden, rng=rng, dtype=check_dtype("dtype", dtype).type, **kwargs)
    if kind == "fine_grained":
        return SharedExpertMoELayer.fine_grained(d_model, d_hidden, n_experts, k, rng=rng, dtype=dtype, **kwargs)
    cls = {"moe": MoELayer, "hash": HashMoELayer, "expert_choice": ExpertChoiceMoELayer,
           "lossfree": LossFreeMoELayer, "shared": SharedExpertMoELayer}[kind]
    return cls(d_model, d_hidden, n_experts, k=k, rng=rng, dtype=dtype, **kwargs)


class MoETransformerBlock:
    """Pre-LN transformer block with an MoE feed-forward layer, every backward by hand.

    Example::

        block = MoETransformerBlock(d_model=16, n_heads=2, ffn="moe", d_hidden=32, n_experts=4, k=2,
                                    rng=np.random.default_rng(0))
        y = block.forward(x)             # x (B, S, d) -> y (B, S, d); block.aux_loss is set
        dx = block.backward(dy)          # gradient of ⟨dy, y⟩ + aux_loss; fills block.grads

    Args:
        d_model: d.  n_heads: attention heads (must divide d).
        ffn: a kind for :func:`make_ffn` ("moe", "hash", "expert_choice", ...), or a ready-made
            layer object with the MoELayer surface (then give no ``ffn_kwargs``).
        rng: numpy.random.Generator for every initial weight.  dtype: float64 or float32.
        eps: layer-norm ε.
        **ffn_kwargs: for :func:`make_ffn` (d_hidden is required there).

    Attributes:
        ln1, attn, ln2, ffn: the four sublayers.
        params / grads: one flat dict each, keys prefixed "ln1.", "attn.", "ln2.", "ffn."; the
            arrays are the sublayers' own (an optimizer updates them in place).
        aux_loss: the FFN's auxiliary loss of the last forward (0 for dense/hash/expert choice),
            computed on this block's tokens only; the model sums the blocks' losses (never
            concatenates their router logits: see ``MoELM``).
    """

    def __init__(self, d_model, n_heads, ffn="moe", *, rng=None, dtype=np.float64, eps=1e-5, **ffn_kwargs):
        d = check_int("d_model", d_model, low=1)
        rng = np.random.default_rng(0) if rng is None else check_rng("rng", rng)
        dtype = check_dtype("dtype", dtype).type
        self.d_model, self.dtype = d, dtype
        self.ln1 = LayerNorm(d, eps=eps, dtype=dtype)
        self.attn = CausalSelfAttention(d, n_heads, rng=rng, dtype=dtype)
        self.ln2 = LayerNorm(d, eps=eps, dtype=dtype)
        if isinstance(ffn, str):
            if "d_hidden" not in ffn_kwargs:
                raise TypeError(f"ffn={ffn!r} needs d_hidden (the expert hidden width) among the keyword arguments")
            self.ffn = make_ffn(ffn, d, rng=rng, dtype=dtype, **ffn_kwargs)
        else:
            missing = [a for a in ("params", "grads", "forward", "backward") if not hasattr(ffn, a)]
            if missing:
                raise TypeError(f"ffn must be a kind name ({', '.join(FFN_KINDS)}) or a layer with params, "
                                f"grads, forward and backward; {type(ffn).__name__} lacks {missing}")
            if ffn_kwargs:
                raise TypeError(f"ffn_kwargs {sorted(ffn_kwargs)} only apply when ffn is a kind name")
            if getattr(ffn, "d_model", d) != d:
                raise ValueError(f"ffn has d_model={ffn.d_model} but the block has d_model={d}")
            self.ffn = ffn
        self._parts = {"ln1": self.ln1, "attn": self.attn, "ln2": self.ln2, "ffn": self.ffn}
        self.params = {f"{pre}.{k}": v for pre, part in self._parts.items() for k, v in part.params.items()}
        self.grads = {k: np.zeros_like(v) for k, v in self.params.items()}
        self.aux_loss = 0.0
        self._ready = False

    def forward(self, x, train=True, noise=None, ids=None):
        """One block: ``h = x + Attn(LN1(x))``, ``y = h + FFN(LN2(h))``.

        Args:
            x: (B, S, d) token vectors.
            train: training mode (router noise, if any; the loss-free bias load is recorded).
            noise: explicit router noise ε for the FFN, (B·S, E) or (B, S, E); None draws it
                from the FFN's own rng when needed.
            ids: (B, S) token ids, used only by a hash-routed FFN (Roller et al. 2021 hash the
                current token's id in every layer).

        Returns:
            y (B, S, d); sets ``aux_loss``.
        """
        check_array("x", x, ndim=3)
        if x.shape[-1] != self.d_model:
            raise ValueError(f"x must have width d_model={self.d_model} in its last axis, got shape {x.shape}")
        x = x.astype(self.dtype, copy=False)
        h = x + self.attn.forward(self.ln1.forward(x))
        kw = {"train": train, "noise": noise}
        if getattr(self.ffn, "uses_ids", False):
            kw["ids"] = ids
        y = h + self.ffn.forward(self.ln2.forward(h), **kw)
        self.aux_loss = float(getattr(self.ffn, "aux_loss", 0.0) or 0.0)
        self._ready = True
        return y

    def backward(self, dy):
        """Gradient of ``⟨dy, y⟩ + aux_loss``: returns dx (B, S, d) and fills ``grads``.

        Each residual connection adds the gradient that goes around the sublayer to the
        one that goes through it.
        """
        if not self._ready:
            raise RuntimeError("call forward before backward")
        dh = dy + self.ln2.backward(self.ffn.backward(dy))
        dx = dh + self.ln1.backward(self.attn.backward(dh))
        for pre, part in self._parts.items():
            for k, g in part.grads.items():
                self.grads[f"{pre}.{k}"] = g
        return dx

    @property
    def stats(self):
        """The FFN's routing stats of the last forward ({} for a dense FFN)."""
        return getattr(self.ffn, "stats", {})

    @property
    def attention(self):
        """(B, H, S, S) attention weights of the last forward."""
        return self.attn.attention

    def routing_signature(self):
        """The FFN's discrete routing choices (None for a dense FFN), for kink detection."""
        sig = getattr(self.ffn, "routing_signature", None)
        return sig() if sig is not None else None

    @property
    def n_params(self):
        return int(sum(p.size for p in self.params.values()))

    @property
    def n_active_params(self):
        """Parameters one token touches: layer norms, attention, and the FFN's active part."""
        return int(self.n_params - self.ffn.n_params + self.ffn.n_active_params)

    def flops_per_token(self, seq_len=None):
        """Forward FLOPs per token (2 per multiply-add, products only): the attention
        projections (6d² for Q, K, V and 2d² for the output) plus the FFN's. With ``seq_len``
        S, also the causal scores and weighted sum, 4d per visible key, (S+1)/2 keys on average."""
        d = self.d_model
        att = 8 * d * d
        if seq_len is not None:
            S = check_int("seq_len", seq_len, low=1)
            att += 2 * d * (S + 1)
        return int(att + self.ffn.flops_per_token())

    def __repr__(self):
        return f"MoETransformerBlock(d_model={self.d_model}, n_heads={self.attn.n_heads}, ffn={self.ffn!r})"
