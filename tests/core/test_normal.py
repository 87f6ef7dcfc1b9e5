"""Φ, φ and erfc in NumPy (minimoe/core/normal.py) against references that share none of its code.

Two references: ``math.erfc`` (the C library's, correctly rounded to about one ulp) on dense
grids and random points, and, where even that is not enough (Φ and φ far in the tails, where
rounding −z/√2 or z² already costs digits), a 60-digit decimal erfc written here from the
definitions: the Maclaurin series of erf and Laplace's continued fraction.
"""
import math
from decimal import Decimal, localcontext

import numpy as np
import pytest

from minimoe.core import normal

TINY = np.finfo(np.float64).tiny          # the smallest normal float64, 2.2e-308
SUBNORMAL_ULP = 5e-324                    # the spacing of the subnormals
REL = 1e-14                               # the accuracy the module promises


# --------------------------------------------------------------------------- a decimal reference
DIGITS = 60


def _dec_pi():
    """π by Machin's formula π = 16 atan(1/5) − 4 atan(1/239), to DIGITS + 10 digits."""
    with localcontext() as ctx:
        ctx.prec = DIGITS + 10

        def atan_inv(n):
            x2, term, total, k = Decimal(1) / (n * n), Decimal(1) / n, Decimal(1) / n, 1
            while abs(term) > Decimal(10) ** -(DIGITS + 8):
                term *= -x2
                k += 2
                total += term / k
            return total
        return 16 * atan_inv(5) - 4 * atan_inv(239)


PI = _dec_pi()


def dec_erfc(x):
    """erfc of a Decimal (or an exactly converted float) to about DIGITS significant digits."""
    x = Decimal(x)
    with localcontext() as ctx:
        if abs(x) < 4:
            # 1 − erf(x), erf(x) = (2/√π) Σ (−1)ⁿ x^(2n+1) / (n!(2n+1)): the terms grow to about
            # e^(x²) and erfc is about e^(−x²), so carry 2x²/ln 10 guard digits.
            ctx.prec = DIGITS + 20 + int(2 * x * x / Decimal(2.3))
            x2, power, total, n = x * x, x, Decimal(0), 0       # power = x^(2n+1)/n!
            while abs(power) > Decimal(10) ** -(ctx.prec + 5) or n < 3:
                total += (power if n % 2 == 0 else -power) / (2 * n + 1)
                n += 1
                power = power * x2 / n
            return +(1 - 2 * total / PI.sqrt())
        # Laplace: √π e^(x²) erfc(x) = 1/(x + (1/2)/(x + 1/(x + (3/2)/(x + ...)))), for x ≥ 4;
        # 400 levels are converged far beyond DIGITS there.
        ctx.prec = DIGITS + 20
        a = abs(x)
        f = a
        for n in range(400, 0, -1):
            f = a + Decimal(n) / 2 / f
        tail = (-(a * a)).exp() / (f * PI.sqrt())
        return +(tail if x > 0 else 2 - tail)


def dec_normal_cdf(z):
    """Φ(z) = ½ erfc(−z/√2) with z taken exactly and √2 to 80 digits."""
    with localcontext() as ctx:
        ctx.prec = DIGITS + 20
        return dec_erfc(-Decimal(z) / Decimal(2).sqrt()) / 2


def dec_normal_pdf(z):
    with localcontext() as ctx:
        ctx.prec = DIGITS + 20
        z = Decimal(z)
        return (-(z * z) / 2).exp() / (2 * PI).sqrt()


def _rel_error(got, ref):
    """|got − ref| / |ref|, elementwise, with ref a list of Decimals or floats."""
    return np.array([abs(float((Decimal(float(g)) - Decimal(r)) / Decimal(r))) if r != 0 else abs(float(g))
                     for g, r in zip(np.ravel(got), ref)])


def test_the_decimal_reference_agrees_with_math_erfc():
    # The two references back each other up before either judges the module.
    for x in [-3.0, -0.7, 0.0, 0.3, 1.0, 2.5, 3.999, 4.0, 6.0, 12.5, 26.0]:
        assert abs(float(dec_erfc(x)) - math.erfc(x)) <= 2.5e-16 * math.erfc(x), x


