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

**Small gradients: the tolerances scale with the loss.** ``TOL_ABS`` and ``ZERO_NORM``
are absolute, calibrated for a loss of ordinary size (``Λ ≳ 1``, with
``Λ = Σ |out ⊙ dout|`` (+ ``|aux_loss|``), the size of the terms the loss adds up).
Finite-difference noise, ``≈ ε_mach Λ / h``, and every true gradient shrink with ``Λ``;
absolute tolerances do not, so with ``dout`` scaled by 1e-9 a backward 2× wrong
would sit below ``ZERO_NORM`` and pass on ``TOL_ABS`` alone. Therefore:

* with ``scale = min(1, Λ)``, the elementwise rule is ``|a − n| ≤ scale·TOL_ABS + TOL_REL·|n|``
  and "too small to resolve" means both norms below ``scale·ZERO_NORM``; for ``Λ ≥ 1``
  this is exactly the docs/design.md §4 criterion;
* if every gradient of the check is below ``scale·ZERO_NORM`` while the backward claims
  a non-zero one (above ``scale·ZERO_BY_DESIGN``: nothing the check could tell from
  noise), or ``dout`` is all zero (the loss is identically 0), or ``Λ < MIN_SCALE``
  (near float64's subnormal range), the check refuses
  with :class:`GradientsTooSmallError` ("gradients too small to check: scale dout")
  instead of reporting a pass. (A gradient that is zero by design, with a backward that
  says zero, still passes: e.g. the softmax of a single entry.)

:func:`check_pair` and :func:`check_layer` measure ``Λ`` themselves;
:func:`check_gradients` cannot see the loss's terms and takes ``scale=`` (default 1: the
§4 criterion as written); pass it for a loss that is small by construction.

The checker also refuses to run what it cannot check: the loss must give the same value
twice at the same point (a noisy router that redraws its noise on every call does not —
fix the noise), the arrays must be non-empty, writable float64, and a backward must
return ``(dx, grads)`` with ``grads`` a dict.

Everything runs in float64 and at two step sizes (1e-5 and 1e-6): a correct
gradient passes at both; a result that holds at only one is luck.

Top-k routing is only *piecewise* smooth: if nudging a logit makes the k-th and
(k+1)-th expert swap places, the finite difference measures a jump, not a slope.
The checkers therefore accept a *selection signature* (e.g. the top-k indices);
if any perturbation changes it, they raise :class:`KinkError` instead of
reporting a bogus gradient error.
"""
from __future__ import annotations

import numbers
from typing import NamedTuple

import numpy as np

__all__ = [
    "TOL_NORMWISE", "TOL_ABS", "TOL_REL", "ZERO_NORM", "ZERO_BY_DESIGN", "MIN_SCALE", "STEPS",
    "GradCheckError", "KinkError", "GradientsTooSmallError", "GradReport",
    "rel_error", "numerical_gradient", "compare", "format_reports",
    "check_gradients", "check_pair", "check_layer",
]

TOL_NORMWISE = 1e-8   # normwise relative error must be below this
TOL_ABS = 1e-7        # elementwise: |a - n| <= TOL_ABS + TOL_REL * |n|
TOL_REL = 1e-5
ZERO_NORM = 1e-7      # below this norm a gradient is indistinguishable from zero
STEPS = (1e-5, 1e-6)  # the criterion must hold at both step sizes
MIN_SCALE = 1e-280    # a loss smaller than this is near float64's subnormals: refused
ZERO_BY_DESIGN = 1e-10  # an analytic gradient this small (× scale) claims "exactly zero"


class GradCheckError(AssertionError):
    """The analytic gradient disagrees with finite differences."""


class KinkError(RuntimeError):
    """A finite-difference step crossed a kink: the discrete selection changed."""


class GradientsTooSmallError(ValueError):
    """The gradients are too small for finite differences to judge: scale ``dout`` up."""


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


def _check_checkable(name, x):
    """An array the checker can perturb in place: a non-empty, writable float64 ndarray."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy array (the checker perturbs it in place), "
                        f"got {type(x).__name__}")
    if x.dtype != np.float64:
        raise TypeError(f"gradient checks need float64, but {name} has dtype {x.dtype}")
    if x.size == 0:
        raise ValueError(f"{name} is empty (shape {x.shape}): there is no gradient to check")
    if not x.flags.writeable:
        raise ValueError(f"{name} is read-only: the checker perturbs it in place; pass a writable "
                         f"copy (np.array({name}))")
    return x


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
    _check_checkable(name, x)
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


