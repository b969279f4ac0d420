"""Chaos: a steady request load against irishost while faults are injected.

Run as ``python bench/chaos.py [--seconds 60] [--seed 1]`` (the run takes
``--seconds`` plus about 15 s to settle and clean up; loopback only).

The rig: an external relay process on a fixed free port, irishost with 2
workers on it (``relay.embedded = false``, ``limits.max_rss = 150MiB``,
``workers.timeout_grace = 1s``, 2 request threads per worker) running a
handler written for the run, and CLIENTS client threads, each with its own
connection, sending ``ok:<client>:<n>`` requests back to back with a 2 s
timeout and checking every reply is their own request echoed.

Faults come one at a time, in an order drawn from the seed, each once the
previous one has recovered (plus a short random gap):

- kill: SIGKILL a worker (chosen by the seed);
- balloon: a request whose handler allocates 170 MiB and keeps it, past
  ``max_rss`` (but below the 1.5 x ``max_rss`` that kills a worker at
  once), so the supervisor recycles its worker;
- init-fail: SIGKILL a worker while ``init`` raises in every new worker (a
  flag file the handler checks: a database briefly down) for INIT_OUTAGE
  seconds; the slot must be retried with backoff, not stop the host;
- hang: a request (1 s timeout) whose handler never returns, so the
  supervisor kills its worker at deadline + ``timeout_grace``;
- raise: a request whose handler raises;
- reload: SIGHUP to the host (a new generation of workers takes over);
- fork-server-kill: SIGKILL a fork server (chosen by the seed); the workers it
  forked must not notice, and the next spawn launches a fresh one;
- slow-reload: ``irishost reload --wait`` of code whose import takes
  SLOW_IMPORT seconds (a flag file the handler checks at import); replies
  must keep flowing meanwhile (survived: the reload completed, and no load
  request took 1 s or more);
- bad-reload: the same, of code whose import calls ``os._exit`` or raises
  (the seed picks); survived: the reload failed, said why, and the running
  workers carried on;
- relay: SIGKILL the relay process and start it again on the same port.
  Clients' connections break: pending calls end with ClosedError ("closed"
  below) and the client threads reconnect with backoff;
- oversize: a request whose reply is over the relay's 64 MiB message
  limit; its caller must get a fault, and nobody else may notice;
- broadcast-exit: a broadcast whose handler raises SystemExit (a
  BaseException); a broadcast sent after it must still reach every worker.

The last two test the binding's own guards (iris.connection, iris.pool);
the "survived" column says whether the promise held.

Every request is accounted for: a reply (checked), a fault (grouped by its
text with the numbers blanked), a timeout, closed, or unanswered: a call
that had not returned by its timeout plus MARGIN. For each fault it prints
the time from injection to the first successful load request sent after it,
and to full strength (2 ready workers, the victims replaced, the relay
connected). Exit status 1 if any request went unanswered, got a wrong reply
or raised something undocumented, or if the run left a process or a
/dev/shm segment behind.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import logging
import os
import random
import re
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import _util
import psutil

import iris
from irishost.ops.control import ControlError, query_status, send_command
from irishost.wire.ring import segment_prefix

CLIENTS = 6
WORKERS = 2
TIMEOUT = 2.0  # every load request's
# The binding itself ends a call at its timeout plus RELAY_GRACE (2 s) if the
# relay never answers; a call still running past this margin is a hang.
MARGIN = 5.0
MAX_RSS_MIB = 150
BALLOON_MIB = 170
HANG_TIMEOUT = 1.0
# How long new workers fail in init during an init-fail fault.
INIT_OUTAGE = 1.0
INIT_FLAG = "init-fails"
# The handler's import sleeps this long while SLOW_FLAG exists, and ends the
# process or raises (as the file says: "exit" or "raise") while BAD_FLAG does.
SLOW_IMPORT = 3.0
SLOW_FLAG = "import-slow"
BAD_FLAG = "import-bad"
# What a slow reload may cost a load request at most, for "survived".
SLOW_RELOAD_LATENCY = 1.0
# How long a reload --wait may take before the injector gives up on it.
RELOAD_WAIT = 30.0
# The "oversize" reply: just over the relay's default 64 MiB message limit.
OVERSIZE_MIB = 65
# How long a broadcast sent after "broadcast-exit" may take to reach every worker.
BROADCAST_CHECK_SECONDS = 3.0
TIMEOUT_GRACE = 1.0
# Longest wait for full strength before the next fault is injected anyway.
RECOVERY_LIMIT = 20.0
# Pause between a recovery and the next fault, drawn from this range.
GAP_SECONDS = (0.5, 2.0)
# Load replies to see before the first fault.
WARM_UP_REPLIES = 100
RECONNECT_START, RECONNECT_CAP = 0.05, 1.0
FAULTS = (
    "kill",
    "balloon",
    "hang",
    "raise",
    "reload",
    "relay",
    "init-fail",
    "oversize",
    "broadcast-exit",
    "fork-server-kill",
    "slow-reload",
    "bad-reload",
)

HANDLER_MODULE = "chaos_handler"
HANDLER_SOURCE = '''\
"""The handler of bench/chaos.py, written here for one run."""

import os
import threading
import time

import iris

MiB = 1 << 20
_hoard = []  # what "balloon" keeps
HERE = os.path.dirname(os.path.abspath(__file__))
INIT_FLAG = os.path.join(HERE, "{init_flag}")

# Reloaded code that is slow to import, or broken (see the flags in chaos.py).
if os.path.exists(os.path.join(HERE, "{slow_flag}")):
    time.sleep({slow_import})
_bad = os.path.join(HERE, "{bad_flag}")
if os.path.exists(_bad):
    with open(_bad) as flag:
        how = flag.read()
    if how == "exit":
        os._exit(3)
    raise RuntimeError("chaos: the reloaded code raises at import")


class ChaosHandler(iris.ServiceHandler):
    def init(self, conn):
        if os.path.exists(INIT_FLAG):
            raise RuntimeError("chaos: init fails while the flag file exists")

    def handle_request(self, request: bytes) -> bytes:
        kind, _, argument = request.partition(b":")
        if kind == b"ok":
            return request
        if kind == b"balloon":  # written bytes, so the pages are resident
            _hoard.append(b"x" * (int(argument) * MiB))
            return b"ballooned in %d" % os.getpid()
        if kind == b"hang":
            threading.Event().wait()
        if kind == b"raise":
            raise RuntimeError("chaos: the handler raised on purpose")
        if kind == b"oversize":
            return b"x" * (int(argument) * MiB)
        raise ValueError(f"unknown request {request[:40]!r}")

    def handle_broadcast(self, message: bytes) -> None:
        kind, _, argument = message.partition(b":")
        if kind == b"exit":
            raise SystemExit("chaos: a broadcast handler raised SystemExit on purpose")
        if kind == b"mark":  # seen by this worker: a file the chaos run looks for
            open(os.path.join(HERE, f"mark-{argument.decode()}-{os.getpid()}"), "w").close()
'''

CONFIG = """\
[service]
cluster = "{cluster}"
handler = "{module}:ChaosHandler"
path = ["{directory}"]

