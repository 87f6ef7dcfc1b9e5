"""minimoe/beyond/ranks.py: simulated ranks that behave like MPI (a failed rank is gone), and
the meetings that keep ranks in step (ranks.Call).

Issue 21, finding 1: the simulator aborted its barrier when a rank raised, so the other ranks
were released and no test could see that under real MPI they would wait forever; a rank that
skipped a collective gave a bare ``BrokenBarrierError()`` after 60 s. Now a rank that raises
or returns simply stops taking part, and a rank waiting for it in a collective gets an error
that names it and what became of it.
"""
import threading
import time

import numpy as np
import pytest

from minimoe.beyond.ranks import Call, LocalComm, RankSkipped, run_ranks


def test_a_rank_that_raises_is_named_by_the_rank_waiting_for_it():
    seen = {}

    def fn(comm):
        if comm.Get_rank() == 1:
            comm.allgather("first")
            raise ValueError("bad input on rank 1")
        comm.allgather("first")
        try:
            comm.allgather("second")                  # rank 1 never comes
        except RankSkipped as err:
            seen["error"] = err
            raise
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="bad input on rank 1"):     # the first real error
        run_ranks(2, fn, timeout=30)
    assert time.perf_counter() - t0 < 10, "a dead rank is known at once: no need to wait for the timeout"
    message = str(seen["error"])
    assert "rank 1 never reached collective #2 (allgather)" in message
    assert "it raised ValueError: bad input on rank 1" in message
    assert not isinstance(seen["error"], threading.BrokenBarrierError)


def test_a_rank_that_returned_early_is_named():
    with pytest.raises(RankSkipped, match=r"rank 2 never reached collective #1 \(Allreduce\): it returned"):
        run_ranks(3, lambda comm: None if comm.Get_rank() == 2 else comm.Allreduce(np.ones(2), np.empty(2)))


def test_a_rank_still_running_is_named_after_the_timeout():
    def fn(comm):
        if comm.Get_rank() == 0:
            time.sleep(1.5)                            # alive, but far from the collective
            return "late"
        return comm.allgather(1)
    t0 = time.perf_counter()
    with pytest.raises(RankSkipped, match=r"rank 0 did not reach collective #1 \(allgather\) within 0.3 s"):
        run_ranks(2, fn, timeout=0.3)
    assert time.perf_counter() - t0 < 5


def test_a_failed_rank_does_not_release_the_others_early():
    """The old simulator aborted its barrier when a rank raised, so every other rank's next
    collective failed at once, whoever it waited for. Now a failed rank is just gone: the
    others run on until a collective needs it, and run_ranks still raises its error."""
    done = []

    def fn(comm):
        if comm.Get_rank() == 0:
            raise KeyError("gone")
        time.sleep(0.2)                                # rank 0 is gone by now; no collective needs it
        done.append(comm.Get_rank())
        return comm.Get_rank()
    with pytest.raises(KeyError, match="gone"):
        run_ranks(3, fn)
    assert sorted(done) == [1, 2]


def test_collectives_of_different_kinds_are_an_error_on_every_rank():
    errors = []

    def fn(comm):
        try:
            if comm.Get_rank() == 0:
                comm.allgather(1)
            else:
                comm.Allreduce(np.ones(1), np.empty(1))
        except RankSkipped as err:
            errors.append(str(err))
            raise
    with pytest.raises(RankSkipped):
        run_ranks(2, fn)
    assert len(errors) == 2
    assert all("collective #1: rank 0 called allgather, rank 1 called Allreduce" in e for e in errors), errors


def test_collectives_move_copies_like_mpi():
    def fn(comm):
        r = comm.Get_rank()
        got = comm.allgather({"rank": r, "data": np.full(2, r)})
        got[1 - r]["data"][:] = 99                     # the receiver's copy, not the sender's
        send = np.arange(6.0) + 10 * r                 # 2 numbers for rank 0, then 4 for rank 1
        recv = np.empty(4 if r == 0 else 8)
        rc = np.array([2, 2]) if r == 0 else np.array([4, 4])
        comm.Alltoallv([send, (np.array([2, 4]), np.array([0, 2]))], [recv, (rc, np.cumsum(rc) - rc)])
        send[:] = -1                                   # reusable once the call returned
        total = np.empty(2)
        comm.Allreduce(np.full(2, r + 1.0), total)
        return got, recv, total, comm.allreduce(r + 1)
    (g0, recv0, t0, s0), (g1, recv1, t1, s1) = run_ranks(2, fn)
    assert [g["rank"] for g in g0] == [0, 1]
    assert g0[0]["data"].tolist() == [0, 0] and g1[1]["data"].tolist() == [1, 1]
    np.testing.assert_array_equal(recv0, [0, 1, 10, 11])
    np.testing.assert_array_equal(recv1, [2, 3, 4, 5, 12, 13, 14, 15])
    assert t0.tolist() == t1.tolist() == [3.0, 3.0] and s0 == s1 == 3


