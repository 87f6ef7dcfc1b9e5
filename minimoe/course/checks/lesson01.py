"""Graders for lesson 01, *The specialist*: the FFN expert, its backward, gradient checking,
and the SwiGLU expert's backward.

References: :func:`minimoe.core.experts.ffn_forward` / ``ffn_backward`` (``activation="swiglu"``
for SwiGLU) and :mod:`minimoe.core.gradcheck`. Backward graders compare with *finite differences* of the
reference forward (a real gradient check), so their verdict does not rest on
minimoe's own backward being right.
"""
from __future__ import annotations

import numpy as np

from ...core import experts, gradcheck, layers
from ...core.gradcheck import rel_error as _rel_error_ref
from .compare import expect_array, expect_grads, expect_number, numeric_grads
from .grading import Fail, Lesson, call, no_token_loop

LESSON = Lesson("01", "The specialist")
progress = LESSON.progress

# (T, d, h): tokens, model width, hidden width. d != h so a missing transpose shows as a shape error.
_SIZES = [(6, 4, 7), (1, 3, 5), (9, 5, 3)]


def _ffn_inputs(seed, T, d, h):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, d))
    W1 = rng.standard_normal((d, h)) / np.sqrt(d)
    b1 = rng.standard_normal(h) * 0.5
    W2 = rng.standard_normal((h, d)) / np.sqrt(h)
    b2 = rng.standard_normal(d) * 0.5
    return x, W1, b1, W2, b2


# --------------------------------------------------------------------------- caches and lists
def _frozen(v):
    """A deep copy of the arrays inside ``v`` (tuples, NamedTuples and lists, nested)."""
    if isinstance(v, np.ndarray):
        return v.copy()
    if isinstance(v, (tuple, list)):
        return [_frozen(x) for x in v]
    return v


def _label(v, i, where):
    fields = getattr(type(v), "_fields", None)
    return f"{where}.{fields[i]}" if fields else f"{where}[{i}]"


def _what_changed(old, new, where):
    """Where ``new`` differs from its copy ``old`` (``"cache[1]"``, ``"d_received[0]"``), or None."""
    if isinstance(new, np.ndarray):
        same = isinstance(old, np.ndarray) and old.shape == new.shape and np.array_equal(old, new, equal_nan=True)
        return None if same else where
    if isinstance(new, (tuple, list)):
        if len(old) != len(new):
            return f"{where} (its length)"
        for i, (o, n) in enumerate(zip(old, new)):
            found = _what_changed(o, n, _label(new, i, where))
            if found:
                return found
        return None
    try:
        return None if bool(np.all(old == new)) else where
    except (TypeError, ValueError):
        return None


def call_watching(fn, *args, name, labels=(), **kwargs):
    """:func:`~minimoe.course.checks.grading.call`, and fail if ``fn`` changed in place an array
    inside a tuple or list argument (a cache, a list of buffers) or a list's entries — arrays
    passed directly are ``call``'s own check. ``labels`` names the arguments (``("dy", "cache")``)."""
    before = [_frozen(a) if isinstance(a, (tuple, list)) else None for a in args]
    out = call(fn, *args, name=name, **kwargs)
    for i, (old, new) in enumerate(zip(before, args)):
        if old is None:
            continue
        where = _what_changed(old, new, labels[i] if i < len(labels) else f"argument {i + 1}")
        if where:
            kind = "a cache" if isinstance(new, tuple) else "a list"
            raise Fail(f"{name} changed {where} in place. Its arguments belong to the caller: {kind} may be "
                       f"used again (a backward may run twice on one cache, as in a gradient check), and "
                       f"then it would hold different numbers. Compute into new arrays: `z = z * s`, "
                       f"not `z *= s`; `x = x.copy()` before changing it.")
    return out


def _relu(z):
    return np.maximum(z, 0)


def _close(a, b):
    return np.shape(a) == np.shape(b) and np.allclose(a, b, rtol=1e-9, atol=1e-12)


@LESSON.exercise("ffn_forward", forbid=[experts.ffn_forward])
def ffn_forward(fn):
    for seed, (T, d, h) in enumerate(_SIZES):
        x, W1, b1, W2, b2 = _ffn_inputs(10 + seed, T, d, h)
        out = call(fn, x, W1, b1, W2, b2, name="ffn_forward")
        _check_ffn_forward(out, x, W1, b1, W2, b2)
    no_token_loop(fn, "ffn_forward", lambda T: _ffn_inputs(17, T, 4, 7), _check_ffn_forward,
                  "One matrix product x @ W1 handles every token at once.")
    return ("y = relu(x W1 + b1) W2 + b2 and the cache are right on 3 random batches (T = 1 to 9), "
            "with no loop over tokens.")


