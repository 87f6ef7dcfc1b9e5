"""The standard normal's Φ and φ, in NumPy.

The smooth load estimator (``losses.py``) asks, for every token and expert, how likely the
noise is to lift an expert into the top k: a value of the normal CDF Φ, and, in backward, of
its density φ. Both come from one function, the complementary error function

    erfc(x) = (2/√π) ∫ₓ^∞ e^(−t²) dt,       Φ(z) = ½ erfc(−z/√2),       φ(z) = e^(−z²/2) / √(2π).

NumPy has no erfc, and calling ``math.erfc`` once per element hides a Python loop over
tokens. This file computes it with array operations only, to a relative error below 1e-14
everywhere (``tests/core/test_normal.py`` holds it to that against ``math.erfc`` and a decimal
reference; the worst seen on a dense grid is 9e-16), in three regions:

1. **|x| < ½ — the Maclaurin series of erf**, then ``erfc = 1 − erf``:

       erf(x) = (2/√π) Σₙ (−1)ⁿ x^(2n+1) / (n! (2n+1))

   For |x| ≤ ½ the n-th term is at most 2⁻²ⁿ⁻¹/(n!(2n+1)), below 1e-17 from n = 12 on, so 13
   terms suffice; erf ≤ 0.53 there, so ``1 − erf`` loses no digits.

2. **x ≥ ½ — the scaled function g(x) = e^(x²) erfc(x)**, then ``erfc = e^(−x²) g(x)``.
   Far from 0, ``1 − erf`` would cancel (erfc(3) = 2e-5: five digits lost), while g is
   smooth and tame: it falls from 0.62 at ½ to ≈ 1/(x√π) for large x. It is the even
   part of Laplace's continued fraction:

       g(x) = (2x/√π) / (2x²+1 − 1·2/(2x²+5 − 3·4/(2x²+9 − 5·6/(2x²+13 − …))))

   which converges quickly for large x (20 levels are exact to rounding for x ≥ 3) and
   slowly near ½ (about 700 levels). So on [½, 3] g is replaced by a polynomial: its
   **Chebyshev interpolant** of degree 24 in y = (2x − 7/2)/(5/2) ∈ [−1, 1], computed once
   in decimal arithmetic (a table below; the tests re-derive it bit for bit). It is stored in
   powers of y, Σₖ aₖ yᵏ, and summed by Horner's rule like the series above: the aₖ shrink
   about 2× per degree and Σ|aₖ| = g(½), so the power form loses nothing to Clenshaw's sum
   of the Chebyshev form and costs two operations a term instead of three. Beyond 3 the
   fraction itself is used.

3. **x ≤ −½ — the reflection** ``erfc(x) = 2 − erfc(−x)``, with no cancellation (erfc(−x) ≤ 0.48).

**The exponential, carefully.** In float64, x² is rounded by a relative 2⁻⁵³, an absolute
error of x²·2⁻⁵³ in the exponent, which is a *relative* error of x²·1.1e-16 in e^(−x²):
7e-14 at x = 26. So x is split into ``hi`` (x rounded to a multiple of 2⁻²⁰: at most 26
significant bits, so hi² is exact) and ``lo = x − hi`` (exact, |lo| ≤ 2⁻²¹):

    x² = hi² + (2 hi + lo) lo,     e^(−x²) = e^(−hi²) · e^(−(2 hi + lo) lo)

where the second exponent is tiny and its rounding harmless. Φ applies the same split to z
itself: ``x = −z/√2`` is rounded, but g hardly notices (a relative error ε in x is an error
≈ ε in g), while the exponent z²/2 is formed from z exactly, so Φ and φ keep full relative
precision in the tails as well.

Every function takes an array (or a number) of any shape and real dtype and returns float64
of the same shape — float32 input too, which costs nothing and keeps the tails. NaN gives
NaN; erfc(+∞) = 0, erfc(−∞) = 2, Φ(−∞) = 0, Φ(+∞) = 1, φ(±∞) = 0.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["erfc", "normal_cdf", "normal_pdf"]

_SQRT_PI = math.sqrt(math.pi)
_SERIES_END = 0.5       # |x| below: the Maclaurin series of erf
_CHEB_END = 3.0         # [½, 3]: the Chebyshev interpolant of g; above: the continued fraction
_ZERO_FROM = 27.3       # e^(−27.3²) ≈ 2e-324 < 2⁻¹⁰⁷⁵ (half the smallest subnormal) rounds to 0: so does erfc
_FRACTION_LEVELS = 20   # levels of the continued fraction for x ≥ 3


# --------------------------------------------------------------------------- |x| < ½
def _erf_coefficients(n_terms=13):
    """aₙ = (2/√π) (−1)ⁿ / (n! (2n+1)), so that erf(x) = x Σₙ aₙ (x²)ⁿ."""
    return np.array([2 / _SQRT_PI * (-1) ** n / (math.factorial(n) * (2 * n + 1)) for n in range(n_terms)])


_ERF_COEFFS = _erf_coefficients()


def _erf_series(x):
    """erf(x) for |x| ≤ ½ by its Maclaurin series, summed by Horner's rule in x² (in place)."""
    x2 = x * x
    s = np.full_like(x, _ERF_COEFFS[-1])
    for a in _ERF_COEFFS[-2::-1]:          # a loop over the series' terms, not over elements
        s *= x2                             # s ← s·x² + aₙ
        s += a
    s *= x
    return s


