"""Graders for lesson 10, *The bug hunt*: for each of seven MoE bugs, the learner writes the
check that exposes it and then the fix.

Every grader takes two of the learner's functions, ``check.<bug>(their_check, their_fix)``:

1. their check must **fail** on the buggy code (from :mod:`minimoe.course.bugs`) and **pass** on
   minimoe's own — and where a lazy check would slip through (e.g. "the gradient is not
   zero" instead of a real gradient check), also fail on a second, subtler wrong version;
2. their fix must pass minimoe's reference check (in :mod:`minimoe.course.bugs`) and match
   minimoe's own implementation. Handing in the buggy function as the fix fails.

Each check is graded against several wrong versions, chosen so that each shortcut misses one
(only W_gate looked at, eval mode, a reference kept instead of a copy, a sum in place of every
entry, one half of a two-part property). minimoe's reference checks and losses in
:mod:`minimoe.course.bugs` are the answers: calling one, from a check or a fix, fails
(:data:`REFERENCE_CHECKS`). The course's rule on loops holds here too: no fix loops over
tokens in Python (counted at two sizes of T); a check may loop over the entries of its small
fixture for finite differences, as ``gradcheck.numerical_gradient`` does.

The two are the exercise's two parts (``with part(...)``): each is checked even when the other
fails, and in a graded course each earns half the exercise's points.
"""
from __future__ import annotations

import numpy as np

from .. import bugs
from ...core import layers, losses, router
from ...core.moe import MoELayer
from .compare import expect_array, expect_grads, expect_number, numeric_grads
from .grading import Fail, Lesson, call, no_token_loop, part
from .lesson01 import call_watching

LESSON = Lesson("10", "The bug hunt")
progress = LESSON.progress

# minimoe's own checks and answers, forbidden to every check and fix of this lesson (a check is
# still handed minimoe's functions, and the buggy ones, to judge: calling *those* is its job).
REFERENCE_CHECKS = [bugs.load_matches_sampling, bugs.balances_real_load, bugs.train_router_on_load_loss,
                    bugs.gradient_matches_finite_differences, bugs.router_gradient_is_nonzero,
                    bugs.eval_is_deterministic, bugs.gates_sum_has_zero_gradient, bugs.balance_loss_reacts,
                    bugs.layers_are_balanced_apart]
_LOOP_RULE = ("Vectorise over the tokens (whole-array NumPy); loops over experts, choices or layers are fine.")


def _verdict(value, name):
    """The learner's check must answer True or False (NumPy booleans too)."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, bugs.Finding):
        return value.passed
    raise Fail(f"{name} should return True (the code passes) or False (it is caught), "
               f"got {type(value).__name__} {value!r:.60}")


def _first(out):
    """Accept ``value`` or ``(value, cache_or_grads)`` where minimoe's API returns a pair."""
    return out[0] if isinstance(out, tuple) else out


# =========================================================================== bug 1
def load_fixture(seed, T=12, E=4, k=2):
    """Clean logits, noise scale and noisy logits (no near-ties), as in the lesson."""
    rng = np.random.default_rng(seed)
    L = rng.standard_normal((T, E)) * 1.5
    sigma = rng.uniform(0.5, 1.5, size=(T, E))
    H = L + rng.standard_normal((T, E)) * sigma
    return L, H, sigma


def buggy_smooth_load(clean, noisy, sigma, k):
    """Bug 1 as a load function: (E,) ``Σ_t P(t,e)`` with thresholds in probability units."""
    return bugs.bug1_load_loss_forward(clean, noisy, sigma, k)[1].load


def minimoe_smooth_load(clean, noisy, sigma, k):
    """minimoe's smooth load ``Σ_t P(t,e)`` (Shazeer et al. 2017, eq. 8–10), (E,)."""
    return losses.load_loss_forward(clean, noisy, sigma, k)[1].load


def _load_variant(clean, noisy, sigma, k, source):
    """Smooth load with the thresholds read from ``source`` (T,E) — for the typical mistakes."""
    T = clean.shape[0]
    ranked = router.topk_indices(noisy, k + 1)
    in_topk = np.zeros(clean.shape, dtype=bool)
    in_topk[np.arange(T)[:, None], ranked[:, :k]] = True
    t = np.arange(T)
    thr = np.where(in_topk, source[t, ranked[:, k]][:, None], source[t, ranked[:, k - 1]][:, None])
    return losses.normal_cdf((clean - thr) / sigma).sum(axis=0)


_LOAD_CASES = [(0, 12, 4, 2), (1, 10, 4, 1), (2, 8, 6, 3)]       # (seed, T, E, k)


