"""Reading a language model's routing on real text: mutual information with domain and type,
Mixtral's same-expert-next-character share and its chance level, the routing of a snippet."""
import numpy as np
import pytest

from minimoe.lm import corpus, routing, text
from minimoe.lm.model import MoELM


def _model(kind="moe", seed=0, **kw):
    return MoELM(len(text.VOCAB), d_model=8, n_heads=2, n_layers=2, max_len=6, ffn=kind, d_hidden=8,
                 n_experts=3, k=kw.pop("k", 1), rng=np.random.default_rng(seed), **kw)


def test_same_expert_fraction_by_hand():
    first = np.array([[0, 0, 1, 1],       # pairs: same, diff, same  -> 2/3
                      [2, 2, 2, -1],      # same, same, (dropped)    -> 2/2
                      [1, 0, 1, 0],       # diff x3                  -> 0/3
                      [-1, -1, 3, 3]])    # (dropped x2), same       -> 1/1
    dom = np.array([0, 1, 1, 0])
    np.testing.assert_allclose(routing.same_expert_fraction(first, dom), [3 / 4, 2 / 5])
    assert np.isnan(routing.same_expert_fraction(first[:1], np.array([0]))[1])   # no code window
    with pytest.raises(ValueError, match="first must be \\(W, S\\)"):
        routing.same_expert_fraction(first, dom[:2])


def test_chance_is_the_sum_of_squared_shares_per_domain():
    first = np.array([[0, 0, 1, 1], [2, 2, 2, -1]])
    np.testing.assert_allclose(routing.chance_same_expert(first, np.array([0, 1]), 3), [0.5, 1.0])


def test_expert_information_counts_every_kept_assignment():
    ids = np.zeros((2, 3), dtype=np.int64)
    types = np.array([[0, 1, 1], [0, 0, 2]])
    experts = np.array([[[[0, 1], [1, -1], [1, 2]],
                         [[0, 2], [0, 1], [2, -1]]]])             # (L=1, W=2, S=3, k=2)
    r = routing.RoutedText(ids, types, np.array([0, 1]), experts, (3,))
    info = routing.expert_information(r, 0)
    e = np.array([0, 1, 1, 1, 2, 0, 2, 0, 1, 2])
    t = np.array([0, 0, 1, 1, 1, 0, 0, 0, 0, 2])
    d = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1])
    assert info["n"] == 10
    assert info["mi_type"] == pytest.approx(corpus.mutual_information(e, t))
    assert info["mi_domain"] == pytest.approx(corpus.mutual_information(e, d))
    assert info["frac_domain"] == pytest.approx(info["mi_domain"] / np.log(2))
    assert info["counts_domain"].tolist() == [[1, 2], [3, 1], [1, 2]]
    assert info["counts_type"].sum() == 10 and info["counts_type"][1, 1] == 2


def test_route_windows_records_what_each_block_chose():
    m = _model(k=2)
    x = np.random.default_rng(1).integers(0, 97, (5, 6))
    types = text.char_types(x.ravel()).reshape(x.shape)
    r = routing.route_windows(m, [(x[:3], types[:3], 0), (x[3:], types[3:], 1)], batch_size=2)
    assert r.experts.shape == (2, 5, 6, 2) and r.domain.tolist() == [0, 0, 0, 1, 1] and r.n_experts == (3, 3)
    m.forward(x, train=False)
    for layer in range(2):
        np.testing.assert_array_equal(r.experts[layer].reshape(-1, 2), m.blocks[layer].stats["topk_idx"])


def test_hash_routing_is_a_function_of_the_character():
    m = _model("hash")
    x = np.tile(text.encode("abcabc"), (2, 1))
    r = routing.route_windows(m, [(x, text.char_types(x.ravel()).reshape(x.shape), 0)])
    first = r.experts[0][..., 0]
    assert np.all(first[:, :3] == first[:, 3:])                 # the same character, the same expert


def test_route_snippet_uses_consecutive_windows():
    m = _model()
    ids = text.encode("def f(x):\n    return x\n")                  # 23 characters: 3 windows of 6 and 5 more
    first = routing.route_snippet(m, ids, layer=1)
    assert first.shape == (23,)
    m.forward(ids[:18].reshape(3, 6), train=False)
    np.testing.assert_array_equal(first[:18], m.blocks[1].stats["topk_idx"][:, 0])
    m.forward(ids[18:][None], train=False)
    np.testing.assert_array_equal(first[18:], m.blocks[1].stats["topk_idx"][:, 0])
    with pytest.raises(ValueError, match="non-empty 1-D"):
        routing.route_snippet(m, ids[:0], 0)


def test_a_dense_model_has_no_routing_to_read():
    m = MoELM(len(text.VOCAB), 8, 2, 1, 6, ffn="dense", d_hidden=8)
    x = np.zeros((1, 6), dtype=np.int64)
    with pytest.raises(ValueError, match="dense FFN"):
        routing.route_windows(m, [(x, x, 0)])
    with pytest.raises(ValueError, match="dense FFN"):
        routing.route_snippet(m, x[0], 0)
