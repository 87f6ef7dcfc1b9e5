"""Gradient checking: how minimoe *shows* that every backward pass is right.

Every backward pass in minimoe is written by hand. To know one is right, nudge each entry
of each input and parameter by a small step ``h``, both ways, watch a scalar loss move, and
compare that slope with what the backward says — a central difference, error O(h²):

    ∂L/∂θ_i  ≈  n_i  =  ( L(θ + h e_i) − L(θ − h e_i) ) / 2h

For a function with output ``out`` the loss is ``L = Σ out ⊙ dout`` with a fixed random
``dout``, so ``∂L/∂out = dout`` — exactly what the backward is fed.

**The pass rule** (docs/design.md §4), per parameter, analytic ``a`` against numeric ``n``,
at each of two steps ``h = 1e-5`` and ``1e-6`` (a result that holds at only one is luck):

    normwise      ‖a − n‖  ≤  1e-8 · max(‖a‖, ‖n‖)  +  ‖e‖
    elementwise   |a_i − n_i|  ≤  1e-7 + 1e-5 · |n_i|  +  e_i      for every entry

where ``e`` is the finite difference's own error, its *budget*: rounding, ``32·u·Λ/h``
(``u = 2⁻⁵³``, ``Λ = Σ |out ⊙ dout|`` the size of the loss), plus truncation, ``|c|·h²``
with ``c`` measured from how far ``n`` moves between the two steps. The elementwise rule
alone is flaky where the gradient is near zero; the normwise one alone can hide one bad
entry in a big array; together they are strict and stable.

Read on in ``gradcheck_guards.py``: the budget in full, the tolerances scaled to a small
loss, the refusals (a loss that is not deterministic, gradients too small to judge) and the
kink guard for top-k routing (:class:`KinkError`).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .gradcheck_guards import (MIN_SCALE, ROUNDOFF, ZERO_BY_DESIGN, ZERO_NORM, GradCheckError,  # noqa: F401
                               GradientsTooSmallError, KinkError, analytic_from, as_steps, check_scale,
                               checkable, deterministic_layer_output, deterministic_value, dout_for,
                               fd_error, float64_copy, kink_guard, loss_scale, loss_size_from, pair_result,
                               refuse_unresolvable, refuse_zero_dout, rng_from)

__all__ = [
    "TOL_NORMWISE", "TOL_ABS", "TOL_REL", "ZERO_NORM", "ZERO_BY_DESIGN", "MIN_SCALE", "ROUNDOFF", "STEPS",
    "GradCheckError", "KinkError", "GradientsTooSmallError", "GradReport",
    "rel_error", "numerical_gradient", "compare", "format_reports",
    "check_gradients", "check_pair", "check_layer", "as_pair",
]


# --------------------------------------------------------------------------- the idea
def numerical_gradient(f, x, h=1e-5, name="x", selection0=None):
    """Central-difference gradient of the scalar ``f()`` with respect to the array ``x``.

    ``x`` is perturbed *in place*, one entry at a time, and restored exactly; ``f`` (no
    arguments) reads it and returns the loss, or ``(loss, selection)``: if ``selection0`` is
    given, a step that changes the selection raises :class:`KinkError` (gradcheck_guards.py).

    Returns:
        Array of ``x.shape``: the numerical gradient.
    """
    checkable(name, x)
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        old = x[i]
        try:
            x[i] = old + h
            plus = f()
            x[i] = old - h
            minus = f()
        finally:
            x[i] = old                                         # restore exactly, even if f raised
        f_plus, f_minus = kink_guard(selection0, plus, minus, name, i, h)
        grad[i] = (f_plus - f_minus) / (2 * h)                 # n_i = (L(θ + h e_i) − L(θ − h e_i)) / 2h
    return grad


def rel_error(a, n, tiny=1e-300):
    """Normwise relative error ``‖a − n‖ / max(‖a‖, ‖n‖, tiny)`` (0 when both are 0)."""
    a = np.asarray(a, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    return float(np.linalg.norm(a - n) / max(np.linalg.norm(a), np.linalg.norm(n), tiny))


# --------------------------------------------------------------------------- the pass rule
STEPS = (1e-5, 1e-6)  # the rule must hold at both step sizes
TOL_NORMWISE = 1e-8   # normwise: ‖a − n‖ ≤ TOL_NORMWISE·max(‖a‖, ‖n‖) + ‖e‖
TOL_ABS = 1e-7        # elementwise: |a − n| ≤ TOL_ABS + TOL_REL·|n| + e
TOL_REL = 1e-5


class GradReport(NamedTuple):
    """How one parameter's analytic gradient compares with the numerical one, at one step."""
    name: str
    shape: tuple
    normwise: float        # ‖a − n‖ / max(‖a‖, ‖n‖, tiny)
    worst_excess: float    # max over entries of |a − n| / (scale·TOL_ABS + TOL_REL·|n| + e); ≤ 1 passes
    worst_index: tuple     # where that worst entry is
    analytic: float        # a at the worst entry
    numeric: float         # n at the worst entry
    h: float               # the step used
    passed: bool
    allowed: float = TOL_NORMWISE   # the normwise error allowed: TOL_NORMWISE + ‖e‖ / max(‖a‖, ‖n‖)


