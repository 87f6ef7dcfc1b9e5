"""The bug hunt: seven MoE bugs that autograd hid, and the check that catches each one.

**Everything named ``bugN_...`` or ``NoisyEvalMoE`` below is deliberately buggy teaching code.**
Do not use it. Each function reproduces, in a few lines of NumPy written for this
file, a pattern seen in widely used public MoE code (described, not copied). Each
mirrors minimoe's own API, so the correct version can be swapped in and the same
check run on both. Lesson 10 tells the stories; tests/course/test_bugs.py shows that each
check fails on the bug and passes on minimoe.

Lesson 10 prints the buggy functions' source with ``show()`` *before* the learner writes
the fix, so their docstrings describe the symptom and where the bug is, never the fix:
the fixes are the table's middle column, and :data:`FIXES` says each in a sentence.

| # | the bug | minimoe's version | the check that catches it |
|---|---|---|---|
| 1 | Φ compares logits with softmax *probabilities* | ``losses.load_loss_*`` | :func:`load_matches_sampling`, :func:`balances_real_load` |
| 2 | Switch loss from detached floats | ``losses.switch_loss_*`` | :func:`gradient_matches_finite_differences` |
| 3 | top-1 gate renormalized to 1, no aux loss | ``MoELayer(gate="switch")`` | :func:`router_gradient_is_nonzero` |
| 4 | router noise left on in eval | ``router.router_logits_forward`` | :func:`eval_is_deterministic` |
| 5 | top-k renormalized by a detached sum | ``router.renormalize_*`` | :func:`gates_sum_has_zero_gradient`, gradient check |
| 6 | a Mixtral balance loss that is the same number for any routing | :func:`mixtral_layer_loss` (``MoELayer(balance="switch", switch_fraction="all")``) | :func:`balance_loss_reacts` |
| 7 | all layers' router logits pooled into one balance loss | :func:`model_balance_loss` (each layer's own loss, summed) | :func:`layers_are_balanced_apart` |

Bugs 6 and 7 are the two of Hugging Face transformers' Mixtral ``load_balancing_loss_func``
that users reported in December 2023: issue #28093 ("the balancing loss function always
return[s] a constant"), and issue #28255 with its pull request #28256, where the loss was also
noted to pool every layer's logits into one loss, so that one layer's imbalance can cancel
another's (Switch Transformer: "for each Switch layer, this auxiliary loss is added").

Every check returns a :class:`Finding`, which is truthy exactly when the check passes,
so ``assert check(...)`` works and ``print(check(...))`` explains the verdict.
Shapes: T tokens, d width, E experts, k experts per token.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from ..core.gradcheck import GradCheckError, as_pair, check_pair
from ..core.layers import SoftmaxCache, softmax, softmax_backward
from ..core.losses import cv_squared_backward, cv_squared_forward, normal_cdf, normal_pdf, switch_loss_forward
from ..core.moe import MoELayer
from ..core.router import router_logits_backward, router_logits_forward, topk_indices
from ..validate import check_array, check_int, check_rng

__all__ = [
    "Finding", "BUGS", "FIXES",
    "bug1_load_loss_forward", "bug1_load_loss_backward",
    "bug2_switch_loss_forward", "bug2_switch_loss_backward", "bug3_dead_router_layer",
    "bug4_router_logits_forward", "bug4_router_logits_backward", "NoisyEvalMoE",
    "bug5_renormalize_forward", "bug5_renormalize_backward",
    "load_matches_sampling", "BalanceRun", "train_router_on_load_loss", "balances_real_load",
    "gradient_matches_finite_differences", "router_gradient_is_nonzero", "eval_is_deterministic",
    "gates_sum_has_zero_gradient",
    "mixtral_layer_loss", "bug6_mixtral_loss", "balance_loss_reacts", "routing_fixture",
    "model_balance_loss", "bug7_model_balance_loss", "layers_are_balanced_apart",
]

BUGS = {
    1: "mixed units in the smooth load estimator",
    2: "a balancing loss with no gradient",
    3: "the dead router at k=1",
    4: "noise left on at evaluation",
    5: "renormalizing with a constant",
    6: "a balancing loss that is constant",
    7: "all layers pooled into one balancing loss",
}

# The fixes, kept out of the buggy functions' docstrings (which lesson 10 shows before its exercises).
FIXES = {
    1: "read the thresholds off the noisy scores H, the units of L (losses.load_loss_forward)",
    2: "keep P_e in the computation: d loss / d probs[t, e] = E · f_e / T (losses.switch_loss_backward)",
    3: "gate='switch' (keep p_e, as the Switch Transformer does) or a loss that reaches the router, "
       "balance='switch' or 'load' ('importance' stops at the gate too)",
    4: "add the noise only when train is True (router.router_logits_forward)",
    5: "the whole quotient rule: dp_j = (dg_j − ⟨dg, g⟩) / s at the chosen experts (router.renormalize_backward)",
    6: "P_e = mean over tokens of the full softmax over all E experts (mixtral_layer_loss)",
    7: "compute each layer's loss on its own tokens and add the layers' losses (model_balance_loss)",
}


@dataclass(frozen=True)
class Finding:
    """The verdict of a check: ``bool(finding)`` is ``passed``; ``str`` says why."""
    passed: bool
    message: str

    def __bool__(self):
        return self.passed

    def __str__(self):
        return ("PASS: " if self.passed else "FAIL: ") + self.message


_rows = lambda T: np.arange(T)[:, None]  # noqa: E731


# =========================================================================== bug 1
class Bug1Cache(NamedTuple):
    ranked: np.ndarray   # (T, k+1) experts by noisy score, best first
    in_topk: np.ndarray  # (T,E) bool
    probs: np.ndarray    # (T,E) softmax(H): where the bug reads its thresholds
    z: np.ndarray        # (T,E)
    sigma: np.ndarray    # (T,E)
    load: np.ndarray     # (E,) the (wrong) smooth load
    cv: tuple
    k: int


def bug1_load_loss_forward(clean, noisy, sigma, k):
    """BUGGY smooth load loss: the thresholds are in the wrong units.

    *The GP's referral letters are weighed in the wrong units.* To estimate how
    likely each specialist is to be on a patient's short list, the clinic compares
    the specialist's score (a logit, any real number) with the bar set by the
    others — but reads that bar off the *probability* chart (a number in [0, 1]):

        P(t,e) = Φ((L_te − kth_excluding(softmax(H_t), k, e)) / σ_te)     ← mixed units

    Same arguments and return as ``losses.load_loss_forward``; its backward
    (:func:`bug1_load_loss_backward`) is the *correct* derivative of this wrong
    forward, so a gradient check passes. The loss runs, decreases, even reaches 0,
    while the real load stays unbalanced: it balances the wrong thing. Needs k < E.
    """
    check_array("clean", clean, ndim=2)
    check_array("noisy", noisy, shape=clean.shape)
    check_array("sigma", sigma, shape=clean.shape)
    T, E = clean.shape
    k = check_int("k", k, low=1, high=E - 1)
    ranked = topk_indices(noisy, k + 1)
    in_topk = np.zeros((T, E), dtype=bool)
    in_topk[_rows(T), ranked[:, :k]] = True
    p = softmax(noisy)
    t = np.arange(T)
    thr = np.where(in_topk, p[t, ranked[:, k]][:, None], p[t, ranked[:, k - 1]][:, None])  # the bug
    z = (clean - thr) / sigma
    load = normal_cdf(z).sum(axis=0)
    loss, cv = cv_squared_forward(load)
    return loss, Bug1Cache(ranked, in_topk, p, z, sigma, load, cv, k)


def bug1_load_loss_backward(dloss, cache):
    """Exact backward of :func:`bug1_load_loss_forward` (the threshold flows back through
    the softmax). Returns ``d_clean, d_noisy, d_sigma`` (all (T,E)) and ``{}``, as minimoe's."""
    ranked, in_topk, p, z, sigma, _, cv, k = cache
    t = np.arange(z.shape[0])
    dload, _ = cv_squared_backward(dloss, cv)
    d_clean = dload[None, :] * normal_pdf(z) / sigma
    dthr = np.zeros_like(d_clean)
    dthr[t, ranked[:, k]] -= np.sum(np.where(in_topk, d_clean, 0), axis=1)
    dthr[t, ranked[:, k - 1]] -= np.sum(np.where(in_topk, 0, d_clean), axis=1)
    d_noisy = softmax_backward(dthr, SoftmaxCache(p, -1))[0]
    return d_clean, d_noisy, -d_clean * z, {}


