"""Graders for lesson 04, *A noisy GP*: softplus, noisy logits forward and backward, and
the top-k margin that tells a finite difference whether it is safe.

References: :func:`minimoe.core.router.softplus`, :func:`minimoe.core.router.router_logits_forward`,
and finite differences of the latter for the backward.
"""
from __future__ import annotations

import numpy as np

from ...core import router
from .compare import expect_array, expect_grads, numeric_grads
from .grading import Fail, Lesson, call, no_token_loop
from .lesson01 import call_watching

LESSON = Lesson("04", "A noisy GP")
progress = LESSON.progress


def topk_margin_ref(H, k):
    """(T,) gap between each row's k-th and (k+1)-th largest score (k < E)."""
    s = -np.sort(-H, axis=1)
    return s[:, k - 1] - s[:, k]


def _inputs(seed, T, d, E):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((T, d)), rng.standard_normal((d, E)),
            rng.standard_normal((d, E)), rng.standard_normal((T, E)))


@LESSON.exercise("softplus", forbid=[router.softplus])
def softplus(fn):
    rng = np.random.default_rng(240)
    cases = [np.concatenate([np.linspace(-5, 5, 11), [-800.0, -40.0, 0.0, 40.0, 800.0]]).reshape(2, 8),
             -rng.uniform(20, 700, 6), rng.standard_normal((3, 4)) * 10]
    for z in cases:
        got = call(fn, z, name="softplus")
        want = router.softplus(z)
        arr = None if got is None else np.asarray(got, dtype=float)
        if arr is not None and arr.shape == z.shape and not np.all(np.isfinite(arr)):
            raise Fail("softplus overflowed (inf or nan) at z = 800: exp(800) is too big for a float. "
                       "Use np.logaddexp(0, z), which computes log(e^0 + e^z) without overflow.")
        with np.errstate(all="ignore"):
            naive = np.log(1 + np.exp(np.clip(z, None, 700)))
            stable_log = np.maximum(z, 0) + np.log(1 + np.exp(-np.abs(z)))
        lost = ("Close, but for very negative z, 1 + e^z rounds to exactly 1 and the log gives 0 "
                "instead of e^z ≈ 4e-18 (at z = −40). np.logaddexp(0, z) (or np.log1p(np.exp(z)) "
                "for z < 0) keeps those digits.")
        expect_array("softplus(z)", got, want, rtol=1e-9, atol=0.0, mistakes=[
            (np.maximum(z, 0), "That is relu. Softplus is its smooth cousin, log(1 + e^z): "
                               "about relu(z) far from 0, but log 2 at z = 0."),
            (np.where(z > 700, z, naive), lost),
            (stable_log, lost.replace("1 + e^z rounds", "1 + e^−|z| rounds")),
            (np.log(1 + np.abs(z)), "Softplus is log(1 + e^z), with an exponential."),
        ])
    no_token_loop(fn, "softplus", lambda T: (np.random.default_rng(T).standard_normal((T, 4)) * 5,),
                  lambda out, z: expect_array("softplus(z)", out, np.logaddexp(0, z), rtol=1e-9, atol=0.0),
                  "np.logaddexp(0, z) works on the whole array.")
    return ("softplus = log(1 + e^z) is right from z = −800 to 800 on 3 arrays: no overflow, "
            "no lost digits, no loop over tokens.")


