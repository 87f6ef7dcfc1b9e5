"""Graders for lesson 03, *The referral*: KeepTopK, the two equal top-k recipes, and the
backward passes of the top-k and Switch gates.

The lesson works with *dense* (T, E) gate matrices — zeros for the experts a token
is not sent to — because they are easiest to reason about; minimoe's ``router.py``
stores the same numbers compactly as (T, k) ``idx`` and ``gates``.
"""
from __future__ import annotations

import numpy as np

from ...core import layers, router
from .compare import expect_array, expect_grads, numeric_grads
from .grading import Fail, Lesson, call, no_token_loop
from .lesson02 import AXIS_HINT

LESSON = Lesson("03", "The referral")
progress = LESSON.progress

_CASES = [(5, 4, 2), (1, 6, 1), (7, 5, 3), (4, 3, 3)]     # (T, E, k); the last keeps every expert


def scores(seed, T, E):
    """Router scores with well-separated entries (gaps ≥ 0.2), so no finite difference crosses a tie."""
    rng = np.random.default_rng(seed)
    base = np.linspace(-2.0, 2.0, E)
    return np.stack([rng.permutation(base) for _ in range(T)]) + 0.01 * rng.standard_normal((T, E))


def topk_gate_ref(H, k):
    """Dense top-k gate ``softmax(KeepTopK(H, k))``, (T, E), zeros outside the top k."""
    return layers.softmax(router.keep_topk_forward(H, k)[0])


def topk_mask(H, k):
    """(T, E) bool, True at each row's k largest scores."""
    return router.keep_topk_forward(H, k)[1]


@LESSON.exercise("keep_topk", forbid=[router.keep_topk_forward, router.topk_indices])
def keep_topk(fn):
    for seed, (T, E, k) in enumerate(_CASES):
        H = scores(100 + seed, T, E)
        got = call(fn, H, k, name="keep_topk")
        want, mask = router.keep_topk_forward(H, k)
        if got is None:
            raise Fail("keep_topk returned None — did you forget a `return`?")
        got = np.asarray(got, dtype=float)
        if got.shape != H.shape:
            raise Fail(f"keep_topk should return an array of H's shape {H.shape} = (T, E), got {got.shape}")
        kept = np.isfinite(got)
        smallest = topk_mask(-H, k)
        if np.array_equal(kept, smallest) and not np.array_equal(kept, mask):
            raise Fail("You kept the k *smallest* scores. np.argsort sorts ascending: take its last "
                       "k columns, or sort −H.")
        if kept.all() and k < E:
            zeros_out = np.where(mask, H, 0.0)
            if np.allclose(got, zeros_out):
                raise Fail("Set the dropped scores to −inf (np.inf with a minus), not 0: after the "
                           "softmax, exp(0) = 1 would still give those experts a share.")
            raise Fail(f"every score is still finite: set all but the k = {k} largest of each row to −inf.")
        if np.any(np.isnan(got)) or np.any(got == np.inf):
            raise Fail("keep_topk should contain only the kept scores and −inf — found NaN or +inf.")
        per_row = kept.sum(axis=1)
        if np.any(per_row != k):
            col = topk_mask(H.T, min(k, T)).T if T >= k else None
            if col is not None and np.array_equal(kept, col):
                raise Fail("You kept the k largest of each *column*. Each token (row) picks its own "
                           "k experts: work along axis=1.")
            raise Fail(f"each row should keep exactly k = {k} scores; yours keep {sorted(set(per_row.tolist()))}. "
                       f"(Check your slicing, e.g. [:, -k:] keeps k columns.)")
        if not np.array_equal(kept, mask):
            raise Fail(f"keep_topk kept {k} scores per row, but not the {k} largest (row "
                       f"{int(np.argmax((kept != mask).any(1)))}).")
        if not np.array_equal(got[kept], H[kept]):
            raise Fail("the kept scores must be H's own values, exactly unchanged (copy them, "
                       "don't recompute them).")
    no_token_loop(fn, "keep_topk", lambda T: (scores(160 + T, T, 6), 2),
                  lambda out, H, k: expect_array(
                      "keep_topk", np.where(np.isfinite(np.asarray(out, float)), out, -1e300),
                      np.where(topk_mask(H, k), H, -1e300)),
                  "np.argsort (or np.argpartition) sorts every row in one call; np.put_along_axis writes them back.")
    return ("keeps exactly the k largest scores of each row (k = 1 to E) and sets the rest to −inf, with no "
            "loop over tokens.")


@LESSON.exercise("renormalized_gate", forbid=[topk_gate_ref, router.topk_gate_forward])
def renormalized_gate(fn):
    for seed, (T, E, k) in enumerate(_CASES):
        H = scores(110 + seed, T, E)
        got = call(fn, H, k, name="renormalized_gate")
        p = layers.softmax(H)
        mask = topk_mask(H, k)
        want = topk_gate_ref(H, k)
        expect_array("G", got, want, shape_desc="(T, E)", mistakes=[
            (p * mask, "You kept the top-k shares of the full softmax but did not renormalise them: "
                       "that is the Switch gate, and its gates sum to less than 1. Divide by their sum."),
            (p * topk_mask(-H, k) / (p * topk_mask(-H, k)).sum(1, keepdims=True),
             "You kept the k *smallest* shares; keep the k largest."),
            (p, "Keep only the top k experts of each token: set the other shares to 0."),
            (np.where(mask, H, 0) / np.where(mask, H, 0).sum(1, keepdims=True),
             "Start from the softmax of H, not from the raw scores."),
        ])
    no_token_loop(fn, "renormalized_gate", lambda T: (scores(170 + T, T, 6), 2),
                  lambda out, H, k: expect_array("G", out, topk_gate_ref(H, k)),
                  "Each step works on the whole (T, E) array: softmax over axis=1, a mask, a sum over axis=1.")
    return ("softmax → keep top-k → renormalise gives exactly softmax(KeepTopK(H, k)) on 4 cases: "
            "the two recipes are the same function.")


