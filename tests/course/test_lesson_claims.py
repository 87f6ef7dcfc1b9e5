"""What the lessons' prose says about their own output holds in the run CI executes.

Each claim is either computed here from the library (the capacity example of lesson 06) or
read back from the printed output of the solution notebook as built (quick mode, as
tests/course/test_lessons.py runs it), and the numbers the sentence states are asserted.
A sentence and its test change together: each test quotes the sentence it guards.
"""
import re
from pathlib import Path

import nbformat
import numpy as np
import pytest

from minimoe.core import dispatch

LESSONS = Path(__file__).resolve().parents[2] / "lessons"


def _source(stem):
    return (LESSONS / "src" / f"{stem}.py").read_text(encoding="utf-8")


def _printed(stem):
    """All stream output of the executed solution notebook ``stem``, as one string."""
    from nbclient import NotebookClient
    nb = nbformat.read(LESSONS / "solutions" / f"{stem}.ipynb", as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(LESSONS)}}).execute()
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.get("outputs", []) if o.get("output_type") == "stream")


# ----------------------------------------------------------------------------- lesson 06
def test_06_a_factor_below_1_need_not_drop():
    """ "With T = 10, E = 4, k = 1 and a factor of 0.9, C = ⌈2.25⌉ = 3, so there are 12 slots
    for 10 patients. Only C · E < T k guarantees that someone is turned away." """
    src = _source("06_appointment_books")
    assert "a factor below 1 guarantees drops" not in src
    assert "12 slots for 10 patients" in src
    C = dispatch.expert_capacity(10, 4, 1, 0.9)
    assert C == 3 and C * 4 == 12 > 10
    # and a perfectly balanced GP (each expert asked by ⌊10/4⌋ or ⌈10/4⌉ = 3 patients) drops nobody
    idx = (np.arange(10) % 4)[:, None]
    assert dispatch.make_plan(idx, 4, C).dropped == 0


def test_06_gate_based_priority_is_named_as_a_choice():
    """ "That is a choice, not a law. V-MoE's Batch Prioritized Routing ... by their gate values" """
    src = _source("06_appointment_books")
    assert "Why must the priority rule not depend on the gate values?" not in src
    assert "Batch" in src and "Prioritized Routing" in src and "Riquelme et al. 2021" in src


# ----------------------------------------------------------------------------- lesson 08
def test_08_the_clusters_not_classes_quote_is_cited():
    src = _source("08_what_specialists_learn")
    assert "one essay" not in src
    assert "Douglas Orr" in src and "douglasorr.github.io/2023-03-deep-metaphors/mixture_of_experts.html" in src


# ----------------------------------------------------------------------------- lesson 09
@pytest.fixture(scope="module")
def out09():
    src = _source("09_beyond_the_gp")
    assert re.search(r"^QUICK = True$", src, flags=re.M), "CI runs the notebook in quick mode"
    return _printed("09_beyond_the_gp")


def _clinics(text):
    """{router name: (accuracy, load CV, share nobody saw)} from lesson 09's comparison table."""
    rows = re.findall(r"^(\S.*?)\s+(\d\.\d{3}) (?:± \d\.\d{3}|\(n = 1\))\s+(\d+\.\d\d)\s+(\d+\.\d)%$", text,
                      flags=re.M)
    return {name.strip(): (float(a), float(cv), float(u) / 100) for name, a, cv, u in rows}


