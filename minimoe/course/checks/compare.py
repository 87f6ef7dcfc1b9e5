"""Comparing a learner's answer with the right one, and saying *how* it differs.

Each helper returns quietly when the answer is right and raises
:class:`~minimoe.course.checks.grading.Fail` with a specific message when it is not:
targeted hints for the exercise's typical mistakes first, then what can be
measured (shape, transposition, a constant offset or factor, the sign, which
gradient fails the gradient check and by how much).

Strictness. The exercises of the course are exact up to floating-point roundoff, so
the defaults reject near misses: :func:`expect_array` and :func:`expect_number` accept
a relative difference of at most ``rtol = 1e-9`` (elementwise, with an absolute floor
``atol`` for entries near 0, *and* normwise), so an answer off by 1e-6 or 1e-3 relative
fails; roundoff of a different but exact formula (about 1e-15) passes. A grader widens
``rtol`` only where the exercise itself is approximate (a finite difference, a series).
:func:`expect_grads` uses the gradient-check criterion of docs/design.md §4
(normwise < 1e-8 and elementwise |a − n| <= 1e-7 + 1e-5 |n|), which a gradient off by
1e-6 relative fails.
"""
from __future__ import annotations

import numpy as np

from .grading import Fail

__all__ = ["expect_array", "expect_number", "expect_grads", "numeric_grads"]


def _as_array(name, got):
    if got is None:
        raise Fail(f"{name} is None — did you forget a `return`?")
    try:
        arr = np.asarray(got, dtype=np.float64)
    except (TypeError, ValueError):
        raise Fail(f"{name} should be a NumPy array, got {type(got).__name__}") from None
    return arr


RTOL, ATOL = 1e-9, 1e-12     # exact up to roundoff: a 1e-6 relative near miss fails


def _close(a, b, rtol, atol):
    """Same shape, elementwise ``|a − b| <= atol + rtol |b|`` and normwise
    ``‖a − b‖ <= rtol · max(‖a‖, ‖b‖) + atol · sqrt(size)`` (so that entries hiding
    below ``atol`` cannot all be off)."""
    if a.shape != b.shape or not np.allclose(a, b, rtol=rtol, atol=atol):
        return False
    if not a.size:
        return True
    fin = np.isfinite(a) & np.isfinite(b)
    if not fin.any():
        return True
    d = np.linalg.norm(a[fin] - b[fin])
    return bool(d <= rtol * max(np.linalg.norm(a[fin]), np.linalg.norm(b[fin])) + atol * np.sqrt(a.size))


