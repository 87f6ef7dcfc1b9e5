"""Tests of the argument checks in minimoe/validate.py: each message names the
argument and says what was expected."""
import numpy as np
import pytest

from minimoe.validate import check_array, check_choice, check_dtype, check_int, check_positive_float, check_rng
from minimoe import validate


# --------------------------------------------------------------------------- check_array
def test_check_array_returns_its_input_unchanged():
    x = np.ones((2, 3))
    assert check_array("x", x, ndim=2, shape=(None, 3)) is x


def test_check_array_type_and_dtype():
    with pytest.raises(TypeError, match="x must be a numpy array, got list"):
        check_array("x", [1.0, 2.0])
    with pytest.raises(TypeError, match=r"W must have a floating dtype \(float32 or float64\), got int32"):
        check_array("W", np.ones(3, dtype=np.int32))
    with pytest.raises(TypeError, match="got bool"):
        check_array("mask", np.ones(3, dtype=bool))
    assert check_array("mask", np.ones(3, dtype=bool), floating=False).dtype == bool
    assert check_array("x", np.ones(3, dtype=np.float32)).dtype == np.float32


def test_check_array_rank():
    with pytest.raises(ValueError, match=r"x must have 2 dimensions, got shape \(3,\)"):
        check_array("x", np.ones(3), ndim=2)
    with pytest.raises(ValueError, match=r"x must have 2 or 3 dimensions, got shape \(\)"):
        check_array("x", np.array(1.0), ndim=(2, 3))
    with pytest.raises(ValueError, match=r"x must have 1 to 7 dimensions, got shape \(\)"):
        check_array("x", np.array(1.0), ndim=range(1, 8))


def test_check_array_shape_messages_show_wildcards_and_one_tuples():
    with pytest.raises(ValueError, match=r"x must have shape \(\?, 4\), got \(5, 3\)"):
        check_array("x", np.ones((5, 3)), shape=(None, 4))
    with pytest.raises(ValueError, match=r"b must have shape \(4,\), got \(4, 1\)"):
        check_array("b", np.ones((4, 1)), shape=(4,))
    with pytest.raises(ValueError, match=r"b1 must have shape \(3, 5\), got \(3,\)"):
        check_array("b1", np.ones(3), shape=(3, 5))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_check_array_non_finite(bad):
    x = np.ones((2, 2))
    x[1, 0] = bad
    with pytest.raises(ValueError, match="x contains NaN or inf"):
        check_array("x", x)
    assert check_array("x", x, finite=False) is x
    assert check_array("x", np.zeros((0, 3))).shape == (0, 3)    # empty is finite


# --------------------------------------------------------------------------- scalars
def test_check_int():
    assert check_int("k", np.int64(2), low=1, high=4) == 2
    with pytest.raises(TypeError, match="k must be an integer, got 2.0"):
        check_int("k", 2.0)
    with pytest.raises(TypeError, match="k must be an integer, got True"):
        check_int("k", True)
    with pytest.raises(ValueError, match="k must be >= 1, got 0"):
        check_int("k", 0, low=1)
    with pytest.raises(ValueError, match="k must be <= 4, got 5"):
        check_int("k", 5, high=4)


def test_check_positive_float():
    assert check_positive_float("capacity_factor", 1) == 1.0
    assert check_positive_float("w", 0, allow_zero=True) == 0.0
    with pytest.raises(ValueError, match="capacity_factor must be a finite number > 0, got 0"):
        check_positive_float("capacity_factor", 0)
    with pytest.raises(ValueError, match="w must be a finite number >= 0, got -0.5"):
        check_positive_float("w", -0.5, allow_zero=True)
    with pytest.raises(ValueError, match="lr must be a finite number > 0, got nan"):
        check_positive_float("lr", float("nan"))
    with pytest.raises(TypeError, match="lr must be a number, got '0.1'"):
        check_positive_float("lr", "0.1")


def test_check_choice():
    assert check_choice("gate", "topk", ("dense", "topk")) == "topk"
    with pytest.raises(ValueError, match="gate must be one of 'dense', 'topk'; got 'tpok'"):
        check_choice("gate", "tpok", ("dense", "topk"))
    with pytest.raises(ValueError, match="gate must be one of"):
        check_choice("gate", np.array([1.0, 2.0]), ("dense", "topk"))   # no ambiguous-truth crash
    with pytest.raises(ValueError, match="gate must be one of"):
        check_choice("gate", ["dense"], ("dense", "topk"))


