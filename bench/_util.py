"""Helpers for bench/iris_bench.py: child processes, CPU accounting, output.

Kept apart from the benchmark itself so that the measurement code reads as
the list of what is measured, not as process plumbing.
"""

from __future__ import annotations

import cProfile
import ctypes
import os
import platform
import pstats
import re
import selectors
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence

import psutil

# How long a child may take to print its readiness line. Generous: a cold
# interpreter on a loaded 2-core machine can take a second to import iris.
READY_TIMEOUT = 15.0
# How long a child gets to exit after SIGTERM before it is killed. The relay
# under cProfile needs a moment to write its statistics.
STOP_TIMEOUT = 10.0

_LISTENING = re.compile(r"listening on 127\.0\.0\.1:(\d+)")
_PR_SET_PDEATHSIG = 1
# Looked up here, not in the forked child: dlopen after fork in a threaded
# parent can deadlock.
try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux: the parent's finally blocks still clean up
    _prctl = None


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it if the benchmark dies.

    Without this a benchmark killed by SIGKILL (or a CI timeout) would leave
    a relay and a service running, skewing every later measurement.
    """
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))


class Child:
    """A subprocess that announces readiness with one line on stdout.

    stderr goes to a temporary file, shown when the child fails, so a crash
    in the relay or the service is explained rather than seen as a timeout.
    """

    def __init__(self, argv: Sequence[str], name: str):
        self.name = name
        # Lives as long as the child, closed by stop(): no with-block fits.
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115
        self.proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            preexec_fn=_die_with_parent,
        )
        self.ps = psutil.Process(self.proc.pid)

    def readline(self, timeout: float = READY_TIMEOUT) -> str:
        """The child's next stdout line; raises with its stderr if none comes."""
        deadline = time.monotonic() + timeout
        line = b""
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            while not line.endswith(b"\n"):
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not sel.select(remaining):
                    raise RuntimeError(
                        f"{self.name}: no output in {timeout:g} s{self.stderr_tail()}"
                    )
                octet = os.read(self.proc.stdout.fileno(), 1)
                if not octet:
                    raise RuntimeError(f"{self.name} exited early{self.stderr_tail()}")
                line += octet
        return line.decode().rstrip("\n")

    def cpu(self) -> tuple[float, float]:
        """User and system CPU seconds the child has used so far."""
        times = self.ps.cpu_times()
        return times.user, times.system

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        """SIGTERM (so profilers can write their output), then SIGKILL."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()
        self._stderr.close()

    def stderr_tail(self) -> str:
        """The end of what the child wrote to stderr, prefixed for a message."""
        self._stderr.seek(0)
        text = self._stderr.read().decode(errors="replace").strip()
        return f"; stderr:\n{text[-3000:]}" if text else ""


def start_relay(profile_to: str | None = None) -> tuple[Child, int]:
    """Start ``python -m iris.relay --port 0``; return it and the port it chose.

    With ``profile_to`` the relay runs under cProfile instead (see
    :func:`profiled_relay_main`), which writes there when the relay exits on
    SIGTERM.
    """
    args = ["--port", "0", "--log-level", "warning"]
    if profile_to:
        bench_dir = os.path.dirname(os.path.abspath(__file__))
        code = (
            f"import sys; sys.path.insert(0, {bench_dir!r}); import _util; "
            "sys.exit(_util.profiled_relay_main(sys.argv[1], sys.argv[2:]))"
        )
        argv = [sys.executable, "-c", code, profile_to, *args]
    else:
        argv = [sys.executable, "-m", "iris.relay", *args]
    relay = Child(argv, "relay")
    try:
        line = relay.readline()
        match = _LISTENING.search(line)
        if not match:
            raise RuntimeError(f"relay printed an unexpected line: {line!r}")
        return relay, int(match.group(1))
    except BaseException:
        relay.stop()
        raise


def cpu_profile() -> cProfile.Profile:
    """A profiler of the calling thread's CPU time, not of wall time.

    With three busy processes on two cores, and many threads per process
    taking turns at the GIL, wall time charges a function for every moment
    its thread waited to run; the thread's CPU clock charges only the work.
    """
    return cProfile.Profile(time.thread_time_ns, 1e-9)


def profiled_relay_main(profile_to: str, args: list[str]) -> int:
    """The relay's main under :func:`cpu_profile`, dumped to ``profile_to`` at exit.

    ``python -m cProfile`` would do, but it can only time wall clock, which
    on this loop is mostly epoll waiting and preemption by the other two
    processes.
    """
    from iris.relay.cli import main

    profile = cpu_profile()
    profile.enable()
    try:
        return main(args)
    finally:
        profile.disable()
        profile.dump_stats(profile_to)


def own_cpu() -> tuple[float, float]:
    """User and system CPU seconds of this process (all its threads)."""
    times = psutil.Process().cpu_times()
    return times.user, times.system


def machine_busy_cpu() -> float:
    """CPU seconds every core of the machine has spent not idle."""
    times = psutil.cpu_times()
    idle = times.idle + getattr(times, "iowait", 0.0) + getattr(times, "steal", 0.0)
    # guest time is already part of user time on Linux.
    guest = getattr(times, "guest", 0.0) + getattr(times, "guest_nice", 0.0)
    return sum(times) - idle - guest


def thread_cpu_by_role() -> dict[str, float]:
    """CPU seconds of this process's threads, summed by role.

    A role is the thread name without its numeric suffix ("iris-request-3"
    -> "iris-request"; the reader threads are all "iris-reader"), so a pool
    of 64 requesters reads as one line. The times come from the scheduler's
    nanosecond counters (/proc/self/task/TID/schedstat): the tick-based
    per-thread times psutil reports undercount threads that each run in
    short slices, by a third with 64 requesters.
    """
    names = {t.native_id: t.name for t in threading.enumerate()}
    roles: dict[str, float] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as stat:
                seconds = int(stat.read().split()[0]) / 1e9
        except (OSError, ValueError, IndexError):
            continue  # the thread ended meanwhile
        role = re.sub(r"(-\d+)+$", "", names.get(int(tid), "other"))
        roles[role] = roles.get(role, 0.0) + seconds
    return roles


class AllThreadsProfile:
    """cProfile over every thread, for processes whose work is off the main thread.

    In CPython 3.11 a cProfile.Profile only sees the thread that enabled it,
    yet a binding's time is spent in its reader and handler threads. So each
    thread started after :meth:`enable` gets its own Profile on its first
    profiling event (via ``threading.setprofile``), and :meth:`dump` merges
    them. Deterministic profiling inflates small functions (each timer read
    is a system call); read the output for proportions, not absolute times.
    """

    def __init__(self) -> None:
        self._profiles: list[cProfile.Profile] = []
        self._lock = threading.Lock()

    def enable(self) -> None:
        """Profile the calling thread and every thread started from now on."""
        threading.setprofile(self._start_in_thread)
        self._own = self._start_in_thread()

    def _start_in_thread(self, *_event) -> cProfile.Profile:
        """Replace the bootstrap hook with a Profile of the calling thread."""
        profile = cpu_profile()
        with self._lock:
            self._profiles.append(profile)
        profile.enable()
        return profile

    def stats(self) -> pstats.Stats:
        """The merged statistics so far; other threads may still be running.

        Stops profiling the thread that called :meth:`enable` and new
        threads; the others keep their profiler until they end.
        """
        threading.setprofile(None)
        self._own.disable()
        with self._lock:
            snapshots = [_Snapshot(profile) for profile in self._profiles]
        return pstats.Stats(*(s for s in snapshots if s.stats))


class _Snapshot:
    """A Profile's statistics taken without ``create_stats``.

    ``create_stats`` disables profiling in the *calling* thread, not the
    profiled one, so merging from the main thread would stop the wrong
    profiler; pstats accepts any object with ``stats`` and ``create_stats``.
    """

    def __init__(self, profile: cProfile.Profile):
        profile.snapshot_stats()
        self.stats = profile.stats

    def create_stats(self) -> None:
        """Already taken in __init__."""


def machine() -> dict[str, str | int]:
    """What the figures were measured on; they mean little without it."""
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count() or 0,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "os": f"{platform.system()} {platform.release()}",
        # Other work on a 2-core machine moves every figure; a reader can tell.
        "load_1min": round(os.getloadavg()[0], 2),
    }


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of an already sorted sequence."""
    if not sorted_values:
        return float("nan")
    rank = max(0, min(len(sorted_values) - 1, round(fraction * len(sorted_values)) - 1))
    return sorted_values[rank]


def format_value(value: float) -> str:
    """Three significant figures, thousands separated: readable in a table."""
    if value != value:  # NaN: the measurement failed
        return "n/a"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table with padded columns, readable as plain text too."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    separator = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), separator, *(line(row) for row in rows)])