@LESSON.exercise("topk_gate_backward", forbid=[router.topk_gate_backward])
def topk_gate_backward(fn):
    worst = 0.0
    for seed, (T, E, k) in enumerate(_CASES):
        H = scores(120 + seed, T, E)
        dG = np.random.default_rng(130 + seed).standard_normal((T, E))
        G = topk_gate_ref(H, k)
        got = call(fn, dG, G, name="topk_gate_backward")
        HH = H.copy()
        num = numeric_grads(lambda: topk_gate_ref(HH, k), {"H": HH}, dG)
        s = np.sum(dG * G, axis=1, keepdims=True)
        worst = max(worst, expect_grads({"H": got}, num, mistakes={"H": [
            (dG - s, "Multiply by G: the experts a token was not sent to must get exactly 0, and G is 0 there."),
            (G * dG, "Only the diagonal of the Jacobian: subtract ⟨dG, G⟩ (one number per token), "
                     "dH = G ⊙ (dG − ⟨dG, G⟩)."),
            (G * (dG - np.sum(dG * G)), "⟨dG, G⟩ is one number per token: sum over axis=1 with keepdims=True."),
            (G * (dG - np.sum(dG * G, axis=0, keepdims=True)), AXIS_HINT.replace("dp, p", "dG, G")),
            (layers.softmax(H) * (dG - np.sum(dG * layers.softmax(H), 1, keepdims=True)),
             "That is the dense softmax's backward; the top-k gate's softmax runs over the kept scores only."),
        ]}))
    def make_topk(T):
        H = scores(180 + T, T, 6)
        return np.random.default_rng(T).standard_normal((T, 6)), topk_gate_ref(H, 2)
    no_token_loop(fn, "topk_gate_backward", make_topk,
                  lambda out, dG, G: expect_array("dH", out, G * (dG - np.sum(dG * G, axis=1, keepdims=True))),
                  "⟨dG, G⟩ for every token at once: np.sum(dG * G, axis=1, keepdims=True).")
    return (f"dH = G ⊙ (dG − ⟨dG, G⟩) passes the gradient check on 4 cases, k = 1 to E "
            f"(worst relative error {worst:.1e}).")


@LESSON.exercise("switch_gate_backward", forbid=[router.switch_gate_backward])
def switch_gate_backward(fn):
    worst = 0.0
    for seed, (T, E, k) in enumerate(_CASES):
        H = scores(140 + seed, T, E)
        dG = np.random.default_rng(150 + seed).standard_normal((T, E))
        p = layers.softmax(H)
        mask = topk_mask(H, k)
        got = call(fn, dG, p, mask, name="switch_gate_backward")
        HH = H.copy()
        num = numeric_grads(lambda: layers.softmax(HH) * mask, {"H": HH}, dG)
        G = topk_gate_ref(H, k)
        dm = dG * mask
        worst = max(worst, expect_grads({"H": got}, num, mistakes={"H": [
            (p * (dG - np.sum(dG * p, 1, keepdims=True)),
             "Mask the upstream gradient first: only the kept entries of the softmax reach the "
             "output, so the softmax backward receives dG ⊙ mask."),
            (G * (dG - np.sum(dG * G, 1, keepdims=True)),
             "That is the top-k (renormalised) gate's backward. The Switch gate is the full softmax "
             "read at the kept entries: dH = p ⊙ (dG⊙mask − ⟨dG⊙mask, p⟩)."),
            (p * dm, "Only the diagonal of the softmax Jacobian: subtract ⟨dG⊙mask, p⟩ per token."),
            (p * (dm - np.sum(dm * p, axis=0, keepdims=True)), AXIS_HINT.replace("dp, p", "dG⊙mask, p")),
            ((p * (dm - np.sum(dm * p, 1, keepdims=True))) * mask,
             "Don't mask dH: the dropped experts' scores still change the kept shares through the "
             "softmax's denominator, so they get a gradient too."),
        ]}))
    def make_switch(T):
        H = scores(190 + T, T, 6)
        return np.random.default_rng(T).standard_normal((T, 6)), layers.softmax(H), topk_mask(H, 1)

    def check_switch(out, dG, p, mask):
        dm = dG * mask
        expect_array("dH", out, p * (dm - np.sum(dm * p, axis=1, keepdims=True)))
    no_token_loop(fn, "switch_gate_backward", make_switch, check_switch,
                  "Mask and reduce the whole (T, E) array at once: dm = dG * mask, "
                  "np.sum(dm * p, axis=1, keepdims=True).")
    return (f"dH = p ⊙ (dG⊙mask − ⟨dG⊙mask, p⟩) passes the gradient check on 4 cases "
            f"(worst relative error {worst:.1e}) — including k = 1, where it is not zero.")