def test_check_rng():
    g = np.random.default_rng(0)
    assert check_rng("rng", g) is g                                   # a Generator is used as it is
    # SPEC 7: an int seed, a SeedSequence, a BitGenerator, a seed sequence: the same numbers
    want = np.random.default_rng(0).standard_normal(5)
    for seed in (0, np.int64(0), np.random.SeedSequence(0), np.random.PCG64(0)):
        out = check_rng("rng", seed)
        assert isinstance(out, np.random.Generator)
        np.testing.assert_array_equal(out.standard_normal(5), want)
    np.testing.assert_array_equal(check_rng("rng", [1, 2]).standard_normal(3),
                                  np.random.default_rng([1, 2]).standard_normal(3))
    msg = r"rng must be a numpy.random.Generator, an int seed or a SeedSequence"
    for bad, got in ((np.random.RandomState(0), "got RandomState"), (None, "got NoneType"),
                     (True, "got bool"), (0.5, "got float 0.5"), ("seed", "got str 'seed'"),
                     (-1, "got int -1")):
        with pytest.raises(TypeError, match=msg) as err:
            check_rng("rng", bad)
        assert got in str(err.value), (bad, str(err.value))


def test_rng_int_seed_is_accepted_everywhere():
    """SPEC 7 through the public classes: ``rng=0`` builds the same layer as ``default_rng(0)``."""
    from minimoe import MoELayer
    a = MoELayer(d_model=4, d_hidden=8, n_experts=4, k=2, rng=0)
    b = MoELayer(d_model=4, d_hidden=8, n_experts=4, k=2, rng=np.random.default_rng(0))
    for name, value in a.params.items():
        np.testing.assert_array_equal(value, b.params[name], err_msg=name)
    from minimoe import experts, router
    np.testing.assert_array_equal(router.init_gate_weights(4, 3, 7),
                                  router.init_gate_weights(4, 3, np.random.default_rng(7)))
    e0, e1 = experts.init_expert_params(2, 4, 3, 5), experts.init_expert_params(2, 4, 3, np.random.default_rng(5))
    for name in e0:
        np.testing.assert_array_equal(e0[name], e1[name], err_msg=name)


def test_check_dtype():
    assert check_dtype("dtype", np.float32) == np.dtype(np.float32)
    assert check_dtype("dtype", "float64") == np.dtype(np.float64)
    with pytest.raises(TypeError, match="dtype must be a floating dtype .* got int64"):
        check_dtype("dtype", np.int64)
    with pytest.raises(TypeError, match="dtype must be a numpy dtype such as np.float64"):
        check_dtype("dtype", "floaty")


def test_check_tokens_flattens_and_names_the_problem():
    from minimoe.validate import check_tokens
    x = np.ones((2, 3, 4))
    x2, shape = check_tokens(x, 4, np.float32)
    assert x2.shape == (6, 4) and x2.dtype == np.float32 and shape == (2, 3, 4)
    same, _ = check_tokens(x[0], 4, np.float64)
    assert np.shares_memory(same, x)                      # no copy when nothing changes
    with pytest.raises(ValueError, match=r"x must have 2 or 3 dimensions"):
        check_tokens(np.ones(4), 4, np.float64)
    with pytest.raises(ValueError, match=r"width d_model=5 in its last axis, got shape \(2, 3, 4\)"):
        check_tokens(x, 5, np.float64)
    with pytest.raises(ValueError, match=r"at least one token, got shape \(0, 4\)"):
        check_tokens(np.ones((0, 4)), 4, np.float64)
    with pytest.raises(ValueError, match="NaN or inf"):
        check_tokens(np.full((2, 4), np.nan), 4, np.float64)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_check_array_finds_one_bad_entry_in_a_big_array(bad):
    x = np.zeros((64, 128, 8))
    x[17, 3, 5] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        check_array("W1", x)


def test_check_array_accepts_huge_finite_values_whose_sum_overflows():
    x = np.full(4, np.finfo(np.float32).max, dtype=np.float32)   # the sum is inf, no entry is
    with np.errstate(over="raise"):
        assert check_array("W", x) is x


# --------------------------------------------------------------------------- check_shapes
from minimoe.validate import check_shapes  # noqa: E402


