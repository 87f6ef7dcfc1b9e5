import numpy as np

from minimoe import gradcheck, layers


def test_linear_gradcheck_smoke(rng):
    x = rng.standard_normal((3, 4))
    W = rng.standard_normal((4, 2))
    b = rng.standard_normal(2)
    reports = gradcheck.check_pair(layers.linear_forward, layers.linear_backward, x, {"W": W, "b": b})
    assert all(r.passed for r in reports)
