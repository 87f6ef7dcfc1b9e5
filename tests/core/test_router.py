"""The GP: router logits, noise, top-k, the three gates — gradient checks and properties."""
import numpy as np
import pytest

from minimoe import router
from minimoe.core.gradcheck import KinkError, check_pair
from minimoe.core.layers import SoftmaxCache, softmax, softmax_backward


def min_topk_margin(H, k):
    """Smallest gap between adjacent sorted scores around the k-th place in any row."""
    s = -np.sort(-H, axis=1)
    gaps = s[:, :-1] - s[:, 1:]
    return gaps.min() if gaps.size else np.inf


def separated_scores(rng, T, E, margin=1e-3):
    """Random scores whose adjacent sorted values all differ by >= margin (no near-ties)."""
    H = rng.standard_normal((T, E))
    assert min_topk_margin(H, 1) >= margin, "fixture has a near-tie; change the seed"
    return H


# --------------------------------------------------------------------------- logits
@pytest.mark.parametrize("seed,noisy,train", [(0, True, True), (1, True, False), (2, False, True)])
def test_logits_gradcheck_all_three_outputs(seed, noisy, train):
    """Check H, L and σ together, so the extra d_clean / d_sigma entries are checked too."""
    rng = np.random.default_rng(seed)
    T, d, E = 5, 4, 3
    x = rng.standard_normal((T, d))
    params = {"W_gate": rng.standard_normal((d, E))}
    if noisy:
        params["W_noise"] = rng.standard_normal((d, E))
    noise = rng.standard_normal((T, E))

    def fwd(x, W_gate, W_noise=None):
        H, c = router.router_logits_forward(x, W_gate, W_noise, noise=noise, train=train)
        sigma = c.sigma if c.sigma is not None else np.zeros_like(H)
        return np.stack([H, c.clean, sigma]), c

    def bwd(dout, c):
        return router.router_logits_backward(dout[0], c, d_clean=dout[1],
                                             d_sigma=dout[2] if c.sigma is not None else None)

    check_pair(fwd, bwd, x, params, rng=rng)


def test_logits_noise_matches_formula_and_eval_is_clean(rng):
    x, Wg, Wn = rng.standard_normal((6, 4)), rng.standard_normal((4, 3)), rng.standard_normal((4, 3))
    eps = rng.standard_normal((6, 3))
    H, c = router.router_logits_forward(x, Wg, Wn, noise=eps)
    np.testing.assert_allclose(H, x @ Wg + eps * np.log1p(np.exp(x @ Wn)), rtol=1e-12)
    H_eval, _ = router.router_logits_forward(x, Wg, Wn, noise=eps, train=False)
    np.testing.assert_array_equal(H_eval, x @ Wg)
    # drawn from the generator: same seed, same noise
    H1, _ = router.router_logits_forward(x, Wg, Wn, rng=np.random.default_rng(7))
    H2, _ = router.router_logits_forward(x, Wg, Wn, rng=np.random.default_rng(7))
    np.testing.assert_array_equal(H1, H2)
    assert not np.array_equal(H1, x @ Wg)


def test_softplus_is_stable_at_extremes():
    z = np.array([-1e4, -50.0, 0.0, 50.0, 1e4])
    s = router.softplus(z)
    assert np.all(np.isfinite(s)) and s[2] == pytest.approx(np.log(2.0))
    assert s[-1] == 1e4 and s[0] == 0.0


# --------------------------------------------------------------------------- gates
GATE_CASES = [  # (kind, k, E, seed)
    ("topk", 1, 4, 0), ("topk", 2, 4, 1), ("topk", 4, 4, 2),
    ("switch", 1, 4, 3), ("switch", 2, 5, 4), ("dense", 3, 4, 5),
]


