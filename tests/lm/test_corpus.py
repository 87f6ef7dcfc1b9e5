"""The synthetic clinic-notes corpus, its baselines, and the information helpers."""
import math

import numpy as np
import pytest

from minimoe.lm import corpus
from minimoe.lm.corpus import (
    CLASS_NAMES, TOKEN_CLASS, TOPIC_NAMES, VOCAB, batches, bigram_cross_entropy, decode, encode,
    entropy, generate_corpus, mutual_information, token_classes, unigram_cross_entropy,
    unigram_entropy,
)


# --------------------------------------------------------------------------- the corpus
def test_same_seed_same_corpus_different_seed_different():
    a = generate_corpus(50, np.random.default_rng(7))
    b = generate_corpus(50, np.random.default_rng(7))
    c = generate_corpus(50, np.random.default_rng(8))
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.int64 and not np.array_equal(a[:len(c)], c[:len(a)])


def test_every_class_and_topic_occurs():
    ids, topics = generate_corpus(200, np.random.default_rng(0), return_topics=True)
    assert set(token_classes(ids).tolist()) == set(range(len(CLASS_NAMES)))
    assert set(topics.tolist()) == set(range(len(TOPIC_NAMES)))
    assert set(ids.tolist()) == set(range(len(VOCAB)))          # every word is reachable


def test_vocabulary_is_consistent():
    assert len(VOCAB) == len(set(VOCAB)) == len(TOKEN_CLASS)
    assert all(isinstance(w, str) and " " not in w for w in VOCAB)
    assert TOKEN_CLASS.min() == 0 and TOKEN_CLASS.max() == len(CLASS_NAMES) - 1


def test_classes_of_a_hand_labelled_sentence():
    ids = encode("patient reports sharp pain in left knee for 3 days .")
    want = ["person", "verb", "quality", "symptom", "function", "side", "body_part",
            "function", "number", "duration", "punctuation"]
    assert [CLASS_NAMES[c] for c in token_classes(ids)] == want


def test_sentences_end_with_a_full_stop_and_notes_end_with_their_referral():
    rng = np.random.default_rng(3)
    ids, topics = generate_corpus(40, rng, sentences_per_note=4, return_topics=True)
    words = decode(ids).split()
    assert words[-1] == "." and words.count(".") == 40
    # The referral names the note's own specialty: checked against the topic labels.
    spec = np.flatnonzero(token_classes(ids) == CLASS_NAMES.index("specialty"))
    assert len(spec) == 10
    assert [VOCAB[ids[i]] for i in spec] == [TOPIC_NAMES[topics[i]] for i in spec]
    # Diagnoses come from their note's specialty (a hand-written sample of the pools).
    home = {"sprain": "orthopedics", "eczema": "dermatology", "angina": "cardiology", "migraine": "neurology",
            "fracture": "orthopedics", "psoriasis": "dermatology", "arrhythmia": "cardiology"}
    for i in np.flatnonzero(np.isin(ids, encode(" ".join(home)))):
        assert TOPIC_NAMES[topics[i]] == home[VOCAB[ids[i]]]


def test_topic_is_constant_within_a_note():
    ids, topics = generate_corpus(12, np.random.default_rng(5), sentences_per_note=3, return_topics=True)
    ends = np.flatnonzero(ids == encode(".")[0])
    notes = np.split(topics, ends[2::3][:-1] + 1)        # a note ends at every third full stop
    assert len(notes) == 4 and all(len(set(n.tolist())) == 1 for n in notes)


def test_round_trips():
    s = "woman denies rash and itching . referred to dermatology for eczema ."
    assert decode(encode(s)) == s
    ids = generate_corpus(30, np.random.default_rng(1))
    np.testing.assert_array_equal(encode(decode(ids)), ids)
    assert decode([]) == "" and len(encode("")) == 0


def test_corpus_bad_input_messages():
    with pytest.raises(ValueError, match=r"outside the \d+-word vocabulary: \['xray'\]"):
        encode("patient reports xray")
    with pytest.raises(TypeError, match="text must be a str"):
        encode(["patient"])
    with pytest.raises(ValueError, match=r"ids must be in \[0, \d+\)"):
        decode([len(VOCAB)])
    with pytest.raises(TypeError, match="ids must hold integer token ids"):
        decode(np.array([1.0]))
    with pytest.raises(ValueError, match="ids must be 1-dimensional"):
        decode(np.zeros((2, 2), dtype=int))
    with pytest.raises(ValueError, match="n_sentences must be >= 1"):
        generate_corpus(0, np.random.default_rng(0))
    with pytest.raises(ValueError, match="sentences_per_note must be >= 2"):
        generate_corpus(5, np.random.default_rng(0), sentences_per_note=1)
    with pytest.raises(TypeError, match="rng must be a numpy.random.Generator"):
        generate_corpus(5, "0")   # an int seed is fine (SPEC 7); a string is not


# --------------------------------------------------------------------------- batches
def test_batches_are_windows_with_shifted_targets():
    ids = np.arange(50, dtype=np.int64)                   # distinct tokens: positions are visible
    got = list(batches(ids, 4, 6, np.random.default_rng(0), n_batches=3))
    assert len(got) == 3
    for x, y in got:
        assert x.shape == y.shape == (4, 6) and x.dtype == np.int64
        np.testing.assert_array_equal(np.diff(x, axis=1), 1)    # contiguous windows
        np.testing.assert_array_equal(y, x + 1)                 # next-token targets
        assert x.min() >= 0 and y.max() <= 49
    again = list(batches(ids, 4, 6, np.random.default_rng(0), n_batches=3))
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(got, again))


