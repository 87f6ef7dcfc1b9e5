"""Expert-choice routing: gradient checks, a loop reference, exactly-full experts, kinks, bad input."""
import numpy as np
import pytest

from minimoe.beyond.expert_choice import (
    ExpertChoiceMoELayer, expert_choice_backward, expert_choice_capacity, expert_choice_forward,
)
from minimoe.core.experts import ffn_forward, init_expert_params
from minimoe.core.gradcheck import GradCheckError, KinkError, check_layer, check_pair


def _layer(rng, d=3, h=5, E=4, **kw):
    layer = ExpertChoiceMoELayer(d, h, E, rng=rng, **kw)
    p = layer.params
    p["W_gate"][:] = rng.standard_normal(p["W_gate"].shape)      # spread-out affinities: no near-ties
    p["b1"][:] = 0.1 * rng.standard_normal(p["b1"].shape)
    p["b2"][:] = 0.1 * rng.standard_normal(p["b2"].shape)
    return layer


def _reference(x, W_gate, W1, b1, W2, b2, C):
    """Expert choice the slow, obvious way: each expert sorts its column and serves its C best."""
    L = x @ W_gate
    S = np.exp(L - L.max(axis=1, keepdims=True))
    S /= S.sum(axis=1, keepdims=True)
    y = np.zeros_like(x)
    for e in range(W_gate.shape[1]):
        best = sorted(range(len(x)), key=lambda t: -S[t, e])[:C]
        for t in best:
            out, _ = ffn_forward(x[t:t + 1], W1[e], b1[e], W2[e], b2[e])
            y[t] += S[t, e] * out[0]
    return y


# --------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("seed,shape,E,k,cf", [
    (0, (6, 3), 3, 1, 1.0),          # C = 2: some tokens served by none
    (1, (8, 3), 4, 2, 1.0),          # EC-CF2: some tokens served by several
    (2, (2, 3, 3), 4, 1, 1.0),       # (B, S, d) input
    (3, (5, 3), 2, 2, 2.0),          # C = T: every expert takes every token (dense)
    (4, (7, 3), 4, 1, 0.5),          # C = 1
])
def test_gradcheck(seed, shape, E, k, cf):
    rng = np.random.default_rng(seed)
    layer = _layer(rng, E=E, k=k, capacity_factor=cf)
    reports = check_layer(layer, rng.standard_normal(shape), rng=rng)
    assert {r.name for r in reports} == {"x", "W_gate", "W1", "b1", "W2", "b2"}


def test_gradcheck_float64_gelu_experts(rng):
    layer = _layer(rng, E=3, k=2, activation="gelu")
    check_layer(layer, rng.standard_normal((6, 3)), rng=rng)


def test_gradcheck_catches_a_backward_that_forgets_the_gate(rng):
    T, d, h, E, C = 6, 3, 4, 3, 2
    params = {"W_gate": rng.standard_normal((d, E)), **init_expert_params(E, d, h, rng)}

    def wrong_backward(dy, cache):           # as if every gate were 1 on the way back
        return expert_choice_backward(dy, cache._replace(gates=np.ones_like(cache.gates)))

    with pytest.raises(GradCheckError, match="W1"):
        check_pair(expert_choice_forward, wrong_backward, rng.standard_normal((T, d)), params,
                   kwargs={"capacity": C}, rng=rng)


def test_the_router_learns_through_the_gates(rng):
    """Unlike top-1 with a renormalized gate, every expert's pick carries S[t,e] < 1: W_gate gets gradient."""
    layer = _layer(rng, E=4, k=1)
    layer.forward(rng.standard_normal((8, 3)))
    layer.backward(rng.standard_normal((8, 3)))
    assert np.linalg.norm(layer.grads["W_gate"]) > 1e-3


def test_a_tie_at_the_cut_is_reported_as_a_kink(rng):
    layer = _layer(rng, E=2, k=1)                          # T = 4 tokens -> C = 2 per expert
    layer.params["W_gate"][:] = [[1.0, -1.0], [0.0, 0.0], [0.0, 0.0]]
    x = rng.standard_normal((4, 3))
    x[:, 0] = [0.0, 1.0, -1.0, 0.0]     # expert 0 ranks token 1, then the twins 0 and 3, then 2
    x[3] = x[0]                         # C = 2 cuts between the twins: a nudge decides who is in
    with pytest.raises(KinkError):
        check_layer(layer, x, rng=rng)


