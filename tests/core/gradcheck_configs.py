"""Random MoE layer configurations for testing the gradient checker itself (issue 21).

Not a test module: ``test_gradcheck_random_layers.py`` draws from it, and run as a script it
is the long study (``PYTHONPATH=$PWD python tests/core/gradcheck_configs.py N [START] [-q] [--confirm]``):
it checks the N random layers of seeds START.. with :func:`minimoe.core.gradcheck.check_layer`
and counts, per outcome,

    pass      the checker accepted the (correct) hand-written gradients
    FAIL      GradCheckError on a correct gradient: a false failure, the bug this guards against
    kink      KinkError: a step changed the routing; a refusal, not a verdict
    small     GradientsTooSmallError: a refusal, not a verdict
    error     any other exception: a bug in the layer, not in the checker

Every configuration is drawn from its own seed, so a failure is reproduced by ``draw(seed)``.
The layers' gradients are correct (tests/core and tests/beyond check them on fixtures, and
``--confirm`` re-derives them here with a 4th-order finite difference at h = 1e-3).
"""
from __future__ import annotations

import sys
import time
from typing import NamedTuple

import numpy as np

from minimoe import ExpertChoiceMoELayer, HashMoELayer, LossFreeMoELayer, MoELayer, SharedExpertMoELayer
from minimoe.core import gradcheck as gc
from minimoe.core.gradcheck_guards import same_selection


class Config(NamedTuple):
    """One random layer and what a check of it needs."""
    seed: int
    label: str              # the constructor call, readable
    layer: object
    x: np.ndarray
    forward_kwargs: dict


def _randomise(layer, rng, scale):
    """Every parameter random and O(scale), biases and W_noise included (no path hidden by a zero)."""
    for name, p in layer.params.items():
        p[...] = scale * rng.standard_normal(p.shape) * (0.5 if "noise" in name else 1.0)


def _moe_kwargs(rng):
    """A random valid set of MoELayer options."""
    gate = str(rng.choice(["topk", "switch", "dense"]))
    noisy = bool(rng.integers(2))
    balances = [None, "importance", "switch"] + (["load", "importance+load"] if noisy and gate != "dense" else [])
    balance = balances[rng.integers(len(balances))]
    kw = dict(gate=gate, noisy=noisy, balance=balance,
              z_loss_coef=float(rng.choice([0.0, 0.001, 0.1])),
              capacity_factor=[None, 0.5, 1.0, 1.5][rng.integers(4)],
              activation=str(rng.choice(["relu", "gelu", "swiglu"])),
              fast=bool(rng.integers(2)),
              balance_groups=str(rng.choice(["batch", "sequence"])))
    if balance is not None:
        kw["balance_coef"] = float(rng.choice([0.01, 0.1, 1.0]))
    if balance == "switch" and gate != "dense":
        kw["switch_fraction"] = str(rng.choice(["first", "all"]))
    return kw


def draw(seed, beyond=True):
    """The random configuration number ``seed``: a layer, an input, and its forward kwargs.

    One in five is a chapter-3 layer (hash, expert choice, loss-free, shared experts) when
    ``beyond``; the rest are MoELayer with every option drawn.
    """
    rng = np.random.default_rng([21, seed])
    d, h, E = (int(v) for v in rng.integers(2, 5, size=3))
    k = int(rng.integers(1, E + 1))
    shape = (int(rng.integers(1, 3)), int(rng.integers(2, 5))) if rng.integers(2) else (int(rng.integers(2, 7)),)
    x = rng.standard_normal(shape + (d,)) * float(rng.choice([0.5, 1.0, 2.0]))
    T = int(np.prod(shape))
    kind = str(rng.choice(["hash", "expert_choice", "lossfree", "shared"])) if beyond and rng.random() < 0.2 \
        else "moe"
    kw, fk = {}, {}
    if kind == "moe":
        kw = _moe_kwargs(rng)
        layer = MoELayer(d, h, E, k=k, rng=rng, **kw)
        if kw["noisy"]:
            fk["noise"] = rng.standard_normal(shape + (E,))
    elif kind == "hash":
        kw = dict(capacity_factor=[None, 1.0][rng.integers(2)], activation=str(rng.choice(["relu", "gelu", "swiglu"])))
        layer = HashMoELayer(d, h, E, k=k, rng=rng, **kw)
        fk["ids"] = rng.integers(0, 100, size=shape)        # content hashing would move with every nudge of x
    elif kind == "expert_choice":
        kw = dict(capacity_factor=float(rng.choice([0.5, 1.0, 2.0])),
                  activation=str(rng.choice(["relu", "gelu", "swiglu"])))
        layer = ExpertChoiceMoELayer(d, h, E, k=k, rng=rng, **kw)
    elif kind == "lossfree":
        score = str(rng.choice(["softmax", "sigmoid"]))
        kw = dict(score=score, bias_on=str(rng.choice(["scores", "logits"])), normalize=bool(rng.integers(2)),
                  capacity_factor=[None, 1.0][rng.integers(2)], activation=str(rng.choice(["relu", "gelu", "swiglu"])))
        layer = LossFreeMoELayer(d, h, E, k=k, rng=rng, **kw)
        layer.bias[...] = 0.3 * rng.standard_normal(E)
    else:
        kw = dict(n_shared=int(rng.integers(0, 3)), gate=str(rng.choice(["topk", "switch"])),
                  balance=[None, "importance", "switch"][rng.integers(3)],
                  activation=str(rng.choice(["relu", "gelu", "swiglu"])))
        layer = SharedExpertMoELayer(d, h, E, k=k, rng=rng, **kw)
    _randomise(layer, rng, float(rng.choice([0.5, 1.0, 2.0])))
    args = ", ".join([f"{d}, {h}, {E}", f"k={k}"] + [f"{a}={v!r}" for a, v in kw.items()])
    label = f"{type(layer).__name__}({args}) x{x.shape}" + (f" +{sorted(fk)}" if fk else "")
    return Config(seed, label, layer, x, fk)


