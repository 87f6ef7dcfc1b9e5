"""Training, sampling and reading the tiny MoE language model of :mod:`minimoe.lm.model`.

- :func:`train_lm` — Adam on random windows of the clinic notes, evaluated every few steps
  (an :class:`LMHistory`); :func:`evaluate_lm` — validation cross-entropy in eval mode.
- :func:`quick_lm` — generate a corpus, build and train a small model in seconds (:data:`QUICK`),
  the lessons' and tests' quick mode.
- :func:`sample` — continue a prompt one token at a time.
- :func:`expert_usage` — which tokens one block's experts served. corpus.py's synthetic clinic
  notes give every word a known *class* (syntax) and every note a known *topic* (specialty),
  so we can measure which one the experts follow: the mutual information
  ``I(expert; class)`` versus ``I(expert; topic)``. (Studies of real MoE language models —
  ST-MoE, Zoph et al. 2022 — find experts specialising in token types, not topics; here we
  can test that on data where both answers are known, and a hash-routed model gives the baseline.)

Shapes: B sequences, S tokens each (S ≤ max_len), V vocabulary, E experts.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from . import corpus
from .embedding import check_ids
from ..core.layers import softmax
from .model import MoELM
from ..clinic.optim import make_optimizer
from ..clinic.train import check_training_loss, raise_if_diverged
from ..validate import check_int, check_positive_float, check_rng

__all__ = ["LMHistory", "evaluate_lm", "train_lm", "QUICK", "QuickLM", "quick_lm", "sample", "ExpertUsage",
           "expert_usage"]


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
    bias nudges). Batches come from :func:`minimoe.lm.corpus.batches` with a generator seeded by
    ``seed``; with a model built from a seeded rng, the same seeds give the same history.

    Args:
        model: an :class:`MoELM`.  train_ids, val_ids: (N,) token ids (val defaults to train).
        steps: optimizer steps.  batch_size: windows per step.  seq_len: default ``max_len``.
        lr, clip: Adam learning rate and gradient clipping norm (None: no clipping).
        eval_every: steps between evaluations (default: about 10 in all).
        progress: tqdm progress bar (None: only on a terminal).  desc: its label.

    A run whose loss turns NaN/inf or grows far beyond its start (see
    :func:`minimoe.clinic.train.check_training_loss`) stops with a ``FloatingPointError`` naming ``lr``.
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
    step, start = 0, None                                      # start: the first step's loss
    try:
        for step, (x, y) in enumerate(data, start=1):
            loss = model.forward_loss(x, y, train=True)
            check_training_loss(loss + model.aux_loss, start, step, lr)     # stop a run that diverges
            start = loss + model.aux_loss if start is None else start
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
    except ValueError as err:
        raise_if_diverged(err, step, lr)
        raise
    finally:
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
        ffn: the FFN kind of every block (see :func:`~minimoe.lm.transformer.make_ffn`).
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
    rng = check_rng("rng", rng)  # an int seed becomes a Generator (SPEC 7: validate.check_rng)
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