[relay]
port = {port}
embedded = false
connect_timeout = "10s"

[workers]
count = {workers}
timeout_grace = "{grace}s"
shutdown_timeout = "5s"

[limits]
request_threads = 2
max_rss = "{max_rss}MiB"

[control]
socket = "{directory}/control.sock"

[logging]
level = "warning"
"""


# -- bookkeeping ---------------------------------------------------------------------


class Outcome(NamedTuple):
    source: str  # "load", or the kind of fault request
    kind: str  # reply, fault, timeout, closed, wrong, error, unanswered
    detail: str  # the fault's group, the wrong reply, the error
    sent: float
    answered: float


def fault_group(text: str) -> str:
    """A fault's text with numbers blanked (pids, slots), so like faults group."""
    text = re.sub(r"\d+", "N", text)
    return text if len(text) <= 100 else text[:97] + "..."


class Ledger:
    """Every request: in flight until its call returns, then one Outcome."""

    def __init__(self, cluster: str):
        self.cluster = cluster
        self._lock = threading.Lock()
        self.outcomes: list[Outcome] = []
        self._in_flight: dict[int, tuple[str, float, float]] = {}
        self._tokens = itertools.count()
        self.last_served = 0.0  # when the latest load request with a reply was sent

    def call(
        self, conn: iris.Connection, source: str, payload: bytes, timeout: float, check: Callable
    ) -> Outcome:
        token = next(self._tokens)
        sent = time.monotonic()
        with self._lock:
            self._in_flight[token] = (source, sent, timeout)
        try:
            reply = conn.request(self.cluster, payload, timeout)
            kind, detail = ("reply", "") if check(reply) else ("wrong", repr(reply[:60]))
        except iris.RemoteError as err:
            kind, detail = "fault", fault_group(err.fault)
        except iris.TimeoutError:
            kind, detail = "timeout", ""
        except iris.ClosedError:
            kind, detail = "closed", ""
        except Exception as err:  # not one of the documented outcomes: a bug
            kind, detail = "error", repr(err)
        answered = time.monotonic()
        if answered - sent > timeout + MARGIN:
            kind, detail = "unanswered", f"{kind} only after {answered - sent:.1f} s"
        outcome = Outcome(source, kind, detail, sent, answered)
        with self._lock:
            del self._in_flight[token]
            self.outcomes.append(outcome)
            if source == "load" and kind == "reply":
                self.last_served = max(self.last_served, sent)
        return outcome

    def overdue(self) -> list[Outcome]:
        """Calls still waiting past their timeout plus MARGIN."""
        now = time.monotonic()
        with self._lock:
            return [
                Outcome(source, "unanswered", "never returned", sent, float("inf"))
                for source, sent, timeout in self._in_flight.values()
                if now - sent > timeout + MARGIN
            ]

    def waiting(self, source: str) -> list[float]:
        """How long each call from ``source`` still in flight has been waiting."""
        now = time.monotonic()
        with self._lock:
            return [now - sent for kind, sent, _ in self._in_flight.values() if kind == source]

    def snapshot(self) -> list[Outcome]:
        with self._lock:
            return list(self.outcomes)


