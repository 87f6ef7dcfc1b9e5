"""Graders for lesson 05, *Overworked specialists*: the importance loss and its backward,
the smooth load estimator (with Φ) and its backward, and the Switch auxiliary loss.

The lesson works with *dense* (T, E) gate matrices, zeros for the experts a token is
not sent to; minimoe's ``losses.py`` stores the same numbers as (T, k) ``idx`` and
``gates``. Every backward is graded against finite differences of the forward, not
against a second hand-written backward.

References: :func:`minimoe.core.losses.cv_squared_forward`, :func:`minimoe.core.losses.normal_cdf`,
:func:`minimoe.core.losses.load_loss_forward` (whose ``load`` is the column sum of
:func:`smooth_load_ref`), :func:`minimoe.core.losses.switch_loss_forward`.
"""
from __future__ import annotations

import numpy as np

from ...core import losses
from .compare import expect_array, expect_grads, expect_number, numeric_grads
from .grading import Blank, Fail, Lesson, call, no_token_loop
from .lesson03 import scores, topk_gate_ref, topk_mask

LESSON = Lesson("05", "Overworked specialists")
progress = LESSON.progress

_CASES = [(6, 4, 2), (1, 5, 1), (9, 6, 3), (5, 3, 1)]     # (T, E, k), always k < E
_LOOP = "Sums and means over the tokens are one call each (G.sum(axis=0), probs.mean(axis=0), ...)."


# --------------------------------------------------------------------------- references
def cv2_ref(v):
    """Squared coefficient of variation ``Var(v) / mean(v)²`` (population variance)."""
    return losses.cv_squared_forward(np.asarray(v, dtype=np.float64))[0]


def importance_loss_ref(G):
    """``CV(Importance)²`` with ``Importance_e = Σ_t G_te``; G is the dense (T, E) gate matrix."""
    return cv2_ref(np.asarray(G).sum(axis=0))


def importance_loss_backward_ref(G):
    """∂ importance_loss / ∂G, (T, E): every token's gate of expert e gets ∂CV²/∂Importance_e."""
    imp = np.asarray(G, dtype=np.float64).sum(axis=0)
    dimp, _ = losses.cv_squared_backward(1.0, losses.cv_squared_forward(imp)[1])
    return np.broadcast_to(dimp, np.shape(G)).copy()


def threshold_ref(H, k):
    """``kth_excluding(H_t, k, e)`` (T, E) and which expert's noisy score it is (T, E) int.

    For an expert in the top k it is the (k+1)-th largest score of the row; for the
    others, the k-th largest (Shazeer et al. 2017, appendix A, eq. 9). Needs k < E.
    """
    T, E = H.shape
    ranked = np.argsort(-H, axis=1, kind="stable")
    rows = np.arange(T)[:, None]
    in_top = topk_mask(H, k)
    who = np.where(in_top, ranked[:, [k]], ranked[:, [k - 1]])
    return H[rows, who], who


def smooth_load_ref(L, H, sigma, k):
    """``P(t,e) = Φ((L_te − kth_excluding(H_t, k, e)) / σ_te)``, (T, E)."""
    thr, _ = threshold_ref(H, k)
    return losses.normal_cdf((L - thr) / sigma)


def switch_loss_ref(probs, first_choice):
    """``(E · Σ_e f_e P_e, ∂/∂probs)`` from minimoe's pair."""
    loss, cache = losses.switch_loss_forward(probs, first_choice)
    return loss, losses.switch_loss_backward(1.0, cache)[0]


def _every_choice(probs, k):
    """f counted over each token's k best experts (Mixtral's count), for the hint."""
    T, E = probs.shape
    return np.bincount(np.argsort(-probs, axis=1, kind="stable")[:, :k].reshape(-1), minlength=E) / T


def _assigned(dthr, who):
    """The buffered ``dH[rows, who] += dthr`` (repeated indices keep one write): the typical slip."""
    dH = np.zeros_like(dthr)
    dH[np.broadcast_to(np.arange(dthr.shape[0])[:, None], who.shape), who] += dthr
    return dH


def _scatter(dthr, who):
    """Add each (t, e)'s threshold gradient (T, E) into H at the threshold expert ``who``."""
    dH = np.zeros_like(dthr)
    np.add.at(dH, (np.broadcast_to(np.arange(dthr.shape[0])[:, None], who.shape), who), dthr)
    return dH


