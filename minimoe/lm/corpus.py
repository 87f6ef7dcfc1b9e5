"""A synthetic corpus of clinic notes, generated from a small grammar — no download, ever.

    patient reports sharp pain in left knee for 3 days . woman denies rash and itching .
    referred to dermatology for eczema .

Why a grammar and not real text? Because we want to *measure* what the experts of
a trained MoE language model specialise in. A popular story says each expert
becomes a "topic" specialist (one for cardiology, one for skin...). Studies of
trained MoE language models (ST-MoE, Zoph et al. 2022, §7; the visual guide in
``seeds/``) find something else: experts specialise in *token types and syntax*
— punctuation, numbers, verbs, particular words in particular contexts — more
than in topics. To test that claim we need text where both answers are known:

* every **word has one class** (:data:`CLASS_NAMES`: function words, verbs,
  persons, symptoms, qualities, sides, body parts, numbers, durations,
  specialties, diagnoses, punctuation) — the *syntax* label, ``TOKEN_CLASS[id]``;
* every **note has one topic**, a specialty (:data:`TOPIC_NAMES`) that decides
  which symptoms, body parts and diagnoses it mentions — the *topic* label.
  Some words (``pain``, ``arm``, ``hand``...) occur in several specialties, as
  in real notes, so a word does not give its topic away for free.

After training, :func:`mutual_information` between the expert each token was
sent to and its class, versus between the expert and its note's topic, says
which story the experts follow (lesson 08). The grammar also leaves something
for a model to learn beyond word frequencies: the last sentence of every note
refers the patient to the note's specialty, which only context can predict —
so a transformer must beat the unigram *and* the bigram baselines below.

All information quantities are in **nats** (natural log); divide by ln 2 for bits.
"""
from __future__ import annotations

import numpy as np

from .embedding import check_ids
from ..validate import check_int, check_positive_float, check_rng

__all__ = [
    "CLASS_NAMES", "TOPIC_NAMES", "VOCAB", "TOKEN_CLASS", "WORD_TO_ID",
    "generate_corpus", "encode", "decode", "token_classes", "batches",
    "entropy", "unigram_entropy", "unigram_cross_entropy", "bigram_cross_entropy",
    "mutual_information",
]

CLASS_NAMES = ("function", "verb", "person", "symptom", "quality", "side", "body_part",
               "number", "duration", "specialty", "diagnosis", "punctuation")
TOPIC_NAMES = ("orthopedics", "dermatology", "cardiology", "neurology")

# Word pools that depend on the note's topic: one tuple per topic, in TOPIC_NAMES order.
_TOPIC_POOLS = {
    "symptom": (("pain", "swelling", "stiffness"), ("rash", "itching", "redness", "blisters"),
                ("pain", "palpitations", "breathlessness"), ("headache", "numbness", "tingling", "dizziness")),
    "body_part": (("knee", "ankle", "shoulder", "hip", "wrist"), ("hand", "arm", "cheek", "leg"),
                  ("chest", "arm", "shoulder", "jaw"), ("hand", "foot", "arm", "leg")),
    "diagnosis": (("sprain", "fracture", "tendinitis"), ("eczema", "psoriasis", "dermatitis"),
                  ("angina", "arrhythmia"), ("migraine", "neuropathy", "vertigo")),
    "specialty": tuple((t,) for t in TOPIC_NAMES),
}
# Word pools shared by every topic.
_SHARED_POOLS = {
    "person": ("patient", "child", "woman", "man", "athlete"),
    "quality": ("sharp", "dull", "mild", "severe", "constant", "intermittent"),
    "side": ("left", "right"),
    "number": tuple(str(n) for n in range(2, 10)),   # from 2, so "days" is always plural
    "duration": ("hours", "days", "weeks", "months"),
}
# Words that only occur literally in the templates.
_FIXED = {
    "function": ("in", "for", "and", "ago", "now", "of", "the", "to"),
    "verb": ("reports", "denies", "began", "has", "referred"),
    "punctuation": (".", ","),
}
# The grammar: "{class}" is a slot filled from that class's pool, anything else is literal.
_TEMPLATES = (
    "{person} reports {quality} {symptom} in {side} {body_part} for {number} {duration} .",
    "{person} denies {symptom} and {symptom} .",
    "{symptom} began {number} {duration} ago , now {quality} .",
    "{person} has {symptom} of the {side} {body_part} .",
    "referred to {specialty} for {diagnosis} .",          # always the last sentence of a note
)
_REFERRAL = len(_TEMPLATES) - 1