@dataclass
class Injection:
    kind: str
    at: float
    note: str = ""
    full_strength: float | None = None  # seconds after `at`, None if never
    survived: bool | None = None  # for faults with a promise of their own: whether it held
    thread: threading.Thread | None = None
    result: list = field(default_factory=list)


# -- the rig ---------------------------------------------------------------------------


class Rig:
    """The relay, the host, and the directory they run in."""

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="irishost-chaos-"))
        self.cluster = f"chaos-{uuid.uuid4().hex[:8]}"
        self.port = _util.free_port()
        (self.dir / f"{HANDLER_MODULE}.py").write_text(
            HANDLER_SOURCE.replace("{init_flag}", INIT_FLAG)
            .replace("{slow_flag}", SLOW_FLAG)
            .replace("{slow_import}", repr(SLOW_IMPORT))
            .replace("{bad_flag}", BAD_FLAG)
        )
        self.config = self.dir / "chaos.toml"
        self.config.write_text(
            CONFIG.format(
                cluster=self.cluster,
                module=HANDLER_MODULE,
                directory=self.dir,
                port=self.port,
                workers=WORKERS,
                grace=TIMEOUT_GRACE,
                max_rss=MAX_RSS_MIB,
            )
        )
        self.control = self.dir / "control.sock"
        self.relay: _util.Child | None = None
        self.host: _util.Child | None = None
        self.worker_pids: set[int] = set()

    def start_relay(self) -> None:
        argv = [sys.executable, "-m", "iris.relay", "--port", str(self.port)]
        self.relay = _util.Child([*argv, "--log-level", "warning"], "relay")
        line = self.relay.readline()
        if f":{self.port}" not in line:
            raise RuntimeError(f"relay printed {line!r}{self.relay.stderr_tail()}")

    def kill_relay(self) -> None:
        self.relay.proc.kill()
        self.relay.proc.wait()
        self.relay.stop()  # releases its pipes

    def start_host(self) -> None:
        argv = [sys.executable, "-m", "irishost", "-c", str(self.config)]
        self.host = _util.Child(argv, "irishost")
        deadline = time.monotonic() + 30
        while not self.full_strength(set(), replaced=0):
            if not self.host.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"irishost did not start{self.host.stderr_tail()}")
            time.sleep(0.1)

    def status(self) -> dict | None:
        try:
            status = query_status(self.control, timeout=2.0)
        except ControlError:
            return None
        self.worker_pids.update(worker["pid"] for worker in status["workers"])
        return status

    def restarts(self) -> int:
        status = self.status()
        return status["restarts"] if status is not None else 0

    def ready_pids(self) -> set[int]:
        status = self.status()
        if status is None:
            return set()
        return {w["pid"] for w in status["workers"] if w["state"] == "ready"}

    def full_strength(self, before: set[int], replaced: int) -> bool:
        """WORKERS ready, at least ``replaced`` of them new since ``before``,
        and the relay connected."""
        status = self.status()
        if status is None or status["relay"]["state"] != "connected":
            return False
        ready = {w["pid"] for w in status["workers"] if w["state"] == "ready"}
        return len(ready) == WORKERS and len(ready - before) >= replaced

    def fork_servers(self) -> list[int]:
        """The pids of the host's fork servers, by their process title."""
        try:
            children = psutil.Process(self.host.proc.pid).children()
        except psutil.Error:
            return []
        found = []
        for child in children:
            with contextlib.suppress(psutil.Error):
                if " ".join(child.cmdline()).startswith("irishost: fork server"):
                    found.append(child.pid)
        return sorted(found)

    def reload_and_wait(self) -> tuple[bool, str]:
        """``irishost reload --wait`` over the control socket: (completed, its answer)."""
        try:
            answer = send_command(self.control, {"cmd": "reload", "wait": True}, RELOAD_WAIT)
        except ControlError as err:
            return False, str(err)
        return True, answer["message"]

    def supervisor_fds(self) -> int:
        return psutil.Process(self.host.proc.pid).num_fds()

    def stop(self) -> dict[str, object]:
        """Stop the host and the relay; report how they ended and what is left."""
        report: dict[str, object] = {}
        if self.host is not None:
            if self.host.alive():
                self.host.proc.send_signal(signal.SIGTERM)
                try:
                    report["host exit"] = self.host.proc.wait(20)
                except Exception:
                    report["host exit"] = "hung on SIGTERM"
            self.host.stop()
        if self.relay is not None:
            if self.relay.alive():
                self.relay.proc.send_signal(signal.SIGTERM)
                try:
                    report["relay exit"] = self.relay.proc.wait(10)
                except Exception:
                    report["relay exit"] = "hung on SIGTERM"
            self.relay.stop()
        deadline = time.monotonic() + 5
        while True:
            alive = [pid for pid in self.worker_pids if _alive(pid)]
            if not alive or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        for pid in alive:
            os.kill(pid, signal.SIGKILL)
        report["workers left running"] = alive
        prefix = segment_prefix(self.cluster) + "-"
        report["/dev/shm left"] = [n for n in os.listdir("/dev/shm") if n.startswith(prefix)]
        shutil.rmtree(self.dir, ignore_errors=True)
        return report


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# -- load and faults ---------------------------------------------------------------------


