"""The real-text experiments and ``python -m minimoe.lm``, run at a tiny size: equal-FLOPs
models, bits per character and the baselines by hand, reproducibility, the tables, and the
all-or-nothing writing of the results."""
import json
import math
import os

import numpy as np
import pytest

from minimoe.lm import experiments as X
from minimoe.lm import text
from minimoe.lm.__main__ import OUTPUTS, main, write_outputs

TINY = dict(X.QUICK, d_model=8, n_heads=2, n_layers=2, seq_len=16, batch_size=4, d_hidden=8, n_experts=4,
            steps=4, seeds=(0, 1), sweep=(1, 4), upcycle_experts=4, upcycle_k=2, upcycle_steps=2, eval_windows=3,
            test_windows=3, eval_every=2, dtype="float64")


@pytest.fixture(scope="module")
def corpus():
    return text.load_text()


@pytest.fixture(scope="module")
def tiny(corpus):
    return X.run_all(TINY, progress=False, corpus=corpus)


def test_the_dense_width_is_the_smallest_that_costs_at_least_the_moe():
    for cfg in (X.FULL, TINY, dict(TINY, n_experts=32)):
        d, h, E = cfg["d_model"], cfg["d_hidden"], cfg["n_experts"]
        w = X.dense_width(cfg)
        assert 4 * d * w >= 4 * d * h + 2 * d * E + 2 * d > 4 * d * (w - 1)
        dense, moe = X.build_model("dense", cfg, 0), X.build_model("moe", cfg, 0)
        assert 0 <= dense.flops_per_token(16) - moe.flops_per_token(16) < 4 * d * cfg["n_layers"]
        assert moe.n_params > dense.n_params
    assert X.dense_width(X.FULL) == 133                  # 128 + (2·8 + 2)/4, rounded up


def test_bits_per_char_is_nats_over_ln2():
    assert X.bits_per_char(math.log(2)) == pytest.approx(1.0)
    assert X.bits_per_char(math.log(97)) == pytest.approx(math.log2(97))


def test_baselines_by_counting():
    train = text.encode("aab ab")                                # a×3, b×2, space×1
    x, y = text.encode("ab"), text.encode("b ")                  # scored pairs: a->b, b->space
    uni, bi = X.baseline_bpc(train, x, y, alpha_unigram=1.0, alpha_bigram=0.1)
    V = 97
    p_b, p_space = (2 + 1) / (6 + V), (1 + 1) / (6 + V)
    assert uni == pytest.approx(-(math.log2(p_b) + math.log2(p_space)) / 2)
    # pairs: aa ab b_ _a ab -> after a: a×1, b×2; after b: space×1
    p_ab = (2 + 0.1) / (3 + 0.1 * V)
    p_bspace = (1 + 0.1) / (1 + 0.1 * V)
    assert bi == pytest.approx(-(math.log2(p_ab) + math.log2(p_bspace)) / 2)


def test_evaluate_bpc_is_the_loss_in_bits_on_each_domain(corpus):
    sets = X.eval_sets(corpus, "val", TINY, 3)
    m = X.build_model("moe", TINY, 0)
    got = X.evaluate_bpc(m, sets, batch_size=2)
    for dom, (x, y, t) in sets.items():
        assert x.shape == y.shape == t.shape == (3, 16)
        assert got[dom] == pytest.approx(m.forward_loss(x, y, train=False) / math.log(2), rel=1e-12)
    assert got["mean"] == pytest.approx((got["prose"] + got["code"]) / 2)


