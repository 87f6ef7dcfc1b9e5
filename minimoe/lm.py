"""A tiny MoE language model on the clinic notes, and what its specialists end up serving.

The model is a decoder-only transformer (GPT-2's layout) built from
:class:`~minimoe.transformer.MoETransformerBlock`:

    x = W[ids] + W_pos[:S]                 (B,S,d)   embedding.py
    x = block_L(...block_1(x))             (B,S,d)   attention + MoE, n_layers times
    logits = LN_f(x) W_out + b_out         (B,S,V)   one score per word of the vocabulary
    loss = mean cross-entropy of the next token (targets = ids shifted by one)

Everything is hand-differentiated; :func:`check_lm_gradients` checks the whole
model against finite differences. It trains in seconds on corpus.py's synthetic
clinic notes, where every word has a known *class* (syntax) and every note a known
*topic* (specialty) — so :func:`expert_usage` can measure which one the experts
follow, the mutual information ``I(expert; class)`` versus ``I(expert; topic)``.
(Studies of real MoE language models — ST-MoE, Zoph et al. 2022 — find
experts specialising in token types, not topics; here we can test that on data
where both answers are known, and a hash-routed model gives the baseline.)

Shapes: B sequences, S tokens each (S ≤ max_len), d width, V vocabulary, E experts.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from . import corpus
from .embedding import Embedding, PositionEmbedding, check_ids
from .gradcheck import STEPS, check_gradients
from .layers import cross_entropy_backward, cross_entropy_forward, linear_backward, linear_forward, softmax
from .norm import LayerNorm
from .optim import make_optimizer
from .transformer import MoETransformerBlock
from .validate import check_dtype, check_int, check_positive_float, check_rng

__all__ = ["MoELM", "check_lm_gradients", "LMHistory", "evaluate_lm", "train_lm", "QUICK", "QuickLM",
           "quick_lm", "sample", "ExpertUsage", "expert_usage"]


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
        ffn: a kind for :func:`~minimoe.transformer.make_ffn` ("moe", "hash", "expert_choice",
            "lossfree", "shared", "fine_grained", "dense"), used in every block — or a callable
            ``ffn(layer_index, rng) -> layer`` to build each block's FFN yourself.
        rng: numpy.random.Generator for every initial weight (and the routers' noise).
        dtype: np.float64 (gradient checks) or np.float32 (speed).
        **ffn_kwargs: for make_ffn: d_hidden (default 2·d_model), n_experts, k, gate, ...

    Attributes:
        embed, pos, blocks, ln_f: the parts.  params / grads: flat dicts with keys "embed.W",
        "pos.W_pos", "block0.attn.W_qkv", ..., "ln_f.gamma", "readout.W", "readout.b".
        aux_loss: sum of the blocks' auxiliary losses at the last forward.
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
        self.aux_loss = float(sum(b.aux_loss for b in self.blocks))
        self._cache = [c_out, None]
        return logits

    def forward_loss(self, ids, targets, train=True, noise=None):
        """Mean next-token cross-entropy (nats) of ``targets`` (B, S) given ``ids`` (B, S)."""
        logits = self.forward(ids, train=train, noise=noise)
        check_ids("targets", targets, self.vocab_size)
        loss, c_ce = cross_entropy_forward(logits, targets)
        self._cache[1] = c_ce
        return loss

    def backward(self):
        """Fill ``grads`` with ∂(loss + aux_loss)/∂params, the forward read in reverse."""
        if self._cache is None or self._cache[1] is None:
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
        the list of :class:`~minimoe.gradcheck.GradReport` (raises GradCheckError on failure,
        KinkError if a nudge changed any routing choice).
    """
    def loss_fn():
        value = model.forward_loss(ids, targets, train=train, noise=noise) + model.aux_loss
        return value, model.routing_signature()

    loss_fn()
    model.backward()
    analytic = {k: np.array(g, dtype=np.float64) for k, g in model.grads.items()}
    return check_gradients(loss_fn, model.params, analytic, h)


