"""The small print of gradient checking: how much error to allow, and what to refuse.

``gradcheck.py`` holds the idea (central differences, the relative error, the pass rule);
this file holds what keeps that rule honest, in four parts.

**1. The error budget** ``e`` of a finite difference, entry by entry, so that a correct
gradient is never failed for the finite difference's own error (issue 21):

    e_i(h) = ROUNDOFF · u · Λ / h   +   |c_i| · h²,     c_i = (n_i(h_max) − n_i(h_min)) / (h_max² − h_min²)
             ─────── rounding ────     ─ truncation ─

* *Rounding.* ``L`` is computed in float64, with an error ``δL`` of a few ``u·Λ`` (``u = 2⁻⁵³``,
  ``Λ = Σ |out ⊙ dout|`` (+ ``|aux_loss|``), the size of the terms the loss adds up); the
  difference of two such values, divided by ``2h``, errs by up to ``ROUNDOFF·u·Λ/h`` when
  ``|δL| ≤ ROUNDOFF·u·Λ``. Measured over 1,000 random MoE layers (tests/core/gradcheck_configs.py):
  at most 10 u·Λ/h on any entry; ``ROUNDOFF = 32``. This is what failed correct gradients before: it is set by
  the whole loss, not by the parameter, so a small gradient (a router's, beside a loss of
  size 100) fell below it and the normwise rule's 1e-8 was noise over signal.
* *Truncation.* A central difference is ``n(h) = g + c·h² + O(h⁴)`` (``c = L'''/6``): the
  checker runs two steps, and how far the result moves between them measures ``c`` (plus
  their rounding, which only makes the estimate safer). Curved functions (GELU, softplus,
  Φ's tails, an exponential) need it at ``h = 1e-5``. With one step there is no estimate: 0.

  The budget does not depend on the analytic gradient, so it cannot hide an error larger
  than the finite difference's own: a gradient wrong by 1e-4 relative is still failed
  (tests/core/test_gradcheck_random_layers.py).

**2. Tolerances scaled to a small loss.** ``TOL_ABS`` and ``ZERO_NORM`` (in ``compare``) are
absolute, calibrated for ``Λ ≳ 1``. Every true gradient shrinks with ``Λ``, so with ``dout``
scaled by 1e-9 a backward 2× wrong would sit below ``ZERO_NORM`` and pass on ``TOL_ABS``
alone. Therefore, with ``scale = min(1, Λ)``: the elementwise rule is
``|a − n| ≤ scale·TOL_ABS + TOL_REL·|n| + e`` and "too small to resolve" (normwise ratio
skipped: noise over noise, e.g. a gradient that is exactly zero by design) means both norms
below ``scale·ZERO_NORM``; for ``Λ ≥ 1`` this is docs/design.md §4 as written.

**3. Refusals**, raised instead of a verdict the check could not back:

* :class:`GradientsTooSmallError` ("gradients too small to check: scale dout") when every
  gradient of the check is below ``scale·ZERO_NORM`` while the backward claims a non-zero one
  (above ``scale·ZERO_BY_DESIGN``), when ``dout`` is all zero (the loss is identically 0), or
  when ``Λ < MIN_SCALE`` (near float64's subnormals). A gradient that is zero by design, with a
  backward that says zero, still passes (the softmax of a single entry).
* ``ValueError`` when the loss gives two values at the same point (a noisy router that
  redraws its noise on every call: fix the noise), and named errors for arrays the checker
  cannot perturb (not float64, empty, read-only) and a backward that does not return
  ``(dx, grads)`` with ``grads`` a dict.

**4. The kink guard.** Top-k routing is only piecewise smooth: if nudging a logit makes the
k-th and (k+1)-th expert swap places, the finite difference measures a jump, not a slope.
A loss may return ``(value, selection)`` with a *selection signature* (e.g. the top-k
indices); if a nudge changes it, :class:`KinkError` is raised instead of a bogus error.
"""
from __future__ import annotations

import numbers

import numpy as np

__all__ = ["U", "ROUNDOFF", "ZERO_NORM", "ZERO_BY_DESIGN", "MIN_SCALE",
           "GradCheckError", "KinkError", "GradientsTooSmallError", "fd_error"]

U = np.finfo(np.float64).eps / 2   # u = 2⁻⁵³: float64's unit roundoff
ROUNDOFF = 32         # rounding budget of a central difference, in units of u·Λ/h (measured: ≤ 10)
ZERO_NORM = 1e-7      # below this norm (× scale) a gradient is indistinguishable from zero
ZERO_BY_DESIGN = 1e-10  # an analytic gradient this small (× scale) claims "exactly zero"
MIN_SCALE = 1e-280    # a loss smaller than this is near float64's subnormals: refused


