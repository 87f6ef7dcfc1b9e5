"""Graders for lesson 02, *The GP*: softmax, its backward, and the dense mixture of experts.

References: :func:`minimoe.core.layers.softmax` and, for every backward, finite
differences of a forward written here from minimoe's pieces — so the verdict does
not rest on any hand-written backward.
"""
from __future__ import annotations

import numpy as np

from ...core import experts, layers, router
from .compare import expect_array, expect_grads, numeric_grads
from .grading import Fail, Lesson, call, no_token_loop
from .lesson01 import call_watching

LESSON = Lesson("02", "The GP")
progress = LESSON.progress

# The axis mistake of every softmax backward (lessons 02 and 03 name it the same way).
AXIS_HINT = ("⟨dp, p⟩ is one number per token: sum over the experts (axis=-1, keepdims=True), "
             "not over the tokens (axis=0).")


def dense_moe_ref(x, W_gate, W1, b1, W2, b2):
    """The dense mixture ``y = Σ_e G_e ⊙ FFN_e(x)``, ``G = softmax(x W_gate)``.

    Returns y (T, d) and the lesson's cache ``(x, W_gate, G, Y, ffn_caches)`` with
    ``Y (E, T, d)`` every expert's answer and ``ffn_caches`` minimoe's FFN caches.
    """
    G = layers.softmax(x @ W_gate)                                   # (T, E)
    outs = [experts.ffn_forward(x, W1[e], b1[e], W2[e], b2[e]) for e in range(W1.shape[0])]
    Y = np.stack([o[0] for o in outs])                               # (E, T, d)
    y = np.einsum("te,etd->td", G, Y)
    return y, (x, W_gate, G, Y, [o[1] for o in outs])


def _moe_inputs(seed, T, d, h, E):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((T, d)), rng.standard_normal((d, E)),
            rng.standard_normal((E, d, h)) / np.sqrt(d), 0.3 * rng.standard_normal((E, h)),
            rng.standard_normal((E, h, d)) / np.sqrt(h), 0.3 * rng.standard_normal((E, d)))


@LESSON.exercise("softmax", forbid=[layers.softmax, layers.softmax_forward, layers.log_softmax,
                                   router.dense_gate_forward])
def softmax(fn):
    rng = np.random.default_rng(60)
    cases = [rng.standard_normal((5, 3)), rng.standard_normal((1, 7)) * 3,
             np.array([[1e4, -1e4, 0.0, 1e4 - 1.0], [-1e4, -1e4 + 2.0, -1e4, -1e4]])]
    for z in cases:
        p = call(fn, z, name="softmax")
        want = layers.softmax(z)
        arr = np.asarray(p, dtype=float) if p is not None else None
        if arr is not None and arr.shape == z.shape and not np.all(np.isfinite(arr)):
            raise Fail("softmax returned NaN or inf for logits as large as ±1e4: exp(1e4) overflows. "
                       "Subtract each row's maximum first (z − z.max(axis=-1, keepdims=True)); "
                       "softmax doesn't change, and the largest exponent becomes exp(0) = 1.")
        e = np.exp(z - z.max())
        expect_array("p", p, want, shape_desc="(T, E)", mistakes=[
            (layers.softmax(z, axis=0), "Normalise each row (axis=-1): a token's gates over the E "
                                        "experts sum to 1, not an expert's over the tokens."),
            (e / e.sum(), "Normalise each row separately (sum over axis=-1 with keepdims=True), "
                          "not over the whole matrix."),
        ])
    no_token_loop(fn, "softmax", lambda T: (np.random.default_rng(T).standard_normal((T, 4)),),
                  lambda p, z: expect_array("p", p, layers.softmax(z), shape_desc="(T, E)"),
                  "Work on whole rows at once: z.max(axis=-1, keepdims=True), then .sum(axis=-1, keepdims=True).")
    return "rows sum to 1 and match minimoe's softmax, including logits of ±1e4 (no overflow)."