def test_results_come_back_in_rank_order_and_a_comm_is_not_built_by_hand():
    assert run_ranks(4, lambda comm: (comm.Get_rank(), comm.Get_size())) == [(r, 4) for r in range(4)]
    with pytest.raises(ValueError, match="n_ranks must be >= 1, got 0"):
        run_ranks(0, lambda comm: None)
    with pytest.raises(TypeError, match="n_ranks must be an integer, got 2.0"):
        run_ranks(2.0, lambda comm: None)
    with pytest.raises(ValueError, match="timeout must be a finite number > 0, got 0"):
        run_ranks(2, lambda comm: None, timeout=0)
    with pytest.raises(TypeError, match="timeout must be a number, got '5'"):
        run_ranks(2, lambda comm: None, timeout="5")
    assert LocalComm.__doc__ and "run_ranks" in LocalComm.__doc__


# ----------------------------------------------------------------------------- the meetings

class Custom(Exception):
    pass


def meeting(P, per_rank):
    """Each rank: ``per_rank(rank, call)`` inside the Call protocol; returns what each raised."""
    def fn(comm):
        call = None
        try:
            call = Call(comm, "forward", hint="; build them alike")
            per_rank(comm.Get_rank(), call)
            call.meet()                                      # the next collective's meeting
            return None
        except Exception as err:   # noqa: BLE001
            try:
                (Call(comm, "forward") if call is None else call).fail(err)
            except Exception as everyone:   # noqa: BLE001
                return everyone
    return run_ranks(P, fn, timeout=10)


def test_a_rank_that_fails_brings_its_error_to_the_meeting_and_every_rank_raises_it():
    def per_rank(r, call):
        if r == 1:
            raise FloatingPointError("overflow here")
    errors = meeting(3, per_rank)
    assert all(type(e) is FloatingPointError and str(e) == "rank 1 failed: FloatingPointError: overflow here"
               for e in errors), errors
    assert isinstance(errors[1].__cause__, FloatingPointError) and errors[0].__cause__ is None


def test_ranks_failing_alike_are_grouped_and_unlike_or_unknown_types_give_a_runtime_error():
    errors = meeting(3, lambda r, call: (_ for _ in ()).throw(ValueError("bad x")) if r != 1 else None)
    assert all(type(e) is ValueError and str(e) == "ranks 0, 2 failed: ValueError: bad x" for e in errors)

    def mixed(r, call):
        raise (KeyError("W9") if r == 0 else Custom("mine"))
    errors = meeting(2, mixed)
    assert all(type(e) is RuntimeError and str(e) == "rank 0 failed: KeyError: 'W9'; rank 1 failed: Custom: mine"
               for e in errors), errors
    errors = meeting(2, lambda r, call: (_ for _ in ()).throw(UnicodeDecodeError("utf-8", b"", 0, 1, "x")))
    assert all(type(e) is RuntimeError and "UnicodeDecodeError" in str(e) for e in errors)   # needs 5 arguments


def test_ranks_that_disagree_or_are_in_different_calls_raise_the_same_error():
    errors = meeting(2, lambda r, call: call.meet({"k": 2, "train": r == 0}))
    assert all(type(e) is ValueError and str(e) == "the ranks disagree on train: rank 0 has True, rank 1 has False"
               "; build them alike" for e in errors), errors
    errors = meeting(2, lambda r, call: call.meet({"k": 2} if r == 0 else {"k": 2, "extra": 1}))
    assert all("disagree on extra: rank 0 has None, rank 1 has 1" in str(e) for e in errors), errors

    def kind(r, call):
        call.kind = "backward" if r == 1 else "forward"
    errors = meeting(2, kind)
    assert all(str(e).startswith("the ranks are not in the same call: rank 0 is in forward (meeting 1), rank 1 "
                                 "in backward (meeting 1)") for e in errors), errors

    def about(r, call):
        call.about = (r, "forwards")
    errors = meeting(2, about)
    assert all(str(e) == "the ranks are not in the same call: rank 0 and rank 1 are in forward of different "
               "forwards" for e in errors), errors


def test_after_the_last_collective_a_failure_is_its_rank_alone():
    def fn(comm):
        call = Call(comm, "forward")
        call.meet()
        call.open = False                                    # the call's last collective has run
        if comm.Get_rank() == 1:
            try:
                raise Custom("local")
            except Custom as err:
                try:
                    call.fail(err)
                except Custom as same:
                    return same is err
        return "no meeting"
    assert run_ranks(2, fn) == ["no meeting", True]