# --------------------------------------------------------------------------- inputs
def gates_for(seed, T, E, k):
    """A dense top-k gate matrix (T, E) for well-separated random scores."""
    return topk_gate_ref(scores(seed, T, E), k)


def load_inputs(seed, T, E):
    """Clean scores L, noisy scores H (ranks ≥ 0.2 apart, so no nudge crosses a tie) and σ > 0."""
    rng = np.random.default_rng(seed)
    H = scores(seed, T, E)
    sigma = rng.uniform(0.4, 1.5, (T, E))
    L = H - sigma * rng.standard_normal((T, E))        # H = L + ε σ
    return L, H, sigma


# --------------------------------------------------------------------------- graders
@LESSON.exercise("importance_loss", forbid=[importance_loss_ref, cv2_ref, losses.cv_squared_forward,
                                           losses.importance_loss_forward])
def importance_loss(fn):
    for seed, (T, E, k) in enumerate(_CASES):
        G = gates_for(500 + seed, T, E, k)
        got = call(fn, G, name="importance_loss")
        imp = G.sum(axis=0)
        m = imp.mean()
        expect_number("importance_loss(G)", got, importance_loss_ref(G), rtol=1e-8, atol=1e-12, mistakes=[
            (np.std(imp) / m, "That is CV, the coefficient of variation. The loss is its *square*, "
                              "Var/mean²: smooth at perfect balance, where CV itself has a kink."),
            (np.var(imp, ddof=1) / m**2, "Use the population variance (np.var's default, ddof=0): "
                                         "the E experts are the whole population, not a sample."),
            (np.var(imp) / m, "Divide the variance by the *square* of the mean, so the loss doesn't "
                              "depend on how many tokens there are."),
            (cv2_ref((G > 0).sum(axis=0)), "You counted the patients each specialist gets — that is the "
                                           "*load*. Importance adds up the gate *weights*: Σ_t G_te."),
            (cv2_ref(G.sum(axis=1)) if T > 1 else np.nan,
             "You summed each token's gates (axis=1) — every row of G sums to 1, so that measures "
             "nothing. Sum over the tokens, axis=0, to get one importance per expert."),
        ])
    balanced = np.full((4, 4), 0.25)
    got = call(fn, balanced, name="importance_loss")
    expect_number("importance_loss at perfect balance", got, 0.0, atol=1e-12)
    no_token_loop(fn, "importance_loss", lambda T: (gates_for(T, T, 6, 2),),
                  lambda out, G: expect_number("importance_loss(G)", out, importance_loss_ref(G), rtol=1e-8),
                  hint=_LOOP)
    return ("CV(Σ_t G_t)² is right on 4 gate matrices (k = 1 to 3) and exactly 0 at perfect balance, "
            "with no loop over tokens.")


@LESSON.exercise("importance_loss_backward", forbid=[importance_loss_backward_ref, losses.cv_squared_backward,
                                                    losses.importance_loss_backward])
def importance_loss_backward(fn):
    worst = 0.0
    for seed, (T, E, k) in enumerate(_CASES):
        G = gates_for(510 + seed, T, E, k)
        got = call(fn, G, name="importance_loss_backward")
        arr = None if got is None else np.asarray(got)
        if arr is not None and arr.shape == (E,) and (T, E) != (E,):
            raise Fail(f"dG has shape {arr.shape}: that is ∂loss/∂Importance, one number per expert. "
                       f"Each gate G_te adds to Importance_e with weight 1, so dG_te is that number "
                       f"for *every* token t: broadcast it to G's shape {G.shape} = (T, E).")
        GG = G.copy()
        num = numeric_grads(lambda: importance_loss_ref(GG), {"G": GG}, 1.0)
        imp = G.sum(axis=0)
        m, u = imp.mean(), imp / imp.mean()
        row = lambda v: np.broadcast_to(v, G.shape)      # noqa: E731
        worst = max(worst, expect_grads({"G": got}, num, mistakes={"G": [
            (row(2 * (imp - m) / (E * m**2)),
             "You treated the mean as a constant. m = mean(Importance) moves when any Importance_e "
             "does, so ∂CV²/∂Importance_e = 2/(E m) · (u_e − mean(u²)) with u = Importance/m."),
            (row((u - np.mean(u**2)) / (E * m)), "Off by a factor of 2: d(u²) = 2u du."),
            (row(2 / (E * m) * (u - np.mean(u**2))) / T,
             "Don't divide by T: Importance is a sum over tokens, so each gate counts with weight 1."),
        ]}))
    no_token_loop(fn, "importance_loss_backward", lambda T: (gates_for(T, T, 6, 2),),
                  lambda out, G: expect_array("dG", out, importance_loss_backward_ref(G), rtol=1e-8),
                  hint=_LOOP + " Broadcast the (E,) gradient with np.broadcast_to or np.tile.")
    return (f"dG = ∂CV²/∂Importance, broadcast over tokens, passes the gradient check on 4 cases "
            f"(worst relative error {worst:.1e}), with no loop over tokens.")


