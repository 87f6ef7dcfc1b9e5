"""Ranks that never wait forever: the meetings of a collective call, and P ranks in one process.

Under MPI, a rank that raises leaves the others waiting forever in their next collective.
Two tools here keep that from happening, and show that it does not.

**Meetings.** A :class:`Call` is one collective call on one rank (a layer's forward, say).
Before every collective of the call, the ranks *meet* (:meth:`Call.meet`): one small
allgather of each rank's tag (the call and the meeting's number), what the ranks must
agree on, and its error if it failed. Every rank reads the same list, so either all go on
to the collective or all raise the same error, naming the rank(s) and the cause::

    ValueError: rank 1 failed: ValueError: dy must have shape (15, 6), got (4, 6)

A rank that fails anywhere in the call calls :meth:`Call.fail`: while the call still owes
a collective, it takes part in exactly one meeting, the one the other ranks are heading
for, carrying its error. After the call's last collective a failure is its rank's alone.

**Simulated ranks.** :func:`run_ranks` runs ``fn(comm)`` once per rank, each in its own
thread, with a :class:`LocalComm`: the few calls of mpi4py's communicator that
``parallel.py`` uses (``Get_size``, ``Get_rank``, ``allgather``, ``allreduce``,
``Alltoallv``, ``Allreduce``), with MPI's meaning: the n-th collective of every rank meets
the n-th of every other, and what travels is a copy. A rank that raises (or returns)
simply stops taking part, as a dead MPI process would; a rank waiting in a collective that
a gone rank never reaches raises :class:`RankSkipped`, naming that rank and what became of it::

    rank 1 never reached collective #3 (allgather): it raised ValueError: x must ...

at once if the missing rank has finished (it can never come), or after ``timeout`` seconds
if it is still running. So a test on simulated ranks sees every hang the real job would
have. ``run_ranks`` then raises the first *real* error, with the others' in its notes.
"""
from __future__ import annotations

import builtins
import pickle
import threading
import time

import numpy as np

from ..validate import check_int, check_positive_float

__all__ = ["Call", "LocalComm", "run_ranks", "RankSkipped"]


# --------------------------------------------------------------------------- the meetings
class Call:
    """One collective call on one rank, and the meetings before its collectives.

    ``kind`` names the call ("forward"); ``about``, None or ``(value, what)``: what the call
    works on, which ranks in the same kind of call must agree on (e.g. which forward a
    backward goes through); ``hint`` ends the message when the ranks disagree on ``agree``.

    The owner of a call keeps three rules. It makes the Call inside its ``try``, so that a
    failure even while setting up reaches a meeting::

        call = None
        try:
            call = Call(comm, "forward")
            ...                              # call.meet() before every collective
        except Exception as err:
            (Call(comm, "forward") if call is None else call).fail(err)

    It sets ``call.open = False`` right after the call's last collective. And between a
    meeting and its collective it runs nothing that could fail (not even a function call).
    ``Exception`` is what travels: KeyboardInterrupt and SystemExit stop this process, and
    under ``python -m mpi4py`` MPI then aborts every rank.
    """

    def __init__(self, comm, kind, about=None, hint=""):
        self.comm, self.kind, self.about, self.hint = comm, kind, about, hint
        self.count, self.open = 0, True

    def meet(self, agree=None, data=None, error=None):
        """Every rank's ``(tag, error, data)``, in rank order, once all checked that no rank
        failed and all agree (``agree``: a dict of plain values); else every rank raises."""
        self.count += 1
        mine = (self.kind, self.count, self.about, agree)
        everyone = self.comm.allgather((mine, error, data))
        ok = True
        for theirs, err, _ in everyone:   # no call here: nothing may fail between a meeting and its collective
            ok = ok and err is None and theirs == everyone[0][0]
        if not ok:
            self.open = False             # every rank read the same list: nobody meets again in this call
            raise _call_error(everyone, self.hint)
        return everyone

    def fail(self, err):
        """This rank failed: bring ``err`` to the meeting the others are heading for, where every
        rank raises the one error naming it; after the call's last collective, raise it here alone."""
        if not self.open:
            raise err
        try:
            self.meet(error=(type(err).__name__, str(err)))
        except Exception as everyone:     # noqa: BLE001 - the ranks' error, always raised here
            raise everyone from err


def _call_error(everyone, hint):
    """The one error every rank raises after a meeting that went wrong (from the list all ranks saw)."""
    failed = {}
    for r, (_, error, _) in enumerate(everyone):
        if error is not None:
            failed.setdefault(error, []).append(str(r))
    if failed:
        message = "; ".join(f"rank{'s' * (len(rs) > 1)} {', '.join(rs)} failed: {name}: {text}"
                            for (name, text), rs in failed.items())
        kind = getattr(builtins, next(iter(failed))[0], None) if len({n for n, _ in failed}) == 1 else None
        if isinstance(kind, type) and issubclass(kind, Exception):      # the original type, where sensible
            try:
                return kind(message)
            except Exception:          # noqa: BLE001 - a type that wants other arguments
                pass
        return RuntimeError(message)
    first = everyone[0][0]
    r, (kind, count, about, agree) = next((r, e[0]) for r, e in enumerate(everyone) if e[0] != first)
    if (kind, count) != first[:2]:
        return RuntimeError(f"the ranks are not in the same call: rank 0 is in {first[0]} (meeting {first[1]}), "
                            f"rank {r} in {kind} (meeting {count}); every rank must make the same calls, in order")
    if about != first[2]:
        return RuntimeError(f"the ranks are not in the same call: rank 0 and rank {r} are in {kind} of different "
                            f"{about[1]}")
    ours, theirs = first[3] or {}, agree or {}
    name = next(n for n in [*ours, *theirs] if ours.get(n) != theirs.get(n))
    return ValueError(f"the ranks disagree on {name}: rank 0 has {ours.get(name)!r}, rank {r} has "
                      f"{theirs.get(name)!r}{hint}")