def outcome(cfg, **check_kwargs):
    """'pass', 'FAIL' (GradCheckError), 'kink', 'small' or 'error' for one configuration, and the message."""
    try:
        gc.check_layer(cfg.layer, cfg.x, forward_kwargs=cfg.forward_kwargs, rng=cfg.seed, **check_kwargs)
    except gc.KinkError as e:
        return "kink", str(e)
    except gc.GradientsTooSmallError as e:
        return "small", str(e)
    except gc.GradCheckError as e:
        return "FAIL", str(e)
    except Exception as e:          # noqa: BLE001  (a layer bug: reported, not a checker verdict)
        return "error", f"{type(e).__name__}: {e}"
    return "pass", ""


def confirm(cfg, h=1e-3):
    """Worst normwise error between the layer's gradients and a 4th-order central difference,
    ``(8(L(θ+h) − L(θ−h)) − (L(θ+2h) − L(θ−2h))) / 12h``, error O(h⁴) — an independent check that
    the gradients a FAIL rejected are right. (None if a step crossed a kink.)"""
    layer, x, fk = cfg.layer, np.array(cfg.x), cfg.forward_kwargs
    dout = np.random.default_rng(cfg.seed).standard_normal(x.shape)   # the dout check_layer draws
    layer.forward(x, **fk)
    sig0 = layer.routing_signature()
    dx = np.array(layer.backward(dout))
    analytic = {"x": dx, **{k: np.array(g) for k, g in layer.grads.items()}}
    arrays = {"x": x, **layer.params}

    def loss():
        out = layer.forward(x, **fk)
        if not same_selection(sig0, layer.routing_signature()):
            raise gc.KinkError("kink")
        return float(np.sum(out * dout)) + float(layer.aux_loss or 0.0)

    worst = 0.0
    try:
        for name, a in arrays.items():
            n = np.zeros_like(a)
            for i in np.ndindex(a.shape):
                old = a[i]
                f = {}
                for m in (-2, -1, 1, 2):
                    a[i] = old + m * h
                    f[m] = loss()
                a[i] = old
                n[i] = (8 * (f[1] - f[-1]) - (f[2] - f[-2])) / (12 * h)
            worst = max(worst, gc.rel_error(analytic[name], n))
    except gc.KinkError:
        return None
    return worst


def study(seeds, verbose=True, do_confirm=False, **check_kwargs):
    """Check every configuration of ``seeds``; returns {outcome: [seed, ...]}."""
    counts = {"pass": [], "FAIL": [], "kink": [], "small": [], "error": []}
    for seed in seeds:
        cfg = draw(seed)
        what, msg = outcome(cfg, **check_kwargs)
        counts[what].append(seed)
        if what in ("FAIL", "error") and verbose:
            extra = ""
            if do_confirm and what == "FAIL":
                extra = f"  (4th-order FD agrees to {confirm(draw(seed))})"
            print(f"seed {seed}: {cfg.label}{extra}\n{msg}\n")
    return counts


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("-")]
    n = int(args[0]) if args else 1000
    start = int(args[1]) if len(args) > 1 else 0
    t0 = time.process_time()
    res = study(range(start, start + n), verbose="-q" not in sys.argv, do_confirm="--confirm" in sys.argv)
    dt = time.process_time() - t0
    print(", ".join(f"{k}: {len(v)}" for k, v in res.items()),
          f"of {n} configurations (seeds {start}..{start + n - 1}) in {dt:.0f} s of CPU")
    print("false failures at seeds", res["FAIL"])
    print("layer errors at seeds", res["error"])