def test_batches_can_reach_the_last_token_and_run_forever():
    it = batches(np.arange(4, dtype=np.int64), 64, 3, np.random.default_rng(0))
    x, y = next(it)
    np.testing.assert_array_equal(np.unique(x[:, 0]), [0])      # only one window fits
    np.testing.assert_array_equal(y[0], [1, 2, 3])
    assert next(it)[0].shape == (64, 3)


def test_batches_bad_input_fails_at_the_call_not_later():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="ids has 5 tokens; seq_len = 5 needs at least 6"):
        batches(np.arange(5), 2, 5, rng)
    with pytest.raises(TypeError, match="ids must hold integer token ids"):
        batches(np.ones(10), 2, 3, rng)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        batches(np.arange(10), 0, 3, rng)
    with pytest.raises(ValueError, match="ids must be 1-dimensional"):
        batches(np.zeros((2, 10), dtype=int), 1, 3, rng)


# --------------------------------------------------------------------------- baselines
def test_entropy_hand_computed():
    assert entropy([3, 3, 3]) == 0.0
    assert math.isclose(unigram_entropy(np.array([0, 0, 1, 1])), math.log(2))
    assert math.isclose(entropy([0, 1, 2, 3]), math.log(4))
    assert math.isclose(entropy([0, 0, 1, 2]), 1.5 * math.log(2))   # ½ ln2 + 2·¼ ln4


def test_unigram_cross_entropy_hand_computed():
    # add-one counts from [0, 0, 1] with V = 2: p = (3/5, 2/5)
    got = unigram_cross_entropy(np.array([0, 0, 1]), np.array([0, 1]), vocab_size=2, alpha=1.0)
    assert math.isclose(got, -(math.log(0.6) + math.log(0.4)) / 2)


def test_bigram_cross_entropy_hand_computed():
    # pairs in [0,1,0,1]: (0,1) twice, (1,0) once; alpha = 1, V = 2: p(1|0) = 3/4, p(0|1) = 2/3
    got = bigram_cross_entropy(np.array([0, 1, 0, 1]), np.array([0, 1, 0]), vocab_size=2, alpha=1.0)
    assert math.isclose(got, -(math.log(3 / 4) + math.log(2 / 3)) / 2)


def test_the_corpus_has_structure_beyond_word_frequencies():
    train = generate_corpus(3000, np.random.default_rng(10))
    test = generate_corpus(300, np.random.default_rng(11))
    uni, bi = unigram_cross_entropy(train, test), bigram_cross_entropy(train, test)
    # Gibbs: a cross-entropy is never below the entropy of the data it is measured on.
    assert uni >= unigram_entropy(test) - 1e-12
    assert uni < math.log(len(VOCAB))          # frequencies are not uniform...
    assert bi < 0.6 * uni                      # ...and one word of context helps a lot


# --------------------------------------------------------------------------- mutual information
def test_mutual_information_independent_is_zero():
    assert mutual_information([0, 0, 1, 1], [0, 1, 0, 1]) == 0.0


def test_mutual_information_identical_is_entropy():
    a = np.array([0, 0, 1, 2, 2, 2])
    assert math.isclose(mutual_information(a, a), entropy(a))
    assert math.isclose(mutual_information(a, 10 - a), entropy(a))     # relabelling changes nothing


def test_mutual_information_hand_computed():
    # a = [0,0,1,1], b = [0,0,0,1]: H(B) = H(¾,¼); given a=0, b is 0; given a=1, b is a fair coin.
    # I = H(B) − H(B|A) = H(¾,¼) − ½·ln 2
    h_b = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    got = mutual_information(np.array([0, 0, 1, 1]), np.array([0, 0, 0, 1]))
    assert math.isclose(got, h_b - 0.5 * math.log(2))
    assert math.isclose(mutual_information([0, 0, 0, 1], [0, 0, 1, 1]), got)   # symmetric
    assert math.isclose(mutual_information(["x", "x", "y", "y"], [True, True, True, False]), got)


def test_class_is_a_function_of_the_token_so_mi_equals_class_entropy():
    ids = generate_corpus(100, np.random.default_rng(2))
    cls = token_classes(ids)
    assert math.isclose(mutual_information(ids, cls), entropy(cls))
    assert mutual_information(ids, cls) < entropy(ids)


def test_information_bad_input_messages():
    with pytest.raises(TypeError, match="a must hold discrete labels"):
        mutual_information(np.array([0.5, 1.5]), [0, 1])
    with pytest.raises(ValueError, match=r"a and b must have the same shape.*\(3,\) and \(2,\)"):
        mutual_information([0, 1, 1], [0, 1])
    with pytest.raises(ValueError, match="b is empty"):
        mutual_information([0], np.array([], dtype=int))
    with pytest.raises(ValueError, match="alpha must be a finite number > 0"):
        unigram_cross_entropy(np.array([0]), np.array([0]), vocab_size=2, alpha=0.0)
    with pytest.raises(ValueError, match="eval_ids needs at least 2 tokens"):
        bigram_cross_entropy(np.array([0, 1]), np.array([0]), vocab_size=2)
    assert corpus.__doc__ and "nats" in corpus.__doc__