def compare(name, analytic, numeric, h=float("nan"), scale=1.0):
    """Compare an analytic and a numerical gradient with the docs/design.md §4 criterion.

    ``scale`` (in (0, 1]) shrinks the absolute parts of the criterion, ``TOL_ABS`` and
    ``ZERO_NORM``, for a loss whose terms are small (see the module docstring); 1 is §4 as written.
    """
    a = np.asarray(analytic, dtype=np.float64)
    n = np.asarray(numeric, dtype=np.float64)
    if a.shape != n.shape:
        raise GradCheckError(f"{name}: analytic gradient has shape {a.shape}, expected {n.shape}")
    scale = float(scale)
    if not (0 < scale <= 1):
        raise ValueError(f"scale must be in (0, 1], got {scale!r}")
    normwise = rel_error(a, n)
    if a.size:
        excess = np.abs(a - n) / (scale * TOL_ABS + TOL_REL * np.abs(n))
        flat = int(np.argmax(excess))
        worst = np.unravel_index(flat, a.shape)
        worst_excess = float(excess[worst])
        aw, nw = float(a[worst]), float(n[worst])
    else:
        worst, worst_excess, aw, nw = (), 0.0, 0.0, 0.0
    tiny_grad = max(np.linalg.norm(a), np.linalg.norm(n)) < scale * ZERO_NORM
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
    def is_step(s):
        return (isinstance(s, numbers.Real) and not isinstance(s, bool)
                and np.isfinite(float(s)) and float(s) > 0)
    if isinstance(h, (list, tuple)):
        steps = tuple(h)
    else:
        steps = (h,)
    if not steps or not all(is_step(s) for s in steps):
        raise ValueError(f"h must be a positive step (a number such as 1e-5) or a non-empty tuple "
                         f"of them, got {h!r}")
    return tuple(float(s) for s in steps)


def _loss_scale(value):
    """``scale = min(1, Λ)`` for a loss whose terms add up to ``Λ`` in absolute value.

    ``Λ = 0`` (an output that is 0 by design) gives 1, the §4 criterion as written; a
    ``Λ`` near the subnormal range (< ``MIN_SCALE``), where float64 loses digits, is refused.
    """
    lam = float(value)
    if not np.isfinite(lam):
        raise ValueError(f"the loss is not finite (its terms sum to {lam}); check the forward pass and the inputs")
    if lam == 0:
        return 1.0
    if lam < MIN_SCALE:
        raise GradientsTooSmallError(
            f"gradients too small to check: scale dout (the loss's terms sum to {lam:.1e} in absolute "
            f"value, too close to float64's subnormal range for finite differences)")
    return min(1.0, lam)


def _refuse_zero_dout(dout, aux=0.0):
    """With ``dout = 0`` (and no auxiliary loss) the loss is identically 0: any backward would pass."""
    if not np.any(dout) and not aux:
        raise GradientsTooSmallError("gradients too small to check: scale dout (dout is all zero, so the "
                                     "loss Σ out ⊙ dout is identically 0 and any backward would pass)")


def _rng(rng):
    """``rng`` as a Generator: anything ``np.random.default_rng`` takes (None means seed 0)."""
    if rng is None:
        return np.random.default_rng(0)
    try:
        return np.random.default_rng(rng)
    except (TypeError, ValueError):
        raise TypeError(f"rng must be an int seed, a numpy.random.SeedSequence or a numpy.random.Generator, "
                        f"got {type(rng).__name__}") from None