def test_09_the_comparison_table_is_read_as_the_prose_says(out09):
    c = _clinics(out09)
    assert len(c) == 7, c
    none, loss, hash_, ec = (c["token choice, no balancing"], c["token choice + balancing loss"],
                             c["hash (intake form)"], c["expert choice"])
    lf0, lf, shared = c["loss-free, γ = 0 (control)"], c["loss-free, γ = 0.03"], c["shared + fine-grained"]
    balanced = [loss, ec, lf, shared]
    # "No balancing collapses ... about a quarter of the patients are seen by nobody, and the
    # accuracy drops far below the others."
    assert 0.2 <= none[2] <= 0.3
    assert all(none[0] < b[0] - 0.1 for b in balanced)
    # "The balancing loss and the loss-free bias both spread the load evenly and see everyone"
    assert loss[2] == lf[2] == 0.0 and loss[1] < 0.2 and lf[1] < 0.2
    assert lf0[1] > 0.5 and lf0[2] > 0.1                  # the γ = 0 control collapses, turns patients away
    # "the loss-free clinic diagnoses somewhat worse (by about 0.05 with the first seed ...)"
    assert 0.03 <= loss[0] - lf[0] <= 0.07
    # "Expert choice is perfectly balanced (CV 0) and diagnoses as well as the balanced GP ... a few
    # patients see nobody."
    assert ec[1] == 0.0 and abs(ec[0] - loss[0]) <= 0.02 and 0 < ec[2] < 0.02
    # hash: "a third of the patients are turned away everywhere ... it diagnoses about as badly as
    # the collapsed GP (within 0.02 of it), far below every balanced clinic."
    assert 0.28 <= hash_[2] <= 0.38
    assert abs(hash_[0] - none[0]) <= 0.02
    assert all(hash_[0] < b[0] - 0.1 for b in balanced)
    # "Shared + fine-grained ... diagnoses about as well as the balanced GP, a little better with
    # the first seed (by 0.02, the size of one seed's noise)."
    assert round(shared[0] - loss[0], 2) == 0.02
    src = _source("09_beyond_the_gp")
    assert "the worst clinic here" not in src


def test_09_one_seed_shows_no_spread(out09):
    """Quick mode runs one seed: the table says "(n = 1)", never "± 0.000" (issue 22)."""
    assert "± 0.000" not in out09
    assert len(re.findall(r"\(n = 1\)", out09)) == 7


def test_09_sentences_about_the_next_cells_and_the_extra_parameters():
    """ "the cells just below run it for longer"; "of the 624 extra, 384 are output biases and 240
    the router's (31 experts to score, not 8)" """
    import numpy as np
    from minimoe import MoELayer
    from minimoe.beyond.shared_experts import SharedExpertMoELayer
    prose = _prose(_source("09_beyond_the_gp"))
    assert "the last cell of this section runs it for longer" not in prose
    assert "the cells just below run it for longer" in prose
    coarse = MoELayer(16, 8, 8, k=2, rng=np.random.default_rng(0))
    fine = SharedExpertMoELayer.fine_grained(16, 8, 8, k=2, granularity=4, n_shared=1, rng=np.random.default_rng(0))
    extra = fine.n_params - coarse.n_params
    router = lambda layer: sum(layer.params[n].size for n in ("W_gate", "W_noise") if n in layer.params)  # noqa: E731
    b2 = lambda layer: sum(v.size for n, v in layer.params.items() if n.startswith("b2"))  # noqa: E731
    assert (extra, b2(fine) - b2(coarse), router(fine) - router(coarse), fine.n_experts) == (624, 384, 240, 31)
    assert "of the 624 extra, 384 are output biases and 240 the router's (31 experts to score, not 8)" in prose


def test_09_the_paper_rate_is_shown_and_the_score_scale_stays_unbalanced(out09):
    """ "γ = 0.02 per step — 20 times the paper's u = 0.001" and, at the paper's rate, "the slow
    receptionist gets the logit-scale load nearly even too, and the score scale stays far from
    balance" """
    fast = dict(re.findall(r"^(bias on the \w+)\S*.*?mean of the last 100 steps (\d\.\d\d)$", out09, flags=re.M))
    slow = dict(re.findall(r"^γ = 0\.001, bias on the (\w+)\s+load CV: .*? (\d\.\d\d)$", out09, flags=re.M))
    assert set(slow) == {"logits", "scores"} and len(fast) == 2, (fast, slow)
    assert float(fast["bias on the logits"]) < 0.25 < 1.0 < float(fast["bias on the scores"])
    assert float(slow["logits"]) < 0.25 and float(slow["scores"]) > 0.5
    assert "20 times the paper's" in _source("09_beyond_the_gp")


def _prose(src):
    """The markdown of a lesson source as one line: "# " prefixes dropped, whitespace collapsed."""
    lines = [line[2:] if line.startswith("# ") else line.lstrip("#") for line in src.splitlines()]
    return re.sub(r"\s+", " ", " ".join(lines))


