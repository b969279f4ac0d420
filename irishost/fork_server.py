"""The fork server: the one process that forks workers, while it has one thread.

``fork`` copies only the calling thread; a lock any other thread held at
that moment (logging's, the allocator's, an import lock) stays held in the
child for good. The supervisor runs several threads (the relay reader, the
control and metrics servers, tunnel bridges), so it never forks a worker
itself. First thing in ``Supervisor.run``, while it still has one thread, it
forks this small server, which forks every worker on request (the first
ones, respawns, reloads, scaling) and does nothing else::

    supervisor --- socket pair (msgpack): generation, spawn, retain, exit --> fork server
               <-- spawned (pid, ring descriptors by SCM_RIGHTS),       |
                   exited (pid, wait status) ---------------------    fork
                                                                       v
                                                                    worker

- Rings: the fork server creates a worker's two rings, forks the worker,
  which inherits them, then passes the shared-memory and eventfd
  descriptors to the supervisor (``socket.send_fds``) and closes its own
  copies; so it holds no other worker's rings when it forks.
- Deaths: the fork server is the workers' parent. It reaps them and sends
  each wait status to the supervisor, whose loop waits on the socket as it
  waits on the rings.
- Orphans: the fork server dies with the supervisor (PR_SET_PDEATHSIG), and
  a worker with its parent, the fork server; so workers still die with the
  supervisor at any stage.
- Preload: the first generation's handler class is what the supervisor had
  imported when it forked the server; a reload's is imported here, and an
  import error, or ``[settings]`` the new class does not take, goes back to
  the supervisor, which keeps the running workers.
- Every fork counts the forking process's threads (``/proc/self/task``)
  first, the fork of the server itself included; more than one means a
  preloaded handler started a thread at import, which the supervisor logs
  as a warning.
"""

from __future__ import annotations

import array
import os
import select
import signal
import socket
import traceback
from pathlib import Path
from typing import Any

import msgpack
import setproctitle

from . import worker
from .config import Config, ConfigError
from .loader import HandlerImportError, reload_handler
from .ring import Ring
from .wakeup import WakeupPipe

# Requests and replies are msgpack arrays, small (a config is a few KiB as
# plain values): one datagram each, at most this big.
MAX_MESSAGE = 1 << 20
# Descriptors per spawned worker: (segment, data eventfd, space eventfd) per ring.
RING_FDS = 6
# The signals an operator (or a terminal's Ctrl-C, to the whole group) sends
# the host: the supervisor acts on them, the fork server ignores them
# (SIGUSR1, logrotate's, reaches it with ``systemctl kill``; it would kill it).
_SUPERVISOR_SIGNALS = (
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGTTIN,
    signal.SIGTTOU,
    signal.SIGTERM,
    signal.SIGUSR1,
)


# A message on the socket: a msgpack array whose first element names it. Its
# fields are unpacked straight into typed names, so a decoded one is a list of Any.
Message = list[Any]

# The fork server's generations: number -> (config, handler class or None).
Generations = dict[int, tuple[Config, type | None]]


class ForkServerGone(Exception):
    """The fork server died or closed its socket: no worker can be forked any more."""


class ForkServer:
    """The supervisor's end: ask for workers, learn of their deaths."""

    def __init__(self, pid: int, sock: socket.socket):
        self.pid = pid
        self._sock = sock
        self._exits: list[tuple[int, int]] = []  # (pid, wait status) not yet collected

    @classmethod
    def start(cls, config: Config, handler_class: type | None, prefix: str) -> ForkServer:
        """Fork the server; call while this process has a single thread."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # the fork server; never returns
            code = 1
            try:
                ours.close()
                code = _Server(theirs, parent, prefix, {0: (config, handler_class)}).serve()
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        theirs.close()
        return cls(pid, ours)

    def add_generation(self, number: int, config: Config, like: int | None = None) -> None:
        """Tell the server of a generation: ``like`` an existing one (a reconnect:
        same config and code), or from ``config`` (importing the handler when
        preloading). HandlerImportError if the import fails, ConfigError if
        the class does not take the config's settings."""
        (_, failure, fields), _ = self._call(("generation", number, config.to_wire(), like))
        if failure == "config":
            file, key, problem = fields
            raise ConfigError(Path(file), key, problem)
        if failure == "import":
            raise HandlerImportError(*fields)

    def retain(self, number: int) -> None:
        """Forget the generations before ``number``: no worker of them is forked again."""
        self._send(("retain", number))

    def spawn(self, slot: int, generation: int) -> tuple[int, Ring, Ring, int]:
        """Fork a worker; its pid, inbox, outbox and the server's thread count at the fork."""
        (_, pid, capacity, threads), fds = self._call(("spawn", slot, generation), RING_FDS)
        inbox = Ring.attach(fds[0], fds[1], fds[2], capacity)
        outbox = Ring.attach(fds[3], fds[4], fds[5], capacity)
        return pid, inbox, outbox, threads

    def exits(self) -> list[tuple[int, int]]:
        """The workers that died since the last call, as (pid, wait status)."""
        while True:
            try:
                message, _ = self._receive(socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            self._note(message)
        exits, self._exits = self._exits, []
        return exits

    def stop(self) -> None:
        """Ask the server to exit, and reap it; its workers are expected gone already."""
        try:
            self._send(("exit",))
        except ForkServerGone:
            pass
        self._sock.close()
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass

    # -- the socket ------------------------------------------------------------------

    def _call(self, request: tuple[object, ...], maxfds: int = 0) -> tuple[Message, list[int]]:
        """Send ``request``; the answer and the descriptors it carried."""
        self._send(request)
        while True:
            message, fds = self._receive(0, maxfds)
            if message[0] != "exited":
                return message, fds
            self._note(message)

    def _note(self, message: Message) -> None:
        if message[0] != "exited":
            raise ForkServerGone(f"unexpected message from the fork server: {message[0]}")
        self._exits.append((message[1], message[2]))

    def _send(self, request: tuple[object, ...]) -> None:
        try:
            self._sock.send(_pack(request))
        except OSError as err:
            raise ForkServerGone(f"fork server unreachable: {err}") from err

    def _receive(self, flags: int, maxfds: int = 0) -> tuple[Message, list[int]]:
        # recvmsg, not socket.recv_fds: that ignores its flags before Python 3.12.
        ancillary = socket.CMSG_LEN(maxfds * array.array("i").itemsize)
        data, cmsgs, _, _ = self._sock.recvmsg(MAX_MESSAGE, ancillary, flags)
        fds = array.array("i")
        for level, kind, payload in cmsgs:
            if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS):
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
        if not data:
            raise ForkServerGone("the fork server exited")
        return _unpack(data), list(fds)


