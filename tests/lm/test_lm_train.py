"""Training the tiny MoE language model (minimoe.lm.train): the quick mode beats the unigram
baseline, sampling, the expert-versus-token-class analysis, a deterministic training loop, bad input."""
import numpy as np
import pytest

from minimoe.lm import corpus
from minimoe.lm.model import MoELM
from minimoe.lm.train import QUICK, evaluate_lm, expert_usage, quick_lm, sample, train_lm


# --------------------------------------------------------------------------- the quick mode
@pytest.fixture(scope="module")
def quick():
    return quick_lm("moe", seed=0, progress=False)


def test_quick_mode_beats_the_unigram_baseline_clearly(quick):
    h = quick.history
    uni = corpus.unigram_cross_entropy(quick.train_ids, quick.val_ids)
    assert h.unigram == pytest.approx(uni) and 3.5 < uni < 4.3      # the baseline itself (≈ 3.9 nats)
    assert h.val_loss[-1] < uni - 1.0                                 # measured: ≈ 1.05 nats
    assert h.val_loss[-1] < h.val_loss[0] and h.step[-1] == QUICK["steps"]
    assert h.val_loss[-1] == pytest.approx(evaluate_lm(quick.model, quick.val_ids))


def test_experts_follow_token_classes_not_topics(quick):
    """Measured on 3 seeds × 6 router kinds (moe, hash, expert_choice, lossfree, shared,
    fine_grained): I(expert; class) = 0.09–0.25 nats, I(expert; topic) = 0.001–0.006 nats.
    Asserted with a wide margin on the quick model, for both blocks."""
    for layer in (0, 1):
        u = expert_usage(quick.model, quick.val_ids, quick.val_topics, layer=layer)
        assert u.mi_class > 5 * u.mi_topic
        assert u.mi_class / u.h_class > 3 * u.mi_topic / u.h_topic      # also relative to what each could be


def test_expert_usage_tables_are_consistent(quick):
    model, ids, topics = quick.model, quick.val_ids, quick.val_topics
    u = expert_usage(model, ids, topics, layer=1)
    S, k = model.max_len, 2
    n_tokens = (len(ids) - 1) // S * S
    assert u.n_assignments == n_tokens * k                      # no capacity: every assignment kept
    E = model.blocks[1].ffn.n_experts
    assert u.counts_class.shape == (E, len(corpus.CLASS_NAMES)) and u.counts_token.shape == (E, len(corpus.VOCAB))
    for table in (u.counts_class, u.counts_topic, u.counts_token):
        assert table.sum() == u.n_assignments
    np.testing.assert_array_equal(u.counts_class.sum(axis=1), u.counts_token.sum(axis=1))
    # Each class's column is the sum of its words' columns.
    np.testing.assert_array_equal(u.counts_class[:, 3], u.counts_token[:, corpus.TOKEN_CLASS == 3].sum(axis=1))
    # Every token counted k times, once per expert: the class totals are k × the class frequencies.
    cls = corpus.TOKEN_CLASS[ids[:n_tokens]]
    np.testing.assert_array_equal(u.counts_class.sum(axis=0), k * np.bincount(cls, minlength=len(corpus.CLASS_NAMES)))
    assert 0 <= u.mi_topic <= u.h_topic and 0 <= u.mi_class <= u.h_class <= u.mi_token + u.h_class
    none = expert_usage(model, ids, None, layer=0)
    assert none.counts_topic is None and np.isnan(none.mi_topic)


def test_sampling(quick):
    model = quick.model
    a = sample(model, "patient reports", 12, np.random.default_rng(5))
    b = sample(model, corpus.encode("patient reports"), 12, np.random.default_rng(5))
    np.testing.assert_array_equal(a, b)                           # str or ids, same seed: same text
    assert a.shape == (14,) and corpus.decode(a[:2]) == "patient reports"
    greedy = [sample(model, "referred to", 1, np.random.default_rng(s), temperature=0) for s in (0, 1)]
    np.testing.assert_array_equal(greedy[0], greedy[1])           # temperature 0 ignores the generator
    # "to" only ever precedes a specialty in the grammar; the trained model has learned that.
    assert corpus.CLASS_NAMES[corpus.TOKEN_CLASS[greedy[0][-1]]] == "specialty"
    long = sample(model, "patient", model.max_len + 3, np.random.default_rng(0))   # beyond max_len: a sliding window
    assert long.shape == (model.max_len + 4,)