def test_09_deepseek_v3_rule_balances_sooner_than_the_logit_bias(out09):
    """ "close to the measured 257 and 3,313. DeepSeek-V3's rule balances about 13× sooner";
    "On the sigmoid scale the gap is about 0.5 ... so about 240 steps; on the logit scale it is
    about 6, which takes about 3,200 steps"; the layer chooses as the loop and DeepSeek-V3's
    gates sum to 1, the older form's (raw sigmoid scores) do not. """
    found = re.findall(r"^sigmoid, bias on the (\w+).*?load CV below 0\.25 after ([\d,]+) steps \(of ([\d,]+)\)$",
                       out09, flags=re.M)
    steps = {where: (int(n.replace(",", "")), int(of.replace(",", ""))) for where, n, of in found}
    assert set(steps) == {"scores", "logits"}, steps
    (fast, fast_run), (slow, slow_run) = steps["scores"], steps["logits"]
    assert fast_run == 2000 and fast < fast_run / 4      # "(2,000 steps: it needs far fewer)"
    prose = _prose(_source("09_beyond_the_gp"))
    assert f"close to the measured {fast:,} and {slow:,}." in prose
    assert f"DeepSeek-V3's rule balances about {round(slow / fast)}× sooner" in prose
    gaps = {name: (float(g), int(n.replace(",", ""))) for name, g, n in re.findall(
        r"^mean gap between specialist 0 and an idle one, (logits|sigmoid scores) \w\s+([\d.]+): "
        r"gap / 2u = ([\d,]+) steps$", out09, flags=re.M)}
    assert set(gaps) == {"logits", "sigmoid scores"}, gaps
    (g_s, est_s), (g_l, est_l) = gaps["sigmoid scores"], gaps["logits"]
    assert abs(est_s - g_s / 0.002) <= 0.01 / 0.002 and abs(est_l - g_l / 0.002) <= 0.01 / 0.002
    assert f"On the sigmoid scale the gap is about {g_s:.1f}" in prose and g_s < 1
    assert f"so about {round(est_s, -1):,.0f} steps; on the logit scale it is about {round(g_l)}," in prose
    assert f"which takes about {round(est_l, -2):,.0f} steps" in prose
    # "close to": the estimates gap / 2u are within 10% of the measured steps
    assert abs(est_s - fast) <= 0.1 * fast and abs(est_l - slow) <= 0.1 * slow
    found = re.findall(r"^bias_on='(\w+)'\s+chooses as the loop does: (True|False); a patient's gates "
                       r"sum to ([\d.]+ … [\d.]+)$", out09, flags=re.M)
    layer = {where: (same, lo_hi) for where, same, lo_hi in found}
    assert set(layer) == {"scores", "logits"} and all(same == "True" for same, _ in layer.values()), layer
    assert layer["scores"][1] == "1.000 … 1.000"
    lo, hi = map(float, layer["logits"][1].split(" … "))
    assert hi > 1.0 + 1e-3 or lo < 1.0 - 1e-3            # the raw scores are not normalised
    assert 'steer("scores", 0.001, steps=2000, score="sigmoid")' in _source("09_beyond_the_gp")


def _mi_rows(text):
    rows = re.findall(r"^(.+?), block (\d)\s+I\(expert; class\) [\d.]+ nats \(\s*([\d.]+)% of H\)\s+"
                      r"I\(expert; topic\) [\d.]+ nats \(\s*([\d.]+)% of H\)\s+load CV (\d\.\d\d)$", text, flags=re.M)
    return {(n, int(b)): (float(c), float(t), float(cv)) for n, b, c, t, cv in rows}


