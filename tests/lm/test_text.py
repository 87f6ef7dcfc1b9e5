"""The real-text corpus read from the running Python: characters, types, document splits, windows."""
import os
import sysconfig
import zlib

import numpy as np
import pytest

from minimoe.lm import text
from minimoe.lm.text import OTHER, TYPE_NAMES, VOCAB, char_types, decode, encode, split_of


@pytest.fixture(scope="module")
def corpus():
    return text.load_text()


# --------------------------------------------------------------------------- characters
def test_vocabulary_is_the_newline_printable_ascii_and_other():
    assert len(VOCAB) == 97 and len(set(VOCAB)) == 97
    assert VOCAB[0] == "\n" and VOCAB[1] == " " and VOCAB[95] == "~" and OTHER == 96


def test_encode_decode_round_trip_and_other():
    s = "def f(x):\n    return x['a'] + 1  # ~ok\n"
    ids = encode(s)
    assert ids.dtype == np.int64 and ids.shape == (len(s),)
    assert decode(ids) == s
    assert encode("a\tb\u00e9")[[1, 3]].tolist() == [OTHER, OTHER]           # a tab and a non-ASCII letter
    assert encode("A")[0] == ord("A") - 31                                # printable ASCII in order


def test_typographic_characters_read_as_ascii():
    assert decode(encode("don\u2019t \u201cquote\u201d \u2013 x\u2026")) == "don't \"quote\" - x..."


def test_encode_and_decode_reject_bad_input():
    with pytest.raises(TypeError, match="text must be a str"):
        encode(b"bytes")
    with pytest.raises(ValueError, match="ids"):
        decode(np.array([97]))
    with pytest.raises(ValueError, match="1-dimensional"):
        decode(np.zeros((2, 2), dtype=np.int64))


def test_types_of_a_hand_labelled_line():
    s = "  x_1 = A[0] + 'b';\n    c\n"
    want = ["indent", "indent", "lower", "underscore", "digit", "space", "operator", "space", "capital",
            "bracket", "digit", "bracket", "space", "operator", "space", "quote", "lower", "quote",
            "punctuation", "newline", "indent", "indent", "indent", "indent", "lower", "newline"]
    assert [TYPE_NAMES[t] for t in char_types(encode(s))] == want


def test_spaces_after_text_are_not_indentation_and_an_empty_text_has_no_types():
    assert [TYPE_NAMES[t] for t in char_types(encode("a  b"))] == ["lower", "space", "space", "lower"]
    assert char_types(np.array([], dtype=np.int64)).shape == (0,)
    with pytest.raises(ValueError, match="1-dimensional"):
        char_types(np.zeros((2, 3), dtype=np.int64))


# --------------------------------------------------------------------------- documents and splits
def test_prose_is_the_pydoc_topics_and_code_the_top_level_stdlib_sorted():
    from pydoc_data.topics import topics
    prose = text.read_documents("prose")
    assert [n for n, _ in prose] == sorted(topics) and dict(prose) == topics
    folder = sysconfig.get_paths()["stdlib"]
    code = text.read_documents("code")
    names = [n for n, _ in code]
    assert names == sorted(names) and all(n.endswith(".py") for n in names)
    assert "os.py" in names and not any("/" in n for n in names)             # top level only
    assert dict(code)["os.py"].startswith(open(os.path.join(folder, "os.py"), encoding="utf-8").read()[:200])
    with pytest.raises(ValueError, match="domain"):
        text.read_documents("poetry")


def test_split_of_is_a_crc32_cut_of_the_name():
    for name in ("os.py", "assignment", "zipfile.py"):
        u = zlib.crc32(name.encode()) / 2**32
        assert split_of(name) == (0 if u < 0.8 else 1 if u < 0.9 else 2)
    assert split_of("os.py", (0.0, 0.0, 1.0)) == 2 and split_of("os.py", (1.0, 0.0, 0.0)) == 0
    with pytest.raises(ValueError, match="fractions must be three non-negative numbers summing to 1"):
        split_of("os.py", (0.5, 0.5, 0.5))
    with pytest.raises(TypeError, match="name must be a str"):
        split_of(3)


