"""Graders for lesson 12, *Real patients*: bits per character from batch losses, the mutual
information between experts and labels from real routing, Mixtral's same-expert-next share,
and the upcycling copy of a dense FFN.

The reference answers live here too (``*_ref``); they agree with minimoe's own
(``experiments.bits_per_char``, ``routing.expert_information``, ``routing.same_expert_fraction``,
``upcycle.upcycle_ffn``), which the tests check, and the lesson's later cells use minimoe's.
"""
from __future__ import annotations

import math

import numpy as np

from ...core.experts import Expert
from ...core.moe import MoELayer
from ...lm import corpus as _corpus
from ...lm import routing as _routing
from ...lm import upcycle as _upcycle
from .compare import expect_array, expect_number
from .grading import Fail, Lesson, call, no_token_loop
from .lesson09 import mutual_information_ref as _mi_counts_ref

LESSON = Lesson("12", "Real patients")
progress = LESSON.progress


# --------------------------------------------------------------------------- references
def bits_per_char_ref(losses, counts):
    """Bits per character of batches with mean losses ``losses`` (nats) over ``counts`` characters:
    ``Σ loss_i · n_i / Σ n_i / ln 2``."""
    losses, counts = np.asarray(losses, dtype=np.float64), np.asarray(counts, dtype=np.float64)
    return float(np.sum(losses * counts) / np.sum(counts) / math.log(2))


def expert_label_information_ref(experts, labels):
    """I(expert; label) in nats over every kept (token, expert) assignment: ``experts (N, k)`` with -1
    for a dropped one, ``labels (N,)`` int ≥ 0."""
    experts, labels = np.asarray(experts), np.asarray(labels)
    kept = experts >= 0
    e = experts[kept]
    lab = np.broadcast_to(labels[:, None], experts.shape)[kept]
    counts = np.zeros((e.max() + 1, lab.max() + 1))
    np.add.at(counts, (e, lab), 1)
    return _mi_counts_ref(counts)


def same_expert_fraction_ref(first, domain):
    """(2,) share, per domain (0, 1), of the pairs of neighbours inside a window whose first-choice
    expert is the same; pairs with a dropped (-1) choice are left out."""
    first, domain = np.asarray(first), np.asarray(domain)
    valid = (first[:, :-1] >= 0) & (first[:, 1:] >= 0)
    same = (first[:, :-1] == first[:, 1:]) & valid
    return (np.bincount(domain, weights=same.sum(1), minlength=2)
            / np.bincount(domain, weights=valid.sum(1), minlength=2))


def upcycle_ffn_ref(params, n_experts):
    """The MoE parameters whose ``n_experts`` experts are copies of the dense FFN ``params``, with a zero
    router: ``W_gate`` and ``W_noise`` (d, E) zeros, ``W1 (E,d,h)``, ``b1 (E,h)``, ``W2 (E,h,d)``, ``b2 (E,d)``."""
    d = params["W1"].shape[0]
    out = {"W_gate": np.zeros((d, n_experts)), "W_noise": np.zeros((d, n_experts))}
    out.update({k: np.repeat(np.asarray(params[k])[None], n_experts, axis=0) for k in ("W1", "b1", "W2", "b2")})
    return out


# --------------------------------------------------------------------------- exercise 1
def _loss_cases():
    rng = np.random.default_rng(1200)
    return [(np.array([2.0, 1.5, 1.2]), np.array([1024, 1024, 512])),
            (rng.uniform(1.0, 3.0, 7), rng.integers(100, 5000, 7)),
            (np.array([math.log(97)]), np.array([64])),                      # a uniform guess: log2 97 bits
            (np.array([1.0, 3.0]), np.array([1, 3]))]


