"""The four clinics: whole-model gradient checks, counts, and the shared interface."""
import numpy as np
import pytest

from minimoe.core.gradcheck import GradCheckError, check_gradients
from minimoe.core.layers import log_softmax, softmax
from minimoe.clinic.models import CLINICS, DenseMoE, Ensemble, Generalist, SparseMoE
from minimoe.clinic.optim import Adam

NS, NC, D = 3, 3, 4          # symptoms, diagnoses, model width: tiny, for finite differences


def batch(seed, T=6):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((T, NS)) * 2.0, rng.integers(0, NC, size=T), rng


def whole_model_check(model, x, y, noise=None, train=True, corrupt=None):
    """Check ∂(task loss + aux loss)/∂(every parameter and the input) by finite differences."""
    x = x.copy()
    model.forward_loss(x, y, train=train, noise=noise)
    dx = model.backward()
    analytic = {"x": dx, **{k: g.copy() for k, g in model.grads.items()}}
    if corrupt is not None:
        corrupt(analytic)

    def loss_fn():
        value = model.forward_loss(x, y, train=train, noise=noise) + model.aux_loss
        return value, model.routing_signature()

    return check_gradients(loss_fn, {"x": x, **model.params}, analytic)


def test_generalist_gradcheck():
    x, y, rng = batch(0)
    reports = whole_model_check(Generalist(NS, NC, D, 5, rng=rng), x, y)
    assert reports and all(r.passed for r in reports)


def test_ensemble_gradcheck():
    x, y, rng = batch(1)
    reports = whole_model_check(Ensemble(NS, NC, 3, D, 4, rng=rng), x, y)
    assert {r.name for r in reports} >= {"m0.embed.W", "m2.block.W2", "x"}
    assert all(r.passed for r in reports)


def test_dense_moe_gradcheck():
    x, y, rng = batch(2)
    reports = whole_model_check(DenseMoE(NS, NC, D, 3, 4, rng=rng), x, y)
    assert all(r.passed for r in reports)


@pytest.mark.parametrize("seed, kwargs, train", [
    (3, dict(k=2), True),                                              # noisy top-2, importance + load
    (4, dict(k=2, balance="importance"), False),                       # eval mode: no noise
    (5, dict(k=1, gate="switch", balance="switch"), True),             # Switch-style k=1
    (6, dict(k=2, balance="importance", capacity_factor=0.5), True),   # with dropped patients
    (7, dict(k=3, noisy=False, balance="importance"), True),
])
def test_sparse_moe_gradcheck(seed, kwargs, train):
    x, y, rng = batch(seed, T=8)
    model = SparseMoE(NS, NC, D, 3, n_experts=4, rng=rng, **kwargs)
    noise = rng.standard_normal((8, 4)) if train and model.block.noisy else None
    reports = whole_model_check(model, x, y, noise=noise, train=train)
    assert all(r.passed for r in reports)
    if kwargs.get("capacity_factor"):
        assert model.moe.stats["dropped"] > 0          # the check did cover dropped patients
    if train and kwargs.get("balance", "importance+load"):
        assert model.aux_loss > 0                       # ... and the balancing loss


def test_the_whole_model_check_catches_a_wrong_gradient():
    x, y, rng = batch(0)
    model = Generalist(NS, NC, D, 5, rng=rng)

    def forget_the_residual(analytic):       # a classic bug: du = block'(dv), dropping the skip path
        model.forward_loss(x, y)
        c_emb, c_out, c_ce = model._caches
        from minimoe.core.layers import cross_entropy_backward, linear_backward
        dv, _ = linear_backward(cross_entropy_backward(1.0, c_ce)[0], c_out)
        du = model.block.backward(dv)
        _, g = linear_backward(du, c_emb)
        analytic["embed.W"] = g["W"]

    with pytest.raises(GradCheckError, match="embed.W"):
        whole_model_check(model, x, y, corrupt=forget_the_residual)


# --------------------------------------------------------------------------- counts
def test_parameter_and_flop_counts_by_hand():
    n, C, d, h, E, k = 8, 4, 16, 8, 8, 2
    shell = n * d + d + d * C + C                      # embed + readout
    gen = Generalist(n, C, d, 21)
    assert gen.n_params == gen.n_active_params == shell + d * 21 + 21 + 21 * d + d
    assert gen.flops_per_token() == 2 * n * d + 4 * d * 21 + 2 * d * C
    sp = SparseMoE(n, C, d, h, E, k)
    experts = E * (d * h + h + h * d + d)
    router = 2 * d * E                                 # W_gate and W_noise
    assert sp.n_params == shell + router + experts
    assert sp.n_active_params == shell + router + k * (d * h + h + h * d + d)
    # router scores, k experts, the weighted combine (MoELayer.flops_per_token)
    assert sp.flops_per_token() == 2 * n * d + (2 * d * E + k * 4 * d * h + 2 * k * d) + 2 * d * C
    dense = DenseMoE(n, C, d, h, E)
    assert dense.n_params == shell + d * E + experts   # no noise matrix
    assert dense.flops_per_token() == 2 * n * d + (2 * d * E + E * 4 * d * h + 2 * E * d) + 2 * d * C
    ens = Ensemble(n, C, 3, d, 21)
    assert ens.n_params == 3 * gen.n_params and ens.flops_per_token() == 3 * gen.flops_per_token()


