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
supervisor reads them only where they can decide something, at the pace
:class:`PrivatePace` sets from their measured cost.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import psutil

# How often a worker's process tree is looked up again (a scan of /proc:
# about a millisecond on a busy machine); its members' memory is read at
# every call.
TREE_SECONDS = 1.0
# The share of one core that reading private memory may take in the
# supervisor's loop: a round that cost 50 ms (16 workers of 216 MiB) is
# followed by the next one 5 s later.
PRIVATE_CPU_SHARE = 0.01


@dataclass(frozen=True)
class Usage:
    """Bytes of a worker's process tree, each figure summed over its members."""

    rss: int  # resident
    uss: int  # private: a page shared with a process the worker forked counts in neither
    pss: int  # proportional


class ProcessTree:
    """A worker and the processes it forked: a handler that forks helpers is
    judged by what they hold too."""

    def __init__(self, pid: int):
        self.process = _process(pid)
        self._members: list[psutil.Process] = []
        self._next_lookup = 0.0

    def rss(self) -> int:
        total = 0
        for member in self._current_members():
            try:
                total += member.memory_info().rss
            except psutil.Error:
                pass  # gone meanwhile
        return total

    def usage(self) -> Usage:
        """All three figures; costly (see the module's docstring)."""
        rss = uss = pss = 0
        for member in self._current_members():
            try:
                memory = member.memory_full_info()
            except psutil.Error:
                continue  # gone meanwhile
            rss, uss, pss = rss + memory.rss, uss + memory.uss, pss + memory.pss
        return Usage(rss, uss, pss)

    def _current_members(self) -> list[psutil.Process]:
        """The tree as last looked up, at most TREE_SECONDS ago."""
        if self.process is None:
            return []
        now = time.monotonic()
        if now >= self._next_lookup:
            self._next_lookup = now + TREE_SECONDS
            try:
                self._members = [self.process, *self.process.children(recursive=True)]
            except psutil.Error:
                self._members = [self.process]
        return self._members


class PrivatePace:
    """When the supervisor may read its workers' private memory again.

    Its cost grows with the workers' resident memory, so a fixed period
    would be either slow for small workers or costly for large ones. After
    a round that cost ``cpu`` seconds the next waits ``cpu /
    PRIVATE_CPU_SHARE``: for small workers that is less than the period of
    the resident memory checks, so they are read at every check.
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
