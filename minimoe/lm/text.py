"""Real text that ships with every Python: its documentation and its standard library.

The clinic notes of :mod:`~minimoe.lm.corpus` were written to make a point; this file
reads text nobody here wrote, at run time, from the Python that runs it — nothing is
downloaded and nothing is copied into the repository:

* **prose** — the Python documentation's topic pages that ``help()`` shows
  (``pydoc_data.topics.topics``: about 79 pages and 465,000 characters of English in 3.11);
* **code** — the standard library's own source, the ``.py`` files at the top level of
  ``sysconfig.get_paths()["stdlib"]`` (about 168 modules, 4.7 million characters).

Each page or module is one **document**. Documents are read in sorted order, so a given
Python version gives the same text on every machine; the version is recorded with every
result (:func:`python_version`). A new Python may change the text, and so the numbers.

Tokens are **characters**: the 95 printable ASCII characters, the newline, and one
:data:`OTHER` token for everything else (tabs, form feeds, non-ASCII letters: under 0.1% of
the characters; curly quotes and dashes are read as their ASCII forms first). So V = 97, a loss in nats per token is a loss per character, and
``bits per character = nats / ln 2``.

Every character carries two labels the experiments need:

* its **domain** (:data:`DOMAINS`: 0 prose, 1 code) — Mixtral's question is whether the
  router follows it;
* its **type** (:data:`TYPE_NAMES`): lower-case letter, capital, digit, underscore, space
  inside a line, *indentation* (spaces from the start of a line up to its first other
  character), newline, bracket, quote, punctuation, operator, other — the token types that
  Mixtral (§5) and ST-MoE found experts to follow.

Documents go to train / validation / test **whole**, by a hash of their name
(:func:`split_of`), so no document is in two splits and the split of a document does not
change when others are added.

Shapes: N characters; ids, domains and types are (N,) arrays.
"""
from __future__ import annotations

import os
import platform
import re
import sysconfig
import zlib
from typing import NamedTuple

import numpy as np

from .embedding import check_ids
from ..validate import check_choice, check_int, check_rng

__all__ = ["VOCAB", "OTHER", "DOMAINS", "TYPE_NAMES", "SPLITS", "python_version", "read_documents",
           "encode", "decode", "char_types", "split_of", "TextSplit", "RealText", "load_text", "batches",
           "eval_windows", "snippets"]

# --------------------------------------------------------------------------- the vocabulary
OTHER = 96                                            # the id of every character outside the table
VOCAB = "\n" + "".join(map(chr, range(32, 127))) + "\u00bf"   # id -> character ("¿" shows OTHER)
DOMAINS = ("prose", "code")
SPLITS = ("train", "val", "test")

# Typographic characters of the documentation, read as their ASCII equivalents before encoding
# (curly quotes, dashes, a non-breaking space), so "don’t" is d-o-n-'-t and not d-o-n-OTHER-t.
_ASCII = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2013": "-",
                        "\u2014": "-", "\u2212": "-", "\u00a0": " ", "\u2026": "..."})

# A lookup table from code point (< 128) to id; everything else is OTHER.
_TABLE = np.full(128, OTHER, dtype=np.int64)
_TABLE[10] = 0
_TABLE[32:127] = np.arange(1, 96)


def python_version():
    """The Python that produced the text, e.g. ``"3.11.7"`` (recorded with every result)."""
    return platform.python_version()


def read_documents(domain):
    """Every document of ``domain`` ("prose" or "code") as a sorted list of ``(name, text)``.

    prose: the topic pages of ``pydoc_data.topics`` (name = the topic, e.g. ``"assignment"``);
    code: the top-level ``.py`` files of the standard library (name = the file name), read as
    UTF-8 (undecodable bytes replaced). Sorted by name, so the order never depends on the file system.
    """
    check_choice("domain", domain, DOMAINS)
    if domain == "prose":
        from pydoc_data.topics import topics
        return sorted(topics.items())
    folder = sysconfig.get_paths()["stdlib"]
    names = sorted(n for n in os.listdir(folder) if n.endswith(".py") and os.path.isfile(os.path.join(folder, n)))
    docs = []
    for n in names:                                   # a loop over files, not characters
        with open(os.path.join(folder, n), encoding="utf-8", errors="replace") as f:
            docs.append((n, f.read()))
    return docs


