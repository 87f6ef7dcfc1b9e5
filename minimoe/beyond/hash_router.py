"""Hash routing: a GP who never reads the symptoms (Roller et al. 2021, "Hash Layers For
Large Sparse Models").

Every router so far *learns* where to send a patient. Hash routing is the
baseline that asks whether learning is needed at all: each token goes to the
experts picked by a **fixed hash of its id** — in a language model, the id of the
word itself, so every occurrence of "knee" sees the same specialist(s), in every
layer, from the first step of training to the last. There is no router to train,
nothing to collapse, and nothing to balance beyond what the hash already spreads
out. Roller et al. found this surprisingly competitive with learned routing
(in their language-modelling experiments), which is a useful warning against reading too much "expertise" into
what a learned router does.

How the k experts are chosen (the only new idea in this file):

    key_t     = mix(id_t ⊕ mix(seed))                    one 64-bit number per token
    score_te  = mix(key_t + (e+1)·φ)                     a pseudo-random score per (token, expert)
    idx_t     = the k experts with the largest scores    distinct, a uniform random k-subset

``mix`` is the splitmix64 finaliser (Steele, Lea & Flood 2014): a bijection on
64-bit integers whose output bits look independent of its input bits, and φ is
the 64-bit golden-ratio constant. With k = 1 this is simply a uniform hash into
E buckets; with k > 1 it picks k *different* experts, like a router whose logits
are fixed noise. The gates are equal, ``G = 1/k`` for each chosen expert: with no
router there is nothing to weigh them by.

Vector data (the clinic's patients) have no word id. Pass an explicit id per
token (e.g. the patient's record number) for a truly fixed referral; without
ids, a token's *content* is its id (the bytes of its float64 row are hashed), so
identical rows go to identical experts. Beware: inside a model whose earlier
layers are still learning, the content of a hidden state changes every step, and
hashing it is random routing, not a fixed hash.

Shapes: T tokens (B·S for (B,S,d) input), d width, h expert hidden width, E experts, k per token.
"""
from __future__ import annotations

import numpy as np

from typing import NamedTuple

from ..core.dispatch import dispatch_combine_backward, dispatch_combine_forward, expert_capacity
from ..core.moe import MoEBase, MoEConfig
from ..validate import check_array, check_int

__all__ = ["mix64", "content_ids", "hash_route", "HashMoELayer"]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)     # 2^64 / φ, the splitmix64 increment
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def mix64(z):
    """splitmix64 finaliser on a uint64 array (wrapping arithmetic, elementwise).

        z ← (z ⊕ z≫30)·M1;  z ← (z ⊕ z≫27)·M2;  z ← z ⊕ z≫31

    Each step is invertible, so distinct inputs give distinct outputs; one flipped
    input bit flips about half the output bits.
    """
    z = np.asarray(z, dtype=np.uint64)
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def content_ids(x):
    """A 64-bit id per row of ``x`` (T, d), hashed from the bytes of its float64 values.

    A loop over the d features (never over tokens) folds each column into a running
    hash. Equal rows get equal ids; any change to a row gives an unrelated id.
    """
    check_array("x", x, ndim=2)
    # + 0.0 turns −0.0 into +0.0: equal rows (−0.0 == 0.0) must get equal ids, and the two
    # zeros differ in their sign bit.
    bits = np.ascontiguousarray(x + 0.0, dtype=np.float64).view(np.uint64)
    h = np.full(x.shape[0], np.uint64(x.shape[1]), dtype=np.uint64)
    for j in range(x.shape[1]):
        h = mix64(h ^ bits[:, j]) + _GOLDEN
    return h


def hash_route(ids, n_experts, k=1, seed=0):
    """The k experts of each token, chosen by a fixed hash of its id.

    Args:
        ids: (T,) non-negative integer ids (word ids, patient numbers, or :func:`content_ids`).
        n_experts: E.  k: experts per token, 1 ≤ k ≤ E.
        seed: a non-negative int; a different seed is a different (equally arbitrary) hash.

    Returns:
        idx: (T, k) int64, distinct experts per row, highest hash score first.
        The same id always gets the same experts, whatever else is in the batch.
    """
    E = check_int("n_experts", n_experts, low=1)
    k = check_int("k", k, low=1, high=E)
    seed = check_int("seed", seed, low=0, high=2**64 - 1)   # a uint64 hash key
    ids = np.asarray(ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"ids must be a 1-D integer array (one id per token), got {ids.dtype} {ids.shape}")
    if ids.size and np.issubdtype(ids.dtype, np.signedinteger) and ids.min() < 0:
        raise ValueError(f"ids must be non-negative, got a minimum of {ids.min()}")
    key = mix64(ids.astype(np.uint64) ^ mix64(np.array([seed], dtype=np.uint64)))     # (T,)
    scores = mix64(key[:, None] + (np.arange(1, E + 1, dtype=np.uint64) * _GOLDEN))   # (T, E)
    # The k largest of E pseudo-random scores: a uniform random k-subset (ties have
    # probability ~2⁻⁶⁴; the stable sort would break them by expert index).
    return np.argsort(~scores, axis=1, kind="stable")[:, :k].astype(np.int64)