@LESSON.exercise("noisy_logits_forward", forbid=[router.router_logits_forward])
def noisy_logits_forward(fn):
    for seed, (T, d, E) in enumerate([(5, 3, 4), (1, 2, 3), (7, 4, 6)]):
        x, Wg, Wn, eps = _inputs(200 + seed, T, d, E)
        out = call(fn, x, Wg, Wn, eps, name="noisy_logits_forward")
        if not isinstance(out, tuple) or len(out) != 2:
            raise Fail("noisy_logits_forward should return a pair (H, cache)")
        H, cache = out
        want, _ = router.router_logits_forward(x, Wg, Wn, noise=eps)
        L, z = x @ Wg, x @ Wn
        _own_noise(H, L, router.softplus(z), eps)
        expect_array("H", H, want, shape_desc="(T, E)", mistakes=[
            (L + eps * z, "The noise scale must be positive: σ = softplus(x W_noise), not x W_noise itself."),
            (L + eps, "Scale the noise by the GP's learned uncertainty: H = L + ε ⊙ softplus(x W_noise)."),
            (L + eps * np.exp(z), "Use softplus, log(1 + e^z), for σ: exp grows too fast and its "
                                  "gradient explodes."),
            (L + eps * router.softplus(L), "σ comes from the separate noise weights: softplus(x W_noise), "
                                           "not softplus of the clean logits."),
            (L, "You forgot the noise: H = L + ε ⊙ softplus(x W_noise)."),
        ])
        if not isinstance(cache, tuple) or len(cache) != 5:
            raise Fail("H is right, but the cache should be (x, W_gate, W_noise, eps, z) with z = x W_noise.")
        same = [_same(c, w) for c, w in zip(cache, (x, Wg, Wn, eps, z))]
        if not same[1] and not same[2] and _same(cache[1], Wn) and _same(cache[2], Wg):
            raise Fail("H is right, but W_gate and W_noise are swapped in the cache: the order is "
                       "(x, W_gate, W_noise, eps, z), and the backward reads them by position.")
        if not same[4]:
            raise Fail("H is right, but cache[4] should be z = x W_noise, *before* the softplus.")
        for i, name in enumerate(("x", "W_gate", "W_noise", "eps")):
            if not same[i]:
                raise Fail(f"H is right, but cache[{i}] should be {name}: the cache is "
                           f"(x, W_gate, W_noise, eps, z).")
    no_token_loop(fn, "noisy_logits_forward", lambda T: _inputs(250 + T, T, 3, 4),
                  lambda out, x, Wg, Wn, eps: expect_array(
                      "H", out[0] if isinstance(out, tuple) else out,
                      router.router_logits_forward(x, Wg, Wn, noise=eps)[0]),
                  "x @ W_gate and x @ W_noise score every token at once.")
    return ("H = x W_gate + ε ⊙ softplus(x W_noise) and the cache are right on 3 random batches, with no "
            "loop over tokens.")


def _same(a, b):
    return np.shape(a) == np.shape(b) and np.allclose(a, b, rtol=1e-9, atol=1e-12)


def _own_noise(H, L, sigma, eps):
    """Fail if H = L + ε' ⊙ σ with an ε' that the learner drew instead of the given eps."""
    if H is None or np.shape(H) != L.shape or L.size < 12:
        return
    with np.errstate(all="ignore"):
        r = (np.asarray(H, dtype=float) - L) / sigma
    if not np.all(np.isfinite(r)) or np.allclose(r, eps, rtol=1e-6, atol=1e-9):
        return
    corr = np.corrcoef(r.ravel(), eps.ravel())[0, 1] if np.std(r) > 0 else 1.0
    if abs(np.mean(r)) < 1.0 and 0.3 < np.std(r) < 3.0 and abs(corr) < 0.5:
        raise Fail("H looks like L + noise ⊙ σ, but not with the ε passed in: you drew your own "
                   "noise. Use the argument eps — the caller draws it, so that the forward, the "
                   "backward and a gradient check all see the same draw.")


