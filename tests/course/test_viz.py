"""The plotting package: one import gives every plot, matplotlib only when drawing, and the
shared helpers (stacked load shares, bar panels) draw what their inputs say."""
import ast
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from minimoe.course import viz

VIZ_DIR = Path(viz.__file__).parent


def test_every_public_plot_of_every_module_is_reexported_once():
    names = []
    for path in sorted(VIZ_DIR.glob("*.py")):
        if path.name == "__init__.py":
            continue
        tree = ast.parse(path.read_text("utf-8"))
        public = [n.name for n in tree.body if isinstance(n, ast.FunctionDef) and not n.name.startswith("_")]
        module = getattr(viz, path.stem)
        assert sorted(public) == sorted(n for n in module.__all__ if callable(getattr(module, n))), path.name
        names += module.__all__
    assert sorted(names) == sorted(viz.__all__)
    assert len(set(viz.__all__)) == len(viz.__all__), "a name exported by two modules"
    for name in viz.__all__:
        assert getattr(viz, name) is not None


def test_importing_viz_does_not_import_matplotlib():
    code = "import sys, minimoe, minimoe.course.viz; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_expert_load_stacks_shares_and_shows_drops(tmp_path):
    load = np.array([[6, 2, 0, 0], [3, 3, 1, 1], [2, 2, 2, 2]])
    hist = SimpleNamespace(epoch=[1, 2, 3], load_array=lambda: load, dropped=[4, 0, 0])
    fig = viz.plot_expert_load(hist)
    ax = fig.axes[0]
    tops = ax.collections[-1].get_paths()[0].vertices[:, 1]     # the top band ends at share 1
    assert np.allclose(tops.max(), 1.0)
    assert len(fig.axes) == 2                                    # the dropped-fraction axis
    np.testing.assert_allclose(fig.axes[1].lines[0].get_ydata(), [4 / 8, 0, 0])
    path = viz.save(fig, tmp_path / "sub" / "load.png")
    assert Path(path).stat().st_size > 0
    with pytest.raises(ValueError, match="no expert load"):
        viz.plot_expert_load(SimpleNamespace(epoch=[1], load_array=lambda: np.zeros((1, 0)), dropped=[0]))


def test_router_comparison_writes_each_value_in_its_panel_format():
    rows = [{"name": "GP top-2", "acc": 0.8134, "acc_std": 0.01, "cv": 0.25, "unserved": 0.0},
            {"name": "expert choice", "acc": 0.79, "cv": 0.0, "unserved": 0.125}]
    fig = viz.plot_router_comparison(rows)
    texts = [[t.get_text().strip() for t in ax.texts] for ax in fig.axes]
    assert texts == [["0.813", "0.790"], ["0.250", "0.000"], ["0.0%", "12.5%"]]
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["GP top-2", "expert choice"]
    assert all(t.get_text() == "" for t in fig.axes[1].get_yticklabels())


# ----------------------------------------------------------------------------- readable, honest figures
def _overlaps(labels):
    """Pairs of visible, non-empty tick labels whose drawn boxes overlap."""
    boxes = [t.get_window_extent() for t in labels if t.get_visible() and t.get_text()]
    return [(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:] if a.overlaps(b)]


def test_accuracy_bars_start_at_zero():
    """Bars starting at 0.42 would make a 0.44-vs-0.60 gap look like 1 : 9."""
    rows = [{"name": n, "acc": a, "cv": 0.1, "unserved": 0.0} for n, a in (("a", 0.44), ("b", 0.61), ("c", 0.60))]
    fig = viz.plot_router_comparison(rows)
    assert fig.axes[0].get_xlim()[0] == 0.0
    assert fig.axes[0].get_xlim()[1] >= 0.61


