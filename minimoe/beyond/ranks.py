"""P ranks in one process: an MPI communicator played by threads, for lessons and tests.

:func:`run_ranks` runs ``fn(comm)`` once per rank, each in its own thread, and hands each a
:class:`LocalComm` with the few calls of mpi4py's communicator that ``parallel.py`` uses
(``Get_size``, ``Get_rank``, ``allgather``, ``allreduce``, ``Alltoallv``, ``Allreduce``), with
MPI's meaning: the n-th collective of every rank meets the n-th of every other, and what
travels is a copy.

It behaves like MPI where it matters most, when something goes wrong. A rank that raises
(or returns) simply stops taking part, as a dead MPI process would; the others run on. Under
MPI, a rank waiting in a collective that a gone rank never reaches waits forever; here it
raises :class:`RankSkipped`, naming that rank and what became of it::

    rank 1 never reached collective #3 (allgather): it raised ValueError: x must ...

at once if the missing rank has finished (it can never come), or after ``timeout`` seconds
if it is still running. So a test on simulated ranks sees every hang the real job would
have. ``run_ranks`` then raises the first *real* error (not a ``RankSkipped``), with the
other ranks' errors in its notes.
"""
from __future__ import annotations

import pickle
import threading
import time

import numpy as np

__all__ = ["LocalComm", "run_ranks", "RankSkipped"]


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
    if not isinstance(n_ranks, int) or n_ranks < 1:
        raise ValueError(f"n_ranks must be an integer ≥ 1, got {n_ranks!r}")
    if not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    world = _World(n_ranks, float(timeout))
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
    errors = [(r, e) for r, e in enumerate(world.ended) if e != "returned"]
    if errors:
        real = [(r, e) for r, e in errors if not isinstance(e, RankSkipped)] or errors
        first = real[0][1]
        for r, e in errors:
            if e is not first:
                first.add_note(f"rank {r} raised {type(e).__name__}: {e}")
        raise first
    return results