# --------------------------------------------------------------------------- training loop
def test_training_is_deterministic_and_nudges_loss_free_biases():
    ids = corpus.generate_corpus(60, np.random.default_rng(0))
    runs = []
    for _ in range(2):
        model = MoELM(len(corpus.VOCAB), d_model=8, n_heads=2, n_layers=1, max_len=8, ffn="lossfree",
                      d_hidden=8, n_experts=4, k=1, bias_update_rate=0.01, rng=np.random.default_rng(3))
        hist = train_lm(model, ids, steps=6, batch_size=4, eval_every=3, seed=7, progress=False)
        runs.append((hist, model))
    (h1, m1), (h2, m2) = runs
    assert h1.train_loss == h2.train_loss and h1.val_loss == h2.val_loss and h1.step == [3, 6]
    np.testing.assert_array_equal(m1.params["block0.ffn.W1"], m2.params["block0.ffn.W1"])
    bias = m1.blocks[0].ffn.bias
    assert np.all(np.abs(bias) <= 6 * 0.01 + 1e-12) and np.any(bias != 0)    # six nudges of ±0.01 at most
    assert len(h1.load_cv[0]) == 1 and h1.aux_loss == [0.0, 0.0]


# --------------------------------------------------------------------------- bad input
def test_bad_input_to_training_sampling_and_analysis(rng):
    model = MoELM(5, d_model=4, n_heads=2, n_layers=2, max_len=3, d_hidden=2, n_experts=3, k=2, rng=rng)
    with pytest.raises(ValueError, match="temperature"):
        sample(model, np.array([1, 2]), 3, rng, temperature=-1.0)
    with pytest.raises(ValueError, match="non-empty"):
        sample(model, np.array([], dtype=np.int64), 3, rng)
    with pytest.raises(ValueError, match="outside the 80-word vocabulary"):
        sample(model, "patient sneezes", 3, rng)
    lm = MoELM(len(corpus.VOCAB), d_model=4, n_heads=1, n_layers=1, max_len=4, d_hidden=4, rng=rng)
    ids = corpus.generate_corpus(5, np.random.default_rng(0))
    with pytest.raises(ValueError, match="topics must have the shape of ids"):
        expert_usage(lm, ids, ids[:-1])
    with pytest.raises(ValueError, match=r"topics must be in \[0, 4\)"):
        expert_usage(lm, ids, np.full(ids.shape, 4))
    with pytest.raises(ValueError, match="layer must be <= 0"):
        expert_usage(lm, ids, layer=1)
    with pytest.raises(ValueError, match="seq_len must be <= 4"):
        train_lm(lm, ids, steps=1, seq_len=5)
    with pytest.raises(ValueError, match="needs 5"):
        evaluate_lm(lm, ids[:3])


# --------------------------------------------------------------------------- issue 14: divergence stops
def _tiny_lm(seed=3):
    return MoELM(len(corpus.VOCAB), d_model=8, n_heads=2, n_layers=1, max_len=8, d_hidden=8, n_experts=4, k=2,
                 rng=np.random.default_rng(seed))


def test_a_learning_rate_of_1e3_stops_with_an_error_naming_it():
    # Today's failure: lr=1e3 "finished" with the loss in the millions. Now it stops and says why.
    ids = corpus.generate_corpus(200, np.random.default_rng(0))
    with pytest.raises(FloatingPointError, match=r"training diverged .*with lr=1000; lower the learning rate"), \
            np.errstate(all="ignore"):
        train_lm(_tiny_lm(), ids, steps=40, batch_size=8, lr=1e3, clip=None, progress=False)


def test_a_sane_learning_rate_trains_to_the_end():
    ids = corpus.generate_corpus(200, np.random.default_rng(0))
    hist = train_lm(_tiny_lm(), ids, steps=40, batch_size=8, lr=3e-2, progress=False)
    assert hist.step[-1] == 40 and np.all(np.isfinite(hist.train_loss))
