"""Overworked specialists: every balancing loss notices a collapsed router and fixes it.

The fixture: 256 patients whose first symptom is always 1 (a constant feature), and a
GP who weighs that symptom heavily towards specialist 0 — so everyone is referred to
specialist 0 first (total collapse for k=1; for k=2 specialist 0 sees every patient).
"""
import numpy as np
import pytest

from minimoe import MoELayer

T, D, E = 256, 8, 4
CV_THRESHOLD = 0.2     # after training on the balancing loss alone
STEPS, LR = 200, 1.0


def patients(rng):
    x = rng.standard_normal((T, D))
    x[:, 0] = 1.0
    return x


def collapsed_router(layer, rng):
    W = layer.params["W_gate"]
    W[...] = 0.3 * rng.standard_normal(W.shape)
    W[0, :] = 0.0
    W[0, 0] = 6.0                       # the constant symptom points at expert 0
    if "W_noise" in layer.params:
        layer.params["W_noise"][...] = 0.0


def balanced_router(layer, rng):
    """Refer by the signs of symptoms 1 and 2: one quadrant, so a quarter of the patients, each."""
    W = layer.params["W_gate"]
    W[...] = 0.0
    W[1] = [1.0, 1.0, -1.0, -1.0]
    W[2] = [1.0, -1.0, 1.0, -1.0]
    if "W_noise" in layer.params:
        layer.params["W_noise"][...] = 0.0


def load_cv(layer, x):
    layer.forward(x, train=False)
    load = layer.stats["load"].astype(float)
    return load.std() / load.mean()


CASES = [  # the layer settings of each balancing loss (k=1 top-k on purpose: the task
    # gradient is dead there, yet the load and Switch losses still reach the router)
    dict(k=2, balance="importance", noisy=False),
    dict(k=1, balance="load"),
    dict(k=2, balance="importance+load"),
    dict(k=1, balance="switch", noisy=False),
    dict(k=1, gate="switch", balance="switch"),
]


@pytest.mark.parametrize("kw", CASES, ids=lambda kw: f"{kw.get('gate', 'topk')}-k{kw['k']}-{kw['balance']}")
def test_balancing_loss_penalizes_collapse_and_training_on_it_balances(kw):
    rng = np.random.default_rng(0)
    layer = MoELayer(D, 8, E, balance_coef=1.0, rng=rng, **kw)
    x = patients(rng)

    balanced_router(layer, rng)
    assert load_cv(layer, x) < CV_THRESHOLD, "fixture: the balanced router should be balanced"
    layer.forward(x, train=False)
    balanced_loss = layer.aux_loss

    collapsed_router(layer, rng)
    assert load_cv(layer, x) > 0.5, "fixture: the collapsed router should be collapsed"
    layer.forward(x, train=False)
    assert layer.stats["load"][0] == T                      # specialist 0 sees every patient
    assert layer.aux_loss > balanced_loss

    for _ in range(STEPS):                                  # gradient steps on the aux loss alone
        layer.forward(x, train=True)
        layer.backward(np.zeros_like(x))
        for name in ("W_gate", "W_noise"):
            if name in layer.params:
                layer.params[name] -= LR * layer.grads[name]
    assert load_cv(layer, x) < CV_THRESHOLD


def test_without_a_balancing_loss_nothing_moves_the_router():
    """The control: aux_loss is 0, so the same training loop leaves the collapse in place."""
    rng = np.random.default_rng(0)
    layer = MoELayer(D, 8, E, k=1, rng=rng)
    x = patients(rng)
    collapsed_router(layer, rng)
    before = load_cv(layer, x)
    layer.forward(x)
    assert layer.aux_loss == 0.0
    layer.backward(np.zeros_like(x))
    assert all(np.all(layer.grads[n] == 0) for n in layer.params)
    assert load_cv(layer, x) == before > 1.0