def encode(text):
    """A str -> (N,) int64 ids: printable ASCII and the newline keep their own id, anything else is OTHER.

    Curly quotes, en and em dashes, the minus sign, the non-breaking space and the ellipsis are
    first read as their ASCII equivalents (``_ASCII``: the ellipsis becomes three characters).
    Vectorised: the code points come out of one UTF-32 encoding and go through a table.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    codes = np.frombuffer(text.translate(_ASCII).encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
    return np.where(codes < 128, _TABLE[np.minimum(codes, 127)], OTHER)


def decode(ids):
    """(N,) ids -> the str they spell (OTHER shows as "¿"); ``decode(encode(s)) == s`` for ASCII s without tabs."""
    ids = np.asarray(ids)
    if ids.size == 0:
        ids = ids.astype(np.int64)
    check_ids("ids", ids, len(VOCAB))
    if ids.ndim != 1:
        raise ValueError(f"ids must be 1-dimensional (one text), got shape {ids.shape}")
    return "".join(np.array(list(VOCAB))[ids].tolist())


# --------------------------------------------------------------------------- token types
TYPE_NAMES = ("lower", "capital", "digit", "underscore", "space", "indent", "newline", "bracket", "quote",
              "punctuation", "operator", "other")
_TYPE_OF_CHAR = np.full(len(VOCAB), TYPE_NAMES.index("other"), dtype=np.int64)


def _set_types(chars, name):
    _TYPE_OF_CHAR[encode(chars)] = TYPE_NAMES.index(name)


_set_types("abcdefghijklmnopqrstuvwxyz", "lower")
_set_types("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "capital")
_set_types("0123456789", "digit")
_set_types("_", "underscore")
_set_types(" ", "space")
_set_types("\n", "newline")
_set_types("()[]{}", "bracket")
_set_types("'\"`", "quote")
_set_types(".,:;!?#\\$", "punctuation")
_set_types("+-*/%=<>&|^~@", "operator")


def char_types(ids):
    """The type (index into :data:`TYPE_NAMES`) of every character of one text, (N,) -> (N,).

    A space is *indentation* when only spaces stand between it and the previous newline (or
    the start of the text). Vectorised: the position of the last character that is not a space
    is carried forward with ``np.maximum.accumulate``; a space is indentation when that
    character is a newline (or there is none).
    """
    ids = check_ids("ids", np.asarray(ids), len(VOCAB))
    if ids.ndim != 1:
        raise ValueError(f"ids must be 1-dimensional (one text), got shape {ids.shape}")
    types = _TYPE_OF_CHAR[ids]
    pos = np.arange(ids.size)
    space = encode(" ")[0]
    last_solid = np.maximum.accumulate(np.where(ids != space, pos, -1)) if ids.size else pos
    before = np.where(last_solid >= 0, ids[np.maximum(last_solid, 0)], 0)    # 0: "\n" (start of text)
    indent = (ids == space) & (before == 0)
    return np.where(indent, TYPE_NAMES.index("indent"), types)


# --------------------------------------------------------------------------- splits
def split_of(name, fractions=(0.8, 0.1, 0.1)):
    """The split (index into :data:`SPLITS`) of the document called ``name``.

    ``zlib.crc32`` of the name, a hash that is the same in every Python and on every
    machine (unlike ``hash()``), mapped to [0, 1) and cut at the cumulative ``fractions``.
    A document's split depends on its name alone.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    f = np.asarray(fractions, dtype=np.float64)
    if f.shape != (3,) or np.any(f < 0) or not np.isclose(f.sum(), 1.0):
        raise ValueError(f"fractions must be three non-negative numbers summing to 1 (train, val, test), "
                         f"got {fractions}")
    u = zlib.crc32(name.encode("utf-8")) / 2**32
    return int(np.searchsorted(np.cumsum(f)[:2], u, side="right"))


class TextSplit(NamedTuple):
    """One split of one domain: ``ids`` (N,) int64, ``types`` (N,) int64, the document names,
    and ``starts`` (n_docs,), where each document begins in ``ids`` (documents are joined by
    a blank line, "\\n\\n")."""
    ids: np.ndarray
    types: np.ndarray
    names: tuple
    starts: np.ndarray


class RealText(NamedTuple):
    """The corpus: ``parts[domain][split]`` is a :class:`TextSplit`; ``python`` the version that
    produced it; ``fractions`` the split fractions."""
    parts: dict
    python: str
    fractions: tuple

    def split(self, split, domain):
        """The :class:`TextSplit` of ``split`` ("train", "val", "test") and ``domain`` ("prose", "code")."""
        return self.parts[check_choice("domain", domain, DOMAINS)][check_choice("split", split, SPLITS)]

    def sizes(self):
        """``{domain: {split: characters}}``."""
        return {d: {s: int(p.ids.size) for s, p in parts.items()} for d, parts in self.parts.items()}


def load_text(fractions=(0.8, 0.1, 0.1)):
    """Read, encode, type and split both domains (about a second); returns a :class:`RealText`.

    A document's split is :func:`split_of` its name (in the code domain, its file name; a
    page and a module never share a name's meaning, and the two domains are split separately).
    Within a split the documents keep their sorted order, joined by a blank line.
    """
    split_of("check", fractions)                     # validates fractions once, before reading
    parts = {}
    for domain in DOMAINS:
        docs = read_documents(domain)
        by = {s: [] for s in range(3)}
        for name, text in docs:
            by[split_of(name, fractions)].append((name, text))
        parts[domain] = {}
        for s, chosen in by.items():
            texts = [t.translate(_ASCII) + "\n\n" for _, t in chosen]     # lengths as encoded
            lengths = np.array([len(t) for t in texts], dtype=np.int64)
            ids = encode("".join(texts))
            parts[domain][SPLITS[s]] = TextSplit(ids, char_types(ids), tuple(n for n, _ in chosen),
                                                 np.cumsum(lengths) - lengths)
    return RealText(parts, python_version(), tuple(float(f) for f in fractions))