def _build_vocab():
    words, classes = [], []
    for c, name in enumerate(CLASS_NAMES):
        pool = _FIXED.get(name, ()) + _SHARED_POOLS.get(name, ()) + sum(_TOPIC_POOLS.get(name, ()), ())
        for w in dict.fromkeys(pool):           # dedupe, keep order
            if w in words:
                raise AssertionError(f"word {w!r} is in two classes")
            words.append(w)
            classes.append(c)
    return words, np.array(classes, dtype=np.int64)


VOCAB, TOKEN_CLASS = _build_vocab()     # list of str (V,), and (V,) class id of each word
WORD_TO_ID = {w: i for i, w in enumerate(VOCAB)}


# Each template as a list of slots: an int (a literal word's id) or a class name.
_COMPILED = [[w[1:-1] if w.startswith("{") else WORD_TO_ID[w] for w in t.split()] for t in _TEMPLATES]
_LENGTHS = np.array([len(s) for s in _COMPILED])
_SHARED_IDS = {k: np.array([WORD_TO_ID[w] for w in v]) for k, v in _SHARED_POOLS.items()}


def _topic_table(pools):
    """Topic pools as a padded (n_topics, max_pool) id table plus each row's true size."""
    table = np.zeros((len(pools), max(map(len, pools))), dtype=np.int64)
    for t, pool in enumerate(pools):
        table[t, :len(pool)] = [WORD_TO_ID[w] for w in pool]
    return table, np.array([len(p) for p in pools])


_TOPIC_IDS = {name: _topic_table(pools) for name, pools in _TOPIC_POOLS.items()}


def _fill(slot, topics, rng):
    """Word ids for one slot of ``len(topics)`` sentences at once."""
    if not isinstance(slot, str):
        return slot
    if slot in _SHARED_IDS:
        pool = _SHARED_IDS[slot]
        return pool[rng.integers(0, len(pool), size=len(topics))]
    table, sizes = _TOPIC_IDS[slot]
    return table[topics, rng.integers(0, sizes[topics])]


