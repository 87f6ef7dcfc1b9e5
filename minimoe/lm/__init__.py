"""Chapter 4 — a tiny MoE language model: where the specialists sit in a transformer, on synthetic and real text.

    norm.py         layer normalisation
    attention.py    causal multi-head self-attention
    embedding.py    token and position embeddings
    transformer.py  the pre-LN MoE transformer block (any of minimoe's MoE layers inside)
    corpus.py       synthetic clinic notes from a small grammar, and mutual information
    model.py        ``MoELM``: the whole model and its whole-model gradient check
    train.py        training, sampling and reading which expert serves which word
    text.py         real text from the running Python: its documentation and standard library, by character
    routing.py      what the experts learn on real text: I(expert; domain / type), same expert for the next character
    upcycle.py      sparse upcycling: a trained dense model's FFN copied into experts
    experiments.py  lesson 12's experiments: dense vs sparse at equal FLOPs, loss vs E, routing, upcycling
    __main__.py     ``python -m minimoe.lm``: the full run, its tables and figures
"""
from . import corpus  # noqa: F401
from .model import MoELM  # noqa: F401
from .transformer import MoETransformerBlock  # noqa: F401
