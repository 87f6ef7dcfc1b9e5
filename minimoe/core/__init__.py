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
    losses.py     keeping specialists from being overworked: importance (CV²), the smooth load
                  estimator with Φ and its gradient, the Switch loss (first choices, GShard; or
                  every choice, Mixtral), per-sequence groups (DeepSeek-V3), the router z-loss
    dispatch.py   appointment books: the capacity C, the drop rule (which patients are turned
                  away, in which order), one sort to group tokens by expert, the combine back
    moe.py        ``MoEBase`` (what every MoE layer class shares: checks, weights, counting, the
                  cache guard, stats, repr) and ``MoELayer``: router + dispatch + experts + losses
    fast.py       the same dispatch and expert bank with every speed trick (workspaces, ``out=``,
                  in-place ReLU, reused gradient buffers); MoELayer's default, ``fast=False`` for the
                  textbook; tests/core/test_fast.py shows both agree
"""
