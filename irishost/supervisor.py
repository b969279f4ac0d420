"""The supervisor: one loop that owns the relay connection and the workers.

Like gunicorn's arbiter, the loop wakes on a timeout, on a signal (the
handlers only note the signal; ``signal.set_wakeup_fd`` wakes the loop) or
on data from a worker, and then does the steps in order: collect answers,
handle signals, reap dead workers, murder stuck ones, recycle bloated ones,
respawn what is missing. Nothing else runs on this thread, so the steps
never race each other; the relay connection's reader thread only touches the
worker table through RelayDispatch, under its lock.
"""

from __future__ import annotations

import enum
import itertools
import logging
import os
import random
import signal
import socket
import sys
import time
from collections import deque
from dataclasses import dataclass

import setproctitle

import iris
from iris.logfmt import configure_logging
from iris.logs import ContextLog
from iris.relay import RelayServer

from . import frames, worker
from .config import MAX_WORKERS, Config, ConfigError, load_config
from .control import Command, ControlError, ControlServer
from .dispatch import RelayDispatch
from .frames import Kind
from .loader import HandlerImportError, reload_handler
from .metrics import MetricsServer
from .notify import Notifier
from .ring import Ring, remove_stale_segments, segment_prefix, wait_readable
from .workers import BOOTING, DRAINING, READY, WorkerHandle

# The loop wakes at least this often to check deadlines, memory and respawns.
TICK_SECONDS = 0.25
# Resident memory is sampled this often when max_rss is set: psutil reads
# /proc/<pid>/statm, some microseconds per worker. Often enough that a handler
# growing 320 MiB a second gets 32 MiB past the kill threshold at most.
RSS_CHECK_SECONDS = 0.1
# Respawn backoff after a crash: doubles per quick death, up to the cap.
BACKOFF_START, BACKOFF_CAP = 0.1, 10.0
# A worker that lived this long resets its slot's backoff.
STABLE_SECONDS = 10.0
# This many workers in a row dying before any was ever ready means they
# cannot start at all; the host exits instead of forking forever. Once one
# has been ready, a worker that fails to start is a crash of its slot.
MAX_BOOT_DEATHS = 3
_HANDLED_SIGNALS = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGCHLD,
    signal.SIGHUP,
    signal.SIGTTIN,
    signal.SIGTTOU,
)
# How often systemd's STATUS= line is refreshed.
STATUS_SECONDS = 2.0
# Reconnect backoff when the relay goes away.
RECONNECT_START, RECONNECT_CAP = 0.1, 5.0
# The control socket's commands, and the signal each stands for ("scale" sets a count).
_COMMAND_SIGNALS = {"reload": signal.SIGHUP, "stop": signal.SIGTERM}
_COMMAND_ANSWERS = {
    "reload": "reload started: new workers take over once all are ready; "
    "a failure is logged and leaves the running ones",
    "stop": "stopping: in-flight requests finish within workers.shutdown_timeout",
}


class Exit(enum.IntEnum):
    """Fixed exit codes, for systemd units (RestartPreventExitStatus) and operators."""

    OK = 0
    FAILURE = 1
    USAGE = 2
    CONFIG = 3
    HANDLER = 4
    RELAY = 5


class HostError(Exception):
    """A reason to stop the host with a given exit code."""

    def __init__(self, code: Exit, message: str, details: str = ""):
        super().__init__(message)
        self.code = code
        self.details = details


def describe_exit(status: int) -> str:
    code = os.waitstatus_to_exitcode(status)
    if code >= 0:
        return f"exited with code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:  # real-time signals between SIGRTMIN and SIGRTMAX have no name
        name = f"signal {-code}"
    hint = " (out of memory, or killed by an operator)" if -code == signal.SIGKILL else ""
    return f"killed by {name}{hint}"


