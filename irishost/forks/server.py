"""The fork server: a fresh interpreter per generation of workers, that forks them.

``fork`` copies only the calling thread; a lock any other thread held at
that moment (logging's, the allocator's, an import lock) stays held in the
child for good. The supervisor runs several threads (the relay reader, the
control and metrics servers, tunnel bridges), so it never forks a worker
itself. Each generation of workers (the start, each reload, each reconnect)
gets a fork server of its own instead, launched by exec as a new
interpreter (``python -m irishost.forks.server``), as CPython's
``multiprocessing.forkserver`` is::

    supervisor --- socket pair (msgpack): spawn (call id, slot) ----------> fork server
               <-- started, then ready (rss, threads) or failed (why),     |
                   spawned (call id, pid, ring descriptors by SCM_RIGHTS),  fork, fork
                   spawn-failed (call id, errno, reason) ------------------ v
               <============== reparented (child subreaper) ============= worker

- A clean interpreter per generation: a reload imports the new code in a
  process that never held the old code, so no memory of it is carried into
  new workers; an import that raises, exits or crashes ends only this
  process, and fails only its reload.
- The config arrives in a memfd (any size: ``[settings]`` may be large),
  the supervisor's socket and its alive pipe as inherited descriptors; the
  numbers are in argv.
- Preload: with ``workers.preload`` the handler is imported here before
  any fork, so that workers share its pages. In check mode
  (``irishost --check``) it is imported either way, reported, and the
  server exits.
- Shared pages stay shared: with ``workers.gc_freeze`` everything this
  process holds is frozen before the first fork (see :func:`freeze_for_workers`).
- Workers are forked twice (fork server, then a short-lived intermediate,
  then the worker), so that the intermediate's exit hands the worker to the
  supervisor, a child subreaper: the supervisor is every worker's parent,
  reaps it and sees its wait status, and the fork server can die at any
  moment without touching a worker.
- A failed ``fork()`` (EAGAIN under RLIMIT_NPROC, ENOMEM) is answered with
  its errno; the server lives on.
- Every fork counts the forking process's threads (``/proc/self/task``)
  first; more than one means a preloaded handler started a thread at
  import, which the supervisor logs as a warning.
"""

from __future__ import annotations

import argparse
import errno
import gc
import os
import signal
import socket
import sys
import traceback

import psutil
import setproctitle

from iris.logfmt import configure_logging, tag_standard_streams

from ..config import Config, ConfigError
from ..loader import HandlerImportError, reload_handler
from ..wire.ring import Ring, segment_prefix
from ..worker.process import WorkerSpec, die_with_parent
from ..worker.process import run as run_worker
from .messages import MAX_MESSAGE, pack, unpack

# The signals an operator (or a terminal's Ctrl-C, to the whole group) sends
# the host: the supervisor acts on them, the fork server ignores them.
_SUPERVISOR_SIGNALS = (
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGTTIN,
    signal.SIGTTOU,
    signal.SIGTERM,
    signal.SIGUSR1,
)
# Exit codes of the fork server, read by the supervisor when no message says more.
EXIT_OK, EXIT_FAILED = 0, 3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="irishost.forks.server")
    parser.add_argument("--generation", type=int, required=True)
    parser.add_argument("--supervisor", type=int, required=True)
    parser.add_argument("--socket", type=int, required=True)
    parser.add_argument("--alive", type=int, required=True)
    parser.add_argument("--config-fd", type=int, required=True)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    # The kernel ends this process with the supervisor, whatever it is doing.
    die_with_parent(args.supervisor)
    for signum in _SUPERVISOR_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    tag_standard_streams()
    sock = socket.socket(fileno=args.socket)
    with open(args.config_fd, "rb") as source:
        config = Config.from_plain(unpack(source.read()))
    # As the supervisor's; workers inherit it (and open the file afresh).
    configure_logging(config.logging.level, file=config.logging.file)
    setproctitle.setproctitle(
        f"irishost: fork server {config.service.cluster} ({config.file.name}) "
        f"generation {args.generation}"
    )
    server = _Server(sock, args.supervisor, args.alive, config)
    if not server.prepare(args.check):
        return EXIT_FAILED
    if args.check:
        return EXIT_OK
    return server.serve()


