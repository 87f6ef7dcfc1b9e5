"""Graders for lesson 00, *The clinic*: bias and variance, and what each clinic costs.

The reference answers live here too (``*_ref``): the lesson's own cells use them
after each exercise, so a learner who is stuck can still read on.
"""
from __future__ import annotations

import numpy as np

from .compare import expect_number
from .grading import Fail, Lesson, call, no_token_loop

LESSON = Lesson("00", "The clinic")
progress = LESSON.progress

CLINICS = ("second opinion", "generalist", "every specialist", "referral")
N_OPINIONS = 3      # the second-opinion clinic: 3 cardiologists, as in the demo (python -m minimoe)


# --------------------------------------------------------------------------- references
def bias_variance_ref(preds, truth):
    """``(bias², variance)`` of a predictor from ``preds (R, n)``: R independent trials at n patients.

    bias² = mean_x (mean_r preds − truth)²,  variance = mean_x var_r preds   (ddof = 0)
    """
    mean = preds.mean(axis=0)
    return float(np.mean((mean - truth) ** 2)), float(np.mean(preds.var(axis=0)))


def ffn_cost(d, h):
    """One doctor (an FFN d -> h -> d): ``(parameters, FLOPs per patient)``.

    Parameters: W1 (d,h), b1 (h), W2 (h,d), b2 (d). FLOPs: 2 per multiply-add, matmuls only.
    """
    return 2 * d * h + h + d, 4 * d * h


def clinic_costs_ref(d, h, E, k):
    """``{clinic: (parameters, FLOPs per patient)}`` for the four clinics of lesson 00."""
    P, F = ffn_cost(d, h)
    gp_params, gp_flops = d * E, 2 * d * E         # the GP: one matmul x W_gate, (d, E)
    return {
        "second opinion": (N_OPINIONS * P, N_OPINIONS * F),
        "generalist": (P, F),
        "every specialist": (E * P + gp_params, E * F + gp_flops),
        "referral": (E * P + gp_params, k * F + gp_flops),
    }


def split_params_ref(total, active, E, k):
    """From a sparse model's total and active parameter counts: ``(shared, per_expert)``.

    total = shared + E·per_expert and active = shared + k·per_expert.
    """
    per_expert = (total - active) / (E - k)
    return total - E * per_expert, per_expert


# --------------------------------------------------------------------------- graders
@LESSON.exercise("bias_variance", forbid=[bias_variance_ref])
def bias_variance(fn):
    for seed, (R, n) in enumerate([(50, 9), (2, 4), (400, 30)]):
        rng = np.random.default_rng(100 + seed)
        truth = rng.standard_normal(n)
        bias = rng.standard_normal(n)                        # a systematic error per patient
        preds = truth + bias + rng.standard_normal((R, n)) * rng.uniform(0.3, 2.0, n)
        out = call(fn, preds, truth, name="bias_variance")
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise Fail("bias_variance should return two numbers, (bias2, variance), "
                       f"got {type(out).__name__}")
        b2_want, var_want = bias_variance_ref(preds, truth)
        mean = preds.mean(axis=0)
        expect_number("bias2", out[0], b2_want, mistakes=[
            (np.mean(mean - truth), "You forgot to square: bias² = mean over patients of "
                                    "(average prediction − truth)²."),
            (np.mean((preds - truth) ** 2), "That is the whole mean squared error (bias² + variance). "
                                            "Bias² uses the *average* prediction over trials, "
                                            "preds.mean(axis=0), before comparing with the truth."),
            (np.mean(preds.mean(axis=1) ** 2), "Average over the trials (axis=0), not over patients."),
        ])
        expect_number("variance", out[1], var_want, mistakes=[
            (np.mean(preds.var(axis=1)), "You took the variance across patients (axis=1). "
                                         "We want, for each patient, the variance across the "
                                         "R repeated trials (axis=0), then the mean over patients."),
            (np.mean(preds.var(axis=0, ddof=1)), "You used the sample variance (ddof=1). Use the "
                                                 "plain mean of squared deviations (ddof=0), so that "
                                                 "bias² + variance equals the mean squared error exactly."),
            (np.mean(preds.std(axis=0)), "That is the standard deviation; the variance is its square."),
        ])
    def make(n):
        rng = np.random.default_rng(n)
        truth = rng.standard_normal(n)
        return truth + rng.standard_normal((20, n)), truth

    def check(out, preds, truth):
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise Fail("bias_variance should return two numbers, (bias2, variance)")
        b2, var = bias_variance_ref(preds, truth)
        expect_number("bias2", out[0], b2)
        expect_number("variance", out[1], var)
    no_token_loop(fn, "bias_variance", make, check, loops="a loop over patients",
                  hint="preds.mean(axis=0) and preds.var(axis=0) treat every patient at once.")
    return ("bias² and variance match on 3 fresh sets of trials (R = 2 to 400), "
            "and they add up to the mean squared error, with no loop over patients.")