def check_gradients(loss_fn, arrays, analytic, h=STEPS, raise_on_fail=True, scale=1.0):
    """Check analytic gradients of a scalar ``loss_fn()`` against finite differences.

    Args:
        loss_fn: callable with no arguments; reads the arrays in ``arrays`` (which
            are perturbed in place) and returns the loss, or ``(loss, selection)``
            where ``selection`` identifies the discrete choices (for kink detection).
            It must be deterministic: two calls at the same point give the same loss.
        arrays: ``{name: float64 array}`` — every input and parameter to check
            (non-empty, writable).
        analytic: ``{name: gradient}`` with the same keys and shapes.
        h: one step or a tuple of steps; the criterion must hold at each.
        raise_on_fail: raise :class:`GradCheckError` with a report if any check fails.
        scale: ``min(1, Λ)`` for a loss whose terms add up to ``Λ`` (module docstring);
            it shrinks the absolute tolerances. The default 1 is the §4 criterion.

    Returns:
        List of :class:`GradReport`, one per (name, step).

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
        _check_checkable(name, x)
    steps = _as_steps(h)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not (0 < scale <= 1):
        raise ValueError(f"scale must be a number in (0, 1], got {scale!r}")
    if not arrays:
        raise ValueError("arrays is empty: there is nothing to check")
    value0, selection0 = _split(loss_fn())
    value1, selection1 = _split(loss_fn())
    # A loss that moves by itself makes every finite difference meaningless: the step
    # would measure the redraw, not the slope.
    if not (value0 == value1 or abs(value0 - value1) <= 4 * np.finfo(np.float64).eps * abs(value0)) \
            or not _same_selection(selection0, selection1):
        raise ValueError(
            f"loss_fn() is not deterministic: two calls at the same point gave {value0!r} and {value1!r}"
            f"{'' if _same_selection(selection0, selection1) else ' and different selections'}. "
            f"If it draws random noise (a noisy router), the noise is redrawn on every call: fix it "
            f"(pass the noise explicitly, or use eval mode)")
    reports, largest, largest_analytic = [], 0.0, 0.0
    for step in steps:
        for name, x in arrays.items():
            num = numerical_gradient(loss_fn, x, step, name, selection0)
            reports.append(compare(name, analytic[name], num, step, scale))
            norm_a = float(np.linalg.norm(np.asarray(analytic[name], dtype=np.float64)))
            largest_analytic = max(largest_analytic, norm_a)
            largest = max(largest, norm_a, float(np.linalg.norm(num)))
    # Every gradient below what the finite differences resolve: a pass is honest only when the
    # backward says "zero" too (zero by design, e.g. a softmax of one entry); a backward that
    # claims a small non-zero gradient cannot be told right from wrong here.
    if largest < scale * ZERO_NORM and largest_analytic > scale * ZERO_BY_DESIGN:
        raise GradientsTooSmallError(
            f"gradients too small to check: scale dout (every gradient norm is below "
            f"{scale * ZERO_NORM:.0e}, the largest is {largest:.1e}: finite differences cannot tell a "
            f"right backward from a wrong one here; for check_gradients, pass scale= if the loss "
            f"really is this small)")
    if raise_on_fail and not all(r.passed for r in reports):
        bad = sorted({r.name for r in reports if not r.passed})
        raise GradCheckError(f"gradient check failed for {', '.join(bad)}:\n" + format_reports(reports))
    return reports


def _analytic(what, grads, keys):
    """Pick ``keys`` out of ``grads`` as float64, or say which ones the backward forgot."""
    if not isinstance(grads, dict):
        raise TypeError(f"{what} must give its parameter gradients as a dict {{name: array}} with the keys "
                        f"of params {sorted(keys)}, got {type(grads).__name__}")
    missing = [k for k in keys if k not in grads]
    if missing:
        raise GradCheckError(f"{what} returned no gradient for {missing} (it returned keys {sorted(grads)})")
    return {k: np.array(grads[k], dtype=np.float64) for k in keys}


def _float64_copy(name, x):
    x = np.asarray(x)
    if x.dtype != np.float64:
        raise TypeError(f"gradient checks need float64, but {name} has dtype {x.dtype}")
    if x.size == 0:
        raise ValueError(f"{name} is empty (shape {x.shape}): there is no gradient to check")
    return x.copy()      # a private, writable copy: the caller's array (even a read-only one) is never touched


def _dout(dout, out, rng):
    """The upstream gradient: drawn standard normal if None, else a finite array of out's shape."""
    if dout is None:
        return rng.standard_normal(np.shape(out))
    dout = np.asarray(dout, dtype=np.float64)
    if dout.shape != np.shape(out):
        raise ValueError(f"dout must have the shape of the output {np.shape(out)}, got {dout.shape}")
    if not np.all(np.isfinite(dout)):
        raise ValueError("dout contains NaN or inf")
    return dout