# --------------------------------------------------------------------------- forward
@pytest.mark.parametrize("T,E,k,cf", [(9, 3, 1, 1.0), (8, 4, 2, 1.0), (5, 4, 2, 1.25)])
def test_matches_loop_reference(T, E, k, cf):
    rng = np.random.default_rng(T * E)
    layer = _layer(rng, E=E, k=k, capacity_factor=cf)
    x = rng.standard_normal((T, 3))
    C = expert_choice_capacity(T, E, k, cf)
    np.testing.assert_allclose(layer.forward(x), _reference(x, **layer.params, C=C), rtol=1e-12, atol=1e-12)


def test_every_expert_is_exactly_full_and_unpicked_tokens_get_zero(rng):
    layer = _layer(rng, d=3, E=4, k=1)
    x = rng.standard_normal((12, 3))
    y = layer.forward(x)
    st = layer.stats
    C = st["capacity"]
    assert C == 3                                                   # ceil(1.0 · 12 · 1 / 4)
    assert st["ec_idx"].shape == (4, C) and np.all(st["load"] == C)
    assert all(np.unique(row).size == C for row in st["ec_idx"])   # no token twice per expert
    per_token = st["experts_per_token"]
    assert per_token.sum() == 4 * C and st["dropped"] == np.sum(per_token == 0)
    np.testing.assert_array_equal(y[per_token == 0], 0.0)
    # The token-choice view lists the same assignments: topk_idx[kept] counts C per expert.
    np.testing.assert_array_equal(np.bincount(st["topk_idx"][st["kept"]], minlength=4), C)
    np.testing.assert_allclose(st["importance"], st["ec_gates"].sum(axis=1))
    np.testing.assert_allclose(st["probs"].sum(axis=1), 1.0)


def test_each_expert_picks_its_highest_affinities(rng):
    layer = _layer(rng, E=3, k=1)
    layer.forward(rng.standard_normal((9, 3)))
    S, idx = layer.stats["probs"], layer.stats["ec_idx"]
    for e in range(3):
        chosen = S[idx[e], e]
        others = np.delete(S[:, e], idx[e])
        assert chosen.min() > others.max()
        np.testing.assert_array_equal(layer.stats["ec_gates"][e], chosen)


def test_capacity_formula():
    assert expert_choice_capacity(10, 4, 2, 1.0) == 5        # 10·2/4
    assert expert_choice_capacity(10, 4, 1, 1.0) == 3        # ceil(2.5)
    assert expert_choice_capacity(3, 2, 2, 4.0) == 3         # capped at T
    with pytest.raises(ValueError, match="capacity_factor must be a number"):
        expert_choice_capacity(10, 4, 1, None)


def test_surface_and_counts(rng):
    d, h, E = 6, 10, 4
    layer = ExpertChoiceMoELayer(d, h, E, k=2, capacity_factor=1.0, rng=rng)
    y = layer.forward(rng.standard_normal((2, 4, d)))
    assert y.shape == (2, 4, d) and layer.aux_loss == 0.0
    assert layer.backward(np.ones_like(y)).shape == y.shape
    per_expert = d * h + h + h * d + d
    assert layer.n_params == d * E + E * per_expert
    assert layer.n_active_params == d * E + 2 * per_expert
    assert layer.flops_per_token() == 2 * d * E + 2 * (4 * d * h + 2 * d)
    f32 = ExpertChoiceMoELayer(d, h, E, dtype=np.float32, rng=rng)
    assert f32.forward(rng.standard_normal((5, d))).dtype == np.float32


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs,exc,match", [
    ({"capacity_factor": None}, ValueError, "capacity_factor must be a number"),
    ({"capacity_factor": -1.0}, ValueError, "capacity_factor"),
    ({"k": 0}, ValueError, "k must be >= 1"),
    ({"k": 5}, ValueError, "k must be <= 4"),
    ({"activation": "tanh"}, ValueError, "activation"),
])
def test_bad_configurations_are_rejected(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        ExpertChoiceMoELayer(3, 5, 4, **kwargs)


def test_bad_forward_input_is_rejected(rng):
    layer = _layer(rng)
    with pytest.raises(ValueError, match="noise must be None"):
        layer.forward(rng.standard_normal((5, 3)), noise=np.zeros((5, 4)))
    with pytest.raises(ValueError, match="d_model=3"):
        layer.forward(rng.standard_normal((5, 4)))
    with pytest.raises(ValueError, match="at least one token"):
        layer.forward(np.zeros((0, 3)))
    with pytest.raises(ValueError, match="capacity must be <= 5"):
        expert_choice_forward(rng.standard_normal((5, 3)), **layer.params, capacity=6)