def expect_array(name, got, want, *, shape_desc=None, mistakes=(), rtol=RTOL, atol=ATOL):
    """Compare an array answer with the reference and explain any difference.

    Args:
        name: what the array is called in the exercise (``"y"``, ``"dW1"``).
        got: the learner's value.
        want: the reference value.
        shape_desc: how to read the expected shape, e.g. ``"(T, d)"``.
        mistakes: ``[(wrong_value, hint), ...]`` — typical mistakes; if the answer
            matches one, its targeted hint is the verdict.
        rtol, atol: see the module docstring (exact up to roundoff by default).
    """
    got = _as_array(name, got)
    want = np.asarray(want, dtype=np.float64)
    desc = f" = {shape_desc}" if shape_desc else ""
    for wrong, hint in mistakes:           # targeted hints first, shape mistakes included
        wrong = np.asarray(wrong, dtype=np.float64)
        if _close(got, wrong, rtol, atol) and not _close(wrong, want, rtol, atol):
            raise Fail(f"{name} is wrong. {hint}")
    if got.shape != want.shape:
        if got.shape == want.T.shape and got.ndim == 2:
            raise Fail(f"{name} has shape {got.shape}, expected {want.shape}{desc}: "
                       f"it looks transposed.")
        raise Fail(f"{name} has shape {got.shape}, expected {want.shape}{desc}.")
    if not np.all(np.isfinite(got)):
        bad = tuple(int(i) for i in np.argwhere(~np.isfinite(got))[0])
        raise Fail(f"{name} contains NaN or inf (first at index {list(bad)}), "
                   f"where the right answer is finite.")
    if _close(got, want, rtol, atol):
        return float(np.max(np.abs(got - want))) if got.size else 0.0
    diff = got - want
    scale = max(float(np.max(np.abs(want))), 1e-300)
    if _close(got, -want, rtol, atol):
        raise Fail(f"{name} has the right size but the wrong sign everywhere.")
    if got.size > 1 and np.ptp(diff) <= 1e-6 * scale:
        raise Fail(f"{name} is off by the same constant {diff.flat[0]:.4g} everywhere.")
    nz = np.abs(want) > 1e-6 * scale
    if nz.sum() > 1:
        ratio = got[nz] / want[nz]
        if np.ptp(ratio) <= 1e-6 * max(abs(ratio[0]), 1.0) and abs(ratio[0]) > 1e-12 \
                and np.allclose(got[~nz], 0, atol=1e-9 * scale):
            if abs(ratio[0] - 1) < 1e-2:
                raise Fail(f"{name} is off by a factor of 1 {'+' if ratio[0] > 1 else '−'} "
                           f"{abs(ratio[0] - 1):.1e} everywhere: too much for rounding, so some step "
                           f"loses or changes digits.")
            raise Fail(f"{name} is off by a constant factor: yours = {ratio[0]:.4g} × the right answer.")
    worst = np.unravel_index(int(np.argmax(np.abs(diff))), diff.shape)
    rel = float(np.linalg.norm(diff) / max(np.linalg.norm(got), np.linalg.norm(want), 1e-300))
    raise Fail(f"{name} has the right shape but wrong values: relative error {rel:.2e}; "
               f"worst at index {[int(i) for i in worst]} (yours {got[worst]:.6g}, "
               f"expected {want[worst]:.6g}).")


def expect_number(name, got, want, *, mistakes=(), rtol=RTOL, atol=ATOL):
    """Compare a scalar answer; ``mistakes`` as in :func:`expect_array`."""
    if got is None:
        raise Fail(f"{name} is None — did you forget a `return`?")
    try:
        g = float(np.asarray(got).reshape(()))
    except (TypeError, ValueError):
        raise Fail(f"{name} should be a single number, got {type(got).__name__} "
                   f"{getattr(got, 'shape', '')}") from None
    for wrong, hint in mistakes:
        if np.isclose(g, wrong, rtol=rtol, atol=atol) and not np.isclose(wrong, want, rtol=rtol, atol=atol):
            raise Fail(f"{name} = {g:.6g} is wrong. {hint}")
    if not np.isclose(g, want, rtol=rtol, atol=atol):
        if want != 0 and np.isclose(g, -want, rtol=rtol, atol=atol):
            raise Fail(f"{name} = {g:.6g} has the wrong sign: expected {want:.6g}.")
        rel = abs(g - want) / max(abs(want), 1e-300)
        close = f" (relative error {rel:.1e}: not a rounding difference)" if rel < 1e-2 else ""
        raise Fail(f"{name} = {g:.10g}, expected {want:.10g}{close}.")
    return g


