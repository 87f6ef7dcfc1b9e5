"""Issue 21, items 4 and 5 for the expert-parallel layer: a fault anywhere on any rank changes
nothing and leaves no rank waiting; gradients are fresh arrays.

The fault-injection test raises inside every minimoe function that one rank's forward or
backward calls, one at a time (the n-th call raises, for every n; on simulated ranks, where
``sys.settrace`` is per thread, so only that rank fails), and checks on every rank:

* the rank that raised has its whole state as before (params, grads, stats, aux_loss,
  cache, config — tests/moe_helpers.py's ``layer_state``);
* no rank was left waiting (the simulator would raise ``RankSkipped``): either every rank
  raised the one error naming the failing rank, or — a fault after the call's last
  collective — only the failing rank raised, its own error;
* the ranks are still in step: one more forward and backward works on every rank.

The simulator's functions in ``ranks.py`` are not counted: they play the MPI library, whose
collectives do not raise Python exceptions halfway (the meetings, ``ranks.Call``, are). Neither is the first call, ``forward`` or
``backward`` itself: an exception there (a wrong call signature) happens before the layer runs.
"""
import inspect
import sys
from pathlib import Path

import numpy as np
import pytest

import minimoe
from minimoe import MoELayer
from minimoe.beyond import ranks
from minimoe.beyond.parallel import ExpertParallelMoELayer, RankSkipped, run_ranks
from moe_helpers import assert_same_state, layer_state

PACKAGE = str(Path(minimoe.__file__).resolve().parent)
SIMULATOR = str(Path(ranks.__file__).resolve())
MPI_PART = ("LocalComm", "_World", "run_ranks", "_sum")      # what plays the MPI library in ranks.py


class Injected(Exception):
    """The fault the test injects."""


def _counts(frame):
    """A call of a minimoe function, other than the simulator's (the MPI library's part; the
    meetings of ranks.Call do count) and a generator's resumption (where an exception raised
    by a tracer is not propagated)."""
    code = frame.f_code
    simulator = code.co_filename == SIMULATOR and code.co_qualname.startswith(MPI_PART)
    return (code.co_filename.startswith(PACKAGE) and not simulator
            and not code.co_flags & (inspect.CO_GENERATOR | inspect.CO_COROUTINE))


def traced(call, at=None):
    """Run ``call()`` on this thread; raise :class:`Injected` as the ``at``-th counted call is
    entered (the first, the layer's method itself, is never hit). Returns how many were counted."""
    count = [0]

    def tracer(frame, event, arg):
        if event == "call" and _counts(frame):
            count[0] += 1
            if count[0] == at:
                sys.settrace(None)
                raise Injected(f"call {at}: {frame.f_code.co_name}")
        return None

    sys.settrace(tracer)
    try:
        call()
    finally:
        sys.settrace(None)
    return count[0]


CONFIGS = [
    dict(fast=True, gate="switch", balance="switch", switch_fraction="all/k", activation="swiglu",
         balance_groups="sequence", z_loss_coef=0.01, capacity_factor=0.75),
    dict(fast=False, balance="importance+load", z_loss_coef=0.01, capacity_factor=0.75),
]


def setup(kw):
    rng = np.random.default_rng(0)
    ref = MoELayer(3, 4, 4, k=2, rng=rng, **kw)
    x, dy = rng.standard_normal((2, 2, 3, 3)), rng.standard_normal((2, 2, 3, 3))   # per rank (B, S, d)
    noise = rng.standard_normal((2, 2, 3, 4))
    return ref, x, noise, dy


