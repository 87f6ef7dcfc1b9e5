"""Balancing from per-expert sums (core/balance.py): the same losses as losses.py, for any
grouping, each against an independent reference; both pairs gradient-checked.

The references are loops over tokens written from the papers' formulas (and, for
Megatron-core's convention, from its ``switch_load_balancing_loss_func``'s formula
``E/(k·T²) · Σ_e (Σ_t p_te) · count_e``), not calls into balance.py.
"""
import numpy as np
import pytest

from minimoe import MoELayer
from minimoe.core import balance, losses
from minimoe.core.config import MoEConfig
from minimoe.core.gradcheck import check_pair, check_layer
from minimoe.core.router import gate_forward, router_logits_forward
from moe_helpers import make_layer

E, k, d = 5, 2, 3


def routed(T, seed=0, cfg=None, noisy=True):
    """Routing and logits of T random tokens through a random noisy router."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, d))
    W, Wn = rng.standard_normal((d, E)), 0.5 * rng.standard_normal((d, E))
    H, lc = router_logits_forward(x, W, Wn if noisy else None, noise=rng.standard_normal((T, E)), train=True)
    routing, _ = gate_forward(H, k, "topk")
    return routing, lc, H


def ref_megatron(probs, idx):
    """Megatron-core: E / (k T²) · Σ_e (Σ_t p_te) · (tokens routed to e, every choice counted)."""
    T, E_ = probs.shape
    kk = idx.shape[1]
    count = np.zeros(E_)
    for t in range(T):
        for j in range(kk):
            count[idx[t, j]] += 1
    return float(E_ / (kk * T * T) * np.sum(probs.sum(axis=0) * count))


@pytest.mark.parametrize("G", [1, 2, 4])
def test_every_loss_from_sums_is_the_mean_of_the_per_group_losses(G):
    T = 12
    routing, lc, H = routed(T, seed=G)
    for frac in ("first", "all", "all/k"):
        cfg = MoEConfig(d, 4, E, k, balance="switch", switch_fraction=frac, balance_coef=1.0, z_loss_coef=1.0)
        sums, _ = balance.balance_sums_forward(routing, lc, H, cfg, G)
        _, terms, _ = balance.balance_loss_forward(sums, cfg)
        parts = np.split(np.arange(T), G)
        if frac == "all/k":
            want = np.mean([ref_megatron(routing.probs[p], routing.idx[p]) for p in parts])
        else:
            ch = routing.idx if frac == "all" else routing.idx[:, 0]
            want = np.mean([losses.switch_loss_forward(routing.probs[p], ch[p])[0] for p in parts])
        assert terms["switch"] == pytest.approx(want, rel=1e-13), frac
        assert terms["z"] == pytest.approx(losses.z_loss_forward(lc.clean)[0], rel=1e-13)
    cfg = MoEConfig(d, 4, E, k, balance="importance+load", balance_coef=1.0)
    sums, _ = balance.balance_sums_forward(routing, lc, H, cfg, G)
    _, terms, _ = balance.balance_loss_forward(sums, cfg)
    parts = np.split(np.arange(T), G)
    imp = np.mean([losses.importance_loss_forward(routing.gates[p], routing.idx[p], E)[0] for p in parts])
    load = np.mean([losses.load_loss_forward(lc.clean[p], H[p], lc.sigma[p], k)[0] for p in parts])
    assert terms["importance"] == pytest.approx(imp, rel=1e-13)
    assert terms["load"] == pytest.approx(load, rel=1e-13)


@pytest.mark.parametrize("kk", [1, 2, 3])
def test_megatron_convention_is_one_at_perfect_balance(kk):
    """f counts every choice and is divided by T·k: exactly 1 at balance, as GShard's."""
    T = 10
    probs = np.full((T, E), 1.0 / E)
    idx = (np.arange(T)[:, None] + np.arange(kk)[None, :]) % E
    assert ref_megatron(probs, idx) == pytest.approx(1.0, rel=1e-14)
    assert losses.switch_loss_forward(probs, idx, per_choice=kk)[0] == pytest.approx(1.0, rel=1e-14)
    assert losses.switch_loss_forward(probs, idx)[0] == pytest.approx(kk, rel=1e-14)