@LESSON.exercise("bits_per_char", forbid=[bits_per_char_ref])
def bits_per_char(fn):
    for losses, counts in _loss_cases():
        got = call(fn, losses, counts, name="bits_per_char")
        want = bits_per_char_ref(losses, counts)
        weighted = float(np.sum(losses * counts) / np.sum(counts))
        what = f"for losses {np.round(losses, 3).tolist()} over {counts.tolist()} characters"
        expect_number(what, got, want, mistakes=[
            (float(np.mean(losses)) / math.log(2) if len(set(counts.tolist())) > 1 else np.nan,
             "Weight each batch by its characters: the mean over all characters is Σ loss_i·n_i / Σ n_i "
             "(a plain mean of the batch means counts a short batch as much as a long one)."),
            (weighted, "That is still in nats per character. One bit is ln 2 nats: divide by ln 2."),
            (weighted * math.log(2), "Upside down: a bit is *more* than a nat (ln 2 ≈ 0.69 nats per bit), "
                                     "so bits = nats / ln 2, not nats · ln 2."),
            (weighted / math.log(10), "Divide by ln 2, not ln 10: bits count powers of 2."),
            (float(np.log2(weighted)) if weighted > 0 else np.nan,
             "The loss is already a logarithm: convert its unit (nats / ln 2); don't take log2 of it."),
            (float(np.sum(losses * counts)) / math.log(2), "Divide by the number of characters: bits *per* "
                                                           "character."),
        ])
    return ("Σ loss·n / Σ n / ln 2 on 4 cases, including unequal batches (a plain mean would fail) and a "
            "uniform guess over 97 characters (log2 97 = 6.6 bits).")