@LESSON.exercise("noisy_logits_backward", forbid=[router.router_logits_backward])
def noisy_logits_backward(fn):
    worst = 0.0
    for seed, (T, d, E) in enumerate([(4, 3, 4), (1, 2, 3), (6, 3, 5)]):
        x, Wg, Wn, eps = _inputs(210 + seed, T, d, E)
        dH = np.random.default_rng(220 + seed).standard_normal((T, E))
        z = x @ Wn
        out = call_watching(fn, dH, (x, Wg, Wn, eps, z), name="noisy_logits_backward", labels=("dH", "cache"))
        if not isinstance(out, tuple) or len(out) != 2:
            raise Fail("noisy_logits_backward should return a pair (dx, grads)")
        dx, grads = out
        arrays = {"x": x.copy(), "W_gate": Wg.copy(), "W_noise": Wn.copy()}
        num = numeric_grads(lambda: router.router_logits_forward(
            arrays["x"], arrays["W_gate"], arrays["W_noise"], noise=eps)[0], arrays, dH)
        sig = 1 / (1 + np.exp(-z))
        mistakes = {
            "W_noise": [(x.T @ (dH * eps), "σ = softplus(z), and softplus'(z) = sigmoid(z) = 1/(1 + e^−z): "
                                           "dz = ε ⊙ dH ⊙ sigmoid(z)."),
                        (x.T @ (dH * sig), "The noise term is ε ⊙ σ, so dσ = ε ⊙ dH: you forgot ε."),
                        (x.T @ (dH * eps * router.softplus(z)), "The derivative of softplus is sigmoid(z), "
                                                                "not softplus(z).")],
            "x": [(dH @ Wg.T, "dx is missing the path through the noise: add dz W_noiseᵀ."),
                  (dH @ Wg.T + (dH * eps) @ Wn.T, "On dx's noise path, multiply by sigmoid(z) too.")],
        }
        all_grads = {**grads, "x": dx} if isinstance(grads, dict) else grads
        worst = max(worst, expect_grads(all_grads, num, mistakes=mistakes, names=["W_gate", "W_noise", "x"]))
    def make(T):
        x, Wg, Wn, eps = _inputs(260 + T, T, 3, 4)
        return np.random.default_rng(T).standard_normal((T, 4)), (x, Wg, Wn, eps, x @ Wn)

    def check(out, dH, cache):
        x, Wg, Wn, eps, z = cache
        if not isinstance(out, tuple) or len(out) != 2 or not isinstance(out[1], dict):
            raise Fail("noisy_logits_backward should return a pair (dx, grads)")
        dz = dH * eps / (1 + np.exp(-z))                     # softplus' = sigmoid
        expect_array("dW_gate", out[1].get("W_gate"), x.T @ dH)
        expect_array("dW_noise", out[1].get("W_noise"), x.T @ dz)
        expect_array("dx", out[0], dH @ Wg.T + dz @ Wn.T)
    no_token_loop(fn, "noisy_logits_backward", make, check,
                  "Each weight gradient is one matrix product over all tokens, x.T @ (...).")
    return (f"dx, dW_gate and dW_noise pass the gradient check on 3 random batches "
            f"(worst relative error {worst:.1e}), with no loop over tokens.")


@LESSON.exercise("topk_margin", forbid=[topk_margin_ref])
def topk_margin(fn):
    for seed, (T, E, k) in enumerate([(6, 5, 2), (1, 4, 1), (8, 6, 5), (5, 3, 2)]):
        H = np.random.default_rng(230 + seed).standard_normal((T, E))
        got = call(fn, H, k, name="topk_margin")
        want = topk_margin_ref(H, k)
        s = -np.sort(-H, axis=1)
        g = None if got is None else np.asarray(got, dtype=float)
        ascending = np.sort(H, axis=1)[:, k - 1] - np.sort(H, axis=1)[:, k]
        if g is not None and g.shape == want.shape and np.any(g < 0) and not np.allclose(g, -want) \
                and not np.allclose(g, ascending):
            raise Fail(f"topk_margin returned a negative margin ({float(g.min()):.3g}): the k-th largest "
                       f"score minus the (k+1)-th largest is never negative. Rank from the largest "
                       f"(sort −H) and subtract in that order.")
        expect_array("topk_margin(H, k)", got, want, shape_desc="(T,)", mistakes=[
            (s[:, 0] - s[:, 1], "That is the gap between the 1st and 2nd scores. The one that matters is "
                                "between the k-th (the last chosen) and the (k+1)-th (the first left out)."),
            (-want, "The margin is the k-th largest minus the (k+1)-th largest: it is never negative."),
            (s[:, k] - s[:, k + 1] if k + 1 < E else np.full(T, np.nan),
             "Off by one: with 0-based indexing the k-th largest is sorted[:, k−1]."),
            (s[:, k - 2] - s[:, k - 1] if k >= 2 else np.full(T, np.nan),
             "Off by one: the (k+1)-th largest is sorted[:, k] (0-based)."),
            (np.sort(H, axis=1)[:, k - 1] - np.sort(H, axis=1)[:, k],
             "np.sort sorts ascending; sort −H (or reverse the columns) to rank from the largest."),
        ])
    no_token_loop(fn, "topk_margin", lambda T: (np.random.default_rng(T).standard_normal((T, 6)), 2),
                  lambda out, H, k: expect_array("topk_margin(H, k)", out, topk_margin_ref(H, k)),
                  "Sort every row in one call, -np.sort(-H, axis=1), and subtract two columns.")
    return "the gap between the k-th and (k+1)-th largest score is right for every token (k = 1 to E−1)."
