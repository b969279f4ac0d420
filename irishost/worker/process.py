"""A worker process: its life from fork to exit, around the worker core.

The worker is forked by a fork server (``irishost.forks.server``) and never returns
into its code: :func:`run` ends in ``os._exit``. :func:`serve` makes the
process a worker (its title, signals, descriptors, log), imports and makes
the handler, and picks its executor: threads for an ``iris.ServiceHandler``
(irishost/worker/threads.py), an event loop for an ``iris.aio.ServiceHandler``
(irishost/worker/loop.py). What frames mean, the in-flight count, tunnels,
the drain and the fork guard are the worker core's (irishost/worker/core.py).

Exit codes tell the supervisor how a worker ended: 0 after a requested
drain (the handler's ``close()`` and ``atexit`` callbacks have run then),
BOOT_FAILED when the handler could not be imported or initialised
(the FAILED frame carries the traceback), PARENT_GONE when the supervisor
disappeared.

A worker never outlives its supervisor. It is forked by a fork server
through an intermediate process that exits at once, which hands the worker
to the supervisor, a child subreaper; once the supervisor is its parent, the
kernel kills it when the supervisor dies (PR_SET_PDEATHSIG, set before
anything else runs), whatever it is doing, even blocked in a C call inside
``init``. It also holds the read end of the supervisor's alive pipe, which
reads EOF once the supervisor is gone (as CPython's forkserver's children
do), and looks at it whenever it is idle. And a process a handler forks never
touches the worker's rings: should it return from the handler into the
worker's code, the core's fork guard ends it there.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import os
import signal
import time
import traceback
from dataclasses import dataclass

import setproctitle

import iris.aio
from iris.logfmt import reopen_log_file, start_log_writer, stop_log_writer
from iris.logs import ContextLog

from ..config import Config
from ..loader import reload_handler
from ..wire import frames
from ..wire.ring import Ring
from .core import PARENT_GONE, Executor, WorkerCore
from .loop import LoopExecutor
from .threads import ThreadExecutor

BOOT_FAILED = 3

# prctl(2) option: the signal the kernel sends this process when its parent dies.
PR_SET_PDEATHSIG = 1
# Loaded before any fork, so a fresh worker only makes the call.
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass
class WorkerSpec:
    """What a worker needs, set before fork."""

    index: int
    config: Config
    inbox: Ring  # supervisor -> worker
    outbox: Ring  # worker -> supervisor
    handler_class: type | None  # preloaded in the fork server, or None to import here
    supervisor: int  # the supervisor's pid: its parent once reparented; it must not outlive it
    alive: int  # the read end of the supervisor's alive pipe: EOF once the supervisor is gone


def run(spec: WorkerSpec) -> None:
    """Body of a forked worker, called first thing after fork; never returns.

    A drained worker (exit code 0, after ``handler.close()``) runs the
    ``atexit`` callbacks handler code registered, as a program's normal
    exit would; ``os._exit`` alone would skip them. No other way out does:
    an orphaned or failed worker must not act as if it ended normally, and
    a process a handler forked that came back here shares the worker's
    registry, not its resources. The log writer's own hook was registered
    before the handler's (LIFO), so it runs after them and writes their lines.
    """
    code = 1
    pid = os.getpid()
    try:
        _wait_for_reparenting(spec.supervisor)
        die_with_parent(spec.supervisor)
        code = serve(spec)
        if code == 0 and os.getpid() == pid:
            atexit._run_exitfuncs()
    except BaseException:  # the last line of defence in a child: report, then exit
        traceback.print_exc()
    finally:
        stop_log_writer()  # os._exit skips atexit, where the queued lines would be written
        os._exit(code)


def _wait_for_reparenting(supervisor: int) -> None:
    """Wait until the intermediate that forked this worker has exited and the
    supervisor (a child subreaper) is this worker's parent.

    The intermediate exits right after the fork, so this takes microseconds;
    a parent that is neither means the supervisor died meanwhile.
    """
    middle = os.getppid()
    while (parent := os.getppid()) != supervisor:
        if parent != middle:
            os._exit(PARENT_GONE)
        time.sleep(0.0005)


def die_with_parent(parent: int) -> None:
    """Have the kernel SIGKILL this process when ``parent`` dies, at any stage.

    Polling ``getppid`` alone leaves gaps: a worker blocked in ``init``
    never polls. SIGKILL, because handlers may catch or block anything
    milder. The supervisor may have died between fork and prctl, when no
    signal is sent any more: the check after it closes that gap.
    """
    if _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")
    if os.getppid() != parent:
        os._exit(PARENT_GONE)


def _close_inherited_fds(keep: set[int]) -> None:
    """Close the supervisor's descriptors (relay sockets, siblings' rings).

    Otherwise a worker would hold the relay's listening port open after the
    supervisor died, and keep siblings' eventfds alive.
    """
    keep = {0, 1, 2, *keep}
    low = 3
    for fd in sorted(keep):
        if fd >= low:
            os.closerange(low, fd)
            low = fd + 1
    os.closerange(low, os.sysconf("SC_OPEN_MAX"))


def serve(spec: WorkerSpec) -> int:
    """Be the worker ``spec`` describes until it ends; its exit code."""
    config = spec.config
    setproctitle.setproctitle(
        f"irishost: worker {spec.index} {config.service.cluster} ({config.file.name})"
    )
    for signum in (signal.SIGINT, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU):
        signal.signal(signum, signal.SIG_IGN)  # the supervisor handles these
    signal.signal(signal.SIGUSR1, lambda *_: reopen_log_file())  # as the supervisor
    for signum in (signal.SIGTERM, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_DFL)
    signal.set_wakeup_fd(-1)
    inbox, outbox = spec.inbox, spec.outbox
    # The fork server maps no other worker's rings when it forks, so a
    # worker that corrupts memory cannot reach theirs.
    _close_inherited_fds(
        {inbox.data_fd, inbox.space_fd, outbox.data_fd, outbox.space_fd, spec.alive}
    )
    reopen_log_file()  # the fork server's may be a file logrotate has moved since
    start_log_writer()  # so a stalled stderr never holds up a handler thread that logs
    # The supervisor's context too: "service=<cluster>" finds both in a log.
    log = ContextLog(logging.getLogger("irishost")).new(
        service=config.service.cluster, worker=spec.index
    )
    core = WorkerCore(outbox, spec.alive, log, spec.index)
    os.register_at_fork(after_in_child=core.note_fork)
    try:
        executor = _boot(spec, core)
    except BaseException:
        core.send(frames.Failed(traceback.format_exc()).encode())
        return BOOT_FAILED
    core.send(frames.Ready(os.getpid()).encode())  # the supervisor logs "worker ready"
    return executor.serve()


def _boot(spec: WorkerSpec, core: WorkerCore) -> Executor:
    """Make the handler and its executor, and boot it (``init`` included)."""
    config = spec.config
    # Imported here (preload = false): from source, for the same reason
    # reloads do, so a worker never runs code older than its files.
    handler_class = spec.handler_class or reload_handler(config)
    handler = handler_class(**config.settings)
    if config.topics and not callable(getattr(handler, "handle_event", None)):
        raise TypeError(
            f"{config.service.handler} has no handle_event(topic, event) method, "
            f"but the config subscribes to {', '.join(t.name for t in config.topics)}"
        )
    executor_class = (
        LoopExecutor if isinstance(handler, iris.aio.ServiceHandler) else ThreadExecutor
    )
    executor: Executor = executor_class(core, handler, config, spec.inbox)
    core.attach(executor)
    executor.boot()
    return executor