def test_09_what_the_language_model_blocks_show(out09):
    rows = _mi_rows(out09)
    assert set(rows) == {("learned (top-2)", 0), ("learned (top-2)", 1),
                         ("hash on the word", 0), ("hash on the word", 1)}, rows
    # "In every block of every model the expert says far more about the word's class than about
    # the note's topic"; "in every block the topic stays under 1% of its entropy"
    assert all(c > 5 * t and t < 1.0 for c, t, _ in rows.values())
    b0, b1 = rows[("learned (top-2)", 0)], rows[("learned (top-2)", 1)]
    # "block 1 reveals a little more about the class than block 0 ... and no more about the topic"
    assert b0[0] < b1[0] < b0[0] + 3.0 and b1[1] <= b0[1]
    # "block 1 is far from balanced (load CV about 0.5, against about 0.2 in block 0)"
    assert 0.4 <= b1[2] <= 0.6 and b0[2] <= 0.3
    # "it reveals about as much about the word class in block 0 as the learned router does"
    assert abs(rows[("hash on the word", 0)][0] - b0[0]) <= 1.0
    # "The hash model's two blocks hash the same word with the same hash, so they route identically."
    assert rows[("hash on the word", 0)] == rows[("hash on the word", 1)]
    src = _source("09_beyond_the_gp")
    assert "a little more about the topic" not in src and "about 10 seconds" not in src


def test_09_limits_blas_to_one_thread():
    """ "the cell after the imports limits numpy's BLAS to one thread (with threadpoolctl)" """
    src = _source("09_beyond_the_gp")
    assert "threadpool_limits(limits=1, user_api=\"blas\")" in src


# ----------------------------------------------------------------------------- README: the default demo
def test_readme_says_what_the_default_one_seed_demo_shows():
    """ "The default `python -m minimoe` runs seed 0 alone. One seed shows the large gaps — the GP
    referral first (0.797), asking every specialist second (0.768), both far above the generalist
    (0.669) — but not the small one: there the second opinion comes out just *below* the generalist
    (0.664)." (issue 22: README's narrative is built on 3-seed means) """
    from minimoe.__main__ import DEFAULTS, _parser, run_demo
    prose = re.sub(r"\s+", " ", (LESSONS.parent / "README.md").read_text(encoding="utf-8"))
    assert "The default `python -m minimoe` runs seed 0 alone." in prose
    assert _parser().parse_args([]).seed == [0]
    res = run_demo(DEFAULTS, seeds=(0,), log=lambda *a: None)
    acc = {r["kind"]: r["acc_mean"] for r in res["rows"]}
    quoted = {"sparse_moe": 0.797, "dense_moe": 0.768, "generalist": 0.669, "ensemble": 0.664}
    for kind, value in quoted.items():
        assert f"{acc[kind]:.3f}" == f"{value:.3f}", (kind, acc[kind])
        assert f"({value:.3f})" in prose
    assert acc["sparse_moe"] > acc["dense_moe"] > acc["generalist"] > acc["ensemble"]


# ----------------------------------------------------------------------------- lesson 10
def test_10_pooled_layers_sentences():
    """ "the two layers pooled: … (one loss on the pooled tokens: 2 at perfect balance)"; "Each
    collapsed layer on its own costs about 1.5 more than at perfect balance, 3.0 more for the two.
    Pooled, the two collapses cost 0.77 more than the pooled loss's own value at perfect balance (2)" """
    from minimoe.course import bugs
    prose = _prose(_source("10_the_bug_hunt"))
    assert "for two layers, 4 at perfect balance" not in prose and "about as much as *one balanced*" not in prose
    a, b = bugs.routing_fixture(16, 4, 0, seed=1), bugs.routing_fixture(16, 4, 1, seed=2)
    per = [bugs.mixtral_layer_loss(v, 2) for v in (a, b)]
    pooled = bugs.bug7_model_balance_loss([a, b], 2)
    # perfect balance: every expert chosen k times per E tokens, uniform probabilities -> exactly k,
    # for one layer and for the pooled tokens of several alike
    from minimoe.core import losses
    perfect = (np.arange(4)[:, None] + np.arange(2)) % 4
    assert losses.switch_loss_forward(np.full((4, 4), 0.25), perfect)[0] == 2.0
    assert losses.switch_loss_forward(np.full((8, 4), 0.25), np.concatenate([perfect, perfect]))[0] == 2.0
    assert all(round(v - 2, 1) == 1.5 for v in per) and round(sum(per) - 4, 1) == 3.0
    assert f"{pooled - 2:.2f}" == "0.77"
    assert "costs about 1.5 more than at perfect balance, 3.0 more for the two" in prose
    assert "the two collapses cost 0.77 more than the pooled loss's own value at perfect balance (2)" in prose
    assert "(one loss on the pooled tokens: 2 at perfect balance)" in _source("10_the_bug_hunt")


