"""What the bench/ scripts share: child processes, CPU accounting, the report.

Kept apart from the benchmarks themselves so that their code reads as the
list of what is measured, not as process plumbing, and so that every script
judges its figures against targets, and prints them, the same way.
"""

from __future__ import annotations

import cProfile
import ctypes
import enum
import json
import os
import platform
import pstats
import re
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import psutil

from iris.tool.latency import nearest_rank

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


T = TypeVar("T")


def in_checkout(checkout: str) -> dict[str, Any]:
    """``subprocess`` arguments that run a child on the code of ``checkout``:
    its directory first on the path, and the working directory, because
    ``python -m`` (the relay, irishost and its fork servers) puts the working
    directory ahead of ``PYTHONPATH``."""
    return {"cwd": checkout, "env": {**os.environ, "PYTHONPATH": checkout}}


def alternating(sides: Sequence[T], rounds: int) -> Iterator[T]:
    """Each side once per round, in ABBA order (ABC CBA ...), so a slow drift
    of the machine's load favours no side."""
    for number in range(rounds):
        yield from (sides if number % 2 == 0 else sides[::-1])


class Child:
    """A subprocess that announces readiness with one line on stdout.

    stderr goes to a temporary file, shown when the child fails, so a crash
    in the relay or the service is explained rather than seen as a timeout.
    """

    def __init__(self, argv: Sequence[str], name: str, checkout: str | None = None):
        """``checkout``: run on that checkout's code (see :func:`in_checkout`)."""
        self.name = name
        # Lives as long as the child, closed by stop(): no with-block fits.
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115
        self.proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            preexec_fn=_die_with_parent,
            **(in_checkout(checkout) if checkout else {}),
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


def free_port() -> int:
    """A loopback port nothing listens on (bound once, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_relay(
    profile_to: str | None = None, extra: Sequence[str] = (), checkout: str | None = None
) -> tuple[Child, int]:
    """Start ``python -m iris.relay --port 0``; return it and the port it chose.

    With ``profile_to`` the relay runs under cProfile instead (see
    :func:`profiled_relay_main`), which writes there when the relay exits on
    SIGTERM. ``extra``: more of the relay's options. ``checkout``: run the
    relay of that checkout of the project instead of this one.
    """
    args = ["--port", "0", "--log-level", "warning", *extra]
    if profile_to:
        bench_dir = os.path.dirname(os.path.abspath(__file__))
        code = (
            f"import sys; sys.path.insert(0, {bench_dir!r}); import _util; "
            "sys.exit(_util.profiled_relay_main(sys.argv[1], sys.argv[2:]))"
        )
        argv = [sys.executable, "-c", code, profile_to, *args]
    else:
        argv = [sys.executable, "-m", "iris.relay", *args]
    relay = Child(argv, "relay", checkout)
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


def select(benchmarks: Sequence[str], only: Sequence[str] | None) -> list[str]:
    """The benchmarks ``--only`` names, in run order; every one if it names none.

    Full names or prefixes ("request" runs both request benchmarks); an
    unknown name ends the run with the list to choose from.
    """
    if not only:
        return list(benchmarks)
    chosen = set()
    for wanted in only:
        matches = [name for name in benchmarks if name.startswith(wanted)]
        if not matches:
            raise SystemExit(f"unknown benchmark {wanted!r}; choose from {', '.join(benchmarks)}")
        chosen.update(matches)
    return [name for name in benchmarks if name in chosen]


# ---------------------------------------------------------------------------
# The report: figures, their targets and verdicts, and the machine they ran on.


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, for a report's machine line."""
    return ", ".join(f"{value:.2f}" for value in os.getloadavg())


def machine() -> dict[str, str | int]:
    """What the figures were measured on; they mean little without it.

    A script that runs long adds ``load_at_end`` before it prints.
    """
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
        "load_at_start": load_average(),
    }