# --------------------------------------------------------------------------- erfc against math.erfc
def _check_against_math(x):
    """Relative error ≤ 1e-14 where erfc is a normal float64; ≤ 2 subnormal spacings below."""
    x = np.asarray(x, dtype=np.float64)
    got = normal.erfc(x)
    ref = np.array([math.erfc(v) for v in x])
    normal_range = ref >= TINY
    rel = np.abs(got[normal_range] - ref[normal_range]) / ref[normal_range]
    worst = int(np.argmax(rel))
    assert rel[worst] <= REL, f"erfc({x[normal_range][worst]!r}): relative error {rel[worst]:.2e}"
    assert np.all(np.abs(got[~normal_range] - ref[~normal_range]) <= 2 * SUBNORMAL_ULP)
    return rel.max()


def test_erfc_on_a_dense_grid_through_both_tails():
    # Step 1/8000 from −30 (erfc = 2) to 30 (erfc = 0): every region and both boundaries.
    _check_against_math(np.linspace(-30.0, 30.0, 480_001))


def test_erfc_right_at_the_region_boundaries():
    # ½ (series | polynomial), 3 (polynomial | continued fraction), 27.3 (→ 0), on both sides, by ulps.
    edges = []
    for b in (0.5, 3.0, 26.5, 27.3):
        for sign in (1, -1):
            v = sign * b
            edges += [v, np.nextafter(v, np.inf), np.nextafter(v, -np.inf),
                      v + 1e-12, v - 1e-12, v + 1e-6, v - 1e-6]
    _check_against_math(edges)


def test_erfc_at_random_points_of_every_scale(rng):
    uniform = rng.uniform(-8.0, 28.0, 100_000)
    magnitudes = 10.0 ** rng.uniform(-300, np.log10(28.0), 50_000) * rng.choice([-1.0, 1.0], 50_000)
    normal_draws = 3.0 * rng.standard_normal(50_000)
    _check_against_math(np.concatenate([uniform, magnitudes, normal_draws]))


def test_erfc_special_values():
    x = np.array([0.0, -0.0, 5e-324, -5e-324, np.inf, -np.inf, np.nan, 1e300, -1e300, 27.3, 40.0, -6.0, -40.0])
    got = normal.erfc(x)
    np.testing.assert_array_equal(got, [1.0, 1.0, 1.0, 1.0, 0.0, 2.0, np.nan, 0.0, 2.0, 0.0, 0.0, 2.0, 2.0])
    assert np.isnan(normal.erfc(np.nan))


def test_erfc_raises_no_floating_point_warning_anywhere():
    # Underflow into the subnormals is the right answer (and NumPy ignores it by default);
    # overflow, 0/0 or inf−inf would mean a hidden NaN or inf somewhere in the computation.
    x = np.array([0.0, 0.49, 0.5, 2.9, 3.0, 26.0, 27.29, 27.3, 1e10, 1e300, np.finfo(float).max,
                  np.inf, np.nan])
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        normal.erfc(np.concatenate([x, -x]))
        z = np.concatenate([x, -x, [38.6, -38.6, 38.7, -38.7, 39.9, -39.9, 40.0, -40.0]])
        normal.normal_cdf(z)
        normal.normal_pdf(z)


# --------------------------------------------------------------------------- Φ and φ
def test_normal_cdf_against_the_decimal_reference_deep_into_both_tails(rng):
    # Down to Φ(−37.5) ≈ 5e-309: relative 1e-14 everywhere Φ is a normal float64. (½·math.erfc(−z/√2)
    # would not pass far out: rounding z/√2 alone costs z²·1.1e-16, 1.5e-13 at z = −37.)
    z = np.concatenate([np.linspace(-37.5, 8.5, 93), rng.uniform(-37.5, 8.5, 60),
                        [-1e-300, 0.0, 1e-10, -0.7, 0.7, -1.0, 1.0, -4.3, -36.0]])
    ref = [dec_normal_cdf(v) for v in z]
    assert _rel_error(normal.normal_cdf(z), ref).max() <= REL