@LESSON.exercise("softmax_backward", forbid=[layers.softmax_backward, router.dense_gate_backward])
def softmax_backward(fn):
    worst = 0.0
    for seed, (T, E) in enumerate([(4, 3), (1, 5), (6, 8)]):
        rng = np.random.default_rng(70 + seed)
        z = rng.standard_normal((T, E)) * 1.5
        dp = rng.standard_normal((T, E))
        p = layers.softmax(z)
        got = call(fn, dp, p, name="softmax_backward")
        zz = z.copy()
        num = numeric_grads(lambda: layers.softmax(zz), {"z": zz}, dp)["z"]
        s = np.sum(dp * p, axis=-1, keepdims=True)
        worst = max(worst, expect_grads({"z": got}, {"z": num}, mistakes={"z": [
            (p * dp, "You kept only the diagonal of the Jacobian (p_i δ_ij). Every logit also moves "
                     "every other probability: the −p pᵀ part adds −p ⊙ ⟨dp, p⟩, one number per row."),
            (p * (1 - p) * dp, "Off on the diagonal: p(1 − p) is ∂p_i/∂z_i, the Jacobian's diagonal "
                               "only. The full product is dz = p ⊙ (dp − ⟨dp, p⟩)."),
            (p * (dp - np.sum(dp * p)), "⟨dp, p⟩ is one number *per token*: sum over axis=-1 with "
                                        "keepdims=True, not over the whole matrix."),
            (p * (dp - np.sum(dp * p, axis=0, keepdims=True)), AXIS_HINT),
            (dp - s, "Multiply by p: dz = p ⊙ (dp − ⟨dp, p⟩)."),
            (-p * (dp - s), "Sign: dz = p ⊙ (dp − ⟨dp, p⟩), not its negative."),
        ]}))
    def make(T):
        rng = np.random.default_rng(T)
        return rng.standard_normal((T, 5)), layers.softmax(rng.standard_normal((T, 5)))
    no_token_loop(fn, "softmax_backward", make,
                  lambda out, dp, p: expect_array("dz", out, p * (dp - np.sum(dp * p, axis=-1, keepdims=True))),
                  "⟨dp, p⟩ for every token at once: np.sum(dp * p, axis=-1, keepdims=True).")
    return (f"dz = p ⊙ (dp − ⟨dp, p⟩) passes the gradient check on 3 batches "
            f"(worst relative error {worst:.1e}), with no loop over tokens.")


_LOOP_HINT = ("Loop over the E experts if you like (E is the same at every T), but let each "
              "expert's FFN and the weighing by G[:, e:e+1] handle all tokens at once.")


@LESSON.exercise("dense_moe_forward", forbid=[dense_moe_ref])
def dense_moe_forward(fn):
    for seed, (T, d, h, E) in enumerate([(5, 4, 6, 3), (1, 3, 2, 4), (8, 2, 5, 6)]):
        x, Wg, W1, b1, W2, b2 = _moe_inputs(80 + seed, T, d, h, E)
        out = call(fn, x, Wg, W1, b1, W2, b2, name="dense_moe_forward")
        _check_dense_forward(out, x, Wg, W1, b1, W2, b2)
    no_token_loop(fn, "dense_moe_forward", lambda T: _moe_inputs(88, T, 3, 4, 3), _check_dense_forward,
                  _LOOP_HINT)
    return ("y = Σ_e G_e ⊙ FFN_e(x) and the cache are right on 3 random clinics (E = 3 to 6), "
            "with no loop over tokens.")


def _check_dense_forward(out, x, Wg, W1, b1, W2, b2):
    E = W1.shape[0]
    if not isinstance(out, tuple) or len(out) != 2:
        raise Fail("dense_moe_forward should return a pair (y, cache)")
    y, cache = out
    want, (_, _, G, Y, _) = dense_moe_ref(x, Wg, W1, b1, W2, b2)
    L = x @ Wg
    expect_array("y", y, want, shape_desc="(T, d)", mistakes=[
        (Y.mean(axis=0), "You averaged the experts equally. Weigh each expert's answer by its "
                         "gate: y = Σ_e G[:, e:e+1] * FFN_e(x)."),
        (Y.sum(axis=0), "You summed the experts' answers without weighing them by the gates G."),
        (np.einsum("te,etd->td", layers.softmax(L, axis=0), Y),
         "The softmax goes along the experts (axis=1): each token's gates sum to 1."),
        (np.einsum("te,etd->td", L, Y), "Turn the scores L = x W_gate into gates with a softmax first."),
    ])
    if not isinstance(cache, tuple) or len(cache) != 5:
        raise Fail("y is right, but the cache should be (x, W_gate, G, Y, ffn_caches).")
    if np.shape(cache[2]) != G.shape or not np.allclose(cache[2], G):
        raise Fail("y is right, but cache[2] should be the gates G = softmax(x W_gate), shape (T, E).")
    if np.shape(cache[3]) != Y.shape or not np.allclose(cache[3], Y):
        raise Fail(f"y is right, but cache[3] should be Y, every expert's answer stacked, shape "
                   f"(E, T, d) = {Y.shape}: Y[e] = FFN_e(x). (Try np.stack.)")
    if len(cache[4]) != E:
        raise Fail(f"y is right, but cache[4] should be the list of the E = {E} experts' FFN caches.")