# --------------------------------------------------------------------------- training
@dataclass
class LMHistory:
    """One entry per evaluation: ``step``, interval means of ``train_loss`` and ``aux_loss``,
    ``val_loss`` (eval mode), and ``load_cv`` (per block, CV of the interval's expert load;
    NaN for a dense block). ``unigram`` and ``bigram`` are the baselines' validation
    cross-entropies (corpus.py), for reference lines on a plot."""
    step: list = field(default_factory=list)
    train_loss: list = field(default_factory=list)
    aux_loss: list = field(default_factory=list)
    val_loss: list = field(default_factory=list)
    load_cv: list = field(default_factory=list)
    unigram: float = float("nan")
    bigram: float = float("nan")


def _windows(ids, seq_len):
    """Consecutive non-overlapping windows: (n, S) inputs and (n, S) next-token targets."""
    n = (len(ids) - 1) // seq_len
    if n < 1:
        raise ValueError(f"ids has {len(ids)} tokens; a window of seq_len={seq_len} needs {seq_len + 1}")
    x = ids[:n * seq_len].reshape(n, seq_len)
    return x, ids[1:n * seq_len + 1].reshape(n, seq_len)


def evaluate_lm(model, ids, seq_len=None, batch_size=64):
    """Mean next-token cross-entropy (nats) over consecutive windows of ``ids``, in eval mode.

    Args:
        model: an :class:`MoELM`.  ids: (N,) token ids.
        seq_len: window length (default ``model.max_len``).  batch_size: windows per forward.
    """
    ids = check_ids("ids", np.asarray(ids), model.vocab_size)
    S = model.max_len if seq_len is None else check_int("seq_len", seq_len, low=1, high=model.max_len)
    B = check_int("batch_size", batch_size, low=1)
    x, y = _windows(ids, S)
    total = 0.0
    for s in range(0, len(x), B):
        total += model.forward_loss(x[s:s + B], y[s:s + B], train=False) * y[s:s + B].size
    return total / y.size


def _load_cv(load):
    load = np.asarray(load, dtype=np.float64)
    return float(load.std() / load.mean()) if load.size and load.mean() > 0 else float("nan")


def train_lm(model, train_ids, val_ids=None, *, steps=300, batch_size=16, seq_len=None, lr=3e-3, clip=1.0,
             seed=0, eval_every=None, progress=None, desc=None):
    """Train ``model`` on random windows of ``train_ids`` with Adam; return an :class:`LMHistory`.

    Each step: ``loss = forward_loss`` (train mode), ``backward()`` (grads of loss + aux_loss),
    ``optimizer.step()`` (global-norm clipping, then Adam), ``model.after_step()`` (loss-free
    bias nudges). Batches come from :func:`minimoe.corpus.batches` with a generator seeded by
    ``seed``; with a model built from a seeded rng, the same seeds give the same history.

    Args:
        model: an :class:`MoELM`.  train_ids, val_ids: (N,) token ids (val defaults to train).
        steps: optimizer steps.  batch_size: windows per step.  seq_len: default ``max_len``.
        lr, clip: Adam learning rate and gradient clipping norm (None: no clipping).
        eval_every: steps between evaluations (default: about 10 in all).
        progress: tqdm progress bar (None: only on a terminal).  desc: its label.
    """
    train_ids = check_ids("train_ids", np.asarray(train_ids), model.vocab_size)
    val_ids = train_ids if val_ids is None else check_ids("val_ids", np.asarray(val_ids), model.vocab_size)
    steps = check_int("steps", steps, low=1)
    S = model.max_len if seq_len is None else check_int("seq_len", seq_len, low=1, high=model.max_len)
    lr = check_positive_float("lr", lr)
    seed = check_int("seed", seed, low=0)
    eval_every = max(1, steps // 10) if eval_every is None else check_int("eval_every", eval_every, low=1)
    opt = make_optimizer("adam", model, lr=lr, clip=clip)
    hist = LMHistory(unigram=corpus.unigram_cross_entropy(train_ids, val_ids, model.vocab_size),
                     bigram=corpus.bigram_cross_entropy(train_ids, val_ids, model.vocab_size))
    data = corpus.batches(train_ids, batch_size, S, np.random.default_rng(seed), n_batches=steps)
    bar = None
    if sys.stderr.isatty() if progress is None else progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, desc=desc, leave=False, dynamic_ncols=True)
    losses, auxes, loads = [], [], [0] * len(model.blocks)      # since the last evaluation
    for step, (x, y) in enumerate(data, start=1):
        loss = model.forward_loss(x, y, train=True)
        if not np.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss} at step {step}; lower the learning rate")
        model.backward()
        opt.step()
        model.after_step()
        losses.append(loss)
        auxes.append(model.aux_loss)
        loads = [a + np.asarray(b.stats.get("load", 0)) for a, b in zip(loads, model.blocks)]
        if step % eval_every == 0 or step == steps:
            hist.step.append(step)
            hist.train_loss.append(float(np.mean(losses)))
            hist.aux_loss.append(float(np.mean(auxes)))
            hist.val_loss.append(evaluate_lm(model, val_ids, S))
            hist.load_cv.append(np.array([_load_cv(a) for a in loads]))
            losses, auxes, loads = [], [], [0] * len(model.blocks)
            if bar is not None:
                bar.set_postfix(loss=f"{hist.train_loss[-1]:.3f}", val=f"{hist.val_loss[-1]:.3f}")
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return hist


