"""Tests of the specialists in minimoe/core/experts.py: one FFN expert and a bank of E.

Gradient checks of every pair and class; the bank against an independent plain-NumPy
reference run group by group; the init scale checked statistically; bad input named.
"""
import doctest

from types import SimpleNamespace

import numpy as np
import pytest

from minimoe import experts
from minimoe import gradcheck as gc
from minimoe.core import fast
from minimoe.core.experts import Expert, ExpertBank, ffn_backward, ffn_forward, init_expert_params

# The textbook bank (a loop of ffn_forward/ffn_backward) and the fast one must pass the same tests.
# fast.py's bank under the textbook's names, so one test body serves both
FAST_BANK = SimpleNamespace(experts_forward=fast.experts_forward_fast, experts_backward=fast.experts_backward_fast)
BANKS = pytest.mark.parametrize("bank", [experts, FAST_BANK], ids=["textbook", "fast"])


def _assert_passed(reports):
    assert reports and all(r.passed for r in reports), gc.format_reports(reports)


def _relu_mask(out, cache):
    """Selection signature for a gradient check: which hidden units are on.

    A finite-difference step that switches a ReLU on or off crosses a kink; with
    this signature the checker raises KinkError instead of reporting a bogus error.
    """
    if isinstance(cache, experts.BankCache):          # the textbook bank: one FFN cache per expert
        return tuple(_relu_mask(None, c) for c in cache.ffn)
    name, inner = cache.act
    return inner.positive if name == "relu" else 0


def _random_params(rng, E, d, h, scale=1.0):
    """Random weights *and biases* (init_expert_params zeroes the biases; a check needs them nonzero)."""
    return {"W1": scale * rng.standard_normal((E, d, h)), "b1": rng.standard_normal((E, h)),
            "W2": scale * rng.standard_normal((E, h, d)), "b2": rng.standard_normal((E, d))}


def _offsets(sizes):
    return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


def _reference_bank(x, offsets, W1, b1, W2, b2):
    """Independent reference: each group through a plain-NumPy ReLU FFN."""
    y = np.zeros((x.shape[0], W2.shape[2]))
    for e in range(W1.shape[0]):
        s, t = offsets[e], offsets[e + 1]
        y[s:t] = np.maximum(x[s:t] @ W1[e] + b1[e], 0) @ W2[e] + b2[e]
    return y


# --------------------------------------------------------------------------- one expert, functional
# (n tokens, d, h): T=1, h=1, d=1, and an ordinary case.
FFN_SHAPES = [(1, 3, 4), (5, 4, 1), (4, 1, 3), (6, 4, 8)]


@pytest.mark.parametrize("n, d, h", FFN_SHAPES)
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("seed", [0, 1])
def test_ffn_gradcheck(n, d, h, activation, seed):
    rng = np.random.default_rng(seed)
    params = {k: v[0] for k, v in _random_params(rng, 1, d, h).items()}
    x = rng.standard_normal((n, d))
    _assert_passed(gc.check_pair(ffn_forward, ffn_backward, x, params, rng=rng,
                                 kwargs={"activation": activation}, selection=_relu_mask))


def test_ffn_matches_plain_numpy(rng):
    p = {k: v[0] for k, v in _random_params(rng, 1, 4, 6).items()}
    x = rng.standard_normal((5, 4))
    y, _ = ffn_forward(x, **p)
    np.testing.assert_allclose(y, np.maximum(x @ p["W1"] + p["b1"], 0) @ p["W2"] + p["b2"], rtol=1e-13)


# --------------------------------------------------------------------------- the bank, functional
# (E, d, h, tokens per expert): an empty group first, last and in the middle; E=1; T=1; h=1.
BANK_CASES = [(3, 4, 5, [2, 0, 3]), (4, 3, 2, [0, 1, 4, 0]), (1, 4, 3, [1]),
              (2, 3, 1, [3, 2]), (5, 2, 4, [1, 1, 0, 2, 1])]


@pytest.mark.parametrize("E, d, h, sizes", BANK_CASES)
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@BANKS
def test_experts_gradcheck(bank, E, d, h, sizes, activation):
    rng = np.random.default_rng(E * 100 + d * 10 + h)
    params = _random_params(rng, E, d, h)
    x = rng.standard_normal((sum(sizes), d))
    _assert_passed(gc.check_pair(bank.experts_forward, bank.experts_backward, x, params, rng=rng,
                                 kwargs={"offsets": _offsets(sizes), "activation": activation},
                                 selection=_relu_mask))