def expect_grads(got, numeric, *, mistakes=None, names=None):
    """Check a dict of gradients against finite differences, parameter by parameter.

    Uses the docs/design.md §4 criterion from :mod:`minimoe.core.gradcheck`, and reports every
    parameter that fails with its normwise relative error and which ones are right.

    Args:
        got: ``{name: gradient}`` from the learner.
        numeric: ``{name: finite-difference gradient}``.
        mistakes: ``{name: [(wrong_value, hint), ...]}`` typical mistakes per parameter.
        names: the order to report in (defaults to ``numeric``'s).

    Returns:
        The worst normwise relative error (for the ✔ message).
    """
    from ...core.gradcheck import TOL_NORMWISE, compare
    names = list(names or numeric)
    mistakes = mistakes or {}
    if not isinstance(got, dict):
        raise Fail(f"the gradients should be a dict with keys {names}, got {type(got).__name__}")
    missing = [n for n in names if n not in got]
    if missing:
        raise Fail(f"the gradient dict is missing {missing} (it has {sorted(got)}); "
                   f"use exactly the parameter names {names}.")
    bad, worst = [], 0.0          # (parameter, message); a shared hint is said once
    for n in names:
        g = _as_array(f"the gradient for {n}", got[n])
        want = np.asarray(numeric[n], dtype=np.float64)
        if g.shape != want.shape:
            if g.ndim == 2 and g.shape == want.T.shape:
                bad.append((n, f"It has shape {g.shape}, expected {want.shape}: it looks transposed "
                               f"(for y = x W the gradient is dW = xᵀ dy, of W's shape)"))
                continue
            bad.append((n, f"It has shape {g.shape}, expected {want.shape}: a gradient "
                           f"always has its parameter's shape"))
            continue
        for wrong, hint in mistakes.get(n, ()):
            if _close(g, np.asarray(wrong, float), 1e-6, 1e-9) and not _close(
                    np.asarray(wrong, float), np.asarray(numeric[n]), 1e-5, 1e-7):
                bad.append((n, hint))
                break
        else:
            rep = compare(n, g, numeric[n])
            worst = max(worst, rep.normwise)
            ratio = _constant_ratio(g, want) if not rep.passed else None
            if not rep.passed and np.any(g) and compare(n, -g, numeric[n]).passed:
                bad.append((n, f"{n} has the right size but the wrong sign everywhere: check the sign "
                               f"of each step of the chain rule"))
            elif not rep.passed and g.ndim == 2 and g.shape[0] == g.shape[1] and g.shape[0] > 1 \
                    and compare(n, g.T, numeric[n]).passed:
                bad.append((n, f"{n} looks transposed (for y = x W the gradient is dW = xᵀ dy)"))
            elif ratio is not None:
                bad.append((n, f"{n} is off by a constant factor: yours = {ratio:.4g} × the right gradient"))
            elif not rep.passed:
                bad.append((n, f"{n} fails the gradient check with relative error {rep.normwise:.1e} "
                               f"(a pass needs < {TOL_NORMWISE:g}); worst entry {list(rep.worst_index)}: "
                               f"yours {rep.analytic:.6g}, finite differences say {rep.numeric:.6g}"))
    if bad:
        groups = {}
        for n, msg in bad:
            groups.setdefault(msg, []).append(n)
        parts = []
        for msg, params in groups.items():
            which = _join(params)
            parts.append(f"Wrong gradient{'s' if len(params) > 1 else ''} for {which}. "
                         f"{msg}".rstrip(".") + ".")
        good = [n for n in names if n not in {b[0] for b in bad}]
        if good:
            parts.append(f"({_join(good)} {'is' if len(good) == 1 else 'are'} right.)")
        raise Fail(" ".join(parts))
    return worst


def _constant_ratio(g, want):
    """The factor r when ``g = r · want`` everywhere (r not 1, 0 or −1), else None."""
    scale = float(np.max(np.abs(want))) if want.size else 0.0
    nz = np.abs(want) > 1e-3 * scale
    if scale == 0 or nz.sum() < 2:
        return None
    r = float(np.median(g[nz] / want[nz]))
    if min(abs(r - 1), abs(r), abs(r + 1)) < 1e-3 or \
            not np.allclose(g, r * want, rtol=1e-4, atol=1e-6 * abs(r) * scale):
        return None
    return r


def _join(names):
    """``["a"]`` -> "a", ``["a", "b", "c"]`` -> "a, b and c"."""
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def numeric_grads(f, arrays, dout):
    """Finite-difference gradients of ``L = Σ f() ⊙ dout`` w.r.t. each array in ``arrays``.

    ``f`` takes no arguments and reads ``arrays`` (float64, perturbed in place and
    restored by :func:`minimoe.core.gradcheck.numerical_gradient`).
    """
    from ...core.gradcheck import numerical_gradient

    def loss():
        return float(np.sum(np.asarray(f()) * dout))
    return {n: numerical_gradient(loss, a, 1e-5, n) for n, a in arrays.items()}