# --------------------------------------------------------------------------- x ≥ ½
def _g_fraction(x, levels):
    """g(x) = e^(x²) erfc(x) by the continued fraction, evaluated bottom-up from ``levels`` deep.

    With y = 2x² + 1 the fraction is (2x/√π) / (y − 1·2/(y + 4 − 3·4/(y + 8 − …))): level n
    has the denominator y + 4n and, above it, the numerator (2n − 1)(2n).
    """
    y = 2 * x * x + 1
    r = y + 4 * levels
    for n in range(levels, 0, -1):          # a loop over the fraction's levels, not over elements
        r = (y + 4 * (n - 1)) - (2 * n - 1) * (2 * n) / r
    return 2 * x / (_SQRT_PI * r)


# g on [½, 3] as a polynomial in y = (2x − 7/2)/(5/2): a₀ … a₂₄ with g(x) ≈ Σₖ aₖ yᵏ. The polynomial
# is the Chebyshev interpolant of g at the 32 nodes yⱼ = cos θⱼ, θⱼ = π(2j + 1)/64, i.e.
#
#     Σₖ cₖ Tₖ(y),   cₖ = (2/32) Σⱼ g(xⱼ) cos(k θⱼ)  (c₀ halved),   cut after c₂₄,
#
# (the 7 left out add up to less than 1/64 of an ulp of g), written out in powers of y. Both
# steps were done once in 60-digit decimal arithmetic; tests/core/test_normal.py repeats them
# and checks every bit. (Computed in float64, the coefficients would carry rounding errors
# worth 4e-15 of g near x = 3, where g is smallest.)
_G_POLY = np.array([
    0.2849722347374364, -0.1637204318931065, 0.08713067201107384, -0.043476553205837154,
    0.020518357439768264, -0.009219282993833447, 0.0039642506501834365, -0.0016380946804196831,
    0.0006527023821574869, -0.0002514969929114618, 9.393955814757682e-05, -3.408569509886257e-05,
    1.2036358247777057e-05, -4.142946790689153e-06, 1.3919934437178524e-06,
    -4.5718640107407134e-07, 1.4690641336040698e-07, -4.613082593136095e-08, 1.423223994253057e-08,
    -4.41250198370148e-09, 1.313093579380762e-09, -3.186172334143887e-10, 9.113697965847073e-11,
    -4.9423933001789984e-11, 1.3815556124649836e-11,
])


def _g_polynomial(x):
    """g(x) for ½ ≤ x ≤ 3: Σₖ aₖ yᵏ with y = (2x − 7/2)/(5/2), by Horner's rule (in place)."""
    y = (2 * x - (_SERIES_END + _CHEB_END)) / (_CHEB_END - _SERIES_END)
    s = np.full_like(y, _G_POLY[-1])
    for a in _G_POLY[-2::-1]:               # a loop over coefficients, not over elements
        s *= y                              # s ← s·y + aₖ
        s += a
    return s


_SPLIT = 1.5 * 2.0**32   # floats near it are spaced 2⁻²⁰ apart: (w + _SPLIT) − _SPLIT rounds w to that grid
_W_CAP = 64.0            # |w| beyond this has e^(−s w²) = 0 for s ≥ ½; capping keeps inf out of the arithmetic


