"""Lesson 07's graders: a blank exercise fails clearly, an independently written right answer
passes, each typical mistake gets its targeted hint, a crash is a verdict — and the graders'
references agree with minimoe (the FLOP count with MoELayer, the training step with
minimoe.clinic.train.train)."""
import math

import numpy as np
import pytest

from grader_cases import GraderContract, assert_fail
from minimoe.course.checks import lesson07
from minimoe.clinic.data import make_clinic
from minimoe.clinic.models import Generalist, SparseMoE
from minimoe.core.moe import MoELayer
from minimoe.clinic.optim import Adam
from minimoe.clinic.train import train


# ----------------------------------------------------------------------------- independent answers
def width(d, h, E, k, router=True, combine=True, rounding=math.ceil, n=None):
    """Smallest h_g with 4·d·h_g >= FLOPs of the GP clinic's block (counted here by hand)."""
    n = k if n is None else n
    flops = (2 * d * E if router else 0) + n * (2 * d * h + 2 * h * d) + (2 * n * d if combine else 0)
    return rounding(flops / (4 * d))


def step(model, opt, x, y, rng, *, mode=True, use_rng=True, do_backward=True, do_step=True, first=False,
         aux=True):
    if first:
        opt.step()
    loss = model.forward_loss(x, y, train=mode, rng=rng if use_rng else None)
    if do_backward:
        model.backward()
    if do_step and not first:
        opt.step()
    return loss + (model.aux_loss if aux else 0.0)


def reach(epochs, acc, target, *, strict=False, index=False, last=False, argmax=False):
    hits = [i for i, a in enumerate(acc) if (a > target if strict else a >= target)]
    if argmax:
        return epochs[hits[0] if hits else 0]
    if not hits:
        return None
    i = hits[-1] if last else hits[0]
    return i if index else epochs[i]


def reach_if_i(epochs, acc, target):
    i = next((i for i, a in enumerate(acc) if a >= target), None)
    return epochs[i] if i else None                 # the bug: `if i` is False for i = 0


CASES = [
    (lesson07.matched_width, width, [
        (lambda d, h, E, k: width(d, h, E, k, rounding=lambda v: v), "whole number"),
        (lambda d, h, E, k: width(d, h, E, k, rounding=math.floor), "Round up"),
        (lambda d, h, E, k: width(d, h, E, k, router=False), "2·d·E"),
        (lambda d, h, E, k: width(d, h, E, k, combine=False), "weighted sum"),
        (lambda d, h, E, k: k * h, "Matching hidden units"),
        (lambda d, h, E, k: width(d, h, E, k, n=E), "k specialists, not all E"),
    ]),
    (lesson07.train_step, step, [
        (lambda *a: step(*a, do_step=False), "call optimizer.step()"),
        (lambda *a: step(*a, do_backward=False), "Call model.backward()"),
        (lambda *a: step(*a, first=True), "Order matters"),
        (lambda *a: step(*a, mode=False), "training mode"),
        (lambda *a: step(*a, use_rng=False), "Pass rng=rng"),
        (lambda *a: step(*a, aux=False), "*plus* the balancing loss"),
    ]),
    (lesson07.epochs_to_reach, reach, [
        (lambda e, a, t: reach(e, a, t, index=True), "position in the list"),
        (lambda e, a, t: reach(e, a, t, last=True), "*last* time"),
        (lambda e, a, t: reach(e, a, t, strict=True), "at least the target"),
        (lambda e, a, t: reach(e, a, t, argmax=True), "all-False array"),
        (reach_if_i, "very first log"),
    ]),
]


def step_with_patient_loop(model, opt, x, y, rng):
    """The right step, plus a Python loop over the patients (a per-patient class count)."""
    seen = np.zeros(int(y.max()) + 1)
    for label in y:
        seen[label] += 1
    return step(model, opt, x, y, rng)


class TestGraders(GraderContract):
    LESSONS = (lesson07.LESSON,)
    CASES = CASES
    NONE_IS_VALID = (lesson07.epochs_to_reach,)         # None: the target was never reached
    NO_GENERIC_NEAR_MISS = ("matched_width",)           # an int: no float to nudge
    NEAR_MISSES = {
        "matched_width": [(lambda d, h, E, k: width(d, h, E, k) + (E == 7), None),      # right for 3 shapes of 4
                          (lambda d, h, E, k: width(d, h, E, k) + 1e-6, None)],
        "epochs_to_reach": [(lambda e, a, t: None if reach(e, a, t) is None else reach(e, a, t) * (1 + 1e-6), None)],
    }
    RULE_BREAKING = {"train_step": [(step_with_patient_loop, "grows with the number of")]}


def test_a_step_that_draws_extra_noise_gets_the_general_explanation():
    def extra(model, opt, x, y, rng):
        rng.standard_normal()                       # the run is no longer reproducible from the seed
        return step(model, opt, x, y, rng)
    assert_fail(lesson07.train_step(extra), "your weights differ", "nothing else that draws from rng")


# ----------------------------------------------------------------------------- references vs minimoe
@pytest.mark.parametrize("d,h,E,k", [(16, 8, 8, 2), (16, 8, 7, 2), (32, 64, 64, 1), (5, 3, 4, 4)])
def test_matched_width_matches_moelayer_flops(d, h, E, k):
    flops = MoELayer(d, h, E, k=k, noisy=False).flops_per_token()
    assert lesson07.sparse_block_flops(d, h, E, k) == flops
    hg = lesson07.matched_width_ref(d, h, E, k)
    assert 4 * d * hg >= flops > 4 * d * (hg - 1)
    g = Generalist(3, 2, d_model=d, d_hidden=hg).block
    assert g.flops_per_token() >= flops


def test_train_step_ref_is_the_step_of_minimoe_train():
    """One epoch of one full batch with train() equals one train_step_ref with the same rng."""
    data = make_clinic(40, 8, 0, n_symptoms=5, n_specialties=2, n_classes=3, seed=3)
    a = SparseMoE(5, 3, d_model=6, d_hidden=4, n_experts=3, k=2, rng=np.random.default_rng(0))
    b = SparseMoE(5, 3, d_model=6, d_hidden=4, n_experts=3, k=2, rng=np.random.default_rng(0))
    train(a, data.train, data.val, epochs=1, batch_size=40, lr=1e-2, seed=7, progress=False)
    rng = np.random.default_rng(7)
    order = rng.permutation(40)                     # train() shuffles first, from the same generator
    lesson07.train_step_ref(b, Adam(b, lr=1e-2, clip=1.0), data.train.x[order], data.train.y[order], rng)
    for name in a.params:
        np.testing.assert_allclose(a.params[name], b.params[name], rtol=1e-12, atol=1e-14)


def test_epochs_to_reach_ref():
    assert lesson07.epochs_to_reach_ref([0.5, 1.0, 1.5], [0.2, 0.6, 0.5], 0.6) == 1.0
    assert lesson07.epochs_to_reach_ref([0.5, 1.0, 1.5], [0.2, 0.6, 0.5], 0.7) is None
    assert lesson07.epochs_to_reach_ref([0.5, 1.0], [0.9, 0.1], 0.0) == 0.5
