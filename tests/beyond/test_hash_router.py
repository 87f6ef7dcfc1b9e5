"""Hash routing: a fixed, deterministic referral; gradient checks; the MoELayer surface; bad input."""
import numpy as np
import pytest

from minimoe.core.experts import ffn_forward
from minimoe.core.gradcheck import KinkError, check_layer
from minimoe.beyond.hash_router import HashMoELayer, _GOLDEN, content_ids, hash_route, mix64


# --------------------------------------------------------------------------- the hash
def test_mix64_matches_the_published_splitmix64_sequence():
    # splitmix64 from state 0 (Steele et al. 2014; the reference C code by Vigna):
    # state += 0x9E3779B97F4A7C15, output = mix(state).
    state = np.zeros(1, dtype=np.uint64)
    outputs = []
    for _ in range(3):
        state = state + _GOLDEN
        outputs.append(int(mix64(state)[0]))
    assert outputs == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]


def test_mix64_is_injective_on_a_range():
    out = mix64(np.arange(200_000, dtype=np.uint64))
    assert np.unique(out).size == 200_000


def test_the_same_id_gets_the_same_experts_whatever_else_is_in_the_batch(rng):
    ids = rng.integers(0, 1000, size=300)
    a = hash_route(ids, n_experts=8, k=2, seed=3)
    perm = rng.permutation(300)
    b = hash_route(np.concatenate([ids[perm], rng.integers(0, 1000, size=50)]), 8, 2, seed=3)
    np.testing.assert_array_equal(b[:300], a[perm])
    np.testing.assert_array_equal(hash_route(ids, 8, 2, seed=3), a)      # and call after call
    same = ids[:, None] == ids[None, :]                                   # repeated ids inside the batch
    assert np.all((a[:, None, :] == a[None, :, :]).all(axis=2)[same])


def test_k_distinct_experts_spread_uniformly():
    E, k, N = 8, 2, 40_000
    idx = hash_route(np.arange(N), E, k)
    assert idx.shape == (N, k) and np.all(idx[:, 0] != idx[:, 1])
    counts = np.bincount(idx.ravel(), minlength=E)
    # Expected N·k/E = 10000 per expert with binomial std ≈ 94: allow ±5 std.
    assert np.all(np.abs(counts - N * k / E) < 5 * np.sqrt(N * k / E))
    pairs = np.bincount(idx[:, 0] * E + idx[:, 1], minlength=E * E).reshape(E, E)
    off = pairs[~np.eye(E, dtype=bool)]           # 56 ordered pairs, ≈ 714 each
    assert np.all(np.abs(off - N / 56) < 6 * np.sqrt(N / 56))


def test_a_different_seed_is_a_different_hash():
    ids = np.arange(20_000)
    a, b = hash_route(ids, 8, 1, seed=0), hash_route(ids, 8, 1, seed=1)
    agree = np.mean(a == b)
    assert abs(agree - 1 / 8) < 0.02               # unrelated hashes agree by chance only


def test_content_ids_equal_rows_equal_ids(rng):
    x = rng.standard_normal((6, 5))
    x[4] = x[1]
    ids = content_ids(x)
    assert ids[4] == ids[1] and np.unique(ids).size == 5
    np.testing.assert_array_equal(content_ids(x.copy()), ids)
    x2 = x.copy()
    x2[0, 3] = np.nextafter(x2[0, 3], np.inf)       # the smallest possible change
    assert content_ids(x2)[0] != ids[0] and np.array_equal(content_ids(x2)[1:], ids[1:])


# --------------------------------------------------------------------------- the layer
def _layer(rng, **kw):
    args = dict(d_model=4, d_hidden=5, n_experts=4, k=2, rng=rng)
    args.update(kw)
    layer = HashMoELayer(**args)
    layer.params["b1"][:] = 0.1 * rng.standard_normal(layer.params["b1"].shape)
    layer.params["b2"][:] = 0.1 * rng.standard_normal(layer.params["b2"].shape)
    return layer


@pytest.mark.parametrize("seed,k,shape,cf", [(0, 1, (7, 4), None), (1, 2, (7, 4), None),
                                             (2, 2, (2, 5, 4), None), (3, 2, (9, 4), 0.6),
                                             (4, 4, (5, 4), None)])