@LESSON.exercise("mixed_units")
def mixed_units(load_is_honest, fixed_smooth_load):
    with part("load_is_honest"):
        for seed, T, E, k in _LOAD_CASES:
            L, H, s = load_fixture(300 + seed, T, E, k)
            bad = _verdict(call(load_is_honest, buggy_smooth_load, L, H, s, k, np.random.default_rng(seed),
                                name="load_is_honest", forbid=REFERENCE_CHECKS), "load_is_honest")
            good = _verdict(call(load_is_honest, minimoe_smooth_load, L, H, s, k, np.random.default_rng(seed),
                                 name="load_is_honest", forbid=REFERENCE_CHECKS), "load_is_honest")
            if not good:
                raise Fail(f"load_is_honest rejects minimoe's correct estimator (T={T}, E={E}, k={k}). "
                           "Redraw only expert e's own noise, ε ~ N(0,1), keeping the other experts' noisy "
                           "scores H as they are (that is the probability P(t,e) claims to be); and allow "
                           "for sampling error, about 5 standard errors (≈ 0.1–0.2 with a few thousand draws).")
            if bad:
                raise Fail(f"load_is_honest lets the buggy estimator through (T={T}, E={E}, k={k}): its load is "
                           f"off by up to {np.abs(buggy_smooth_load(L, H, s, k) - minimoe_smooth_load(L, H, s, k)).max():.2f} "
                           f"patients. Compare the load it returns with the simulated one, expert by expert, "
                           f"with a tolerance of a few standard errors.")
    with part("fixed_smooth_load"):
        for seed, T, E, k in _LOAD_CASES:
            L, H, s = load_fixture(310 + seed, T, E, k)
            got = call(fixed_smooth_load, L, H, s, k, name="fixed_smooth_load",
                       forbid=[losses.load_loss_forward, minimoe_smooth_load, *REFERENCE_CHECKS])
            expect_array("fixed_smooth_load", _first(got), minimoe_smooth_load(L, H, s, k), shape_desc="(E,)",
                         rtol=1e-9, mistakes=[
                (buggy_smooth_load(L, H, s, k), "That is still the bug: the thresholds are read off "
                                                "softmax(H), probabilities, and compared with logits."),
                (_load_variant(L, H, s, k, L), "The bar is set by the other experts' *noisy* scores H "
                                               "(what really decides the top k), not by the clean L."),
                (losses.normal_cdf((L - H) / s).sum(axis=0),
                 "The threshold is the k-th best score among the *other* experts, not e's own noisy score."),
            ])

        def make(T):
            L, H, s = load_fixture(320 + T, T, 6, 2)
            return L, H, s, 2
        no_token_loop(fixed_smooth_load, "fixed_smooth_load", make,
                      lambda out, L, H, s, k: expect_array("fixed_smooth_load", _first(out),
                                                           minimoe_smooth_load(L, H, s, k), rtol=1e-9),
                      hint=_LOOP_RULE)
    return ("your simulation tells the two estimators apart on 3 cases, and your fix reads the "
            "thresholds off the noisy scores H: same units as L, same load as minimoe.")


# =========================================================================== bug 2
def _switch_fixture(seed, T=8, E=4):
    p = layers.softmax(np.random.default_rng(seed).standard_normal((T, E)))
    return p, p.argmax(axis=1)


def _switch_backward_times_T(dloss, cache):
    dp, g = losses.switch_loss_backward(dloss, cache)
    return dp * cache.T, g


@LESSON.exercise("no_gradient")
def no_gradient(switch_loss_gradcheck, fixed_switch_loss_backward):
    name = "switch_loss_gradcheck"
    with part("switch_loss_gradcheck"):
        for seed in (0, 1):
            p, first = _switch_fixture(400 + seed)
            if not _verdict(call(switch_loss_gradcheck, losses.switch_loss_forward, losses.switch_loss_backward,
                                 p, first, name=name, forbid=REFERENCE_CHECKS), name):
                raise Fail(f"{name} rejects minimoe's Switch loss, whose gradient is right. Compare "
                           "backward(1.0, cache)[0] with gradcheck.numerical_gradient of the loss value "
                           "(perturbing probs) using a relative error, e.g. gradcheck.rel_error(...) < 1e-6.")
            if _verdict(call(switch_loss_gradcheck, bugs.bug2_switch_loss_forward, bugs.bug2_switch_loss_backward,
                             p, first, name=name, forbid=REFERENCE_CHECKS), name):
                raise Fail(f"{name} lets the detached loss through: its backward is all zeros while the loss "
                           "value clearly depends on probs. Compare with finite differences.")
            if _verdict(call(switch_loss_gradcheck, losses.switch_loss_forward, _switch_backward_times_T,
                             p, first, name=name, forbid=REFERENCE_CHECKS), name):
                raise Fail(f"{name} accepts a backward that is T times too large. \"Not zero\" is not enough: "
                           "compare the analytic gradient with finite differences, entry by entry.")
    with part("fixed_switch_loss_backward"):
        for seed in (2, 3):
            p, first = _switch_fixture(410 + seed, T=6 + seed, E=3 + seed)
            _, cache = bugs.bug2_switch_loss_forward(p, first)
            got = _first(call_watching(fixed_switch_loss_backward, 1.0, cache, name="fixed_switch_loss_backward",
                                       labels=("dloss", "cache"), forbid=[losses.switch_loss_backward, *REFERENCE_CHECKS]))
            _, ref = losses.switch_loss_forward(p, first)
            want = losses.switch_loss_backward(1.0, ref)[0]
            T, E = p.shape
            f = cache.f
            expect_array("dprobs", got, want, shape_desc="(T, E)", rtol=1e-9, mistakes=[
                (np.zeros_like(p), "Still zero: that is the bug. loss = E·Σ_e f_e·P_e with P_e = mean_t "
                                   "probs[t, e], so ∂loss/∂probs[t, e] = E·f_e / T."),
                (np.broadcast_to(E * f, p.shape), "P_e is a *mean* over the T tokens: divide by T."),
                (np.broadcast_to(f / T, p.shape), "You left out the factor E in front of the sum."),
            ])
            got2 = _first(call_watching(fixed_switch_loss_backward, 2.5, cache, name="fixed_switch_loss_backward",
                                        labels=("dloss", "cache"), forbid=[losses.switch_loss_backward, *REFERENCE_CHECKS]))
            expect_array("dprobs for dloss = 2.5", got2, 2.5 * want, shape_desc="(T, E)", rtol=1e-9, mistakes=[
                (want, "Multiply by the upstream gradient dloss (the loss coefficient α arrives through it)."),
            ])

        def make(T):
            p, first = _switch_fixture(420 + T, T=T, E=6)
            return 1.0, bugs.bug2_switch_loss_forward(p, first)[1]
        no_token_loop(fixed_switch_loss_backward, "fixed_switch_loss_backward", make,
                      lambda out, dloss, cache: expect_array(
                          "dprobs", _first(out), np.broadcast_to(cache.shape[1] * cache.f / cache.shape[0], cache.shape),
                          rtol=1e-9), hint=_LOOP_RULE)
    return ("your gradient check catches the detached loss (and a wrong-scale backward) and passes minimoe; "
            "your backward E·f_e/T now reaches the router.")


