"""The four clinics: four ways to get a diagnosis, as four small classifiers.

Every clinic reads a patient's symptoms and outputs scores (logits) for the
diagnoses. They share one skeleton and differ only in the middle block:

    u = x W_emb + b_emb                 (T, d)   embed the symptoms
    v = u + block(u)                    (T, d)   residual: a dropped patient carries on
    logits = v W_out + b_out            (T, C)   read out a diagnosis

| clinic                  | block                                        | analogy                              |
|-------------------------|----------------------------------------------|--------------------------------------|
| :class:`Generalist`     | one FFN of width h_g                         | one doctor with no specialism        |
| :class:`Ensemble`       | M generalists, probabilities averaged        | a second (third...) opinion          |
| :class:`DenseMoE`       | E experts, all consulted, softmax-weighted   | ask every specialist                 |
| :class:`SparseMoE`      | E experts, noisy top-k router, balance loss  | the GP refers you to k specialists   |

All expose the same interface (so one optimizer, one training loop and one
gradient checker serve all four):

* ``params`` / ``grads``: flat dicts with identical keys (``"embed.W"``,
  ``"block.W1"``, ``"readout.b"``, ...; ensemble members are prefixed ``"m0."``...);
* ``logits = forward(x, train=False, rng=None, noise=None)`` — x (T, n_symptoms);
* ``loss = forward_loss(x, y, train=True, rng=None, noise=None)`` — the task loss
  (mean cross-entropy); ``aux_loss`` then holds the balancing loss (the objective
  is their sum) and ``last_logits`` the logits;
* ``dx = backward()`` — gradient of ``loss + aux_loss`` into ``grads``;
* ``n_params``, ``n_active_params`` (used per patient) and ``flops_per_token()``;
* ``moe`` — the :class:`~minimoe.core.moe.MoELayer` (``None`` for dense clinics).

FLOPs are counted as 2 per multiply–add of the matrix products, at inference
(no router noise); biases and activations are ignored as they are tiny.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..core.experts import Expert
from ..core.layers import cross_entropy_backward, cross_entropy_forward, linear_backward, linear_forward, softmax
from ..validate import check_array, check_int, check_rng

__all__ = ["moe_block", "Clinic", "Generalist", "DenseMoE", "SparseMoE", "Ensemble", "CLINICS"]


# --------------------------------------------------------------------------- blocks
def moe_block(d_model, d_hidden, n_experts, rng, dtype=np.float64, **kwargs):
    """An :class:`~minimoe.core.moe.MoELayer` (imported here so the dense clinics work without it)."""
    from ..core.moe import MoELayer
    return MoELayer(d_model, d_hidden, n_experts, dtype=dtype, rng=rng, **kwargs)


# --------------------------------------------------------------------------- one network
class ClinicCache(NamedTuple):
    embed: tuple            # linear_forward's cache of the embedding
    readout: tuple          # linear_forward's cache of the readout
    loss: tuple | None      # cross_entropy_forward's cache (None until forward_loss)


class Clinic:
    """Embed → residual block → readout, with a hand-written backward.

    Args:
        n_symptoms: input width; n_classes: number of diagnoses C; d_model: width d.
        block: an object with ``params``, ``grads``, ``forward(u, train, noise)``,
            ``backward(dv)``, ``aux_loss``, ``n_params``, ``n_active_params`` and
            ``flops_per_token()`` (a :class:`~minimoe.core.experts.Expert` or an ``MoELayer``).
        rng: generator for the embedding and readout weights.
    """

    kind = "clinic"

    def __init__(self, n_symptoms, n_classes, d_model, block, rng, dtype=np.float64):
        self.n_symptoms = check_int("n_symptoms", n_symptoms, low=1)
        self.n_classes = check_int("n_classes", n_classes, low=2)
        self.d = check_int("d_model", d_model, low=1)
        rng = check_rng("rng", rng)  # an int seed becomes a Generator (SPEC 7: validate.check_rng)
        self.block = block
        self.dtype = dtype
        # LeCun-style N(0, 1/fan_in): keeps activations O(1) through the linear maps.
        self._own = {
            "embed.W": (rng.standard_normal((n_symptoms, d_model)) / np.sqrt(n_symptoms)).astype(dtype),
            "embed.b": np.zeros(d_model, dtype=dtype),
            "readout.W": (rng.standard_normal((d_model, n_classes)) / np.sqrt(d_model)).astype(dtype),
            "readout.b": np.zeros(n_classes, dtype=dtype),
        }
        # One flat dict that *shares* the arrays of the block (optimizers update in place).
        self.params = {**self._own, **{f"block.{k}": v for k, v in block.params.items()}}
        self.grads = {k: np.zeros_like(v) for k, v in self.params.items()}
        self.aux_loss = 0.0
        self._caches = None

    @property
    def moe(self):
        """The MoE layer, or ``None`` for a dense clinic."""
        return None if isinstance(self.block, Expert) else self.block

    def forward(self, x, train=False, rng=None, noise=None):
        """Logits (T, C) for symptoms x (T, n_symptoms).

        In training mode a noisy router needs noise ε (T, E): pass it as ``noise``,
        or pass ``rng`` and it is drawn from it.
        """
        check_array("x", x, shape=(None, self.n_symptoms))
        p = self.params
        u, c_emb = linear_forward(x, p["embed.W"], p["embed.b"])
        if noise is None and train and rng is not None and "W_noise" in self.block.params:
            noise = rng.standard_normal((x.shape[0], self.block.params["W_gate"].shape[1])).astype(u.dtype)
        v = u + self.block.forward(u, train=train, noise=noise)
        self.aux_loss = float(self.block.aux_loss or 0.0)
        logits, c_out = linear_forward(v, p["readout.W"], p["readout.b"])
        self._caches = ClinicCache(c_emb, c_out, None)   # the loss's cache comes with forward_loss
        self.last_logits = logits
        return logits

    def forward_loss(self, x, y, train=True, rng=None, noise=None):
        """Mean cross-entropy of diagnoses y (T,) int; ``aux_loss`` is set too."""
        logits = self.forward(x, train=train, rng=rng, noise=noise)
        loss, c_ce = cross_entropy_forward(logits, y)
        self._caches = self._caches._replace(loss=c_ce)
        return loss

    def backward(self):
        """Fill ``grads`` with ∂(loss + aux_loss)/∂params; return ∂/∂x (T, n_symptoms).

        The residual splits the gradient in two: ``dv`` flows straight to ``u``
        *and* through the block, and the two are added (``du = dv + block'(dv)``).
        The block's backward also adds its auxiliary loss's gradient.
        """
        if self._caches is None or self._caches.loss is None:
            raise RuntimeError("call forward_loss before backward")
        c_emb, c_out, c_ce = self._caches
        dlogits, _ = cross_entropy_backward(1.0, c_ce)
        dv, g_out = linear_backward(dlogits, c_out)
        du = dv + self.block.backward(dv)
        dx, g_emb = linear_backward(du, c_emb)
        for k in ("W", "b"):
            self.grads[f"embed.{k}"][...] = g_emb[k]
            self.grads[f"readout.{k}"][...] = g_out[k]
        for k, g in self.block.grads.items():
            self.grads[f"block.{k}"][...] = g
        return dx

    def routing_signature(self):
        """Which experts were chosen at the last forward (for gradient-check kink detection)."""
        return self.block.routing_signature() if self.moe is not None else None

    @property
    def n_params(self):
        return sum(v.size for v in self._own.values()) + self.block.n_params

    @property
    def n_active_params(self):
        """Parameters that touch one patient: all but the experts the GP did not pick."""
        return sum(v.size for v in self._own.values()) + self.block.n_active_params

    def flops_per_token(self):
        """Inference FLOPs per patient: embed + block + readout."""
        return 2 * self.n_symptoms * self.d + self.block.flops_per_token() + 2 * self.d * self.n_classes


class Generalist(Clinic):
    """*One doctor with no specialism*: a single FFN of width ``d_hidden`` must fit every specialty."""

    kind = "generalist"

    def __init__(self, n_symptoms, n_classes, d_model=16, d_hidden=32, rng=None, dtype=np.float64):
        rng = np.random.default_rng(0) if rng is None else rng
        block = Expert(d_model, check_int("d_hidden", d_hidden, low=1), rng=rng, dtype=dtype)   # one FFN
        super().__init__(n_symptoms, n_classes, d_model, block, rng, dtype)


class DenseMoE(Clinic):
    """*Ask every specialist*: E experts all consulted, their advice softmax-weighted (gate="dense")."""

    kind = "dense_moe"

    def __init__(self, n_symptoms, n_classes, d_model=16, d_hidden=16, n_experts=4, rng=None,
                 dtype=np.float64):
        rng = np.random.default_rng(0) if rng is None else rng
        E = check_int("n_experts", n_experts, low=1)
        block = moe_block(d_model, d_hidden, E, rng, dtype, k=E, gate="dense", noisy=False, balance=None)
        super().__init__(n_symptoms, n_classes, d_model, block, rng, dtype)


class SparseMoE(Clinic):
    """*The GP's referral*: a noisy top-k router sends each patient to k of E experts.

    A balancing loss (default: importance + smooth load, Shazeer et al. 2017)
    keeps the GP from sending everyone to the same overworked specialist.
    """

    kind = "sparse_moe"

    def __init__(self, n_symptoms, n_classes, d_model=16, d_hidden=16, n_experts=8, k=2, rng=None,
                 dtype=np.float64, noisy=True, balance="importance+load", balance_coef=0.05,
                 capacity_factor=None, gate="topk"):
        rng = np.random.default_rng(0) if rng is None else rng
        E = check_int("n_experts", n_experts, low=1)
        k = check_int("k", k, low=1, high=E)
        block = moe_block(d_model, d_hidden, E, rng, dtype, k=k, gate=gate, noisy=noisy, balance=balance,
                         balance_coef=balance_coef, capacity_factor=capacity_factor)
        super().__init__(n_symptoms, n_classes, d_model, block, rng, dtype)


# --------------------------------------------------------------------------- the ensemble
class Ensemble:
    """*A second opinion*: M generalists trained the same way, their predictions averaged.

    Each member is trained on its **own** loss — the objective is the mean of the
    members' cross-entropies, whose gradient for member m is exactly 1/M times
    what it would get trained alone (Adam ignores a constant scale, so each
    member takes the steps it would take alone, up to gradient clipping, which
    sees all members together) — so this is a true ensemble, not one wide
    network. The members differ only in their random initial weights.
    Prediction averages the members' probabilities,
    ``p̄ = (1/M) Σ_m softmax(z_m)``, and ``forward`` returns ``log p̄`` (valid
    logits: ``softmax(log p̄) = p̄``). Averaging reduces the doctors' *variance*;
    it cannot fix a bias they all share.
    """

    kind = "ensemble"

    def __init__(self, n_symptoms, n_classes, n_members=3, d_model=16, d_hidden=32, rng=None,
                 dtype=np.float64):
        rng = np.random.default_rng(0) if rng is None else rng
        M = check_int("n_members", n_members, low=1)
        self.members = [Generalist(n_symptoms, n_classes, d_model, d_hidden, rng, dtype) for _ in range(M)]
        self.n_symptoms, self.n_classes = n_symptoms, n_classes
        self.params = {f"m{i}.{k}": v for i, m in enumerate(self.members) for k, v in m.params.items()}
        self.grads = {k: np.zeros_like(v) for k, v in self.params.items()}
        self.aux_loss = 0.0
        self.moe = None

    @staticmethod
    def _average(member_logits):
        """``log((1/M) Σ_m softmax(z_m))``, floored at the smallest float so log(0) cannot occur."""
        p = np.mean([softmax(z) for z in member_logits], axis=0)
        return np.log(np.maximum(p, np.finfo(p.dtype).tiny))

    def forward(self, x, train=False, rng=None, noise=None):
        """Log of the averaged member probabilities, (T, C)."""
        return self._average([m.forward(x, train=train) for m in self.members])

    def forward_loss(self, x, y, train=True, rng=None, noise=None):
        """Mean over members of each member's own cross-entropy (``last_logits`` is the ensemble's)."""
        loss = float(np.mean([m.forward_loss(x, y, train=train) for m in self.members]))
        self.last_logits = self._average([m.last_logits for m in self.members])
        return loss

    def backward(self):
        """Each member's backward, scaled by 1/M (the objective is a mean); returns ∂/∂x."""
        M = len(self.members)
        dx = 0.0
        for i, m in enumerate(self.members):
            dx = dx + m.backward() / M
            for k, g in m.grads.items():
                self.grads[f"m{i}.{k}"][...] = g / M
        return dx

    def routing_signature(self):
        return None

    @property
    def n_params(self):
        return sum(m.n_params for m in self.members)

    n_active_params = n_params

    def flops_per_token(self):
        return sum(m.flops_per_token() for m in self.members)


CLINICS = {"ensemble": Ensemble, "generalist": Generalist, "dense_moe": DenseMoE, "sparse_moe": SparseMoE}