def _times_exp_minus_square(c, w, s):
    """c · e^(−s w²) with full relative precision, for s = 1 or ½ (w is capped at ±64).

    hi = w rounded to a multiple of 2⁻²⁰ has at most 26 significant bits for |w| ≤ 64, so hi²
    (and s·hi²) is exact; lo = w − hi is exact too, and s w² = s hi² + s (2 hi + lo) lo.
    The factor e^(−s hi²), the only one that can underflow, is multiplied in last.
    """
    w = np.clip(w, -_W_CAP, _W_CAP)
    hi = (w + _SPLIT) - _SPLIT
    lo = w - hi
    out = 2 * hi
    out += lo
    out *= lo
    out *= -s
    np.exp(out, out=out)                      # e^(−s (2 hi + lo) lo): a number close to 1
    out *= c
    big = hi * hi                             # exact
    big *= -s
    np.exp(big, out=big)                      # e^(−s hi²)
    out *= big
    return out


# --------------------------------------------------------------------------- together
def _erfc(x, w, s):
    """erfc(x) of a flat float64 array, given w and s with x² = s·w² (see erfc and normal_cdf).

    The caller passes the number whose square it knows exactly: erfc passes (x, 1), Φ passes
    (z, ½) since x = −z/√2 is rounded but z²/2 is not. Each region is gathered by an index
    array (``np.flatnonzero``): NumPy gathers and scatters by index far faster than by a
    boolean mask.
    """
    out = np.empty_like(x)
    a = np.abs(x)
    is_far = a >= _SERIES_END
    near = np.flatnonzero(~is_far)             # |x| < ½, and NaN, which the series passes on as NaN
    erf = _erf_series(x[near])
    out[near] = np.subtract(1.0, erf, out=erf)

    # erfc(|x|) = g(|x|) e^(−x²) for |x| ≥ ½ (±∞ included), then the reflection for x ≤ −½.
    # Beyond 27.3 (and at ∞) e^(−x²) is 0, so any finite g will do there: the fraction gets
    # at most 27.3.
    far = np.flatnonzero(is_far)
    af = a[far]
    tail = _g_polynomial(np.minimum(af, _CHEB_END))        # g on [½, 3]; beyond 3, replaced next
    beyond = np.flatnonzero(af > _CHEB_END)
    tail[beyond] = _g_fraction(np.minimum(af[beyond], _ZERO_FROM), _FRACTION_LEVELS)
    tail = _times_exp_minus_square(tail, w[far], s)     # g·e^(−x²) = erfc(|x|)
    np.subtract(2.0, tail, out=tail, where=x[far] < 0)
    out[far] = tail
    return out


def _as_float64(name, x):
    """``x`` as a flat float64 array (flat, so that a number is an array too); anything but real
    numbers (ints, floats) is refused by name."""
    a = np.asarray(x)
    if a.dtype.kind not in "iuf":
        raise TypeError(f"{name} must be real numbers (an int or float array or number), got dtype {a.dtype}")
    return a.astype(np.float64, copy=False).reshape(-1)


def _result(out, like):
    """``out`` in the shape of the input: a NumPy scalar for a number, as a ufunc gives."""
    return out.reshape(np.shape(like))[()]


def erfc(x):
    """The complementary error function ``erfc(x) = 1 − erf(x)``, elementwise.

    Args:
        x: array (or number) of real values, any shape.

    Returns:
        float64 of x's shape, with relative error below 1e-14 wherever erfc(x) is a normal
        float64 (x < 26.5); beyond, it rounds into the subnormals and then to 0 like ``math.erfc``.
    """
    xa = _as_float64("x", x)
    return _result(_erfc(xa, xa, 1.0), x)


def normal_cdf(z):
    """The standard normal CDF ``Φ(z) = ½ erfc(−z/√2)``, elementwise, float64.

    Exact to float64 precision in both tails: Φ(−30) = 4.9e-198 with every digit, where
    ``1 − Φ(30)`` would be 0. The exponent z²/2 is formed from z itself (module docstring).
    """
    za = _as_float64("z", z)
    out = _erfc(-za / math.sqrt(2.0), za, 0.5)
    out *= 0.5
    return _result(out, z)


def normal_pdf(z):
    """The standard normal density ``φ(z) = e^(−z²/2) / √(2π)`` — the derivative of Φ — float64."""
    za = _as_float64("z", z)
    out = _times_exp_minus_square(1 / math.sqrt(2.0 * math.pi), za, 0.5)   # NaN stays NaN; ±∞ give 0
    return _result(out, z)