def check_pair(forward, backward, x, params=None, dout=None, *, kwargs=None,
               selection=None, rng=None, h=STEPS, wrt_x=True):
    """Check a ``forward -> (out, cache)`` / ``backward(dout, cache) -> (dx, grads)`` pair.

    ``forward`` is called as ``forward(x, **params, **kwargs)``; ``grads`` must be a
    dict with the keys of ``params``. The loss is ``Σ out ⊙ dout``; its size
    ``Λ = Σ |out ⊙ dout|`` scales the absolute tolerances (module docstring).

    Args:
        forward, backward: the pair.
        x: float64 input (checked too, unless ``wrt_x=False``); copied, never modified.
        params: ``{name: float64 array}`` passed as keyword arguments and checked (copied).
        dout: upstream gradient of out's shape; drawn from ``rng`` (standard normal) if omitted.
        kwargs: extra non-differentiable keyword arguments (labels, k, noise, ...).
        selection: optional ``selection(out, cache) -> signature`` for kink detection.
        rng: anything ``np.random.default_rng`` takes (a seed or a Generator), for ``dout``;
            defaults to ``default_rng(0)``.
        h: step(s).
        wrt_x: also check the gradient with respect to ``x``.

    Returns:
        The list of :class:`GradReport` (raises :class:`GradCheckError` on failure,
        :class:`GradientsTooSmallError` when the check could not tell).
    """
    rng = _rng(rng)
    steps = _as_steps(h)
    if params is not None and not isinstance(params, dict):
        raise TypeError(f"params must be a dict {{name: array}}, got {type(params).__name__}")
    kwargs = dict(kwargs or {})
    x = _float64_copy("x", x)
    params = {k: _float64_copy(k, v) for k, v in (params or {}).items()}
    out, cache = forward(x, **params, **kwargs)
    dout = _dout(dout, out, rng)
    result = backward(dout, cache)
    if not isinstance(result, tuple) or len(result) != 2:
        got = (f"a {type(result).__name__} of shape {result.shape}" if isinstance(result, np.ndarray)
               else f"a {type(result).__name__}" + (f" of length {len(result)}" if isinstance(result, tuple) else ""))
        raise TypeError(f"backward must return a pair (dx, grads) with grads a dict of parameter "
                        f"gradients ({{}} if there are none), got {got}")
    dx, grads = result
    analytic = _analytic("backward", grads, params)
    arrays = dict(params)
    if wrt_x:
        if dx is None:
            raise GradCheckError("backward returned dx=None; pass wrt_x=False to skip the input")
        arrays = {"x": x, **arrays}
        analytic = {"x": np.array(dx, dtype=np.float64), **analytic}
    _refuse_zero_dout(dout)
    scale = _loss_scale(np.sum(np.abs(np.asarray(out, dtype=np.float64) * dout)))

    def loss_fn():
        o, c = forward(x, **params, **kwargs)
        value = float(np.sum(np.asarray(o) * dout))
        return (value, selection(o, c)) if selection is not None else value

    return check_gradients(loss_fn, arrays, analytic, steps, scale=scale)