@LESSON.exercise("smooth_load", forbid=[smooth_load_ref, threshold_ref, losses.load_loss_forward])
def smooth_load(fn):
    for seed, (T, E, k) in enumerate(_CASES):
        L, H, sigma = load_inputs(520 + seed, T, E)
        got = call(fn, L, H, sigma, k, name="smooth_load")
        want = smooth_load_ref(L, H, sigma, k)
        s = -np.sort(-H, axis=1)
        kth = s[:, [k - 1]]                                  # the k-th largest, the expert itself included
        thr, _ = threshold_ref(H, k)
        Phi = losses.normal_cdf
        expect_array("P", got, want, shape_desc="(T, E)", rtol=1e-7, atol=1e-10, mistakes=[
            (Phi((L - kth) / sigma),
             "For an expert *in* the top k, the k-th largest score may be its own. The question is "
             "whether e would still beat the k-th best of the *other* experts: for the top-k experts "
             "that is the (k+1)-th largest score of the row."),
            (Phi((H - thr) / sigma),
             "Use the clean score L in the numerator: P asks how likely e is to make the top k if "
             "only its own noise were drawn again, L_te + ε σ_te against the others' noisy scores."),
            (Phi(L - thr), "Divide by σ: (L − threshold)/σ is how many noise widths e is from the threshold."),
            (losses.normal_pdf((L - thr) / sigma), "That is the density φ. The probability of beating the "
                                                   "threshold is the CDF Φ: use losses.normal_cdf."),
            (1 - Phi((L - thr) / sigma), "Upside down: P(L + εσ > threshold) = Φ((L − threshold)/σ), large "
                                         "when L is well above the threshold."),
            (Phi((L - s[:, [k]]) / sigma) if k < E else np.full((T, E), np.nan),
             "The threshold is the (k+1)-th largest only for experts in the top k; for the others it "
             "is the k-th largest (the last expert who got in)."),
        ])
    no_token_loop(fn, "smooth_load", lambda T: (*load_inputs(T, T, 6), 2),
                  lambda out, L, H, sigma, k: expect_array("P", out, smooth_load_ref(L, H, sigma, k), rtol=1e-7,
                                                           atol=1e-10),
                  hint="Rank every row at once (np.argsort(-H, axis=1)) and pick each (t, e)'s threshold with "
                       "np.where and np.take_along_axis.")
    return ("P(t,e) = Φ((L − kth_excluding(H, k, e))/σ) is right on 4 cases, k = 1 to 3 — its column "
            "sums are the smooth load — with no loop over tokens.")