def describe_machine(machine: Mapping[str, str | int]) -> str:
    """One line for a report's head: the machine and how busy it was."""
    line = (
        f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['python']}, "
        f"{machine['os']}; load average {machine['load_at_start']} at start"
    )
    if "load_at_end" in machine:
        line += f", {machine['load_at_end']} at end"
    return line


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of an already sorted sequence; NaN for none."""
    return nearest_rank(sorted_values, fraction) if sorted_values else float("nan")


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


class Verdict(enum.StrEnum):
    """How a figure stands against its target; the words the tables print."""

    GOAL_MET = "goal met"
    FLOOR_MET = "floor met"
    GOAL_MISSED = "goal missed"  # no floor, or the floor holds but is not all we want
    BELOW_FLOOR = "BELOW FLOOR"  # the one a --strict run fails on


@dataclass(frozen=True)
class Target:
    """A product target: a floor that must hold, a goal to reach, or both.

    The thresholds apply to the figure itself, or with ``on_ratio`` to the
    figure divided by a baseline measured in the same run (irishost against
    plain iris, the ring against multiprocessing.Queue): on a shared machine
    a ratio of two figures taken side by side moves less than either.
    """

    floor: float | None = None
    goal: float | None = None
    higher_is_better: bool = True
    on_ratio: bool = False

    def __post_init__(self) -> None:
        if self.floor is None and self.goal is None:
            raise ValueError("a target needs a floor, a goal or both")

    def describe(self) -> str:
        """E.g. "floor >= 20,000, goal >= 30,000" or "floor <= 0.5x"."""
        sign = ">=" if self.higher_is_better else "<="
        parts = [
            f"{label} {sign} {f'{threshold:g}x' if self.on_ratio else format_value(threshold)}"
            for label, threshold in (("floor", self.floor), ("goal", self.goal))
            if threshold is not None
        ]
        return ", ".join(parts)

    def verdict(self, measured: float) -> Verdict:
        """``measured`` is the figure, or its ratio to the baseline if ``on_ratio``.

        NaN (a failed measurement or a zero baseline) meets nothing.
        """

        def met(threshold: float) -> bool:
            return measured >= threshold if self.higher_is_better else measured <= threshold

        if self.goal is not None and met(self.goal):
            return Verdict.GOAL_MET
        if self.floor is None:
            return Verdict.GOAL_MISSED
        return Verdict.FLOOR_MET if met(self.floor) else Verdict.BELOW_FLOOR


@dataclass
class Row:
    """One figure of a report, as printed and as written to JSON."""

    benchmark: str
    value: float
    unit: str
    ratio: float | None = None  # value / the baseline's value, when there is one
    target: str = ""
    verdict: str = ""
    peers: str = ""  # the same figure of other systems, measured elsewhere


# The report's columns: (header, how a row shows in it). A column no row
# fills is left out, so each script's table has only the columns it uses.
_COLUMNS: tuple[tuple[str, str], ...] = (
    ("benchmark", "benchmark"),
    ("value", "value"),
    ("unit", "unit"),
    ("ratio", "ratio"),
    ("target", "target"),
    ("verdict", "verdict"),
    ("peers on this machine", "peers"),
)


def _cell(row: Row, attribute: str) -> str:
    if attribute == "value":
        return format_value(row.value)
    if attribute == "ratio":
        return "" if row.ratio is None else f"{format_value(row.ratio)}x"
    return str(getattr(row, attribute))


@dataclass
class Report:
    """A benchmark run's figures, each judged against its target if it has one.

    A benchmark that fails to run goes to ``errors`` under its name, so one
    failure does not hide the other figures.
    """

    machine: dict[str, str | int]
    mode: str  # "full", "quick" or what the script's options chose
    rows: list[Row] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)

    def add(
        self,
        benchmark: str,
        value: float,
        unit: str,
        target: Target | None = None,
        *,
        baseline: float | None = None,
        peers: str = "",
    ) -> Row:
        """One figure; with ``baseline`` also its ratio, which an ``on_ratio`` target judges."""
        row = Row(benchmark, value, unit, peers=peers)
        if baseline is not None:
            row.ratio = value / baseline if baseline else float("nan")
        if target is not None:
            if target.on_ratio and row.ratio is None:
                raise ValueError(f"{benchmark}: a target on a ratio needs a baseline")
            row.target = target.describe()
            row.verdict = target.verdict(row.ratio if target.on_ratio else value)
        self.rows.append(row)
        return row

    def add_latencies(
        self,
        benchmark: str,
        samples_us: Sequence[float],
        target: Target | None = None,
        *,
        baseline: Mapping[str, float] | None = None,
        peers: str = "",
    ) -> dict[str, float]:
        """Mean, p50, p99 and sample count rows; the target is on the mean.

        Returns the three latencies, to pass as another distribution's
        ``baseline`` (each of its rows then gets its ratio to the same row here).
        """
        ordered = sorted(samples_us)
        stats = {
            "mean": sum(ordered) / len(ordered) if ordered else float("nan"),
            "p50": percentile(ordered, 0.50),
            "p99": percentile(ordered, 0.99),
        }
        for name, value in stats.items():
            self.add(
                f"{benchmark}, {name}",
                value,
                "us",
                target if name == "mean" else None,
                baseline=baseline[name] if baseline else None,
                peers=peers if name == "mean" else "",
            )
        self.add(f"{benchmark}, samples", len(ordered), "count")
        return stats

    def missed(self) -> list[str]:
        """The figures below their floor: what makes a --strict run fail."""
        return [row.benchmark for row in self.rows if row.verdict == Verdict.BELOW_FLOOR]

    def table(self) -> str:
        """The figures as one Markdown table, with the columns some row fills."""
        columns = [
            (header, attribute)
            for header, attribute in _COLUMNS
            if attribute in ("benchmark", "value", "unit")
            or any(_cell(row, attribute) for row in self.rows)
        ]
        return markdown_table(
            [header for header, _ in columns],
            [[_cell(row, attribute) for _, attribute in columns] for row in self.rows],
        )

    def print(self, *sections: str) -> None:
        """Machine line, table and any further ``sections``; errors to stderr."""
        print(f"{describe_machine(self.machine)}; mode: {self.mode}")
        print()
        print(self.table())
        for section in sections:
            print()
            print(section)
        for name, error in self.errors.items():
            print(f"\nERROR in {name}: {error}", file=sys.stderr)

    def write_json(self, path: str, **extra: object) -> None:
        """The report, and ``extra`` (e.g. the settings), as one JSON object."""
        with open(path, "w") as out:
            json.dump({**asdict(self), **extra}, out, indent=2, default=str)
