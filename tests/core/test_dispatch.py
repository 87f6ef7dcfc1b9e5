"""Appointment books: capacity, the sort-based plan, dispatch/combine gradients, drop priority."""
import numpy as np
import pytest

from minimoe import dispatch
from minimoe.core.experts import ffn_forward, init_expert_params
from minimoe.core.gradcheck import check_pair
from moe_helpers import as_pair


def random_idx(rng, T, E, k):
    """k distinct experts per token, in random order."""
    return np.argsort(rng.standard_normal((T, E)), axis=1)[:, :k]


def reference_moe(x, idx, gates, kept, params, activation="relu"):
    """The definition, one token and one slot at a time (slow; test code only)."""
    y = np.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            if kept[t, j]:
                e = idx[t, j]
                out, _ = ffn_forward(x[t:t + 1], params["W1"][e], params["b1"][e],
                                     params["W2"][e], params["b2"][e], activation)
                y[t] += gates[t, j] * out[0]
    return y


# --------------------------------------------------------------------------- capacity
def test_capacity_formula():
    assert dispatch.expert_capacity(10, 1, 1, 1.1) == 11          # not 12 through float error
    assert dispatch.expert_capacity(8, 4, 2, 1.0) == 4
    assert dispatch.expert_capacity(8, 4, 2, 1.25) == 5
    assert dispatch.expert_capacity(10, 4, 1, 1.0) == 3           # ceil(2.5)
    assert dispatch.expert_capacity(3, 64, 1, 0.01) == 1          # never 0
    assert dispatch.expert_capacity(10, 4, 1, None) is None


def test_capacity_bad_inputs():
    with pytest.raises(ValueError, match="capacity_factor must be a finite number > 0"):
        dispatch.expert_capacity(10, 4, 1, 0.0)
    with pytest.raises(ValueError, match="capacity_factor must be a finite number > 0"):
        dispatch.expert_capacity(10, 4, 1, -1.0)
    with pytest.raises(ValueError, match="k must be <= 4"):
        dispatch.expert_capacity(10, 4, 5, 1.0)
    with pytest.raises(ValueError, match=r"idx must hold expert numbers in \[0, 3\)"):
        dispatch.make_plan(np.array([[0], [3]]), 3)
    with pytest.raises(ValueError, match="capacity must be >= 1"):
        dispatch.make_plan(np.array([[0], [1]]), 3, capacity=0)