def load_matches_sampling(load_forward, clean, noisy, sigma, k, rng, n_samples=4000, n_se=5.0):
    """Check: does the smooth load estimate what it claims to (Shazeer et al. 2017, eq. 8–10)?

    ``P(t,e)`` claims to be the probability that e lands in token t's top k if e's own
    noise is drawn again while the others' noisy scores stay put. We *simulate* that:
    redraw ``H'_te = L_te + ε σ_te`` n_samples times and count how often fewer than k
    other experts beat it. ``load_forward(clean, noisy, sigma, k)`` must return
    ``(loss, cache)`` with ``cache.load`` (E,); it passes when every entry is within
    ``n_se`` standard errors (+0.01) of the simulated load.
    """
    rng = check_rng("rng", rng)  # an int seed becomes a Generator (SPEC 7: validate.check_rng)
    _, cache = load_forward(clean, noisy, sigma, k)
    eps = rng.standard_normal((n_samples,) + clean.shape)
    redrawn = clean + eps * sigma                                       # (S,T,E)
    beaten_by = noisy[None, :, None, :] > redrawn[..., None]            # (S,T,E,E'): e' beats e?
    others = beaten_by.sum(-1) - beaten_by[..., np.arange(clean.shape[1]), np.arange(clean.shape[1])]
    P_mc = np.mean(others < k, axis=0)                                  # (T,E)
    load_mc = P_mc.sum(axis=0)
    se = np.sqrt(np.sum(P_mc * (1 - P_mc), axis=0) / n_samples)
    gap = np.abs(np.asarray(cache.load) - load_mc)
    ok = bool(np.all(gap <= n_se * se + 0.01))
    return Finding(ok, f"smooth load {np.round(cache.load, 2)} vs sampled {np.round(load_mc, 2)} "
                       f"(largest gap {gap.max():.3f}, {n_se:g} standard errors = {n_se * se.max():.3f})")