def test_no_document_is_in_two_splits_and_every_document_is_somewhere(corpus):
    for domain in text.DOMAINS:
        names = [set(corpus.split(s, domain).names) for s in text.SPLITS]
        assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
        assert set.union(*names) == {n for n, _ in text.read_documents(domain)}
        for s, group in zip(text.SPLITS, names):
            assert all(text.SPLITS[split_of(n)] == s for n in group)
        assert all(len(g) >= 1 for g in names)


def test_a_split_is_its_documents_joined_by_a_blank_line(corpus):
    docs = dict(text.read_documents("prose"))
    part = corpus.split("val", "prose")
    assert part.starts[0] == 0 and part.ids.shape == part.types.shape
    for i, name in enumerate(part.names):
        want = encode(docs[name] + "\n\n")
        np.testing.assert_array_equal(part.ids[part.starts[i]:part.starts[i] + want.size], want)
    assert part.starts[-1] + encode(docs[part.names[-1]] + "\n\n").size == part.ids.size
    np.testing.assert_array_equal(part.types[:500], char_types(part.ids[:500]))


def test_the_corpus_records_its_python_and_has_the_sizes_of_the_issue(corpus):
    import platform
    assert corpus.python == platform.python_version() == text.python_version()
    sizes = corpus.sizes()
    prose, code = sum(sizes["prose"].values()), sum(sizes["code"].values())
    assert 300_000 < prose < 1_000_000 and 2_000_000 < code < 10_000_000     # ~465k and ~4.7M in 3.11
    assert sizes["code"]["train"] > sizes["code"]["val"] > 0
    with pytest.raises(ValueError, match="split"):
        corpus.split("dev", "prose")


# --------------------------------------------------------------------------- windows
def test_batches_draw_half_from_each_stream_with_shifted_targets():
    a, b = np.arange(50) % 97, (np.arange(60) + 40) % 97
    out = list(text.batches([a, b], 6, 5, 3, n_batches=2))
    assert len(out) == 2
    x, y, dom = out[0]
    assert x.shape == y.shape == (6, 5) and dom.tolist() == [0, 0, 0, 1, 1, 1]
    np.testing.assert_array_equal(y[:, :-1], x[:, 1:])
    assert set(x[:3].ravel()) <= set(a.tolist()) and np.all(x[3:] >= 40)
    again = list(text.batches([a, b], 6, 5, 3, n_batches=2))
    np.testing.assert_array_equal(out[1][0], again[1][0])                    # the same seed, the same batches


def test_batches_reject_bad_arguments():
    a = np.arange(20)
    with pytest.raises(ValueError, match="multiple of the number of streams"):
        text.batches([a, a], 5, 4, 0)
    with pytest.raises(ValueError, match="fewer than seq_len"):
        text.batches([a, a[:4]], 4, 4, 0)
    with pytest.raises(ValueError, match="at least one"):
        text.batches([], 4, 4, 0)


def test_eval_windows_are_evenly_spaced_and_fixed():
    ids = np.arange(101) % 97
    x, y, pos = text.eval_windows(ids, 10, 10)
    assert x.shape == (10, 10) and pos[0, 0] == 0 and pos[-1, -1] == 99
    np.testing.assert_array_equal(x, ids[pos])
    np.testing.assert_array_equal(y, ids[pos + 1])
    assert np.all(np.diff(pos[:, 0]) >= 10)                                   # no overlap when they fit
    with pytest.raises(ValueError, match="at least seq_len"):
        text.eval_windows(ids[:5], 10, 1)


def test_snippets_are_a_paragraph_and_a_whole_function_of_test_documents(corpus):
    snip = text.snippets(corpus)
    (pname, prose), (cname, code) = snip["prose"], snip["code"]
    assert pname in corpus.split("test", "prose").names and cname in corpus.split("test", "code").names
    assert 200 <= len(prose) <= 480 and "\n\n" not in prose
    assert code.startswith("def ") and len(code) <= 480
    compile(code, "<snippet>", "exec")                                        # a whole function
    assert snip == text.snippets(corpus)