@LESSON.exercise("smooth_load_backward", forbid=[losses.load_loss_backward, smooth_load_ref])
def smooth_load_backward(fn):
    worst = 0.0
    for seed, (T, E, k) in enumerate(_CASES):
        L, H, sigma = load_inputs(530 + seed, T, E)
        dP = np.random.default_rng(540 + seed).standard_normal((T, E))
        out = call(fn, dP, L, H, sigma, k, name="smooth_load_backward")
        if not isinstance(out, tuple) or len(out) != 3:
            raise Fail("smooth_load_backward should return three arrays (dL, dH, dsigma), "
                       "each of shape (T, E).")
        dL, dH, dsig = out
        arrays = {"L": L.copy(), "H": H.copy(), "sigma": sigma.copy()}
        num = numeric_grads(lambda: smooth_load_ref(arrays["L"], arrays["H"], arrays["sigma"], k), arrays, dP)
        thr, who = threshold_ref(H, k)
        z = (L - thr) / sigma
        dz = dP * losses.normal_pdf(z)
        dz_cdf = dP * losses.normal_cdf(z)                  # the typical slip: Φ in place of φ
        phi_hint = "Φ' is the density φ = losses.normal_pdf, not Φ itself."
        worst = max(worst, expect_grads({"L": dL, "H": dH, "sigma": dsig}, num, names=["L", "H", "sigma"],
                                        mistakes={
            "H": [(np.zeros_like(H), "The threshold is another expert's *noisy* score, so H gets a "
                                     "gradient: −dz/σ, added at the threshold expert of each (t, e) "
                                     "(several e can share one threshold expert — add them all up)."),
                  (-dz / sigma, "The threshold of (t, e) is the score of *another* expert: add −dz/σ "
                                "to H at that expert's column, not at e's own."),
                  (_scatter(-dz_cdf / sigma, who), phi_hint),
                  (_assigned(-dz / sigma, who),
                   "Several (t, e) share one threshold expert, and `dH[rows, who] -= ...` (or `+=`) "
                   "with repeated indices keeps only one of their contributions: NumPy's fancy-index "
                   "update is buffered. Use np.add.at(dH, (rows, who), -dz / σ), as the lesson warns.")],
            "L": [(dz_cdf / sigma, phi_hint),
                  (dz, "Chain rule through the division: z = (L − thr)/σ, so dL = dz/σ.")],
            "sigma": [(dz * z / sigma, "Wrong sign: z = (L − thr)/σ decreases as σ grows, dσ = −dz · z/σ."),
                      (-dz / sigma**2, "dσ = −dz · (L − thr)/σ² = −dz · z/σ: you dropped (L − thr)."),
                      (-dz_cdf * z / sigma, phi_hint)],
        }))
    def make(T):
        L, H, sigma = load_inputs(T, T, 6)
        return np.random.default_rng(T).standard_normal((T, 6)), L, H, sigma, 2

    def check(out, dP, L, H, sigma, k):
        if not isinstance(out, tuple) or len(out) != 3:
            raise Fail("smooth_load_backward should return three arrays (dL, dH, dsigma).")
        thr, who = threshold_ref(H, k)
        z = (L - thr) / sigma
        dz = dP * losses.normal_pdf(z)
        expect_array("dL", out[0], dz / sigma, rtol=1e-7, atol=1e-10)
        expect_array("dH", out[1], _scatter(-dz / sigma, who), rtol=1e-7, atol=1e-10)
        expect_array("dsigma", out[2], -dz * z / sigma, rtol=1e-7, atol=1e-10)
    no_token_loop(fn, "smooth_load_backward", make, check,
                  hint="np.add.at scatters every (t, e)'s threshold gradient in one call.")
    return (f"dL, dH (through the threshold) and dσ pass the gradient check on 4 cases, k = 1 to 3 "
            f"(worst relative error {worst:.1e}), with no loop over tokens.")


@LESSON.exercise("switch_loss", forbid=[switch_loss_ref, losses.switch_loss_forward,
                                       losses.switch_loss_backward])
