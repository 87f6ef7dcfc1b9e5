"""Gradient checking: how minimoe *shows* that every backward pass is right.

Every backward pass in minimoe is written by hand. This file is how we know they
are correct: we nudge each input and each parameter by a tiny step ``h`` in both
directions, watch how a scalar loss moves, and compare that slope with what the
hand-written backward says (central differences, error O(h²)):

    ∂L/∂θ_i  ≈  ( L(θ + h e_i) − L(θ − h e_i) ) / (2h)

The scalar loss for a function with output ``out`` is ``L = Σ out ⊙ dout`` with a
fixed random ``dout``, so ``∂L/∂out = dout`` and the backward is fed exactly that.

The pass criterion (docs/design.md §4), per parameter, with analytic ``a`` and numeric ``n``:

* normwise relative error  ``‖a − n‖ / max(‖a‖, ‖n‖, tiny) < 1e-8``, **and**
* elementwise              ``|a − n| ≤ 1e-7 + 1e-5·|n|`` for every entry.

The elementwise test alone is flaky where the gradient is near zero, the normwise
one alone can hide one bad entry in a big array; together they are strict and
stable. One refinement: when the whole gradient is smaller than the finite
differences can resolve (both norms below ``ZERO_NORM``, e.g. a gradient that is
exactly zero by design), the normwise ratio is noise over noise, so only the
elementwise test decides.

Everything runs in float64 and at two step sizes (1e-5 and 1e-6): a correct
gradient passes at both; a result that holds at only one is luck.

Top-k routing is only *piecewise* smooth: if nudging a logit makes the k-th and
(k+1)-th expert swap places, the finite difference measures a jump, not a slope.
The checkers therefore accept a *selection signature* (e.g. the top-k indices);
if any perturbation changes it, they raise :class:`KinkError` instead of
reporting a bogus gradient error.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = [
    "TOL_NORMWISE", "TOL_ABS", "TOL_REL", "ZERO_NORM", "STEPS",
    "GradCheckError", "KinkError", "GradReport",
    "rel_error", "numerical_gradient", "compare", "format_reports",
    "check_gradients", "check_pair", "check_layer",
]

TOL_NORMWISE = 1e-8   # normwise relative error must be below this
TOL_ABS = 1e-7        # elementwise: |a - n| <= TOL_ABS + TOL_REL * |n|
TOL_REL = 1e-5
ZERO_NORM = 1e-7      # below this norm a gradient is indistinguishable from zero
STEPS = (1e-5, 1e-6)  # the criterion must hold at both step sizes


class GradCheckError(AssertionError):
    """The analytic gradient disagrees with finite differences."""


class KinkError(RuntimeError):
    """A finite-difference step crossed a kink: the discrete selection changed."""


class GradReport(NamedTuple):
    """How one parameter's analytic gradient compares with the numerical one."""
    name: str
    shape: tuple
    normwise: float        # ‖a − n‖ / max(‖a‖, ‖n‖, tiny)
    worst_excess: float    # max over entries of |a − n| / (TOL_ABS + TOL_REL·|n|); ≤ 1 passes
    worst_index: tuple     # where that worst entry is
    analytic: float        # a at the worst entry
    numeric: float         # n at the worst entry
    h: float               # the step used
    passed: bool


