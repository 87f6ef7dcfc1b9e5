"""Appointment books: capacity, sort-based dispatch to the experts, and the combine back.

After the GP has referred each patient (token) to k specialists, every
specialist must see *its* patients together, in one sitting: one pair of matmuls
per expert on a contiguous block of rows, not one tiny matmul per token. So:

1. **plan** — flatten the T·k (token, expert) assignments and sort them by
   expert with **one stable argsort**; each expert's patients are now a
   contiguous group, delimited by ``offsets (E+1,)``;
2. **capacity** — each specialist has ``C = ceil(capacity_factor · T · k / E)``
   appointments (GShard, Lepikhin et al. 2020 §2.2; Switch, Fedus et al. 2021 §2.2).
   Assignments beyond C are **dropped**: that patient gets no output from that
   specialist (``y`` gets 0 from it; the residual connection around the layer
   carries the token on);
3. **dispatch** — gather the kept tokens into the grouped array ``x_g (N,d)``;
4. **experts** — ``experts.experts_forward`` runs each expert once on its group;
5. **combine** — ``y_t = Σ_j G_tj · FFN_{idx_tj}(x_t)`` over the kept slots.

**Drop priority** (who gets an appointment when the book is full): first all
*first choices*, then all second choices, and so on (a patient's primary referral
beats another patient's second opinion, as in GShard's top-2 gating); within the
same choice rank, **earlier tokens first** (first come, first served). This rule
depends only on the top-k indices and token positions, never on gate values, so
capacity adds no kinks of its own: the kept set changes only when the selection does.

Combine without ``np.add.at``: each token owns exactly k slots, so the weighted
expert outputs are scattered (no repeated indices) into a ``(T·k, d)`` array in
flat assignment order and summed over the k axis of its ``(T, k, d)`` view.

Shapes: T tokens, d width, E experts, k slots per token, N kept assignments (≤ T·k).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from .experts import experts_backward, experts_forward
from ..validate import check_int, check_positive_float, check_shapes

__all__ = [
    "expert_capacity", "DispatchPlan", "make_plan",
    "GatherCache", "CombineCache", "DispatchCache", "dispatch_forward", "dispatch_backward", "combine_forward", "combine_backward",
    "dispatch_combine_forward", "dispatch_combine_backward",
]


def expert_capacity(n_tokens, n_experts, k, capacity_factor):
    """Appointments per expert, ``C = ceil(capacity_factor · T · k / E)``; None means unlimited.

    The product is rounded to 9 decimals before the ceiling so that float error
    cannot add a slot (with T=100, k=1, E=10, ``1.1 * 100 / 10`` is
    11.000000000000002 in floats, but C should be 11), and C is at least 1.
    """
    T = check_int("n_tokens", n_tokens, low=1)
    E = check_int("n_experts", n_experts, low=1)
    k = check_int("k", k, low=1, high=E)
    if capacity_factor is None:
        return None
    cf = check_positive_float("capacity_factor", capacity_factor)
    return max(1, math.ceil(round(cf * T * k / E, 9)))


class DispatchPlan(NamedTuple):
    """Which rows go where. Non-differentiable bookkeeping, computed from ``idx`` alone."""
    order: np.ndarray    # (N,) flat ids a = t·k + j of the kept assignments, grouped by expert
    token: np.ndarray    # (N,) the token of each grouped row (= order // k)
    offsets: np.ndarray  # (E+1,) expert e owns grouped rows offsets[e]:offsets[e+1]
    kept: np.ndarray     # (T,k) bool, False where capacity dropped the assignment
    load: np.ndarray     # (E,) int, assignments each expert actually processes
    dropped: int         # T·k − N
    capacity: int | None


def make_plan(idx, n_experts, capacity=None):
    """Group the assignments by expert with one stable sort, and apply capacity.

    Args:
        idx: (T, k) int, chosen experts per token (no repeats within a row).
        n_experts: E.
        capacity: C (int ≥ 1), or None for no dropping.

    Returns:
        a :class:`DispatchPlan`.
    """
    E = check_int("n_experts", n_experts, low=1)
    idx = np.asarray(idx)
    if idx.ndim != 2 or not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"idx must be a (T, k) integer array, got {idx.dtype} {idx.shape}")
    if idx.size and (idx.min() < 0 or idx.max() >= E):
        raise ValueError(f"idx must hold expert numbers in [0, {E}), got {idx.min()}..{idx.max()}")
    if capacity is not None:
        capacity = check_int("capacity", capacity, low=1)
    T, k = idx.shape
    expert = idx.reshape(-1)
    # Sort key (expert, choice rank j); the stable sort keeps token order within a key.
    key = expert * k + np.tile(np.arange(k), T)
    order = np.argsort(key, kind="stable")
    requested = np.bincount(expert, minlength=E)
    if capacity is None or requested.max(initial=0) <= capacity:
        load = requested
    else:
        starts = np.cumsum(requested) - requested            # first row of each expert's group
        rank = np.arange(order.size) - starts[expert[order]]  # place in the expert's queue
        order = order[rank < capacity]
        load = np.minimum(requested, capacity)
    kept = np.zeros(T * k, dtype=bool)
    kept[order] = True
    offsets = np.concatenate([[0], np.cumsum(load)])
    return DispatchPlan(order, order // k, offsets, kept.reshape(T, k), load,
                        int(T * k - order.size), capacity)


# --------------------------------------------------------------------------- dispatch (gather)
def _sum_slots(rows, plan, dtype):
    """Scatter grouped rows (N,d) to their flat slots (T·k, d) and sum each token's k slots.

    A dropped slot stays 0, so a token all of whose assignments were dropped gets 0.
    """
    T, k = plan.kept.shape
    full = np.zeros((T * k, rows.shape[1]), dtype=dtype)
    full[plan.order] = rows          # indices are unique: a plain scatter, no np.add.at
    return full.reshape(T, k, -1).sum(axis=1)


class GatherCache(NamedTuple):
    plan: DispatchPlan
    shape: tuple         # (T, d) of x
    dtype: np.dtype


def dispatch_forward(x, plan):
    """Gather the kept tokens into expert order: x (T,d) -> x_g (N,d), ``x_g = x[plan.token]``."""
    return np.take(x, plan.token, axis=0), GatherCache(plan, x.shape, x.dtype)


def dispatch_backward(dxg, cache):
    """A gathered token gets back the sum of its copies' gradients: dx_g (N,d) -> (dx (T,d), {})."""
    return _sum_slots(dxg, cache.plan, cache.dtype), {}


