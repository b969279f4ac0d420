"""Making workers: the supervisor's end of the fork servers, one per generation.

The supervisor never waits on a fork server. A spawn is a call with an id
and a deadline; its answer arrives on the fork server's socket, which the
loop waits on beside the rings, and comes back from :meth:`Spawner.poll` as
an event the loop acts on (:class:`Spawned`, :class:`SpawnFailed`,
:class:`ServerReady`, :class:`LaunchFailed`). A fork server that misses a
deadline is killed; one that died (found by the supervisor's reaper, which
hands its wait status to :meth:`Spawner.on_exit`) fails the calls it held,
and the next spawn for its generation launches a fresh one, so a dead fork
server costs a respawn's backoff and no worker.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import select
import signal
import socket
import time
from dataclasses import dataclass
from typing import Any

from iris.logs import ContextLog

from ..config import Config
from ..exits import Exit, HostError, describe_exit
from ..forks.messages import (
    MAX_MESSAGE,
    RING_FDS_SPACE,
    Launch,
    command,
    config_memfd,
    pack,
    received_fds,
    unpack,
)
from ..wire.ring import Ring
from .generation import Generation
from .handle import WorkerHandle
from .respawner import fresh_memory_problem

# A fork server that has not answered a spawn within this long is killed and
# relaunched: a fork takes milliseconds, even of a large preloaded process,
# so this only fires for a stopped or wedged server.
SPAWN_TIMEOUT = 5.0
# How long a fork server's interpreter may take to start (up to its "started",
# before the handler's import): workers.boot_timeout bounds only what the
# handler does, so that a loaded machine's slow interpreter start does not
# fail a host whose boot_timeout is tight for its handler alone.
START_TIMEOUT = 30.0


@dataclass(frozen=True)
class Spawned:
    """A worker was forked; ``handle`` is the supervisor's record of it."""

    handle: WorkerHandle
    server: int  # the pid of the fork server that forked it
    threads: int  # in the fork server when it forked: more than 1 is worth a warning


@dataclass(frozen=True)
class SpawnFailed:
    """No worker for ``slot`` of ``generation``: fork failed, or the fork server died."""

    slot: int
    generation: Generation
    reason: str


@dataclass(frozen=True)
class ServerReady:
    """A fork server has started (and imported the handler, when preloading)."""

    generation: Generation  # the one it was launched for
    rss: int  # its resident memory then: about what a fresh worker starts with
    threads: int


@dataclass(frozen=True)
class LaunchFailed:
    """A fork server ended, or was killed, before it was ready; its calls failed too."""

    generation: Generation
    code: Exit  # CONFIG for [settings] the class does not take; HANDLER otherwise
    message: str
    details: str = ""


# What the Spawner reports to the loop (not a topic's event: that is frames.Event).
SpawnerEvent = Spawned | SpawnFailed | ServerReady | LaunchFailed


@dataclass
class _Call:
    slot: int
    generation: Generation
    deadline: float  # monotonic; 0 while queued behind the server's start


class ForkServer:
    """One fork server process, seen from the supervisor."""

    def __init__(self, generation: Generation, alive: int, check: bool = False):
        self.generation = generation
        self.started = False  # its interpreter is up; the handler's import is next
        self.ready = False
        self.gone = False
        self.deadline = time.monotonic() + START_TIMEOUT
        self.calls: dict[int, _Call] = {}
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        launch = Launch(generation.code, generation.config, check)
        memfd = config_memfd(launch.config)
        passed = (theirs.fileno(), alive, memfd)
        try:
            for fd in passed:
                os.set_inheritable(fd, True)
            # posix_spawn, not fork: this process has threads (see irishost.forks.server).
            argv = command(launch, *passed)
            self.pid = os.posix_spawn(argv[0], argv, os.environ)
        finally:
            os.set_inheritable(alive, False)
            theirs.close()
            os.close(memfd)
        self.sock.setblocking(False)

    def call(self, call: int, entry: _Call) -> None:
        self.calls[call] = entry
        if self.ready:
            self._send_spawn(call, entry)

    def _send_spawn(self, call: int, entry: _Call) -> None:
        entry.deadline = time.monotonic() + SPAWN_TIMEOUT
        try:
            self.sock.send(pack(("spawn", call, entry.slot)))
        except OSError:
            pass  # it is dying: the reaper or the deadline fails the call

    def busy(self) -> bool:
        """Whether an answer is owed: the loop only waits on a busy server's socket."""
        return not self.gone and (not self.ready or bool(self.calls))

    def overdue(self, now: float) -> bool:
        if self.gone:
            return False
        if not self.ready:
            return now > self.deadline
        return any(entry.deadline and now > entry.deadline for entry in self.calls.values())

    def late(self) -> str:
        """What an overdue server has not done in time."""
        if not self.started:
            return f"the fork server's interpreter did not start within {START_TIMEOUT:g} s"
        if not self.ready:
            limit = self.generation.config.workers.boot_timeout
            return f"importing the handler took longer than workers.boot_timeout ({limit:g} s)"
        return "the fork server did not answer a spawn in time"

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def close(self) -> None:
        """Done with it: its socket's EOF ends it; SIGKILL in case it is stopped."""
        self.kill()
        self.sock.close()
        self.gone = True