@pytest.mark.parametrize("kind,k,E,seed", GATE_CASES)
def test_gate_gradcheck_gates_and_probs(kind, k, E, seed):
    rng = np.random.default_rng(seed)
    H = separated_scores(rng, 6, E)

    def fwd(H):
        r, c = router.gate_forward(H, k, kind)
        return np.concatenate([r.gates, r.probs], axis=1), c

    def bwd(dout, c):
        kk = c.gates.shape[1]
        return router.gate_backward(dout[:, :kk], c, dprobs=dout[:, kk:])

    check_pair(fwd, bwd, H, rng=rng, selection=lambda out, c: c.idx)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_router_chain_gradcheck_into_W_gate_W_noise_x(k):
    """x -> noisy logits -> top-k gate: gradients reach W_gate, W_noise and x."""
    rng = np.random.default_rng(10 + k)
    T, d, E = 6, 4, 4
    x = rng.standard_normal((T, d))
    params = {"W_gate": rng.standard_normal((d, E)), "W_noise": 0.5 * rng.standard_normal((d, E))}
    noise = rng.standard_normal((T, E))
    H0, _ = router.router_logits_forward(x, **params, noise=noise)
    assert min_topk_margin(H0, k) >= 1e-3

    def fwd(x, W_gate, W_noise):
        H, lc = router.router_logits_forward(x, W_gate, W_noise, noise=noise)
        r, gc = router.topk_gate_forward(H, k)
        return r.gates, (lc, gc)

    def bwd(dg, c):
        dH, _ = router.topk_gate_backward(dg, c[1])
        return router.router_logits_backward(dH, c[0])

    check_pair(fwd, bwd, x, params, rng=rng, selection=lambda out, c: c[1].idx)


def test_kink_detector_fires_on_a_near_tie():
    """Scores 2nd and 3rd apart by 1e-7 < h: the finite difference would cross the tie."""
    H = np.array([[2.0, 1.0 + 1e-7, 1.0, -1.0]])

    def fwd(H):
        r, c = router.topk_gate_forward(H, 2)
        return r.gates, c

    with pytest.raises(KinkError, match="changed the discrete selection"):
        check_pair(fwd, router.topk_gate_backward, H, selection=lambda out, c: c.idx)