def compare(name, analytic, numeric, h=float("nan"), scale=1.0, fd_error=0.0):
    """Judge an analytic gradient against a numerical one with the pass rule (module docstring).

    Args:
        name: for the report.  analytic, numeric: arrays of one shape.  h: the step, for the report.
        scale: ``min(1, Λ)`` in (0, 1]: shrinks the absolute parts, ``TOL_ABS`` and ``ZERO_NORM``,
            for a loss whose terms are small (gradcheck_guards.py); 1 is §4 as written.
        fd_error: ``e``, the finite difference's error budget, per entry or one number (≥ 0);
            0 judges by the tolerances alone.

    Returns:
        A :class:`GradReport`.
    """
    a = np.asarray(analytic, dtype=np.float64)
    n = np.asarray(numeric, dtype=np.float64)
    if a.shape != n.shape:
        raise GradCheckError(f"{name}: analytic gradient has shape {a.shape}, expected {n.shape}")
    scale = check_scale(scale)
    e = np.asarray(fd_error, dtype=np.float64)
    if not (np.all(np.isfinite(e)) and np.all(e >= 0)):
        raise ValueError(f"fd_error must be finite and >= 0, got {fd_error!r}")
    e = np.broadcast_to(e, a.shape)
    normwise = rel_error(a, n)
    biggest = max(np.linalg.norm(a), np.linalg.norm(n))
    # normwise: ‖a − n‖ ≤ 1e-8·max(‖a‖, ‖n‖) + ‖e‖, i.e. normwise < allowed
    allowed = TOL_NORMWISE + float(np.linalg.norm(e) / max(biggest, 1e-300))
    if a.size:
        excess = np.abs(a - n) / (scale * TOL_ABS + TOL_REL * np.abs(n) + e)  # |a−n| ≤ 1e-7 + 1e-5|n| + e
        worst = np.unravel_index(int(np.argmax(excess)), a.shape)
        worst_excess, aw, nw = float(excess[worst]), float(a[worst]), float(n[worst])
    else:
        worst, worst_excess, aw, nw = (), 0.0, 0.0, 0.0
    too_small_to_resolve = biggest < scale * ZERO_NORM      # the normwise ratio is noise over noise there
    passed = bool((normwise < allowed or too_small_to_resolve) and worst_excess <= 1.0)
    return GradReport(name, a.shape, normwise, worst_excess, tuple(int(j) for j in worst), aw, nw, h,
                      passed, allowed)