class BalanceRun(NamedTuple):
    load_before: np.ndarray   # (E,) tokens per expert (eval routing, clean top-k) before training
    load_after: np.ndarray    # (E,) the same after training
    loss: np.ndarray          # (steps,) the balancing loss each step
    real_cv2: np.ndarray      # (steps,) CV² of the real (eval) load after each step


def train_router_on_load_loss(load_forward, load_backward, *, k=1, steps=300, lr=0.5,
                              T=512, d=8, E=4, seed=0):
    """Train a collapsing noisy router on a load loss alone and watch the *real* load.

    The clinic starts collapsed: feature 0 of every token is 1 (a bias) and
    ``W_gate[0, 0]`` is raised by 2, so most patients are referred to expert 0.
    Plain gradient descent on ``load_forward``'s loss moves W_gate and W_noise; the
    real load is counted from the clean top-k (what eval would do). ``load_forward``
    and ``load_backward`` have the signatures of ``losses.load_loss_forward/backward``.
    """
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, d))
    x[:, 0] = 1.0
    W_gate = rng.standard_normal((d, E)) * 0.3
    W_gate[0, 0] += 2.0
    W_noise = np.zeros((d, E))
    real = lambda: np.bincount(topk_indices(x @ W_gate, k).ravel(), minlength=E)  # noqa: E731
    before, losses, cv2 = real(), [], []
    for _ in range(steps):
        H, lc = router_logits_forward(x, W_gate, W_noise, rng=rng, train=True)
        loss, cache = load_forward(lc.clean, H, lc.sigma, k)
        d_clean, d_noisy, d_sigma, _ = load_backward(1.0, cache)
        _, grads = router_logits_backward(d_noisy, lc, d_clean=d_clean, d_sigma=d_sigma)
        W_gate -= lr * grads["W_gate"]
        W_noise -= lr * grads["W_noise"]
        losses.append(loss)
        cv2.append(cv_squared_forward(real().astype(np.float64))[0])
    return BalanceRun(before, real(), np.array(losses), np.array(cv2))


