"""Graders for lesson 07, *The whole clinic*: matching compute, one training step, and
reading the learning curves.

The reference answers live here too (``*_ref``): the lesson's own cells use them (or
minimoe's training loop) after each exercise, so a learner who is stuck can read on.
"""
from __future__ import annotations

import math

import numpy as np

from ...clinic.data import make_clinic
from ...clinic.models import SparseMoE
from ...clinic.optim import Adam
from .compare import expect_number
from .grading import Fail, Lesson, call, no_token_loop
from .lesson01 import call_watching

LESSON = Lesson("07", "The whole clinic")
progress = LESSON.progress


# --------------------------------------------------------------------------- references
def sparse_block_flops(d, h, E, k):
    """FLOPs per patient of a sparse MoE block: the GP's scores (2dE), k experts (k·4dh) and
    the weighted combine (2kd) — what ``MoELayer.flops_per_token()`` counts."""
    return 2 * d * E + k * 4 * d * h + 2 * k * d


def matched_width_ref(d, h, E, k):
    """The smallest generalist width ``h_g`` with ``4·d·h_g >= sparse_block_flops(d, h, E, k)``."""
    return math.ceil(sparse_block_flops(d, h, E, k) / (4 * d))


def train_step_ref(model, optimizer, x, y, rng):
    """One step: training-mode forward (router noise from ``rng``), backward, update.

    Returns the objective that was minimised, task loss + balancing loss (a float).
    """
    loss = model.forward_loss(x, y, train=True, rng=rng)
    model.backward()
    optimizer.step()
    return float(loss + model.aux_loss)


def epochs_to_reach_ref(epochs, val_acc, target):
    """The first logged epoch at which ``val_acc >= target``, or ``None`` if it never is."""
    hit = np.flatnonzero(np.asarray(val_acc, dtype=np.float64) >= target)
    return None if hit.size == 0 else float(np.asarray(epochs, dtype=np.float64)[hit[0]])


# --------------------------------------------------------------------------- exercise 1
@LESSON.exercise("matched_width", forbid=[matched_width_ref, sparse_block_flops])
def matched_width(fn):
    for d, h, E, k in [(16, 8, 8, 2), (16, 8, 7, 2), (32, 64, 64, 1), (12, 5, 3, 3)]:
        got = call(fn, d, h, E, k, name="matched_width")
        want = matched_width_ref(d, h, E, k)
        exact = sparse_block_flops(d, h, E, k) / (4 * d)
        at = f"for d={d}, h={h}, E={E}, k={k}"
        expect_number(f"matched_width {at}", got, want, atol=1e-9, mistakes=[
            (exact, "A width is a whole number of hidden units: round *up* (math.ceil), so the "
                    "generalist never gets less compute than the GP clinic."),
            (math.floor(exact), "Round up (math.ceil), not down: rounding down would give the "
                                "generalist *less* compute than the GP clinic."),
            (math.ceil((k * 4 * d * h + 2 * k * d) / (4 * d)),
             "The GP's own work costs compute too: its scores x W_gate are 2·d·E FLOPs per patient."),
            (math.ceil((2 * d * E + k * 4 * d * h) / (4 * d)),
             "Count the weighted sum of the k answers too (2·k·d FLOPs), as "
             "MoELayer.flops_per_token() does."),
            (k * h, "Matching hidden units (k·h) forgets the GP's scores (2dE) and the combine (2kd): "
                    "compare FLOPs, then divide by the generalist's 4·d FLOPs per hidden unit."),
            (math.ceil(sparse_block_flops(d, h, E, E) / (4 * d)),
             "A patient sees k specialists, not all E: that would match the dense MoE (every "
             "specialist consulted), whose parameters the GP clinic has but not its compute."),
            (E * h, "E·h matches the experts' *parameters*; the generalist should match the GP "
                    "clinic's *compute* per patient, which only k of the E experts use."),
        ])
        if not float(got).is_integer():
            raise Fail(f"matched_width {at} should be a whole number of hidden units, got {got!r}.")
    return ("the generalist's width is the smallest whose 4·d·h_g FLOPs cover the GP's scores, "
            "k experts and the combine (4 clinic sizes, E = 3 to 64).")