# =========================================================================== bug 3
def _layer(seed=0, **kw):
    return MoELayer(6, 8, 4, **{"k": 1, "rng": np.random.default_rng(seed), **kw})


class _Spy:
    """Records the ``train=`` of every forward the learner's check runs on ``layer``."""

    def __init__(self, layer):
        self.modes, forward = [], layer.forward

        def spied(x, train=True, noise=None):
            self.modes.append(bool(train))
            return forward(x, train=train, noise=noise)
        layer.forward = spied               # on this object only


@LESSON.exercise("dead_router")
def dead_router(router_learns, fixed_top1_layer):
    name = "router_learns"
    x = np.random.default_rng(7).standard_normal((16, 6))
    cases = [("the dead top-1 router", bugs.bug3_dead_router_layer(6, 8, 4, rng=np.random.default_rng(0)), False),
             ("a top-1 router with only the importance loss", _layer(balance="importance"), False),
             # the z-loss reaches W_gate only: a check that looks at W_gate alone calls it alive
             ("a top-1 router with only the z-loss, whose W_noise never trains", _layer(z_loss_coef=0.01), False),
             ("a Switch-gate top-1 router", _layer(gate="switch"), True),
             ("a top-1 router with the Switch loss", _layer(balance="switch"), True),
             ("a top-1 router with the load loss", _layer(balance="load"), True)]
    with part("router_learns"):
        for what, layer, alive in cases:
            spy = _Spy(layer)
            ok = _verdict(call(router_learns, layer, x, np.random.default_rng(1), name=name, forbid=REFERENCE_CHECKS),
                          name)
            if ok and not alive:
                norms = {n: float(np.abs(layer.grads[n]).max()) for n in ("W_gate", "W_noise") if n in layer.grads}
                if norms.get("W_gate", 0) > 0:
                    raise Fail(f"{name} says {what} learns, but only its W_gate gets a gradient: W_noise's is exactly "
                               f"0 (the z-loss acts on the clean scores x W_gate alone), so half of the GP never "
                               f"trains. Look at every router weight the layer has: W_gate and, if it is in "
                               f"layer.params, W_noise.")
                raise Fail(f"{name} says {what} learns, but its W_gate and W_noise gradients are exactly 0. "
                           "After layer.backward, look at layer.grads['W_gate'] (and 'W_noise').")
            if alive and not ok:
                if spy.modes and not all(spy.modes):
                    raise Fail(f"{name} says {what} does not learn: your check ran layer.forward with train=False. "
                               f"In eval mode the router adds no noise, so W_noise gets no gradient in any layer; "
                               f"the exercise asks for one training step, layer.forward(x, train=True).")
                raise Fail(f"{name} says {what} does not learn, but its router gradient is non-zero. "
                           "Check for gradients that are not *exactly* zero, e.g. np.any(g != 0).")
    with part("fixed_top1_layer"):
        layer = call(fixed_top1_layer, 6, 8, 4, np.random.default_rng(2), name="fixed_top1_layer",
                     forbid=REFERENCE_CHECKS)
        if not all(hasattr(layer, a) for a in ("params", "grads", "forward", "backward", "k")):
            raise Fail(f"fixed_top1_layer should return an MoELayer, got {type(layer).__name__}")
        if layer.k != 1:
            raise Fail(f"your layer sends each patient to k = {layer.k} specialists. Keep k = 1 (the cheap "
                       "referral) and make the router learn anyway.")
        verdict = bugs.router_gradient_is_nonzero(layer, x)
        if not verdict:
            hint = (" The importance loss acts on the gates, which are all exactly 1, so it stops there too."
                    if getattr(layer, "balance", None) == "importance" else "")
            raise Fail(f"your layer's router still gets no gradient ({verdict.message}).{hint} Use the Switch "
                       "gate (gate='switch', which keeps p_e < 1) or a loss that reaches the router "
                       "(balance='switch' or 'load').")
    return f"your check tells dead routers from live ones, and your top-1 router learns ({verdict.message})."