def format_reports(reports):
    """A readable table of :class:`GradReport` rows, one per parameter and step."""
    lines = [f"{'param':<10} {'shape':<14} {'h':>7} {'normwise':>10} {'allowed':>9} {'worst':>8} "
             f"{'at':<12} {'analytic':>13} {'numeric':>13}  ok"]
    for r in reports:
        lines.append(
            f"{r.name:<10} {str(r.shape):<14} {r.h:>7.0e} {r.normwise:>10.2e} {r.allowed:>9.1e} "
            f"{r.worst_excess:>8.2g} {str(list(r.worst_index)):<12} {r.analytic:>13.6g} {r.numeric:>13.6g}  "
            f"{'yes' if r.passed else 'NO'}"
        )
    lines.append(f"(pass: normwise < {TOL_NORMWISE:g} + ‖e‖/max(‖a‖,‖n‖) = allowed, and worst <= 1, where "
                 f"worst = max |a-n| / ({TOL_ABS:g} + {TOL_REL:g}|n| + e); e = the finite difference's "
                 f"error budget)")
    return "\n".join(lines)


# --------------------------------------------------------------------------- checking a loss, a pair, a layer
def check_gradients(loss_fn, arrays, analytic, h=STEPS, raise_on_fail=True, scale=1.0, loss_size=None):
    """Check analytic gradients of a scalar ``loss_fn()`` against finite differences.

    Args:
        loss_fn: callable with no arguments; reads the arrays in ``arrays`` (which are
            perturbed in place) and returns the loss, or ``(loss, selection)`` where
            ``selection`` identifies the discrete choices (for the kink guard). It must be
            deterministic: two calls at the same point give the same loss.
        arrays: ``{name: float64 array}`` — every input and parameter to check (non-empty, writable).
        analytic: ``{name: gradient}`` with the same keys and shapes.
        h: one step or a tuple of steps; the rule must hold at each.
        raise_on_fail: raise :class:`GradCheckError` with a report if any check fails.
        scale: ``min(1, Λ)`` for a loss whose terms add up to ``Λ``; it shrinks the absolute
            tolerances. The default 1 is the §4 criterion.
        loss_size: ``Λ``, for the rounding part of the error budget; default ``|loss_fn()|``
            (exact when the loss's terms share a sign — pass it when they cancel).

    Returns:
        List of :class:`GradReport`, one per (step, name).

    Raises:
        GradientsTooSmallError: every gradient is below ``scale·ZERO_NORM`` but the backward
            claims a non-zero one: finite differences cannot tell it right from wrong (never a pass).
        ValueError: ``loss_fn`` is not deterministic, or an array cannot be perturbed.
    """
    if not isinstance(arrays, dict) or not isinstance(analytic, dict):
        raise TypeError(f"arrays and analytic must be dicts {{name: array}}, got "
                        f"{type(arrays).__name__} and {type(analytic).__name__}")
    missing = set(arrays) - set(analytic)
    if missing:
        raise GradCheckError(f"no analytic gradient for {sorted(missing)}")
    for name, x in arrays.items():
        checkable(name, x)
        if np.shape(analytic[name]) != x.shape:
            raise GradCheckError(f"{name}: analytic gradient has shape {np.shape(analytic[name])}, "
                                 f"expected {x.shape}")
    steps = as_steps(h)
    scale = check_scale(scale)
    if not arrays:
        raise ValueError("arrays is empty: there is nothing to check")
    value0, selection0 = deterministic_value(loss_fn)
    lam = loss_size_from(loss_size, value0)
    numeric = {step: {name: numerical_gradient(loss_fn, x, step, name, selection0) for name, x in arrays.items()}
               for step in steps}
    reports = [compare(name, analytic[name], numeric[step][name], step, scale, fd_error(numeric, name, step, lam))
               for step in steps for name in arrays]
    norms_a = [float(np.linalg.norm(analytic[k])) for k in arrays]
    norms_n = [float(np.linalg.norm(n[k])) for n in numeric.values() for k in arrays]
    refuse_unresolvable(max(norms_a + norms_n), max(norms_a), scale)
    if raise_on_fail and not all(r.passed for r in reports):
        bad = sorted({r.name for r in reports if not r.passed})
        raise GradCheckError(f"gradient check failed for {', '.join(bad)}:\n" + format_reports(reports))
    return reports