class _Server:
    """The fork server process's loop: one request at a time, in order."""

    def __init__(self, sock: socket.socket, supervisor: int, alive: int, config: Config):
        self.sock = sock
        self.supervisor = supervisor
        self.alive = alive
        self.config = config
        self.handler_class: type | None = None

    def prepare(self, check: bool) -> bool:
        """Import the handler when preloading (or checking); tell the supervisor.

        "started" first: workers.boot_timeout runs from here, so it bounds the
        handler's import, not this interpreter's start.
        """
        self._send(("started",))
        try:
            if self.config.workers.preload or check:
                self.handler_class = reload_handler(self.config)
        except ConfigError as err:  # [settings] the handler class does not take
            self._send(("failed", "config", [str(err.file), err.key, err.problem]))
            return False
        except HandlerImportError as err:
            self._send(("failed", "import", [str(err), err.details]))
            return False
        except BaseException as err:  # KeyboardInterrupt, say: the loader lets it through
            what = f"importing the handler raised {type(err).__name__}: {err}"
            self._send(("failed", "import", [what, traceback.format_exc()]))
            return False
        rss = psutil.Process().memory_info().rss
        self._send(("ready", rss, thread_count()))
        return True

    def serve(self) -> int:
        if self.config.workers.gc_freeze:
            freeze_for_workers()
        while True:
            data = self.sock.recv(MAX_MESSAGE)
            if not data:
                return EXIT_OK  # the supervisor is done with this generation
            request = unpack(data)
            if request[0] == "spawn":
                self._spawn(request[1], request[2])

    def _spawn(self, call: int, slot: int) -> None:
        prefix = segment_prefix(self.config.service.cluster)
        inbox, inbox_segment = Ring.create_shared(prefix=prefix)
        outbox, outbox_segment = Ring.create_shared(prefix=prefix)
        fds = [inbox_segment, inbox.data_fd, inbox.space_fd]
        fds += [outbox_segment, outbox.data_fd, outbox.space_fd]
        try:
            spec = WorkerSpec(
                slot, self.config, inbox, outbox, self.handler_class, self.supervisor, self.alive
            )
            threads = thread_count()
            try:
                pid = _fork_grandchild(spec)
            except OSError as err:
                code = errno.errorcode.get(err.errno or 0, str(err.errno))
                self._send(("spawn-failed", call, code, f"fork failed: {err}"))
                return
            message = pack(("spawned", call, pid, inbox.capacity, threads))
            socket.send_fds(self.sock, [message], fds)
        finally:
            for ring in (inbox, outbox):
                ring.close()
            os.close(inbox_segment)
            os.close(outbox_segment)

    def _send(self, message: tuple[object, ...]) -> None:
        self.sock.send(pack(message))


def freeze_for_workers() -> None:
    """Keep the workers' garbage collector off the pages they share with this process.

    CPython's cyclic collector writes to the header of every container object
    it scans, so a worker's first full collection would copy every page the
    preloaded handler's objects live on: measured (``bench/irishost_bench.py
    --only preload-memory``), a preloaded structure of 202 MiB left each
    worker 147 MiB of private memory after one ``gc.collect()``, 3.3 MiB with
    this. ``gc.freeze()`` moves every object into a permanent generation
    that no collection scans, in this process and in every worker forked from
    it; the workers' collector stays enabled for their own objects. The price:
    a preloaded cycle a worker lets go of is never collected in that worker
    (what is in no cycle is freed by reference counting as ever).

    The import's cyclic garbage is collected first, since frozen it would
    stay in the fork server and every worker for good. CPython's docs also
    suggest ``gc.disable()`` early in the parent, against the holes a
    collection leaves in pages a worker then fills (and so copies); measured
    with 200,000 cycles of import garbage, that changed nothing (23.8 against
    24.2 MiB private per worker) and kept 37 MiB of garbage, so it is not done.
    Freezing is a splice of lists: free whatever its size. What this process
    allocates later (one spawn request's objects) is small and not frozen.
    """
    gc.collect()
    gc.freeze()


def _fork_grandchild(spec: WorkerSpec) -> int:
    """Fork a worker through an intermediate that exits at once; the worker's pid.

    The intermediate's exit reparents the worker to the supervisor (a child
    subreaper). OSError if either fork fails: the second one's errno comes
    back through a pipe.
    """
    read, write = os.pipe()
    try:
        middle = os.fork()
        if middle == 0:  # the intermediate: fork the worker, report its pid, exit
            os.close(read)
            try:
                pid = os.fork()
            except OSError as err:
                os.write(write, f"-{err.errno or errno.EAGAIN}".encode())
                os._exit(1)
            if pid == 0:
                os.close(write)
                run_worker(spec)  # never returns
            os.write(write, str(pid).encode())
            os._exit(0)
        os.close(write)
        write = -1
        answer = os.read(read, 32)
        os.waitpid(middle, 0)
    finally:
        os.close(read)
        if write != -1:
            os.close(write)
    value = int(answer or b"-0")
    if value <= 0:
        code = -value or errno.EAGAIN
        raise OSError(code, os.strerror(code))
    return value


def thread_count() -> int:
    """This process's threads, as the kernel counts them (Python's own count
    misses threads started by C extensions)."""
    return len(os.listdir("/proc/self/task"))


if __name__ == "__main__":
    _code = 1
    try:
        _code = main()
    except BaseException:  # the supervisor reads the exit status; the traceback is for the log
        traceback.print_exc()
    finally:
        sys.stderr.flush()
        os._exit(_code)  # never the interpreter's exit: no atexit of a handler module runs