# =========================================================================== bug 4
@LESSON.exercise("noisy_eval")
def noisy_eval(eval_is_deterministic, fixed_router_logits_forward):
    name = "eval_is_deterministic"
    x = np.random.default_rng(8).standard_normal((16, 6))
    noisy_layer = bugs.NoisyEvalMoE(6, 8, 4, rng=np.random.default_rng(0))
    good_layer = MoELayer(6, 8, 4, rng=np.random.default_rng(0))
    args = dict(name=name, forbid=REFERENCE_CHECKS)
    with part("eval_is_deterministic"):
        if _verdict(call(eval_is_deterministic, lambda: noisy_layer.forward(x, train=False), **args), name):
            raise Fail(f"{name} passes a layer whose eval output changes from call to call. Call predict() "
                       "at least twice and compare the outputs exactly (np.array_equal).")
        if not _verdict(call(eval_is_deterministic, lambda: good_layer.forward(x, train=False), **args), name):
            raise Fail(f"{name} rejects minimoe's MoELayer in eval mode, which returns the same array every time.")
        whisper = np.random.default_rng(9)                     # noise far below any tolerance, still noise
        faint = lambda: good_layer.forward(x, train=False) * (1 + 1e-12 * whisper.standard_normal())  # noqa: E731
        if _verdict(call(eval_is_deterministic, faint, **args), name):
            raise Fail(f"{name} passes an eval whose output changes in the 12th digit from call to call. The "
                       "exercise asks for *exactly* equal outputs: np.allclose (or a tolerance) lets a little "
                       "leftover noise through; compare with np.array_equal.")
        buffer = np.empty((x.shape[0], 6))                  # a layer that reuses its output array

        def buffered():
            buffer[...] = noisy_layer.forward(x, train=False)
            return buffer
        if _verdict(call(eval_is_deterministic, buffered, **args), name):
            raise Fail(f"{name} passes a noisy eval whose predict() hands back the same array every time, "
                       f"overwritten (as a layer that reuses its output buffer does): the first output you kept "
                       f"is the second one too, so they always compare equal. Keep a copy of each output, "
                       f"np.array(predict()) or predict().copy(), before calling again.")
    with part("fixed_router_logits_forward"):
        rng = np.random.default_rng(3)
        Wg, Wn = rng.standard_normal((6, 4)), rng.standard_normal((6, 4))

        def run(train, gen):
            return _first(call(fixed_router_logits_forward, x, Wg, Wn, rng=gen, train=train,
                               name="fixed_router_logits_forward",
                               forbid=[router.router_logits_forward, *REFERENCE_CHECKS]))
        gen = np.random.default_rng(4)
        evals = [np.asarray(run(False, gen), dtype=float) for _ in range(2)]
        if not np.array_equal(evals[0], evals[1]):
            raise Fail("fixed_router_logits_forward still adds noise in eval mode (train=False): two calls "
                       "differ. Add ε ⊙ σ only when train is True.")
        expect_array("H in eval mode", evals[0], x @ Wg, shape_desc="(T, E)", rtol=1e-12)
        trains = [np.asarray(run(True, gen), dtype=float) for _ in range(2)]
        if np.array_equal(trains[0], trains[1]) or np.allclose(trains[0], x @ Wg):
            raise Fail("in training (train=True) the GP must still explore: add the noise ε ⊙ softplus(x W_noise), "
                       "with ε drawn from rng.")
        # With a fresh generator the learner's ε is the one minimoe would draw (rng.standard_normal or
        # rng.normal, shape (T, E)), so the usual mistakes can be named exactly.
        L, sp = x @ Wg, router.softplus(x @ Wn)
        H = np.asarray(run(True, np.random.default_rng(44)), dtype=float)
        eps = np.random.default_rng(44).standard_normal(L.shape)
        named = [(L + eps, "you added ε alone: scale it by the learned noise level softplus(x W_noise), "
                           "H = L + ε ⊙ softplus(x W_noise)."),
                 (L + eps * (x @ Wn), "you scaled ε by x W_noise itself, which can be negative: the scale is "
                                      "softplus(x W_noise) = log(1 + exp(x W_noise)) > 0."),
                 (L + eps * np.exp(x @ Wn), "you scaled ε by exp(x W_noise): the scale is softplus(x W_noise) = "
                                            "log(1 + exp(x W_noise)), lesson 04."),
                 (L + eps / sp, "you divided ε by softplus(x W_noise): multiply, H = L + ε ⊙ softplus(x W_noise)."),
                 (eps * sp, "you returned the noise alone: H = x W_gate + ε ⊙ softplus(x W_noise).")]
        if H.shape == L.shape and not np.allclose(H, L + eps * sp, rtol=1e-12, atol=1e-12):
            for wrong, hint in named:
                if np.allclose(H, wrong, rtol=1e-12, atol=1e-12):
                    raise Fail(f"fixed_router_logits_forward in training: {hint}")
        ratio = (trains[0] - L) / sp                      # your noise over the right scale: should be ε ~ N(0, 1)
        if not 0.3 < np.std(ratio) < 3.0:
            raise Fail(f"in training, your noise H − x W_gate, divided by the right scale softplus(x W_noise), "
                       f"should be standard normal ε (std 1), but its standard deviation is {np.std(ratio):.3g}: "
                       f"the noise must be ε ⊙ softplus(x W_noise) with ε = rng.standard_normal((T, E)).")

        def make(T):
            return np.random.default_rng(T).standard_normal((T, 6)), Wg, Wn
        no_token_loop(lambda x_, Wg_, Wn_: fixed_router_logits_forward(x_, Wg_, Wn_, rng=np.random.default_rng(5),
                                                                       train=True),
                      "fixed_router_logits_forward", make,
                      lambda out, x_, Wg_, Wn_: expect_array(
                          "H in training", _first(out), x_ @ Wg_ + np.random.default_rng(5).standard_normal(
                              (x_.shape[0], Wg_.shape[1])) * router.softplus(x_ @ Wn_), rtol=1e-9), hint=_LOOP_RULE)
    return "your determinism test catches noise in eval, and your router explores in training only."