def balances_real_load(load_forward, load_backward, *, cv2_max=0.03, **train_kwargs):
    """Check: after :func:`train_router_on_load_loss`, is the real load balanced (CV² ≤ cv2_max)?"""
    run = train_router_on_load_loss(load_forward, load_backward, **train_kwargs)
    cv2 = float(run.real_cv2[-1])
    return Finding(cv2 <= cv2_max, f"real load {run.load_before} -> {run.load_after} (CV² {cv2:.3f}, "
                                   f"limit {cv2_max:g}) while the loss went {run.loss[0]:.3g} -> {run.loss[-1]:.3g}")


# =========================================================================== bug 2
class Bug2Cache(NamedTuple):
    f: np.ndarray      # (E,) fraction of first choices (the backward could have used it...)
    shape: tuple       # (T, E)
    dtype: np.dtype


def bug2_switch_loss_forward(probs, first_choice):
    """BUGGY Switch loss ``E · Σ_e f_e P_e``: P was turned into plain floats.

    *The clinic manager writes each specialist's workload in the log book, but the
    GP never reads it.* ``P_e`` is copied out as Python floats (in a framework: read
    with ``.item()``/``.detach()``/``.numpy()``), so the value is right and shows up
    in the training logs, but autograd sees a constant: the backward is zero and the
    loss never moves the router. Same API as ``losses.switch_loss_forward``.
    """
    check_array("probs", probs, ndim=2)
    T, E = probs.shape
    f = np.bincount(np.asarray(first_choice).reshape(-1), minlength=E) / T
    P = [float(v) for v in probs.mean(axis=0)]           # the bug: detached from the graph
    return float(E * sum(fe * pe for fe, pe in zip(f, P))), Bug2Cache(f, probs.shape, probs.dtype)


def bug2_switch_loss_backward(dloss, cache):
    """What autograd computes for a constant: zero. Returns ``(dprobs (T,E) = 0, {})``."""
    return np.zeros(cache.shape, dtype=cache.dtype), {}


# =========================================================================== bug 3
def bug3_dead_router_layer(d_model, d_hidden, n_experts, rng=None, dtype=np.float64):
    """BUGGY configuration: top-1 routing, the gate renormalized to 1, no auxiliary loss.

    *Each patient sees exactly one specialist and the GP's letter always says "100 %":
    whatever the outcome, the letter was right, so the GP never learns.* With k = 1
    the renormalized gate ``p_e / p_e`` is exactly 1, the task gradient into the router
    is exactly 0 (``router.topk_gate_backward``), and with no balancing loss nothing
    else reaches ``W_gate`` or ``W_noise``. (The fixes: :data:`FIXES` [3].)
    """
    return MoELayer(d_model, d_hidden, n_experts, k=1, gate="topk", noisy=True, balance=None,
                    dtype=dtype, rng=rng)