def check_layer(layer, x, dout=None, *, forward_kwargs=None, selection=None, rng=None,
                h=STEPS, wrt_x=True):
    """Check a layer object with ``params``/``grads`` dicts, ``forward`` and ``backward``.

    The loss is ``Σ y ⊙ dout + layer.aux_loss`` (``aux_loss`` counts as 0 if absent),
    so auxiliary balancing losses are checked together with the task gradient; its size
    ``Λ = Σ |y ⊙ dout| + |aux_loss|`` scales the absolute tolerances (module docstring).

    Args:
        layer: object with ``params``, ``grads``, ``forward(x, **kw) -> y`` and
            ``backward(dy) -> dx`` (which fills ``layer.grads``).
        x: float64 input.
        dout: upstream gradient for ``y``; standard normal from ``rng`` if omitted.
        forward_kwargs: keyword arguments for every forward call (e.g. a fixed ``noise``:
            a noisy layer in training mode must be given one, or the noise is redrawn on
            every call and the check refuses).
        selection: ``selection(layer) -> signature`` read after each forward, for kink
            detection; defaults to ``layer.routing_signature()`` if the layer has one.
        rng, h, wrt_x: as in :func:`check_pair`.

    The layer's own ``params`` arrays are perturbed in place and restored exactly.

    Returns:
        The list of :class:`GradReport` (raises :class:`GradCheckError` on failure).
    """
    rng = _rng(rng)
    steps = _as_steps(h)
    kw = dict(forward_kwargs or {})
    x = _float64_copy("x", x)
    if not isinstance(getattr(layer, "params", None), dict):
        raise TypeError(f"layer must have a dict .params, got {type(layer).__name__}")
    for k, v in layer.params.items():
        _check_checkable(f"parameter {k}", v)
    if selection is None and hasattr(layer, "routing_signature"):
        selection = lambda lay: lay.routing_signature()  # noqa: E731
    y = layer.forward(x, **kw)
    y = np.array(y, dtype=np.float64)            # a copy: the layer may reuse its output buffer
    y_again = np.asarray(layer.forward(x, **kw), dtype=np.float64)
    if not np.array_equal(y, y_again):
        raise ValueError(
            f"{type(layer).__name__}.forward gave different outputs for the same x on two calls: "
            f"something in it changes on every call — a noisy router in training mode: the noise is "
            f"redrawn on every call — so finite differences would compare different functions. Fix the "
            f"noise: forward_kwargs={{'noise': eps}} with eps of shape (T, E), or check in eval mode "
            f"with forward_kwargs={{'train': False}}")
    dout = _dout(dout, y, rng)
    dx = layer.backward(dout)
    analytic = _analytic("layer.backward (through layer.grads)", layer.grads, layer.params)
    arrays = dict(layer.params)
    if wrt_x:
        if dx is None:
            raise GradCheckError("layer.backward returned dx=None; pass wrt_x=False to skip the input")
        arrays = {"x": x, **arrays}
        analytic = {"x": np.array(dx, dtype=np.float64), **analytic}
    aux = abs(float(getattr(layer, "aux_loss", 0.0) or 0.0))
    _refuse_zero_dout(dout, aux)
    scale = _loss_scale(np.sum(np.abs(y * dout)) + aux)

    def loss_fn():
        out = layer.forward(x, **kw)
        value = float(np.sum(out * dout)) + float(getattr(layer, "aux_loss", 0.0) or 0.0)
        return (value, selection(layer)) if selection is not None else value

    return check_gradients(loss_fn, arrays, analytic, steps, scale=scale)


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


__all__.append("as_pair")