# --------------------------------------------------------------------------- combine (scatter)
class CombineCache(NamedTuple):
    yg: np.ndarray    # (N,d) expert outputs, grouped
    g: np.ndarray     # (N,) gate of each grouped row
    plan: DispatchPlan
    shape: tuple      # (T, k) of the gates


def combine_forward(yg, gates, plan):
    """Weighted sum back to tokens: ``y_t = Σ_j kept_tj · G_tj · y_g[row(t,j)]``.

    Args:
        yg: (N, d) expert outputs in grouped order.
        gates: (T, k) gate values.
        plan: the :class:`DispatchPlan`.

    Returns:
        y (T, d) — zero for a token all of whose assignments were dropped — and the cache.
    """
    g = gates.reshape(-1)[plan.order]
    y = _sum_slots(yg * g[:, None], plan, yg.dtype)
    return y, CombineCache(yg, g, plan, gates.shape)


def combine_backward(dy, cache):
    """``dy_g = G · dy[token]`` and ``dG_tj = ⟨dy_t, y_g[row(t,j)]⟩`` (0 for dropped slots).

    Returns dyg (N,d), dgates (T,k) — one gradient per input, in the forward's order —
    and ``{}`` (no parameters).
    """
    yg, g, plan, shape = cache
    dy_rows = np.take(dy, plan.token, axis=0)                 # (N,d): each row's token gradient
    dgates = np.zeros(shape[0] * shape[1], dtype=yg.dtype)
    dgates[plan.order] = np.einsum("nd,nd->n", dy_rows, yg)
    return dy_rows * g[:, None], dgates.reshape(shape), {}


# --------------------------------------------------------------------------- the whole trip
class DispatchCache(NamedTuple):
    plan: DispatchPlan
    gather: GatherCache
    experts: tuple
    combine: CombineCache


def dispatch_combine_forward(x, idx, gates, W1, b1, W2, b2, *, capacity=None, activation="relu", W3=None, b3=None):
    """Plan, dispatch, run every expert once on its group, combine.

    Args:
        x: (T, d) tokens.
        idx: (T, k) int chosen experts; gates: (T, k) their weights.
        W1 (E,d,h), b1 (E,h), W2 (E,h,d), b2 (E,d): the expert bank.
        capacity: C per expert (int), or None for no dropping.
        activation: "relu", "gelu" or "swiglu" (then W3 (E,d,h) and b3 (E,h) too).

    Returns:
        y (T, d) and the cache; ``cache.plan`` holds kept, load and dropped.
    """
    check_shapes(x=(x, ("T", "d")), gates=(gates, ("T", np.shape(idx)[-1])))
    plan = make_plan(idx, W1.shape[0], capacity)
    xg, gcache = dispatch_forward(x, plan)
    yg, ecache = experts_forward(xg, plan.offsets, W1, b1, W2, b2, activation, W3=W3, b3=b3)
    y, ccache = combine_forward(yg, gates, plan)
    return y, DispatchCache(plan, gcache, ecache, ccache)


def dispatch_combine_backward(dy, cache):
    """Backward of :func:`dispatch_combine_forward`: the three steps in reverse.

    Returns:
        dx (T, d), dgates (T, k), and ``{"W1", "b1", "W2", "b2"}`` (the expert bank's gradients).
    """
    dyg, dgates, _ = combine_backward(dy, cache.combine)
    dxg, grads = experts_backward(dyg, cache.experts)
    dx, _ = dispatch_backward(dxg, cache.gather)
    return dx, dgates, grads
