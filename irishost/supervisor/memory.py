"""A worker's memory three ways, and when the costly ways may be read.

- RSS, resident memory, counts every page the worker maps, shared or not.
  Workers forked from a fork server that preloaded 200 MiB each show those
  200 MiB, although one copy serves them all.
- USS, private memory, is what the worker alone holds: what its exit gives
  back to the machine, and what a leak in it grows.
- PSS, proportional memory, splits each shared page among the processes
  sharing it, so the workers' PSS add up to what they take from the machine.

RSS comes from /proc/PID/statm, a few microseconds a process. USS and PSS
come from /proc/PID/smaps_rollup (psutil's ``memory_full_info``; on kernels
older than 4.14, which lack it, psutil reads /proc/PID/smaps instead, slower
but the same figures), for which the kernel walks the process's page tables:
about 14 us per MiB resident, 3 ms for a worker of 216 MiB. So the
supervisor's loop reads them only where they can decide something (a worker
resident beyond ``max_private``), one worker at a time, at the pace
:class:`PrivatePace` sets from their measured cost. ``irishost status`` and
the metrics read them for every worker, on their own threads, when asked.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import psutil

# How often the machine's processes are scanned again for the workers'
# descendants (see Family); their memory is read at every call.
TREE_SECONDS = 1.0
# The share of one core that reading private memory may take in the
# supervisor's loop: a read that cost 3 ms (a worker of 216 MiB) is followed
# by the next one 0.3 s later.
PRIVATE_CPU_SHARE = 0.01


@dataclass(frozen=True)
class Usage:
    """Bytes of a worker's process tree, each figure summed over its members."""

    rss: int  # resident
    uss: int  # private: a page shared with a process the worker forked counts in neither
    pss: int  # proportional


class Family:
    """Who is whose child on this machine, for every worker's tree at once.

    psutil's ``children(recursive=True)`` scans all of /proc for each
    process it is asked about: 2-3 ms a worker on the loaded 2-core machine,
    33-47 ms a second for 16 workers looked up once a second each. One scan
    a period serves them all (7-8.5 ms). Shared by the supervisor's loop and the status
    and metrics threads, so under a lock.
    """

    def __init__(self, seconds: float = TREE_SECONDS):
        self.seconds = seconds  # how stale the answers may be
        self._lock = threading.Lock()
        self._children: dict[int, list[psutil.Process]] = {}
        self._next_scan = 0.0

    def descendants(self, pid: int) -> list[psutil.Process]:
        with self._lock:
            now = time.monotonic()
            if now >= self._next_scan:
                self._next_scan = now + self.seconds
                self._children = {}
                for process in psutil.process_iter(["ppid"]):
                    self._children.setdefault(process.info["ppid"], []).append(process)
            children = self._children
        found: list[psutil.Process] = []
        parents = [pid]
        while parents:
            for child in children.get(parents.pop(), []):
                found.append(child)
                parents.append(child.pid)
        return found


_FAMILY = Family()


class ProcessTree:
    """A worker and the processes it forked: a handler that forks helpers is
    judged by what they hold too."""

    def __init__(self, pid: int, family: Family = _FAMILY):
        self.process = _process(pid)
        self._family = family

    def rss(self) -> int:
        total = 0
        for member in self._members():
            try:
                total += member.memory_info().rss
            except psutil.Error:
                pass  # gone meanwhile
        return total

    def usage(self) -> Usage:
        """All three figures; costly (see the module's docstring)."""
        rss = uss = pss = 0
        for member in self._members():
            try:
                memory = member.memory_full_info()
            except psutil.Error:
                continue  # gone meanwhile
            rss, uss, pss = rss + memory.rss, uss + memory.uss, pss + memory.pss
        return Usage(rss, uss, pss)

    def _members(self) -> list[psutil.Process]:
        if self.process is None:
            return []
        return [self.process, *self._family.descendants(self.process.pid)]


class PrivatePace:
    """When the supervisor may read a worker's private memory again.

    The read's cost grows with the worker's resident memory, so a fixed
    period would be either slow for small workers or costly for large ones.
    After a read that cost ``cpu`` seconds the next waits ``cpu /
    PRIVATE_CPU_SHARE``: for a small worker less than the period of the
    resident memory checks, for 16 workers of 216 MiB about 5 s each.
    """

    def __init__(self) -> None:
        self.next_round = 0.0

    def due(self, now: float) -> bool:
        return now >= self.next_round

    def done(self, now: float, cpu: float) -> None:
        self.next_round = now + cpu / PRIVATE_CPU_SHARE


def _process(pid: int) -> psutil.Process | None:
    """The worker's process, for its memory; None if it is already gone.

    The supervisor may reap a worker that died at once before it has its
    pid: no zombie is left to look at.
    """
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None
