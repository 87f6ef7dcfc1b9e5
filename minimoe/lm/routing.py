"""What the experts of a language model learn on real text: routing read character by character.

:func:`route_windows` runs a trained :class:`~minimoe.lm.model.MoELM` in eval mode over
fixed windows of text and keeps, for every block, the experts each character was sent to.
Three readings of that routing follow Mixtral (Jiang et al. 2024, §5):

* :func:`expert_information` — the mutual information between the expert of each
  (character, expert) assignment and the character's **domain** (prose or code) and its
  **type** (letter, indentation, bracket, … : :data:`~minimoe.lm.text.TYPE_NAMES`), with
  the labels' entropies, so ``I / H`` is the share of the label's uncertainty the expert
  removes. Mixtral found expert choice barely depends on the domain but follows token
  types; a hash-routed model (routing a fixed function of the character) is the baseline
  any such claim must beat (lesson 09).
* :func:`same_expert_fraction` — Mixtral's "consecutive tokens" measure: the share of
  positions whose first-choice expert is also the next position's, per domain, beside the
  share two independent characters would get by chance, ``Σ_e p_e²``.
* the coloured text of :func:`minimoe.course.viz.plot_expert_text` (Mixtral's Fig. 8).

All information quantities are in nats. Shapes: W windows of S characters, L blocks, k experts per token.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import corpus, text
from ..validate import check_int

__all__ = ["RoutedText", "route_windows", "route_snippet", "expert_information", "same_expert_fraction", "chance_same_expert"]


class RoutedText(NamedTuple):
    """The routing of W windows of S characters.

    ids (W, S) the characters; types (W, S) their :data:`~minimoe.lm.text.TYPE_NAMES` index;
    domain (W,) 0 prose / 1 code; experts (L, W, S, k) the experts of each character in each
    block, first choice first (-1 where capacity dropped the assignment); n_experts per block.
    """
    ids: np.ndarray
    types: np.ndarray
    domain: np.ndarray
    experts: np.ndarray
    n_experts: tuple


def route_windows(model, windows, batch_size=64):
    """Run ``model`` (eval mode) over ``windows`` and record every block's routing.

    Args:
        model: an MoELM whose blocks all route (no dense block).
        windows: ``[(inputs (W_i, S), types (W_i, S), domain int), ...]`` — e.g. one entry per
            domain from :func:`minimoe.lm.text.eval_windows`.
        batch_size: windows per forward.

    Returns:
        a :class:`RoutedText` over all the windows, in the order given.
    """
    B = check_int("batch_size", batch_size, low=1)
    ids, types, domain, experts = [], [], [], []
    for inputs, typ, dom in windows:
        inputs, typ = np.asarray(inputs), np.asarray(typ)
        if inputs.ndim != 2 or typ.shape != inputs.shape:
            raise ValueError(f"each window set needs inputs (W, S) and types of the same shape, got "
                             f"{inputs.shape} and {typ.shape}")
        for s in range(0, len(inputs), B):                   # a loop over batches of windows
            x = inputs[s:s + B]
            model.forward(x, train=False)
            per_block = []
            for i, block in enumerate(model.blocks):
                st = block.stats
                if "topk_idx" not in st:
                    raise ValueError(f"block {i} has a dense FFN: there is no routing to read")
                idx, kept = np.asarray(st["topk_idx"]), np.asarray(st["kept"], dtype=bool)
                per_block.append(np.where(kept, idx, -1).reshape(x.shape + (idx.shape[-1],)))
            experts.append(np.stack(per_block))
        ids.append(inputs)
        types.append(typ)
        domain.append(np.full(len(inputs), int(dom)))
    return RoutedText(np.concatenate(ids), np.concatenate(types), np.concatenate(domain),
                      np.concatenate(experts, axis=1),
                      tuple(int(getattr(b.ffn, "n_experts", 0)) for b in model.blocks))


def route_snippet(model, ids, layer=0):
    """First-choice expert of every character of one text in block ``layer``: (N,) int.

    The text is cut into consecutive windows of ``model.max_len`` characters (the last one
    shorter), so each character is routed with up to max_len − 1 characters of context.
    """
    ids = np.asarray(ids)
    if ids.ndim != 1 or ids.size == 0:
        raise ValueError(f"ids must be a non-empty 1-D array, got shape {ids.shape}")
    layer = check_int("layer", layer, low=0, high=len(model.blocks) - 1)
    S, out = model.max_len, []
    n_full = ids.size // S
    pieces = ([ids[:n_full * S].reshape(n_full, S)] if n_full else []) + \
        ([ids[n_full * S:][None]] if ids.size % S else [])
    for x in pieces:                                     # at most two forwards
        model.forward(x, train=False)
        st = model.blocks[layer].stats
        if "topk_idx" not in st:
            raise ValueError(f"block {layer} has a dense FFN: there is no routing to read")
        first = np.where(np.asarray(st["kept"])[:, 0], np.asarray(st["topk_idx"])[:, 0], -1)
        out.append(first)
    return np.concatenate(out)


def expert_information(routed, layer):
    """Mutual information between block ``layer``'s experts and each character's domain and type.

    Counted over the kept (character, expert) assignments (all k of them), as lesson 09's
    ``expert_usage``. Returns a dict: ``mi_domain``, ``mi_type`` (nats), ``h_domain``,
    ``h_type`` (the labels' entropies over the same assignments), ``frac_domain = mi/h``,
    ``frac_type``, ``n`` assignments, and the count tables ``counts_domain (E, 2)`` and
    ``counts_type (E, n_types)``.
    """
    layer = check_int("layer", layer, low=0, high=routed.experts.shape[0] - 1)
    e = routed.experts[layer]                                 # (W, S, k)
    kept = e >= 0
    k = e.shape[-1]
    expert = e[kept]
    dom = np.broadcast_to(routed.domain[:, None, None], e.shape)[kept]
    typ = np.broadcast_to(routed.types[..., None], e.shape)[kept]
    E, K = routed.n_experts[layer], len(text.TYPE_NAMES)
    out = {"layer": layer, "k": k, "n": int(expert.size),
           "mi_domain": corpus.mutual_information(expert, dom), "mi_type": corpus.mutual_information(expert, typ),
           "h_domain": corpus.entropy(dom), "h_type": corpus.entropy(typ),
           "counts_domain": np.bincount(expert * 2 + dom, minlength=E * 2).reshape(E, 2),
           "counts_type": np.bincount(expert * K + typ, minlength=E * K).reshape(E, K)}
    out["frac_domain"] = out["mi_domain"] / out["h_domain"] if out["h_domain"] > 0 else float("nan")
    out["frac_type"] = out["mi_type"] / out["h_type"] if out["h_type"] > 0 else float("nan")
    return out


def same_expert_fraction(first, domain, n_domains=2):
    """Share of positions whose first-choice expert is the next position's, per domain.

    Only pairs inside a window count (the last character of a window has no next one here),
    and pairs where either choice was dropped (-1) are left out.

    Args:
        first: (W, S) int first-choice expert of each character (-1: dropped).
        domain: (W,) int domain of each window.  n_domains: how many domains.

    Returns:
        (n_domains,) float: the fraction per domain (NaN for a domain with no pair).
    """
    first, domain = np.asarray(first), np.asarray(domain)
    if first.ndim != 2 or domain.shape != first.shape[:1]:
        raise ValueError(f"first must be (W, S) and domain (W,), got {first.shape} and {domain.shape}")
    valid = (first[:, :-1] >= 0) & (first[:, 1:] >= 0)         # (W, S-1)
    same = (first[:, :-1] == first[:, 1:]) & valid
    n_same = np.bincount(domain, weights=same.sum(axis=1), minlength=n_domains)
    n_pairs = np.bincount(domain, weights=valid.sum(axis=1), minlength=n_domains)
    with np.errstate(invalid="ignore", divide="ignore"):
        return n_same / n_pairs


def chance_same_expert(first, domain, n_experts, n_domains=2):
    """``Σ_e p_e²`` per domain: the share of pairs that would share a first choice if the
    experts of two characters were drawn independently from the domain's expert load."""
    first, domain = np.asarray(first), np.asarray(domain)
    dom = np.broadcast_to(domain[:, None], first.shape)
    keep = first >= 0
    counts = np.bincount(dom[keep] * n_experts + first[keep], minlength=n_domains * n_experts)
    p = counts.reshape(n_domains, n_experts).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        p /= p.sum(axis=1, keepdims=True)
    return np.sum(p ** 2, axis=1)
