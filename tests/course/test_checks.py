"""The graders: a blank exercise fails clearly, a right one passes, a typical mistake gets
its targeted hint — for every exercise of lessons 00–04 — plus the framework around them
(verdicts, strict mode, progress, the lesson build)."""
import json
import os

import nbformat
import numpy as np
import pytest

from grader_cases import GraderContract, assert_fail, blank, calling
from minimoe import checks, experts, gradcheck, layers, router
from minimoe.course.checks import build as B
from minimoe.course.checks import compare, grading, lesson00, lesson01, lesson02, lesson03, lesson04, progress


# ----------------------------------------------------------------------------- independent answers
def softmax_rows(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


ANSWERS = {
    # lesson 00
    "bias_variance": lambda P, t: (np.mean((P.mean(0) - t) ** 2), np.mean(((P - P.mean(0)) ** 2).mean(0))),
    "clinic_costs": lambda d, h, E, k: {
        "second opinion": (3 * (2 * d * h + h + d), 12 * d * h),
        "generalist": (2 * d * h + h + d, 4 * d * h),
        "every specialist": (E * (2 * d * h + h + d) + d * E, E * 4 * d * h + 2 * d * E),
        "referral": (E * (2 * d * h + h + d) + d * E, k * 4 * d * h + 2 * d * E)},
    "split_params": lambda tot, act, E, k: (tot - E * (tot - act) / (E - k), (tot - act) / (E - k)),
}


def ffn_fwd(x, W1, b1, W2, b2):
    z = x @ W1 + b1
    a = np.maximum(z, 0)
    return a @ W2 + b2, (x, z, a, W1, W2)


def ffn_bwd(dy, cache, mask=True, bias_mean=False):
    x, z, a, W1, W2 = cache
    da = dy @ W2.T
    dz = da * (z > 0) if mask else da
    red = np.mean if bias_mean else np.sum
    return dz @ W1.T, {"W1": x.T @ dz, "b1": red(dz, axis=0), "W2": a.T @ dy, "b2": red(dy, axis=0)}


def num_grad(f, x, h=1e-5, central=True, restore=True):
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        old = x[i]
        x[i] = old + h
        fp = f()
        if central:
            x[i] = old - h
            fm = f()
            g[i] = (fp - fm) / (2 * h)
        else:
            x[i] = old
            g[i] = (fp - f()) / h
        if restore:
            x[i] = old
    return g


def rel_err(a, n):
    return np.linalg.norm(a - n) / max(np.linalg.norm(a), np.linalg.norm(n), 1e-300)


def swiglu_bwd(dy, cache, silu_prime="full", swap=False, dx_branches=(1, 3), dW2_from="a", itself=None):
    """SwiGLU expert backward, written independently (σ through tanh); the keywords make the
    typical mistakes: silu' as σ alone, as σ(1−σ), at z3 or with a minus inside, the branches
    swapped, a branch multiplied by itself (``itself``: 1 or 3), one branch of dx, dW2 from
    silu(z1) alone."""
    x, z1, z3, W1, W3, W2 = cache
    s = 0.5 * (1 + np.tanh(z1 / 2))                   # σ(z1)
    s3 = 0.5 * (1 + np.tanh(z3 / 2))                  # σ(z3)
    prime = {"full": s + z1 * s * (1 - s), "sigma": s, "sigmoid": s * (1 - s),
             "at_z3": s3 + z3 * s3 * (1 - s3), "minus": s - z1 * s * (1 - s)}[silu_prime]
    da = dy @ W2.T
    dz1, dz3 = da * (z1 if itself == 1 else z3) * prime, da * (z3 if itself == 3 else z1 * s)
    if swap:
        dz1, dz3 = dz3, dz1
    dx = sum({1: dz1 @ W1.T, 3: dz3 @ W3.T}[b] for b in dx_branches)
    a = {"a": z1 * s * z3, "silu": z1 * s}[dW2_from]
    return dx, {"W1": x.T @ dz1, "W3": x.T @ dz3, "W2": a.T @ dy}


def ffn_bwd_token_loop(dy, cache):
    """Right, but the weight gradients summed one token at a time."""
    dx, grads = ffn_bwd(dy, cache)
    x, z, a, W1, W2 = cache
    dW2 = np.zeros_like(W2)
    for t in range(x.shape[0]):
        dW2 += np.outer(a[t], dy[t])
    return dx, {**grads, "W2": dW2}


def swiglu_bwd_token_loop(dy, cache):
    """Right, one token at a time (the lesson asks for matrix products over all tokens)."""
    x, z1, z3, W1, W3, W2 = cache
    parts = [swiglu_bwd(dy[t:t + 1], (x[t:t + 1], z1[t:t + 1], z3[t:t + 1], W1, W3, W2)) for t in range(len(x))]
    return (np.concatenate([p[0] for p in parts]),
            {n: sum(p[1][n] for p in parts) for n in ("W1", "W3", "W2")})


def dense_fwd(x, Wg, W1, b1, W2, b2, weigh=True):
    G = softmax_rows(x @ Wg)
    outs = [experts.ffn_forward(x, W1[e], b1[e], W2[e], b2[e]) for e in range(W1.shape[0])]
    Y = np.stack([o[0] for o in outs])
    y = np.einsum("te,etd->td", G, Y) if weigh else Y.mean(0)
    return y, (x, Wg, G, Y, [o[1] for o in outs])


def dense_bwd(dy, cache, router_path=True):
    x, Wg, G, Y, caches = cache
    dG = np.einsum("td,etd->te", dy, Y)
    dx = np.zeros_like(x)
    gs = []
    for e, c in enumerate(caches):
        dxe, ge = experts.ffn_backward(G[:, e:e + 1] * dy, c)
        dx += dxe
        gs.append(ge)
    dL = G * (dG - (dG * G).sum(1, keepdims=True))
    if router_path:
        dx += dL @ Wg.T
    out = {n: np.stack([g[n] for g in gs]) for n in ("W1", "b1", "W2", "b2")}
    out["W_gate"] = x.T @ dL
    return dx, out


def keep_topk(H, k, smallest=False):
    order = np.argsort(H, axis=1)
    idx = order[:, :k] if smallest else order[:, -k:]
    out = np.full_like(H, -np.inf)
    r = np.arange(H.shape[0])[:, None]
    out[r, idx] = H[r, idx]
    return out


def noisy_fwd(x, Wg, Wn, eps, use_softplus=True):
    z = x @ Wn
    s = np.logaddexp(0, z) if use_softplus else z
    return x @ Wg + eps * s, (x, Wg, Wn, eps, z)


def noisy_bwd(dH, cache, sigmoid=True, noise_path=True):
    x, Wg, Wn, eps, z = cache
    dz = eps * dH * (1 / (1 + np.exp(-z)) if sigmoid else 1.0)
    dx = dH @ Wg.T + (dz @ Wn.T if noise_path else 0)
    return dx, {"W_gate": x.T @ dH, "W_noise": x.T @ dz}


def margin(H, k):
    s = -np.sort(-H, axis=1)
    return s[:, k - 1] - s[:, k]


# (grader, right answer, [(typical mistake, fragment of its hint), ...])
def bias_variance_patient_loop(preds, truth):
    """Right, one patient at a time."""
    b2 = v = 0.0
    for i in range(preds.shape[1]):
        col = preds[:, i]
        b2 += (col.mean() - truth[i]) ** 2 / preds.shape[1]
        v += col.var() / preds.shape[1]
    return b2, v


def swiglu_bwd_in_place(dy, cache):
    """Right gradients, but the cache's z1 overwritten on the way (issue 22: a second call differs)."""
    out = swiglu_bwd(dy, cache)
    z1 = cache[1]
    z1 *= 0.5 * (1 + np.tanh(z1 / 2))                # z1 *= s
    return out


CASES = [
    (lesson00.bias_variance, ANSWERS["bias_variance"], [
        (bias_variance_patient_loop, "grows with the number of"),
        (lambda P, t: (np.mean((P.mean(0) - t) ** 2), np.mean(P.var(1))), "across patients"),
        (lambda P, t: (np.mean((P.mean(0) - t) ** 2), np.mean(P.var(0, ddof=1))), "ddof=1"),
        (lambda P, t: (np.mean(P.mean(0) - t), np.mean(P.var(0))), "forgot to square"),
    ]),
    (lesson00.clinic_costs, ANSWERS["clinic_costs"], [
        (lambda d, h, E, k: {c: (v[0], v[1] if c != "referral" else E * 4 * d * h + 2 * d * E)
                             for c, v in ANSWERS["clinic_costs"](d, h, E, k).items()}, "only k specialists"),
        (lambda d, h, E, k: {c: (v[0], v[1] // 2) for c, v in ANSWERS["clinic_costs"](d, h, E, k).items()},
         "2 FLOPs per multiply-add"),
        (lambda d, h, E, k: {c: (v[0] - (v[0] // (2 * d * h + h + d)) * (h + d), v[1])
                             for c, v in ANSWERS["clinic_costs"](d, h, E, k).items()}, "biases"),
        (lambda d, h, E, k: {c: (v[0], v[1] + {"referral": 2 * k * d, "every specialist": 2 * E * d}.get(c, 0))
                             for c, v in ANSWERS["clinic_costs"](d, h, E, k).items()}, "weighted sum"),
    ]),
    (lesson00.split_params, ANSWERS["split_params"], [
        (lambda tot, act, E, k: (act - 2 * (tot - act) / E, (tot - act) / E), "E − k"),
        (lambda tot, act, E, k: (0.0, tot / E), "shared"),
    ]),
    (lesson01.ffn_forward, ffn_fwd, [
        (lambda x, W1, b1, W2, b2: ((x @ W1 + b1) @ W2 + b2, None), "skipped the activation"),
        (lambda x, W1, b1, W2, b2: (np.maximum(x @ W1 + b1, 0) @ W2, None), "output bias b2"),
        (lambda x, W1, b1, W2, b2: (ffn_fwd(x, W1, b1, W2, b2)[0], (x,)), "cache should be"),
    ]),
    (lesson01.ffn_backward, ffn_bwd, [
        (lambda dy, c: ffn_bwd(dy, c, mask=False), "Wrong gradients for W1, b1 and x. The gradient passes "
                                                   "through the ReLU only where z > 0"),
        (lambda dy, c: ffn_bwd(dy, c, bias_mean=True), "not a mean"),
        (ffn_bwd_token_loop, "grows with the number of tokens"),
        (lambda dy, c: (ffn_bwd(dy, c)[0], {k: v for k, v in ffn_bwd(dy, c)[1].items() if k != "b2"}),
         "missing ['b2']"),
        (lambda dy, c: (-ffn_bwd(dy, c)[0], ffn_bwd(dy, c)[1]), "dx has the wrong sign"),
        (lambda dy, c: (ffn_bwd(dy, c)[0], {**ffn_bwd(dy, c)[1], "W1": ffn_bwd(dy, c)[1]["W1"].T}),
         "looks transposed"),
    ]),
    (lesson01.numerical_gradient, num_grad, [
        (lambda f, x, h=1e-5: num_grad(f, x, h, central=False), "one-sided"),
        (lambda f, x, h=1e-5: num_grad(f, x, h, restore=False), "x was changed"),
        (lambda f, x, h=1e-5: 2 * num_grad(f, x, h), "factor of 2"),
        (lambda f, x, h=1e-5: np.array([0.0]), "any shape"),
        (lambda f, x, h=1e-5: num_grad(f, x, h / 10) * 0 + num_grad(f, x, h) / 2, "factor of 1/2"),
    ]),
    (lesson01.rel_error, rel_err, [
        (lambda a, n: np.linalg.norm(a - n) / np.linalg.norm(n), "not by ‖n‖ alone"),
        (lambda a, n: np.linalg.norm(a - n), "absolute error"),
    ]),
    (lesson01.swiglu_backward, swiglu_bwd, [
        (lambda dy, c: swiglu_bwd(dy, c, silu_prime="sigma"), "Wrong gradients for W1 and x. silu'(z) = σ(z) "
                                                              "(1 + z (1 − σ(z))) has two terms"),
        (lambda dy, c: swiglu_bwd(dy, c, silu_prime="sigmoid"), "the sigmoid's derivative"),
        (lambda dy, c: swiglu_bwd(dy, c, silu_prime="at_z3"), "silu'(z1), at the silu branch's own"),
        (lambda dy, c: swiglu_bwd(dy, c, silu_prime="minus"), "1 + z (1 − σ(z))"),
        (lambda dy, c: swiglu_bwd(dy, c, itself=1), "the *other* branch"),
        (lambda dy, c: swiglu_bwd(dy, c, itself=3), "not its own z3"),
        (lambda dy, c: swiglu_bwd(dy, c, swap=True), "Wrong gradients for W1, W3 and x. The branches are swapped"),
        (lambda dy, c: swiglu_bwd(dy, c, dx_branches=(1,)), "Wrong gradient for x. x feeds both branches"),
        (lambda dy, c: swiglu_bwd(dy, c, dx_branches=(3,)), "x feeds both branches"),
        (lambda dy, c: swiglu_bwd(dy, c, dW2_from="silu"), "Wrong gradient for W2. dW2 = aᵀ dy with "
                                                           "a = silu(z1) ⊙ z3"),
        (lambda dy, c: (swiglu_bwd(dy, c)[0], {**swiglu_bwd(dy, c)[1], "W3": swiglu_bwd(dy, c)[1]["W3"].T}),
         "Wrong gradient for W3. It has shape (7, 4), expected (4, 7): it looks transposed"),
        (lambda dy, c: (swiglu_bwd(dy, c)[0], {k: v for k, v in swiglu_bwd(dy, c)[1].items() if k != "W3"}),
         "missing ['W3']"),
        (lambda dy, c: swiglu_bwd(dy, c)[1], "should return a pair (dx, grads)"),
    ]),
    (lesson02.softmax, softmax_rows, [
        (lambda z: np.exp(z) / np.exp(z).sum(-1, keepdims=True), "Subtract each row's maximum"),
        (lambda z: softmax_rows(z.T).T, "Normalise each row"),
    ]),
    (lesson02.softmax_backward, lambda dp, p: p * (dp - (dp * p).sum(-1, keepdims=True)), [
        (lambda dp, p: p * (dp - (dp * p).sum(0, keepdims=True)), "not over the tokens (axis=0)"),
        (lambda dp, p: p * (1 - p) * dp, "Off on the diagonal"),
        (lambda dp, p: p * dp, "only the diagonal of the Jacobian"),
        (lambda dp, p: p * (dp - (dp * p).sum()), "one number *per token*"),
    ]),
    (lesson02.dense_moe_forward, dense_fwd, [
        (lambda *a: dense_fwd(*a, weigh=False), "averaged the experts equally"),
    ]),
    (lesson02.dense_moe_backward, dense_bwd, [
        (lambda dy, c: dense_bwd(dy, c, router_path=False), "path through the GP"),
        (lambda dy, c: (dense_bwd(dy, c)[0], {**dense_bwd(dy, c)[1], "W_gate": dense_bwd(dy, c)[1]["W_gate"].T}),
         "transposed"),
        (lambda dy, c: (dense_bwd(dy, c)[0], {**dense_bwd(dy, c)[1], "W1": 2 * dense_bwd(dy, c)[1]["W1"]}),
         "constant factor: yours = 2"),
    ]),
    (lesson03.keep_topk, keep_topk, [
        (lambda H, k: keep_topk(H, k, smallest=True), "*smallest*"),
        (lambda H, k: np.where(np.isfinite(keep_topk(H, k)), H, 0.0), "not 0"),
    ]),
    (lesson03.renormalized_gate, lambda H, k: softmax_rows(keep_topk(H, k)), [
        (lambda H, k: softmax_rows(H) * np.isfinite(keep_topk(H, k)), "Switch gate"),
    ]),
    (lesson03.topk_gate_backward, lambda dG, G: G * (dG - (dG * G).sum(1, keepdims=True)), [
        (lambda dG, G: G * dG, "diagonal"),
        (lambda dG, G: dG - (dG * G).sum(1, keepdims=True), "Multiply by G"),
        (lambda dG, G: G * (dG - (dG * G).sum(0, keepdims=True)), "not over the tokens (axis=0)"),
        (lambda dG, G: 2 * G * (dG - (dG * G).sum(1, keepdims=True)), "constant factor: yours = 2"),
    ]),
    (lesson03.switch_gate_backward,
     lambda dG, p, m: p * (dG * m - (dG * m * p).sum(1, keepdims=True)), [
        (lambda dG, p, m: p * (dG - (dG * p).sum(1, keepdims=True)), "Mask the upstream"),
        (lambda dG, p, m: p * (dG * m - (dG * m * p).sum(0, keepdims=True)), "not over the tokens (axis=0)"),
        (lambda dG, p, m: 2 * p * (dG * m - (dG * m * p).sum(1, keepdims=True)), "constant factor: yours = 2"),
    ]),
    (lesson04.softplus, lambda z: np.logaddexp(0, z), [
        (lambda z: np.log(1 + np.exp(z)), "overflowed"),
        (lambda z: np.maximum(z, 0), "That is relu"),
    ]),
    (lesson04.noisy_logits_forward, noisy_fwd, [
        (lambda *a: noisy_fwd(*a, use_softplus=False), "must be positive"),
        (lambda x, Wg, Wn, eps: noisy_fwd(x, Wg, Wn, np.random.default_rng(1).standard_normal(eps.shape)),
         "you drew your own noise"),
        (lambda x, Wg, Wn, eps: (noisy_fwd(x, Wg, Wn, eps)[0], (x, Wn, Wg, eps, x @ Wn)), "swapped"),
    ]),
    (lesson04.noisy_logits_backward, noisy_bwd, [
        (lambda dH, c: noisy_bwd(dH, c, sigmoid=False), "sigmoid"),
        (lambda dH, c: noisy_bwd(dH, c, noise_path=False), "path through the noise"),
    ]),
    (lesson04.topk_margin, margin, [
        (lambda H, k: -margin(H, k), "never negative"),
        (lambda H, k: np.sort(H, 1)[:, k - 1] - np.sort(H, 1)[:, k], "np.sort sorts ascending"),
        (lambda H, k: -np.diff(-np.sort(-H, 1)[:, :2], axis=1)[:, 0], "1st and 2nd"),
    ]),
]


def ffn_fwd_token_loop(x, W1, b1, W2, b2):
    """Right, one token at a time (the lesson asks for one matrix product)."""
    rows = [ffn_fwd(x[t:t + 1], W1, b1, W2, b2) for t in range(x.shape[0])]
    z = np.concatenate([r[1][1] for r in rows])
    return np.concatenate([r[0] for r in rows]), (x, z, np.maximum(z, 0), W1, W2)


def dense_fwd_token_loop(x, Wg, W1, b1, W2, b2):
    """Right, but a Python loop over the tokens (the lesson: loop over experts, never tokens)."""
    y, cache = dense_fwd(x, Wg, W1, b1, W2, b2)
    G, Y = cache[2], cache[3]
    out = np.zeros_like(y)
    for t in range(x.shape[0]):
        out[t] = G[t] @ Y[:, t]
    return out, cache


def dense_bwd_token_loop(dy, cache):
    dx, grads = dense_bwd(dy, cache)
    x, Wg, G, Y, caches = cache
    dWg = np.zeros_like(Wg)
    for t in range(x.shape[0]):                       # the router's gradient token by token
        dG = Y[:, t] @ dy[t]
        dL = G[t] * (dG - dG @ G[t])
        dWg += np.outer(x[t], dL)
    return dx, {**grads, "W_gate": dWg}


def softmax_row_loop(z):
    return np.stack([softmax_rows(row[None])[0] for row in z])


def softmax_only_first_shape(z):
    """Right for a (5, 3) input only: 'normalises' over a hard-coded axis length."""
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / (e.sum(-1, keepdims=True) if z.shape == (5, 3) else e.sum(-1, keepdims=True)[:1])


def row_by_row(fn):
    """``fn`` applied one token (row) at a time to every array argument whose first axis is T:
    the right numbers, with a Python loop over tokens."""
    def looped(*args):
        T = next(a.shape[0] for a in args if isinstance(a, np.ndarray) and a.ndim == 2)
        rows = [fn(*[a[t:t + 1] if isinstance(a, np.ndarray) and a.ndim >= 1 and a.shape[0] == T else a
                     for a in args]) for t in range(T)]
        first = rows[0]
        if isinstance(first, tuple):
            return tuple(np.concatenate([r[i] for r in rows]) if isinstance(first[i], np.ndarray) else first[i]
                         for i in range(len(first)))
        return np.concatenate(rows)
    return looped


def noisy_bwd_loop(dH, cache):
    dx, grads = noisy_bwd(dH, cache)
    x = cache[0]
    dWg = np.zeros_like(grads["W_gate"])
    for t in range(x.shape[0]):                     # the outer products one token at a time
        dWg += np.outer(x[t], dH[t])
    return dx, {**grads, "W_gate": dWg}


class TestGraders(GraderContract):
    LESSONS = (lesson00.LESSON, lesson01.LESSON, lesson02.LESSON, lesson03.LESSON, lesson04.LESSON)
    CASES = CASES
    # the clinic costs are integers: their near misses are a float off by 1e-6, and 2 doctors
    NO_GENERIC_NEAR_MISS = ("clinic_costs", "keep_topk")
    NEAR_MISSES = {
        "clinic_costs": [
            (lambda d, h, E, k: {c: (p * (1 + 1e-6), f * (1 + 1e-6))
                                 for c, (p, f) in ANSWERS["clinic_costs"](d, h, E, k).items()}, None),
            (lambda d, h, E, k: {**ANSWERS["clinic_costs"](d, h, E, k),
                                 "second opinion": (2 * (2 * d * h + h + d), 8 * d * h)}, "3 cardiologists"),
        ],
        # keep_topk: the kept scores must be H's own, exactly (not allclose); -inf elsewhere
        "keep_topk": [(lambda H, k: np.where(np.isfinite(keep_topk(H, k)), H * (1 + 1e-12), -np.inf),
                       "exactly unchanged"),
                      (lambda H, k: np.where(np.isfinite(keep_topk(H, k)), H * (1 + 1e-6), -np.inf),
                       "exactly unchanged")],
        # numerical_gradient: x must be restored exactly (x[i] -= h is only allclose)
        "numerical_gradient": [(lambda f, x, h=1e-5: _num_grad_undo(f, x, h), "*exactly*")],
        # a softplus that loses the tail digits (log of 1 + e^z, not log1p)
        "softplus": [(lambda z: np.maximum(z, 0) + np.log(1 + np.exp(-np.abs(z))), "keeps those digits"),
                     (lambda z: np.where(z > 3, z, np.log1p(np.exp(np.minimum(z, 3)))), None)],
        "softmax": [(softmax_only_first_shape, None)],
    }
    RULE_BREAKING = {
        "clinic_costs": [(lambda d, h, E, k: calling(lambda *a: lesson00.ffn_cost(d, h), ANSWERS["clinic_costs"])(
            d, h, E, k), "you called `minimoe.course.checks.lesson00.ffn_cost`")],
        "ffn_forward": [(ffn_fwd_token_loop, "grows with the number of tokens")],
        "swiglu_backward": [(swiglu_bwd_token_loop, "grows with the number of tokens")],
        "softmax": [(softmax_row_loop, "loop over tokens"),
                    (lambda z: layers.softmax(z), "you called `minimoe.core.layers.softmax`"),
                    (layers.softmax, "you called `minimoe.core.layers.softmax`")],
        "dense_moe_forward": [(dense_fwd_token_loop, "grows with the number of tokens")],
        "dense_moe_backward": [(dense_bwd_token_loop, "grows with the number of tokens")],
        "softmax_backward": [(row_by_row(lambda dp, p: p * (dp - (dp * p).sum(-1, keepdims=True))),
                              "grows with the number of tokens")],
        "keep_topk": [(row_by_row(keep_topk), "grows with the number of tokens")],
        "renormalized_gate": [(row_by_row(lambda H, k: softmax_rows(keep_topk(H, k))), "grows with the number")],
        "topk_gate_backward": [(row_by_row(lambda dG, G: G * (dG - (dG * G).sum(1, keepdims=True))),
                                "grows with the number of tokens")],
        "switch_gate_backward": [(row_by_row(lambda dG, p, m: p * (dG * m - (dG * m * p).sum(1, keepdims=True))),
                                  "grows with the number of tokens")],
        "softplus": [(lambda z: np.array([np.logaddexp(0, row) for row in z]) if np.ndim(z) == 2
                      else np.logaddexp(0, z), "grows with the number of tokens")],
        "noisy_logits_backward": [(noisy_bwd_loop, "grows with the number of tokens")],
        "topk_margin": [(row_by_row(margin), "grows with the number of tokens")],
        "noisy_logits_forward": [
            (lambda x, Wg, Wn, eps: (row_by_row(lambda *a: noisy_fwd(*a)[0])(x, Wg, Wn, eps),
                                     noisy_fwd(x, Wg, Wn, eps)[1]), "grows with the number of tokens"),
            (lambda x, Wg, Wn, eps: calling(lambda *a: router.router_logits_forward(x, Wg, Wn, noise=eps),
                                            noisy_fwd)(x, Wg, Wn, eps),
             "you called `minimoe.core.router.router_logits_forward`")],
        "numerical_gradient": [
            (lambda f, x, h=1e-5: gradcheck.numerical_gradient(f, x, h),
             "you called `minimoe.core.gradcheck.numerical_gradient`")],
    }


def _num_grad_undo(f, x, h):
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        x[i] += h
        fp = f()
        x[i] -= 2 * h
        fm = f()
        x[i] += h                                   # not exact: x + h - 2h + h != x in floats
        g[i] = (fp - fm) / (2 * h)
    return g


# ----------------------------------------------------------------------------- the framework
def test_verdict_is_printed_and_recorded(capsys):
    checks.reset()
    res = lesson04.softplus(lambda z: np.logaddexp(0, z))
    out = capsys.readouterr().out
    assert out.startswith("✔ 04.softplus — ")
    assert checks.results()["04.softplus"] == res
    lesson04.softplus(blank)
    assert checks.results()["04.softplus"].passed is False


def test_strict_mode_raises_for_nbgrader(monkeypatch):
    monkeypatch.setenv("MINIMOE_STRICT", "1")
    with pytest.raises(AssertionError, match="✘ 04.softplus"):
        lesson04.softplus(blank)
    assert lesson04.softplus(lambda z: np.logaddexp(0, z)).passed     # a pass never raises
    monkeypatch.setenv("MINIMOE_STRICT", "0")
    assert not lesson04.softplus(blank).passed


@pytest.mark.parametrize("execution", ["autograde", "validate"])
def test_graders_are_strict_by_themselves_under_nbgrader(monkeypatch, execution):
    """nbgrader sets NBGRADER_EXECUTION while it runs a notebook: no MINIMOE_STRICT needed."""
    monkeypatch.delenv("MINIMOE_STRICT", raising=False)
    monkeypatch.delenv("NBGRADER_EXECUTION", raising=False)
    assert not grading.strict() and not lesson04.softplus(blank).passed    # a learner's session
    monkeypatch.setenv("NBGRADER_EXECUTION", execution)
    assert grading.strict()
    with pytest.raises(AssertionError, match="✘ 04.softplus"):
        lesson04.softplus(blank)
    assert lesson04.softplus(lambda z: np.logaddexp(0, z)).passed
    for lower in ("0", "off", "false"):        # an answer cell cannot make nbgrader's kernel lenient
        monkeypatch.setenv("MINIMOE_STRICT", lower)
        assert grading.strict()
        with pytest.raises(AssertionError, match="✘ 04.softplus"):
            lesson04.softplus(blank)


def test_in_place_change_of_an_input_is_caught():
    def sneaky(z):
        z -= z.max(axis=-1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=-1, keepdims=True)
    assert_fail(lesson02.softmax(sneaky), "in place")


def test_passing_the_result_instead_of_the_function():
    assert_fail(lesson04.softplus(np.zeros(3)), "pass the function itself")


def test_expect_array_diagnoses():
    want = np.arange(6.0).reshape(2, 3) + 1
    with pytest.raises(grading.Fail, match="transposed"):
        compare.expect_array("y", want.T, want)
    with pytest.raises(grading.Fail, match="off by the same constant 2"):
        compare.expect_array("y", want + 2, want)
    with pytest.raises(grading.Fail, match="constant factor: yours = 3"):
        compare.expect_array("y", 3 * want, want)
    with pytest.raises(grading.Fail, match="wrong sign"):
        compare.expect_array("y", -want, want)
    with pytest.raises(grading.Fail, match=r"shape \(3,\), expected \(2, 3\) = \(T, d\)"):
        compare.expect_array("y", np.ones(3), want, shape_desc="(T, d)")
    with pytest.raises(grading.Fail, match="NaN or inf"):
        compare.expect_array("y", np.where(want > 3, np.nan, want), want)
    bad = want.copy()
    bad[1, 2] += 0.5
    with pytest.raises(grading.Fail, match=r"worst at index \[1, 2\]"):
        compare.expect_array("y", bad, want)
    assert compare.expect_array("y", want + 1e-12, want) < 1e-11


def test_expect_grads_names_the_wrong_parameter_and_the_right_ones():
    num = {"W": np.ones((2, 2)), "b": np.ones(2)}
    with pytest.raises(grading.Fail, match=r"Wrong gradient for W\. W fails the gradient check with "
                                           r"relative error 2\.5e-01.*\(b is right\.\)"):
        compare.expect_grads({"W": np.array([[0.5, 1.0], [1.0, 1.0]]), "b": np.ones(2)}, num)
    with pytest.raises(grading.Fail, match=r"W is off by a constant factor: yours = 0\.5 .*\(b is right\.\)"):
        compare.expect_grads({"W": 0.5 * np.ones((2, 2)), "b": np.ones(2)}, num)
    with pytest.raises(grading.Fail, match=r"missing \['b'\]"):
        compare.expect_grads({"W": np.ones((2, 2))}, num)
    with pytest.raises(grading.Fail, match="shape"):
        compare.expect_grads({"W": np.ones(4), "b": np.ones(2)}, num)


def test_progress_table_counts_this_lesson(capsys):
    checks.reset()
    lesson04.softplus(lambda z: np.logaddexp(0, z))
    lesson04.topk_margin(blank)
    capsys.readouterr()
    assert lesson04.progress() == (1, 4)
    out = capsys.readouterr().out
    assert "✔ softplus" in out and "✘ topk_margin" in out and "· noisy_logits_forward" in out
    assert "1/4 exercises passed" in out


# ----------------------------------------------------------------------------- reading notebooks
def _nb_with(results):
    nb = nbformat.v4.new_notebook()
    for r in results:
        cell = nbformat.v4.new_code_cell("check.x(x)")
        cell.outputs = [nbformat.v4.new_output("display_data", data={"text/plain": "…"},
                                               metadata={grading.METADATA_KEY: r})]
        nb.cells.append(cell)
    return nb


def test_progress_report_reads_saved_verdicts(tmp_path, capsys):
    from minimoe.course.checks.__main__ import main
    done = _nb_with([{"lesson": "04", "exercise": n, "passed": True, "message": ""}
                     for n in lesson04.LESSON.exercises])
    half = _nb_with([{"lesson": "01", "exercise": "ffn_forward", "passed": True, "message": ""},
                     {"lesson": "01", "exercise": "ffn_backward", "passed": False, "message": ""}])
    nbformat.write(done, tmp_path / "04_a_noisy_gp.ipynb")
    nbformat.write(half, tmp_path / "01_the_specialist.ipynb")
    nbformat.write(nbformat.v4.new_notebook(), tmp_path / "02_the_gp.ipynb")
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    n01 = len(lesson01.LESSON.exercises)                   # 5: forward, backward, checker, rel_error, SwiGLU
    assert "01 The specialist" in out and f"1/{n01}" in out and "next: ffn_backward" in out
    assert "02 The GP" in out and "not run yet" in out
    assert "04 A noisy GP" in out and "complete" in out
    n02, n04 = len(lesson02.LESSON.exercises), len(lesson04.LESSON.exercises)
    assert f"{n04 + 1}/{n01 + n02 + n04} exercises passed" in out   # all of 04, one of 01, none of 02


def test_summarize_keeps_the_latest_verdict():
    nb = _nb_with([{"lesson": "04", "exercise": "softplus", "passed": False, "message": ""},
                   {"lesson": "04", "exercise": "softplus", "passed": True, "message": ""}])
    lesson, rows = progress.summarize("04_a_noisy_gp.ipynb", nb)
    assert lesson.number == "04" and dict(rows)["softplus"] is True and dict(rows)["topk_margin"] is None


# ----------------------------------------------------------------------------- the build
def test_strip_solutions_keeps_indentation_and_code_around():
    src = "def f(x):\n    y = 1\n    ### BEGIN SOLUTION\n    return x + y\n    ### END SOLUTION\n# after"
    assert B.strip_solutions(src) == ("def f(x):\n    y = 1\n    # YOUR CODE HERE\n"
                                      "    raise NotImplementedError()\n# after")
    assert B.strip_solutions("### BEGIN SOLUTION\nanswer\n### END SOLUTION", "markdown") == "YOUR ANSWER HERE"


@pytest.mark.parametrize("src,msg", [
    ("### BEGIN SOLUTION\nx = 1", "never closed"),
    ("x = 1\n### END SOLUTION", "without a"),
    ("### BEGIN SOLUTION\n### BEGIN SOLUTION\n### END SOLUTION", "inside another"),
    ("x = 1  ### BEGIN SOLUTION", "alone on its line"),
])
def test_unbalanced_markers_are_rejected(src, msg):
    with pytest.raises(ValueError, match=msg):
        B.strip_solutions(src, where="lesson.py, cell 3")


def test_text_answer_must_be_a_whole_cell():
    with pytest.raises(ValueError, match="single solution region"):
        B.strip_solutions("Question?\n### BEGIN SOLUTION\nanswer\n### END SOLUTION", "markdown")


def test_build_writes_student_and_solution_with_nbgrader_metadata(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "07_demo.py").write_text(
        "# %% [markdown]\n# # Demo\n\n# %%\ndef f(x):\n    ### BEGIN SOLUTION\n    return 2 * x\n"
        "    ### END SOLUTION\n\n\n# %%\ncheck.f(f)\n\n# %% [markdown]\n# ### BEGIN SOLUTION\n"
        "# secret answer\n# ### END SOLUTION\n")
    assert len(B.build(tmp_path)) == 2
    assert B.build(tmp_path, check=True) == []                      # a rebuild changes nothing
    student = json.loads((tmp_path / "07_demo.ipynb").read_text())
    solution = json.loads((tmp_path / "solutions" / "07_demo.ipynb").read_text())
    s_text = json.dumps(student)
    assert "2 * x" not in s_text and "secret answer" not in s_text and "BEGIN SOLUTION" not in s_text
    assert "raise NotImplementedError()" in s_text and "YOUR ANSWER HERE" in s_text
    assert "return 2 * x" in json.dumps(solution) and "secret answer" in json.dumps(solution)
    meta = [c["metadata"].get("nbgrader", {}) for c in solution["cells"]]
    assert meta[1]["solution"] and not meta[1]["grade"] and meta[1]["grade_id"] == "ex-f"
    assert meta[2]["grade"] and meta[2]["locked"] and meta[2]["points"] == 1
    assert meta[3]["solution"] and meta[3]["grade"]
    assert [c["id"] for c in student["cells"]] == [c["id"] for c in solution["cells"]]
    (tmp_path / "src" / "07_demo.py").write_text("# %%\nx = 1\n")
    assert len(B.build(tmp_path, check=True)) == 2                  # stale builds are reported


# ----------------------------------------------------------------------------- the command line
def test_help_lists_every_subcommand(capsys):
    from minimoe.course.checks.__main__ import main
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for command in ("start [DIR]", "build [--check]", "nbgrader DIR", "[PATH ...] [--run]"):
        assert f"python -m minimoe.checks {command}" in out, command


def test_progress_names_the_files_and_counts_copies_of_a_lesson_once(tmp_path, capsys):
    from minimoe.course.checks.__main__ import main
    one = _nb_with([{"lesson": "01", "exercise": "ffn_forward", "passed": True, "message": ""}])
    two = _nb_with([{"lesson": "01", "exercise": n, "passed": True, "message": ""}
                    for n in ("ffn_forward", "ffn_backward")])
    nbformat.write(one, tmp_path / "01_the_specialist.ipynb")
    nbformat.write(two, tmp_path / "01_the_specialist-Copy1.ipynb")
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "01 The specialist" in line]
    assert len(lines) == 2
    n01 = len(lesson01.LESSON.exercises)
    assert lines[0].rstrip().endswith("01_the_specialist-Copy1.ipynb") and f"2/{n01}" in lines[0]
    assert lines[1].rstrip().endswith("01_the_specialist.ipynb") and f"1/{n01}" in lines[1]
    assert f"2/{n01} exercises passed" in out, "the total counts the lesson once, its best copy"
    assert "lesson 01 has 2 copies" in out


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_progress_names_a_corrupt_notebook_and_still_reports_the_others(tmp_path, capsys, damage):
    from minimoe.course.checks.__main__ import main
    good = _nb_with([{"lesson": "04", "exercise": "softplus", "passed": True, "message": ""}])
    nbformat.write(good, tmp_path / "04_a_noisy_gp.ipynb")
    text = nbformat.writes(good)
    bad = {"truncated": text[: len(text) // 2], "garbage": "not a notebook", "empty": ""}[damage]
    (tmp_path / "02_the_gp.ipynb").write_text(bad)
    assert main([str(tmp_path)]) == 1                      # the problem shows in the exit status
    out = capsys.readouterr().out
    assert "04 A noisy GP" in out and "1/4" in out         # the others are still reported
    assert "✘ 02_the_gp.ipynb: could not read this notebook" in out and "truncated" in out


def test_build_check_with_no_sources_fails(tmp_path, capsys):
    from minimoe.course.checks.__main__ import main
    assert main(["build", "--check", "--lessons", str(tmp_path / "lesons")]) == 2
    captured = capsys.readouterr()
    assert "up to date" not in captured.out
    assert "no lesson sources in" in captured.err and "lesons" in captured.err
    with pytest.raises(FileNotFoundError, match="no lesson sources"):
        B.build(tmp_path)


def test_start_copies_the_student_notebooks_and_never_overwrites(tmp_path, monkeypatch, capsys):
    from minimoe.course.checks import workspace
    from minimoe.course.checks.__main__ import main
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my-lessons").mkdir()
    mine = tmp_path / "my-lessons" / "00_the_clinic.ipynb"
    mine.write_text("my answers")
    assert main(["start"]) == 0
    names = sorted(p.name for p in (tmp_path / "my-lessons").iterdir())
    sources = sorted(p.stem + ".ipynb" for p in B.lesson_sources(B.default_lessons_dir()))
    assert names == sources and len(names) >= 11        # every lesson, found by glob
    assert mine.read_text() == "my answers", "an existing file is never overwritten"
    for p in (tmp_path / "my-lessons").iterdir():
        if p != mine:
            text = p.read_text()
            assert "BEGIN SOLUTION" not in text and "raise NotImplementedError()" in text
    out = capsys.readouterr().out
    assert "kept 1 notebook(s)" in out and "00_the_clinic.ipynb" in out
    copied, kept = workspace.start(tmp_path / "my-lessons")      # a second run copies nothing
    assert copied == [] and len(kept) == len(names)
    # the progress report's default folder is ./my-lessons
    assert main([]) == 1 and "00_the_clinic.ipynb: could not read" in capsys.readouterr().out


def test_commands_that_need_a_clone_say_so(monkeypatch, tmp_path, capsys):
    from minimoe.course.checks.__main__ import main
    monkeypatch.setattr(B, "repository_root", lambda: None)
    monkeypatch.chdir(tmp_path)
    assert main(["build", "--check"]) == 2
    assert "only a clone of the repository has" in capsys.readouterr().err
    assert main(["nbgrader", str(tmp_path / "course")]) == 2
    assert "only a clone" in capsys.readouterr().err
    assert main([]) == 2
    assert "python -m minimoe.checks start" in capsys.readouterr().err


def test_nbgrader_course_directory(tmp_path):
    from minimoe.course.checks.__main__ import main
    assert main(["nbgrader", str(tmp_path)]) == 0
    stems = [s.stem for s in B.lesson_sources(B.default_lessons_dir())]
    assert sorted(p.name for p in (tmp_path / "source").iterdir()) == stems
    for stem in stems:
        nb = json.loads((tmp_path / "source" / stem / f"{stem}.ipynb").read_text())
        assert "BEGIN SOLUTION" in json.dumps(nb), "nbgrader's source notebooks carry the solutions"
    config = (tmp_path / "nbgrader_config.py").read_text()
    assert "c.Execute.timeout = 300" in config and 'course_id = "minimoe"' in config   # 10x the slowest cell


# ----------------------------------------------------------------------------- issue 21: arguments up front
@pytest.mark.parametrize("where, msg", [
    ("", "argument DIR: is empty: give a folder, e.g. my-lessons"),
    ("   ", "argument DIR: is empty"),
    ("FILE/sub", "DIR 'FILE/sub' is inside 'FILE', a file"),
    ("FILE", "DIR 'FILE' exists and is not a directory"),
    ("/proc/minimoe-lessons", "DIR '/proc/minimoe-lessons' cannot be created"),
])
def test_start_refuses_a_folder_it_cannot_use_and_copies_nothing(tmp_path, monkeypatch, capsys, where, msg):
    from minimoe.course.checks.__main__ import main
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("x")
    where, msg = (s.replace("FILE", str(tmp_path / "a_file")) for s in (where, msg))
    with pytest.raises(SystemExit) as exc:
        main(["start", where])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err and "python -m minimoe.checks start: error:" in err
    assert os.listdir(tmp_path) == ["a_file"]                    # nothing copied anywhere


def test_start_leaves_no_half_written_notebook(tmp_path, monkeypatch):
    from minimoe.course.checks import workspace
    real = os.fdopen

    def failing_fdopen(fd, *a, **kw):                # the disk fills up in the middle of the 3rd notebook
        f = real(fd, *a, **kw)
        failing_fdopen.n += 1
        if failing_fdopen.n == 3:
            f.write = lambda text: (_ for _ in ()).throw(OSError(28, "No space left on device"))
        return f
    failing_fdopen.n = 0
    monkeypatch.setattr(workspace.os, "fdopen", failing_fdopen)
    with pytest.raises(OSError, match="No space left"):
        workspace.start(tmp_path / "mine")
    names = sorted(p.name for p in (tmp_path / "mine").iterdir())
    assert len(names) == 2 and all(n[:2].isdigit() for n in names)    # two whole ones, no partial, no temp
    monkeypatch.setattr(workspace.os, "fdopen", real)
    copied, kept = workspace.start(tmp_path / "mine")                  # a rerun completes the set
    assert len(kept) == 2 and len(copied) >= 9


def test_start_never_writes_over_a_file_that_appears_meanwhile(tmp_path):
    from minimoe.course.checks import workspace
    target = tmp_path / "00_x.ipynb"
    assert workspace._write_new(target, "fresh") is True and target.read_text() == "fresh"
    assert workspace._write_new(target, "other") is False            # e.g. made by a second `start` in a race
    assert target.read_text() == "fresh" and os.listdir(tmp_path) == ["00_x.ipynb"]


@pytest.mark.parametrize("timeout", ["0", "-5", "1.5", "soon"])
def test_nbgrader_timeout_must_be_a_positive_whole_number(tmp_path, capsys, timeout):
    from minimoe.course.checks.__main__ import main
    with pytest.raises(SystemExit) as exc:
        main(["nbgrader", str(tmp_path / "course"), "--timeout", timeout])
    assert exc.value.code == 2
    assert f"argument --timeout: expected a whole number >= 1, got '{timeout}'" in capsys.readouterr().err
    assert not (tmp_path / "course").exists()


def test_write_course_checks_the_timeout_too(tmp_path):
    from minimoe.course.checks.nbgrader_course import write_course
    for bad, err in ((0, ValueError), (-1, ValueError), (2.5, TypeError), (True, TypeError)):
        with pytest.raises(err, match="timeout"):
            write_course(tmp_path / "course", timeout=bad)
    assert not (tmp_path / "course").exists()


@pytest.mark.parametrize("where, msg", [
    ("", "argument DIR: is empty: give a folder"),
    ("FILE/sub", "DIR 'FILE/sub' is inside 'FILE', a file"),
])
def test_nbgrader_refuses_a_folder_it_cannot_use(tmp_path, capsys, where, msg):
    from minimoe.course.checks.__main__ import main
    (tmp_path / "a_file").write_text("x")
    where, msg = (s.replace("FILE", str(tmp_path / "a_file")) for s in (where, msg))
    with pytest.raises(SystemExit) as exc:
        main(["nbgrader", where])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err


def test_build_refuses_an_empty_lessons_folder_name(capsys):
    from minimoe.course.checks.__main__ import main
    with pytest.raises(SystemExit) as exc:
        main(["build", "--check", "--lessons", ""])
    assert exc.value.code == 2 and "argument --lessons: is empty" in capsys.readouterr().err


@pytest.mark.parametrize("bad", [{"lesson": "04", "passed": True, "message": ""},             # no exercise
                                 {"lesson": "04", "exercise": "topk_margin", "message": ""},   # no verdict
                                 "not a dict"])
def test_a_verdict_without_its_fields_is_skipped_and_named(tmp_path, capsys, bad):
    from minimoe.course.checks.__main__ import main
    nb = _nb_with([{"lesson": "04", "exercise": "softplus", "passed": True, "message": ""}, bad])
    nbformat.write(nb, tmp_path / "04_a_noisy_gp.ipynb")
    lesson, rows = progress.summarize("04_a_noisy_gp.ipynb", nb)
    assert lesson.number == "04" and [n for n, _ in rows] == list(lesson04.LESSON.exercises)
    assert [p for n, p in rows] == [n == "softplus" or None for n, _ in rows]   # the readable one counts
    assert progress.unreadable_verdicts(nb) == 1
    assert main([str(tmp_path)]) == 0                        # the notebook itself is fine
    out = capsys.readouterr().out
    assert "04 A noisy GP" in out and "1/4" in out and "truncated" not in out
    assert "04_a_noisy_gp.ipynb: 1 saved verdict could not be read (no exercise name or result) and was skipped" in out


def test_a_mistyped_command_gets_a_hint(tmp_path, monkeypatch, capsys):
    from minimoe.course.checks.__main__ import main
    monkeypatch.chdir(tmp_path)
    assert main(["strat"]) == 1
    assert "did you mean `python -m minimoe.checks start`?" in capsys.readouterr().out


def test_a_swiglu_backward_that_overwrites_its_cache_fails():
    res = lesson01.swiglu_backward(swiglu_bwd_in_place)
    assert_fail(res, "changed cache[1] in place", "twice")