# ----------------------------------------------------------------------------- lesson 11
def _cell_with(stem, needle):
    src = _source(stem)
    cells = re.split(r"^# %%.*$", src, flags=re.M)
    return next(c for c in cells if needle in c)


def test_11_a_mixtral_sized_layer_costs_6dh_per_expert_row():
    """ "one Mixtral-sized layer (d = 4096, h = 14336, k = 2, SwiGLU experts: 6dh FLOPs per row,
    lesson 01)"; "Inside one machine the exchange is a small share of the step (4 to 7%) … Between
    machines … about a third of every step at a capacity factor of 1 and nearly half at 2" """
    import contextlib
    import io
    from minimoe.course.checks import lesson11
    code = _cell_with("11_a_network_of_clinics", "d_, h_, k_, T_, P_, flops")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(code, {"check": lesson11})
    rows = re.findall(r"^\s*(inside one machine|between machines), cf\s+([\d.]+): compute\s+([\d.]+) ms, "
                      r"exchanges\s+([\d.]+) ms -> \s*(\d+)% of the step$", out.getvalue(), flags=re.M)
    share = {(where, float(cf)): int(p) for where, cf, _, _, p in rows}
    compute = {float(c) for *_, c, _, _ in rows}
    assert len(rows) == 6 and compute == {round(3 * 8192 * 2 * 6 * 4096 * 14336 / 400e12 * 1e3, 1)} == {43.3}
    inside = [share[("inside one machine", cf)] for cf in (1.0, 1.25, 2.0)]
    between = [share[("between machines", cf)] for cf in (1.0, 1.25, 2.0)]
    assert (min(inside), max(inside)) == (4, 7)
    assert 28 <= between[0] <= 36 and 44 <= between[2] < 50
    prose = _prose(_source("11_a_network_of_clinics"))
    assert "SwiGLU experts: $6dh$ FLOPs per row" in prose
    assert "a small share of the step (4 to 7%)" in prose
    assert "about a third of every step at a capacity factor of 1 and nearly half at 2" in prose


def test_11_arrivals_order_matches_the_parallel_layer():
    """ "With k > 1 … the layer sorts by one more label: (expert, choice, source rank)" — what
    `_arrival_order` in minimoe/beyond/parallel.py does. """
    from minimoe.beyond import parallel
    prose = _prose(_source("11_a_network_of_clinics"))
    assert "that is the global token order, and what makes the expert-parallel layer equal" not in prose
    assert "(expert, choice, source rank)" in prose
    # two sources, one local expert, k = 2: rows arrive (s0: j0, j1), (s1: j0, j1)
    kept_counts = np.array([[[1], [1]], [[1], [1]]])          # (P, k, E) with E = 1, one rank
    perm, _ = parallel._arrival_order(kept_counts, 0, 1)
    arrival = ["s0 j0", "s0 j1", "s1 j0", "s1 j1"]
    assert [arrival[i] for i in perm] == ["s0 j0", "s1 j0", "s0 j1", "s1 j1"]    # choice before source

# ----------------------------------------------------------------------------- lesson 12
@pytest.fixture(scope="module")
def out12():
    src = _source("12_real_patients")
    assert re.search(r"^QUICK = True$", src, flags=re.M), "CI runs the notebook in quick mode"
    return _printed("12_real_patients")


def _lm12(text):
    """{kind: (test bpc, params, FLOPs)} and the baselines, from lesson 12's dense/sparse cell."""
    base = re.search(r"unigram ([\d.]+) bpc, bigram ([\d.]+) bpc", text)
    rows = re.findall(r"^\s*(dense|moe|hash): test ([\d.]+) bpc .*?\s+([\d,]+) parameters, [\d,]+ active, "
                      r"([\d,]+) FLOPs per character$", text, flags=re.M)
    models = {k: (float(b), int(p.replace(",", "")), int(f.replace(",", ""))) for k, b, p, f in rows}
    return float(base.group(1)), float(base.group(2)), models


