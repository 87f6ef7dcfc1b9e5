"""The Switch loss counts each token's *first choice*, for every gate, the dense one included.

Switch auxiliary loss (Fedus et al. 2021, eq. 4): ``α · E · Σ_e f_e · P_e`` with ``f_e`` the
fraction of tokens whose first choice is expert e and ``P_e`` the mean router probability.
With gate="dense" there is no top-k list to read the first choice from, so it is the argmax of
the router's probabilities. A mutation that read ``idx[:, 0]`` instead (for the dense gate
that is always expert 0) survived the balancing tests, whose collapsed router happens to point
at expert 0. Here the router points elsewhere, and the loss is recomputed independently.
"""
import numpy as np
import pytest

from minimoe import MoELayer

T, D, E = 64, 6, 4


def _softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=1, keepdims=True)


def _switch_by_hand(x, W_gate, coef):
    """α · E · Σ_e f_e P_e from the definition, with no minimoe code."""
    p = _softmax(x @ W_gate)
    f = np.bincount(np.argmax(p, axis=1), minlength=E) / len(x)
    return coef * E * float(f @ p.mean(axis=0)), f


@pytest.mark.parametrize("gate", ["dense", "topk", "switch"])
@pytest.mark.parametrize("favourite", [1, 3])
def test_switch_loss_counts_the_real_first_choice(gate, favourite):
    rng = np.random.default_rng(favourite)
    layer = MoELayer(D, 8, E, k=2, gate=gate, balance="switch", rng=np.random.default_rng(0))
    W = layer.params["W_gate"]
    W[...] = 0.3 * rng.standard_normal(W.shape)
    W[0, favourite] += 4.0                 # the constant symptom sends most patients to `favourite`
    x = rng.standard_normal((T, D))
    x[:, 0] = 1.0
    layer.forward(x, train=False)
    expected, f = _switch_by_hand(x, W, layer.balance_coef)
    assert np.argmax(f) == favourite and f[favourite] > 0.5     # the fixture does what it says
    assert f[0] < 0.5                                           # ... and it is not expert 0
    assert layer.aux_loss == pytest.approx(expected, rel=1e-12)


def test_dense_gate_switch_loss_is_alpha_at_perfect_balance():
    # Equal logits: P_e = 1/E; first choices spread evenly ⇒ loss = α (docs/design.md §3).
    layer = MoELayer(D, 8, E, gate="dense", balance="switch", rng=np.random.default_rng(0))
    W = layer.params["W_gate"]
    W[...] = 0.0
    # One token per expert: token e has a small nudge towards expert e only.
    x = np.eye(E, D) * 1e-3
    W[:E, :E] = np.eye(E)
    layer.forward(x, train=False)
    p = _softmax(x @ W)
    assert np.array_equal(np.argmax(p, axis=1), np.arange(E))
    assert layer.aux_loss == pytest.approx(layer.balance_coef * E * float(np.full(E, 1 / E) @ p.mean(0)), rel=1e-12)
    assert layer.aux_loss == pytest.approx(layer.balance_coef, rel=1e-5)