def test_normal_cdf_matches_half_math_erfc_where_that_is_accurate(rng):
    # For |z| ≤ 5 the rounding of z/√2 costs at most 2.8e-15, so ½·math.erfc(−z/√2) is a fair reference.
    z = np.concatenate([np.linspace(-5.0, 5.0, 20_001), rng.uniform(-5.0, 5.0, 20_000)])
    ref = np.array([0.5 * math.erfc(-v / math.sqrt(2.0)) for v in z])
    assert np.max(np.abs(normal.normal_cdf(z) - ref) / ref) <= REL


def test_normal_cdf_special_values_and_symmetry(rng):
    got = normal.normal_cdf(np.array([0.0, -np.inf, np.inf, np.nan, -40.0, 40.0, -1e300, 1e300]))
    np.testing.assert_array_equal(got, [0.5, 0.0, 1.0, np.nan, 0.0, 1.0, 0.0, 1.0])
    z = rng.uniform(-6.0, 6.0, 1000)
    np.testing.assert_allclose(normal.normal_cdf(z) + normal.normal_cdf(-z), 1.0, rtol=0, atol=2.3e-16)
    assert normal.normal_cdf(-30.0) > 0                  # the exact tail, not 1 − Φ(30) = 0


def test_normal_pdf_against_the_decimal_reference(rng):
    # e^(−z²/2) with z² rounded would be off by z²·1.1e-16 relative (1.5e-13 at z = 37).
    z = np.concatenate([np.linspace(-37.5, 37.5, 151), rng.uniform(-37.5, 37.5, 50), [0.0, 1e-200]])
    assert _rel_error(normal.normal_pdf(z), [dec_normal_pdf(v) for v in z]).max() <= REL
    np.testing.assert_array_equal(normal.normal_pdf(np.array([np.inf, -np.inf, 40.0, 1e300, np.nan])),
                                  [0.0, 0.0, 0.0, 0.0, np.nan])


def test_normal_pdf_is_the_derivative_of_normal_cdf():
    # A central difference of Φ, step 1e-5, against φ: the two functions belong together. (Up to
    # z = 1: beyond, Φ is near 1 and the difference of two such values loses the digits.)
    z = np.linspace(-8.0, 1.0, 91)
    h = 1e-5
    slope = (normal.normal_cdf(z + h) - normal.normal_cdf(z - h)) / (2 * h)
    np.testing.assert_allclose(slope, normal.normal_pdf(z), rtol=1e-8, atol=0)


# --------------------------------------------------------------------------- dtype, shape, input
@pytest.mark.parametrize("f", [normal.erfc, normal.normal_cdf, normal.normal_pdf])
def test_float32_and_int_input_give_float64_of_the_same_values(f):
    x32 = np.linspace(-5, 5, 24, dtype=np.float32).reshape(2, 3, 4)
    out = f(x32)
    assert out.dtype == np.float64 and out.shape == (2, 3, 4)
    np.testing.assert_array_equal(out, f(x32.astype(np.float64)))
    np.testing.assert_array_equal(f(np.arange(-3, 4)), f(np.arange(-3.0, 4.0)))


@pytest.mark.parametrize("f", [normal.erfc, normal.normal_cdf, normal.normal_pdf])
def test_numbers_give_numbers_and_empty_arrays_give_empty_arrays(f):
    assert np.ndim(f(0.25)) == 0 and isinstance(f(0.25), float)
    assert f(0.25) == f(np.array([0.25]))[0]
    assert f(np.zeros((0, 3))).shape == (0, 3)


@pytest.mark.parametrize("f, name", [(normal.erfc, "x"), (normal.normal_cdf, "z"), (normal.normal_pdf, "z")])
def test_non_real_input_is_refused_by_name(f, name):
    with pytest.raises(TypeError, match=rf"{name} must be real numbers .* got dtype <U3"):
        f(np.array(["0.5"]))
    with pytest.raises(TypeError, match=rf"{name} must be real numbers .* got dtype complex128"):
        f(np.array([1 + 1j]))


