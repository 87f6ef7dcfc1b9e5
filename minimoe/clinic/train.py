"""Training the clinics: minibatches, train/eval mode, and a record of what happened.

One loop trains every clinic in :mod:`minimoe.clinic.models` (anything with
``forward_loss``/``backward``/``params``/``grads``). Each step:

    loss = model.forward_loss(x_batch, y_batch, train=True, rng=rng)   # task loss; aux_loss set
    model.backward()                                                   # grads of loss + aux_loss
    optimizer.step()                                                   # clip, then update in place

Every ``log_every`` steps the loop records the interval's mean training loss,
accuracy and auxiliary loss; for MoE clinics, how many patients each specialist
actually saw (``load``) and how many the full appointment books turned away
(``dropped``); and the validation loss and accuracy in eval mode (no router
noise). All randomness — shuffling and router noise — comes from one
generator seeded by ``seed``, so the same seed gives the same history, bit for bit.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

import numpy as np

from .data import Split
from ..core.layers import cross_entropy_forward
from .optim import make_optimizer
from ..validate import all_finite, check_int, check_positive_float

__all__ = ["History", "evaluate", "train", "load_cv", "specialty_routing", "check_training_loss", "raise_if_diverged", "DIVERGE_FACTOR"]


@dataclass
class History:
    """What happened during training, one entry per logging interval.

    Attributes:
        step: optimizer steps taken at the end of each interval.
        epoch: the same, in (fractional) epochs.
        train_loss, train_acc, aux_loss: means over the interval's minibatches.
        val_loss, val_acc: on the validation split, eval mode.
        load: per interval, an (E,) int array — (patient, expert) assignments each
            expert processed during the interval (MoE clinics; empty otherwise).
        dropped: per interval, assignments turned away by capacity.
    """
    step: list = field(default_factory=list)
    epoch: list = field(default_factory=list)
    train_loss: list = field(default_factory=list)
    train_acc: list = field(default_factory=list)
    aux_loss: list = field(default_factory=list)
    val_loss: list = field(default_factory=list)
    val_acc: list = field(default_factory=list)
    load: list = field(default_factory=list)
    dropped: list = field(default_factory=list)

    def load_array(self):
        """Loads as an (n_intervals, E) array (``(n, 0)`` for dense clinics)."""
        return np.array(self.load, dtype=np.int64).reshape(len(self.load), -1)


def load_cv(load):
    """Coefficient of variation ``std / mean`` of per-expert loads (0 = perfectly balanced)."""
    load = np.asarray(load, dtype=np.float64)
    mean = load.mean() if load.size else 0.0
    return float(load.std() / mean) if mean > 0 else 0.0


def _check_split(name, split):
    if not isinstance(split, Split):
        raise TypeError(f"{name} must be a minimoe.clinic.data.Split (e.g. data.train), got {type(split).__name__}")
    if len(split) == 0:
        raise ValueError(f"{name} is empty; it needs at least one patient")
    # Bad data is bad data: caught here, it is never mistaken for a training that diverged.
    if np.issubdtype(np.asarray(split.x).dtype, np.floating) and not all_finite(split.x):
        rows = np.flatnonzero(~np.all(np.isfinite(split.x), axis=tuple(range(1, np.ndim(split.x)))))
        raise ValueError(f"bad data: {name}.x contains NaN or inf ({rows.size} patient(s), the first at "
                         f"row {rows[0]}); clean or drop those records before training")
    return split


# A loss above DIVERGE_FACTOR × its value at the first step (or DIVERGE_FACTOR nats, if the
# start was below 1) is not a noisy step any more: the weights are running away. (Cross-entropy
# starts near log C, a few nats; a bad but sane step moves it by a factor of 2 or so.)
DIVERGE_FACTOR = 100.0


def check_training_loss(loss, start, step, lr):
    """Stop a run whose loss is NaN/inf or has grown far beyond its start; name the learning rate.

    Args:
        loss: this step's training loss (task + auxiliary).  start: the first step's (None at step 1).
        step: the step number (from 1), for the message.  lr: the learning rate, for the message.

    Raises:
        FloatingPointError: the loss is not finite, or above ``DIVERGE_FACTOR · max(start, 1)``.
    """
    if not np.isfinite(loss):
        raise FloatingPointError(f"training diverged at step {step}: the loss became {loss} with lr={lr:g}; "
                                 f"lower the learning rate (or clip the gradients)")
    if start is not None and loss > DIVERGE_FACTOR * max(start, 1.0):
        raise FloatingPointError(f"training diverged at step {step}: the loss grew from {start:.3g} to "
                                 f"{loss:.3g} with lr={lr:g}; lower the learning rate (or clip the gradients)")


def raise_if_diverged(err, step, lr):
    """A layer's ``ValueError`` "… contains NaN or inf" during training means the weights blew
    up, not that the caller passed bad data: raise it again as a divergence that names lr."""
    if "NaN or inf" in str(err):
        raise FloatingPointError(f"training diverged near step {step} ({err}) with lr={lr:g}; lower the "
                                 f"learning rate or clip the gradients") from err


def evaluate(model, split, batch_size=4096):
    """Loss, accuracy and (for MoE clinics) load on a split, in eval mode.

    Returns:
        dict with ``loss``, ``acc``, and for MoE clinics ``load`` (E,) int,
        ``dropped`` and ``cv`` (the load's coefficient of variation).
    """
    _check_split("split", split)
    batch_size = check_int("batch_size", batch_size, low=1)
    logits, load, dropped = [], 0, 0
    for s in range(0, len(split), batch_size):          # a loop over batches, not patients
        logits.append(model.forward(split.x[s:s + batch_size], train=False))
        if model.moe is not None:
            load = load + np.asarray(model.moe.stats["load"])
            dropped += int(model.moe.stats["dropped"])
    logits = np.concatenate(logits)
    loss, _ = cross_entropy_forward(logits, split.y)
    out = {"loss": loss, "acc": float(np.mean(np.argmax(logits, axis=1) == split.y))}
    if model.moe is not None:
        out.update(load=load, dropped=dropped, cv=load_cv(load))
    return out


def specialty_routing(model, split, batch_size=4096):
    """How the GP refers each hidden specialty: an (E, S) table of counts.

    Entry ``[e, s]`` counts patients of specialty s whose referral to expert e
    was kept (each patient counts once per expert it is sent to). The specialty
    labels are read here, for analysis, and nowhere in training.
    """
    _check_split("split", split)
    batch_size = check_int("batch_size", batch_size, low=1)
    if model.moe is None:
        raise ValueError(f"specialty_routing needs an MoE clinic; {type(model).__name__} has no router")
    S = int(split.specialty.max()) + 1
    E = model.moe.n_experts          # works for any layer with the MoELayer surface (hash, expert choice, ...)
    counts = np.zeros((E, S), dtype=np.int64)
    for s in range(0, len(split), batch_size):
        model.forward(split.x[s:s + batch_size], train=False)
        st = model.moe.stats
        spec = np.broadcast_to(split.specialty[s:s + batch_size, None], st["topk_idx"].shape)
        kept = np.asarray(st["kept"], dtype=bool)
        np.add.at(counts, (st["topk_idx"][kept], spec[kept]), 1)
    return counts


def _progress_bar(total, desc, progress):
    """A tqdm bar if asked (``None`` means: only when stderr is a terminal), else a no-op."""
    if progress is None:
        progress = sys.stderr.isatty()
    if not progress:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


def train(model, train_split, val_split=None, *, epochs=10, batch_size=128, optimizer="adam", lr=3e-3,
          clip=1.0, seed=0, log_every=None, progress=None, desc=None):
    """Train ``model`` on ``train_split`` with minibatches; return a :class:`History`.

    Args:
        model: a clinic from :mod:`minimoe.clinic.models` (or anything with the same interface).
        train_split: a :class:`~minimoe.clinic.data.Split`; val_split: one for validation
            (defaults to ``train_split``).
        epochs: passes over the training set (>= 1); batch_size: patients per step.
        optimizer: ``"adam"`` or ``"sgd"``; lr: learning rate; clip: global-norm
            gradient clipping threshold (``None`` to switch off).
        seed: seeds the shuffling and the router noise (same seed ⇒ same history).
        (A run whose loss turns NaN/inf or grows beyond ``DIVERGE_FACTOR`` × its start
        stops with a ``FloatingPointError`` naming ``lr``; NaN or inf in the data is a
        ``ValueError`` "bad data" before any step.)
        log_every: steps per logging interval (default: about 40 intervals in all).
        progress: show a tqdm progress bar (``None``: only on a terminal).
        desc: label of the progress bar.
    """
    _check_split("train_split", train_split)
    val_split = train_split if val_split is None else _check_split("val_split", val_split)
    epochs = check_int("epochs", epochs, low=1)
    batch_size = check_int("batch_size", batch_size, low=1)
    lr = check_positive_float("lr", lr)
    seed = check_int("seed", seed, low=0)
    opt = make_optimizer(optimizer, model, lr=lr, clip=clip)
    rng = np.random.default_rng(seed)
    N = len(train_split)
    steps_per_epoch = -(-N // batch_size)
    total = epochs * steps_per_epoch
    log_every = max(1, total // 40) if log_every is None else check_int("log_every", log_every, low=1)

    hist, interval = History(), _Interval()
    bar = _progress_bar(total, desc, progress)
    step, start = 0, None
    try:
        for _ in range(epochs):
            order = rng.permutation(N)
            for s in range(0, N, batch_size):          # a loop over minibatches
                idx = order[s:s + batch_size]
                x, y = train_split.x[idx], train_split.y[idx]
                loss = model.forward_loss(x, y, train=True, rng=rng)   # sets model.aux_loss
                check_training_loss(loss + model.aux_loss, start, step + 1, lr)
                start = loss + model.aux_loss if start is None else start
                model.backward()                                       # grads of loss + aux_loss
                opt.step()
                step += 1
                interval.add(model, loss, y)
                if step % log_every == 0 or step == total:
                    interval.log_to(hist, model, step, steps_per_epoch, val_split)
                    interval = _Interval()
                    if bar is not None:
                        bar.set_postfix(loss=f"{hist.train_loss[-1]:.3f}", val_acc=f"{hist.val_acc[-1]:.3f}")
                if bar is not None:
                    bar.update(1)
    except ValueError as err:
        raise_if_diverged(err, step, lr)
        raise
    finally:
        if bar is not None:
            bar.close()
    return hist


class _Interval:
    """Running sums over one logging interval."""

    def __init__(self):
        self.loss = self.acc = self.aux = 0.0
        self.n = self.dropped = 0
        self.load = 0

    def add(self, model, loss, y):
        self.loss += loss
        self.aux += model.aux_loss
        self.acc += float(np.mean(np.argmax(model.last_logits, axis=1) == y))
        self.n += 1
        if model.moe is not None:
            self.load = self.load + np.asarray(model.moe.stats["load"])
            self.dropped += int(model.moe.stats["dropped"])

    def log_to(self, hist, model, step, steps_per_epoch, val_split):
        ev = evaluate(model, val_split)
        hist.step.append(step)
        hist.epoch.append(step / steps_per_epoch)
        hist.train_loss.append(self.loss / self.n)
        hist.train_acc.append(self.acc / self.n)
        hist.aux_loss.append(self.aux / self.n)
        hist.val_loss.append(ev["loss"])
        hist.val_acc.append(ev["acc"])
        hist.load.append(np.asarray(self.load, dtype=np.int64) if model.moe is not None
                         else np.zeros(0, dtype=np.int64))
        hist.dropped.append(self.dropped)
