"""Fixtures shared by the MoELayer tests (not a test module itself)."""
import numpy as np

from minimoe import MoELayer
from minimoe.core.gradcheck import as_pair  # noqa: F401  (re-exported: the tests import it from here)


def make_layer(seed, d=3, h=4, E=4, **kw):
    """A layer (float64 unless dtype is given) with every parameter random and O(1),
    biases and W_noise included, so no gradient path is hidden by a zero init."""
    rng = np.random.default_rng(seed)
    layer = MoELayer(d, h, E, rng=rng, **kw)
    for name, p in layer.params.items():
        p[...] = rng.standard_normal(p.shape) * (0.5 if name == "W_noise" else 1.0)
    return layer, rng


def min_score_gap(layer, x, noise=None, train=True):
    """Smallest gap between adjacent sorted router scores of any token."""
    x2 = x.reshape(-1, layer.d_model)
    H = x2 @ layer.params["W_gate"]
    if train and noise is not None:
        H = H + noise.reshape(H.shape) * np.logaddexp(0, x2 @ layer.params["W_noise"])
    s = -np.sort(-H, axis=1)
    return float(np.min(s[:, :-1] - s[:, 1:]))


def assert_margins(layer, x, noise, train=True, margin=1e-3):
    """Fixture guard: no near-ties, so finite differences never cross a kink."""
    assert min_score_gap(layer, x, noise, train) >= margin, "near-tie in fixture; change the seed"