# --------------------------------------------------------------------------- windows
def batches(streams, batch_size, seq_len, rng, n_batches=None):
    """Random training windows drawn evenly from several streams (one per domain).

    Each batch holds ``batch_size // len(streams)`` windows from every stream (so prose,
    ten times smaller than code, weighs as much), starting at uniformly random positions;
    the targets are the inputs shifted by one character.

    Args:
        streams: a list of (N_i,) id arrays, each with at least seq_len + 1 ids.
        batch_size: B, a multiple of len(streams).  seq_len: S.
        rng: anything ``np.random.default_rng`` takes.  n_batches: how many (None: forever).

    Returns:
        an iterator of ``(inputs, targets, domains)``: (B, S), (B, S) and (B,) — the stream of each row.
    """
    if not streams:
        raise ValueError("streams must hold at least one id array")
    n = len(streams)
    B = check_int("batch_size", batch_size, low=n)
    if B % n:
        raise ValueError(f"batch_size must be a multiple of the number of streams ({n}), got {B}")
    S = check_int("seq_len", seq_len, low=1)
    streams = [check_ids(f"streams[{i}]", np.asarray(s), len(VOCAB)) for i, s in enumerate(streams)]
    short = [i for i, s in enumerate(streams) if s.ndim != 1 or s.size < S + 1]
    if short:
        raise ValueError(f"streams {short} are not 1-D or have fewer than seq_len + 1 = {S + 1} ids")
    if n_batches is not None:
        check_int("n_batches", n_batches, low=0)
    rng = check_rng("rng", rng)
    per = B // n
    domains = np.repeat(np.arange(n), per)

    def generate():
        count = 0
        while n_batches is None or count < n_batches:
            x, y = [], []
            for s in streams:                         # a loop over the streams (domains)
                pos = rng.integers(0, s.size - S, size=per)[:, None] + np.arange(S)
                x.append(s[pos])
                y.append(s[pos + 1])
            yield np.concatenate(x), np.concatenate(y), domains
            count += 1
    return generate()


def eval_windows(ids, seq_len, n_windows):
    """``n_windows`` evenly spaced windows of ``ids`` (the same every time): (n, S) inputs,
    (n, S) targets and (n, S) positions into ``ids`` of the inputs (to look labels up)."""
    ids = check_ids("ids", np.asarray(ids), len(VOCAB))
    S = check_int("seq_len", seq_len, low=1)
    n = check_int("n_windows", n_windows, low=1)
    if ids.ndim != 1 or ids.size < S + 1:
        raise ValueError(f"ids must be 1-D with at least seq_len + 1 = {S + 1} ids, got shape {ids.shape}")
    starts = np.linspace(0, ids.size - S - 1, n).astype(np.int64)
    pos = starts[:, None] + np.arange(S)
    return ids[pos], ids[pos + 1], pos


_FUNCTION = re.compile(r"^def [^\n]*\n(?:(?:[ ]+[^\n]*)?\n)*", flags=re.M)


def _compiles(source):
    """True when ``source`` is valid Python (a function cut inside a multi-line string is not)."""
    try:
        compile(source, "<snippet>", "exec")
    except (SyntaxError, ValueError):
        return False
    return True


def snippets(corpus, max_chars=480):
    """A paragraph of documentation and a function of library code from the **test** split, for
    the coloured-text figure: ``{"prose": (name, text), "code": (name, text)}``.

    prose: the first paragraph (text between blank lines) of 200 to ``max_chars`` characters that
    starts with a letter, in the test pages' sorted order; code: the first whole top-level
    function (``def`` and its indented lines) of 150 to ``max_chars`` characters in the test
    modules. Deterministic for a given Python.
    """
    n = check_int("max_chars", max_chars, low=40)
    out = {}
    for domain in DOMAINS:
        part = corpus.split("test", domain)
        full = decode(part.ids)
        bounds = list(part.starts) + [part.ids.size]
        for i, name in enumerate(part.names):           # a loop over documents, until one fits
            doc = full[bounds[i]:bounds[i + 1]]
            if domain == "prose":
                found = [p.strip("\n") for p in doc.split("\n\n")]
                found = [p for p in found if 200 <= len(p) <= n and p[0].isalpha()]
            else:                                       # whole top-level functions that fit
                found = [m.group(0).rstrip("\n") for m in _FUNCTION.finditer(doc)]
                found = [f for f in found if 150 <= len(f) <= n and _compiles(f)]
            if found:
                out[domain] = (name, found[0])
                break
        else:
            raise ValueError(f"no {domain} snippet of 200 to {n} characters in the test split")
    return out