class _Server:
    """The fork server process's loop."""

    def __init__(self, sock: socket.socket, supervisor: int, prefix: str, generations: Generations):
        self.sock = sock
        self.supervisor = supervisor
        self.prefix = prefix
        self.generations = generations

    def serve(self) -> int:
        worker.die_with_parent(self.supervisor)
        config = self.generations[0][0]
        setproctitle.setproctitle(
            f"irishost: fork server {config.service.cluster} ({config.file.name})"
        )
        for signum in _SUPERVISOR_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
        wakeup = WakeupPipe()
        signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes select through the pipe
        try:
            return self._loop(wakeup)
        except (BrokenPipeError, ConnectionResetError, ProcessLookupError):
            return 0  # the supervisor is gone; the kernel is about to end us too

    def _loop(self, wakeup: WakeupPipe) -> int:
        watched: list[socket.socket | WakeupPipe] = [self.sock, wakeup]
        while True:
            readable, _, _ = select.select(watched, [], [])
            if wakeup in readable:
                wakeup.empty()
            self._report_exits()
            if self.sock in readable:
                data = self.sock.recv(MAX_MESSAGE)
                if not data:
                    return 0  # the supervisor is gone; so are we
                request = _unpack(data)
                if request[0] == "exit":
                    self._report_exits()
                    return 0
                getattr(self, f"_on_{request[0]}")(*request[1:])

    def _report_exits(self) -> None:
        """Reap dead workers; send their statuses, then SIGCHLD to wake the supervisor."""
        reported = False
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            self._reply(("exited", pid, status))
            reported = True
        if reported:
            os.kill(self.supervisor, signal.SIGCHLD)

    def _on_generation(self, number: int, wire: dict[str, Any], like: int | None) -> None:
        if like is not None:
            self.generations[number] = self.generations[like]
            self._reply(("generation", None, []))
            return
        config = Config.from_wire(wire)
        try:
            handler_class = reload_handler(config) if config.workers.preload else None
        except ConfigError as err:  # [settings] the new handler class does not take
            self._reply(("generation", "config", [str(err.file), err.key, err.problem]))
            return
        except HandlerImportError as err:
            self._reply(("generation", "import", [str(err), err.details]))
            return
        self.generations[number] = (config, handler_class)
        self._reply(("generation", None, []))

    def _on_retain(self, number: int) -> None:
        for old in [n for n in self.generations if n < number]:
            del self.generations[old]

    def _on_spawn(self, slot: int, generation: int) -> None:
        config, handler_class = self.generations[generation]
        inbox, inbox_segment = Ring.create_shared(prefix=self.prefix)
        outbox, outbox_segment = Ring.create_shared(prefix=self.prefix)
        threads = thread_count()
        spec = worker.WorkerSpec(slot, config, inbox, outbox, handler_class, os.getpid())
        pid = os.fork()
        if pid == 0:
            worker.run(spec)  # never returns; closes every descriptor but its rings'
        fds = [
            inbox_segment,
            inbox.data_fd,
            inbox.space_fd,
            outbox_segment,
            outbox.data_fd,
            outbox.space_fd,
        ]
        try:
            message = _pack(("spawned", pid, inbox.capacity, threads))
            socket.send_fds(self.sock, [message], fds)
        finally:
            for ring in (inbox, outbox):
                ring.close()
            os.close(inbox_segment)
            os.close(outbox_segment)

    def _reply(self, message: tuple[object, ...]) -> None:
        self.sock.send(_pack(message))


def thread_count() -> int:
    """This process's threads, as the kernel counts them (Python's own count
    misses threads started by C extensions)."""
    return len(os.listdir("/proc/self/task"))


def _pack(message: tuple[object, ...]) -> bytes:
    packed: bytes = msgpack.packb(message, use_bin_type=True)
    return packed


def _unpack(data: bytes) -> Message:
    message: Message = msgpack.unpackb(data, raw=False, use_list=True)
    return message