# =========================================================================== bug 5
def _renorm_fixture(seed, T, E, k):
    p = layers.softmax(np.random.default_rng(seed).standard_normal((T, E)))
    return p, router.topk_indices(p, k)


def _renorm_backward_plus(dg, cache):
    """A wrong quotient rule (sign of the correction flipped), for the check's second test."""
    g, s, idx, shape = cache
    dp = np.zeros(shape)
    dp[np.arange(shape[0])[:, None], idx] = (dg + np.sum(dg * g, axis=1, keepdims=True)) / s
    return dp, {}


def _renorm_backward_transposed(dg, cache):
    """The quotient rule's Jacobian transposed, g_j · Σ_i dg_i for ⟨dg, g⟩: for dg = ones its dp
    sums to 0 over a token's choices without being 0, so a check of the sum lets it through."""
    g, s, idx, shape = cache
    dp = np.zeros(shape)
    dp[np.arange(shape[0])[:, None], idx] = (dg - g * np.sum(dg, axis=1, keepdims=True)) / s
    return dp, {}


def _renorm_backward_right(dg, cache):
    """dp_j = (dg_j − ⟨dg, g⟩)/s at the chosen experts (for the loop check's large batch)."""
    g, s, idx, shape = cache
    dp = np.zeros(shape)
    dp[np.arange(shape[0])[:, None], idx] = (dg - np.sum(dg * g, axis=1, keepdims=True)) / s
    return dp