def _check_ffn_forward(out, x, W1, b1, W2, b2):
    if not isinstance(out, tuple) or len(out) != 2:
        raise Fail("ffn_forward should return a pair (y, cache), "
                   f"got {type(out).__name__}{'' if not isinstance(out, tuple) else f' of length {len(out)}'}")
    y, cache = out
    want, _ = experts.ffn_forward(x, W1, b1, W2, b2)
    z = x @ W1 + b1
    expect_array("y", y, want, shape_desc="(T, d)", mistakes=[
        (z @ W2 + b2, "You skipped the activation: the hidden layer is a = relu(z) = np.maximum(z, 0)."),
        (_relu(want), "The ReLU belongs between the two layers only: y = a W2 + b2 may be negative."),
        (_relu(z) @ W2, "You forgot the output bias b2."),
        (_relu(x @ W1) @ W2 + b2, "You forgot the hidden bias b1 (inside the ReLU: z = x W1 + b1)."),
    ])
    if not isinstance(cache, tuple) or len(cache) != 5:
        raise Fail("y is right, but the cache should be the tuple (x, z, a, W1, W2) — "
                   "ffn_backward will need exactly these.")
    for name, got_c, want_c in zip(("x", "z", "a", "W1", "W2"), cache, (x, z, _relu(z), W1, W2)):
        if not _close(got_c, want_c):
            raise Fail(f"y is right, but cache entry {name!r} is not; the cache should be "
                       f"(x, z, a, W1, W2) with z = x W1 + b1 and a = relu(z).")


@LESSON.exercise("ffn_backward", forbid=[experts.ffn_backward])
def ffn_backward(fn):
    worst = 0.0
    for seed, (T, d, h) in enumerate(_SIZES):
        x, W1, b1, W2, b2 = _ffn_inputs(20 + seed, T, d, h)
        dy = np.random.default_rng(30 + seed).standard_normal((T, d))
        z = x @ W1 + b1
        a = _relu(z)
        out = call_watching(fn, dy, (x, z, a, W1, W2), name="ffn_backward", labels=("dy", "cache"))
        if not isinstance(out, tuple) or len(out) != 2:
            raise Fail("ffn_backward should return a pair (dx, grads) with grads a dict "
                       "{'W1', 'b1', 'W2', 'b2'}")
        dx, grads = out
        arrays = {"x": x.copy(), "W1": W1.copy(), "b1": b1.copy(), "W2": W2.copy(), "b2": b2.copy()}
        num = numeric_grads(lambda: experts.ffn_forward(**arrays)[0], arrays, dy)
        da = dy @ W2.T
        dz = da * (z > 0)
        no_mask = {"W1": x.T @ da, "b1": da.sum(0), "x": da @ W1.T}
        mask_hint = ("The gradient passes through the ReLU only where z > 0: "
                     "dz = da * (z > 0). You let it through everywhere.")
        mistakes = {
            "W1": [(no_mask["W1"], mask_hint)],
            "b1": [(no_mask["b1"], mask_hint),
                   (dz.mean(0), "A bias gradient is a sum over tokens (every token used the same bias), not a mean.")],
            "W2": [(z.T @ dy, "dW2 = aᵀ dy uses the activation a = relu(z), not the pre-activation z.")],
            "b2": [(dy.mean(0), "A bias gradient is a sum over tokens (every token used the same bias), not a mean."),
                   (dy, "db2 must have b2's shape (d,): sum dy over the tokens.")],
            "x": [(no_mask["x"], mask_hint),
                  (-(dz @ W1.T), "dx has the wrong sign: dx = dz W1ᵀ, with the same sign as dy "
                                 "(a gradient flows backwards through a matrix product as a product "
                                 "with the transpose, never with a minus).")],
        }
        all_grads = dict(grads) if isinstance(grads, dict) else grads
        if isinstance(all_grads, dict):
            all_grads = {**all_grads, "x": dx}
        worst = max(worst, expect_grads(all_grads, num, mistakes=mistakes,
                                        names=["W1", "b1", "W2", "b2", "x"]))

    def make(T):
        x, W1, b1, W2, b2 = _ffn_inputs(27, T, 4, 7)
        z = x @ W1 + b1
        return np.random.default_rng(T).standard_normal((T, 4)), (x, z, _relu(z), W1, W2)

    def check(out, dy, cache):
        if not isinstance(out, tuple) or len(out) != 2 or not isinstance(out[1], dict):
            raise Fail("ffn_backward should return a pair (dx, grads)")
        x, z, a, W1, W2 = cache
        dz = (dy @ W2.T) * (z > 0)             # the backward written out (checked by finite differences above)
        want = {"W1": x.T @ dz, "b1": dz.sum(axis=0), "W2": a.T @ dy, "b2": dy.sum(axis=0)}
        for n, w in want.items():
            expect_array(f"d{n}", out[1].get(n), w)
        expect_array("dx", out[0], dz @ W1.T)
    no_token_loop(fn, "ffn_backward", make, check,
                  "Every weight gradient is one matrix product over all tokens: dW2 = aᵀ dy, db2 = dy.sum(axis=0).")
    return (f"dx, dW1, db1, dW2, db2 pass the gradient check on 3 random batches "
            f"(worst relative error {worst:.1e}, pass < 1e-8), with no loop over tokens.")