@pytest.mark.parametrize("E, d, h, sizes", BANK_CASES)
@BANKS
def test_bank_matches_plain_numpy_per_group(bank, E, d, h, sizes):
    rng = np.random.default_rng(7)
    p = _random_params(rng, E, d, h)
    x, offsets = rng.standard_normal((sum(sizes), d)), _offsets(sizes)
    y, _ = bank.experts_forward(x, offsets, **p)
    np.testing.assert_allclose(y, _reference_bank(x, offsets, **p), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("activation", ["relu", "gelu"])
@BANKS
def test_bank_equals_ffn_per_group_forward_and_backward(bank, rng, activation):
    E, d, h, sizes = 3, 4, 6, [3, 0, 2]
    p, offsets = _random_params(rng, E, d, h), _offsets(sizes)
    x = rng.standard_normal((sum(sizes), d))
    dy = rng.standard_normal(x.shape)
    y, cache = bank.experts_forward(x, offsets, **p, activation=activation)
    dx, grads = bank.experts_backward(dy, cache)
    for e in range(E):
        s, t = offsets[e], offsets[e + 1]
        if s == t:
            continue
        pe = {k: v[e] for k, v in p.items()}
        ye, ce = ffn_forward(x[s:t], **pe, activation=activation)
        dxe, ge = ffn_backward(dy[s:t], ce)
        np.testing.assert_allclose(y[s:t], ye, rtol=1e-13, atol=1e-14)
        np.testing.assert_allclose(dx[s:t], dxe, rtol=1e-13, atol=1e-14)
        for k in pe:
            np.testing.assert_allclose(grads[k][e], ge[k], rtol=1e-13, atol=1e-14)


@BANKS
def test_empty_group_gets_exactly_zero_grads(bank, rng):
    E, d, h, sizes = 4, 3, 5, [2, 0, 3, 0]
    p, offsets = _random_params(rng, E, d, h), _offsets(sizes)
    y, cache = bank.experts_forward(rng.standard_normal((5, d)), offsets, **p)
    _, grads = bank.experts_backward(rng.standard_normal(y.shape), cache)
    for e in (1, 3):
        for k in ("W1", "b1", "W2", "b2"):
            assert np.all(grads[k][e] == 0.0), (k, e)
    for e in (0, 2):                       # and the busy experts do learn something
        assert np.any(grads["W1"][e] != 0.0) and np.any(grads["b2"][e] != 0.0)


@BANKS
def test_bank_with_no_tokens_at_all(bank, rng):
    p = _random_params(rng, 3, 4, 2)
    y, cache = bank.experts_forward(np.zeros((0, 4)), _offsets([0, 0, 0]), **p)
    dx, grads = bank.experts_backward(np.zeros((0, 4)), cache)
    assert y.shape == dx.shape == (0, 4)
    assert all(np.all(g == 0) and g.shape == p[k].shape for k, g in grads.items())


@BANKS
def test_bank_float32_in_float32_out(bank, rng):
    p = {k: v.astype(np.float32) for k, v in _random_params(rng, 3, 4, 5).items()}
    x = rng.standard_normal((6, 4)).astype(np.float32)
    offsets = _offsets([2, 1, 3])
    y, cache = bank.experts_forward(x, offsets, **p)
    dx, grads = bank.experts_backward(np.ones_like(y), cache)
    assert y.dtype == dx.dtype == np.float32
    assert all(g.dtype == np.float32 for g in grads.values())
    np.testing.assert_allclose(y, _reference_bank(x.astype(np.float64), offsets,
                                                  **{k: v.astype(np.float64) for k, v in p.items()}),
                               rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- the classes
@pytest.mark.parametrize("n, d, h", FFN_SHAPES)
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_expert_class_check_layer(n, d, h, activation):
    rng = np.random.default_rng(n + d + h)
    ex = Expert(d, h, activation=activation, rng=rng)
    ex.params["b1"][:] = rng.standard_normal(h)      # nonzero biases, so their gradients matter
    ex.params["b2"][:] = rng.standard_normal(d)
    _assert_passed(gc.check_layer(ex, rng.standard_normal((n, d)), rng=rng))


@pytest.mark.parametrize("E, d, h, sizes", BANK_CASES)
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_expert_bank_check_layer(E, d, h, sizes, activation):
    rng = np.random.default_rng(E + d + h)
    bank = ExpertBank(E, d, h, activation=activation, rng=rng)
    bank.params["b1"][:] = rng.standard_normal((E, h))
    bank.params["b2"][:] = rng.standard_normal((E, d))
    _assert_passed(gc.check_layer(bank, rng.standard_normal((sum(sizes), d)), rng=rng,
                                  forward_kwargs={"offsets": _offsets(sizes)}))


def test_check_layer_catches_a_wrong_class_backward(rng):
    bank = ExpertBank(2, 3, 4, rng=rng)
    right = bank.backward

    def wrong(dy):
        dx = right(dy)
        bank.grads["W2"] = bank.grads["W2"] * 1.001
        return dx
    bank.backward = wrong
    with pytest.raises(gc.GradCheckError, match="failed for W2"):
        gc.check_layer(bank, rng.standard_normal((5, 3)), forward_kwargs={"offsets": _offsets([2, 3])})


@pytest.mark.parametrize("make", [lambda r: Expert(4, 6, rng=r), lambda r: ExpertBank(3, 4, 6, rng=r)])
def test_params_and_grads_have_identical_keys_and_shapes(make):
    layer = make(np.random.default_rng(0))
    assert set(layer.params) == set(layer.grads) == {"W1", "b1", "W2", "b2"}
    assert all(layer.params[k].shape == layer.grads[k].shape for k in layer.params)
    with pytest.raises(RuntimeError, match="call forward before backward"):
        layer.backward(np.ones((2, 4)))


def test_classes_are_reproducible_from_their_generator():
    a, b = ExpertBank(3, 4, 5, rng=np.random.default_rng(3)), ExpertBank(3, 4, 5, rng=np.random.default_rng(3))
    assert all(np.array_equal(a.params[k], b.params[k]) for k in a.params)
    assert not np.allclose(a.params["W1"][0], a.params["W1"][1])   # each specialist starts different


def test_docstring_examples_run():
    failures, tried = doctest.testmod(experts, extraglobs={"np": np})
    assert tried > 0 and failures == 0


# --------------------------------------------------------------------------- initialisation
def test_init_scale_is_he_for_W1_and_lecun_for_W2():
    E, d, h = 4, 128, 256
    p = experts.init_expert_params(E, d, h, np.random.default_rng(0))
    # 131072 draws each: the sample std is within ~0.2% of the truth, so 2% is a wide margin.
    assert p["W1"].std() == pytest.approx(np.sqrt(2.0 / d), rel=0.02)
    assert p["W2"].std() == pytest.approx(np.sqrt(1.0 / h), rel=0.02)
    assert abs(p["W1"].mean()) < 0.01 * np.sqrt(2.0 / d)
    assert np.all(p["b1"] == 0) and np.all(p["b2"] == 0)
    assert (p["W1"].shape, p["b1"].shape, p["W2"].shape, p["b2"].shape) == ((E, d, h), (E, h), (E, h, d), (E, d))


def test_init_keeps_the_mean_square_of_the_signal():
    # The docstring's claim: mean(x²) = 1 in gives mean(y²) ≈ 1 out through a ReLU expert.
    rng = np.random.default_rng(1)
    ex = Expert(128, 256, rng=rng)
    y = ex.forward(rng.standard_normal((2000, 128)))
    assert np.mean(y**2) == pytest.approx(1.0, abs=0.3)


def test_init_dtype():
    p = experts.init_expert_params(2, 3, 4, np.random.default_rng(0), dtype=np.float32)
    assert all(v.dtype == np.float32 for v in p.values())


# --------------------------------------------------------------------------- bad input
def test_init_bad_arguments():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="n_experts must be >= 1, got 0"):
        experts.init_expert_params(0, 3, 4, rng)
    with pytest.raises(TypeError, match="d_hidden must be an integer, got 4.0"):
        experts.init_expert_params(2, 3, 4.0, rng)
    with pytest.raises(TypeError, match="rng must be a numpy.random.Generator"):
        experts.init_expert_params(2, 3, 4, "0")   # an int seed is fine (SPEC 7)
    with pytest.raises(TypeError, match="dtype must be a floating dtype .* got int32"):
        experts.init_expert_params(2, 3, 4, rng, dtype=np.int32)
    with pytest.raises(ValueError, match="activation must be one of 'relu', 'gelu', 'swiglu'; got 'tanh'"):
        Expert(3, 4, activation="tanh")
    with pytest.raises(ValueError, match="activation must be one of"):
        ExpertBank(2, 3, 4, activation="swish")


def test_ffn_bad_input_names_the_argument(rng):
    p = {k: v[0] for k, v in _random_params(rng, 1, 4, 8).items()}
    with pytest.raises(ValueError, match=r"W2 must have shape \(8, 4\), got \(7, 4\)"):
        ffn_forward(np.ones((2, 4)), **{**p, "W2": np.ones((7, 4))})
    with pytest.raises(ValueError, match=r"b1 must have shape \(8,\), got \(4,\)"):
        ffn_forward(np.ones((2, 4)), **{**p, "b1": np.ones(4)})
    with pytest.raises(ValueError, match=r"x has width 3 but W1 expects d=4"):
        ffn_forward(np.ones((2, 3)), **p)
    with pytest.raises(ValueError, match="x contains NaN or inf"):
        ffn_forward(np.array([[1.0, np.inf, 0.0, 0.0]]), **p)


@BANKS
def test_bank_bad_input_names_the_argument(bank, rng):
    p = _random_params(rng, 3, 4, 5)
    x, offsets = np.ones((5, 4)), _offsets([2, 0, 3])
    with pytest.raises(ValueError, match=r"offsets must be an integer array of shape \(4,\)"):
        bank.experts_forward(x, offsets[:-1], **p)
    with pytest.raises(ValueError, match=r"offsets must be an integer array .* got float64"):
        bank.experts_forward(x, offsets.astype(float), **p)
    with pytest.raises(ValueError, match=r"offsets must start at 0, end at N=5 and never decrease; got \[0, 2, 2, 4\]"):
        bank.experts_forward(x, np.array([0, 2, 2, 4]), **p)
    with pytest.raises(ValueError, match=r"never decrease; got \[0, 3, 2, 5\]"):
        bank.experts_forward(x, np.array([0, 3, 2, 5]), **p)
    with pytest.raises(ValueError, match=r"x must have shape \(\?, 4\), got \(5, 3\)"):
        bank.experts_forward(np.ones((5, 3)), offsets, **p)
    with pytest.raises(ValueError, match=r"W1 must have 3 dimensions, got shape \(4, 5\)"):
        bank.experts_forward(x, offsets, **{**p, "W1": np.ones((4, 5))})
    with pytest.raises(ValueError, match=r"b2 must have shape \(3, 4\), got \(4,\)"):
        bank.experts_forward(x, offsets, **{**p, "b2": np.ones(4)})
    with pytest.raises(ValueError, match="x contains NaN or inf"):
        bank.experts_forward(np.full((5, 4), np.nan), offsets, **p)
    _, cache = bank.experts_forward(x, offsets, **p)
    with pytest.raises(ValueError, match=r"dy must have shape \(5, 4\), got \(4,\)"):
        bank.experts_backward(np.ones(4), cache)


@BANKS
def test_bank_names_a_non_finite_weight_that_reaches_a_token(bank, rng):
    """The bank checks weight values through its output (an O(N·d) check, not O(E·d·h))."""
    p = _random_params(rng, 3, 4, 5)
    x, offsets = rng.standard_normal((5, 4)), _offsets([2, 0, 3])       # expert 1 gets no token
    for name, where in (("W1", (0, 1, 2)), ("b1", (2, 4)), ("W2", (2, 0, 3)), ("b2", (0, 1))):
        bad = {**p, name: p[name].copy()}
        bad[name][where] = np.nan
        with pytest.raises(ValueError, match=f"{name} contains NaN or inf"):
            bank.experts_forward(x, offsets, **bad)
    idle = {**p, "W1": p["W1"].copy()}
    idle["W1"][1] = np.inf
    if bank is FAST_BANK:   # a bad weight no token reaches cannot spoil the output: the clean answer
        np.testing.assert_array_equal(bank.experts_forward(x, offsets, **idle)[0],
                                      bank.experts_forward(x, offsets, **p)[0])
    else:              # the textbook's ffn_forward checks every expert's weights
        with pytest.raises(ValueError, match="W1 contains NaN or inf"):
            bank.experts_forward(x, offsets, **idle)
    # Finite but huge weights overflow: said so, not returned as inf.
    with np.errstate(over="ignore", invalid="ignore"), \
            pytest.raises(FloatingPointError, match="the experts' output overflowed"):
        bank.experts_forward(x, offsets, **{**p, "b1": np.full_like(p["b1"], 1e200),
                                       "W2": np.full_like(p["W2"], 1e200)})


def test_fast_bank_hands_out_fresh_gradients_each_backward(rng):
    """A caller may keep last step's gradients (to accumulate micro-batches): the next
    backward must not write into them. An idle expert's slices are exactly zero."""
    p = init_expert_params(3, 4, 5, rng)
    x = rng.standard_normal((7, 4))
    offsets = np.array([0, 3, 3, 7])               # expert 1 idle: its slices must be zeroed
    y, cache = fast.experts_forward_fast(x, offsets, **p)
    dy = rng.standard_normal(y.shape)
    _, first = fast.experts_backward_fast(dy, cache)
    kept = {k: v.copy() for k, v in first.items()}
    _, second = fast.experts_backward_fast(2 * dy, cache)
    for k in first:
        assert second[k] is not first[k], k
        np.testing.assert_array_equal(first[k], kept[k])
        np.testing.assert_allclose(second[k], 2 * kept[k], rtol=1e-12, atol=1e-15)
    assert not np.any(second["W1"][1]) and not np.any(second["b2"][1])
