"""Chapter 4 — a tiny MoE language model: where the specialists sit in a transformer.

    norm.py         layer normalisation
    attention.py    causal multi-head self-attention
    embedding.py    token and position embeddings
    transformer.py  the pre-LN MoE transformer block (any of minimoe's MoE layers inside)
    corpus.py       synthetic clinic notes from a small grammar, and mutual information
    model.py        ``MoELM``: the whole model and its whole-model gradient check
    train.py        training, sampling and reading which expert serves which word
"""
from . import corpus  # noqa: F401
from .model import MoELM  # noqa: F401
from .transformer import MoETransformerBlock  # noqa: F401