def test_12_dense_and_sparse_in_the_quick_run(out12):
    """ "The MoE has almost four times the parameters for the same FLOPs per character"; "all three
    models are far below the unigram baseline but only about level with the bigram one, and within a
    tenth of a bit of each other" """
    uni, bi, m = _lm12(out12)
    assert set(m) == {"dense", "moe", "hash"}, m
    assert 3.5 <= m["moe"][1] / m["dense"][1] < 4.0
    assert abs(m["moe"][2] - m["dense"][2]) <= 0.01 * m["dense"][2]
    bpc = [v[0] for v in m.values()]
    assert all(b < uni - 0.5 for b in bpc) and all(abs(b - bi) < 0.1 for b in bpc)
    assert max(bpc) - min(bpc) < 0.1
    # "the unigram baseline about 4.5 here; ... the bigram baseline about 3.5"
    assert abs(uni - 4.5) < 0.15 and abs(bi - 3.5) < 0.15
    prose = _prose(_source("12_real_patients"))
    assert "(the *unigram* baseline) about 4.5 here; one that looks one character back (the *bigram* " \
           "baseline) about 3.5" in prose
    assert "only about level with the bigram one, and within a tenth of a bit of each other" in prose


def _info12(text):
    rows = re.findall(r"^\s*(learned|hash), block (\d):\s+I\(expert; domain\) [\d.]+ nats \(\s*([\d.]+)% of H\)\s+"
                      r"I\(expert; type\) [\d.]+ nats \(\s*([\d.]+)% of H\)$", text, flags=re.M)
    same = re.findall(r"^\s*(learned|hash), block (\d):\s+same expert next — prose ([\d.]+) \(chance ([\d.]+)\), "
                      r"code ([\d.]+) \(chance ([\d.]+)\)$", text, flags=re.M)
    return ({(n, int(b)): (float(d), float(t)) for n, b, d, t in rows},
            {(n, int(b)): tuple(map(float, v)) for n, b, *v in same})


def test_12_what_the_experts_reveal(out12):
    """ "In every block of both models the expert says several times more about the character's type
    than about the text's domain"; "the hash router ... reveals about as much about the type as the
    learned router's first block, and more than its second"; "The hash model's two blocks use the same
    hash, so they route alike." """
    info, same = _info12(out12)
    keys = {("learned", 0), ("learned", 1), ("hash", 0), ("hash", 1)}
    assert set(info) == keys and set(same) == keys, (info, same)
    assert all(t > 4 * d for d, t in info.values())
    assert abs(info[("hash", 0)][1] - info[("learned", 0)][1]) <= 3.0
    assert info[("hash", 0)][1] > info[("learned", 1)][1]
    assert info[("hash", 0)] == info[("hash", 1)] and same[("hash", 0)] == same[("hash", 1)]
    # "In code, neighbouring characters go to the same expert more often than chance in every block of
    # both models — about twice as often for the learned router"; "In prose ... the share is lower than
    # in code in every block."
    for (name, _), (p, pc, c, cc) in same.items():
        assert c > cc and p < c
        if name == "learned":
            assert 1.7 <= c / cc <= 2.5


def test_12_upcycling_in_the_quick_run(out12):
    """ "starts where the dense model is — exactly, up to the rounding of float32 (about 1e-6) ... the
    Switch gate ... logits changed by whole units"; "In the quick run it then falls a little behind the
    dense model trained on (by a few hundredths of a bit after 100 steps)" """
    gaps = dict(re.findall(r"^gate='(\w+)'\s+largest change of any logit at the start .*: ([\d.e+-]+)$", out12,
                           flags=re.M))
    assert set(gaps) == {"topk", "switch"}, gaps
    assert float(gaps["topk"]) < 1e-5 and float(gaps["switch"]) >= 1.0
    start = re.search(r"validation bpc at step (\d+): dense ([\d.]+), upcycled ([\d.]+)", out12)
    after = re.search(r"after (\d+) more steps:\s+dense ([\d.]+), upcycled ([\d.]+)", out12)
    assert start and after and start.group(2) == start.group(3)
    behind = float(after.group(3)) - float(after.group(2))
    assert after.group(1) == "100" and 0.01 <= behind < 0.1
    assert float(after.group(2)) < float(start.group(2))                # both went on learning
    assert float(after.group(3)) < float(start.group(3))