# --------------------------------------------------------------------------- equivalence
@pytest.mark.parametrize("k", [1, 2, 3])
def test_keep_topk_softmax_equals_softmax_topk_renormalize(rng, k):
    H = separated_scores(rng, 7, 5)
    dg = rng.standard_normal((7, k))
    r, gc = router.topk_gate_forward(H, k)
    rows = np.arange(7)[:, None]
    # form 1: KeepTopK(−∞) -> softmax, read at the chosen experts
    masked, mask = router.keep_topk_forward(H, k)
    G = softmax(masked)
    dG = np.zeros_like(G)
    dG[rows, r.idx] = dg
    dH1, _ = router.keep_topk_backward(softmax_backward(dG, SoftmaxCache(G, -1))[0], mask)
    # form 2: softmax -> top-k -> renormalize
    p = softmax(H)
    g2, rc = router.renormalize_forward(p, r.idx)
    dp, _ = router.renormalize_backward(dg, rc)
    dH2 = softmax_backward(dp, SoftmaxCache(p, -1))[0]
    dH0, _ = router.topk_gate_backward(dg, gc)
    np.testing.assert_allclose(G[rows, r.idx], r.gates, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(g2, r.gates, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(dH1, dH0, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(dH2, dH0, rtol=1e-12, atol=1e-15)
    assert np.all(G[~mask] == 0)


# --------------------------------------------------------------------------- the k = 1 trap
def test_k1_topk_gate_gives_router_exactly_zero_task_gradient(rng):
    H = separated_scores(rng, 8, 4)
    dg = rng.standard_normal((8, 1))
    r, c = router.topk_gate_forward(H, 1)
    assert np.all(r.gates == 1.0)
    dH, _ = router.topk_gate_backward(dg, c)
    assert np.all(dH == 0.0)
    r, c = router.switch_gate_forward(H, 1)
    dH, _ = router.switch_gate_backward(dg, c)
    assert np.abs(dH).max() > 1e-3


# --------------------------------------------------------------------------- properties
@pytest.mark.parametrize("kind", router.GATES)
def test_gates_finite_and_normalized_at_huge_logits(rng, kind):
    H = rng.choice([-1e4, 1e4], size=(6, 4)) + rng.standard_normal((6, 4))
    r, c = router.gate_forward(H, 2, kind)
    dH, _ = router.gate_backward(np.ones_like(r.gates), c, dprobs=np.ones_like(r.probs))
    assert np.all(np.isfinite(r.gates)) and np.all(np.isfinite(r.probs)) and np.all(np.isfinite(dH))
    np.testing.assert_allclose(r.probs.sum(1), 1.0, rtol=1e-12)
    if kind != "switch":
        np.testing.assert_allclose(r.gates.sum(1), 1.0, rtol=1e-12)
    else:
        assert np.all(r.gates.sum(1) <= 1.0 + 1e-12)


def test_topk_ties_go_to_the_lower_expert_index():
    H = np.zeros((3, 5))
    np.testing.assert_array_equal(router.topk_indices(H, 2), [[0, 1]] * 3)
    H = np.array([[1.0, 3.0, 3.0, 2.0]])
    np.testing.assert_array_equal(router.topk_indices(H, 3), [[1, 2, 3]])


def test_dense_gate_lists_all_experts_in_order(rng):
    r, _ = router.dense_gate_forward(rng.standard_normal((3, 4)))
    np.testing.assert_array_equal(r.idx, np.tile(np.arange(4), (3, 1)))
    np.testing.assert_array_equal(r.gates, r.probs)


# --------------------------------------------------------------------------- bad input
def test_bad_inputs_name_the_argument(rng):
    x, Wg, Wn = rng.standard_normal((5, 4)), rng.standard_normal((4, 3)), rng.standard_normal((4, 3))
    with pytest.raises(ValueError, match=r"x must have shape \(\?, 4\)"):
        router.router_logits_forward(rng.standard_normal((5, 3)), Wg)
    with pytest.raises(ValueError, match=r"noise must have shape \(5, 3\)"):
        router.router_logits_forward(x, Wg, Wn, noise=np.zeros((5, 4)))
    with pytest.raises(ValueError, match="need noise .* or rng"):
        router.router_logits_forward(x, Wg, Wn)
    with pytest.raises(TypeError, match="rng must be a numpy.random.Generator"):
        router.router_logits_forward(x, Wg, Wn, rng=np.random.RandomState(0))
    with pytest.raises(ValueError, match="x contains NaN or inf"):
        router.router_logits_forward(np.full((5, 4), np.nan), Wg)
    H = rng.standard_normal((5, 3))
    with pytest.raises(ValueError, match="k must be <= 3"):
        router.topk_gate_forward(H, 4)
    with pytest.raises(ValueError, match="k must be >= 1"):
        router.switch_gate_forward(H, 0)
    with pytest.raises(ValueError, match="gate must be one of 'topk', 'dense', 'switch'; got 'sparse'"):
        router.gate_forward(H, 1, "sparse")


def test_init_gate_weights_has_the_switch_scale_and_dtype():
    from minimoe.core.router import init_gate_weights
    W = init_gate_weights(64, 512, np.random.default_rng(0), np.float32)
    assert W.shape == (64, 512) and W.dtype == np.float32
    assert abs(W.std() / np.sqrt(0.1 / 64) - 1) < 0.02      # N(0, 0.1/d), 32k draws


# --------------------------------------------------------------------------- issue 26: both paths of top-k
def _topk_reference(H, k):
    """The k largest of each row, best first, ties to the lower index: one row at a time."""
    out = []
    for row in H:
        order = sorted(range(len(row)), key=lambda e: (-row[e], e))
        out.append(order[:k])
    return np.array(out)


@pytest.mark.parametrize("k", [1, 2, 8, 9, 12])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_topk_indices_both_paths_against_a_row_by_row_reference(k, dtype):
    """k ≤ 8 with finite scores takes the argmax passes, k > 8 the sort: both must be the k
    best, best first (issue 26: the sort path sorting ascending survived chapter 1's tests)."""
    rng = np.random.default_rng(k)
    H = rng.standard_normal((20, 12)).astype(dtype)
    H[3, 5] = H[3, 7] = H[3].max() + 1        # a tie at the top: the lower index first
    np.testing.assert_array_equal(router.topk_indices(H, k), _topk_reference(H, k))


def test_topk_indices_with_non_finite_scores_uses_the_sort_and_is_right():
    H = np.array([[0.5, np.inf, -1.0, 2.0], [-np.inf, 0.0, 3.0, 1.0], [np.nan, 1.0, 2.0, 0.0]])
    got = router.topk_indices(H, 2)
    np.testing.assert_array_equal(got[:2], [[1, 3], [2, 3]])
    assert got[2].tolist() == [2, 1] or np.isnan(H[2, got[2][0]])   # NaN has no place in an order