# --------------------------------------------------------------------------- interface
@pytest.mark.parametrize("kind", list(CLINICS))
def test_interface_keys_shapes_and_in_place_sharing(kind):
    model = CLINICS[kind](NS, NC, rng=np.random.default_rng(0))
    assert set(model.params) == set(model.grads)
    assert all(model.params[k].shape == model.grads[k].shape for k in model.params)
    x, y, rng = batch(0, T=10)
    logits = model.forward(x)
    assert logits.shape == (10, NC) and np.all(np.isfinite(logits))
    loss = model.forward_loss(x, y, rng=rng)
    assert np.isfinite(loss) and model.last_logits.shape == (10, NC)
    assert model.backward().shape == x.shape
    # the flat dict shares its arrays with the layers inside, so an optimizer step reaches them
    before = {k: v.copy() for k, v in model.params.items()}
    Adam(model, lr=0.1).step()
    inner = model.members[0].block.params["W1"] if kind == "ensemble" else model.block.params["W1"]
    key = "m0.block.W1" if kind == "ensemble" else "block.W1"
    assert inner is model.params[key] and not np.allclose(inner, before[key])


def test_eval_mode_is_deterministic_and_train_mode_noise_comes_from_rng():
    model = SparseMoE(NS, NC, rng=np.random.default_rng(0))
    x, _, _ = batch(0, T=20)
    np.testing.assert_array_equal(model.forward(x, train=False), model.forward(x, train=False))
    a = model.forward(x, train=True, rng=np.random.default_rng(5))
    b = model.forward(x, train=True, rng=np.random.default_rng(5))
    np.testing.assert_array_equal(a, b)


def test_ensemble_averages_probabilities_and_trains_members_on_their_own_losses():
    x, y, rng = batch(0, T=12)
    ens = Ensemble(NS, NC, 3, D, 4, rng=rng)
    member_logits = [m.forward(x) for m in ens.members]
    expected = np.log(np.mean([softmax(z) for z in member_logits], axis=0))
    np.testing.assert_allclose(ens.forward(x), expected, atol=1e-12)
    member_ce = [-np.mean(log_softmax(z)[np.arange(12), y]) for z in member_logits]
    assert ens.forward_loss(x, y) == pytest.approx(np.mean(member_ce), abs=1e-12)
    # member 0's gradient does not depend on the other members (they are trained separately)
    ens.backward()
    g0 = ens.grads["m0.readout.W"].copy()
    ens.members[1].params["readout.W"] += 1.0
    ens.forward_loss(x, y)
    ens.backward()
    np.testing.assert_allclose(ens.grads["m0.readout.W"], g0, atol=1e-14)


def test_dropped_patients_carry_on_through_the_residual():
    model = SparseMoE(NS, NC, D, 3, 4, k=1, gate="switch", balance=None, capacity_factor=0.25,
                      rng=np.random.default_rng(0))
    x, _, _ = batch(1, T=40)
    logits = model.forward(x, train=False)
    dropped = ~model.moe.stats["kept"].any(axis=1)
    assert dropped.any()
    p = model.params
    skip = (x @ p["embed.W"] + p["embed.b"]) @ p["readout.W"] + p["readout.b"]
    np.testing.assert_allclose(logits[dropped], skip[dropped], atol=1e-12)


def test_moe_property_and_routing_signature():
    assert Generalist(NS, NC).moe is None and Ensemble(NS, NC).moe is None
    assert Generalist(NS, NC).routing_signature() is None
    sp = SparseMoE(NS, NC, rng=np.random.default_rng(0))
    sp.forward(batch(0)[0])
    assert sp.moe is sp.block and sp.routing_signature()[0].shape == (6, 2)


def test_float32_models_run():
    x, y, rng = batch(0)
    for model in (Generalist(NS, NC, dtype=np.float32), SparseMoE(NS, NC, dtype=np.float32, rng=rng)):
        model.forward_loss(x.astype(np.float32), y, rng=rng)
        model.backward()
        assert all(g.dtype == np.float32 for g in model.grads.values())


def test_bad_input():
    model = Generalist(NS, NC)
    with pytest.raises(ValueError, match=r"x must have shape \(\?, 3\)"):
        model.forward(np.zeros((4, 5)))
    with pytest.raises(RuntimeError, match="call forward_loss before backward"):
        Generalist(NS, NC).backward()
    with pytest.raises(ValueError, match="labels must be in"):
        model.forward_loss(np.zeros((2, NS)), np.array([0, 7]))
    with pytest.raises(ValueError, match="k must be <= 4"):
        SparseMoE(NS, NC, n_experts=4, k=5)
    with pytest.raises(ValueError, match="n_members must be >= 1"):
        Ensemble(NS, NC, 0)
    with pytest.raises(ValueError, match="n_classes must be >= 2"):
        Generalist(NS, 1)
    with pytest.raises(TypeError, match="rng must be a numpy.random.Generator"):
        Generalist(NS, NC, rng=4.2)   # an int seed is fine (SPEC 7)