# --------------------------------------------------------------------------- exercise 2
def _clinic(seed):
    """A small GP clinic (noisy top-2 of 4, importance + load balancing) and its Adam optimizer."""
    model = SparseMoE(6, 3, d_model=8, d_hidden=4, n_experts=4, k=2, rng=np.random.default_rng(seed))
    return model, Adam(model, lr=1e-2, clip=1.0)


def _params(model):
    return {n: p.copy() for n, p in model.params.items()}


def _same(a, b):
    return all(np.allclose(a[n], b[n], rtol=1e-10, atol=1e-12) for n in a)


_VARIANTS = {
    # name: (one wrong step, its hint)
    "no_update": (lambda m, o, x, y, rng: (m.forward_loss(x, y, train=True, rng=rng), m.backward()),
                  "The parameters never moved: after model.backward() has filled model.grads, "
                  "call optimizer.step() to update them."),
    "no_backward": (lambda m, o, x, y, rng: (m.forward_loss(x, y, train=True, rng=rng), o.step()),
                    "Call model.backward() between the forward pass and optimizer.step(): the "
                    "optimizer reads model.grads, which only backward() fills."),
    "step_first": (lambda m, o, x, y, rng: (o.step(), m.forward_loss(x, y, train=True, rng=rng),
                                            m.backward()),
                   "Order matters: forward, backward, *then* optimizer.step(). Stepping first updates "
                   "the weights with the previous batch's gradients."),
    "eval_mode": (lambda m, o, x, y, rng: (m.forward_loss(x, y, train=False, rng=rng), m.backward(),
                                           o.step()),
                  "Train in training mode: forward_loss(x, y, train=True, rng=rng). In eval mode the "
                  "GP adds no exploration noise (lesson 04), so it never tries other specialists."),
    "own_noise": (lambda m, o, x, y, rng: (m.forward_loss(x, y, train=True), m.backward(), o.step()),
                  "Pass rng=rng to forward_loss: the router noise must come from the generator the "
                  "loop gives you, so that the same seed gives the same run."),
}


_BATCHES = [(0, 24), (24, 48)]


def _run_steps(step_fn, seed, data):
    """Two steps of ``step_fn`` on a fresh clinic: (weights after each step, returned values, model)."""
    model, opt = _clinic(seed)
    rng = np.random.default_rng(100 + seed)
    snaps, outs = [], []
    for a, b in _BATCHES:
        outs.append(step_fn(model, opt, data.train.x[a:b], data.train.y[a:b], rng))
        snaps.append(_params(model))
    return snaps, outs, model


@LESSON.exercise("train_step", forbid=[train_step_ref])
def train_step(fn):
    for seed in (0, 1):
        data = make_clinic(48, 0, 0, n_symptoms=6, n_specialties=3, n_classes=3, seed=seed)
        start = _params(_clinic(seed)[0])
        learner = lambda m, o, x, y, rng: call(fn, m, o, x, y, rng, name="train_step")  # noqa: E731
        snaps, outs, model = _run_steps(learner, seed, data)
        ref_snaps, parts, _ = _run_steps(_ref_parts, seed, data)
        for step, (mine, ref) in enumerate(zip(snaps, ref_snaps)):
            if not _same(mine, ref):
                raise Fail(_diagnose(seed, data, start, snaps, model, step))
        for step, (got, (task, aux)) in enumerate(zip(outs, parts)):
            expect_number(f"the objective returned at step {step + 1}", got, task + aux, mistakes=[
                (task, "Return the objective the step minimised: the task loss *plus* the balancing "
                       "loss, loss + model.aux_loss (backward() differentiates both)."),
                (aux, "That is only the balancing loss; return loss + model.aux_loss."),
            ])
    def make(T):
        data = make_clinic(T, 0, 0, n_symptoms=6, n_specialties=3, n_classes=3, seed=T)
        model, opt = _clinic(2)
        return model, opt, data.train.x, data.train.y, np.random.default_rng(T)

    def check(out, model, opt, x, y, rng):
        ref, ref_opt = _clinic(2)
        task, aux = _ref_parts(ref, ref_opt, x, y, np.random.default_rng(x.shape[0]))
        if not _same(_params(model), _params(ref)):
            raise Fail(f"with T = {x.shape[0]} patients your step leaves other weights than minimoe's.")
        expect_number(f"the objective returned for T = {x.shape[0]} patients", out, task + aux)
    no_token_loop(fn, "train_step", make, check, loops="a loop over patients",
                  hint="One forward_loss on the whole batch, one backward, one optimizer.step().")
    return ("forward in training mode with the loop's rng, backward, then optimizer.step(): the "
            "weights match minimoe's after each of 2 steps on 2 clinics, and the objective "
            "(task + balancing loss) is returned; no loop over patients.")