# --------------------------------------------------------------------------- exercise 2
def _routing_cases():
    rng = np.random.default_rng(1210)
    N = 40
    labels = rng.integers(0, 3, N)
    follows = np.stack([labels, (labels + 1 + rng.integers(0, 2, N)) % 4], axis=1)   # experts track labels
    follows[rng.random((N, 2)) < 0.2] = -1                                             # some dropped
    independent = np.stack([np.arange(N) % 4, (np.arange(N) + 1) % 4], axis=1)
    indep_labels = (np.arange(N) // 4) % 2                                             # I = 0 exactly
    one = rng.integers(0, 5, (30, 1))
    return [(follows, labels), (independent, indep_labels), (one, rng.integers(0, 4, 30)),
            (np.array([[0, 1], [1, -1], [-1, -1], [2, 0]]), np.array([1, 0, 2, 1]))]


def _mi_pairs(e, lab):
    return _corpus.mutual_information(e, lab) if e.size else 0.0


def _check_information(out, experts, labels):
    expect_number("I(expert; label)", out, expert_label_information_ref(experts, labels), rtol=1e-9, atol=1e-12)


@LESSON.exercise("expert_label_information",
                 forbid=[expert_label_information_ref, _corpus.mutual_information, _routing.expert_information,
                         _mi_counts_ref])
def expert_label_information(fn):
    for experts, labels in _routing_cases():
        got = call(fn, experts, labels, name="expert_label_information")
        want = expert_label_information_ref(experts, labels)
        kept = experts >= 0
        lab_all = np.broadcast_to(labels[:, None], experts.shape)
        first_kept = kept[:, 0]
        h = _corpus.entropy(lab_all[kept])
        what = f"for experts of shape {experts.shape} (k = {experts.shape[1]}, {int((~kept).sum())} dropped)"
        expect_number(what, got, want, rtol=1e-9, atol=1e-12, mistakes=[
            (_mi_pairs(experts[:, 0][first_kept], labels[first_kept]) if experts.shape[1] > 1 else np.nan,
             "Count every kept assignment, all k of them — not only the first choice: each (token, expert) "
             "pair is one referral (experts[experts >= 0], with each token's label repeated k times)."),
            (_mi_pairs(experts.ravel(), lab_all.ravel()) if (~kept).any() else np.nan,
             "A dropped assignment (-1) is not an expert: leave out the entries with experts < 0."),
            (want / math.log(2), "That is in bits (log2). minimoe measures information in nats: use np.log."),
            (want / h if h > 0 else np.nan, "Return I itself, in nats — not I / H(label), the share of the "
                                            "label's uncertainty (the lesson computes that next)."),
            (h - want, "That is H(label | expert), what remains unknown once you know the expert. "
                       "I = H(label) − H(label | expert)."),
        ])

    def make(N):
        rng = np.random.default_rng(N)
        labels = rng.integers(0, 12, N)
        return (labels[:, None] + rng.integers(0, 2, (N, 2))) % 8, labels
    small, big = no_token_loop(fn, "expert_label_information", make, _check_information,
                               hint="Mask the kept assignments once (experts >= 0), count the (expert, label) "
                                    "pairs with np.add.at or np.bincount, and sum over the table.")
    return (f"I(expert; label) in nats over every kept assignment, on 4 cases (k = 1 and 2, dropped assignments, "
            f"independent labels: exactly 0); vectorised ({small} Python steps at N = 64, {big} at N = 1024).")


# --------------------------------------------------------------------------- exercise 3
def _window_cases():
    rng = np.random.default_rng(1220)
    runs = np.repeat(rng.integers(0, 4, (6, 5)), 3, axis=1)                 # (6, 15): runs of 3
    runs[rng.random(runs.shape) < 0.1] = -1
    hand = np.array([[0, 0, 1, 1], [2, 2, 2, -1], [1, 0, 1, 0], [-1, -1, 3, 3]])
    return [(hand, np.array([0, 1, 1, 0])), (runs, np.array([0, 1, 0, 1, 1, 0])),
            (rng.integers(0, 8, (5, 9)), np.array([1, 1, 0, 0, 1])),
            (np.array([[4, 4, 4, 4, 0], [1, 1, 2, 2, 2]]), np.array([0, 1]))]


def _check_fraction(out, first, domain):
    expect_array("the same-expert shares", out, same_expert_fraction_ref(first, domain), shape_desc="(2,)")


@LESSON.exercise("same_expert_fraction", forbid=[same_expert_fraction_ref, _routing.same_expert_fraction])
def same_expert_fraction(fn):
    for first, domain in _window_cases():
        got = call(fn, first, domain, name="same_expert_fraction")
        want = same_expert_fraction_ref(first, domain)
        W, S = first.shape
        flat = first.ravel()
        what = f"for {W} windows of {S} characters"
        if got is not None and np.ndim(got) == 0:
            raise Fail(f"same_expert_fraction returned one number {what}; it should return two, one per "
                       f"domain (prose, code): np.bincount(domain, weights=..., minlength=2) splits any "
                       f"per-window count by domain.")
        valid = (first[:, :-1] >= 0) & (first[:, 1:] >= 0)
        same_any = first[:, :-1] == first[:, 1:]
        cross_valid = (flat[:-1] >= 0) & (flat[1:] >= 0)
        cross_same = (flat[:-1] == flat[1:]) & cross_valid
        wdom = np.repeat(domain, S)[:-1]
        with np.errstate(all="ignore"):
            crossing = (np.bincount(wdom, weights=cross_same, minlength=2)
                        / np.bincount(wdom, weights=cross_valid, minlength=2))
            dropped_same = (np.bincount(domain, weights=same_any.sum(1), minlength=2)
                            / np.bincount(domain, weights=np.full(W, S - 1.0), minlength=2))
            by_s = (np.bincount(domain, weights=(same_any & valid).sum(1), minlength=2)
                    / np.bincount(domain, weights=np.full(W, float(S)), minlength=2))
            per_window = np.array([np.nanmean(((same_any & valid).sum(1) / valid.sum(1))[domain == d])
                                   for d in range(2)])
        expect_array(what, got, want, shape_desc="(2,)", mistakes=[
            (crossing, "Only neighbours inside a window count: the last character of one window and the "
                       "first of the next are not neighbours. Compare first[:, :-1] with first[:, 1:]."),
            (dropped_same, "Leave out the pairs where either choice was dropped (-1): two dropped neighbours "
                           "are not sent to the same expert, they are sent to none."),
            (by_s, "A window of S characters holds S − 1 pairs of neighbours, not S: divide by the pairs "
                   "you counted."),
            (per_window, "Pool the pairs of all windows of a domain before dividing: a mean of per-window "
                         "shares weighs a window with many dropped pairs as much as a full one."),
        ])

    def make(W):
        rng = np.random.default_rng(W)
        return np.repeat(rng.integers(0, 8, (W // 8, 4)), 2, axis=1), rng.integers(0, 2, W // 8)
    small, big = no_token_loop(fn, "same_expert_fraction", make, _check_fraction,
                               hint="Compare the two shifted views first[:, :-1] and first[:, 1:] at once, "
                                    "sum each window's row, and split the sums by domain with np.bincount.",
                               loops="a loop over windows or characters")
    return (f"the share of neighbours with the same first choice, per domain, inside windows only and "
            f"without dropped pairs, on 4 cases; vectorised ({small} Python steps for 8 windows, {big} for 128).")


# --------------------------------------------------------------------------- exercise 4
def _ffn_cases():
    out = []
    for seed, (d, h, E) in enumerate([(4, 6, 3), (5, 3, 1), (3, 8, 5)]):
        ex = Expert(d, h, rng=np.random.default_rng(1230 + seed))
        rng = np.random.default_rng(1240 + seed)
        params = {k: v + (rng.standard_normal(v.shape) if k.startswith("b") else 0) for k, v in ex.params.items()}
        out.append((params, E))
    return out


@LESSON.exercise("upcycle_ffn", forbid=[upcycle_ffn_ref, _upcycle.upcycle_ffn, _upcycle.upcycle])
def upcycle_ffn(fn):
    for params, E in _ffn_cases():
        d, h = params["W1"].shape
        given = {k: v.copy() for k, v in params.items()}
        got = call(fn, given, E, name="upcycle_ffn")
        what = f"for a dense FFN with d = {d}, h = {h} and E = {E}"
        changed = [k for k in params if not np.array_equal(given[k], params[k])]
        if changed:
            raise Fail(f"upcycle_ffn changed its input params{changed} in place: the dense model must stay as "
                       f"it was (it is compared with the upcycled one, and trained on). Copy, don't modify.")
        if not isinstance(got, dict):
            raise Fail(f"upcycle_ffn should return a dict of arrays (W_gate, W_noise, W1, b1, W2, b2), got "
                       f"{type(got).__name__}.")
        want = upcycle_ffn_ref(params, E)
        missing = [k for k in want if k not in got]
        if missing:
            raise Fail(f"the dict {what} lacks {missing}: the MoE layer needs a router (W_gate, and W_noise "
                       f"for its noise) as well as the experts' W1, b1, W2, b2.")
        if np.shape(got["W1"]) == (d, E, h):
            raise Fail(f"W1 has shape (d, E, h) = {(d, E, h)} {what}: the experts are stacked along the first "
                       f"axis, W1 (E, d, h) — np.stack([...] * E, axis=0) or np.repeat(W1[None], E, axis=0).")
        for key in ("W1", "b1", "W2", "b2"):
            copies = np.repeat(np.asarray(params[key])[None], E, axis=0)
            expect_array(f"{key} {what}", got[key], want[key], mistakes=[
                (copies / E, "Don't divide the copies by E: the gates of a renormalising router sum to 1, so "
                             "Σ_e G_e · FFN(x) = FFN(x) already; each expert must be the whole dense FFN."),
            ])
        for key in ("W_gate", "W_noise"):
            g = np.asarray(got[key], dtype=np.float64)
            if g.shape == (d, E) and np.any(g != 0):
                raise Fail(f"{key} {what} is not zero: the docstring asks for a zero router — every expert "
                           f"equally likely at first, and a noise width softplus(0) that lets the copies drift "
                           f"apart.")
            expect_array(f"{key} {what}", got[key], want[key], shape_desc="(d, E)")
        try:
            w = got["W1"]
            w[0] += 1.0
            moved = E > 1 and not np.array_equal(w[1], params["W1"])
            w[0] -= 1.0
        except ValueError:          # a read-only broadcast view
            moved = True
        if moved or np.shares_memory(np.asarray(got["W1"]), given["W1"]):
            raise Fail(f"W1 {what} shares its memory with the dense FFN or among the experts (a broadcast "
                       f"view, np.broadcast_to, is one array seen E times): training one expert would move "
                       f"them all. Make real copies: np.repeat(W1[None], E, axis=0) or np.stack.")
        layer = MoELayer(d, h, E, k=min(2, E), noisy=True, rng=0)
        for key in layer.params:
            layer.params[key][...] = got[key]
        x = np.random.default_rng(E).standard_normal((6, d))
        dense = Expert(d, h, rng=0)
        for key in dense.params:
            dense.params[key][...] = params[key]
        expect_array(f"the upcycled layer's output {what}", layer.forward(x, train=True), dense.forward(x))
    return ("E copies of the dense FFN (independent arrays, stacked on the first axis) behind a zero router, "
            "on 3 cases; the upcycled top-k layer computes exactly the dense FFN, noise and all.")