@LESSON.exercise("detached_sum")
def detached_sum(gates_sum_is_constant, fixed_renormalize_backward):
    name = "gates_sum_is_constant"
    with part("gates_sum_is_constant"):
        for seed, (T, E, k) in enumerate([(6, 4, 2), (5, 5, 3), (4, 3, 1)]):
            p, idx = _renorm_fixture(500 + seed, T, E, k)
            args = dict(name=name, forbid=REFERENCE_CHECKS)
            if not _verdict(call(gates_sum_is_constant, router.renormalize_forward, router.renormalize_backward,
                                 p, idx, **args), name):
                raise Fail(f"{name} rejects minimoe's renormalization (k={k}), whose backward is right. "
                           "backward(ones) is 0 up to rounding (~1e-16): compare with a tolerance, "
                           "e.g. np.allclose(dp, 0, atol=1e-10).")
            for wrong, what in [(bugs.bug5_renormalize_backward, "the detached-sum backward"),
                                (_renorm_backward_plus, "a backward with the wrong sign")]:
                if _verdict(call(gates_sum_is_constant, bugs.bug5_renormalize_forward, wrong, p, idx, **args), name):
                    raise Fail(f"{name} lets {what} through (k={k}). Each token's gates sum to 1 whatever p "
                               "is, so backward(np.ones_like(g), cache) must return dp = 0.")
            if k > 1 and _verdict(call(gates_sum_is_constant, bugs.bug5_renormalize_forward, _renorm_backward_transposed,
                                       p, idx, **args), name):
                raise Fail(f"{name} lets the transposed quotient rule through (k={k}): its dp for dg = ones is "
                           f"(1 − k·g_j)/s, not 0, but it sums to 0 over each token's choices. The property is that "
                           f"dp is 0 at every entry: test every entry (np.allclose(dp, 0, atol=...)), not a sum.")
    with part("fixed_renormalize_backward"):
        worst = 0.0
        for seed, (T, E, k) in enumerate([(6, 4, 2), (5, 5, 3), (4, 3, 1)]):
            p, idx = _renorm_fixture(510 + seed, T, E, k)
            g, cache = bugs.bug5_renormalize_forward(p, idx)
            dg = np.random.default_rng(520 + seed).standard_normal(g.shape)
            got = _first(call_watching(fixed_renormalize_backward, dg, cache, name="fixed_renormalize_backward",
                                       labels=("dg", "cache"), forbid=[router.renormalize_backward, *REFERENCE_CHECKS]))
            pp = p.copy()
            num = numeric_grads(lambda: router.renormalize_forward(pp, idx)[0], {"p": pp}, dg)
            s = cache[1]
            buggy = bugs.bug5_renormalize_backward(dg, cache)[0]
            undivided = np.zeros_like(p)
            undivided[np.arange(T)[:, None], idx] = dg - np.sum(dg * g, axis=1, keepdims=True)
            worst = max(worst, expect_grads({"p": got}, num, mistakes={"p": [
                (buggy, "That is still the detached sum: dp = dg/s misses the quotient rule's second term, "
                        "−⟨dg, g⟩/s at the chosen experts."),
                (undivided, "Divide by s: g = p/s, so every term of the derivative carries 1/s."),
                (_renorm_backward_plus(dg, cache)[0],
                 "Sign flip in the quotient rule: raising p_j raises s, which *lowers* every gate, so the "
                 "second term is subtracted, dp_j = (dg_j − ⟨dg, g⟩)/s."),
                (_renorm_backward_transposed(dg, cache)[0],
                 "That is the quotient rule's Jacobian transposed: ∂g_i/∂p_j = (δ_ij − g_i)/s, so "
                 "dp_j = Σ_i dg_i (δ_ij − g_i)/s = (dg_j − ⟨dg, g⟩)/s — the correction ⟨dg, g⟩ is one number "
                 "per token, not g_j · Σ_i dg_i."),
            ]}))

        def make(T):
            p, idx = _renorm_fixture(530 + T, T, 6, 2)
            g, cache = bugs.bug5_renormalize_forward(p, idx)
            return np.random.default_rng(T).standard_normal(g.shape), cache
        no_token_loop(fixed_renormalize_backward, "fixed_renormalize_backward", make,
                      lambda out, dg, cache: expect_array("dp", _first(out), _renorm_backward_right(dg, cache),
                                                          rtol=1e-9), hint=_LOOP_RULE)
    return (f"your property test (Σ_j g_j is constant, so its gradient is 0) catches the detached sum "
            f"without a single finite difference, and your quotient rule passes the gradient check "
            f"(worst relative error {worst:.1e}).")


# =========================================================================== bug 6
def _f_only_loss(logits, k):
    """A loss of the counts alone (E·Σ f_e²/k): it sees the collapse, but its gradient is zero."""
    E = logits.shape[1]
    f = np.bincount(router.topk_indices(logits, k).reshape(-1), minlength=E) / logits.shape[0]
    return float(E * np.dot(f, f) / k)


def _mixtral_variant(logits, k, first_only=False, per_slot=False, topk_probs=False):
    """Mixtral's loss with one typical slip, for the hints."""
    T, E = logits.shape
    idx = router.topk_indices(logits, k)
    f = np.bincount((idx[:, :1] if first_only else idx).reshape(-1), minlength=E) / T
    if per_slot:
        f = f / k
    if topk_probs:                       # P from the softmax over the k chosen scores, scattered to (T, E)
        w = np.zeros((T, E))
        w[np.arange(T)[:, None], idx] = layers.softmax(logits[np.arange(T)[:, None], idx])
        P = w.mean(axis=0)
    else:
        P = layers.softmax(logits).mean(axis=0)
    return float(E * np.dot(f, P))


_MIXTRAL_CASES = [(16, 4, 2, None), (12, 6, 2, 3), (10, 5, 1, None), (9, 8, 3, 0)]   # (T, E, k, favourite)


def _top_score_loss(logits, k):
    """Each token's top score, averaged: it has a gradient, but on the lesson's balanced and collapsed
    batches (every token's favourite is the same margin above the same scores) it is the same
    number — a loss that never sees the collapse."""
    return float(np.mean(np.max(logits, axis=1)))


def _recording(layer_loss, seen):
    """``layer_loss``, keeping a copy of every logits array the learner's check feeds it."""
    def loss(logits, k):
        seen.append(np.array(logits, dtype=float))
        return layer_loss(logits, k)
    return loss