def run_with_fault(ref, x, noise, dy, what, bad, at):
    """Both ranks: a good step, then the call under test with a fault at call ``at`` on rank
    ``bad`` (counting only, if at is None), then a good step. Returns each rank's (error, count)."""

    def rank(comm):
        r = comm.Get_rank()
        par = ExpertParallelMoELayer.from_layer(ref, comm)
        par.forward(x[r], noise=noise[r])
        par.backward(dy[r])                                  # there is state to keep
        call = {"forward": lambda: par.forward(2 * x[r], noise=-noise[r]),
                "backward": lambda: par.backward(3 * dy[r])}[what]
        before, error, count = layer_state(par), None, None
        try:
            if r == bad:
                count = traced(call, at)
            else:
                call()
        except Exception as err:   # noqa: BLE001 - judged below
            error = err
            assert_same_state(before, par, f"{what}, fault at call {at} on rank {bad}: rank {r}'s state")
        par.forward(x[r], noise=noise[r])                    # still in step
        par.backward(dy[r])
        return error, count

    return run_ranks(2, rank, timeout=10)


@pytest.mark.parametrize("kw", CONFIGS, ids=["fast-swiglu-sequence-all/k", "textbook-importance+load"])
@pytest.mark.parametrize("what", ["forward", "backward"])
def test_a_fault_anywhere_on_one_rank_changes_nothing_and_leaves_no_rank_waiting(kw, what):
    ref, x, noise, dy = setup(kw)
    for bad in (0, 1):
        n_calls = run_with_fault(ref, x, noise, dy, what, bad, None)[bad][1]
        assert n_calls > 30, n_calls                         # the tracer does see the inner functions
        shared = 0
        for at in range(2, n_calls + 1):
            results = run_with_fault(ref, x, noise, dy, what, bad, at)
            errors = [e for e, _ in results]
            where = f"{what}, fault at call {at} of {n_calls} on rank {bad}"
            assert errors[bad] is not None, where
            assert not any(isinstance(e, RankSkipped) for e in errors), (where, errors)
            if isinstance(errors[bad], Injected):            # after the last collective: this rank alone
                assert errors[1 - bad] is None, (where, errors)
            else:                                            # every rank raised the one error naming it
                shared += 1
                assert all(f"rank {bad} failed: Injected: call {at}" in str(e) for e in errors), (where, errors)
                assert all(type(e) is RuntimeError for e in errors), (where, errors)
        assert shared > n_calls // 2, (shared, n_calls)      # most faults happen before the last collective


@pytest.mark.parametrize("fast", [True, False])
def test_gradients_are_fresh_arrays_each_backward(fast):
    """A user who keeps last step's gradients (to accumulate micro-batches) keeps them."""
    ref, x, noise, dy = setup(dict(fast=fast, balance="switch", activation="swiglu"))

    def rank(comm):
        r = comm.Get_rank()
        par = ExpertParallelMoELayer.from_layer(ref, comm)
        par.forward(x[r], noise=noise[r])
        par.backward(dy[r])
        first = dict(par.grads)
        kept = {k: v.copy() for k, v in first.items()}
        grads = par.grads
        par.forward(x[r], noise=noise[r])
        par.backward(2 * dy[r])
        assert par.grads is grads                            # the same dict, for an optimizer holding it
        for name in first:
            assert par.grads[name] is not first[name], name
            np.testing.assert_array_equal(first[name], kept[name], err_msg=name)
        return {k: v.copy() for k, v in par.grads.items()}, kept

    for new, old in run_ranks(2, rank):
        for name in ("W1", "b2", "W3"):                      # (the router's gradient also has its aux part)
            np.testing.assert_allclose(new[name], 2 * old[name], rtol=1e-12, atol=1e-14, err_msg=name)


def test_sent_bytes_and_exchange_time_count_the_forward_and_the_last_backward():
    ref, x, noise, dy = setup(dict(balance="switch"))

    def rank(comm):
        r = comm.Get_rank()
        par = ExpertParallelMoELayer.from_layer(ref, comm)
        par.forward(x[r], noise=noise[r])
        forward = par.stats["sent_bytes"]
        par.backward(dy[r])
        once = par.stats["sent_bytes"]
        par.backward(dy[r])
        return forward, once, par.stats["sent_bytes"], par.stats["exchange_seconds"]
    for forward, once, twice, seconds in run_ranks(2, rank):
        assert 0 < forward and once == twice == 2 * forward and seconds > 0   # backward moves what forward moved