class GradCheckError(AssertionError):
    """The analytic gradient disagrees with finite differences."""


class KinkError(RuntimeError):
    """A finite-difference step crossed a kink: the discrete selection changed."""


class GradientsTooSmallError(ValueError):
    """The gradients are too small for finite differences to judge: scale ``dout`` up."""


# --------------------------------------------------------------------------- 1. the error budget
def fd_error(numeric, name, h, loss_size):
    """The error budget ``e`` (x's shape, ≥ 0) of the central difference of ``name`` at step ``h``.

    Args:
        numeric: ``{step: {name: numerical gradient}}`` — every step of the check.
        name: which array.  h: which step.
        loss_size: ``Λ``, the size of the terms the loss adds up (its rounding error is ~u·Λ).

    Returns:
        ``ROUNDOFF·u·Λ/h + |c|·h²`` with ``c = (n(h_max) − n(h_min)) / (h_max² − h_min²)``
        (module docstring); the truncation term is 0 when the check has a single step.
    """
    rounding = ROUNDOFF * U * loss_size / h                    # |δL₊ − δL₋| / 2h, |δL| ≤ ROUNDOFF·u·Λ
    hi, lo = max(numeric), min(numeric)
    if hi == lo:
        return np.full(np.shape(numeric[h][name]), rounding)
    c = (numeric[hi][name] - numeric[lo][name]) / (hi**2 - lo**2)  # n(h) = g + c h² + O(h⁴)
    return rounding + np.abs(c) * h**2


def loss_size_from(loss_size, value):
    """``Λ`` for :func:`fd_error`: the given one, or ``|L|`` (exact when the loss's terms share a sign)."""
    if loss_size is None:
        return abs(float(value))
    if isinstance(loss_size, bool) or not isinstance(loss_size, numbers.Real) \
            or not (np.isfinite(loss_size) and loss_size >= 0):
        raise ValueError(f"loss_size must be a finite number >= 0 (the sum of the absolute values of the "
                         f"loss's terms), got {loss_size!r}")
    return float(loss_size)


# --------------------------------------------------------------------------- 2. scaled to a small loss
def loss_scale(value):
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


def check_scale(scale):
    """``scale`` as a float in (0, 1], or a named error."""
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not (0 < scale <= 1):
        raise ValueError(f"scale must be in (0, 1], got {scale!r}")
    return float(scale)


# --------------------------------------------------------------------------- 3. refusals
def refuse_zero_dout(dout, aux=0.0):
    """With ``dout = 0`` (and no auxiliary loss) the loss is identically 0: any backward would pass."""
    if not np.any(dout) and not aux:
        raise GradientsTooSmallError("gradients too small to check: scale dout (dout is all zero, so the "
                                     "loss Σ out ⊙ dout is identically 0 and any backward would pass)")


def refuse_unresolvable(largest, largest_analytic, scale):
    """Every gradient below what finite differences resolve: a pass is honest only when the
    backward says "zero" too (zero by design, e.g. a softmax of one entry); a backward that
    claims a small non-zero gradient cannot be told right from wrong here."""
    if largest < scale * ZERO_NORM and largest_analytic > scale * ZERO_BY_DESIGN:
        raise GradientsTooSmallError(
            f"gradients too small to check: scale dout (every gradient norm is below "
            f"{scale * ZERO_NORM:.0e}, the largest is {largest:.1e}: finite differences cannot tell a "
            f"right backward from a wrong one here; for check_gradients, pass scale= if the loss "
            f"really is this small)")


def deterministic_value(loss_fn):
    """``(value, selection)`` of ``loss_fn()``, after checking that a second call agrees.

    A loss that moves by itself makes every finite difference meaningless: the step would
    measure the redraw, not the slope.
    """
    value0, selection0 = split(loss_fn())
    value1, selection1 = split(loss_fn())
    same = same_selection(selection0, selection1)
    if not (value0 == value1 or abs(value0 - value1) <= 4 * np.finfo(np.float64).eps * abs(value0)) or not same:
        raise ValueError(
            f"loss_fn() is not deterministic: two calls at the same point gave {value0!r} and {value1!r}"
            f"{'' if same else ' and different selections'}. "
            f"If it draws random noise (a noisy router), the noise is redrawn on every call: fix it "
            f"(pass the noise explicitly, or use eval mode)")
    return value0, selection0


def deterministic_layer_output(layer, x, kw):
    """``layer.forward(x, **kw)`` as a float64 copy, after checking that a second call agrees."""
    y = np.array(layer.forward(x, **kw), dtype=np.float64)   # a copy: the layer may reuse its output buffer
    y_again = np.asarray(layer.forward(x, **kw), dtype=np.float64)
    if not np.array_equal(y, y_again):
        raise ValueError(
            f"{type(layer).__name__}.forward gave different outputs for the same x on two calls: "
            f"something in it changes on every call — a noisy router in training mode: the noise is "
            f"redrawn on every call — so finite differences would compare different functions. Fix the "
            f"noise: forward_kwargs={{'noise': eps}} with eps of shape (T, E), or check in eval mode "
            f"with forward_kwargs={{'train': False}}")
    return y