def test_12_what_the_full_run_shows():
    """The bullets of "What the full run shows" against the committed full run (figures/lm_realtext.json)."""
    import json
    res = json.loads((LESSONS.parent / "figures" / "lm_realtext.json").read_text(encoding="utf-8"))
    prose = _prose(_source("12_real_patients"))
    c = res["config"]
    assert c["steps"] == 1000 and c["seeds"] == [0, 1, 2] and c["batch_size"] * c["seq_len"] == 1024
    assert f"(Python {res['python']}, 1,000 steps of 1,024 characters, three seeds;" in prose
    # "At equal FLOPs the MoE wins, by a little ... lower than the dense model's on prose and on code,
    # and on average by more than the seeds' spread: 2.69 ± 0.02 against 2.75 ± 0.04 ... about 0.06 bits
    # for four times the parameters."
    rows = {k: [r for r in res["compare"] if r["kind"] == k] for k in ("dense", "moe")}
    mean = {k: np.mean([[r["test"][d] for d in ("prose", "code", "mean")] for r in v], axis=0) for k, v in rows.items()}
    std = {k: np.std([r["test"]["mean"] for r in v]) for k, v in rows.items()}
    assert mean["moe"][0] < mean["dense"][0] and mean["moe"][1] < mean["dense"][1]
    gap = mean["dense"][2] - mean["moe"][2]
    assert gap > max(std.values())
    assert (f"{mean['moe'][2]:.2f} ± {std['moe']:.2f} against {mean['dense'][2]:.2f} ± {std['dense']:.2f}" in prose)
    assert f"about {gap:.2f} bits for four times" in prose
    assert 3.5 < rows["moe"][0]["params"] / rows["dense"][0]["params"] < 4.0
    assert abs(rows["moe"][0]["flops_per_char"] - rows["dense"][0]["flops_per_char"]) < 0.01 * rows["dense"][0]["flops_per_char"]
    # "From E = 1 to E = 4 the loss falls by about 0.09 bits ...; at 8, 16 and 32 experts it stays within
    # a few hundredths of E = 4, no more than one seed's noise."
    sweep = {r["E"]: r["test"]["mean"] for r in res["sweep"]}
    assert list(sweep) == [1, 2, 4, 8, 16, 32]
    assert sweep[1] > sweep[2] > sweep[4]
    assert f"falls by about {sweep[1] - sweep[4]:.2f} bits" in prose
    spread = 2 * max(std.values())
    assert all(abs(sweep[E] - sweep[4]) < min(0.05, spread) for E in (8, 16, 32))
    # "The hash-routed model beats them all: 2.56 bits, 0.15 below the learned MoE of the same shape."
    hashed = res["hash_test"]["mean"]
    assert hashed < min(sweep.values()) and hashed < mean["dense"][2]
    assert f"beats them all**: {hashed:.2f} bits, {sweep[8] - hashed:.2f} below" in prose
    # "the upcycled model is ahead of the dense model trained on (2.50 against 2.55 bits), at 1.4 times
    # its FLOPs — but an MoE of the same shape trained from scratch for the same 1,500 steps is far ahead
    # of both (2.36)."
    up = res["upcycle"]
    t = {k: v["mean"] for k, v in up["test"].items()}
    assert t["MoE from scratch"] < t["upcycled"] - 0.05 and t["upcycled"] < t["dense, trained on"]
    assert (f"({t['upcycled']:.2f} against {t['dense, trained on']:.2f} bits), at "
            f"{up['flops_per_char']['moe'] / up['flops_per_char']['dense']:.1f} times its FLOPs") in prose
    assert f"far ahead of both ({t['MoE from scratch']:.2f})" in prose
    assert up["start_gap"] < 1e-6 and c["upcycle_steps"] == 500
    # "every curve is still falling steeply at the last step"
    for r in res["compare"]:
        v = r["curve"]["val_mean"]
        assert v[-2] - v[-1] > 0.02