@LESSON.exercise("numerical_gradient", forbid=[gradcheck.numerical_gradient])
def numerical_gradient(fn):
    for seed, shape in enumerate([(5,), (3, 4), (2, 3, 2)]):
        rng = np.random.default_rng(40 + seed)
        x = rng.standard_normal(shape)
        c = rng.standard_normal(shape)
        x0 = x.copy()

        def f():
            return float(np.sum(np.sin(x) * c) + 0.5 * np.sum(x ** 3))
        exact = np.cos(x0) * c + 1.5 * x0 ** 2
        h = 1e-5
        got = call(fn, f, x, h, name="numerical_gradient", copy=False)
        if not np.array_equal(x, x0):
            moved = float(np.max(np.abs(x - x0)))
            raise Fail(f"after your function ran, x was changed (by up to {moved:.2g}). Restore each "
                       f"entry *exactly* after perturbing it: old = x[i]; ...; x[i] = old. (Undoing "
                       f"the step with x[i] -= h is not exact in floating point.)")
        fwd = np.zeros_like(x0)
        f0 = f()
        for i in np.ndindex(shape):
            x[i] += h
            fwd[i] = (f() - f0) / h
            x[i] = x0[i]
        shape_hint = ("x can have any shape: loop over np.ndindex(x.shape) (or np.nditer with "
                      "flags=['multi_index']) so that x[i] reaches every entry.")
        if np.shape(got) != shape:
            raise Fail(f"the gradient has shape {np.shape(got)}, expected {shape} (x's shape). {shape_hint}")
        expect_array("the gradient", got, exact, rtol=1e-8, atol=1e-9, mistakes=[
            (fwd, "That is a one-sided (forward) difference, (f(x+h) − f(x)) / h, whose error is O(h). "
                  "Use the central difference (f(x+h) − f(x−h)) / (2h): its error is O(h²)."),
            (2 * exact, "You are off by a factor of 2: divide by 2h, the distance between x−h and x+h."),
            (exact / 2, "You are off by a factor of 1/2: the two points x−h and x+h are 2h apart, "
                        "so divide by 2h (not 4h)."),
        ])
    return ("matches the exact gradient of a test function to 1e-8 for x of 1, 2 and 3 dimensions, "
            "and leaves x exactly as it found it.")


@LESSON.exercise("rel_error", forbid=[gradcheck.rel_error])
def rel_error(fn):
    rng = np.random.default_rng(50)
    cases = []
    for shape in [(7,), (3, 4)]:
        a = rng.standard_normal(shape)
        cases.append((a, a + 1e-3 * rng.standard_normal(shape)))
        cases.append((a, 3 * a))
    big = rng.standard_normal(6)
    cases += [(1e8 * big, 1e8 * big * (1 + 1e-6)), (np.zeros(4), np.zeros(4)),
              (np.zeros(3), np.array([1.0, 2.0, 2.0])), (np.array([1e-9, -1e-9]), np.array([1e-9, 1e-9]))]
    for a, n in cases:
        got = call(fn, a, n, name="rel_error")
        want = _rel_error_ref(a, n)
        na, nn = np.linalg.norm(a), np.linalg.norm(n)
        with np.errstate(all="ignore"):
            mistakes = [
                (np.linalg.norm(a - n) / nn if nn else np.nan,
                 "Divide by max(‖a‖, ‖n‖), not by ‖n‖ alone: the error must be symmetric in a and n "
                 "and must not blow up when the numerical gradient is 0."),
                (np.linalg.norm(a - n), "That is the absolute error ‖a − n‖; divide by max(‖a‖, ‖n‖) "
                                        "so the answer does not depend on the gradient's scale."),
                (np.max(np.abs(a - n) / np.maximum(np.maximum(np.abs(a), np.abs(n)), 1e-300)),
                 "This is the *normwise* relative error: one ratio of norms for the whole array, "
                 "not the largest elementwise ratio (which explodes where a gradient is near 0)."),
                (np.linalg.norm(a - n) / (na + nn) if na + nn else np.nan,
                 "Divide by max(‖a‖, ‖n‖), not by their sum."),
            ]
        try:
            is_nan = bool(np.isnan(float(np.asarray(got).reshape(()))))
        except (TypeError, ValueError):
            is_nan = False
        if is_nan:
            raise Fail(f"rel_error returned nan for a = {np.round(a, 3).tolist()}, n = {np.round(n, 3).tolist()}. "
                       f"When both are zero the error is 0: use max(‖a‖, ‖n‖, tiny) with a tiny "
                       f"floor like 1e-300 in the denominator.")
        expect_number("rel_error", got, want, mistakes=[m for m in mistakes if np.isfinite(m[0])],
                      rtol=1e-9, atol=1e-300)
    return ("normwise relative error is right on 8 cases: scale-free, symmetric, "
            "and 0 (not nan) when both gradients are zero.")