def test_class_heatmap_is_readable():
    """Lesson 09's heatmap had 3 panels of 12 rotated 7-pt labels squeezed into 1646×308 px."""
    rng = np.random.default_rng(0)
    names = [f"class {i}" for i in range(12)]
    tables = {f"model {m}": rng.integers(0, 50, (4, 12)) for m in range(3)}
    fig = viz.plot_expert_classes(tables, names, k=2)
    fig.canvas.draw()
    w, h = fig.get_size_inches()
    assert w <= 12 and h >= 4 and w / h < 3                # not a strip
    first = fig.axes[0].get_yticklabels()
    assert [t.get_text() for t in first] == names and all(t.get_fontsize() >= 8 for t in first)
    assert all(t.get_rotation() == 0 for t in first)
    assert not _overlaps(first)


def test_knowledge_vs_compute_legend_covers_no_marker_and_ticks_do_not_collide():
    rows = [{"kind": kind, "acc": a, "flops": f, "params": p} for kind, a, f, p in (
        ("ensemble", 0.597, 5200, 2800), ("generalist", 0.56, 1700, 900), ("dense_moe", 0.684, 5000, 2600),
        ("sparse_moe", 0.696, 1700, 2700))]
    sweep = [{"E": E, "acc": a, "flops": f, "params": p} for E, a, f, p in (
        (2, 0.571, 1500, 850), (4, 0.63, 1550, 1500), (8, 0.696, 1700, 2700), (16, 0.709, 2000, 5200))]
    fig = viz.plot_knowledge_vs_compute(rows, sweep)
    fig.canvas.draw()
    assert all(ax.get_legend() is None for ax in fig.axes), "a legend inside an axes can cover a marker"
    assert len(fig.legends) == 1
    legend_box = fig.legends[0].get_window_extent()
    for ax in fig.axes:
        assert not legend_box.overlaps(ax.get_window_extent())
        assert not _overlaps(ax.get_xticklabels()), [t.get_text() for t in ax.get_xticklabels()]


def test_load_shares_draw_visible_perfect_balance_lines():
    load = np.array([[6, 2, 0, 0], [3, 3, 1, 1], [2, 2, 2, 2]])
    hist = SimpleNamespace(epoch=[1, 2, 3], load_array=lambda: load, dropped=[0, 0, 0])
    for fig in (viz.plot_load_shares({"run": hist}), viz.plot_expert_load(hist)):
        ax = fig.axes[0]
        dark = [ln for ln in ax.lines if ln.get_color() == "black" and ln.get_linewidth() >= 1]
        assert sorted(ln.get_ydata()[0] for ln in dark) == [0.25, 0.5, 0.75]


def test_balance_options_accuracy_axis_starts_at_zero():
    res = {"a": {"cv": 0.5, "acc": 0.51, "z": 3.0}, "b": {"cv": 0.1, "acc": 0.55, "z": 1.0}}
    fig = viz.plot_balance_options(res)
    assert fig.axes[1].get_xlim()[0] == 0


# ----------------------------------------------------------------------------- lessons 05 and 10: balance conventions
def test_pooled_balance_draws_one_panel_per_group_with_its_shares_and_the_balance_line():
    shares = np.array([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0.5, 0.5, 0, 0]])
    fig = viz.plot_pooled_balance(shares, ["layer 1", "layer 2", "pooled"], values=[3.0, 3.0, 1.5])
    assert len(fig.axes) == 3
    for ax, row in zip(fig.axes, shares):
        np.testing.assert_array_equal([p.get_height() for p in ax.patches], row)
        assert ax.lines[0].get_ydata()[0] == pytest.approx(0.25)        # 1/E
    assert "loss 1.5" in fig.axes[2].get_title()
    with pytest.raises(ValueError, match="one label per row"):
        viz.plot_pooled_balance(shares, ["a", "b"])


def test_switch_conventions_draws_both_curves_and_their_balance_values():
    c = np.array([0.25, 0.5, 1.0])
    fig = viz.plot_switch_conventions(c, [1.0, 1.5, 3.0], [2.0, 2.6, 4.0], k=2)
    ax = fig.axes[0]
    curves = {tuple(l.get_ydata()) for l in ax.lines if len(l.get_xdata()) == 3}
    assert curves == {(1.0, 1.5, 3.0), (2.0, 2.6, 4.0)}
    levels = sorted(l.get_ydata()[0] for l in ax.lines if len(l.get_xdata()) == 2)
    assert levels == [1, 2]