def test_the_tiny_run_has_every_table_and_is_json(tiny):
    res, extras = tiny
    json.dumps(res)
    assert res["python"] == text.python_version() and res["config"]["steps"] == 4
    assert [(r["kind"], r["seed"]) for r in res["compare"]] == [("dense", 0), ("moe", 0), ("dense", 1), ("moe", 1)]
    assert [r["E"] for r in res["sweep"]] == [1, 4]
    assert [(r["model"], r["layer"]) for r in res["routing"]] == [("learned", 0), ("learned", 1), ("hash", 0),
                                                                  ("hash", 1)]
    for r in res["routing"]:
        assert 0 <= r["frac_domain"] <= 1 and 0 <= r["frac_type"] <= 1
    assert res["upcycle"]["start_gap"] < 1e-9                    # renormalised top-2: an exact start
    assert set(res["upcycle"]["test"]) == {"dense, trained on", "upcycled", "MoE from scratch"}
    up = res["upcycle"]["curves"]
    assert up["upcycled"]["steps"] == up["dense, trained on"]["steps"] == [4, 6]   # from the upcycling step 4
    assert up["upcycled"]["val_mean"][0] == pytest.approx(up["dense, trained on"]["val_mean"][0], abs=1e-9)
    assert set(res["phases"]) == {"dense vs sparse", "loss vs E", "routing (and the hash model)", "upcycling"}
    assert len(res["expert_text"]) == 4 and all(len(v["text"]) == len(v["experts"]) for v in
                                                 res["expert_text"].values())
    # the sweep reuses the comparison's MoE of the same E
    e4 = next(r for r in res["sweep"] if r["E"] == 4)
    assert e4["test"] == next(r for r in res["compare"] if r["kind"] == "moe" and r["seed"] == 0)["test"]
    table = X.format_tables(res)
    assert f"Python {res['python']}" in table and "| unigram |" in table and "± " in table
    plain = X.format_tables(res, markdown=False).split("\n")
    assert not any(line.startswith("|") for line in plain)
    head = next(line for line in plain if line.startswith("model ") and "prose bpc" in line)
    uni = next(line for line in plain if line.startswith("unigram "))
    col = head.index("prose bpc")                                   # columns line up under their header
    assert uni[col - 1] == " " and uni[col] != " " and uni[col:].split()[0] == f"{res['baselines']['prose']['unigram']:.3f}"


def test_same_seed_same_numbers(corpus, tiny):
    cfg = dict(TINY, seeds=(0,), sweep=(4,))
    a, _ = X.run_all(cfg, progress=False, corpus=corpus)
    assert a["compare"][0]["test"] == tiny[0]["compare"][0]["test"]          # dense, seed 0, as in the larger run
    assert a["compare"][1]["test"] == tiny[0]["compare"][1]["test"]


def test_a_diverging_run_names_the_learning_rate(corpus):
    m = X.build_model("dense", TINY, 0)
    with pytest.raises(FloatingPointError, match="lr=1e\\+06"):
        X.train_text_lm(m, corpus, dict(TINY, lr=1e6), 30, 0)


def test_outputs_are_written_all_or_nothing(tiny, tmp_path, monkeypatch):
    res, _ = tiny
    paths = write_outputs(res, str(tmp_path), log=lambda *a: None)
    assert sorted(os.path.basename(p) for p in paths) == sorted(OUTPUTS)
    assert json.loads((tmp_path / "lm_realtext.json").read_text())["python"] == res["python"]
    html = (tmp_path / "lm_expert_text.html").read_text()
    assert html.count("<pre>") == 4 and "expert 0" in html
    before = {p: open(p, "rb").read() for p in paths}
    from minimoe.course import viz

    def broken(*a, **k):
        raise RuntimeError("interrupted")
    monkeypatch.setattr(viz, "plot_upcycling", broken)
    with pytest.raises(RuntimeError, match="interrupted"):
        write_outputs(dict(res, seconds=1.0), str(tmp_path))
    assert {p: open(p, "rb").read() for p in paths} == before
    assert sorted(os.listdir(tmp_path)) == sorted(OUTPUTS)                   # no staging folder left


def test_the_command_refuses_a_bad_out_before_training(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(SystemExit) as err:
        main(["--quick", "--out", str(target)])
    assert err.value.code == 2 and "--out" in capsys.readouterr().err


def test_the_figures_builder_runs_the_full_configuration_and_writes_every_output(tiny, tmp_path, monkeypatch):
    from minimoe import figures
    assert "lm_realtext" in figures.BUILDERS
    seen = []

    def fake_run_all(cfg, progress=None, corpus=None, log=None):
        seen.append(cfg)
        return tiny
    monkeypatch.setattr(X, "run_all", fake_run_all)
    paths = figures.BUILDERS["lm_realtext"](str(tmp_path))
    assert seen == [X.FULL]
    assert sorted(os.path.basename(p) for p in paths) == sorted(OUTPUTS)
    assert all(os.path.getsize(p) > 0 for p in paths)
