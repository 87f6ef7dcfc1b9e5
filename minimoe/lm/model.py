"""A tiny MoE language model on the clinic notes: the model and its whole-model gradient check.

The model is a decoder-only transformer (GPT-2's layout) built from
:class:`~minimoe.lm.transformer.MoETransformerBlock`:

    x = W[ids] + W_pos[:S]                 (B,S,d)   embedding.py
    x = block_L(...block_1(x))             (B,S,d)   attention + MoE, n_layers times
    logits = LN_f(x) W_out + b_out         (B,S,V)   one score per word of the vocabulary
    loss = mean cross-entropy of the next token (targets = ids shifted by one)

Everything is hand-differentiated; :func:`check_lm_gradients` checks the whole
model against finite differences. Training, sampling and the analysis of what the
experts serve live in :mod:`minimoe.lm.train`.

Shapes: B sequences, S tokens each (S ≤ max_len), d width, V vocabulary, E experts.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import corpus
from .embedding import Embedding, PositionEmbedding, check_ids
from ..core.gradcheck import STEPS, check_gradients
from ..core.layers import cross_entropy_backward, cross_entropy_forward, linear_backward, linear_forward
from .norm import LayerNorm
from .transformer import MoETransformerBlock
from ..validate import check_dtype, check_int, check_rng

__all__ = ["MoELM", "check_lm_gradients"]



class LMCache(NamedTuple):
    readout: tuple          # linear_forward's cache of the readout
    loss: tuple | None      # cross_entropy_forward's cache (None until forward_loss)

class MoELM:
    """A decoder-only transformer language model whose feed-forward layers are MoE layers.

    Example::

        model = MoELM(vocab_size=len(corpus.VOCAB), d_model=32, n_heads=2, n_layers=2, max_len=32,
                      ffn="moe", d_hidden=32, n_experts=4, k=2, rng=np.random.default_rng(0))
        loss = model.forward_loss(inputs, targets)      # (B, S) ints each; model.aux_loss is set
        model.backward()                                # grads of loss + aux_loss

    Args:
        vocab_size: V.  d_model: d.  n_heads: attention heads.  n_layers: blocks (≥ 1).
        max_len: the longest sequence (rows of the position table).
        ffn: a kind for :func:`~minimoe.lm.transformer.make_ffn` ("moe", "hash", "expert_choice",
            "lossfree", "shared", "fine_grained", "dense"), used in every block — or a callable
            ``ffn(layer_index, rng) -> layer`` to build each block's FFN yourself.
        rng: numpy.random.Generator for every initial weight (and the routers' noise).
        dtype: np.float64 (gradient checks) or np.float32 (speed).
        **ffn_kwargs: for make_ffn: d_hidden (default 2·d_model), n_experts, k, gate, ...

    Attributes:
        embed, pos, blocks, ln_f: the parts.  params / grads: flat dicts with keys "embed.W",
        "pos.W_pos", "block0.attn.W_qkv", ..., "ln_f.gamma", "readout.W", "readout.b".
        aux_loss: sum of the blocks' auxiliary losses at the last forward. Each MoE layer's
            loss is computed on its own tokens and router scores, and the layers' losses are
            **summed** — never one loss over the layers' router logits concatenated. A
            concatenated loss measures the balance of all layers together, so one layer's
            imbalance can cancel another's: two layers collapsed onto different experts look
            perfectly balanced (HF transformers issues #28255 and #28093, where Mixtral's
            ``load_balancing_loss_func`` on concatenated logits came out constant;
            tests/lm/test_lm.py builds that case).
    """

    def __init__(self, vocab_size=len(corpus.VOCAB), d_model=32, n_heads=2, n_layers=2, max_len=32, ffn="moe",
                 rng=None, dtype=np.float64, **ffn_kwargs):
        V = check_int("vocab_size", vocab_size, low=2)
        d = check_int("d_model", d_model, low=1)
        n_layers = check_int("n_layers", n_layers, low=1)
        self.max_len = check_int("max_len", max_len, low=1)
        rng = np.random.default_rng(0) if rng is None else check_rng("rng", rng)
        self.dtype = check_dtype("dtype", dtype).type
        self.vocab_size, self.d_model = V, d
        self.embed = Embedding(V, d, rng=rng, dtype=self.dtype)
        self.pos = PositionEmbedding(self.max_len, d, rng=rng, dtype=self.dtype)
        if callable(ffn) and ffn_kwargs:
            raise TypeError(f"ffn_kwargs {sorted(ffn_kwargs)} only apply when ffn is a kind name, not a callable")
        kw = {} if callable(ffn) else {"d_hidden": 2 * d, **ffn_kwargs}
        self.blocks = [MoETransformerBlock(d, n_heads, ffn(i, rng) if callable(ffn) else ffn, rng=rng,
                                           dtype=self.dtype, **kw) for i in range(n_layers)]
        self.ln_f = LayerNorm(d, dtype=self.dtype)
        # Readout N(0, 1/d): the final layer norm makes features O(1), so logits start O(1).
        self._own = {"readout.W": (rng.standard_normal((d, V)) / np.sqrt(d)).astype(self.dtype),
                     "readout.b": np.zeros(V, dtype=self.dtype)}
        self._parts = {"embed": self.embed, "pos": self.pos,
                       **{f"block{i}": b for i, b in enumerate(self.blocks)}, "ln_f": self.ln_f}
        self.params = {f"{pre}.{k}": v for pre, part in self._parts.items() for k, v in part.params.items()}
        self.params.update(self._own)
        self.grads = {k: np.zeros_like(v) for k, v in self.params.items()}
        self.aux_loss = 0.0
        self._cache = None

    # ------------------------------------------------------------------ forward
    def forward(self, ids, train=False, noise=None):
        """Next-token logits for every position.

        Args:
            ids: (B, S) int token ids, S ≤ max_len.
            train: training mode (router noise, loss-free load recording).
            noise: None, or a list with one entry per block (None or that block's router noise).

        Returns:
            logits (B, S, V); sets ``aux_loss``.
        """
        check_ids("ids", ids, self.vocab_size)
        if ids.ndim != 2:
            raise ValueError(f"ids must have shape (B, S) (B sequences of S tokens), got {ids.shape}")
        if ids.shape[1] > self.max_len:
            raise ValueError(f"sequences of {ids.shape[1]} tokens exceed max_len={self.max_len}")
        if noise is None:
            noise = [None] * len(self.blocks)
        elif len(noise) != len(self.blocks):
            raise ValueError(f"noise must have one entry per block ({len(self.blocks)}), got {len(noise)}")
        x = self.pos.forward(self.embed.forward(ids))
        for block, eps in zip(self.blocks, noise):
            x = block.forward(x, train=train, noise=eps, ids=ids)
        z = self.ln_f.forward(x)
        logits, c_out = linear_forward(z, self._own["readout.W"], self._own["readout.b"])
        # One loss per layer, on that layer's tokens, summed (see aux_loss in the docstring)
        self.aux_loss = float(sum(b.aux_loss for b in self.blocks))
        self._cache = LMCache(c_out, None)          # the loss's cache comes with forward_loss
        return logits

    def forward_loss(self, ids, targets, train=True, noise=None):
        """Mean next-token cross-entropy (nats) of ``targets`` (B, S) given ``ids`` (B, S)."""
        logits = self.forward(ids, train=train, noise=noise)
        check_ids("targets", targets, self.vocab_size)
        loss, c_ce = cross_entropy_forward(logits, targets)
        self._cache = self._cache._replace(loss=c_ce)
        return loss

    def backward(self):
        """Fill ``grads`` with ∂(loss + aux_loss)/∂params, the forward read in reverse."""
        if self._cache is None or self._cache.loss is None:
            raise RuntimeError("call forward_loss before backward")
        c_out, c_ce = self._cache
        dlogits, _ = cross_entropy_backward(1.0, c_ce)
        dz, g_out = linear_backward(dlogits, c_out)
        dx = self.ln_f.backward(dz)
        for block in reversed(self.blocks):
            dx = block.backward(dx)
        self.embed.backward(self.pos.backward(dx))
        for pre, part in self._parts.items():
            for k, g in part.grads.items():
                self.grads[f"{pre}.{k}"] = g
        self.grads["readout.W"], self.grads["readout.b"] = g_out["W"], g_out["b"]

    def routing_signature(self):
        """Every block's routing choices at the last forward (for kink detection)."""
        return tuple(b.routing_signature() for b in self.blocks)

    def after_step(self):
        """Per-step bookkeeping after ``optimizer.step()``: nudge loss-free biases."""
        for b in self.blocks:
            f = b.ffn
            if getattr(f, "pending_load", None) is not None and not f.auto_update:
                f.update_bias()

    @property
    def n_params(self):
        return int(sum(p.size for p in self.params.values()))

    @property
    def n_active_params(self):
        """Parameters one token touches (the embedding counts one row)."""
        emb = self.embed.params["W"]
        return int(self.n_params - emb.size + emb.shape[1]
                   - sum(b.n_params - b.n_active_params for b in self.blocks))

    def flops_per_token(self, seq_len=None):
        """Forward FLOPs per token: the blocks plus the readout (2dV); lookups are free."""
        return int(sum(b.flops_per_token(seq_len) for b in self.blocks) + 2 * self.d_model * self.vocab_size)


def check_lm_gradients(model, ids, targets, *, train=False, noise=None, h=STEPS):
    """Whole-model gradient check: every parameter of ``model`` against finite differences of
    ``forward_loss + aux_loss`` (float64 only; keep the model tiny — every entry costs 4 forwards).

    Returns:
        the list of :class:`~minimoe.core.gradcheck.GradReport` (raises GradCheckError on failure,
        KinkError if a nudge changed any routing choice).
    """
    def loss_fn():
        value = model.forward_loss(ids, targets, train=train, noise=noise) + model.aux_loss
        return value, model.routing_signature()

    loss_fn()
    model.backward()
    analytic = {k: np.array(g, dtype=np.float64) for k, g in model.grads.items()}
    return check_gradients(loss_fn, model.params, analytic, h)