@LESSON.exercise("clinic_costs", forbid=[clinic_costs_ref, ffn_cost])
def clinic_costs(fn):
    for d, h, E, k in [(16, 64, 8, 2), (5, 7, 3, 1), (512, 2048, 64, 2)]:
        got = call(fn, d, h, E, k, name="clinic_costs")
        want = clinic_costs_ref(d, h, E, k)
        if not isinstance(got, dict):
            raise Fail(f"clinic_costs should return a dict with the keys {list(CLINICS)}, "
                       f"got {type(got).__name__}")
        missing = [c for c in CLINICS if c not in got]
        if missing:
            raise Fail(f"the dict is missing {missing}; its keys should be exactly {list(CLINICS)}")
        P, F = ffn_cost(d, h)
        for clinic in CLINICS:
            entry = got[clinic]
            if not isinstance(entry, (tuple, list)) or len(entry) != 2:
                raise Fail(f"clinic_costs(...)[{clinic!r}] should be a pair (parameters, flops), got {entry!r}")
            wp, wf = want[clinic]
            n_ffn = {"second opinion": N_OPINIONS, "generalist": 1, "every specialist": E, "referral": E}[clinic]
            gp = clinic in ("every specialist", "referral")
            at = f" for the {clinic!r} clinic (d={d}, h={h}, E={E}, k={k})"
            expect_number("parameters" + at, entry[0], wp, atol=0.5, mistakes=[
                (n_ffn * 2 * d * h + gp * d * E, "Count the biases too: each doctor has b1 (h numbers) "
                                                "and b2 (d numbers) besides W1 and W2."),
                (n_ffn * P, "The GP has parameters too: the router's W_gate is a (d, E) matrix."),
                (k * P + d * E, "A clinic employs all E specialists, even if a patient sees only k: "
                                "parameters count every expert, used or not."),
            ] if gp else [(n_ffn * 2 * d * h, "Count the biases too: each doctor has b1 (h numbers) "
                                              "and b2 (d numbers) besides W1 and W2."),
                          (2 * P if clinic == "second opinion" else -1,
                           f"The second-opinion clinic has {N_OPINIONS} cardiologists (yours and two "
                           f"more, as in the demo), not 2.")])
            n_run = {"second opinion": N_OPINIONS, "generalist": 1, "every specialist": E, "referral": k}[clinic]
            expect_number("FLOPs" + at, entry[1], wf, atol=0.5, mistakes=[
                (n_run * 2 * d * h + gp * d * E, "Count 2 FLOPs per multiply-add (a multiply and an add): "
                                                 "x W1 costs 2·d·h FLOPs per patient, not d·h."),
                (n_run * F, "The GP's referral costs compute too: x W_gate is 2·d·E FLOPs per patient."),
                (E * F + 2 * d * E, "In the referral clinic a patient sees only k specialists, so only "
                                    "k experts' matmuls are computed."),
                (n_run * (F + 2 * h + 2 * d) + gp * 2 * d * E,
                 "Count matmuls only (the biases and the ReLU are a vanishing fraction): 4·d·h per doctor."),
                (n_run * F + 2 * d * E + 2 * n_run * d,
                 f"Leave out the GP's weighted sum of the {n_run} answers (2·{n_run}·d FLOPs): the exercise "
                 f"counts the matrix products only, x W1, a W2 and x W_gate. (MoELayer.flops_per_token counts "
                 f"it; the lesson compares the two below.)"),
            ] if clinic == "referral" or gp else [
                (n_run * 2 * d * h, "Count 2 FLOPs per multiply-add (a multiply and an add): "
                                    "x W1 costs 2·d·h FLOPs per patient, not d·h."),
                (n_run * (F + 2 * h + 2 * d), "Count matmuls only: 4·d·h per doctor."),
                (2 * F if clinic == "second opinion" else -1,
                 f"The second-opinion clinic has {N_OPINIONS} cardiologists (yours and two more, as in "
                 f"the demo), not 2."),
            ])
    return ("parameters and FLOPs per patient are right for all four clinics, "
            "on 3 sizes of clinic (up to E=64).")


@LESSON.exercise("split_params", forbid=[split_params_ref])
def split_params(fn):
    for total, active, E, k in [(46.7e9, 12.9e9, 8, 2), (1000.0, 400.0, 4, 1), (5.0e6, 1.4e6, 16, 2)]:
        got = call(fn, total, active, E, k, name="split_params")
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            raise Fail(f"split_params should return two numbers, (shared, per_expert), got {got!r}")
        shared, per = split_params_ref(total, active, E, k)
        expect_number("per_expert", got[1], per, mistakes=[
            (total / E, "Not all of the model is experts: attention, embeddings and the routers are "
                        "shared. Subtract the two equations: total − active = (E − k)·per_expert."),
            ((total - active) / E, "A token uses k experts, so total − active counts the E − k "
                                   "experts it does *not* use: divide by E − k."),
            ((total - active) / k, "Divide by E − k, the number of experts a token leaves idle."),
            (shared, "You returned (per_expert, shared); the order is (shared, per_expert)."),
        ])
        expect_number("shared", got[0], shared, mistakes=[
            (active - per, "shared = active − k·per_expert (a token uses k experts)."),
        ])
    return ("shared and per-expert counts are right, including Mixtral 8x7B's "
            "(46.7B total, 12.9B active, top-2 of 8).")