def checkable(name, x):
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


def float64_copy(name, x):
    """A private, writable float64 copy: the caller's array (even a read-only one) is never touched."""
    x = np.asarray(x)
    if x.dtype != np.float64:
        raise TypeError(f"gradient checks need float64, but {name} has dtype {x.dtype}")
    if x.size == 0:
        raise ValueError(f"{name} is empty (shape {x.shape}): there is no gradient to check")
    return x.copy()


def as_steps(h):
    """One step or a non-empty tuple of them, as a tuple of positive floats."""
    def is_step(s):
        return (isinstance(s, numbers.Real) and not isinstance(s, bool)
                and np.isfinite(float(s)) and float(s) > 0)
    steps = tuple(h) if isinstance(h, (list, tuple)) else (h,)
    if not steps or not all(is_step(s) for s in steps):
        raise ValueError(f"h must be a positive step (a number such as 1e-5) or a non-empty tuple "
                         f"of them, got {h!r}")
    return tuple(float(s) for s in steps)


def rng_from(rng):
    """``rng`` as a Generator: anything ``np.random.default_rng`` takes (None means seed 0)."""
    if rng is None:
        return np.random.default_rng(0)
    try:
        return np.random.default_rng(rng)
    except (TypeError, ValueError):
        raise TypeError(f"rng must be an int seed, a numpy.random.SeedSequence or a numpy.random.Generator, "
                        f"got {type(rng).__name__}") from None


def dout_for(dout, out, rng):
    """The upstream gradient: drawn standard normal if None, else a finite array of out's shape."""
    if dout is None:
        return rng.standard_normal(np.shape(out))
    dout = np.asarray(dout, dtype=np.float64)
    if dout.shape != np.shape(out):
        raise ValueError(f"dout must have the shape of the output {np.shape(out)}, got {dout.shape}")
    if not np.all(np.isfinite(dout)):
        raise ValueError("dout contains NaN or inf")
    return dout


def pair_result(result):
    """A backward's ``(dx, grads)``, or a named error for anything else."""
    if not isinstance(result, tuple) or len(result) != 2:
        got = (f"a {type(result).__name__} of shape {result.shape}" if isinstance(result, np.ndarray)
               else f"a {type(result).__name__}" + (f" of length {len(result)}" if isinstance(result, tuple) else ""))
        raise TypeError(f"backward must return a pair (dx, grads) with grads a dict of parameter "
                        f"gradients ({{}} if there are none), got {got}")
    return result


def analytic_from(what, grads, keys):
    """Pick ``keys`` out of ``grads`` as float64, or say which ones the backward forgot."""
    if not isinstance(grads, dict):
        raise TypeError(f"{what} must give its parameter gradients as a dict {{name: array}} with the keys "
                        f"of params {sorted(keys)}, got {type(grads).__name__}")
    missing = [k for k in keys if k not in grads]
    if missing:
        raise GradCheckError(f"{what} returned no gradient for {missing} (it returned keys {sorted(grads)})")
    return {k: np.array(grads[k], dtype=np.float64) for k in keys}


# --------------------------------------------------------------------------- 4. the kink guard
def split(result):
    """A loss function may return ``value`` or ``(value, selection_signature)``."""
    if isinstance(result, tuple):
        return float(result[0]), result[1]
    return float(result), None


def same_selection(s0, s1):
    """True when two selection signatures (arrays, scalars or tuples of them) are equal."""
    if isinstance(s0, (tuple, list)):
        return len(s0) == len(s1) and all(same_selection(a, b) for a, b in zip(s0, s1))
    return np.array_equal(np.asarray(s0), np.asarray(s1))


def kink_guard(selection0, plus, minus, name, i, h):
    """The loss values of ``f(x + h e_i)`` and ``f(x − h e_i)``; :class:`KinkError` if either
    step changed the selection signature ``selection0`` (None: no guard)."""
    (f_plus, s_plus), (f_minus, s_minus) = split(plus), split(minus)
    if selection0 is not None and not (same_selection(selection0, s_plus) and same_selection(selection0, s_minus)):
        raise KinkError(
            f"perturbing {name}{list(i)} by ±{h:g} changed the discrete selection "
            f"(which experts are chosen, or which tokens are kept): the finite difference "
            f"crosses a kink and means nothing there. Use a fixture whose top-k margins are "
            f">= 1e-3, or a different seed.")
    return f_plus, f_minus