class HashCache(NamedTuple):
    shape: tuple      # x's shape
    dispatch: tuple   # dispatch_combine_forward's cache


class HashMoELayer(MoEBase):
    """An MoE layer whose "router" is a fixed hash of each token's id (Roller et al. 2021).

    The same surface as :class:`~minimoe.core.moe.MoELayer` (so a model can swap one for
    the other), minus the router parameters:

    Example::

        layer = HashMoELayer(d_model=16, d_hidden=64, n_experts=8, k=1, rng=np.random.default_rng(0))
        y = layer.forward(x, ids=token_ids)      # x (T, d) or (B, S, d); ids (T,) or (B, S)
        dx = layer.backward(dy)                  # fills layer.grads (experts only)

    Args:
        d_model: d.  d_hidden: h.  n_experts: E.  k: experts per token (gates are 1/k each).
        seed: which hash (an int ≥ 0). Two layers with the same seed route identically.
        capacity_factor: each expert takes at most ``C = ceil(capacity_factor·T·k/E)``
            assignments (dispatch.py's drop order); None means no dropping.
        activation: "relu" or "gelu".  dtype: np.float64 or np.float32.
        rng: numpy.random.Generator for the expert weights (default ``default_rng(0)``).

    Attributes:
        params / grads: ``W1 (E,d,h)``, ``b1 (E,h)``, ``W2 (E,h,d)``, ``b2 (E,d)`` — no router.
        aux_loss: always 0.0 (nothing to balance with a loss).
        stats: "load", "importance", "dropped", "topk_idx", "topk_gates", "kept",
            "capacity", "losses" — as in MoELayer ("probs" does not exist: there are no scores).
    """

    uses_ids = True     # models pass token ids to forward (transformer.py reads this)
    router_keys = ()    # no router: a token touches only its k experts
    repr_fields = MoEBase.repr_fields[:4] + ("seed", "capacity_factor")

    def __init__(self, d_model, d_hidden, n_experts, k=1, seed=0, capacity_factor=None,
                 activation="relu", dtype=np.float64, rng=None):
        self.seed = check_int("seed", seed, low=0, high=2**64 - 1)     # a uint64 hash key
        self._setup(MoEConfig(d_model, d_hidden, n_experts, k, noisy=False, capacity_factor=capacity_factor,
                              activation=activation, dtype=dtype), rng)

    def forward(self, x, train=True, noise=None, ids=None):
        """Send each token to the experts its id hashes to, and average their answers.

        Args:
            x: (T, d) or (B, S, d) tokens.
            train: accepted for a uniform interface; hash routing is the same in both modes.
            noise: must be None (there are no router scores to perturb).
            ids: integer ids with shape ``x.shape[:-1]``; None hashes each row's content.

        Returns:
            y with x's shape; sets ``stats`` (``aux_loss`` stays 0).
        """
        if noise is not None:
            raise ValueError("noise must be None: hash routing has no router scores to perturb")
        x2, shape = self._start_forward(x, train)
        T, E, k = x2.shape[0], self.n_experts, self.k
        if ids is None:
            keys = content_ids(x2)
        else:
            ids = np.asarray(ids)
            if ids.shape != shape[:-1]:
                raise ValueError(f"ids must have shape {shape[:-1]} (one id per token of x), got {ids.shape}")
            keys = ids.reshape(-1)
        idx = hash_route(keys, E, k, self.seed)
        gates = np.full((T, k), 1.0 / k, dtype=self.dtype)
        C = expert_capacity(T, E, k, self.capacity_factor)
        p = self.params
        y, dcache = dispatch_combine_forward(x2, idx, gates, p["W1"], p["b1"], p["W2"], p["b2"], **self._glu_params(),
                                             capacity=C, activation=self.activation)
        self._finish_forward(HashCache(shape, dcache), self._routing_stats(idx, gates, dcache.plan))
        return y.reshape(shape)

    def backward(self, dy):
        """Gradient of ⟨dy, y⟩: dx (x's shape); fills ``grads``. The fixed gates get none."""
        c, dy2 = self._start_backward(dy)
        dx, _, grads = dispatch_combine_backward(dy2, c.dispatch)
        self._store_grads(grads)
        return dx.reshape(c.shape)