@dataclass(frozen=True)
class Generation:
    """The workers started from one reading of the config (one per reload).

    A ``reconnect`` generation has the running config and code: the fresh
    workers that take over after the relay dropped the connection.
    """

    number: int
    config: Config
    handler_class: type | None  # imported in the supervisor when preloading
    reconnect: bool = False


class Supervisor:
    def __init__(
        self,
        config: Config,
        handler_class: type | None,
        overrides: dict | None = None,
    ):
        self.config = config  # the running generation's
        self.overrides = overrides or {}  # command-line flags, re-applied on reload
        self.count = config.workers.count  # changed by SIGTTIN/SIGTTOU and reloads
        self.generation = Generation(0, config, handler_class)
        # Never reused: workers of an aborted reload may still be waiting to be
        # reaped when the next reload starts, and must not pass for its workers.
        self._generation_numbers = itertools.count(1)
        self._next_generation: Generation | None = None  # a reload or reconnect in progress
        self.log = ContextLog(logging.getLogger("irishost")).new(service=config.service.cluster)
        self.dispatch = RelayDispatch(config, self.log, self._recycle)
        self.prefix = segment_prefix(config.service.cluster)
        self.relay: RelayServer | None = None
        self.conn: iris.Connection | None = None
        self.restarts = 0
        self._by_pid: dict[int, WorkerHandle] = {}
        self._respawns: list[tuple[float, int]] = []  # (when, slot)
        self._slot_failures: dict[int, int] = {}
        self.slot_restarts: dict[int, int] = {}
        self._boot_deaths = 0
        self._ever_ready = False  # a worker has been ready: start-up failures stop being fatal
        self._slot_problems: dict[int, str] = {}  # why a slot is down, until it is ready again
        self._signals: list[int] = []
        self._commands: deque[Command] = deque()  # from the control socket's threads
        self._stopping = False
        self._next_rss_check = 0.0
        self._reconnect_at = 0.0
        self._reconnect_delay = RECONNECT_START
        self.notifier = Notifier.from_environ()
        self._started = time.monotonic()
        self._next_status = 0.0
        self._status_relay = ""  # the relay state in the last STATUS= line
        self._next_tick = 0.0
        self._ring_table: dict | None = None
        self._next_watchdog = 0.0

    # -- the whole life ----------------------------------------------------------------

    def run(self) -> Exit:
        """Start, serve until told to stop, stop; HostError for fatal problems."""
        removed = remove_stale_segments(self.prefix)
        if removed:
            self.log.info("removed stale shared memory", segments=len(removed))
        self._install_signals()
        servers = []
        try:
            servers.append(ControlServer(self.config.control.socket, self.snapshot, self.act))
            if self.config.metrics.port:
                servers.append(MetricsServer(self.config.metrics.port, self.snapshot))
            self._ensure_relay()
            for slot in range(self.config.workers.count):
                self._spawn(slot)
            self._wait_until_ready()
            self._connect()
            self.log.info("service ready", workers=len(self.dispatch.workers))
            self.notifier.ready()
            while not self._stopping:
                self._step()
            self._stop_gracefully()
            return Exit.OK
        except ControlError as err:
            raise HostError(Exit.FAILURE, f"control socket: {err}") from err
        finally:
            self._kill_all()
            for server in servers:
                server.close()
            if self.relay is not None:
                self.relay.stop()

    def _install_signals(self) -> None:
        self._wake_r, self._wake_w = os.pipe()
        for fd in (self._wake_r, self._wake_w):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        for signum in _HANDLED_SIGNALS:
            signal.signal(signum, self._note_signal)

    def _note_signal(self, signum: int, frame) -> None:
        self._signals.append(signum)

    def act(self, command: Command) -> str:
        """Queue a control-socket command for the loop; the line to answer.

        Runs on a control connection's thread, so like a signal handler it
        only notes the command and wakes the loop; _handle_signals does it.
        """
        if self._stopping:
            if command.name == "stop":
                return "already stopping"
            raise ControlError("the host is stopping")
        self._commands.append(command)
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass  # the pipe is full: the loop has a wake-up pending already
        if command.name == "scale":
            return f"scaling to {command.count} workers"
        return _COMMAND_ANSWERS[command.name]

    def _title(self) -> None:
        ready = len(self.dispatch.ready_workers())
        setproctitle.setproctitle(
            f"irishost: supervisor {self.config.service.cluster} "
            f"({self.config.file.name}) workers={ready}/{self.count}"
        )

    # -- relay -------------------------------------------------------------------------------

    def _ensure_relay(self) -> None:
        """Wait for the relay to listen; start the embedded one if configured."""
        port = self.config.relay.port
        deadline = time.monotonic() + self.config.relay.connect_timeout
        while not _listening(port):
            if self.config.relay.embedded:
                try:
                    self.relay = RelayServer(port).start()
                    self.log.info("started embedded relay", port=self.relay.port)
                    return
                except OSError as err:  # lost a race with another relay starting: use it
                    self.log.warning("embedded relay did not start", error=str(err))
            if time.monotonic() >= deadline:
                raise HostError(Exit.RELAY, f"no Iris relay is listening on port {port}")
            time.sleep(0.1)

    def _connect(self) -> None:
        """Register the cluster member that fans work out to the workers."""
        config = self.config
        try:
            self.conn = iris.Connection(
                config.relay.port, config.service.cluster, self.dispatch.attach, self.log
            )
            self._subscribe(config.topics)
        except (OSError, iris.ClosedError) as err:
            raise HostError(
                Exit.RELAY, f"cannot register with the relay on port {config.relay.port}: {err}"
            ) from err
        self._reconnect_delay = RECONNECT_START

    def _subscribe(self, topics) -> None:
        for topic in topics:
            self.conn.subscribe(
                topic.name,
                self.dispatch.event(topic.name),
                iris.TopicLimits(event_threads=1, event_memory=topic.event_memory),
            )

    def _reconnect(self) -> None:
        """Register again after the relay dropped the connection, with fresh workers.

        Every worker's handler has had handle_drop, after which no callback
        may follow, and the connection its init() got went down with the
        relay. So, as at start, new workers boot once the relay listens again
        (their init connects afresh), and the cluster is registered once they
        are ready (see _finish_generation_if_ready); only then do the old
        ones drain and exit. A reload in progress is given up: its workers
        were told of the drop too.
        """
        pending = self._next_generation
        if pending is not None and pending.reconnect:
            return  # its workers are booting
        if self.dispatch.dropped is not self.conn:
            return  # the workers are still being told; a worker forked now might be too
        if pending is not None:
            self._abort_generation("the relay connection was dropped", None)
        now = time.monotonic()
        if now < self._reconnect_at:
            return
        port = self.config.relay.port
        if not _listening(port):
            self._retry_reconnect(f"no Iris relay is listening on port {port}")
            return
        generation = Generation(
            next(self._generation_numbers),
            self.config,
            self.generation.handler_class,
            reconnect=True,
        )
        self.log.info("relay is back; starting fresh workers", generation=generation.number)
        self._next_generation = generation
        for slot in range(self.count):
            self._spawn(slot, generation)

    def _retry_reconnect(self, why: str) -> None:
        self._reconnect_at = time.monotonic() + self._reconnect_delay
        self._reconnect_delay = min(2 * self._reconnect_delay, RECONNECT_CAP)
        self.log.warning("relay unreachable; retrying", error=why)

    # -- workers ---------------------------------------------------------------------------

    def _spawn(self, slot: int, generation: Generation | None = None) -> WorkerHandle:
        """Fork a worker for ``slot`` of ``generation`` (default: the running one)."""
        generation = generation or self.generation
        config = generation.config
        limits = config.limits
        max_requests = 0
        if limits.max_requests:
            jitter = config.workers.max_requests_jitter
            max_requests = limits.max_requests + random.randint(0, jitter)
        inbox, outbox = Ring.create(prefix=self.prefix), Ring.create(prefix=self.prefix)
        siblings = tuple(r for w in self.dispatch.workers for r in (w.inbox, w.outbox))
        spec = worker.WorkerSpec(
            slot, config, inbox, outbox, generation.handler_class, os.getpid(), siblings
        )
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            worker.run(spec)  # never returns; nothing may run in the child before it
        handle = WorkerHandle(slot, pid, inbox, outbox, max_requests)
        handle.generation = generation.number
        with self.dispatch.lock:
            self.dispatch.workers.append(handle)
        self._ring_table = None
        self._by_pid[pid] = handle
        self.log.info("spawned worker", worker=slot, pid=pid)
        self._title()
        return handle

    def _wait_until_ready(self) -> None:
        """Return once every worker has booted, and at least one is ready.

        While none is ready, a pending respawn (of a worker that died booting)
        counts as not ready, or the cluster would be registered with no worker
        to take its requests. Once one is ready, a slot that failed to start is
        retried with backoff like any crash, and the service starts degraded.
        """
        workers = self.dispatch.workers
        while not any(w.state == READY for w in workers) or any(
            w.state == BOOTING for w in workers
        ):
            self._step(serving=False)
            if self._stopping:
                raise HostError(Exit.OK, "stopped during start-up")

    def _recycle(self, handle: WorkerHandle, reason: str = "reached max_requests") -> None:
        """Replace a worker: fork its successor, then let it drain and exit."""
        if handle.state != READY or self._stopping:
            return
        self.log.info("recycling worker", worker=handle.slot, pid=handle.pid, reason=reason)
        self._spawn(handle.slot)
        self._retire(handle)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            handle = self._by_pid.pop(pid, None)
            if handle is not None:
                self._on_exit(handle, status)

    def _on_exit(self, handle: WorkerHandle, status: int) -> None:
        # Frames written just before death (FAILED, last replies) still count.
        self._collect(handle)
        how = handle.kill_reason or describe_exit(status)
        was_state = handle.state
        self.dispatch.fail_worker(handle, how)
        self._ring_table = None
        handle.close()
        self._title()
        if self._stopping:
            return
        if was_state == DRAINING:
            self.log.info("retired worker exited", worker=handle.slot, pid=handle.pid, how=how)
            return
        if handle.generation > self.generation.number:
            pending = self._next_generation
            if pending is not None and handle.generation == pending.number:
                self._abort_generation(f"new worker {handle.slot} {how}", handle.failure)
            # else one of the workers an aborted reload killed: reported already
            return
        # It failed to start: init raised (the traceback came in a FAILED
        # frame), or the supervisor killed it booting (boot_timeout, max_rss).
        failed_start = was_state == BOOTING and (
            handle.failure is not None or handle.kill_reason is not None
        )
        if not self._ever_ready:
            self._check_start_up(handle, how, failed_start)
        if handle.slot >= self.count:
            return  # scaled down meanwhile
        self.restarts += 1
        self.slot_restarts[handle.slot] = self.slot_restarts.get(handle.slot, 0) + 1
        if failed_start:
            problem = f"failed to start: {_last_line(handle.failure) or how}"
            self.log.error(
                "worker failed to start; retrying", worker=handle.slot, pid=handle.pid, how=how
            )
            if handle.failure:
                self.log.error("traceback of the failed worker", traceback=handle.failure)
        else:
            problem = how
            self.log.error("worker died", worker=handle.slot, pid=handle.pid, how=how)
        self._slot_problems[handle.slot] = problem
        lived = time.monotonic() - handle.started
        failures = 0 if lived >= STABLE_SECONDS else self._slot_failures.get(handle.slot, 0)
        self._slot_failures[handle.slot] = failures + 1
        delay = min(BACKOFF_START * 2**failures, BACKOFF_CAP)
        self._respawns.append((time.monotonic() + delay, handle.slot))

    def _check_start_up(self, handle: WorkerHandle, how: str, failed_start: bool) -> None:
        """Before any worker was ever ready, a worker that cannot start stops the host."""
        if failed_start:
            if handle.failure is not None:
                message, details = f"worker {handle.slot} failed to start", handle.failure
            else:
                message, details = f"worker {handle.slot} failed to start: {how}", ""
            raise HostError(Exit.HANDLER, message, details)
        if handle.state == BOOTING:
            self._boot_deaths += 1
            if self._boot_deaths >= MAX_BOOT_DEATHS:
                raise HostError(
                    Exit.HANDLER, f"workers keep dying during start-up; the last one {how}"
                )

    def _murder_stuck(self, now: float) -> None:
        grace = self.config.workers.timeout_grace
        boot_timeout = self.config.workers.boot_timeout
        threads = self.config.limits.request_threads
        for handle in list(self.dispatch.workers):
            if handle.kill_reason is not None:
                continue
            with self.dispatch.lock:
                deadline = handle.running_deadline(threads)
            if deadline is not None and now > deadline + grace:
                reason = f"a handler ran past its deadline plus {grace:g} s"
            elif handle.state == DRAINING and now > handle.drain_deadline:
                reason = "did not drain in time"
            elif handle.state == BOOTING and now > handle.started + boot_timeout:
                reason = f"still starting after workers.boot_timeout ({boot_timeout:g} s)"
            else:
                continue
            self._kill(handle, reason)

    def _kill(self, handle: WorkerHandle, reason: str) -> None:
        """SIGKILL a worker; ``reason`` becomes the fault of every request it held."""
        handle.kill_reason = f"killed by the supervisor: {reason}"
        self.log.error("killing worker", worker=handle.slot, pid=handle.pid, reason=reason)
        _kill(handle.pid, signal.SIGKILL)

    def _check_memory(self, now: float) -> None:
        """Recycle workers over max_rss; kill those far over it at once.

        Recycling drains a worker first, which takes as long as its slowest
        request: a handler leaking fast would reach many times the cap
        meanwhile. So beyond ``max_rss_kill_factor`` times the cap a worker,
        booting, ready or draining, is killed without waiting.
        """
        limits = self.config.limits
        if not limits.max_rss or now < self._next_rss_check:
            return
        self._next_rss_check = now + RSS_CHECK_SECONDS
        kill_above = limits.max_rss * limits.max_rss_kill_factor
        for handle in list(self.dispatch.workers):
            if handle.kill_reason is not None:
                continue
            rss = handle.rss()
            if rss > kill_above:
                self._kill(
                    handle,
                    f"resident memory {_mib(rss)} exceeded max_rss {_mib(limits.max_rss)} "
                    f"more than {limits.max_rss_kill_factor:g} times",
                )
            elif rss > limits.max_rss and handle.state == READY:
                self._recycle(handle, f"resident memory {_mib(rss)} is over max_rss")

    def _respawn_due(self, now: float) -> None:
        if self.conn is not None and self.conn.closed:
            return  # a worker's init needs the relay; reconnecting boots fresh workers
        due = [slot for when, slot in self._respawns if when <= now]
        self._respawns = [(when, slot) for when, slot in self._respawns if when > now]
        for slot in due:
            if slot < self.count:
                self._spawn(slot)

    # -- reload and scaling ----------------------------------------------------------------

    def _reload(self) -> None:
        """Start a new generation of workers from the re-read config.

        The old workers keep serving until every new one is ready; then they
        drain and exit. Any failure on the way (bad config, handler import,
        a new worker dying in init) leaves the old generation running.
        """
        if self._next_generation is not None:
            what = "reconnect" if self._next_generation.reconnect else "reload"
            self.log.warning(f"{what} already in progress; SIGHUP ignored")
            # Type=notify-reload waits for this pair after each SIGHUP it sends.
            self.notifier.reloading()
            self.notifier.ready()
            return
        self.log.info("reloading", config=str(self.config.file))
        self.notifier.reloading()
        try:
            config = load_config(self.config.file).with_overrides(**self.overrides)
            if (config.service.cluster, config.relay.port) != (
                self.config.service.cluster,
                self.config.relay.port,
            ):
                raise ConfigError(
                    config.file, "service.cluster", "cluster and relay port need a restart"
                )
            handler_class = reload_handler(config) if config.workers.preload else None
        except (ConfigError, HandlerImportError) as err:
            self.log.error("reload failed; keeping the running workers", error=str(err))
            self.notifier.ready()
            return
        generation = Generation(next(self._generation_numbers), config, handler_class)
        self._next_generation = generation
        for slot in range(config.workers.count):
            self._spawn(slot, generation)

    def _finish_generation_if_ready(self) -> None:
        """Once all workers of a reload or reconnect are ready, retire the old ones.

        A reconnect then registers with the relay again; the old workers are
        retired first, so no request of the new connection reaches them.
        """
        generation = self._next_generation
        if generation is None:
            return
        fresh = [w for w in self.dispatch.workers if w.generation == generation.number]
        if any(w.state != READY for w in fresh):
            return
        old = [w for w in self.dispatch.workers if w.generation < generation.number]
        self._next_generation = None
        if generation.reconnect:
            self.generation = generation
        else:
            self._apply(generation)
        for handle in old:
            self._retire(handle)
        if not generation.reconnect:
            self.log.info("reload complete", workers=len(fresh), generation=generation.number)
            self.notifier.ready()
            return
        try:
            self._connect()
        except HostError as err:  # the relay went away again: fresh workers next time too
            self._retry_reconnect(str(err))
            return
        self.log.info("reconnected to relay", workers=len(fresh), generation=generation.number)

    def _abort_generation(self, why: str, details: str | None) -> None:
        """Kill the workers of a reload or reconnect that cannot complete."""
        if self._next_generation.reconnect:
            self._retry_reconnect(f"fresh workers did not start: {why}")
        else:
            self.log.error("reload failed; keeping the running workers", error=why)
            self.notifier.ready()
        if details:
            self.log.error("traceback of the failed worker", traceback=details)
        self._next_generation = None
        for handle in self.dispatch.workers:
            if handle.generation > self.generation.number:
                handle.kill_reason = "killed by the supervisor: its generation was given up"
                _kill(handle.pid, signal.SIGKILL)

    def _apply(self, generation: Generation) -> None:
        """Make ``generation`` the running one: topics, dispatch rules, worker count."""
        old_topics = {t.name for t in self.config.topics}
        config = generation.config
        self.generation = generation
        self.config = config
        self.count = config.workers.count
        self.dispatch.reconfigure(config)
        configure_logging(config.logging.level)
        if self.conn is not None and not self.conn.closed:
            for topic in old_topics - {t.name for t in config.topics}:
                self.conn.unsubscribe(topic)
            self._subscribe(t for t in config.topics if t.name not in old_topics)

    def _scale(self, count: int) -> None:
        if count < 1:
            self.log.warning("SIGTTOU ignored: at least one worker must stay")
            return
        if count > MAX_WORKERS:
            self.log.warning(
                "SIGTTIN ignored: already at the most workers allowed", limit=MAX_WORKERS
            )
            return
        self.log.info("scaling workers", before=self.count, after=count)
        self.count = count
        current = [w for w in self.dispatch.workers if w.state != DRAINING]
        slots = {w.slot for w in current}
        for slot in range(count):
            if slot not in slots:
                self._spawn(slot)
        for handle in current:
            if handle.slot >= count:
                self._retire(handle)

    def _retire(self, handle: WorkerHandle) -> None:
        handle.drain_deadline = time.monotonic() + self.config.workers.shutdown_timeout
        self.dispatch.retire(handle)
        self._title()

    # -- the loop --------------------------------------------------------------------------

    def _step(self, serving: bool = True) -> None:
        """One turn of the loop: answers and signals at once, housekeeping when due.

        Under load a turn happens per reply batch, so housekeeping (reaping,
        stuck and memory checks, respawns, systemd pings) waits for its tick
        instead of costing every reply.
        """
        # Wake for the next respawn and the next watchdog ping, not only on the
        # tick: with a short WatchdogSec the tick alone would ping late.
        due = min([self._next_tick, *(when for when, _ in self._respawns)])
        if self.notifier.watchdog_interval():
            due = min(due, self._next_watchdog)
        if self.config.limits.max_rss:
            due = min(due, self._next_rss_check)
        rings = self._rings()
        for ring in wait_readable(list(rings), max(0.0, due - time.monotonic()), (self._wake_r,)):
            self._collect(rings[ring])
        if self._signals or self._commands:
            self._handle_signals()
        now = time.monotonic()
        if now < due:
            return
        self._next_tick = now + TICK_SECONDS
        self._reap()  # SIGCHLD reaps at once; this is the safety net
        self._murder_stuck(now)
        self._check_memory(now)
        self._respawn_due(now)
        self.dispatch.release_waiting()  # drops the expired ones
        self._tell_systemd(now)
        if serving and self.conn is not None and self.conn.closed and not self._stopping:
            self._reconnect()

    def _rings(self) -> dict:
        """Each live worker's outbox, mapped to its worker; rebuilt when workers change."""
        if self._ring_table is None:
            self._ring_table = {handle.outbox: handle for handle in self.dispatch.workers}
        return self._ring_table

    def _tell_systemd(self, now: float) -> None:
        """Status and watchdog pings, from this loop so a hung loop stops pinging."""
        interval = self.notifier.watchdog_interval()
        if interval and now >= self._next_watchdog:
            self.notifier.watchdog()
            self._next_watchdog = now + interval
        # A change of the relay's state is news at once: an outage shorter
        # than STATUS_SECONDS would otherwise never show.
        relay = self.relay_state()
        if now >= self._next_status or relay != self._status_relay:
            self.notifier.status(self.status_line())
            self._next_status = now + STATUS_SECONDS
            self._status_relay = relay

    def relay_state(self) -> str:
        if self.conn is None:
            return "starting"
        if not self.conn.closed:
            return "connected"
        return "stopped" if self._stopping else "reconnecting"

    def status_line(self) -> str:
        ready = len(self.dispatch.ready_workers())
        line = (
            f"workers {ready}/{self.count}, served {self.dispatch.served}, "
            f"in flight {self.dispatch.in_flight()}, restarts {self.restarts}, "
            f"relay {self.relay_state()}"
        )
        waiting = self.dispatch.waiting()
        if waiting:
            line += f", waiting for a worker {waiting}"
        problems = self.slot_problems()
        if problems:
            line += "; degraded: " + "; ".join(
                f"worker {slot} {problem}" for slot, problem in problems.items()
            )
        return line

    def slot_problems(self) -> dict[int, str]:
        """Slots that are down and why (a crash, a failed start), until they are ready again."""
        return {
            slot: problem
            for slot, problem in sorted(self._slot_problems.items())
            if slot < self.count
        }

    def snapshot(self) -> dict:
        """What `irishost status` and the metrics show; runs on their threads."""
        now = time.monotonic()
        with self.dispatch.lock:
            workers = [
                {
                    "slot": w.slot,
                    "pid": w.pid,
                    "state": w.state,
                    "served": w.served,
                    "in_flight": len(w.in_flight),
                    "restarts": self.slot_restarts.get(w.slot, 0),
                    "uptime": now - w.started,
                    "process": w,
                }
                for w in self.dispatch.workers
            ]
            in_flight = self.dispatch.in_flight()
            waiting = self.dispatch.waiting()
        for entry in workers:  # outside the lock: reading /proc is slow
            entry["rss"] = entry.pop("process").rss()
        return {
            "service": self.config.file.stem,
            "cluster": self.config.service.cluster,
            "pid": os.getpid(),
            "uptime": now - self._started,
            "relay": {"state": self.relay_state(), "port": self.config.relay.port},
            "served": self.dispatch.served,
            "in_flight": in_flight,
            "waiting": waiting,
            "restarts": self.restarts,
            "degraded": [
                {"slot": slot, "problem": problem} for slot, problem in self.slot_problems().items()
            ],
            "workers": workers,
            **self.dispatch.stats.snapshot(),  # "durations" and "failures"
        }

    def _collect(self, handle: WorkerHandle) -> None:
        """Act on every frame a worker has written."""
        if handle.outbox.closed:
            return
        batch = handle.outbox.drain()
        if batch:
            handle.stalled_until = 0.0  # it is running again
        for data in batch:
            fields = frames.decode(data)
            kind = fields[0]
            if kind == Kind.READY:
                handle.state = READY
                self._ever_ready = True
                self._slot_problems.pop(handle.slot, None)
                self.dispatch.release_waiting()
                self.log.info("worker ready", worker=handle.slot, pid=handle.pid)
                self._title()
                if handle.generation > self.generation.number:
                    self._finish_generation_if_ready()
            elif kind == Kind.FAILED:
                handle.failure = fields[1]
            else:
                self.dispatch.on_frame(handle, kind, fields[1:])

    def _handle_signals(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        signals, self._signals = self._signals, []
        scale_to = None
        while self._commands:  # each as its signal would be; deque pops are thread-safe
            command = self._commands.popleft()
            if command.name == "scale":
                scale_to = command.count
            else:
                signals.append(_COMMAND_SIGNALS[command.name])
        if signal.SIGCHLD in signals:
            self._reap()
        for signum in signals:
            if signum in (signal.SIGTERM, signal.SIGINT):
                if self._stopping and signum == signal.SIGINT:
                    raise HostError(Exit.OK, "second SIGINT: stopping at once")
                self.log.info("stopping", signal=signal.Signals(signum).name)
                self._stopping = True
                # A reload in progress is abandoned: its workers stop with the
                # rest, and must not send READY=1 after STOPPING=1 on finishing.
                self._next_generation = None
                self.notifier.stopping()
            elif signum == signal.SIGHUP and not self._stopping:
                self._reload()
            elif signum == signal.SIGTTIN and not self._stopping:
                self._scale(self.count + 1)
            elif signum == signal.SIGTTOU and not self._stopping:
                self._scale(self.count - 1)
        if scale_to is not None and not self._stopping:
            self._scale(scale_to)

    # -- stopping --------------------------------------------------------------------------

    def _stop_gracefully(self) -> None:
        """Finish in-flight work within the shutdown timeout, then take everything down."""
        dispatch = self.dispatch
        dispatch.accepting = False
        dispatch.release_waiting()  # with the shutdown fault
        deadline = time.monotonic() + self.config.workers.shutdown_timeout
        while dispatch.in_flight() and time.monotonic() < deadline:
            self._step(serving=False)
        if self.conn is not None:
            self.conn.close()
        for handle in list(dispatch.workers):
            _kill(handle.pid, signal.SIGTERM)
        while self._by_pid and time.monotonic() < deadline:
            self._step(serving=False)
        self.log.info("stopped")

    def _kill_all(self) -> None:
        """Last resort on the way out: no worker outlives the supervisor."""
        for pid in self._by_pid:
            _kill(pid, signal.SIGKILL)
        for pid, handle in list(self._by_pid.items()):
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
            handle.close()
        self._by_pid.clear()
        if self.conn is not None and not self.conn.closed:
            self.conn.close()


def _kill(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _last_line(text: str | None) -> str:
    """A traceback's last line (the exception), to name a failure in one line."""
    lines = (text or "").strip().splitlines()
    return lines[-1] if lines else ""


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1.0)
        return probe.connect_ex(("127.0.0.1", port)) == 0