def _where_the_gradient_was_taken(seen):
    """The logits most of the recorded calls were a small step away from (finite differences), or None."""
    bases = {}
    for v in seen:
        key = (v.shape, np.round(v, 3).tobytes())
        bases[key] = bases.get(key, (v, 0))[0], bases.get(key, (v, 0))[1] + 1
    v, n = max(bases.values(), key=lambda b: b[1]) if bases else (None, 0)
    return v if n > 2 else None


def _rejected_right_loss(name, k, seen):
    """The verdict when the learner's check rejects Mixtral's loss (right): say what each half sees."""
    balanced, collapsed = bugs.routing_fixture(16, 4), bugs.routing_fixture(16, 4, 0)
    lb, lc = bugs.mixtral_layer_loss(balanced, k), bugs.mixtral_layer_loss(collapsed, k)
    x = collapsed.copy()
    g = float(np.max(np.abs(numeric_grads(lambda: bugs.mixtral_layer_loss(x, k), {"x": x}, 1.0)["x"])))
    head = (f"{name} rejects Mixtral's loss, which is right (k={k}): on the lesson's batches it is {lb:.4g} "
            f"balanced and {lc:.4g} collapsed, so (a) holds, and its finite-difference gradient at the "
            f"collapsed batch reaches {g:.3g}, so (b) holds too.")
    base = _where_the_gradient_was_taken(seen)
    if base is not None and base.ndim == 2 and base.shape[1] > 1:
        first = np.argmax(base, axis=1)
        counts = np.bincount(first, minlength=base.shape[1])
        if counts.min() == counts.max():
            return Fail(f"{head} Your check took its finite differences around a batch balanced at perfect "
                        f"balance, where Mixtral's gradient is exactly 0 (f is uniform, and Σ_e P_e = 1 for any "
                        f"logits, so E·Σ_e f_e ∂P_e = 0): take the gradient at the collapsed batch.")
    return Fail(f"{head} So one of your halves answers False where it should not: (a) compare the collapsed "
                f"batch's loss with the balanced one's (collapsed > balanced, with a tolerance far below "
                f"{lc - lb:.3g}); (b) take the finite differences of the loss at the collapsed batch and "
                f"accept any entry larger than a tolerance far below {g:.1g}.")


@LESSON.exercise("constant_loss")
def constant_loss(loss_is_alive, fixed_mixtral_loss):
    name = "loss_is_alive"
    args = dict(name=name, forbid=REFERENCE_CHECKS)
    with part("loss_is_alive"):
        for k in (1, 2):
            seen = []
            if not _verdict(call(loss_is_alive, _recording(bugs.mixtral_layer_loss, seen), k, **args), name):
                raise _rejected_right_loss(name, k, seen)
            if _verdict(call(loss_is_alive, bugs.bug6_mixtral_loss, k, **args), name):
                raise Fail(f"{name} lets the constant loss through (k={k}): it is the same number on a "
                           "balanced batch and on a batch collapsed onto one expert. Compare the two.")
            if _verdict(call(loss_is_alive, _f_only_loss, k, **args), name):
                raise Fail(f"{name} passes a loss built from the counts f alone (k={k}): it is larger on the "
                           "collapsed batch, but f is a count, a step function of the logits, so its gradient "
                           "is zero and the router learns nothing. Also check that the finite-difference "
                           "gradient with respect to the logits is not zero.")
            if _verdict(call(loss_is_alive, _top_score_loss, k, **args), name):
                raise Fail(f"{name} passes a loss that is the same number on the balanced and on the collapsed "
                           f"batch (it reads each token's top score only; k={k}), though it has a gradient. "
                           f"Half (a) asks that the loss be *larger* on the collapsed batch — compare with >, not "
                           f">= — and a check needs both halves, (a) and (b).")
    with part("fixed_mixtral_loss"):
        for i, (T, E, k, fav) in enumerate(_MIXTRAL_CASES):
            logits = bugs.routing_fixture(T, E, fav, seed=600 + i, margin=0.7)
            got = call(fixed_mixtral_loss, logits, k, name="fixed_mixtral_loss",
                       forbid=[bugs.mixtral_layer_loss, losses.switch_loss_forward,
                               bugs.model_balance_loss, *REFERENCE_CHECKS])
            expect_number(f"the loss (T={T}, E={E}, k={k})", _first(got), bugs.mixtral_layer_loss(logits, k),
                          rtol=1e-9, mistakes=[
                (bugs.bug6_mixtral_loss(logits, k), "That is still the constant: a softmax over each token's k "
                                                    "chosen scores, averaged, is 1/k for every token."),
                (_mixtral_variant(logits, k, first_only=True),
                 "You counted only each token's first choice (GShard's f): Mixtral's f counts every chosen "
                 "expert, so f sums to k and the loss is k at perfect balance."),
                (_mixtral_variant(logits, k, per_slot=True),
                 "You divided f by k as well: Mixtral's f_e is the number of tokens that chose e among their "
                 "top k, divided by T only (f sums to k)."),
                (_mixtral_variant(logits, k, topk_probs=True),
                 "P_e is the mean of the *full* softmax of the logits over all E experts, not of the top-k "
                 "gate's shares."),
                (E * k / T, "Your softmax runs over the tokens (axis=0): then every expert's column sums to 1 and "
                            "P_e = 1/T whatever the routing. The router's probabilities are a softmax over each "
                            "token's E scores, axis=1 (layers.softmax does that), then averaged over tokens."),
            ])

        def make(T):
            return bugs.routing_fixture(T, 8, None, seed=T, margin=0.7), 2
        no_token_loop(fixed_mixtral_loss, "fixed_mixtral_loss", make,
                      lambda out, logits, k: expect_number("the loss", _first(out), bugs.mixtral_layer_loss(logits, k),
                                                           rtol=1e-9), hint=_LOOP_RULE)
    return ("your check sees that a balancing loss must react to a collapse and carry a gradient; your "
            "Mixtral loss is E·Σ f_e P_e with f over all k choices and P from the full softmax.")