# --------------------------------------------------------------------------- quick mode
# A configuration that trains in a few seconds on 2 cores and beats the unigram baseline
# (≈ 3.9 nats) by a wide margin; the bigram baseline is ≈ 1.5 nats.
QUICK = dict(n_sentences=3000, d_model=32, n_heads=2, n_layers=2, max_len=24, d_hidden=32, n_experts=4, k=2,
             steps=150, batch_size=16, lr=5e-3)


class QuickLM(NamedTuple):
    model: MoELM
    history: LMHistory
    train_ids: np.ndarray
    val_ids: np.ndarray
    val_topics: np.ndarray     # the note topic of every validation token (for expert_usage)


def quick_lm(ffn="moe", seed=0, progress=None, **overrides):
    """Generate a clinic-notes corpus, build a small :class:`MoELM`, train it (see :data:`QUICK`).

    Args:
        ffn: the FFN kind of every block (see :func:`~minimoe.transformer.make_ffn`).
        seed: seeds the corpus, the weights, the routers' noise and the batches.
        progress: tqdm bar (None: only on a terminal).
        **overrides: change any entry of :data:`QUICK`; unknown keys go to the FFN
            (e.g. ``gate="switch"``, ``bias_update_rate=0.01``, ``n_shared=1``).

    Returns:
        a :class:`QuickLM` (model, history, train_ids, val_ids, val_topics); 90% / 10% split.
    """
    cfg = {**QUICK, **overrides}
    seed = check_int("seed", seed, low=0)
    ids, topics = corpus.generate_corpus(cfg.pop("n_sentences"), np.random.default_rng(seed), return_topics=True)
    cut = int(0.9 * len(ids))
    train_kw = {k: cfg.pop(k) for k in ("steps", "batch_size", "lr")}
    model = MoELM(len(corpus.VOCAB), ffn=ffn, rng=np.random.default_rng(seed + 1), **cfg)
    hist = train_lm(model, ids[:cut], ids[cut:], seed=seed, progress=progress, desc=f"LM ({ffn})", **train_kw)
    return QuickLM(model, hist, ids[:cut], ids[cut:], topics[cut:])


def sample(model, prompt, n, rng, temperature=1.0):
    """Continue ``prompt`` by ``n`` tokens, one at a time (each sees the last max_len tokens).

    Args:
        model: an :class:`MoELM`.  prompt: a str of vocabulary words, or (P,) int ids (P ≥ 1).
        n: tokens to generate (≥ 0).  rng: numpy.random.Generator.
        temperature: > 0 divides the logits before the softmax (lower: more predictable);
            0 always takes the most likely word.

    Returns:
        (P + n,) int64 ids: the prompt followed by the continuation (``corpus.decode`` reads it).
    """
    ids = corpus.encode(prompt) if isinstance(prompt, str) else np.asarray(prompt)
    check_ids("prompt", ids, model.vocab_size)
    if ids.ndim != 1 or ids.size == 0:
        raise ValueError(f"prompt must be a non-empty 1-D sequence of token ids, got shape {ids.shape}")
    n = check_int("n", n, low=0)
    check_rng("rng", rng)
    temperature = check_positive_float("temperature", temperature, allow_zero=True)
    out = list(ids.astype(np.int64))
    for _ in range(n):      # generation is sequential by nature: one new token per forward
        logits = model.forward(np.array([out[-model.max_len:]]), train=False)[0, -1]
        if temperature == 0:
            out.append(int(np.argmax(logits)))
        else:
            out.append(int(rng.choice(model.vocab_size, p=softmax(logits / temperature))))
    return np.array(out, dtype=np.int64)


