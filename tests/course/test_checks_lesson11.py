"""Lesson 11's graders: blank fails clearly, independently written right answers pass, typical
mistakes get their hints, near misses fail, a per-token loop fails, and calling minimoe's own
answer fails; plus the lesson's helpers (the simulated exchange, the cost model, the run)."""
import numpy as np

from grader_cases import GraderContract, assert_fail, assert_pass
from minimoe.beyond import parallel
from minimoe.course.checks import lesson11


# ----------------------------------------------------------------------------- independent answers
def layout(idx, kept, E, P, round_robin=False, keep_dropped=False, per_expert=False, inclusive=False,
           token_sort=False):
    T, k = idx.shape
    flat = idx.reshape(-1)
    ids = np.arange(T * k)
    if not keep_dropped:
        ids = ids[kept.reshape(-1)]
    if token_sort:
        order = ids
    else:
        j = ids % k
        order = ids[np.lexsort((ids // k, j, flat[ids]))]     # by expert, then choice, then token
    e = flat[order]
    owner = e % P if round_robin else e // (E // P)
    counts = np.bincount(e, minlength=E) if per_expert else np.bincount(owner, minlength=P)
    displs = np.cumsum(counts) if inclusive else np.concatenate([[0], np.cumsum(counts)[:-1]])
    return order, counts, displs


def layout_token_loop(idx, kept, E, P):
    T, k = idx.shape
    rows = [[] for _ in range(E)]
    for j in range(k):
        for t in range(T):
            if kept[t, j]:
                rows[idx[t, j]].append(t * k + j)
    order = np.array([a for r in rows for a in r], dtype=int)
    counts = np.array([sum(len(rows[e]) for e in range(E) if e // (E // P) == r) for r in range(P)])
    return order, counts, np.cumsum(counts) - counts


def layout_calls_minimoe(idx, kept, E, P):
    T, k = idx.shape
    counts = np.zeros((1, k, E), dtype=int)
    for j in range(k):
        counts[0, j] = np.bincount(idx[:, j], minlength=E)
    plan, _ = parallel.global_plan(idx, counts, 0, None, E)
    order = plan.order[kept.reshape(-1)[plan.order]]
    c = np.bincount(idx.reshape(-1)[order] // (E // P), minlength=P)
    return order, c, np.cumsum(c) - c


def arrival(blocks, same_home=False, no_sort=False, by_source=False):
    blocks = np.asarray(blocks)
    P, Er = blocks.shape
    sizes = blocks.reshape(-1)
    labels = np.repeat(np.tile(np.arange(Er), P), sizes)
    if no_sort:
        perm = np.arange(labels.size)
    elif by_source:                                      # grouped by expert, sources reversed
        src = np.repeat(np.repeat(np.arange(P), Er), sizes)
        perm = np.lexsort((-src, labels))
    else:
        perm = np.lexsort((np.arange(labels.size), labels))
    home = perm.copy() if same_home else np.argsort(perm)
    return perm, home


def arrival_loop(blocks):
    blocks = np.asarray(blocks)
    P, Er = blocks.shape
    rows, at = [[] for _ in range(Er)], 0
    for s in range(P):
        for e in range(Er):
            for _ in range(blocks[s, e]):
                rows[e].append(at)
                at += 1
    perm = np.array([i for r in rows for i in r], dtype=int)
    home = np.zeros_like(perm)
    for i, p in enumerate(perm):
        home[p] = i
    return perm, home


def arrival_calls_check(blocks):
    return lesson11.arrival_permutation_ref(blocks)


def back(d_received, counts, transpose=True):
    """By hand: rank r's received rows, split by source, go back to their source."""
    counts = np.asarray(counts)
    P = counts.shape[0]
    c = counts if transpose else counts.T
    pieces = [np.split(d_received[r], np.cumsum(c[:, r])[:-1]) for r in range(P)]
    return [np.concatenate([pieces[r][s] for r in range(P)]) for s in range(P)]


def back_with_exchange(d_received, counts):
    return lesson11.exchange(d_received, np.asarray(counts).T)


CASES = [
    (lesson11.send_layout, layout, [
        (layout_token_loop, "grows with the number of tokens"),
        (layout_calls_minimoe, "minimoe's own answer"),
        (lambda *a: layout(*a, round_robin=True), "e // (E/P)"),
        (lambda *a: layout(*a, keep_dropped=True), "never travels"),
        (lambda *a: layout(*a, per_expert=True), "per *rank*"),
        (lambda *a: layout(*a, inclusive=True), "*start*"),
        (lambda *a: layout(*a, token_sort=True), "grouped by expert"),
    ]),
    (lesson11.arrival_permutation, arrival, [
        (arrival_loop, "grows with the number of tokens"),
        (arrival_calls_check, "minimoe's own answer"),
        (lambda b: arrival(b, same_home=True), "*inverse*"),
        (lambda b: arrival(b, no_sort=True), "grouped by expert"),
        (lambda b: arrival(b, by_source=True), "kind='stable'"),
    ]),
    (lesson11.exchange_backward, back, [
        (lambda d, c: back(d, c, transpose=False), "the way back"),
        (lambda d, c: lesson11.exchange_backward_ref(d, c), "minimoe's own answer"),
        (lambda d, c: [np.asarray(x) * 0 for x in back(d, c)], "wrong values"),
        (lambda d, c: [x[::-1] for x in back(d, c)], "wrong places"),
    ]),
]


def test_the_given_exchange_is_the_intended_answer_and_passes():
    assert_pass(lesson11.exchange_backward(back_with_exchange), "11")


# ----------------------------------------------------------------------------- integer near misses
# send_layout and arrival_permutation return integer arrays: no float to nudge, so their near
# misses are explicit, each one integer off (GraderContract's NO_GENERIC_NEAR_MISS, as lesson 06).
def displ_off_by_one(idx, kept, E, P):               # the last rank's start one row late
    order, counts, displs = layout(idx, kept, E, P)
    displs = displs.copy()
    displs[-1] += 1
    return order, counts, displs


def count_to_wrong_rank(idx, kept, E, P):             # one row counted for the next rank (displs follow)
    order, counts, _ = layout(idx, kept, E, P)
    counts = counts.copy()
    src = int(np.flatnonzero(counts)[0])
    counts[src] -= 1
    counts[(src + 1) % P] += 1
    return order, counts, np.cumsum(counts) - counts


def two_rows_swapped(idx, kept, E, P):                # the same rows, two of them in each other's place
    order, counts, displs = layout(idx, kept, E, P)
    order = order.copy()
    order[[0, -1]] = order[[-1, 0]]
    return order, counts, displs


def one_row_off(idx, kept, E, P):                     # one assignment id off by one (the next choice)
    order, counts, displs = layout(idx, kept, E, P)
    order = order.copy()
    order[0] += 1
    return order, counts, displs


def home_rolled(blocks):                              # home off by one place
    perm, home = arrival(blocks)
    return perm, np.roll(home, 1)


def perm_two_swapped(blocks):                         # two arrivals exchanged (home still its inverse)
    perm, _ = arrival(blocks)
    perm = perm.copy()
    perm[[0, -1]] = perm[[-1, 0]]
    return perm, np.argsort(perm)


def home_one_off(blocks):                             # one entry of home off by one
    perm, home = arrival(blocks)
    home = home.copy()
    home[0] = (home[0] + 1) % home.size
    return perm, home


NEAR_MISSES = {
    "send_layout": [(displ_off_by_one, "displs"), (count_to_wrong_rank, None), (two_rows_swapped, None),
                    (one_row_off, None)],
    "arrival_permutation": [(home_rolled, "inverse of perm"), (perm_two_swapped, None), (home_one_off, None)],
}


class TestGraders(GraderContract):
    LESSONS = (lesson11.LESSON,)
    CASES = CASES
    NO_GENERIC_NEAR_MISS = ("send_layout", "arrival_permutation")   # integer arrays: no float to nudge
    NEAR_MISSES = NEAR_MISSES


def test_a_tiny_error_on_the_way_back_fails():
    def tiny_error(d, c):
        return [x + 1e-9 for x in back(d, c)]
    res = lesson11.exchange_backward(tiny_error)
    assert_fail(res, "off by the same constant 1e-09")
    assert "wrong places" not in res.message


def test_references_agree_with_the_layer_and_the_loops():
    for seed, (T, E, k, P, cf) in enumerate([(24, 8, 2, 2, 1.0), (30, 8, 1, 4, 0.75), (40, 6, 3, 3, None)]):
        idx, kept = lesson11.routing_case(seed, T, E, k, P, cf)
        want = lesson11.send_layout_ref(idx, kept, E, P)
        for got in (layout(idx, kept, E, P), layout_token_loop(idx, kept, E, P)):
            for a, b in zip(got, want):
                np.testing.assert_array_equal(a, b)
        blocks = np.random.default_rng(seed).integers(0, 5, size=(P, E // P))
        for a, b in zip(arrival(blocks), lesson11.arrival_permutation_ref(blocks)):
            np.testing.assert_array_equal(a, b)


def test_exchange_moves_rows_like_an_alltoallv():
    counts = np.array([[1, 2], [3, 0]])
    sends = [np.array([[0.], [1.], [2.]]), np.array([[10.], [11.], [12.]])]
    got = lesson11.exchange(sends, counts)
    np.testing.assert_array_equal(got[0].ravel(), [0., 10., 11., 12.])   # rank 0: 1 from 0, 3 from 1
    np.testing.assert_array_equal(got[1].ravel(), [1., 2.])


def test_cost_model_counts_remote_rows_four_times():
    assert lesson11.cost_model(T=100, d=10, k=2, n_ranks=2, itemsize=8) == 4 * 100 * 2 * 0.5 * 10 * 8
    assert lesson11.cost_model(T=100, d=10, k=2, n_ranks=1) == 0
    padded = lesson11.cost_model(T=100, d=10, k=2, n_ranks=4, capacity_factor=1.5, padded=True)
    assert padded == 1.5 * lesson11.cost_model(T=100, d=10, k=2, n_ranks=4)


def test_simulated_demo_run_equals_the_single_process_layer():
    r = lesson11.simulate(2)
    assert r["ranks"] == 2 and r["experts_per_rank"] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert max(r["max_diff_y"], r["max_diff_dx"], r["max_rel_diff_W_gate_grad"]) < 1e-12
    assert abs(r["aux_loss"] - r["aux_loss_single"]) < 1e-12 and r["dropped"] == r["dropped_single"]
    assert sum(r["rows_treated"]) == 512 * 2 - r["dropped"] and min(r["sent_bytes"]) > 0


def test_bytes_figure_draws_every_panel_curve_and_point(tmp_path):
    from minimoe.course import viz
    panels = [{"xlabel": "E", "x": [1, 2], "curves": {"model": [1024, 2048]}, "points": {"run": ([1, 2], [0, 4096])}},
              {"xlabel": "cf", "x": [1, 2], "curves": {"a": [1, 2], "b": [3, 4]}}]
    fig = viz.plot_bytes_moved(panels, tmp_path / "b.png")
    assert (tmp_path / "b.png").exists()
    ax0, ax1 = fig.axes
    assert [list(l.get_ydata()) for l in ax0.lines] == [[1.0, 2.0], [0.0, 4.0]]     # shown in KiB
    assert len(ax1.lines) == 2 and ax0.get_xlabel() == "E"


# ----------------------------------------------------------------------------- issue 22
def test_float_counts_or_displacements_fail():
    """MPI's Alltoallv takes integer counts and displacements; the docstring says int."""
    def float_displs(idx, kept, E, P):
        order, counts, displs = layout(idx, kept, E, P)
        return order, counts, displs.astype(float)

    def float_counts(idx, kept, E, P):
        order, counts, displs = layout(idx, kept, E, P)
        return order, counts.astype(float), displs
    assert_fail(lesson11.send_layout(float_displs), "displs", "integer")
    assert_fail(lesson11.send_layout(float_counts), "counts", "integer")


def test_swapped_perm_and_home_are_named():
    assert_fail(lesson11.arrival_permutation(lambda b: arrival(b)[::-1]), "swapped")


def test_value_errors_on_the_way_back_are_not_blamed_on_placement():
    for wrong, fragment in [(lambda d, c: [-x for x in back(d, c)], "wrong sign"),
                            (lambda d, c: [x / len(d) for x in back(d, c)], "constant factor"),
                            (lambda d, c: [x + 1e-4 for x in back(d, c)], "constant")]:
        res = lesson11.exchange_backward(wrong)
        assert_fail(res, fragment)
        assert "wrong rows" not in res.message


def test_rows_in_the_wrong_places_are_named():
    def reversed_rows(d, c):
        return [x[::-1] for x in back(d, c)]
    assert_fail(lesson11.exchange_backward(reversed_rows), "wrong places")


def test_zeroing_d_received_in_place_is_named():
    def zeroes(d, c):
        out = back(d, c)
        for x in d:
            x[...] = 0
        return out
    assert_fail(lesson11.exchange_backward(zeroes), "d_received", "in place")


def test_exchange_backward_with_a_loop_over_rows_fails():
    def row_by_row(d, c):
        c = np.asarray(c)
        P = c.shape[0]
        out = [[] for _ in range(P)]
        for r in range(P):
            src = np.repeat(np.arange(P), c[:, r])
            for i, row in enumerate(d[r]):              # one row at a time
                out[src[i]].append(row)
        return [np.array(o).reshape(-1, d[0].shape[1]) for o in out]
    assert_pass(lesson11.exchange_backward(back))
    assert_fail(lesson11.exchange_backward(row_by_row), "grows with the number of")