def _ref_parts(model, optimizer, x, y, rng):
    """The reference step, returning (task loss, balancing loss) separately."""
    loss = model.forward_loss(x, y, train=True, rng=rng)
    aux = model.aux_loss
    model.backward()
    optimizer.step()
    return float(loss), float(aux)


def _diagnose(seed, data, start, snaps, model, step):
    """Name the typical mistake whose two steps give the learner's weights, if any."""
    if all(_same(start, s) for s in snaps):
        if all(not np.any(g) for g in model.grads.values()):
            return _VARIANTS["no_backward"][1]
        return _VARIANTS["no_update"][1]
    for name, (wrong, hint) in _VARIANTS.items():
        wrong_snaps, _, _ = _run_steps(wrong, seed, data)
        if all(_same(a, b) for a, b in zip(wrong_snaps, snaps)):
            return hint
    return (f"after step {step + 1} your weights differ from minimoe's. One step is exactly: "
            f"loss = model.forward_loss(x, y, train=True, rng=rng); model.backward(); "
            f"optimizer.step() — and nothing else that draws from rng or changes the weights.")


# --------------------------------------------------------------------------- exercise 3
def _curve(seed, n, start):
    """A noisy rising accuracy curve logged every 0.25 epoch (so positions are not epochs)."""
    rng = np.random.default_rng(seed)
    epochs = 0.25 * np.arange(1, n + 1)
    acc = start + (0.8 - start) * (1 - np.exp(-epochs / 2)) + 0.03 * rng.standard_normal(n)
    return epochs, np.round(acc, 3)


def _record_high(acc):
    """A value the curve reaches for the first time exactly (higher than everything before it)."""
    records = [i for i in range(1, len(acc)) if acc[i] > np.max(acc[:i])]
    return float(acc[records[len(records) // 2]])


@LESSON.exercise("epochs_to_reach", forbid=[epochs_to_reach_ref])
def epochs_to_reach(fn):
    epochs, acc = _curve(0, 40, 0.3)
    cases = [(epochs, acc, 0.6), (epochs, acc, 0.75), (epochs, acc, 0.95),    # never reached
             (epochs, acc, float(acc[0]) - 0.1),                              # at the first point
             (epochs, acc, _record_high(acc))]                                 # exactly a logged value
    for ep, va, target in cases:
        got = call_watching(fn, list(ep), list(va), target, name="epochs_to_reach",
                           labels=("epochs", "val_acc"))
        want = epochs_to_reach_ref(ep, va, target)
        hit = np.flatnonzero(va >= target)
        strict = np.flatnonzero(va > target)
        what = f"for target {target:.3f}"
        if want is None:
            if got is not None:
                hint = ("np.argmax of an all-False array is 0, so it 'finds' the first epoch: check "
                        "that the target is reached at all." if np.isclose(float(got), ep[0]) else
                        "This curve never reaches the target: return None.")
                raise Fail(f"epochs_to_reach {what} returned {got}. {hint}")
            continue
        if got is None:
            first = " (it is reached at the very first log: watch out for `if i:` when i = 0)" \
                if hit[0] == 0 else ""
            raise Fail(f"epochs_to_reach {what} returned None, but the curve reaches it at epoch "
                       f"{want:g}{first}.")
        expect_number(f"epochs_to_reach {what}", got, want, mistakes=[
            (float(hit[0]), "That is the position in the list; return the epoch, epochs[i] (the "
                            "curve is logged every quarter epoch)."),
            (float(hit[0] + 1), "That is a count of log entries; return the epoch, epochs[i]."),
            (float(ep[hit[-1]]), "That is the *last* time the curve is above the target; we want the "
                                 "first time it gets there."),
            (float(ep[strict[0]]) if strict.size else -1.0,
             "'Reached' means at least the target (>=), not strictly above it."),
        ])
    return "finds the first epoch at which the validation accuracy reaches a target, or None (5 cases)."