def generate_corpus(n_sentences, rng, *, sentences_per_note=4, return_topics=False):
    """Generate clinic notes: ``sentences_per_note`` sentences per note, one topic per note.

    Each note draws a topic uniformly; its sentences are drawn uniformly from the
    four clinical templates, and its last sentence is the referral ("referred to
    {specialty} for {diagnosis} ."). Slots are filled uniformly from their pool
    (the topic's pool for symptoms, body parts, diagnoses and the specialty). The
    last note is cut short if ``n_sentences`` is not a multiple of
    ``sentences_per_note``. About 7.5 tokens per sentence.

    Vectorised: the loops run over templates and slot positions (a handful), never
    over sentences or tokens.

    Args:
        n_sentences: number of sentences, >= 1.
        rng: ``numpy.random.Generator``; the same seed gives the same corpus.
        sentences_per_note: >= 2 (room for at least one finding and the referral).
        return_topics: also return each token's note topic.

    Returns:
        ids: (N,) int64 token ids; with ``return_topics``, ``(ids, topics)`` where
        ``topics`` (N,) int64 indexes :data:`TOPIC_NAMES`.
    """
    n = check_int("n_sentences", n_sentences, low=1)
    per = check_int("sentences_per_note", sentences_per_note, low=2)
    rng = check_rng("rng", rng)  # an int seed becomes a Generator (SPEC 7: validate.check_rng)
    sentence = np.arange(n)
    note_topic = rng.integers(0, len(TOPIC_NAMES), size=(n - 1) // per + 1)
    topic = note_topic[sentence // per]
    template = rng.integers(0, _REFERRAL, size=n)
    template[sentence % per == per - 1] = _REFERRAL
    lengths = _LENGTHS[template]
    starts = np.cumsum(lengths) - lengths
    ids = np.empty(int(lengths.sum()), dtype=np.int64)
    for t, slots in enumerate(_COMPILED):
        rows = np.flatnonzero(template == t)
        for j, slot in enumerate(slots):
            ids[starts[rows] + j] = _fill(slot, topic[rows], rng)
    if return_topics:
        return ids, np.repeat(topic, lengths)
    return ids


def encode(text):
    """Whitespace-separated words -> (N,) int64 ids. Unknown words raise ValueError."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    words = text.split()
    unknown = [w for w in words if w not in WORD_TO_ID]
    if unknown:
        raise ValueError(f"text contains words outside the {len(VOCAB)}-word vocabulary: {unknown[:5]}")
    return np.array([WORD_TO_ID[w] for w in words], dtype=np.int64)


def decode(ids):
    """(N,) ids -> the words joined by single spaces (so ``decode(encode(s)) == s``
    for any s written with single spaces)."""
    ids = np.asarray(ids)
    if ids.size == 0:
        ids = ids.astype(np.int64)        # np.asarray([]) is float; an empty text is fine
    check_ids("ids", ids, len(VOCAB))
    if ids.ndim != 1:
        raise ValueError(f"ids must be 1-dimensional (one text), got shape {ids.shape}")
    return " ".join(VOCAB[i] for i in ids.tolist())


def token_classes(ids):
    """Class id (index into :data:`CLASS_NAMES`) of every token: ``TOKEN_CLASS[ids]``."""
    return TOKEN_CLASS[check_ids("ids", np.asarray(ids), len(VOCAB))]


def batches(ids, batch_size, seq_len, rng, n_batches=None):
    """Random training windows for next-token prediction.

    Each batch has ``batch_size`` windows starting at uniformly random positions;
    ``targets`` are ``inputs`` shifted by one token (the next word to predict).

    Args:
        ids: (N,) int token ids, ``N >= seq_len + 1``.
        batch_size: B >= 1. seq_len: S >= 1.
        rng: ``numpy.random.Generator`` (window positions).
        n_batches: how many batches to yield; ``None`` = forever.

    Returns:
        An iterator of ``(inputs, targets)``, each (B, S) int64.
    """
    ids = check_ids("ids", ids, np.iinfo(np.int64).max)
    if ids.ndim != 1:
        raise ValueError(f"ids must be 1-dimensional, got shape {ids.shape}")
    B = check_int("batch_size", batch_size, low=1)
    S = check_int("seq_len", seq_len, low=1)
    rng = check_rng("rng", rng)  # an int seed becomes a Generator (SPEC 7: validate.check_rng)
    if n_batches is not None:
        check_int("n_batches", n_batches, low=0)
    if len(ids) < S + 1:
        raise ValueError(f"ids has {len(ids)} tokens; seq_len = {S} needs at least {S + 1} "
                         f"(inputs plus the shifted targets)")

    def generate():                   # validated above, eagerly; the loop is lazy
        count = 0
        while n_batches is None or count < n_batches:
            pos = rng.integers(0, len(ids) - S, size=B)[:, None] + np.arange(S)
            yield ids[pos], ids[pos + 1]
            count += 1
    return generate()


# --------------------------------------------------------------------------- information
def _labels(name, a):
    a = np.asarray(a)
    if a.dtype.kind not in "biuUSO":
        raise TypeError(f"{name} must hold discrete labels (integers, bools or strings), got dtype {a.dtype}")
    if a.size == 0:
        raise ValueError(f"{name} is empty; need at least one label")
    return np.unique(a.ravel(), return_inverse=True)[1].ravel()


def entropy(labels):
    """Plug-in entropy ``H = −Σ p log p`` (nats) of the empirical label distribution."""
    counts = np.bincount(_labels("labels", labels))
    p = counts[counts > 0] / counts.sum()
    return float(max(-np.sum(p * np.log(p)), 0.0))


def unigram_entropy(ids):
    """Entropy (nats) of the token frequencies in ``ids``: the cross-entropy of the best
    model that ignores context, measured on the text it was fitted to."""
    return entropy(ids)


def unigram_cross_entropy(train_ids, eval_ids, vocab_size=len(VOCAB), alpha=1.0):
    """Mean −log p(token) on ``eval_ids`` (nats) under add-``alpha`` unigram counts of ``train_ids``.

    The first baseline a language model must beat; a model at this value has
    learned word frequencies and nothing else.
    """
    V = check_int("vocab_size", vocab_size, low=1)
    alpha = check_positive_float("alpha", alpha)
    counts = np.bincount(check_ids("train_ids", np.asarray(train_ids), V).ravel(), minlength=V) + alpha
    p = counts / counts.sum()
    ev = check_ids("eval_ids", np.asarray(eval_ids), V)
    return float(-np.mean(np.log(p[ev])))


def bigram_cross_entropy(train_ids, eval_ids, vocab_size=len(VOCAB), alpha=0.1):
    """Mean −log p(next | previous) on ``eval_ids`` (nats), add-``alpha`` bigram counts.

    The second baseline: a model that only looks one token back. Beating it means
    the model uses longer context (e.g. the note's topic for the referral).
    """
    V = check_int("vocab_size", vocab_size, low=1)
    alpha = check_positive_float("alpha", alpha)
    tr = check_ids("train_ids", np.asarray(train_ids), V).ravel()
    ev = check_ids("eval_ids", np.asarray(eval_ids), V).ravel()
    if len(ev) < 2:
        raise ValueError("eval_ids needs at least 2 tokens to contain a bigram")
    counts = np.bincount(tr[:-1] * V + tr[1:], minlength=V * V).reshape(V, V) + alpha
    logp = np.log(counts) - np.log(counts.sum(axis=1, keepdims=True))
    return float(-np.mean(logp[ev[:-1], ev[1:]]))


def mutual_information(a, b):
    """Plug-in mutual information ``I(A;B)`` in **nats** between two label arrays.

        I(A;B) = Σ_{a,b} p(a,b) log( p(a,b) / (p(a) p(b)) ) = H(A) + H(B) − H(A,B)

    0 when the labels are independent, ``H(A)`` when B determines A. Typical use:
    ``a`` = the expert each token was routed to, ``b`` = the token's class (or its
    note's topic); ``I / H(b)`` is the fraction of the class uncertainty that
    knowing the expert removes. (The plug-in estimate is biased upwards on small
    samples; compare quantities computed on the same tokens.)

    Args:
        a, b: label arrays of the same shape (integers, bools or strings).

    Returns:
        I(A;B) >= 0, a float in nats.
    """
    a_ = _labels("a", a)
    b_ = _labels("b", b)
    if np.shape(a) != np.shape(b):
        raise ValueError(f"a and b must have the same shape (one label pair per item), "
                         f"got {np.shape(a)} and {np.shape(b)}")
    na, nb = a_.max() + 1, b_.max() + 1
    joint = np.bincount(a_ * nb + b_, minlength=na * nb).reshape(na, nb) / a_.size
    pa, pb = joint.sum(axis=1, keepdims=True), joint.sum(axis=0, keepdims=True)
    nz = joint > 0
    mi = np.sum(joint[nz] * (np.log(joint[nz]) - np.log((pa * pb)[nz])))
    return float(max(mi, 0.0))     # rounding can leave −1e-17 for independent labels