# --------------------------------------------------------------------------- what the experts serve
class ExpertUsage(NamedTuple):
    """Which tokens one block's experts served, counted over (token, expert) assignments.

    counts_class (E, n_classes), counts_topic (E, n_topics) or None, counts_token (E, V);
    mi_class, mi_topic, mi_token: mutual information (nats) between the expert of an
    assignment and its token's class / note topic / word; h_class, h_topic: the entropies of
    those labels over the same assignments (the largest MI could be: ``mi / h`` is the
    fraction of the label's uncertainty the expert removes); n_assignments.
    """
    layer: int
    counts_class: np.ndarray
    counts_topic: np.ndarray | None
    counts_token: np.ndarray
    mi_class: float
    mi_topic: float
    mi_token: float
    h_class: float
    h_topic: float
    n_assignments: int


def expert_usage(model, ids, topics=None, layer=0, seq_len=None, batch_size=64):
    """Run ``model`` in eval mode over consecutive windows of ``ids`` and count, for block
    ``layer``, every kept (token, expert) assignment by the token's class, topic and word.

    Args:
        model: an :class:`MoELM` whose block ``layer`` routes (not "dense").
        ids: (N,) token ids (corpus vocabulary).  topics: (N,) note topics, or None.
        layer: which block.  seq_len: window length (default max_len).  batch_size: windows per forward.

    Returns:
        an :class:`ExpertUsage`. (Shared experts serve every token and are left out: they carry
        no information about it.)
    """
    ids = check_ids("ids", np.asarray(ids), model.vocab_size)
    layer = check_int("layer", layer, low=0, high=len(model.blocks) - 1)
    if model.vocab_size != len(corpus.VOCAB):
        raise ValueError(f"expert_usage needs a model of the corpus vocabulary ({len(corpus.VOCAB)} words), "
                         f"got vocab_size={model.vocab_size}")
    n_topics = len(corpus.TOPIC_NAMES)
    if topics is not None:
        topics = np.asarray(topics)
        if topics.shape != ids.shape:
            raise ValueError(f"topics must have the shape of ids {ids.shape} (one per token), got {topics.shape}")
        check_ids("topics", topics, n_topics)
    S = model.max_len if seq_len is None else check_int("seq_len", seq_len, low=1, high=model.max_len)
    x, _ = _windows(ids, S)
    B = check_int("batch_size", batch_size, low=1)
    experts, positions = [], []
    for s in range(0, len(x), B):
        model.forward(x[s:s + B], train=False)
        st = model.blocks[layer].stats
        if "topk_idx" not in st:
            raise ValueError(f"block {layer} has a dense FFN: there is no routing to analyse")
        idx, kept = np.asarray(st["topk_idx"]), np.asarray(st["kept"], dtype=bool)
        pos = np.broadcast_to((s * S + np.arange(idx.shape[0]))[:, None], idx.shape)
        experts.append(idx[kept])
        positions.append(pos[kept])
    expert = np.concatenate(experts)
    where = np.concatenate(positions)                # index into ids of each assignment's token
    word = ids[where]
    cls = corpus.TOKEN_CLASS[word]
    E = model.blocks[layer].ffn.n_experts
    V, K = model.vocab_size, len(corpus.CLASS_NAMES)

    def table(labels, n):
        return np.bincount(expert * n + labels, minlength=E * n).reshape(E, n)

    counts_topic, mi_topic, h_topic = None, float("nan"), float("nan")
    if topics is not None:
        top = topics[where].astype(np.int64)
        counts_topic = table(top, n_topics)
        mi_topic, h_topic = corpus.mutual_information(expert, top), corpus.entropy(top)
    return ExpertUsage(layer, table(cls, K), counts_topic, table(word, V),
                       corpus.mutual_information(expert, cls), mi_topic, corpus.mutual_information(expert, word),
                       corpus.entropy(cls), h_topic, int(expert.size))