def router_gradient_is_nonzero(layer, x, *, rng=None, names=("W_gate", "W_noise"), tol=1e-12):
    """Check: after one training forward/backward with a random ``dy``, is each router
    parameter's gradient (those in ``names`` that the layer has) non-zero (norm > tol)?"""
    rng = np.random.default_rng(0) if rng is None else check_rng("rng", rng)
    y = layer.forward(x, train=True)
    layer.backward(rng.standard_normal(np.shape(y)))
    norms = {n: float(np.linalg.norm(layer.grads[n])) for n in names if n in layer.params}
    if not norms:
        return Finding(False, f"the layer has none of the router parameters {list(names)}")
    dead = [n for n, v in norms.items() if not v > tol]
    text = ", ".join(f"|d{n}| = {v:.3g}" for n, v in norms.items())
    return Finding(not dead, text + (f": {', '.join(dead)} never train" if dead else ""))


# =========================================================================== bug 4
def bug4_router_logits_forward(x, W_gate, W_noise=None, *, noise=None, rng=None, train=True):
    """BUGGY router scores: the noise is added whenever the router *has* noise weights.

    *The GP rolls a die before every referral, even on the day of the real exam.*
    The noise of noisy top-k is meant for exploration while training; here the
    ``train`` flag is accepted and ignored, so two evaluations of the same patient
    may go to different specialists. Same API as ``router.router_logits_forward``;
    the backward (:func:`bug4_router_logits_backward`) is minimoe's, unchanged.
    """
    return router_logits_forward(x, W_gate, W_noise, noise=noise, rng=rng, train=True)  # the bug


bug4_router_logits_backward = router_logits_backward


class NoisyEvalMoE(MoELayer):
    """BUGGY layer: an :class:`MoELayer` whose ``forward`` ignores ``train=False``
    (the router noise stays on in evaluation and generation)."""

    def forward(self, x, train=True, noise=None):
        return super().forward(x, train=True, noise=noise)    # the bug: train is dropped


def eval_is_deterministic(predict, n_calls=3):
    """Check: does ``predict()`` (no arguments, e.g. ``lambda: layer.forward(x, train=False)``)
    return exactly the same array every time? Re-seeding inside ``predict`` would hide the bug."""
    n = check_int("n_calls", n_calls, low=2)
    outs = [np.array(predict()) for _ in range(n)]
    diff = max(float(np.max(np.abs(o - outs[0]), initial=0.0)) for o in outs[1:])
    return Finding(diff == 0.0, f"largest difference between {n} identical eval calls: {diff:.3g}")


# =========================================================================== bug 5
def bug5_renormalize_forward(p, idx):
    """BUGGY renormalization: divide the top-k probabilities by a sum treated as constant.

    *The GP splits the referral between two specialists and rescales the shares to
    100 %, but forgets that raising one share lowers the other.* The value
    ``g_j = p_j / s``, ``s = Σ_j p_j`` is exactly minimoe's (``router.renormalize_forward``);
    only the backward (:func:`bug5_renormalize_backward`) misses the ``∂s/∂p`` term.
    """
    sel = p[_rows(p.shape[0]), idx]
    s = np.sum(sel, axis=1, keepdims=True)
    g = sel / s
    return g, (g, s, idx, p.shape)


def bug5_renormalize_backward(dg, cache):
    """What autograd computes when ``s`` is detached: ``dp_j = dg_j / s``, as if ``s``
    did not depend on ``p``. Returns ``(dp (T,E), {})``."""
    g, s, idx, shape = cache
    dp = np.zeros(shape, dtype=g.dtype)
    dp[_rows(shape[0]), idx] = dg / s                       # the bug
    return dp, {}