def switch_loss(fn):
    worst = 0.0
    # (5, 5) first: T = E is where P averaged over the wrong axis still has E entries, so it can be named
    for seed, T, E in [(553, 5, 5), (550, 8, 4), (551, 1, 3), (552, 12, 6), (554, 7, 4)]:
        probs = np.exp(scores(seed, T, E))
        if (T, E) == (7, 4):               # an idle last expert: nobody's first choice
            probs[:, -1] *= 1e-3
        probs /= probs.sum(axis=1, keepdims=True)
        first = np.argmax(probs, axis=1)
        try:
            out = call(fn, probs, first, name="switch_loss")
        except Blank:
            raise
        except Fail as e:
            if first.max() < E - 1 and "raised" in str(e):
                raise Fail(f"{e}. In this case no patient's first choice is the last expert, so "
                           f"np.bincount(first_choice) has fewer than E = {E} entries: pass "
                           f"minlength=E.") from None
            raise
        if first.max() < E - 1 and isinstance(out, tuple) and len(out) == 2 \
                and np.shape(out[1]) != probs.shape and np.shape(out[1])[-1:] == (first.max() + 1,):
            raise Fail(f"with no patient sent first to the last expert, your dprobs has "
                       f"{np.shape(out[1])[-1]} columns instead of E = {E}: np.bincount needs "
                       f"minlength=E, so an idle expert still gets f_e = 0.")
        if not isinstance(out, tuple) or len(out) != 2:
            raise Fail("switch_loss should return a pair (loss, dprobs)")
        loss, dprobs = out
        want, dwant = switch_loss_ref(probs, first)
        f = np.bincount(first, minlength=E) / T
        P = probs.mean(axis=0)
        expect_number("loss", loss, want, rtol=1e-8, mistakes=[
            (np.dot(f, P), "Multiply by E: at perfect balance f = P = 1/E, so Σ f P = 1/E, and the "
                           "factor E makes the loss exactly 1 whatever the number of experts."),
            (E * np.dot(f, probs.sum(axis=0)),
             "Your loss is T times too large: f_e is the *fraction* of the tokens whose first choice is "
             "e (the count divided by T) and P_e the *mean* router probability over tokens (not the "
             "sum) — one of the two is a total instead of an average."),
            (E * np.dot(P, P), "f_e is the fraction of tokens whose *first choice* is e (a count), not the "
                               "mean probability: use np.bincount(first_choice, minlength=E) / T."),
            (E * np.dot(_every_choice(probs, 2), P),
             "You counted every choice of each token's top 2 (Mixtral's convention, next section): f sums to k "
             "and the loss is k at balance. This exercise is GShard's, first choices only: "
             "np.bincount(first_choice, minlength=E) / T."),
            (E * np.dot(_every_choice(probs, 2), P) / 2,
             "You counted every choice of each token's top 2 over k (Megatron-core's convention, next "
             "section). This exercise is GShard's, first choices only: np.bincount(first_choice, minlength=E) / T."),
            (E * np.dot(f, probs.mean(axis=1)) if T == E else np.nan,
             "P_e is the mean over the tokens (axis=0) of the router's probability for expert e. "
             "probs.mean(axis=1) averages each token's row instead — always 1/E, since a row sums to 1 — "
             "so your loss is 1 whatever the routing."),
        ])
        d = np.asarray(dprobs, dtype=float) if dprobs is not None else None
        if d is not None and d.shape == (E,) and (T, E) != (E,):
            raise Fail(f"dprobs has shape {d.shape}; it needs one row per token, {probs.shape} = (T, E) "
                       f"(every row is the same: E f_e / T).")
        pp = probs.copy()
        num = numeric_grads(lambda: switch_loss_ref(pp, first)[0], {"probs": pp}, 1.0)
        row = lambda v: np.broadcast_to(v, probs.shape)     # noqa: E731
        worst = max(worst, expect_grads({"probs": dprobs}, num, mistakes={"probs": [
            (row(E * f), "P is a mean over the T tokens: ∂P_e/∂probs_te = 1/T, so dprobs = E f_e / T."),
            (row(E * (f + P) / T), "f counts first choices: it is a step function of the scores and "
                                   "carries no gradient. Only P does: dprobs = E f_e / T."),
            (row(E * P / T), "You differentiated with respect to f instead of P: the gradient of "
                             "E Σ f_e P_e with respect to probs_te is E f_e / T."),
        ]}))
    def make(T):
        probs = np.exp(scores(560 + T, T, 6))
        probs /= probs.sum(axis=1, keepdims=True)
        return probs, np.argmax(probs, axis=1)

    def check(out, probs, first):
        if not isinstance(out, tuple) or len(out) != 2:
            raise Fail("switch_loss should return a pair (loss, dprobs)")
        want, dwant = switch_loss_ref(probs, first)
        expect_number("loss", out[0], want, rtol=1e-8)
        expect_array("dprobs", out[1], dwant, rtol=1e-8)
    no_token_loop(fn, "switch_loss", make, check,
                  hint="np.bincount(first_choice, minlength=E) counts every token's first choice at once.")
    return (f"loss = E · Σ f·P and dprobs = E f / T (f carries no gradient) are right on 5 cases, "
            f"one with an idle last expert "
            f"(worst relative error {worst:.1e}), with no loop over tokens.")