def test_gradcheck(seed, k, shape, cf):
    rng = np.random.default_rng(seed)
    layer = _layer(rng, k=k, capacity_factor=cf)
    ids = rng.integers(0, 6, size=shape[:-1])
    reports = check_layer(layer, rng.standard_normal(shape), forward_kwargs={"ids": ids}, rng=rng)
    assert {r.name for r in reports} == {"x", "W1", "b1", "W2", "b2"}
    if cf is not None:
        assert layer.stats["dropped"] > 0          # the fixture really drops


def test_output_is_the_mean_of_the_chosen_experts(rng):
    layer = _layer(rng, k=2)
    x, ids = rng.standard_normal((6, 4)), np.array([3, 1, 4, 1, 5, 9])
    x[3] = x[1]                                     # the same patient twice
    y = layer.forward(x, ids=ids)
    idx = hash_route(ids, 4, 2, seed=0)
    p = layer.params
    for t in range(6):                              # slow reference: one token at a time
        want = sum(ffn_forward(x[t:t + 1], *(p[n][e] for n in ("W1", "b1", "W2", "b2")))[0][0]
                   for e in idx[t]) / 2
        np.testing.assert_allclose(y[t], want, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(y[1], y[3])
    np.testing.assert_array_equal(layer.stats["topk_idx"], idx)


def test_two_layers_with_the_same_seed_route_identically_and_content_hashing_is_deterministic(rng):
    x = rng.standard_normal((10, 4))
    a = _layer(np.random.default_rng(1), seed=5)
    b = _layer(np.random.default_rng(2), seed=5)     # different expert weights, same hash
    a.forward(x)
    b.forward(x)
    np.testing.assert_array_equal(a.stats["topk_idx"], b.stats["topk_idx"])
    a.forward(x[::-1].copy())
    np.testing.assert_array_equal(a.stats["topk_idx"], b.stats["topk_idx"][::-1])


def test_content_hashing_is_a_kink_everywhere_and_the_checker_says_so(rng):
    """Without ids, nudging x changes the hash: the finite difference is meaningless."""
    layer = _layer(rng)
    with pytest.raises(KinkError):
        check_layer(layer, rng.standard_normal((6, 4)), rng=rng)


def test_surface_stats_and_counts(rng):
    layer = HashMoELayer(d_model=6, d_hidden=10, n_experts=5, k=2, capacity_factor=1.0, rng=rng)
    assert "W_gate" not in layer.params and set(layer.params) == set(layer.grads)
    y = layer.forward(rng.standard_normal((3, 4, 6)), ids=rng.integers(0, 50, size=(3, 4)))
    assert y.shape == (3, 4, 6) and layer.aux_loss == 0.0
    st = layer.stats
    assert st["topk_idx"].shape == (12, 2) and st["kept"].shape == (12, 2)
    assert st["load"].sum() + st["dropped"] == 24 and st["capacity"] == 5   # ceil(1.0·12·2/5)
    np.testing.assert_allclose(st["importance"], np.bincount(st["topk_idx"].ravel(), minlength=5) / 2)
    per_expert = 6 * 10 + 10 + 10 * 6 + 6
    assert layer.n_params == 5 * per_expert and layer.n_active_params == 2 * per_expert
    assert layer.flops_per_token() == 2 * (2 * 6 * 10 * 2) + 2 * 2 * 6    # two experts + combine
    dx = layer.backward(np.ones_like(y))
    assert dx.shape == y.shape


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"k": 5}, ValueError, "k must be <= 4"),
    ({"seed": -1}, ValueError, "seed must be >= 0"),
    ({"capacity_factor": 0}, ValueError, "capacity_factor"),
    ({"activation": "tanh"}, ValueError, "activation"),
    ({"dtype": np.int32}, TypeError, "dtype"),
])
def test_bad_configurations_are_rejected(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        HashMoELayer(4, 5, 4, **kwargs)


def test_bad_forward_input_is_rejected(rng):
    layer = _layer(rng)
    x = rng.standard_normal((5, 4))
    with pytest.raises(ValueError, match=r"ids must have shape \(5,\)"):
        layer.forward(x, ids=np.arange(4))
    with pytest.raises(ValueError, match="1-D integer array"):
        layer.forward(x, ids=np.arange(5.0))
    with pytest.raises(ValueError, match="non-negative"):
        layer.forward(x, ids=np.array([0, 1, -2, 3, 4]))
    with pytest.raises(ValueError, match="noise must be None"):
        layer.forward(x, noise=np.zeros((5, 4)))
    with pytest.raises(ValueError, match="d_model=4"):
        layer.forward(rng.standard_normal((5, 3)))
    with pytest.raises(RuntimeError, match="forward before backward"):
        _layer(rng).backward(x)