# --------------------------------------------------------------------------- SwiGLU (Mixtral's w1, w3, w2)
def _swiglu_inputs(seed, T, d, h):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, d))
    W1 = rng.standard_normal((d, h)) / np.sqrt(d) * 1.5       # z1 of order 1: silu's curve matters
    W3 = rng.standard_normal((d, h)) / np.sqrt(d)
    W2 = rng.standard_normal((h, d)) / np.sqrt(h)
    dy = rng.standard_normal((T, d))
    return x, W1, W3, W2, dy


def _sig(z):
    return 1.0 / (1.0 + np.exp(-z))


def _swiglu_y(x, W1, W3, W2):
    """``y = (silu(x W1) ⊙ (x W3)) W2``, written out here (not minimoe's), for finite differences."""
    z1 = x @ W1
    return (z1 * _sig(z1) * (x @ W3)) @ W2


def _swiglu_cache(x, W1, W3, W2):
    return (x, x @ W1, x @ W3, W1, W3, W2)


def _swiglu_reference(dy, x, W1, W3, W2):
    """minimoe's SwiGLU expert (zero biases) as the reference for the large-T run."""
    h, d = W2.shape
    _, cache = experts.ffn_forward(x, W1, np.zeros(h), W2, np.zeros(d), "swiglu", W3=W3, b3=np.zeros(h))
    dx, g = experts.ffn_backward(dy, cache)
    return {"W1": g["W1"], "W3": g["W3"], "W2": g["W2"], "x": dx}


