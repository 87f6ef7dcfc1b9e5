"""Optimizers: how the clinic's doctors learn from their mistakes.

An optimizer works on *any* object with two dicts of identical keys, ``params``
(the arrays being learned) and ``grads`` (∂loss/∂each array, filled in by the
object's ``backward``). A single ``Expert``, an ``MoELayer`` and a whole
``models.Clinic`` all qualify, so one optimizer serves them all.

Parameters are updated **in place** (``p -= ...``): the model keeps references
to its arrays, so replacing them with new arrays would silently detach them.

Three pieces:

* :func:`clip_grad_norm` — rescale all gradients together so their *global*
  L2 norm is at most ``max_norm`` (Pascanu et al. 2013). The direction of the
  step is kept; only an occasional huge step is shortened.
* :class:`SGD` — gradient descent with (heavy-ball) momentum.
* :class:`Adam` — Kingma & Ba 2015, Algorithm 1, with bias correction.
"""
from __future__ import annotations

import numpy as np

from ..validate import all_finite, check_positive_float

__all__ = ["global_norm", "clip_grad_norm", "Optimizer", "SGD", "Adam", "make_optimizer"]


def _check_param(name, p):
    """A parameter must be a writable floating array: the optimizer updates it in place."""
    if not isinstance(p, np.ndarray) or not np.issubdtype(p.dtype, np.floating):
        got = f"an array of dtype {p.dtype}" if isinstance(p, np.ndarray) else type(p).__name__
        raise TypeError(f"parameter {name!r} must be a floating numpy array, got {got}")
    if not p.flags.writeable:
        raise ValueError(f"parameter {name!r} is read-only; an optimizer updates parameters in place")


def _check_grad(name, g, shape=None, clip=False, finite=True):
    """A gradient must be a floating array (of its parameter's ``shape``, when given), finite
    (when ``finite``), and writable when ``clip`` will scale it in place."""
    if not isinstance(g, np.ndarray):
        raise TypeError(f"gradient {name!r} must be a numpy array, got {type(g).__name__}; "
                        f"run backward() before step()")
    if shape is not None and g.shape != shape:
        raise ValueError(f"gradient {name!r} has shape {g.shape} but the parameter has {shape}")
    if not np.issubdtype(g.dtype, np.floating):
        raise TypeError(f"gradient {name!r} must have a floating dtype, got {g.dtype}")
    if clip and not g.flags.writeable:
        raise ValueError(f"gradient {name!r} is read-only, and clip scales gradients in place")
    if finite and not all_finite(g):
        raise ValueError(f"gradient {name!r} contains NaN or inf; lower the learning rate or "
                         f"check the backward pass")


def _check_target(target):
    params = getattr(target, "params", None)
    grads = getattr(target, "grads", None)
    if not isinstance(params, dict) or not isinstance(grads, dict):
        raise TypeError(f"an optimizer needs an object with dicts .params and .grads, "
                        f"got {type(target).__name__}")
    if set(params) != set(grads):
        raise ValueError(f"params and grads must have the same keys; params has {sorted(params)}, "
                         f"grads has {sorted(grads)}")
    for k, p in params.items():
        _check_param(k, p)
    return target


def global_norm(grads):
    """The L2 norm of all gradients taken together: ``sqrt(Σ_k ‖g_k‖²)``."""
    return float(np.sqrt(sum(float(np.sum(np.square(g, dtype=np.float64))) for g in grads.values())))


def clip_grad_norm(grads, max_norm):
    """Scale every gradient by ``min(1, max_norm / ‖g‖)`` where ‖g‖ is the global norm.

    Clipping by the *global* norm (not per array) keeps the update's direction:
    all arrays shrink by the same factor.

    Args:
        grads: ``{name: floating array}``, modified in place. Every one is checked (an
            array, floating, writable) before any is scaled, so a bad one leaves all as they were.
        max_norm: the largest allowed global norm (> 0).

    Returns:
        The global norm **before** clipping (handy for logging).
    """
    max_norm = check_positive_float("max_norm", max_norm)
    for name, g in grads.items():             # all of them, before any is scaled (NaN and inf: by the norm)
        _check_grad(name, g, clip=True, finite=False)
    norm = global_norm(grads)
    if not np.isfinite(norm):
        raise ValueError("gradient norm is NaN or inf; lower the learning rate or check the backward pass")
    if norm > max_norm:
        scale = max_norm / norm
        for g in grads.values():
            g *= scale
    return norm