# --------------------------------------------------------------------------- P ranks in one process
class RankSkipped(RuntimeError):
    """A rank waited in a collective that another rank never reached (under MPI: a hang)."""


class _World:
    """What the P threads share: the collectives posted so far, and how each rank ended."""

    def __init__(self, size, timeout):
        self.size, self.timeout = size, timeout
        self.cond = threading.Condition()
        self.posted = {}                 # collective number -> {rank: (kind, item)}
        self.read = {}                   # collective number -> how many ranks took their items
        self.ended = [None] * size       # None while running, then "returned" or the exception


class LocalComm:
    """A stand-in for an mpi4py communicator on simulated ranks; build them with :func:`run_ranks`."""

    def __init__(self, rank, world):
        self._rank, self._world, self._count = rank, world, 0

    def Get_size(self):
        return self._world.size

    def Get_rank(self):
        return self._rank

    def _collective(self, kind, item):
        """Post ``item`` as this rank's next collective, wait for every rank's, return them in rank order."""
        world = self._world
        self._count += 1
        n = self._count
        with world.cond:
            slot = world.posted.setdefault(n, {})
            slot[self._rank] = (kind, item)
            world.cond.notify_all()
            deadline = time.monotonic() + world.timeout
            while len(slot) < world.size:
                missing = [r for r in range(world.size) if r not in slot]
                left = deadline - time.monotonic()
                if all(world.ended[r] is not None for r in missing) or left <= 0:
                    raise RankSkipped("; ".join(self._why(r, n, kind) for r in missing))
                world.cond.wait(left)
            kinds, items = zip(*(slot[r] for r in range(world.size)))
            world.read[n] = world.read.get(n, 0) + 1
            if world.read[n] == world.size:            # everyone has its copy: free the slot
                del world.posted[n], world.read[n]
        if len(set(kinds)) > 1:
            raise RankSkipped(f"collective #{n}: " + ", ".join(f"rank {r} called {k}" for r, k in enumerate(kinds))
                              + " (under MPI: undefined, usually a hang)")
        return list(items)

    def _why(self, r, n, kind):
        ended = self._world.ended[r]
        if ended is None:
            return (f"rank {r} did not reach collective #{n} ({kind}) within {self._world.timeout:g} s "
                    "(it is still running: under MPI, a hang)")
        how = "it returned" if ended == "returned" else f"it raised {type(ended).__name__}: {ended}"
        return f"rank {r} never reached collective #{n} ({kind}): {how}"

    def allgather(self, obj):
        """Every rank's ``obj``, in rank order; each receiver gets its own copy (pickled, as mpi4py does)."""
        return [pickle.loads(b) for b in self._collective("allgather", pickle.dumps(obj))]

    def allreduce(self, obj):
        """The sum of every rank's ``obj`` (in rank order)."""
        return _sum(self.allgather(obj))

    def Alltoallv(self, send, recv):
        """``[sendbuf, (counts, displs)]``, ``[recvbuf, (counts, displs)]``: counts in elements, per rank."""
        (sbuf, (sc, sd)), (rbuf, (rc, rd)) = send, recv
        posted = self._collective("Alltoallv", (np.array(sbuf, copy=True).reshape(-1), np.asarray(sc),
                                                np.asarray(sd)))
        out, r = rbuf.reshape(-1), self._rank
        for s, (buf, counts, displs) in enumerate(posted):         # a loop over ranks
            out[rd[s]:rd[s] + rc[s]] = buf[displs[r]:displs[r] + counts[r]]

    def Allreduce(self, send, recv):
        """``recv = Σ_ranks send`` (in rank order, so every rank gets the same bits)."""
        recv[...] = _sum(self._collective("Allreduce", np.array(send, copy=True)))


def _sum(items):
    total = items[0]
    for item in items[1:]:
        total = total + item
    return total


def run_ranks(n_ranks, fn, timeout=5.0):
    """Run ``fn(comm)`` on ``n_ranks`` simulated ranks (threads); their results, in rank order.

    ``timeout``: seconds a rank waits in a collective for a rank that is still running
    (a rank that has already returned or raised is reported at once).
    If a rank raised, the first real error is raised here (the others' in its notes).
    """
    n_ranks = check_int("n_ranks", n_ranks, low=1)
    world = _World(n_ranks, check_positive_float("timeout", timeout))
    results = [None] * n_ranks

    def work(r):
        try:
            results[r] = fn(LocalComm(r, world))
            ended = "returned"
        except BaseException as err:   # noqa: BLE001 - the rank is gone; handed to the caller below
            ended = err
        with world.cond:
            world.ended[r] = ended
            world.cond.notify_all()

    threads = [threading.Thread(target=work, args=(r,), daemon=True) for r in range(n_ranks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    errors = [(r, e) for r, e in enumerate(world.ended) if isinstance(e, BaseException)]
    if errors:
        real = [(r, e) for r, e in errors if not isinstance(e, RankSkipped)] or errors
        first = real[0][1]
        for r, e in errors:
            if e is not first:
                first.add_note(f"rank {r} raised {type(e).__name__}: {e}")
        raise first
    return results