def test_balance_race_marks_each_first_step_below_the_threshold():
    runs = {"fast": [1.7, 0.3, 0.2, 0.1], "slow": [1.7, 1.0, 0.5, 0.4, 0.3, 0.24], "never": [1.7, 1.6]}
    fig = viz.plot_balance_race(runs, threshold=0.25)
    ax = fig.axes[0]
    curves = {l.get_label(): (list(l.get_xdata()), list(l.get_ydata())) for l in ax.lines if l.get_label() in runs}
    assert curves == {name: (list(range(1, len(cv) + 1)), cv) for name, cv in runs.items()}
    vertical = sorted(l.get_xdata()[0] for l in ax.lines if l.get_label() not in runs
                      and l.get_xdata()[0] == l.get_xdata()[-1])
    assert vertical == [3, 6]                            # "never" has no marker
    level = [l.get_ydata()[0] for l in ax.lines if tuple(l.get_ydata()) == (0.25, 0.25)]
    assert level == [0.25]
    assert ax.get_xscale() == "log"
    assert {t.get_text() for t in ax.texts} == {"step 3", "step 6"}


# ----------------------------------------------------------------------------- issue 22's figures
def test_step_sizes_pass_line_label_is_crossed_by_no_curve():
    """Lesson 01: the 'pass line 1e-8' label sat where the float64 curve crosses the line."""
    hs = np.logspace(-1, -12, 12)
    errors = {"float64": np.abs(hs ** 2 + 1e-16 / hs), "float32": np.abs(hs ** 2 + 1e-7 / hs)}
    fig = viz.plot_step_sizes(hs, errors)
    ax = fig.axes[0]
    assert not [t for t in ax.texts if "pass line" in t.get_text()]          # no text on the plot area
    assert any("pass line 1e-8" in t.get_text() for t in ax.get_legend().get_texts())


def test_router_comparison_with_one_seed_draws_no_error_bar_and_says_n_1():
    rows = [{"name": "a", "acc": 0.8, "acc_std": 0.0, "n_seeds": 1, "cv": 0.1, "unserved": 0.0},
            {"name": "b", "acc": 0.7, "acc_std": 0.0, "n_seeds": 1, "cv": 0.2, "unserved": 0.1}]
    fig = viz.plot_router_comparison(rows)
    ax = fig.axes[0]
    assert not ax.lines and not [c for c in ax.containers if getattr(c, "has_xerr", False)
                                 and c.has_xerr and len(c.lines[2])], "no zero-width error bars"
    assert "n = 1" in ax.get_xlabel()
    three = [dict(r, acc_std=0.01, n_seeds=3) for r in rows]
    assert "± std over 3 seeds" in viz.plot_router_comparison(three).axes[0].get_xlabel()


def test_class_heatmap_says_rows_add_up_to_k_times_100():
    tables = {"m": np.array([[10, 0], [10, 5], [0, 5]])}
    fig = viz.plot_expert_classes(tables, ["a", "b"], k=2)
    assert "adds up to 200%" in fig._suptitle.get_text()
    assert "adds up to" not in viz.plot_expert_classes(tables, ["a", "b"], k=1)._suptitle.get_text()


def test_bytes_moved_legends_are_readable():
    panels = [{"xlabel": "cf", "x": [1, 2], "curves": {"only kept rows travel (minimoe)": [1, 2],
                                                      "fixed buffers of C rows per expert": [3, 4]},
               "points": {"measured": ([1, 2], [1, 2])}}]
    fig = viz.plot_bytes_moved(panels)
    assert all(t.get_fontsize() >= 8.5 for t in fig.axes[0].get_legend().get_texts())