# =========================================================================== bug 7
def _scaled_pool(layer_logits, k):
    """The pooled loss times the number of layers: right on identical layers, still pooled."""
    return len(layer_logits) * bugs.bug7_model_balance_loss(layer_logits, k)


@LESSON.exercise("pooled_layers")
def pooled_layers(layers_seen_apart, fixed_model_loss):
    name = "layers_seen_apart"
    args = dict(name=name, forbid=REFERENCE_CHECKS)
    with part("layers_seen_apart"):
        for k in (1, 2):
            if not _verdict(call(layers_seen_apart, bugs.model_balance_loss, k, **args), name):
                A, B = bugs.routing_fixture(16, 4, 0, seed=1), bugs.routing_fixture(16, 4, 1, seed=2)
                both, a, b = (bugs.model_balance_loss(v, k) for v in ([A, B], [A], [B]))
                raise Fail(f"{name} rejects the sum of the layers' own losses (k={k}), which is right: on the "
                           f"lesson's two layers, model_loss([A, B], k) = {both:.6g} and the two one at a time, "
                           f"model_loss([A], k) + model_loss([B], k) = {a:.6g} + {b:.6g}, agree to rounding. Pass "
                           f"lists of layers (model_loss([A], k), not model_loss(A, k)) and compare with a relative "
                           f"tolerance, e.g. np.isclose(..., rtol=1e-9, atol=0).")
            if _verdict(call(layers_seen_apart, bugs.bug7_model_balance_loss, k, **args), name):
                raise Fail(f"{name} lets the pooled loss through (k={k}). Feed it two layers collapsed onto "
                           "*different* experts and compare with the layers' losses one at a time.")
            if _verdict(call(layers_seen_apart, _scaled_pool, k, **args), name):
                raise Fail(f"{name} passes the pooled loss multiplied by the number of layers (k={k}). On two "
                           "copies of the same layer that looks right; two layers collapsed onto *different* "
                           "experts cancel out when pooled.")
    with part("fixed_model_loss"):
        rng = np.random.default_rng(700)
        cases = [[bugs.routing_fixture(12, 4, 0, seed=1), bugs.routing_fixture(12, 4, 2, seed=2)],
                 [bugs.routing_fixture(8, 5, None, seed=3)],
                 [bugs.routing_fixture(T, 6, fav, seed=4 + T) for T, fav in ((10, 1), (7, None), (9, 5))]]
        for i, layer_logits in enumerate(cases):
            layer_logits = [v + 0.01 * rng.standard_normal(v.shape) for v in layer_logits]
            for k in (1, 2):
                got = call_watching(fixed_model_loss, layer_logits, k, name="fixed_model_loss", labels=("layer_logits",),
                                    forbid=[bugs.model_balance_loss, *REFERENCE_CHECKS])
                L = len(layer_logits)
                per = [bugs.mixtral_layer_loss(v, k) for v in layer_logits]
                mistakes = [(bugs.bug7_model_balance_loss(layer_logits, k),
                             "That still pools the layers: compute each layer's loss on its own tokens.")]
                if L > 1:
                    mistakes += [(float(np.mean(per)), "You averaged the layers' losses: add them, as each "
                                                       "layer's auxiliary loss is added to the model's loss."),
                                 (_scaled_pool(layer_logits, k), "The pooled loss times the number of layers is "
                                                                 "still pooled: one loss per layer, then add.")]
                expect_number(f"the loss of {L} layer(s), k={k}", _first(got), float(sum(per)), rtol=1e-9,
                              mistakes=mistakes)

        def make(T):
            return [bugs.routing_fixture(T, 6, 0, seed=1), bugs.routing_fixture(T, 6, None, seed=2)], 2
        no_token_loop(fixed_model_loss, "fixed_model_loss", make,
                      lambda out, v, k: expect_number("the loss", _first(out), bugs.model_balance_loss(v, k), rtol=1e-9),
                      hint=_LOOP_RULE, loops="a loop over tokens (a loop over the layers is fine)")
    return ("your check catches layers that cancel each other out when pooled; your model loss adds "
            "each layer's own balance loss.")
