"""Chapter 1 — the core: one MoE layer, every backward pass by hand.

Read the files in this order; each is short enough to finish in one sitting.

    layers.py     the building blocks (affine, ReLU, GELU, SiLU and SwiGLU, softmax,
                  cross-entropy), the ``forward -> (out, cache)`` /
                  ``backward(dout, cache) -> (dx, grads)`` convention and ``PairLayer``,
                  the base of the thin classes
    gradcheck.py  how every backward is shown right: central differences, the relative error,
                  the pass rule (normwise and elementwise, within the finite difference's error)
    gradcheck_guards.py  its small print: the error budget (rounding and truncation), tolerances
                  scaled to a small loss, the refusals, and the kink guard for top-k ties
    experts.py    the specialist (an FFN expert) and a bank of E of them, a plain loop over experts
    router.py     the GP: logits, learned Gaussian noise, top-k, and the dense / top-k / Switch
                  gates — with the k=1 trap (a renormalised top-1 gate gives the router no gradient)
    normal.py     the standard normal's Φ and φ in NumPy (erfc to float64 precision, no loop)
    losses.py     keeping specialists from being overworked: importance (CV²), the smooth load
                  estimator with Φ and its gradient, the Switch loss (first choices, GShard; every
                  choice, HF Mixtral; every choice over k, Megatron-core), the router z-loss
    balance.py    the same losses from per-expert sums over a group of tokens: per-sequence
                  balancing (DeepSeek-V3) is sums per sequence, expert parallelism one all-reduce
                  of the sums
    dispatch.py   appointment books: the capacity C, the drop rule (which patients are turned
                  away, in which order), one sort to group tokens by expert, the combine back
    config.py     ``MoEConfig``: every option of a layer, checked once, shared by every class
    moe.py        the whole layer as one pair, ``moe_forward``/``moe_backward``, composed from the
                  pairs above; ``MoEBase`` (what every MoE layer class holds) and ``MoELayer``
    fast.py       the same dispatch and expert bank with every speed trick (workspaces, ``out=``,
                  in-place ReLU), under ``*_fast`` names; MoELayer's default, ``fast=False`` for
                  the textbook; tests/core/test_fast.py shows both agree
"""