class Spawner:
    def __init__(self, log: ContextLog):
        self.log = log
        self.servers: dict[int, ForkServer] = {}  # by the generation whose code they run
        self._calls = itertools.count(1)
        # The alive pipe: every worker holds the read end; it reads EOF once
        # this process, the only holder of the write end, is gone.
        self.alive, self._alive_write = os.pipe()

    def launch(self, generation: Generation) -> ForkServer:
        """Start the fork server of ``generation`` (ServerReady or LaunchFailed follow)."""
        old = self.servers.get(generation.code)
        if old is not None and not old.gone:
            old.close()
        server = ForkServer(generation, self.alive)
        self.servers[generation.code] = server
        self.log.debug("launched fork server", generation=generation.code, pid=server.pid)
        return server

    def spawn(self, slot: int, generation: Generation) -> None:
        """Ask for a worker for ``slot``; Spawned or SpawnFailed follows from poll().

        A generation whose fork server is gone gets a fresh one first.
        """
        server = self.servers.get(generation.code)
        if server is None or server.gone:
            server = self.launch(generation)
        server.call(next(self._calls), _Call(slot, generation, 0.0))

    def spawning(self, generation: int) -> set[int]:
        """The slots of ``generation`` (a number) with a spawn not yet answered."""
        return {
            entry.slot
            for server in self.servers.values()
            if not server.gone
            for entry in server.calls.values()
            if entry.generation.number == generation
        }

    def fds(self) -> list[int]:
        """The sockets the loop waits on: those of servers that owe an answer."""
        return [server.sock.fileno() for server in self.servers.values() if server.busy()]

    def poll(self, now: float) -> list[SpawnerEvent]:
        """Answers that arrived, and the failures of servers past a deadline."""
        events: list[SpawnerEvent] = []
        for server in list(self.servers.values()):
            if server.busy():
                events += self._read(server)
            if server.overdue(now):
                server.kill()
                events += self._fail(server, f"{server.late()}; killed it")
        return events

    def on_exit(self, pid: int, status: int) -> list[SpawnerEvent] | None:
        """A child of the supervisor exited: the events if it was a fork server, else None."""
        for server in self.servers.values():
            if server.pid == pid:
                if server.gone:
                    return []
                events = self._read(server)  # what it said before dying counts
                reason = f"fork server {describe_exit(status)}"
                if server.started and not server.ready:
                    reason += " (did the handler's module end the process while being imported?)"
                return events + self._fail(server, reason)
        return None

    def retain(self, generations: set[int]) -> None:
        """Stop the fork servers whose code no wanted generation runs."""
        for code, server in list(self.servers.items()):
            if code not in generations:
                if not server.gone:
                    server.close()
                del self.servers[code]

    def stop(self) -> None:
        self.retain(set())
        os.close(self._alive_write)
        os.close(self.alive)

    # -- answers ---------------------------------------------------------------------

    def _read(self, server: ForkServer) -> list[SpawnerEvent]:
        events: list[SpawnerEvent] = []
        while not server.gone:
            try:
                data, cmsgs, _, _ = server.sock.recvmsg(
                    MAX_MESSAGE, RING_FDS_SPACE, socket.MSG_DONTWAIT
                )
            except BlockingIOError:
                break
            except OSError:
                data, cmsgs = b"", []
            fds = received_fds(cmsgs)
            if not data:  # EOF: it exited; the reaper brings its status
                for fd in fds:
                    os.close(fd)
                break
            events += self._answer(server, unpack(data), fds)
        return events

    def _answer(self, server: ForkServer, message: list[Any], fds: list[int]) -> list[SpawnerEvent]:
        kind = message[0]
        generation = server.generation
        if kind == "started":
            server.started = True
            server.deadline = time.monotonic() + generation.config.workers.boot_timeout
            return []
        if kind == "ready":
            server.ready = True
            rss, threads = int(message[1]), int(message[2])
            problem = fresh_memory_problem(generation.config.limits.max_rss, rss)
            if problem is not None:  # every worker would be recycled at birth: fork none
                file = generation.config.file
                failed = LaunchFailed(
                    generation, Exit.CONFIG, f"config error: {file}: limits.max_rss: {problem}"
                )
                return [failed, *self._fail(server, failed.message, launch_reported=True)]
            for call, queued in server.calls.items():
                server._send_spawn(call, queued)
            return [ServerReady(generation, rss, threads)]
        if kind == "failed":
            _, what, fields = message
            assert isinstance(fields, list)
            if what == "config":
                file, key, problem = fields
                failed = LaunchFailed(
                    generation, Exit.CONFIG, f"config error: {file}: {key}: {problem}"
                )
            else:
                failed = LaunchFailed(
                    generation, Exit.HANDLER, f"handler error: {fields[0]}", str(fields[1])
                )
            return [failed, *self._fail(server, failed.message, launch_reported=True)]
        entry: _Call | None = server.calls.pop(int(message[1]), None)
        if kind == "spawned":
            _, _, pid, capacity, threads = message
            if entry is None:  # given up on already: not ours any more
                for fd in fds:
                    os.close(fd)
                os.kill(int(pid), signal.SIGKILL)
                return []
            handle = self._handle(entry, int(pid), int(capacity), fds)
            return [Spawned(handle, server.pid, int(threads))]
        if kind == "spawn-failed" and entry is not None:
            _, _, code, reason = message
            return [SpawnFailed(entry.slot, entry.generation, f"{reason} ({code})")]
        return []

    def _handle(self, entry: _Call, pid: int, capacity: int, fds: list[int]) -> WorkerHandle:
        config = entry.generation.config
        max_requests = 0
        if config.limits.max_requests:
            jitter = config.workers.max_requests_jitter
            max_requests = config.limits.max_requests + random.randint(0, jitter)
        inbox = Ring.attach(fds[0], fds[1], fds[2], capacity)
        outbox = Ring.attach(fds[3], fds[4], fds[5], capacity)
        handle = WorkerHandle(entry.slot, pid, inbox, outbox, max_requests)
        handle.generation = entry.generation.number
        return handle

    def _fail(
        self, server: ForkServer, reason: str, launch_reported: bool = False
    ) -> list[SpawnerEvent]:
        """``server`` is gone: its start, if it was not ready, and every call it held fail."""
        was_ready = server.ready
        server.close()
        events: list[SpawnerEvent] = []
        if not was_ready and not launch_reported:
            message = f"handler error: the fork server ended before it was ready: {reason}"
            events.append(LaunchFailed(server.generation, Exit.HANDLER, message))
        events += [
            SpawnFailed(entry.slot, entry.generation, reason) for entry in server.calls.values()
        ]
        server.calls.clear()
        return events


def check_handler(config: Config) -> int:
    """``irishost --check``: import the handler as a fork server would, in a
    fresh interpreter, so that a module that exits the process or crashes
    at import is caught too; the fork server's resident memory after the
    import. HostError with the exit code to use when it cannot be served.
    """
    spawner = Spawner(ContextLog(logging.getLogger("irishost")))
    generation = Generation(0, config, code=0)
    server = ForkServer(generation, spawner.alive, check=True)
    spawner.servers[0] = server
    try:
        while True:
            select.select([server.sock], [], [], 0.05)
            events = spawner.poll(time.monotonic())
            pid, status = os.waitpid(server.pid, os.WNOHANG)
            if pid:
                events += spawner.on_exit(pid, status) or []
            for event in events:
                if isinstance(event, LaunchFailed):
                    raise HostError(event.code, event.message, event.details)
                if isinstance(event, ServerReady):
                    return event.rss
    finally:
        spawner.stop()
