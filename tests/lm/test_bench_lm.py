"""``python -m minimoe.bench --lm``: it runs, its rows are the ratios of its own figures, and it
says when torch is missing. No timing is asserted."""
import json

import numpy as np
import pytest

from minimoe import bench
from minimoe.lm import experiments


@pytest.fixture(scope="module")
def result():
    return bench.main(["--lm", "--quick", "--no-progress", "--repeats", "1", "--warmup", "1"])


def test_lm_bench_rows_are_consistent(result):
    c = result["config"]
    assert c["threads"] == 1 and c["batch_size"] == bench.LM_QUICK["batch_size"] and c["repeats"] == 1
    assert c["d_model"] == experiments.FULL["d_model"] and c["n_experts"] == experiments.FULL["n_experts"]
    assert [(r["dtype"], r["kind"]) for r in result["results"]] == [("float32", "dense"), ("float32", "moe"),
                                                                    ("float64", "dense"), ("float64", "moe")]
    tokens = c["batch_size"] * c["seq_len"]
    for r in result["results"]:
        assert r["minimoe_ms"] == pytest.approx(np.median(r["minimoe_ms_all"]), rel=1e-3)
        assert r["minimoe_tok_s"] == pytest.approx(tokens / r["minimoe_ms"] * 1e3)
        if result["torch"]:
            assert r["torch/minimoe"] == pytest.approx(r["torch_ms"] / r["minimoe_ms"])
        else:
            assert "torch_ms" not in r
    json.dumps(result)


def test_lm_report_names_the_columns_and_a_missing_torch(result, capsys):
    text = bench.format_lm_report(result)
    assert "minimoe tok/s" in text and "float64  moe" in text
    missing = bench.format_lm_report(dict(result, torch=None))
    assert "PyTorch is not installed" in missing and "torch_ms" not in missing


def test_the_lm_step_trains_the_lesson_model():
    step, model = bench.make_lm_step("moe", "float32", dict(experiments.FULL, batch_size=2))
    before = model.params["block0.ffn.W1"].copy()
    step()
    assert model.dtype == np.float32 and not np.array_equal(before, model.params["block0.ffn.W1"])


def test_torch_step_runs_when_torch_is_installed():
    pytest.importorskip("torch")
    step, model = bench.make_torch_lm_step("moe", "float64", dict(experiments.FULL, batch_size=2))
    w = next(model.parameters()).detach().clone()
    step()
    assert not bool((w == next(model.parameters()).detach()).all())