def test_check_shapes_binds_symbols_and_returns_them():
    sizes = check_shapes(W=(np.ones((3, 5)), ("d", "h")), x=(np.ones((2, 7, 3)), ("...", "d")),
                         b=(np.ones(5), ("h",)))
    assert sizes == {"d": 3, "h": 5, "...": (2, 7)}


def test_check_shapes_messages():
    W1 = np.ones((4, 8))
    with pytest.raises(ValueError, match=r"W1 must have 3 dimensions, got shape \(4, 8\)"):
        check_shapes(W1=(W1, ("E", "d", "h")))
    with pytest.raises(ValueError, match=r"x must have shape \(\?, 4\), got \(5, 3\)"):
        check_shapes(W1=(W1, ("d", "h")), x=(np.ones((5, 3)), ("N", "d")))
    with pytest.raises(ValueError, match=r"x has width 3 but W1 expects d=4 \(W1 has shape \(4, 8\)\)"):
        check_shapes(W1=(W1, ("d", "h")), x=(np.ones((2, 2, 3)), ("...", "d")))
    with pytest.raises(ValueError, match=r"b must have shape \(8,\), got \(4,\)"):
        check_shapes(W1=(W1, ("d", "h")), b=(np.ones(4), ("h",)))
    with pytest.raises(ValueError, match=r"labels must have shape \(3,\) \(one per row\), got \(2,\)"):
        check_shapes(z=(np.ones((3, 4)), ("...", "C")), labels=(np.zeros(2, int), ("...",), "one per row"),
                     integer=("labels",))
    with pytest.raises(TypeError, match="labels must be integers, got dtype float64"):
        check_shapes(labels=(np.zeros(2), ("T",)), integer=("labels",))
    with pytest.raises(ValueError, match="x contains NaN or inf"):
        check_shapes(x=(np.array([np.nan]), ("T",)))
    check_shapes(x=(np.array([np.nan]), ("T",)), finite=False)           # finite=False: allowed
    check_shapes(x=(np.array([np.nan]), ("T",)), y=(np.ones(1), ("T",)), finite=("y",))
    with pytest.raises(TypeError, match="x must be a numpy array, got list"):
        check_shapes(x=([1.0], ("T",)))


# --------------------------------------------------------------------------- issue 26: every bound, at and beside it
@pytest.mark.parametrize("low, high", [(1, 5), (-3, 0), (0, None), (None, 7)])
def test_check_int_accepts_its_bounds_and_refuses_one_past(low, high):
    """At the bound is accepted, one past it refused, with the bound in the message (issue 26:
    check_int rejecting the bound itself survived the validate tests)."""
    for b in (low, high):
        if b is not None:
            assert validate.check_int("n", b, low=low, high=high) == b
    if low is not None:
        assert validate.check_int("n", low + 1, low=low, high=high) == low + 1 or high == low
        with pytest.raises(ValueError, match=f"n must be >= {low}, got {low - 1}"):
            validate.check_int("n", low - 1, low=low, high=high)
    if high is not None:
        with pytest.raises(ValueError, match=f"n must be <= {high}, got {high + 1}"):
            validate.check_int("n", high + 1, low=low, high=high)


@pytest.mark.parametrize("allow_zero", [False, True])
def test_check_positive_float_at_zero_and_beside_it(allow_zero):
    tiny = np.nextafter(0.0, 1.0)
    assert validate.check_positive_float("w", tiny, allow_zero=allow_zero) == tiny
    if allow_zero:
        assert validate.check_positive_float("w", 0.0, allow_zero=True) == 0.0
    else:
        with pytest.raises(ValueError, match="w must be a finite number > 0, got 0.0"):
            validate.check_positive_float("w", 0.0)
    with pytest.raises(ValueError, match="w must be a finite number"):
        validate.check_positive_float("w", -tiny, allow_zero=allow_zero)
    for bad in (np.inf, np.nan):
        with pytest.raises(ValueError, match="finite"):
            validate.check_positive_float("w", bad, allow_zero=allow_zero)


@pytest.mark.parametrize("low, high", [(1, 5), (1, None), (None, 3)])
def test_arg_int_at_and_beside_its_bounds(low, high):
    import argparse
    parse = validate.arg_int(low, high)
    for b in (low, high):
        if b is not None:
            assert parse(str(b)) == b
    for past in ([low - 1] if low is not None else []) + ([high + 1] if high is not None else []):
        with pytest.raises(argparse.ArgumentTypeError, match=f"got '{past}'"):
            parse(str(past))