class Load:
    """CLIENTS threads sending requests back to back, reconnecting when dropped."""

    def __init__(self, rig: Rig, ledger: Ledger):
        self.rig = rig
        self.ledger = ledger
        self.stopping = threading.Event()
        self.reconnects = Counter()  # connections made after the first, failed dials
        self.threads = [
            threading.Thread(target=self._client, args=(i,), name=f"client-{i}", daemon=True)
            for i in range(CLIENTS)
        ]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def dial(self) -> iris.Connection | None:
        delay = RECONNECT_START
        while not self.stopping.is_set():
            try:
                return iris.connect(self.rig.port)
            except OSError:  # the relay is down or not yet listening again
                self.reconnects["failed dials"] += 1
                self.stopping.wait(delay)
                delay = min(delay * 2, RECONNECT_CAP)
        return None

    def _client(self, index: int) -> None:
        conn = self.dial()
        for number in itertools.count():
            if conn is None or self.stopping.is_set():
                break
            if conn.closed:
                conn.close()
                conn = self.dial()
                self.reconnects["reconnects"] += 1
                continue
            payload = b"ok:%d:%d" % (index, number)
            self.ledger.call(conn, "load", payload, TIMEOUT, payload.__eq__)
        if conn is not None:
            conn.close()

    def stop(self) -> list[str]:
        """Stop and wait for every client; the names of any that did not end."""
        self.stopping.set()
        deadline = time.monotonic() + TIMEOUT + MARGIN + 1
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return [thread.name for thread in self.threads if thread.is_alive()]