def test_layer_all_over_k_is_megatron_and_all_divided_by_k():
    layer, rng = make_layer(7, d=4, h=5, E=8, k=2, noisy=False, balance="switch", switch_fraction="all/k",
                            balance_coef=1.0)
    x = rng.standard_normal((40, 4))
    layer.forward(x)
    L = x @ layer.params["W_gate"]
    p = np.exp(L - L.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    idx = np.argsort(-L, axis=1, kind="stable")[:, :2]
    assert layer.stats["losses"]["switch"] == pytest.approx(ref_megatron(p, idx), rel=1e-12)
    layer.switch_fraction = "all"
    layer.forward(x)
    assert layer.stats["losses"]["switch"] == pytest.approx(2 * ref_megatron(p, idx), rel=1e-12)


@pytest.mark.parametrize("cfg_kw", [dict(balance="importance+load", z_loss_coef=0.7),
                                    dict(balance="switch", switch_fraction="all/k", z_loss_coef=0.3),
                                    dict(balance="switch", switch_fraction="first")])
@pytest.mark.parametrize("G", [1, 3])
def test_the_two_pairs_composed_gradcheck(cfg_kw, G):
    """aux(gates, probs, L, H, σ) = balance_loss(balance_sums(...)): both backwards, checked
    against central differences in every input (the choices are held fixed: counts)."""
    T = 9
    routing, lc, H = routed(T, seed=11 + G)
    cfg = MoEConfig(d, 4, E, k, balance_coef=0.8, **cfg_kw)

    def forward(gates, probs, clean, noisy, sigma):
        r = routing._replace(gates=gates, probs=probs)
        sums, scache = balance.balance_sums_forward(r, lc._replace(clean=clean, sigma=sigma), noisy, cfg, G)
        aux, _, lcache = balance.balance_loss_forward(sums, cfg)
        return np.array(aux), (scache, lcache)

    def backward(dout, cache):
        scache, lcache = cache
        dsums = balance.balance_loss_backward(lcache)
        dsums = dsums._replace(**{f: None if v is None else float(dout) * v for f, v in dsums._asdict().items()})
        dg, dp, dL, dH, ds = balance.balance_sums_backward(dsums, scache)
        z = lambda a, like: np.zeros_like(like) if a is None else a   # noqa: E731
        return z(dg, routing.gates), {"probs": z(dp, routing.probs), "clean": z(dL, lc.clean),
                                      "noisy": z(dH, H), "sigma": z(ds, lc.sigma)}

    check_pair(forward, backward, routing.gates.copy(),
               {"probs": routing.probs.copy(), "clean": lc.clean.copy(), "noisy": H.copy(), "sigma": lc.sigma.copy()},
               dout=np.array(1.0), selection=lambda out, cache: cache[0].load.ranked if cache[0].load else None)


@pytest.mark.parametrize("shape", [(12, 3), (3, 4, 3)])
def test_layer_with_megatron_convention_gradcheck(shape):
    layer, rng = make_layer(4, k=2, gate="switch", balance="switch", switch_fraction="all/k", balance_coef=0.7,
                            balance_groups="sequence", z_loss_coef=0.2)
    x = rng.standard_normal(shape)
    noise = rng.standard_normal(shape[:-1] + (4,))
    check_layer(layer, x, forward_kwargs={"noise": noise})


def test_groups_must_divide_the_tokens():
    routing, lc, H = routed(6)
    with pytest.raises(ValueError, match="n_groups=4 must divide the number of tokens T=6"):
        balance.balance_sums_forward(routing, lc, H, MoEConfig(d, 4, E, k, balance="switch"), 4)


def test_a_dense_gate_with_all_or_all_over_k_is_refused():
    for frac in ("all", "all/k"):
        with pytest.raises(ValueError, match=f"switch_fraction='{frac}' needs a sparse gate"):
            MoELayer(4, 5, 4, gate="dense", balance="switch", switch_fraction=frac)