def gates_sum_has_zero_gradient(forward, backward, p, idx, atol=1e-10):
    """Check (a property test, no finite differences): each token's gates sum to exactly 1
    whatever ``p`` is, and a constant has zero gradient, so ``backward(ones)`` must be 0.
    ``forward(p, idx) -> (g, cache)``, ``backward(dg, cache) -> (dp, _)``."""
    g, cache = forward(p, idx)
    worst = float(np.max(np.abs(backward(np.ones_like(g), cache)[0]), initial=0.0))
    return Finding(worst <= atol, f"largest |∂(Σ_j g_j)/∂p| = {worst:.3g} (the sum is constant, so it must be 0)")


# =========================================================================== bugs 2 and 5
def gradient_matches_finite_differences(forward, backward, x, params=None, **check_kwargs):
    """Check a forward/backward pair with :func:`minimoe.core.gradcheck.check_pair` (same
    arguments); the Finding carries its report. A crossed kink still raises ``KinkError``:
    that is a problem of the fixture, not a verdict on the code.

    A backward with several inputs returns their gradients positionally (x's first), then
    the dict of parameter gradients, as minimoe's do: here every key of ``params`` is such an
    input, in the forward's order, and :func:`minimoe.core.gradcheck.as_pair` names them.
    """
    pair_backward = as_pair(backward, *(params or {}))
    try:
        reports = check_pair(forward, pair_backward, x, params, **check_kwargs)
    except GradCheckError as err:
        return Finding(False, str(err))
    worst = max(r.normwise for r in reports)
    return Finding(True, f"analytic and numerical gradients agree (worst normwise error {worst:.2e})")



# =========================================================================== bugs 6 and 7
def mixtral_layer_loss(logits, k):
    """Mixtral's Switch loss on one layer's router logits, as HF transformers'
    ``load_balancing_loss_func`` computes it for one layer since its fix: a value.

    ``E · Σ_e f_e P_e`` with ``f_e`` = (number of tokens that chose e among their top k) / T —
    f sums to k, so the loss is exactly **k** at perfect balance — and ``P_e`` = mean over
    tokens of ``softmax(logits_t)_e``. The same number as
    ``MoELayer(balance="switch", switch_fraction="all")``'s unweighted term (which has the
    hand-written backward); HF differentiates it with autograd.

    Args:
        logits: (T, E) router logits. k: experts per token, 1 ≤ k ≤ E.
    """
    check_array("logits", logits, ndim=2)
    k = check_int("k", k, low=1, high=np.shape(logits)[1])
    return switch_loss_forward(softmax(logits), topk_indices(logits, k))[0]


def bug6_mixtral_loss(logits, k):
    """BUGGY Mixtral balance loss (one layer): the report says the same thing every week.

    *Every week the clinic's report says the specialists are exactly as busy as each other —
    even the week all the patients went to one of them.* As in HF transformers' Mixtral code
    of issue #28093, the router weight of each token is read from the weights the top-k gate
    hands its k chosen experts, averaged per token::

        w = softmax(logits[t, idx_t])     (T, k)    the gate's shares among the chosen
        P = mean over tokens of mean_j w   ← the bug
        loss = E · Σ_e f_e · P

    Same arguments and return (a float) as :func:`mixtral_layer_loss`. Its value never
    changes, and neither a gradient check (zero matches zero) nor the training curve (a flat
    line looks like a converged loss) says anything is wrong.
    """
    check_array("logits", logits, ndim=2)
    T, E = logits.shape
    k = check_int("k", k, low=1, high=E)
    idx = topk_indices(logits, k)
    w = softmax(logits[_rows(T), idx])                    # (T, k): each row sums to 1
    f = np.bincount(idx.reshape(-1), minlength=E) / T     # (E,), sums to k
    P = w.mean(axis=-1).mean()                            # the bug: 1/k, whatever the logits
    return float(E * np.sum(f * P))