def rel_error(a, n, tiny=1e-300):
    """Normwise relative error ``‖a − n‖ / max(‖a‖, ‖n‖, tiny)`` (0 when both are 0)."""
    a = np.asarray(a, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    return float(np.linalg.norm(a - n) / max(np.linalg.norm(a), np.linalg.norm(n), tiny))


def _same_selection(s0, s1):
    """True when two selection signatures (arrays, scalars or tuples of them) are equal."""
    if isinstance(s0, (tuple, list)):
        return len(s0) == len(s1) and all(_same_selection(a, b) for a, b in zip(s0, s1))
    return np.array_equal(np.asarray(s0), np.asarray(s1))


def _split(result):
    """A loss function may return ``value`` or ``(value, selection_signature)``."""
    if isinstance(result, tuple):
        return float(result[0]), result[1]
    return float(result), None


def numerical_gradient(f, x, h=1e-5, name="x", selection0=None):
    """Central-difference gradient of the scalar function ``f()`` w.r.t. the array ``x``.

    ``x`` is perturbed *in place*, one entry at a time, and restored; ``f`` reads it.

    Args:
        f: callable with no arguments returning a float, or ``(float, signature)``.
        x: float64 array, any shape.
        h: the step.
        name: the array's name, for error messages.
        selection0: the unperturbed selection signature; if given, every perturbed
            evaluation must reproduce it or :class:`KinkError` is raised.

    Returns:
        Array of ``x.shape``: the numerical gradient.
    """
    if x.dtype != np.float64:
        raise TypeError(f"gradient checks need float64, but {name} has dtype {x.dtype}")
    grad = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        old = x[i]
        try:
            x[i] = old + h
            fp, sp = _split(f())
            x[i] = old - h
            fm, sm = _split(f())
        finally:
            x[i] = old          # restore exactly, even if f raised
        if selection0 is not None and not (_same_selection(selection0, sp) and _same_selection(selection0, sm)):
            raise KinkError(
                f"perturbing {name}{list(i)} by ±{h:g} changed the discrete selection "
                f"(which experts are chosen, or which tokens are kept): the finite difference "
                f"crosses a kink and means nothing there. Use a fixture whose top-k margins are "
                f">= 1e-3, or a different seed."
            )
        grad[i] = (fp - fm) / (2 * h)
    return grad


def compare(name, analytic, numeric, h=float("nan")):
    """Compare an analytic and a numerical gradient with the docs/design.md §4 criterion."""
    a = np.asarray(analytic, dtype=np.float64)
    n = np.asarray(numeric, dtype=np.float64)
    if a.shape != n.shape:
        raise GradCheckError(f"{name}: analytic gradient has shape {a.shape}, expected {n.shape}")
    normwise = rel_error(a, n)
    if a.size:
        excess = np.abs(a - n) / (TOL_ABS + TOL_REL * np.abs(n))
        flat = int(np.argmax(excess))
        worst = np.unravel_index(flat, a.shape)
        worst_excess = float(excess[worst])
        aw, nw = float(a[worst]), float(n[worst])
    else:
        worst, worst_excess, aw, nw = (), 0.0, 0.0, 0.0
    tiny_grad = max(np.linalg.norm(a), np.linalg.norm(n)) < ZERO_NORM
    passed = bool((normwise < TOL_NORMWISE or tiny_grad) and worst_excess <= 1.0)
    return GradReport(name, a.shape, normwise, worst_excess, tuple(int(j) for j in worst), aw, nw, h, passed)


def format_reports(reports):
    """A readable table of :class:`GradReport` rows, one per parameter and step."""
    lines = [f"{'param':<10} {'shape':<14} {'h':>7} {'normwise':>10} {'worst':>8} "
             f"{'at':<12} {'analytic':>13} {'numeric':>13}  ok"]
    for r in reports:
        lines.append(
            f"{r.name:<10} {str(r.shape):<14} {r.h:>7.0e} {r.normwise:>10.2e} {r.worst_excess:>8.2g} "
            f"{str(list(r.worst_index)):<12} {r.analytic:>13.6g} {r.numeric:>13.6g}  "
            f"{'yes' if r.passed else 'NO'}"
        )
    lines.append(f"(pass: normwise < {TOL_NORMWISE:g} and worst <= 1, where worst = "
                 f"max |a-n| / ({TOL_ABS:g} + {TOL_REL:g}|n|))")
    return "\n".join(lines)


def _as_steps(h):
    steps = (h,) if np.isscalar(h) else tuple(h)
    if not steps or not all(np.isfinite(s) and s > 0 for s in steps):
        raise ValueError(f"h must be a positive step or a non-empty tuple of them, got {h!r}")
    return tuple(float(s) for s in steps)


def check_gradients(loss_fn, arrays, analytic, h=STEPS, raise_on_fail=True):
    """Check analytic gradients of a scalar ``loss_fn()`` against finite differences.

    Args:
        loss_fn: callable with no arguments; reads the arrays in ``arrays`` (which
            are perturbed in place) and returns the loss, or ``(loss, selection)``
            where ``selection`` identifies the discrete choices (for kink detection).
        arrays: ``{name: float64 array}`` — every input and parameter to check.
        analytic: ``{name: gradient}`` with the same keys and shapes.
        h: one step or a tuple of steps; the criterion must hold at each.
        raise_on_fail: raise :class:`GradCheckError` with a report if any check fails.

    Returns:
        List of :class:`GradReport`, one per (name, step).
    """
    missing = set(arrays) - set(analytic)
    if missing:
        raise GradCheckError(f"no analytic gradient for {sorted(missing)}")
    steps = _as_steps(h)
    _, selection0 = _split(loss_fn())
    reports = []
    for step in steps:
        for name, x in arrays.items():
            num = numerical_gradient(loss_fn, x, step, name, selection0)
            reports.append(compare(name, analytic[name], num, step))
    if raise_on_fail and not all(r.passed for r in reports):
        bad = sorted({r.name for r in reports if not r.passed})
        raise GradCheckError(f"gradient check failed for {', '.join(bad)}:\n" + format_reports(reports))
    return reports


def _analytic(what, grads, keys):
    """Pick ``keys`` out of ``grads`` as float64, or say which ones the backward forgot."""
    missing = [k for k in keys if k not in grads]
    if missing:
        raise GradCheckError(f"{what} returned no gradient for {missing} (it returned keys {sorted(grads)})")
    return {k: np.array(grads[k], dtype=np.float64) for k in keys}


def _float64_copy(name, x):
    x = np.asarray(x)
    if x.dtype != np.float64:
        raise TypeError(f"gradient checks need float64, but {name} has dtype {x.dtype}")
    return x.copy()


def check_pair(forward, backward, x, params=None, dout=None, *, kwargs=None,
               selection=None, rng=None, h=STEPS, wrt_x=True):
    """Check a ``forward -> (out, cache)`` / ``backward(dout, cache) -> (dx, grads)`` pair.

    ``forward`` is called as ``forward(x, **params, **kwargs)``; ``grads`` must be a
    dict with the keys of ``params``. The loss is ``Σ out ⊙ dout``.

    Args:
        forward, backward: the pair.
        x: float64 input (checked too, unless ``wrt_x=False``).
        params: ``{name: float64 array}`` passed as keyword arguments and checked.
        dout: upstream gradient; drawn from ``rng`` (standard normal) if omitted.
        kwargs: extra non-differentiable keyword arguments (labels, k, noise, ...).
        selection: optional ``selection(out, cache) -> signature`` for kink detection.
        rng: ``numpy.random.Generator`` for ``dout``; defaults to ``default_rng(0)``.
        h: step(s).
        wrt_x: also check the gradient with respect to ``x``.

    Returns:
        The list of :class:`GradReport` (raises :class:`GradCheckError` on failure).
    """
    rng = np.random.default_rng(0) if rng is None else rng
    kwargs = dict(kwargs or {})
    x = _float64_copy("x", x)
    params = {k: _float64_copy(k, v) for k, v in (params or {}).items()}
    out, cache = forward(x, **params, **kwargs)
    if dout is None:
        dout = rng.standard_normal(np.shape(out))
    dout = np.asarray(dout, dtype=np.float64)
    dx, grads = backward(dout, cache)
    analytic = _analytic("backward", grads, params)
    arrays = dict(params)
    if wrt_x:
        if dx is None:
            raise GradCheckError("backward returned dx=None; pass wrt_x=False to skip the input")
        arrays = {"x": x, **arrays}
        analytic = {"x": np.array(dx, dtype=np.float64), **analytic}

    def loss_fn():
        o, c = forward(x, **params, **kwargs)
        value = float(np.sum(np.asarray(o) * dout))
        return (value, selection(o, c)) if selection is not None else value

    return check_gradients(loss_fn, arrays, analytic, h)


def check_layer(layer, x, dout=None, *, forward_kwargs=None, selection=None, rng=None,
                h=STEPS, wrt_x=True):
    """Check a layer object with ``params``/``grads`` dicts, ``forward`` and ``backward``.

    The loss is ``Σ y ⊙ dout + layer.aux_loss`` (``aux_loss`` counts as 0 if absent),
    so auxiliary balancing losses are checked together with the task gradient.

    Args:
        layer: object with ``params``, ``grads``, ``forward(x, **kw) -> y`` and
            ``backward(dy) -> dx`` (which fills ``layer.grads``).
        x: float64 input.
        dout: upstream gradient for ``y``; standard normal from ``rng`` if omitted.
        forward_kwargs: keyword arguments for every forward call (e.g. a fixed ``noise``).
        selection: ``selection(layer) -> signature`` read after each forward, for kink
            detection; defaults to ``layer.routing_signature()`` if the layer has one.
        rng, h, wrt_x: as in :func:`check_pair`.

    The layer's own ``params`` arrays are perturbed in place and restored exactly.

    Returns:
        The list of :class:`GradReport` (raises :class:`GradCheckError` on failure).
    """
    rng = np.random.default_rng(0) if rng is None else rng
    kw = dict(forward_kwargs or {})
    x = _float64_copy("x", x)
    for k, v in layer.params.items():
        if v.dtype != np.float64:
            raise TypeError(f"gradient checks need float64, but parameter {k} has dtype {v.dtype}")
    if selection is None and hasattr(layer, "routing_signature"):
        selection = lambda lay: lay.routing_signature()  # noqa: E731
    y = layer.forward(x, **kw)
    if dout is None:
        dout = rng.standard_normal(np.shape(y))
    dout = np.asarray(dout, dtype=np.float64)
    dx = layer.backward(dout)
    analytic = _analytic("layer.backward", layer.grads, layer.params)
    arrays = dict(layer.params)
    if wrt_x:
        if dx is None:
            raise GradCheckError("layer.backward returned dx=None; pass wrt_x=False to skip the input")
        arrays = {"x": x, **arrays}
        analytic = {"x": np.array(dx, dtype=np.float64), **analytic}

    def loss_fn():
        out = layer.forward(x, **kw)
        value = float(np.sum(out * dout)) + float(getattr(layer, "aux_loss", 0.0) or 0.0)
        return (value, selection(layer)) if selection is not None else value

    return check_gradients(loss_fn, arrays, analytic, h)