def check_pair(forward, backward, x, params=None, dout=None, *, kwargs=None,
               selection=None, rng=None, h=STEPS, wrt_x=True):
    """Check a ``forward -> (out, cache)`` / ``backward(dout, cache) -> (dx, grads)`` pair.

    ``forward`` is called as ``forward(x, **params, **kwargs)``; ``grads`` must be a dict with
    the keys of ``params``. The loss is ``Σ out ⊙ dout``; its size ``Λ = Σ |out ⊙ dout|`` sets
    the error budget and scales the absolute tolerances.

    Args:
        forward, backward: the pair.
        x: float64 input (checked too, unless ``wrt_x=False``); copied, never modified.
        params: ``{name: float64 array}`` passed as keyword arguments and checked (copied).
        dout: upstream gradient of out's shape; drawn from ``rng`` (standard normal) if omitted.
        kwargs: extra non-differentiable keyword arguments (labels, k, noise, ...).
        selection: optional ``selection(out, cache) -> signature`` for the kink guard.
        rng: anything ``np.random.default_rng`` takes (a seed or a Generator), for ``dout``;
            defaults to ``default_rng(0)``.
        h: step(s).
        wrt_x: also check the gradient with respect to ``x``.

    Returns:
        The list of :class:`GradReport` (raises :class:`GradCheckError` on failure,
        :class:`GradientsTooSmallError` when the check could not tell).
    """
    rng = rng_from(rng)
    steps = as_steps(h)
    if params is not None and not isinstance(params, dict):
        raise TypeError(f"params must be a dict {{name: array}}, got {type(params).__name__}")
    kwargs = dict(kwargs or {})
    x = float64_copy("x", x)
    params = {k: float64_copy(k, v) for k, v in (params or {}).items()}
    out, cache = forward(x, **params, **kwargs)
    dout = dout_for(dout, out, rng)
    dx, grads = pair_result(backward(dout, cache))
    analytic = analytic_from("backward", grads, params)
    arrays = dict(params)
    if wrt_x:
        if dx is None:
            raise GradCheckError("backward returned dx=None; pass wrt_x=False to skip the input")
        arrays = {"x": x, **arrays}
        analytic = {"x": np.array(dx, dtype=np.float64), **analytic}
    refuse_zero_dout(dout)
    lam = float(np.sum(np.abs(np.asarray(out, dtype=np.float64) * dout)))    # Λ = Σ |out ⊙ dout|

    def loss_fn():
        o, c = forward(x, **params, **kwargs)
        value = float(np.sum(np.asarray(o) * dout))                        # L = Σ out ⊙ dout
        return (value, selection(o, c)) if selection is not None else value

    return check_gradients(loss_fn, arrays, analytic, steps, scale=loss_scale(lam), loss_size=lam)