class Chaos:
    """Injects the faults, one at a time, and times each one's recovery."""

    def __init__(self, rig: Rig, ledger: Ledger, load: Load, rng: random.Random):
        self.rig = rig
        self.ledger = ledger
        self.load = load
        self.rng = rng
        self.injections: list[Injection] = []
        self.started = time.monotonic()  # reset when the injections begin
        self._conn: iris.Connection | None = None

    def schedule(self):
        """Every kind of fault once per round, each round in a seeded order."""
        while True:
            kinds = list(FAULTS)
            self.rng.shuffle(kinds)
            yield from kinds

    def _connection(self) -> iris.Connection | None:
        """The injector's own client connection (None when stopping)."""
        if self._conn is None or self._conn.closed:
            self._conn = self.load.dial()
        return self._conn

    def _request(self, injection: Injection, payload: bytes, timeout: float, check) -> None:
        """Send a fault-inducing request on its own thread (a hang blocks)."""
        conn = self._connection()
        if conn is None:  # stopping
            return

        def run() -> None:
            injection.result.append(self.ledger.call(conn, injection.kind, payload, timeout, check))

        injection.thread = threading.Thread(target=run, name=f"inject-{injection.kind}")
        injection.thread.start()

    def inject(self, kind: str) -> None:
        rig = self.rig
        before = rig.ready_pids()
        injection = Injection(kind, time.monotonic())
        replaced = 1
        if kind == "kill":
            victim = self.rng.choice(sorted(before)) if before else None
            injection.note = f"SIGKILL worker pid {victim}" if victim else "no ready worker"
            if victim is not None:
                with contextlib.suppress(ProcessLookupError):  # died meanwhile
                    os.kill(victim, signal.SIGKILL)
        elif kind == "balloon":
            request = b"balloon:%d" % BALLOON_MIB
            self._request(injection, request, 10.0, lambda r: r.startswith(b"ballooned"))
            injection.note = f"{BALLOON_MIB} MiB held, max_rss {MAX_RSS_MIB} MiB"
        elif kind == "hang":
            self._request(injection, b"hang", HANG_TIMEOUT, lambda r: False)
            injection.note = f"timeout {HANG_TIMEOUT:g} s, grace {TIMEOUT_GRACE:g} s"
        elif kind == "raise":
            self._request(injection, b"raise", TIMEOUT, lambda r: False)
            replaced = 0
        elif kind == "reload":
            os.kill(rig.host.proc.pid, signal.SIGHUP)
            replaced = WORKERS
        elif kind == "init-fail":
            victim = self.rng.choice(sorted(before)) if before else None
            flag = rig.dir / INIT_FLAG
            flag.touch()
            restarts = rig.restarts()
            if victim is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(victim, signal.SIGKILL)
            time.sleep(INIT_OUTAGE)
            flag.unlink()
            failed = rig.restarts() - restarts - 1  # the kill itself is one restart
            injection.note = f"init failed {failed} times in {INIT_OUTAGE:g} s, pid {victim}"
        elif kind == "oversize":
            self._request(injection, b"oversize:%d" % OVERSIZE_MIB, 5.0, lambda r: False)
            injection.note = f"a {OVERSIZE_MIB} MiB reply"
            replaced = 0
        elif kind == "broadcast-exit":
            conn = self._connection()
            if conn is not None:
                conn.broadcast(rig.cluster, b"exit")
                conn.broadcast(rig.cluster, b"mark:%d" % len(self.injections))
            replaced = 0
        elif kind == "fork-server-kill":
            servers = rig.fork_servers()
            victim = self.rng.choice(servers) if servers else None
            injection.note = f"SIGKILL fork server pid {victim}" if victim else "no fork server"
            if victim is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(victim, signal.SIGKILL)
                time.sleep(0.5)  # the supervisor has seen it die by now
                kept = before <= rig.ready_pids()
                injection.survived = kept
                if not kept:
                    injection.note += "; workers it forked died with it"
            replaced = 0
        elif kind == "slow-reload":
            flag = rig.dir / SLOW_FLAG
            flag.touch()
            try:
                completed, answer = rig.reload_and_wait()
            finally:
                flag.unlink()
            took = time.monotonic() - injection.at
            worst = self._worst_latency(injection.at)
            injection.survived = completed and worst < SLOW_RELOAD_LATENCY
            injection.note = (
                f"import {SLOW_IMPORT:g} s; answered in {took:.1f} s: {answer!r}; "
                f"worst load latency meanwhile {worst:.3f} s"
            )
            replaced = WORKERS
        elif kind == "bad-reload":
            how = self.rng.choice(["exit", "raise"])
            flag = rig.dir / BAD_FLAG
            flag.write_text(how)
            try:
                completed, answer = rig.reload_and_wait()
            finally:
                flag.unlink()
            kept = before <= rig.ready_pids()
            injection.survived = not completed and "reload failed" in answer and kept
            said = answer.partition("reload failed: ")[2] or answer
            said = said.replace(str(rig.dir) + "/", "")
            injection.note = f"import {'calls os._exit' if how == 'exit' else 'raises'}: {said!r}"
            if not kept:
                injection.note += "; the running workers did not carry on"
            replaced = 0
        elif kind == "relay":
            rig.kill_relay()
            rig.start_relay()
            injection.note = f"relay down {time.monotonic() - injection.at:.2f} s"
            replaced = WORKERS  # a reconnect starts fresh workers
        self.injections.append(injection)
        # Recovered: the host at full strength and a load request sent since
        # the injection answered. Clients that reconnect to a restarted relay
        # before the host has registered again wait out their timeout (a
        # request for a cluster with no member times out, as in Iris).
        deadline = injection.at + RECOVERY_LIMIT
        while time.monotonic() < deadline:
            if injection.full_strength is None and rig.full_strength(before, replaced):
                injection.full_strength = time.monotonic() - injection.at
            served = self.ledger.last_served >= injection.at
            if injection.full_strength is not None and served:
                break
            time.sleep(0.02)
        if injection.thread is not None:
            injection.thread.join(TIMEOUT + MARGIN)
        if kind == "oversize":
            own = injection.result[0] if injection.result else None
            hurt = any(
                o.source == "load" and o.kind != "reply" and o.answered >= injection.at
                for o in self.ledger.snapshot()
            )
            injection.survived = own is not None and own.kind == "fault" and not hurt
        if kind == "broadcast-exit":
            self._check_broadcast_marker(injection, len(self.injections) - 1, before)

    def _worst_latency(self, since: float) -> float:
        """The longest a load request sent since ``since`` took (answered or not)."""
        taken = [
            o.answered - o.sent
            for o in self.ledger.snapshot()
            if o.source == "load" and o.answered >= since
        ]
        return max([*taken, *self.ledger.waiting("load")], default=0.0)

    def _check_broadcast_marker(self, injection: Injection, marker: int, workers: set[int]):
        """Whether the broadcast sent after the SystemExit one reached every worker."""
        deadline = injection.at + BROADCAST_CHECK_SECONDS
        while True:
            alive = workers & self.rig.ready_pids()
            seen = {pid for pid in alive if (self.rig.dir / f"mark-{marker}-{pid}").exists()}
            if seen == alive or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        injection.survived = seen == alive
        injection.note = f"a later broadcast reached {len(seen)} of {len(alive)} workers"

    def run(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        for kind in self.schedule():
            gap = self.rng.uniform(*GAP_SECONDS)
            if time.monotonic() + gap >= end:
                break
            time.sleep(gap)
            self.inject(kind)
            if time.monotonic() >= end:
                break
        if self._conn is not None:
            self._conn.close()


# -- the report ----------------------------------------------------------------------------


def first_success_after(outcomes: list[Outcome], at: float) -> float | None:
    after = [
        o.answered for o in outcomes if o.source == "load" and o.kind == "reply" and o.sent >= at
    ]
    return min(after) - at if after else None


def seconds(value: float | None) -> str:
    return "never" if value is None else f"{value:.2f}"


def report(
    args,
    machine: dict,
    rig: Rig,
    outcomes: list[Outcome],
    chaos: Chaos,
    load: Load,
    extra: dict,
    window: float,
) -> bool:
    """Print the tables; True if the run kept every promise."""
    print(f"## Chaos: {args.seconds:g} s, seed {args.seed}")
    print()
    print(
        f"{CLIENTS} client threads (own connection each, {TIMEOUT:g} s timeout), irishost "
        f"with {WORKERS} workers (2 request threads, max_rss {MAX_RSS_MIB} MiB, timeout_grace "
        f"{TIMEOUT_GRACE:g} s) on an external relay; unanswered = no return within the "
        f"timeout + {MARGIN:g} s."
    )
    machine["load_at_end"] = _util.load_average()
    print(_util.describe_machine(machine))
    print()

    load_outcomes = [o for o in outcomes if o.source == "load"]
    kinds = Counter(o.kind for o in load_outcomes)
    replies = kinds["reply"]
    rows = [
        ["requests sent", f"{len(load_outcomes):,}"],
        ["replies (checked)", f"{replies:,}"],
        ["faults", f"{kinds['fault']:,}"],
        ["timeouts", f"{kinds['timeout']:,}"],
        ["closed (connection dropped)", f"{kinds['closed']:,}"],
        ["wrong replies", f"{kinds['wrong']:,}"],
        ["undocumented errors", f"{kinds['error']:,}"],
        ["**unanswered**", f"**{kinds['unanswered']:,}**"],
        ["replies per second", f"{replies / window:,.0f}"],
        ["client reconnects", f"{load.reconnects['reconnects']:,}"],
    ]
    print("### Load requests")
    print()
    print(_util.markdown_table(["outcome", "count"], rows))
    print()

    causes = Counter(o.detail for o in load_outcomes if o.kind == "fault")
    if causes:
        print("### Faults by cause (load requests)")
        print()
        print(
            _util.markdown_table(
                ["fault text", "count"], [[k, f"{v:,}"] for k, v in causes.most_common()]
            )
        )
        print()

    rows = []
    for number, injection in enumerate(chaos.injections, 1):
        following = chaos.injections[number].at if number < len(chaos.injections) else float("inf")
        hurt = Counter(
            o.kind
            for o in load_outcomes
            if o.kind != "reply" and injection.at <= o.answered < following
        )
        own = injection.result[0] if injection.result else None
        rows.append(
            [
                str(number),
                f"{injection.at - chaos.started:.1f}",
                injection.kind,
                own.kind + (f" ({own.detail})" if own.detail else "") if own else "-",
                seconds(first_success_after(outcomes, injection.at)),
                seconds(injection.full_strength),
                ", ".join(f"{v} {k}" for k, v in sorted(hurt.items())) or "none",
                {None: "-", True: "yes", False: "**no**"}[injection.survived],
                injection.note,
            ]
        )
    print("### Faults injected")
    print()
    header = [
        "#",
        "at s",
        "fault",
        "fault request's own outcome",
        "first success after s",
        "host at full strength after s",
        "load requests hurt until next fault",
        "survived",
        "note",
    ]
    print(_util.markdown_table(header, rows))
    print()

    rows = []
    for kind in FAULTS:
        mine = [i for i in chaos.injections if i.kind == kind]
        if not mine:
            continue
        first = [first_success_after(outcomes, i.at) for i in mine]
        full = [i.full_strength for i in mine]
        rows.append(
            [
                kind,
                str(len(mine)),
                _summary(first),
                _summary(full),
            ]
        )
    print("### Recovery by fault (seconds: median / max)")
    print()
    print(
        _util.markdown_table(
            ["fault", "injected", "first successful request", "host at full strength"], rows
        )
    )
    print()

    unanswered = [o for o in outcomes if o.kind == "unanswered"]
    undocumented = [o for o in outcomes if o.kind in ("wrong", "error")]
    broken = [i for i in chaos.injections if i.survived is False]
    rows = [[key, str(value)] for key, value in extra.items()]
    print("### Clean-up")
    print()
    print(_util.markdown_table(["check", "result"], rows))
    print()
    ok = (
        not unanswered
        and not undocumented
        and not broken
        and not extra.get("clients that never ended")
        and extra.get("host exit") == 0
        and extra.get("relay exit") == 0
        and not extra.get("workers left running")
        and not extra.get("/dev/shm left")
    )
    for outcome in [*unanswered, *undocumented][:20]:
        print(f"PROBLEM: {outcome}")
    for injection in broken:
        print(f"PROBLEM: not survived: {injection.kind} ({injection.note})")
    print(
        "RESULT:", "every request answered exactly once, every fault survived" if ok else "FAILED"
    )
    return ok


def _summary(values: list[float | None]) -> str:
    done = [v for v in values if v is not None]
    if not done:
        return "never"
    text = f"{statistics.median(done):.2f} / {max(done):.2f}"
    missing = len(values) - len(done)
    return text + (f" ({missing} never)" if missing else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="injection window (60)")
    parser.add_argument("--seed", type=int, default=1, help="order of faults and victims (1)")
    args = parser.parse_args(argv)
    machine = _util.machine()

    # The binding warns of every dropped connection; here they are on purpose.
    logging.getLogger("iris").setLevel(logging.ERROR)
    rig = Rig()
    ledger = Ledger(rig.cluster)
    load = Load(rig, ledger)
    chaos = Chaos(rig, ledger, load, random.Random(args.seed))
    extra: dict[str, object] = {}
    try:
        rig.start_relay()
        rig.start_host()
        load.start()
        deadline = time.monotonic() + 30
        while sum(o.kind == "reply" for o in ledger.snapshot()) < WARM_UP_REPLIES:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no load replies during warm-up: {ledger.snapshot()[-5:]}")
            time.sleep(0.05)
        fds_start = rig.supervisor_fds()
        chaos.started = time.monotonic()
        chaos.run(args.seconds)
        window = time.monotonic() - chaos.started
        time.sleep(1.0)  # the load carries on a moment at full strength
        fds_end = rig.supervisor_fds()
        extra["clients that never ended"] = load.stop()
        overdue = ledger.overdue()
        extra["supervisor fds at start / end"] = f"{fds_start} / {fds_end}"
    finally:
        extra.update(rig.stop())
    extra["worker processes seen"] = len(rig.worker_pids)
    outcomes = ledger.snapshot() + overdue
    return 0 if report(args, machine, rig, outcomes, chaos, load, extra, window) else 1


if __name__ == "__main__":
    sys.exit(main())