def routing_fixture(T, E, favourite=None, seed=0, margin=2.0):
    """Router logits (T, E) without near-ties: every token's favourite expert is ``favourite``
    (an int: a batch collapsed onto it) or, if None, token t's favourite is t mod E (a
    balanced batch); the other scores are distinct and ``margin`` below the favourite."""
    T, E = check_int("T", T, low=1), check_int("E", E, low=2)
    rng = np.random.default_rng(seed)
    ranks = np.argsort(rng.random((T, E)), axis=1).astype(float)      # distinct per row
    logits = 0.5 * ranks
    fav = np.arange(T) % E if favourite is None else np.full(T, check_int("favourite", favourite, low=0,
                                                                              high=E - 1))
    logits[np.arange(T), fav] = logits.max(axis=1) + margin
    return logits


def balance_loss_reacts(layer_loss, k, *, E=4, T=16, h=1e-5, tol=1e-9):
    """Check: is ``layer_loss(logits, k) -> float`` alive? (a) it is larger on a batch collapsed
    onto one expert than on a balanced one, and (b) its finite-difference gradient with
    respect to the collapsed batch's logits is not zero (a loss that only counts choices
    reacts, but gives the router nothing to learn from)."""
    balanced, collapsed = routing_fixture(T, E, None), routing_fixture(T, E, 0)
    lb, lc = float(layer_loss(balanced, k)), float(layer_loss(collapsed, k))
    x = collapsed.copy()
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):                     # finite differences: the loss has no backward here
        old = x[i]
        x[i] = old + h
        up = float(layer_loss(x, k))
        x[i] = old - h
        g[i] = (up - float(layer_loss(x, k))) / (2 * h)
        x[i] = old
    reacts, alive = lc > lb + tol, float(np.max(np.abs(g))) > tol
    text = (f"loss {lb:.4g} on a balanced batch, {lc:.4g} on a collapsed one; largest |d loss / d logit| "
            f"{float(np.max(np.abs(g))):.3g}")
    return Finding(reacts and alive, text + ("" if reacts else ": it does not see the collapse")
                   + ("" if alive else "; no gradient reaches the router"))


def model_balance_loss(layer_logits, k):
    """The model's balance loss: each layer's :func:`mixtral_layer_loss` on its own tokens,
    summed over the layers (``layer_logits``: a sequence of (T_l, E) arrays), as the Switch
    Transformer adds each layer's auxiliary loss and minimoe's LM adds each MoE layer's
    ``aux_loss``."""
    return float(sum(mixtral_layer_loss(logits, k) for logits in layer_logits))


def bug7_model_balance_loss(layer_logits, k):
    """BUGGY model balance loss: one audit for the whole group of clinics.

    *The group audits all its clinics' books at once. One clinic sends everyone to its
    cardiologist, the other everyone to its dermatologist: the group's books look
    perfectly balanced.* As HF transformers' Mixtral (issue #28255), the router logits of
    all L layers are concatenated along the token axis, (L·T, E), and fed to one loss::

        loss = mixtral_layer_loss(concatenate(layer_logits), k)   ← the bug

    Same arguments and return as :func:`model_balance_loss`. With one layer it is right.
    """
    return mixtral_layer_loss(np.concatenate([np.asarray(v) for v in layer_logits]), k)


def layers_are_balanced_apart(model_loss, k, *, E=4, T=16, rtol=1e-9):
    """Check: does ``model_loss(layer_logits, k)`` see each layer's balance? Two layers, each
    collapsed onto a *different* expert, must cost what the two layers cost one at a time:
    ``model_loss([A, B]) = model_loss([A]) + model_loss([B])``."""
    A, B = routing_fixture(T, E, 0, seed=1), routing_fixture(T, E, 1, seed=2)
    both, a, b = (float(model_loss(v, k)) for v in ([A, B], [A], [B]))
    ok = abs(both - (a + b)) <= rtol * abs(a + b)
    return Finding(ok, f"two layers collapsed onto different experts: {both:.4g} together, "
                       f"{a:.4g} + {b:.4g} = {a + b:.4g} one at a time"
                       + ("" if ok else ": one layer's imbalance cancels the other's"))