def check_layer(layer, x, dout=None, *, forward_kwargs=None, selection=None, rng=None,
                h=STEPS, wrt_x=True):
    """Check a layer object with ``params``/``grads`` dicts, ``forward`` and ``backward``.

    The loss is ``Σ y ⊙ dout + layer.aux_loss`` (``aux_loss`` counts as 0 if absent), so
    auxiliary balancing losses are checked together with the task gradient; its size
    ``Λ = Σ |y ⊙ dout| + |aux_loss|`` sets the error budget and scales the absolute tolerances.

    Args:
        layer: object with ``params``, ``grads``, ``forward(x, **kw) -> y`` and
            ``backward(dy) -> dx`` (which fills ``layer.grads``).
        x: float64 input.
        dout: upstream gradient for ``y``; standard normal from ``rng`` if omitted.
        forward_kwargs: keyword arguments for every forward call (e.g. a fixed ``noise``:
            a noisy layer in training mode must be given one, or the noise is redrawn on
            every call and the check refuses).
        selection: ``selection(layer) -> signature`` read after each forward, for the kink
            guard; defaults to ``layer.routing_signature()`` if the layer has one.
        rng, h, wrt_x: as in :func:`check_pair`.

    The layer's own ``params`` arrays are perturbed in place and restored exactly.

    Returns:
        The list of :class:`GradReport` (raises :class:`GradCheckError` on failure).
    """
    rng = rng_from(rng)
    steps = as_steps(h)
    kw = dict(forward_kwargs or {})
    x = float64_copy("x", x)
    if not isinstance(getattr(layer, "params", None), dict):
        raise TypeError(f"layer must have a dict .params, got {type(layer).__name__}")
    for k, v in layer.params.items():
        checkable(f"parameter {k}", v)
    if selection is None and hasattr(layer, "routing_signature"):
        selection = lambda lay: lay.routing_signature()  # noqa: E731
    y = deterministic_layer_output(layer, x, kw)
    dout = dout_for(dout, y, rng)
    dx = layer.backward(dout)
    analytic = analytic_from("layer.backward (through layer.grads)", layer.grads, layer.params)
    arrays = dict(layer.params)
    if wrt_x:
        if dx is None:
            raise GradCheckError("layer.backward returned dx=None; pass wrt_x=False to skip the input")
        arrays = {"x": x, **arrays}
        analytic = {"x": np.array(dx, dtype=np.float64), **analytic}
    aux = abs(float(getattr(layer, "aux_loss", 0.0) or 0.0))
    refuse_zero_dout(dout, aux)
    lam = float(np.sum(np.abs(y * dout))) + aux                             # Λ = Σ |y ⊙ dout| + |aux_loss|

    def loss_fn():
        out = layer.forward(x, **kw)
        value = float(np.sum(out * dout)) + float(getattr(layer, "aux_loss", 0.0) or 0.0)
        return (value, selection(layer)) if selection is not None else value

    return check_gradients(loss_fn, arrays, analytic, steps, scale=loss_scale(lam), loss_size=lam)


def as_pair(backward, *input_names):
    """Adapt a backward with several differentiable inputs to :func:`check_pair`'s ``(dx, grads)``.

    minimoe's convention for such a function: ``backward(dout, cache)`` returns one gradient
    per differentiable input, positionally and in the forward's order, then the dict of
    parameter gradients (``{}`` if none) — e.g. ``losses.load_loss_backward`` returns
    ``(d_clean, d_noisy, d_sigma, {})``. :func:`check_pair` checks the first input as ``x``
    and every other one as a keyword array of ``params``; this names them::

        check_pair(losses.load_loss_forward, as_pair(losses.load_loss_backward, "noisy", "sigma"),
                   L, {"noisy": H, "sigma": sigma}, kwargs={"k": k})

    Args:
        backward: ``backward(dout, cache) -> (dx, d_in_1, ..., d_in_m, grads)``.
        input_names: the names of inputs 1..m, as keys of check_pair's ``params``.

    Returns:
        ``pair_backward(dout, cache) -> (dx, {**{name_i: d_in_i}, **grads})``. It raises
        ``TypeError`` if ``backward`` does not end with a dict, or returns a different number
        of input gradients than ``1 + len(input_names)``.
    """
    names = tuple(input_names)
    if len(set(names)) != len(names) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"as_pair: input_names must be distinct strings, got {names!r}")

    def pair_backward(dout, cache):
        result = backward(dout, cache)
        if not isinstance(result, tuple) or len(result) < 2 or not isinstance(result[-1], dict):
            shown = ", ".join(["dx", *(f"d_{n}" for n in names), "grads"])
            raise TypeError(f"as_pair: backward must return the input gradients then a dict of parameter "
                            f"gradients, ({shown}), got a {type(result).__name__}"
                            + (f" of length {len(result)}" if isinstance(result, tuple) else ""))
        *d_inputs, grads = result
        if len(d_inputs) != 1 + len(names):
            raise TypeError(f"as_pair: backward returned {len(d_inputs)} input gradient(s) but as_pair was "
                            f"given names for {1 + len(names)} (x and {list(names)})")
        clash = set(names) & set(grads)
        if clash:
            raise TypeError(f"as_pair: input name(s) {sorted(clash)} are also parameter-gradient keys")
        return d_inputs[0], {**dict(zip(names, d_inputs[1:])), **grads}

    pair_backward.__name__ = f"as_pair({getattr(backward, '__name__', 'backward')})"
    return pair_backward