# --------------------------------------------------------------------------- the plan
def test_plan_groups_by_expert_and_counts(rng):
    T, E, k = 20, 5, 2
    idx = random_idx(rng, T, E, k)
    plan = dispatch.make_plan(idx, E)
    flat = idx.reshape(-1)
    assert np.all(np.diff(flat[plan.order]) >= 0)                  # grouped by expert
    np.testing.assert_array_equal(plan.load, [np.sum(idx == e) for e in range(E)])
    np.testing.assert_array_equal(plan.offsets, np.concatenate([[0], np.cumsum(plan.load)]))
    assert plan.dropped == 0 and plan.kept.all()
    np.testing.assert_array_equal(plan.token, plan.order // k)


def test_drop_priority_first_choices_first_then_earlier_tokens():
    # Expert 0 is requested by: token 0 (2nd choice), token 1 (1st), token 2 (2nd),
    # token 3 (1st), token 4 (1st). With C = 2 it keeps the first choices of tokens 1 and 3.
    idx = np.array([[1, 0], [0, 1], [2, 0], [0, 2], [0, 3]])
    plan = dispatch.make_plan(idx, 4, capacity=2)
    expected_kept_0 = {1, 3}
    kept_tokens_0 = {t for t in range(5) for j in range(2) if idx[t, j] == 0 and plan.kept[t, j]}
    assert kept_tokens_0 == expected_kept_0
    # expert 1: token 0 (1st), token 1 (2nd) -> both fit; expert 2: tokens 2 (1st), 3 (2nd) fit
    assert plan.kept[0, 0] and plan.kept[1, 1] and plan.kept[2, 0] and plan.kept[3, 1]
    assert plan.dropped == 3 and plan.load.tolist() == [2, 2, 2, 1]   # 5 asked expert 0, 2 fit


# --------------------------------------------------------------------------- values and gradients
CASES = [  # (T, E, k, capacity, activation, seed)
    (6, 4, 1, None, "relu", 0),
    (6, 4, 2, None, "relu", 1),
    (5, 3, 3, None, "gelu", 2),      # k = E
    (8, 3, 1, 2, "relu", 3),         # drops
    (8, 4, 2, 3, "gelu", 4),         # drops
    (4, 6, 2, 1, "relu", 5),         # drops, and some experts get no tokens
]


@pytest.mark.parametrize("T,E,k,capacity,activation,seed", CASES)
def test_dispatch_combine_matches_reference_and_gradcheck(T, E, k, capacity, activation, seed):
    rng = np.random.default_rng(seed)
    d, h = 3, 5
    x = rng.standard_normal((T, d))
    idx = random_idx(rng, T, E, k)
    params = init_expert_params(E, d, h, rng)
    params["b1"] = 0.1 * rng.standard_normal((E, h))   # nonzero biases are checked too
    params["b2"] = 0.1 * rng.standard_normal((E, d))
    gates = rng.uniform(0.1, 1.0, size=(T, k))
    y, cache = dispatch.dispatch_combine_forward(x, idx, gates, **params, capacity=capacity,
                                                 activation=activation)
    if capacity is not None:
        assert cache.plan.dropped > 0, "this case is meant to drop tokens"
    np.testing.assert_allclose(y, reference_moe(x, idx, gates, cache.plan.kept, params, activation),
                               rtol=1e-12, atol=1e-14)
    check_pair(dispatch.dispatch_combine_forward, as_pair(dispatch.dispatch_combine_backward, "gates"), x,
               {"gates": gates, **params}, kwargs={"idx": idx, "capacity": capacity,
                                                    "activation": activation}, rng=rng)


def test_dropped_tokens_get_zero_output_and_zero_gradients(rng):
    T, E, d, h = 6, 2, 3, 4
    idx = np.zeros((T, 1), dtype=int)                 # everyone wants expert 0
    params = init_expert_params(E, d, h, rng)
    x = rng.standard_normal((T, d))
    y, c = dispatch.dispatch_combine_forward(x, idx, np.ones((T, 1)), **params, capacity=2)
    assert c.plan.kept[:, 0].tolist() == [True, True, False, False, False, False]
    assert np.all(y[2:] == 0) and np.all(y[:2] != 0)
    dx, dgates, g = dispatch.dispatch_combine_backward(np.ones((T, d)), c)
    assert np.all(dx[2:] == 0) and np.all(dgates[2:] == 0)
    assert np.all(g["W1"][1] == 0) and np.all(g["b2"][1] == 0)      # expert 1 saw no one


def test_large_capacity_equals_none(rng):
    T, E, k, d, h = 12, 4, 2, 3, 4
    idx = random_idx(rng, T, E, k)
    params = init_expert_params(E, d, h, rng)
    x, gates, dy = rng.standard_normal((T, d)), rng.uniform(size=(T, k)), rng.standard_normal((T, d))
    y0, c0 = dispatch.dispatch_combine_forward(x, idx, gates, **params)
    C = dispatch.expert_capacity(T, E, k, E / k)       # = T: nobody can be over capacity
    y1, c1 = dispatch.dispatch_combine_forward(x, idx, gates, **params, capacity=C)
    np.testing.assert_array_equal(y0, y1)
    g0, g1 = dispatch.dispatch_combine_backward(dy, c0), dispatch.dispatch_combine_backward(dy, c1)
    np.testing.assert_array_equal(g0[0], g1[0])
    np.testing.assert_array_equal(g0[1], g1[1])
    for key in g0[2]:
        np.testing.assert_array_equal(g0[2][key], g1[2][key])


def test_float32_stays_float32(rng):
    T, E, k, d, h = 8, 4, 2, 3, 4
    params = init_expert_params(E, d, h, rng, dtype=np.float32)
    x = rng.standard_normal((T, d)).astype(np.float32)
    gates = rng.uniform(size=(T, k)).astype(np.float32)
    y, c = dispatch.dispatch_combine_forward(x, random_idx(rng, T, E, k), gates, **params, capacity=3)
    dx, dgates, g = dispatch.dispatch_combine_backward(np.ones_like(y), c)
    assert y.dtype == dx.dtype == dgates.dtype == np.float32 and all(v.dtype == np.float32 for v in g.values())


def test_capacity_is_not_inflated_by_float_error():
    # 1.1 * 100 / 10 == 11.000000000000002 in floats; a naive ceil would give 12 slots.
    assert 1.1 * 100 / 10 > 11
    assert dispatch.expert_capacity(100, 10, 1, 1.1) == 11
