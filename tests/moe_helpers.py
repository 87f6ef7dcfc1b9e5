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


# --------------------------------------------------------------------------- a layer's whole state
STATE_FIELDS = ("params", "grads", "stats", "aux_loss", "_cache", "bias", "pending_load", "cfg")


def layer_state(layer):
    """Everything a call could change, copied: arrays by value, the cache by identity."""
    import copy
    state = {}
    for name in STATE_FIELDS:
        if name == "_cache":
            state[name] = getattr(layer, "_cache", None)          # identity: the same object or not
        elif name in vars(layer) or hasattr(type(layer), name):
            value = getattr(layer, name)
            state[name] = (value, copy.deepcopy(value)) if isinstance(value, dict) else copy.deepcopy(value)
    return state


def _equal(a, b):
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return isinstance(b, (tuple, list)) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.array_equal(a, b, equal_nan=True) and np.asarray(a).dtype == np.asarray(b).dtype
    return a == b


def assert_same_state(before, layer, when=""):
    """The layer is exactly as ``before`` (from :func:`layer_state`): same dict objects with the
    same arrays (by value), the same cache object, the same aux_loss, bias and config."""
    now = layer_state(layer)
    assert now.keys() == before.keys(), when
    for name, old in before.items():
        new = now[name]
        if name == "_cache":
            assert new is old, f"{when}: the cache changed"
        elif isinstance(old, tuple) and len(old) == 2 and isinstance(old[0], dict):
            assert new[0] is old[0], f"{when}: {name} is a different dict"
            assert _equal(new[1], old[1]), f"{when}: {name} changed"
        else:
            assert _equal(new, old), f"{when}: {name} changed"
