"""The field's conventions, each against a value computed here, independently of minimoe:
Mixtral's Switch loss (f counts all k choices), per-sequence balancing losses.

References are slow loops written from the papers / HF transformers' code, not calls
into minimoe.core.losses.
"""
import numpy as np
import pytest

from minimoe import MoELayer
from minimoe.core import losses
from minimoe.core.gradcheck import check_layer
from moe_helpers import make_layer


# --------------------------------------------------------------------------- references
def ref_softmax(L):
    e = np.exp(L - L.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def hf_mixtral_load_balancing_loss(logits, k):
    """HF transformers' ``load_balancing_loss_func`` for one layer, transcribed to NumPy:
    softmax, top-k, one_hot (T,k,E), mean over tokens -> (k,E), times mean softmax (E,),
    summed, times E."""
    T, E = logits.shape
    w = ref_softmax(logits)
    sel = np.argsort(-w, axis=1, kind="stable")[:, :k]
    mask = np.zeros((T, k, E))
    for t in range(T):                       # slow on purpose: a reference
        for j in range(k):
            mask[t, j, sel[t, j]] = 1.0
    tokens_per_expert = mask.mean(axis=0)               # (k, E)
    router_prob_per_expert = w.mean(axis=0)             # (E,)
    return float(np.sum(tokens_per_expert * router_prob_per_expert[None, :]) * E)


def ref_switch_first(logits, k=1):
    T, E = logits.shape
    w = ref_softmax(logits)
    f = np.zeros(E)
    for t in range(T):
        f[np.argmax(w[t])] += 1.0 / T
    return float(E * np.dot(f, w.mean(axis=0)))


def ref_importance(gates_full):
    """CV² of the per-expert gate mass, population variance."""
    imp = gates_full.sum(axis=0)
    return float(imp.var() / imp.mean() ** 2)


def topk_gates_full(logits, k):
    """(T,E) top-k gates (softmax over the k kept logits), 0 elsewhere, one token at a time."""
    T, E = logits.shape
    G = np.zeros((T, E))
    for t in range(T):
        top = np.argsort(-logits[t], kind="stable")[:k]
        e = np.exp(logits[t, top] - logits[t, top].max())
        G[t, top] = e / e.sum()
    return G


def quiet_layer(seed, **kw):
    """A noise-free layer whose router logits are x @ W_gate, every parameter O(1)."""
    return make_layer(seed, d=4, h=5, E=kw.pop("E", 8), noisy=False, balance_coef=1.0, **kw)


# --------------------------------------------------------------------------- 1. Switch fraction
@pytest.mark.parametrize("k", [1, 2, 3])
def test_switch_all_is_hf_mixtral_loss(k):
    layer, rng = quiet_layer(0, k=k, balance="switch", switch_fraction="all")
    x = rng.standard_normal((40, 4))
    layer.forward(x)
    ref = hf_mixtral_load_balancing_loss(x @ layer.params["W_gate"], k)
    assert layer.stats["losses"]["switch"] == pytest.approx(ref, rel=1e-12)
    assert layer.aux_loss == pytest.approx(ref, rel=1e-12)


def test_switch_first_is_gshard_and_default():
    layer, rng = quiet_layer(1, k=2, balance="switch")
    assert layer.switch_fraction == "first"
    x = rng.standard_normal((40, 4))
    layer.forward(x)
    assert layer.stats["losses"]["switch"] == pytest.approx(ref_switch_first(x @ layer.params["W_gate"]), rel=1e-12)


def test_two_conventions_differ_at_k2_e8():
    """The issue's comparison: at k=2, E=8 "first" is near 1 and "all" near 2 on a near-balanced router."""
    vals = {}
    for frac in ("first", "all"):
        layer, rng = quiet_layer(2, k=2, balance="switch", switch_fraction=frac)
        layer.params["W_gate"] *= 0.1            # near-uniform router: near perfect balance
        x = rng.standard_normal((4000, 4))
        layer.forward(x)
        vals[frac] = layer.stats["losses"]["switch"]
    assert vals["first"] == pytest.approx(1.0, abs=0.1)
    assert vals["all"] == pytest.approx(2.0, abs=0.1)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_perfect_balance_values_by_hand(k):
    """f and P exactly uniform: "first" gives 1, "all" gives k (E · Σ_e (k/E)(1/E) = k)."""
    E, T = 8, 16
    probs = np.full((T, E), 1.0 / E)
    choices = (np.arange(T)[:, None] + np.arange(k)[None, :]) % E      # every expert k·T/E times
    assert losses.switch_loss_forward(probs, choices)[0] == pytest.approx(k, rel=1e-14)
    assert losses.switch_loss_forward(probs, choices[:, 0])[0] == pytest.approx(1.0, rel=1e-14)


def test_switch_all_gradient_by_hand():
    """∂loss/∂probs_te = E f_e / T with f counting all choices; no gradient through f."""
    probs = ref_softmax(np.random.default_rng(3).standard_normal((5, 4)))
    choices = np.array([[0, 1], [0, 2], [0, 1], [3, 0], [1, 0]])
    f = np.array([5, 3, 1, 1]) / 5
    _, cache = losses.switch_loss_forward(probs, choices)
    d, _ = losses.switch_loss_backward(1.0, cache)
    np.testing.assert_allclose(d, np.tile(4 * f / 5, (5, 1)), rtol=1e-14)


@pytest.mark.parametrize("gate", ["topk", "switch"])
@pytest.mark.parametrize("shape", [(12, 3), (3, 4, 3)])
def test_switch_all_gradcheck(gate, shape):
    layer, rng = make_layer(4, k=2, gate=gate, balance="switch", switch_fraction="all", balance_coef=0.7)
    x = rng.standard_normal(shape)
    noise = rng.standard_normal(shape[:-1] + (4,))
    check_layer(layer, x, forward_kwargs={"noise": noise})


def test_switch_fraction_errors():
    with pytest.raises(ValueError, match="switch_fraction"):
        MoELayer(4, 5, 4, balance="switch", switch_fraction="every")
    with pytest.raises(ValueError, match="switch_fraction='all' needs a sparse gate"):
        MoELayer(4, 5, 4, gate="dense", balance="switch", switch_fraction="all")
    with pytest.raises(ValueError, match="choices must be an integer array"):
        losses.switch_loss_forward(np.full((3, 2), 0.5), np.zeros((4,), dtype=int))


# --------------------------------------------------------------------------- 2. per-sequence groups
def run(layer, x):
    layer.forward(x)
    return layer.stats["losses"]


@pytest.mark.parametrize("frac", ["first", "all"])
def test_sequence_switch_is_mean_of_per_sequence_losses(frac):
    B, S, k = 3, 20, 2
    layer, rng = quiet_layer(5, k=k, balance="switch", switch_fraction=frac, balance_groups="sequence")
    x = rng.standard_normal((B, S, 4))
    L = x @ layer.params["W_gate"]                         # (B, S, E)
    one = (lambda l: hf_mixtral_load_balancing_loss(l, k)) if frac == "all" else ref_switch_first
    ref = np.mean([one(L[b]) for b in range(B)])
    assert run(layer, x)["switch"] == pytest.approx(ref, rel=1e-12)
    pooled = one(L.reshape(-1, 8))
    assert abs(ref - pooled) > 1e-3                        # the fixture tells the two apart
    layer.balance_groups = "batch"
    assert run(layer, x)["switch"] == pytest.approx(pooled, rel=1e-12)


def test_sequence_importance_is_mean_of_per_sequence_losses():
    B, S, k = 4, 10, 2
    layer, rng = quiet_layer(6, k=k, balance="importance", balance_groups="sequence")
    x = rng.standard_normal((B, S, 4))
    L = x @ layer.params["W_gate"]
    ref = np.mean([ref_importance(topk_gates_full(L[b], k)) for b in range(B)])
    assert run(layer, x)["importance"] == pytest.approx(ref, rel=1e-12)
    assert abs(ref - ref_importance(topk_gates_full(L.reshape(-1, 8), k))) > 1e-3


def test_sequence_load_is_mean_of_each_sequence_alone():
    """The smooth load per sequence: the same layer run on each sequence as its own batch."""
    B, S = 3, 8
    layer, rng = make_layer(7, k=2, balance="importance+load", balance_coef=1.0, balance_groups="sequence")
    x = rng.standard_normal((B, S, 3))
    noise = rng.standard_normal((B, S, 4))
    layer.forward(x, noise=noise)
    got = layer.stats["losses"]
    alone = []
    for b in range(B):
        layer.forward(x[b], noise=noise[b])                # 2-D input: one group
        alone.append(layer.stats["losses"])
    for name in ("importance", "load"):
        assert got[name] == pytest.approx(np.mean([a[name] for a in alone]), rel=1e-12)


def test_collapsed_sequences_by_hand():
    """Sequence 0 all on expert 0, sequence 1 all on expert 1 (E=2, k=1): pooled f = P = (½, ½),
    loss 2·(¼+¼) = 1 (looks balanced); per sequence f = P = (1, 0) and (0, 1), loss 2 each."""
    probs = np.array([[1.0, 0.0]] * 3 + [[0.0, 1.0]] * 3)
    first = np.array([0] * 3 + [1] * 3)
    assert losses.switch_loss_forward(probs, first)[0] == pytest.approx(1.0)
    halves = [losses.switch_loss_forward(probs[s], first[s])[0] for s in (slice(0, 3), slice(3, 6))]
    assert halves == [pytest.approx(2.0), pytest.approx(2.0)]


def test_z_loss_same_in_both_modes_and_equals_per_sequence_mean():
    B, S = 3, 7
    x = np.random.default_rng(8).standard_normal((B, S, 4))
    vals = []
    for groups in ("batch", "sequence"):
        layer, _ = quiet_layer(8, k=2, z_loss_coef=1.0, balance_groups=groups)
        vals.append(run(layer, x)["z"])
    L = x @ layer.params["W_gate"]
    per_seq = [np.mean([np.log(np.sum(np.exp(L[b, s]))) ** 2 for s in range(S)]) for b in range(B)]
    assert vals[0] == pytest.approx(np.mean(per_seq), rel=1e-12)
    assert vals[1] == pytest.approx(np.mean(per_seq), rel=1e-12)


def test_two_d_input_is_one_group():
    layer, rng = quiet_layer(9, k=2, balance="importance", balance_groups="sequence")
    x = rng.standard_normal((12, 4))
    seq = run(layer, x)["importance"]
    layer.balance_groups = "batch"
    assert run(layer, x)["importance"] == seq


@pytest.mark.parametrize("balance,frac", [("importance", "first"), ("load", "first"), ("importance+load", "first"),
                                          ("switch", "first"), ("switch", "all")])
def test_sequence_groups_gradcheck(balance, frac):
    layer, rng = make_layer(10, k=2, balance=balance, balance_coef=0.9, switch_fraction=frac,
                            balance_groups="sequence", z_loss_coef=0.3)
    x = rng.standard_normal((3, 5, 3))
    noise = rng.standard_normal((3, 5, 4))
    check_layer(layer, x, forward_kwargs={"noise": noise})


def test_balance_groups_errors():
    with pytest.raises(ValueError, match="balance_groups"):
        MoELayer(4, 5, 4, balance="switch", balance_groups="token")



# --------------------------------------------------------------------------- 5. SwiGLU experts
import math                                                        # noqa: E402

from minimoe.core.experts import Expert, ffn_backward, ffn_forward, init_expert_params   # noqa: E402
from minimoe.core.gradcheck import check_pair                      # noqa: E402
from minimoe.core.layers import silu_backward, silu_forward, swiglu_backward, swiglu_forward   # noqa: E402
from minimoe.beyond.expert_choice import ExpertChoiceMoELayer       # noqa: E402
from minimoe.beyond.hash_router import HashMoELayer                 # noqa: E402
from minimoe.beyond.lossfree import LossFreeMoELayer                # noqa: E402
from minimoe.beyond.shared_experts import SharedExpertMoELayer      # noqa: E402
from moe_helpers import as_pair                                     # noqa: E402


def test_silu_values_by_hand():
    x = np.array([0.0, 1.0, -1.0, 3.0, -800.0, 800.0])
    want = [0.0, 1 / (1 + math.exp(-1)), -1 / (1 + math.exp(1)), 3 / (1 + math.exp(-3)), -0.0, 800.0]
    np.testing.assert_allclose(silu_forward(x)[0], want, rtol=1e-15, atol=0)
    # silu'(0) = ½; silu'(x) = σ(x)(1 + x(1 − σ(x)))
    _, c = silu_forward(np.array([0.0, 2.0]))
    s2 = 1 / (1 + math.exp(-2))
    np.testing.assert_allclose(silu_backward(np.ones(2), c)[0], [0.5, s2 * (1 + 2 * (1 - s2))], rtol=1e-15)


def test_silu_and_swiglu_gradcheck(rng):
    check_pair(silu_forward, silu_backward, rng.standard_normal((5, 4)) * 3)
    z1, z3 = rng.standard_normal((2, 5, 4)) * 2
    check_pair(swiglu_forward, as_pair(swiglu_backward, "z3"), z1, {"z3": z3})


def ref_swiglu_ffn(x, W1, b1, W3, b3, W2, b2):
    """(silu(x W1 + b1) ⊙ (x W3 + b3)) W2 + b2, one token and one hidden unit at a time."""
    n, d = x.shape
    h = W1.shape[1]
    y = np.zeros((n, W2.shape[1]))
    for t in range(n):
        for j in range(h):
            z1 = sum(x[t, i] * W1[i, j] for i in range(d)) + b1[j]
            z3 = sum(x[t, i] * W3[i, j] for i in range(d)) + b3[j]
            y[t] += (z1 / (1 + math.exp(-z1))) * z3 * W2[j]
        y[t] += b2
    return y


def _random_expert_params(rng, E, d, h):
    p = init_expert_params(E, d, h, rng, activation="swiglu")
    return {k: rng.standard_normal(v.shape) for k, v in p.items()}


def test_swiglu_ffn_against_a_per_token_loop(rng):
    p = {k: v[0] for k, v in _random_expert_params(rng, 1, 3, 4).items()}
    x = rng.standard_normal((6, 3))
    y, _ = ffn_forward(x, p["W1"], p["b1"], p["W2"], p["b2"], "swiglu", W3=p["W3"], b3=p["b3"])
    np.testing.assert_allclose(y, ref_swiglu_ffn(x, p["W1"], p["b1"], p["W3"], p["b3"], p["W2"], p["b2"]),
                               rtol=1e-12, atol=1e-12)


def test_swiglu_expert_full_gradcheck(rng):
    ex = Expert(3, 4, activation="swiglu", rng=rng)
    assert set(ex.params) == {"W1", "b1", "W2", "b2", "W3", "b3"}
    assert all(not ex.params[b].any() for b in ("b1", "b2", "b3"))     # zero-initialised biases
    for v in ex.params.values():
        v[...] = rng.standard_normal(v.shape)
    reports = check_layer(ex, rng.standard_normal((7, 3)), rng=rng)
    assert {r.name for r in reports} == {"x", "W1", "b1", "W2", "b2", "W3", "b3"}
    assert ex.flops_per_token() == 6 * 3 * 4


def _randomize(layer, rng):
    for name, v in layer.params.items():
        v[...] = rng.standard_normal(v.shape) * (0.5 if name == "W_noise" else 1.0)
    return layer


@pytest.mark.parametrize("make", [
    lambda rng: MoELayer(3, 4, 4, k=2, gate="topk", balance="importance+load", rng=rng, activation="swiglu"),
    lambda rng: MoELayer(3, 4, 4, k=1, gate="switch", noisy=False, balance="switch", capacity_factor=0.7,
                         rng=rng, activation="swiglu", fast=False),
    lambda rng: MoELayer(3, 4, 4, gate="dense", noisy=False, rng=rng, activation="swiglu"),
    lambda rng: HashMoELayer(3, 4, 4, k=2, rng=rng, activation="swiglu"),
    lambda rng: ExpertChoiceMoELayer(3, 4, 4, k=2, rng=rng, activation="swiglu"),
    lambda rng: LossFreeMoELayer(3, 4, 4, k=2, score="sigmoid", rng=rng, activation="swiglu"),
    lambda rng: SharedExpertMoELayer(3, 4, 4, k=2, n_shared=1, rng=rng, activation="swiglu"),
], ids=["moe-topk-load", "moe-switch-textbook", "moe-dense", "hash", "expert_choice", "lossfree", "shared"])
def test_every_moe_layer_with_swiglu_gradcheck(make):
    rng = np.random.default_rng(11)
    layer = _randomize(make(rng), rng)
    x = rng.standard_normal((2, 4, 3))
    kw = {"noise": rng.standard_normal((2, 4, 4))} if getattr(layer, "noisy", False) else {}
    if isinstance(layer, HashMoELayer):              # route by token ids: no kink in x
        kw = {"ids": rng.integers(0, 6, size=(2, 4))}
    reports = check_layer(layer, x, forward_kwargs=kw, rng=rng)
    names = {r.name for r in reports}
    assert {"x", "W1", "W3", "b3", "W2"} <= names
    if isinstance(layer, SharedExpertMoELayer):
        assert {"W3_shared", "b3_shared"} <= names


def test_swiglu_counts_by_hand():
    d, h, E, k = 6, 10, 8, 2
    layer = MoELayer(d, h, E, k=k, noisy=False, activation="swiglu")
    per_expert = 3 * d * h + 2 * h + d                 # W1, W3, W2; b1, b3, b2
    assert layer.n_params == d * E + E * per_expert
    assert layer.n_active_params == d * E + k * per_expert
    assert layer.flops_per_token() == 2 * d * E + k * (6 * d * h + 2 * d)
    shared = SharedExpertMoELayer(d, h, E, k=k, n_shared=2, activation="swiglu")
    assert shared.flops_per_token() == 2 * d * E + k * (6 * d * h + 2 * d) + 2 * 6 * d * h
    assert shared.n_active_params == d * E + (k + 2) * per_expert


def test_swiglu_argument_errors(rng):
    p = {k: v[0] for k, v in _random_expert_params(rng, 1, 3, 4).items()}
    x = rng.standard_normal((2, 3))
    with pytest.raises(ValueError, match="activation='swiglu' needs W3 and b3"):
        ffn_forward(x, p["W1"], p["b1"], p["W2"], p["b2"], "swiglu")
    with pytest.raises(ValueError, match="W3 and b3 belong to activation='swiglu'"):
        ffn_forward(x, p["W1"], p["b1"], p["W2"], p["b2"], "relu", W3=p["W3"], b3=p["b3"])
    with pytest.raises(ValueError, match="W3"):
        ffn_forward(x, p["W1"], p["b1"], p["W2"], p["b2"], "swiglu", W3=p["W3"][:2], b3=p["b3"])