def _check_dense_backward_exact(out, dy, cache):
    """At large T: compare with the backward written out here (the finite differences are too slow)."""
    if not isinstance(out, tuple) or len(out) != 2 or not isinstance(out[1], dict):
        raise Fail("dense_moe_backward should return a pair (dx, grads)")
    x, Wg, G, Y, caches = cache
    dG = np.einsum("td,etd->te", dy, Y)
    dL = G * (dG - np.sum(dG * G, axis=1, keepdims=True))
    parts = [experts.ffn_backward(G[:, e:e + 1] * dy, c) for e, c in enumerate(caches)]
    expect_array("dx", out[0], sum(p[0] for p in parts) + dL @ Wg.T, shape_desc="(T, d)")
    expect_array("dW_gate", out[1].get("W_gate"), x.T @ dL, shape_desc="(d, E)")


@LESSON.exercise("dense_moe_backward")
def dense_moe_backward(fn):
    worst = 0.0
    for seed, (T, d, h, E) in enumerate([(4, 3, 4, 3), (1, 2, 3, 2), (5, 2, 3, 4)]):
        x, Wg, W1, b1, W2, b2 = _moe_inputs(90 + seed, T, d, h, E)
        dy = np.random.default_rng(95 + seed).standard_normal((T, d))
        _, cache = dense_moe_ref(x, Wg, W1, b1, W2, b2)
        out = call_watching(fn, dy, cache, name="dense_moe_backward", labels=("dy", "cache"))
        if not isinstance(out, tuple) or len(out) != 2:
            raise Fail("dense_moe_backward should return a pair (dx, grads)")
        dx, grads = out
        arrays = {"x": x.copy(), "W_gate": Wg.copy(), "W1": W1.copy(), "b1": b1.copy(),
                  "W2": W2.copy(), "b2": b2.copy()}
        num = numeric_grads(lambda: dense_moe_ref(**arrays)[0], arrays, dy)
        # Typical mistakes, built from the right pieces:
        G, Y, caches = cache[2], cache[3], cache[4]
        dG = np.einsum("td,etd->te", dy, Y)
        dx_experts = sum(experts.ffn_backward(G[:, e:e + 1] * dy, caches[e])[0] for e in range(E))
        unscaled = [experts.ffn_backward(dy, caches[e])[1] for e in range(E)]
        gate_hint = ("Each expert's answer is scaled by its gate, so its upstream gradient is "
                     "G[:, e:e+1] * dy, not dy.")
        mistakes = {
            "x": [(dx_experts, "dx is missing the path through the GP: the scores L = x W_gate depend "
                               "on x too, adding dL W_gateᵀ."),
                  (dx_experts + dG @ Wg.T, "dx: backpropagate dG through the softmax before multiplying "
                                           "by W_gateᵀ.")],
            "W_gate": [(x.T @ dG, "The gates are G = softmax(L): backpropagate dG through the softmax "
                                  "(dL = G ⊙ (dG − ⟨dG, G⟩)) before dW_gate = xᵀ dL."),
                       (num["W_gate"].T, "dW_gate is transposed: L = x W_gate, so dW_gate = xᵀ dL, "
                                         "shape (d, E) like W_gate (not dLᵀ x).")],
            "W1": [(np.stack([u["W1"] for u in unscaled]), gate_hint)],
            "W2": [(np.stack([u["W2"] for u in unscaled]), gate_hint)],
            "b2": [(np.stack([u["b2"] for u in unscaled]), gate_hint)],
        }
        all_grads = {**grads, "x": dx} if isinstance(grads, dict) else grads
        worst = max(worst, expect_grads(all_grads, num, mistakes=mistakes,
                                        names=["W_gate", "W1", "b1", "W2", "b2", "x"]))
    def make(T):
        x, Wg, W1, b1, W2, b2 = _moe_inputs(99, T, 3, 4, 3)
        return np.random.default_rng(T).standard_normal((T, 3)), dense_moe_ref(x, Wg, W1, b1, W2, b2)[1]
    no_token_loop(fn, "dense_moe_backward", make, _check_dense_backward_exact, _LOOP_HINT)
    return (f"dx and the gradients of W_gate, W1, b1, W2, b2 pass the gradient check on 3 random "
            f"clinics (worst relative error {worst:.1e}), with no loop over tokens.")
