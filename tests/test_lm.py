"""The tiny MoE language model: whole-model gradient checks, quick training on the clinic notes,
sampling, and the expert-versus-token-class analysis."""
import numpy as np
import pytest

from minimoe import corpus
from minimoe.hash_router import HashMoELayer, hash_route
from minimoe.lm import MoELM, QUICK, check_lm_gradients, evaluate_lm, expert_usage, quick_lm, sample, train_lm


def _tiny(rng, ffn="moe", **kw):
    """A model small enough for a per-entry check of every parameter (V=5, d=4, 2 blocks)."""
    args = dict(vocab_size=5, d_model=4, n_heads=2, n_layers=2, max_len=3, rng=rng)
    if not callable(ffn):
        args.update(d_hidden=2, n_experts=3, k=2)
    args.update(kw)
    model = MoELM(ffn=ffn, **args)
    for name, p in model.params.items():          # move parameters off their neat initial values
        if name.endswith(("beta", "b_qkv", "b_o", ".b1", ".b2", "readout.b")):
            p[:] = 0.1 * rng.standard_normal(p.shape)
        elif name.endswith("gamma"):
            p[:] = 1.0 + 0.1 * rng.standard_normal(p.shape)
        elif name.endswith("W_gate"):
            p[:] = 0.5 * rng.standard_normal(p.shape)
    model.params["readout.W"][:] *= 2.0
    return model


# --------------------------------------------------------------------------- whole-model gradient checks
# Whole-model finite differences sit close to float64's floor: the loss is O(1), so at h = 1e-6
# each numerical entry carries ~1e-10 of rounding, and a parameter array whose gradient norm is
# ~0.02 reaches the 1e-8 normwise limit. Over 20 seeds of these fixtures the worst normwise
# error at h = 1e-6 ranged from 1e-9 to 3e-7; the seed below has a ≥ 5x margin at both steps
# (and elementwise every entry passes for every seed). The block-level checks in
# test_transformer.py cover each router kind (hash, expert choice, ...) with comfortable margins.
def test_whole_lm_gradcheck_token_choice_with_aux_loss():
    rng = np.random.default_rng(0)
    model = _tiny(rng, ffn="moe", noisy=False, gate="switch", balance="switch")
    ids, targets = rng.integers(0, 5, size=(1, 3)), rng.integers(0, 5, size=(1, 3))
    reports = check_lm_gradients(model, ids, targets)
    assert {r.name for r in reports} == set(model.params) and len(model.blocks) == 2
    assert model.aux_loss > 0


def test_hash_blocks_route_by_the_token_ids(rng):
    """The model hands its token ids to every hash-routed block (Roller et al. hash the word itself)."""
    model = MoELM(12, d_model=4, n_heads=1, n_layers=2, max_len=5, ffn="hash", d_hidden=4, n_experts=4, k=1,
                  rng=rng)
    ids = rng.integers(0, 12, size=(3, 5))
    model.forward(ids)
    for block in model.blocks:
        np.testing.assert_array_equal(block.stats["topk_idx"], hash_route(ids.reshape(-1), 4, 1))


def test_check_lm_gradients_catches_a_wrong_backward(rng):
    from minimoe.gradcheck import GradCheckError

    model = _tiny(rng, ffn="dense", n_layers=1)
    ids, targets = rng.integers(0, 5, size=(1, 3)), rng.integers(0, 5, size=(1, 3))
    original = model.ln_f.backward
    model.ln_f.backward = lambda dy: 2.0 * original(dy)        # a factor-2 bug below the readout
    with pytest.raises(GradCheckError, match="embed.W"):
        check_lm_gradients(model, ids, targets, h=1e-5)


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


def test_counts(rng):
    model = MoELM(20, d_model=8, n_heads=2, n_layers=2, max_len=5, ffn="moe", d_hidden=8, n_experts=4, k=1, rng=rng)
    block = model.blocks[0]
    assert model.n_params == 20 * 8 + 5 * 8 + 2 * block.n_params + 2 * 8 + 8 * 20 + 20
    assert model.n_active_params == model.n_params - 20 * 8 + 8 - 2 * (block.n_params - block.n_active_params)
    assert model.flops_per_token() == 2 * block.flops_per_token() + 2 * 8 * 20
    f32 = MoELM(20, d_model=8, n_heads=2, n_layers=1, max_len=5, d_hidden=8, dtype=np.float32, rng=rng)
    ids = rng.integers(0, 20, size=(2, 5))
    assert f32.forward(ids).dtype == np.float32 and np.isfinite(f32.forward_loss(ids, ids))
    f32.backward()
    assert all(g.dtype == np.float32 for g in f32.grads.values())
    dense = MoELM(20, d_model=8, n_heads=2, n_layers=1, max_len=5, ffn="dense", rng=rng)
    with pytest.raises(ValueError, match="vocabulary"):
        expert_usage(dense, np.arange(10), layer=0)


# --------------------------------------------------------------------------- bad input
def test_bad_configurations_and_input_are_rejected(rng):
    with pytest.raises(ValueError, match="n_layers must be >= 1"):
        MoELM(10, n_layers=0)
    with pytest.raises(ValueError, match="ffn must be one of"):
        MoELM(10, ffn="mystery")
    with pytest.raises(TypeError, match="only apply when ffn is a kind name"):
        MoELM(10, d_model=4, ffn=lambda i, r: HashMoELayer(4, 4, 2, rng=r), d_hidden=4)
    model = _tiny(rng)
    with pytest.raises(ValueError, match="exceed max_len=3"):
        model.forward(np.zeros((1, 4), dtype=np.int64))
    with pytest.raises(ValueError, match=r"shape \(B, S\)"):
        model.forward(np.zeros(3, dtype=np.int64))
    with pytest.raises(ValueError, match=r"ids must be in \[0, 5\)"):
        model.forward(np.full((1, 3), 5))
    with pytest.raises(ValueError, match="one entry per block"):
        model.forward(np.zeros((1, 3), dtype=np.int64), noise=[None])
    with pytest.raises(RuntimeError, match="forward_loss before backward"):
        _tiny(rng).backward()
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