# --------------------------------------------------------------------------- the method's own numbers
def _dec_cos_pi_fraction(m, n):
    """cos(π m / (2n)) to DIGITS digits, by its Taylor series after reducing m modulo 4n."""
    with localcontext() as ctx:
        ctx.prec = DIGITS + 10
        t = PI * (m % (4 * n)) / (2 * n)
        total, term, k = Decimal(0), Decimal(1), 0
        while abs(term) > Decimal(10) ** -(DIGITS + 8):
            total += term
            k += 2
            term = -term * t * t / (k * (k - 1))
        return total


def dec_chebyshev_coefficients(n=32):
    """g(x) = e^(x²) erfc(x) interpolated on [½, 3] at n Chebyshev nodes, in decimal arithmetic:
    cₖ = (2/n) Σⱼ g(xⱼ) cos(k θⱼ), θⱼ = π(2j+1)/(2n), xⱼ = 7/4 + (5/4) cos θⱼ (c₀ halved)."""
    with localcontext() as ctx:
        ctx.prec = DIGITS + 10
        cos = {m: _dec_cos_pi_fraction(m, n) for m in range(4 * n)}
        nodes = [Decimal("1.75") + Decimal("1.25") * cos[2 * j + 1] for j in range(n)]
        g = [dec_erfc(x) * (x * x).exp() for x in nodes]
        c = [2 * sum(g[j] * cos[(k * (2 * j + 1)) % (4 * n)] for j in range(n)) / n for k in range(n)]
        c[0] /= 2
        return c


def _chebyshev_polynomials_in_powers(n):
    """The integer coefficients of T₀ … Tₙ₋₁ in powers of y: T₀ = 1, T₁ = y, Tₖ₊₁ = 2y Tₖ − Tₖ₋₁."""
    T = [[1], [0, 1]]
    while len(T) < n:
        nxt = [0] + [2 * v for v in T[-1]]
        for i, v in enumerate(T[-2]):
            nxt[i] -= v
        T.append(nxt)
    return T[:n]


def test_the_polynomial_table_is_the_chebyshev_interpolant_of_g_to_the_last_bit():
    exact = dec_chebyshev_coefficients()
    n = len(normal._G_POLY)
    # the Chebyshev coefficients left out add up to less than 1/64 of an ulp of g's smallest
    # value, g(3) ≈ 0.179, and one fewer would not
    assert float(sum(abs(c) for c in exact[n:])) < np.spacing(0.179) / 64
    assert float(sum(abs(c) for c in exact[n - 1:])) > np.spacing(0.179) / 64
    T = _chebyshev_polynomials_in_powers(n)
    with localcontext() as ctx:
        ctx.prec = DIGITS + 10
        powers = [sum(exact[j] * T[j][k] for j in range(k, n)) for k in range(n)]
    assert [float(a) for a in powers] == list(normal._G_POLY)


def test_horner_on_the_power_form_is_as_accurate_as_the_interpolant():
    # The power form's coefficients shrink and their absolute values add up to g(½), so summing
    # them in float64 costs no more than an ulp or two of g anywhere on [½, 3].
    a = np.abs(normal._G_POLY)
    assert np.all(a[1:] < a[:-1] * 0.75) and math.isclose(a.sum(), float(dec_erfc(0.5)) * math.exp(0.25), rel_tol=1e-12)
    x = np.linspace(0.5, 3.0, 501)
    with localcontext() as ctx:
        ctx.prec = DIGITS
        ref = [dec_erfc(v) * (Decimal(v) * Decimal(v)).exp() for v in x]
    assert _rel_error(normal._g_polynomial(x), ref).max() <= 1e-15


def test_twenty_levels_of_the_continued_fraction_suffice_from_3_on():
    x = np.concatenate([np.linspace(3.0, 27.3, 244), [3.0, np.nextafter(3.0, 4)]])
    g = normal._g_fraction(x, normal._FRACTION_LEVELS)
    with localcontext() as ctx:
        ctx.prec = DIGITS
        ref = [dec_erfc(v) * (Decimal(v) * Decimal(v)).exp() for v in x]
    assert _rel_error(g, ref).max() <= 4.5e-16