class Optimizer:
    """Base class: holds the target, the learning rate and optional clipping.

    Subclasses implement ``_update(name, p, g)``; :meth:`step` checks everything, clips,
    then updates every parameter in place.

    An optimizer trains the parameters its target had when it was made, in the shapes they
    had: its state (velocity, moments, Adam's step count) belongs to them. A parameter added
    to ``target.params`` later, or one replaced by an array of another shape, is refused by
    :meth:`step` with a message that says to make a new optimizer; one removed is no longer
    trained.
    """

    def __init__(self, target, lr, clip=None):
        self.target = _check_target(target)
        self.lr = check_positive_float("lr", lr)
        self.clip = None if clip is None else check_positive_float("clip", clip)
        self.t = 0               # number of steps taken
        self.last_grad_norm = None
        self.shapes = {k: p.shape for k, p in self.target.params.items()}   # what this optimizer trains

    def _checked_grads(self):
        """Check every parameter and every gradient; return the gradients of the parameters.

        A parameter: a writable floating array, known to this optimizer and of the shape it
        had, finite. Its gradient: a finite floating array of the parameter's shape (writable
        when clipping, which scales it in place). Any other dtype of float is cast on update.
        """
        params, grads = self.target.params, self.target.grads
        if not isinstance(params, dict):
            raise TypeError(f"target.params must be a dict, got {type(params).__name__}")
        for name, p in params.items():
            _check_param(name, p)
            if name not in self.shapes:
                raise ValueError(f"parameter {name!r} is new: the optimizer was made for {sorted(self.shapes)}; "
                                 f"make a new optimizer to train it")
            if p.shape != self.shapes[name]:
                raise ValueError(f"parameter {name!r} has shape {p.shape} but had {self.shapes[name]} when the "
                                 f"optimizer was made; make a new optimizer for the new shape")
            if not all_finite(p):
                raise ValueError(f"parameter {name!r} contains NaN or inf; the model has diverged "
                                 f"(lower the learning rate, or clip)")
            _check_grad(name, grads.get(name) if isinstance(grads, dict) else None, p.shape,
                        clip=self.clip is not None)
        return {name: grads[name] for name in params}

    def step(self):
        """Check every parameter and gradient, then clip (if asked), then update every parameter in place.

        Everything is checked (see :meth:`_checked_grads`) *before* anything changes: a bad
        parameter or gradient raises, naming it, and leaves the parameters, the gradients, the
        optimizer state and ``t`` exactly as they were.
        """
        grads = self._checked_grads()
        if self.clip is not None:
            self.last_grad_norm = clip_grad_norm(grads, self.clip)
        self.t += 1
        for name, p in self.target.params.items():
            self._update(name, p, grads[name])

    def _update(self, name, p, g):  # pragma: no cover - abstract
        raise NotImplementedError


class SGD(Optimizer):
    """Stochastic gradient descent with heavy-ball momentum.

        v ← μ v + g
        p ← p − lr · v

    (the convention of PyTorch's ``torch.optim.SGD``; with ``momentum=0`` it is
    plain ``p ← p − lr · g``).

    Example:
        >>> opt = SGD(model, lr=0.1, momentum=0.9)
        >>> model.backward(); opt.step()
    """

    def __init__(self, target, lr=0.1, momentum=0.0, clip=None):
        super().__init__(target, lr, clip)
        self.momentum = check_positive_float("momentum", momentum, allow_zero=True)
        if self.momentum >= 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        self.velocity = {k: np.zeros_like(p) for k, p in self.target.params.items()}

    def _update(self, name, p, g):
        if self.momentum:
            v = self.velocity[name]
            v *= self.momentum
            v += g
            p -= self.lr * v
        else:
            p -= self.lr * g


class Adam(Optimizer):
    """Adam (Kingma & Ba 2015, Algorithm 1).

        m ← β1 m + (1 − β1) g           first moment (a running mean of g)
        v ← β2 v + (1 − β2) g²          second moment (a running mean of g²)
        m̂ = m / (1 − β1ᵗ),  v̂ = v / (1 − β2ᵗ)    bias correction: m, v start at 0
        p ← p − lr · m̂ / (√v̂ + ε)

    Each parameter gets its own step size, which matters for MoE: an expert
    that sees few patients gets small, rare gradients, and Adam still moves it.
    """

    def __init__(self, target, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, clip=None):
        super().__init__(target, lr, clip)
        for name, b in (("beta1", beta1), ("beta2", beta2)):
            check_positive_float(name, b, allow_zero=True)
            if b >= 1:
                raise ValueError(f"{name} must be in [0, 1), got {b!r}")
        self.beta1, self.beta2 = float(beta1), float(beta2)
        self.eps = check_positive_float("eps", eps)
        self.m = {k: np.zeros_like(p) for k, p in self.target.params.items()}
        self.v = {k: np.zeros_like(p) for k, p in self.target.params.items()}

    def _update(self, name, p, g):
        m, v = self.m[name], self.v[name]
        m *= self.beta1
        m += (1 - self.beta1) * g
        v *= self.beta2
        v += (1 - self.beta2) * g * g
        m_hat = m / (1 - self.beta1 ** self.t)
        v_hat = v / (1 - self.beta2 ** self.t)
        p -= self.lr * m_hat / (np.sqrt(v_hat) + self.eps)


def make_optimizer(name, target, lr, clip=None, **kwargs):
    """Build an optimizer by name: ``"adam"`` or ``"sgd"`` (extra kwargs go to its constructor)."""
    table = {"adam": Adam, "sgd": SGD}
    if name not in table:
        raise ValueError(f"optimizer must be one of {sorted(table)}; got {name!r}")
    return table[name](target, lr=lr, clip=clip, **kwargs)