def _swiglu_mistakes(dy, x, W1, W3, W2):
    """The typical wrong gradients, each with its hint."""
    z1, z3 = x @ W1, x @ W3
    s = _sig(z1)
    g = z1 * s                                   # silu(z1)
    da = dy @ W2.T
    silu_prime = s * (1 + z1 * (1 - s))
    only_sigma = da * z3 * s                     # silu' taken as σ(z): the second term forgotten
    sigmoid_prime = da * z3 * s * (1 - s)        # silu' taken as σ'(z)
    swapped1, swapped3 = da * g, da * z3 * silu_prime
    dz1, dz3 = da * z3 * silu_prime, da * g
    h_sigma = ("silu'(z) = σ(z) (1 + z (1 − σ(z))) has two terms (product rule on z·σ(z)): "
               "you kept only σ(z).")
    h_sigmoid = ("That is the sigmoid's derivative σ(z)(1 − σ(z)); silu(z) = z σ(z), so "
                 "silu'(z) = σ(z) (1 + z (1 − σ(z))).")
    h_swap = ("The branches are swapped: the silu branch is z1 = x W1, so dz1 = da ⊙ z3 ⊙ silu'(z1); "
              "the linear branch is z3 = x W3, so dz3 = da ⊙ silu(z1).")
    h_one = ("x feeds both branches, so dx has two terms: dx = dz1 W1ᵀ + dz3 W3ᵀ.")
    s3 = _sig(z3)
    at_z3 = da * z3 * s3 * (1 + z3 * (1 - s3))   # silu' taken at the linear branch's z3
    minus = da * z3 * s * (1 - z1 * (1 - s))     # a minus inside silu'
    self1 = da * z1 * silu_prime                 # the silu branch multiplied by its own z1
    h_z3 = ("silu' belongs to the silu branch: dz1 = da ⊙ z3 ⊙ silu'(z1), at the silu branch's own "
            "pre-activation z1 = x W1, not at z3.")
    h_minus = ("silu'(z) = σ(z) (1 + z (1 − σ(z))): d/dz [z σ(z)] = σ(z) + z σ(z)(1 − σ(z)), a plus — "
               "you have a minus inside.")
    h_self1 = ("dz1 = da ⊙ z3 ⊙ silu'(z1): the factor beside silu'(z1) is the *other* branch, z3 = x W3 "
               "(the product rule on silu(z1) ⊙ z3); you multiplied the silu branch by its own z1.")
    h_self3 = ("dz3 = da ⊙ silu(z1): the linear branch's gradient is the other branch's value, not its own z3.")
    return {
        "W1": [(x.T @ only_sigma, h_sigma), (x.T @ sigmoid_prime, h_sigmoid), (x.T @ swapped1, h_swap),
               (x.T @ at_z3, h_z3), (x.T @ minus, h_minus), (x.T @ self1, h_self1)],
        "W3": [(x.T @ swapped3, h_swap), (x.T @ (da * z1), "dz3 = da ⊙ silu(z1): the gate is silu(z1) = "
                                                         "z1 σ(z1), not z1."),
               (x.T @ (da * z3), h_self3)],
        "W2": [((g).T @ dy, "dW2 = aᵀ dy with a = silu(z1) ⊙ z3, the hidden layer both branches make "
                            "(not silu(z1) alone)."),
               ((z1 * z3).T @ dy, "dW2 = aᵀ dy with a = silu(z1) ⊙ z3: you left out the silu.")],
        "x": [(only_sigma @ W1.T + dz3 @ W3.T, h_sigma), (sigmoid_prime @ W1.T + dz3 @ W3.T, h_sigmoid),
              (swapped1 @ W1.T + swapped3 @ W3.T, h_swap), (dz1 @ W1.T, h_one), (dz3 @ W3.T, h_one),
              (at_z3 @ W1.T + dz3 @ W3.T, h_z3), (minus @ W1.T + dz3 @ W3.T, h_minus),
              (self1 @ W1.T + dz3 @ W3.T, h_self1), (dz1 @ W1.T + (da * z3) @ W3.T, h_self3)],
    }


def _unpack_swiglu(out):
    if not isinstance(out, tuple) or len(out) != 2:
        raise Fail("swiglu_backward should return a pair (dx, grads) with grads a dict {'W1', 'W3', 'W2'}")
    dx, grads = out
    if not isinstance(grads, dict):
        raise Fail(f"the gradients should be a dict with keys ['W1', 'W3', 'W2'], got {type(grads).__name__}")
    return {**grads, "x": dx}


def _check_swiglu_large(out, dy, cache):
    x, _, _, W1, W3, W2 = cache
    expect_grads(_unpack_swiglu(out), _swiglu_reference(dy, x, W1, W3, W2),
                 mistakes=_swiglu_mistakes(dy, x, W1, W3, W2), names=["W1", "W3", "W2", "x"])


@LESSON.exercise("swiglu_backward", forbid=[layers.swiglu_backward, layers.silu_backward, experts.ffn_backward])
def swiglu_backward(fn):
    worst = 0.0
    for seed, (T, d, h) in enumerate(_SIZES):
        x, W1, W3, W2, dy = _swiglu_inputs(60 + seed, T, d, h)
        out = call_watching(fn, dy, _swiglu_cache(x, W1, W3, W2), name="swiglu_backward", labels=("dy", "cache"))
        arrays = {"x": x.copy(), "W1": W1.copy(), "W3": W3.copy(), "W2": W2.copy()}
        num = numeric_grads(lambda: _swiglu_y(**arrays), arrays, dy)
        worst = max(worst, expect_grads(_unpack_swiglu(out), num, mistakes=_swiglu_mistakes(dy, x, W1, W3, W2),
                                        names=["W1", "W3", "W2", "x"]))

    def make(T):
        x, W1, W3, W2, dy = _swiglu_inputs(70, T, 4, 7)
        return dy, _swiglu_cache(x, W1, W3, W2)
    no_token_loop(fn, "swiglu_backward", make, _check_swiglu_large,
                  "Every token's gradient comes out of the same matrix products: dy @ W2.T, x.T @ dz1, ...")
    return (f"dx, dW1, dW3, dW2 of y = (silu(x W1) ⊙ (x W3)) W2 pass the gradient check on 3 random "
            f"batches (worst relative error {worst:.1e}, pass < 1e-8), with no loop over tokens.")
