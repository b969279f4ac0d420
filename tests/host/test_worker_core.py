"""The worker core in this process: frames in, frames and executor calls out.

The core (irishost/worker/core.py) is driven here as a worker's frame loop
drives it: encoded frames into ``handle()``, and what it writes to its
outbound ring (a real one) read back and decoded. The first tests give it an
executor that only records what it is asked to run, which is the core's side
of the Executor protocol: counting, refusals, the drain, tunnels. The last
ones run both real executors here, threads and an event loop, on a real
relay, with no fork. Only the fork guard's test forks: a fork is what it
guards against.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

import iris
import iris.aio
from iris.logs import ContextLog
from irishost.config import load_config
from irishost.wire import frames
from irishost.wire.ring import Ring
from irishost.worker.core import FORKED_CHILD_EXIT, WorkerCore
from irishost.worker.loop import LoopExecutor
from irishost.worker.threads import ThreadExecutor
from irishost.worker.tunnel import ThreadTunnelProxy

RING_CAPACITY = 64 * 1024  # far more than any test here has in flight
WAIT = 10.0  # for a frame from a handler thread or loop: only a hang takes this long


class RecordingExecutor:
    """Records what the core asks it to run; with ``refuse`` set, it refuses
    everything as full pools would."""

    def __init__(self, core: WorkerCore):
        self.core = core
        self.calls: list[tuple] = []
        self.refuse = False
        self.tunnels: dict[int, ThreadTunnelProxy] = {}

    def run_request(self, ticket: int, deadline: float, payload: bytes) -> str | None:
        self.calls.append(("request", ticket, payload))
        return "pool full" if self.refuse else None

    def run_broadcast(self, payload: bytes) -> bool:
        self.calls.append(("broadcast", payload))
        return not self.refuse

    def run_event(self, topic: str, payload: bytes) -> bool:
        self.calls.append(("event", topic, payload))
        return not self.refuse

    def run_drop(self, reason: str) -> bool:
        self.calls.append(("drop", reason))
        return not self.refuse

    def run_tunnel(self, tunnel_id: int) -> None:
        self.tunnels[tunnel_id] = self.core.open_tunnel(ThreadTunnelProxy, tunnel_id)


@dataclass
class Wiring:
    """A worker's rings and alive pipe, as the fork server hands them over."""

    inbox: Ring
    outbox: Ring
    alive: int  # the worker's end
    alive_writer: int  # the supervisor's end: closed, the worker is orphaned

    def core(self) -> WorkerCore:
        log = ContextLog(logging.getLogger("irishost")).new(worker=0)
        return WorkerCore(self.outbox, self.alive, log, 0)

    def sent(self) -> list[frames.Frame]:
        """What the core has written to the supervisor so far."""
        return [frames.decode(data) for data in self.outbox.drain()]

    def next_sent(self) -> frames.Frame:
        data = self.outbox.get(WAIT)
        assert data is not None, "no frame from the worker"
        return frames.decode(data)


@pytest.fixture
def wiring():
    prefix = f"coretest-{uuid.uuid4().hex[:12]}"
    inbox, outbox = Ring.create(RING_CAPACITY, prefix), Ring.create(RING_CAPACITY, prefix)
    wiring = Wiring(inbox, outbox, *os.pipe())
    yield wiring
    inbox.close()
    outbox.close()
    os.close(wiring.alive)
    if wiring.alive_writer >= 0:
        os.close(wiring.alive_writer)


@pytest.fixture
def core(wiring) -> WorkerCore:
    core = wiring.core()
    core.attach(RecordingExecutor(core))
    return core


def later() -> float:
    return time.monotonic() + 60


# -- the core, with an executor that records ---------------------------------------


def test_a_request_is_counted_from_its_frame_until_its_reply(wiring, core):
    core.handle([frames.Request(7, later(), b"hi").encode()])

    assert core._executor.calls == [("request", 7, b"hi")]
    assert core.in_flight == 1 and wiring.sent() == []

    core.answer(7, (True, b"HI"))

    assert wiring.sent() == [frames.Reply(7, True, b"HI")]
    assert core.in_flight == 0


def test_a_request_its_caller_gave_up_on_is_answered_expired(wiring, core):
    core.handle([frames.Request(7, later(), b"hi").encode()])
    core.answer(7, None)

    (frame,) = wiring.sent()
    assert type(frame) is frames.Expired and frame.ticket == 7
    assert core.in_flight == 0


def test_a_refused_request_gets_its_fault_at_once_and_is_not_counted(wiring, core):
    core._executor.refuse = True
    core.handle([frames.Request(7, later(), b"hi").encode()])

    assert wiring.sent() == [frames.Reply(7, False, "pool full")]
    assert core.in_flight == 0


@pytest.mark.parametrize(
    ("frame", "call"),
    [
        (frames.Broadcast(b"b"), ("broadcast", b"b")),
        (frames.Event("news", b"e"), ("event", "news", b"e")),
        (frames.Drop("relay gone"), ("drop", "relay gone")),
    ],
)
def test_fire_and_forget_work_is_counted_until_it_completes_unless_refused(
    wiring, core, frame, call
):
    core.handle([frame.encode()])
    assert core._executor.calls == [call] and core.in_flight == 1

    core.complete()
    assert core.in_flight == 0

    core._executor.refuse = True
    core.handle([frame.encode()])
    assert core.in_flight == 0
    assert wiring.sent() == []  # nothing of this is answered


def test_a_drain_ends_the_worker_once_no_work_or_tunnel_is_left(core):
    assert not core.drained  # idle, but no drain asked for
    core.handle(
        [
            frames.Request(1, later(), b"slow").encode(),
            frames.Tunnel(5).encode(),
            frames.Drain().encode(),
        ]
    )
    assert not core.drained

    core.answer(1, (True, b"done"))
    assert not core.drained  # the tunnel is still open

    core.handle([frames.TunClosed(5, "caller left").encode()])
    assert core.drained


def test_tunnel_frames_reach_their_proxy_and_its_frames_go_out(wiring, core):
    core.handle([frames.Tunnel(5).encode(), frames.TunData(5, b"ping").encode()])
    tunnel = core._executor.tunnels[5]

    assert tunnel.recv(timeout=WAIT) == b"ping"
    assert wiring.sent() == [frames.TunAck(5, 4)]

    sending = threading.Thread(target=tunnel.send, args=(b"pong",))
    sending.start()
    assert wiring.next_sent() == frames.TunSend(5, b"pong", None)
    core.handle([frames.TunSent(5, None).encode()])  # what releases send()
    sending.join(WAIT)
    assert not sending.is_alive()

    core.handle([frames.Drain().encode()])
    assert not core.drained
    tunnel.close()
    assert wiring.sent() == [frames.TunClose(5)]
    assert core.drained
    core.handle([frames.TunData(5, b"late").encode()])  # for a closed tunnel: ignored


def test_a_frame_that_does_not_decode_is_an_error_not_a_guess(core):
    with pytest.raises(frames.FrameError):
        core.handle([b"\xc1 not msgpack"])


def test_the_worker_is_orphaned_once_the_supervisor_end_of_the_alive_pipe_closes(wiring, core):
    assert not core.orphaned()
    os.close(wiring.alive_writer)
    wiring.alive_writer = -1
    assert core.orphaned()


@pytest.mark.parametrize("entry", ["complete", "send", "returned"])
def test_a_process_forked_by_a_handler_exits_where_it_returns_into_the_core(wiring, core, entry):
    core.handle([frames.Request(7, later(), b"fork").encode()])
    child = os.fork()
    if child == 0:  # the handler's child, returning into the worker's code
        try:
            core.note_fork()  # as the at-fork hook the worker process registers does
            reply = frames.Reply(7, True, b"from the child").encode()
            if entry == "complete":
                core.complete(reply)
            elif entry == "send":
                core.send(reply)
            else:
                core.returned()
        finally:
            os._exit(99)  # only if the guard let it through
    _, status = os.waitpid(child, 0)

    assert os.waitstatus_to_exitcode(status) == FORKED_CHILD_EXIT
    assert wiring.sent() == []
    assert core.in_flight == 1  # the worker's own count is its own


# -- both real executors, in this process ------------------------------------------


class ThreadedHandler(iris.ServiceHandler):
    def __init__(self) -> None:
        self.broadcasts: queue.SimpleQueue[bytes] = queue.SimpleQueue()
        self.closed = threading.Event()

    def init(self, conn: iris.Connection) -> None:
        self.conn = conn

    def handle_request(self, request: bytes) -> bytes:
        if request == b"raise":
            raise ValueError("refused")
        return request.upper()

    def handle_broadcast(self, message: bytes) -> None:
        self.broadcasts.put(message)

    def handle_tunnel(self, tunnel) -> None:
        with tunnel:
            tunnel.send(tunnel.recv(timeout=WAIT))

    def close(self) -> None:
        self.closed.set()


class AsyncHandler(iris.aio.ServiceHandler):
    def __init__(self) -> None:
        self.broadcasts: queue.SimpleQueue[bytes] = queue.SimpleQueue()
        self.closed = threading.Event()

    async def init(self, conn: iris.aio.Connection) -> None:
        self.conn = conn

    async def handle_request(self, request: bytes) -> bytes:
        if request == b"raise":
            raise ValueError("refused")
        return request.upper()

    async def handle_broadcast(self, message: bytes) -> None:
        self.broadcasts.put(message)

    async def handle_tunnel(self, tunnel) -> None:
        async with tunnel:
            await tunnel.send(await tunnel.recv(timeout=WAIT))

    async def close(self) -> None:
        self.closed.set()


def write_config(directory: Path, port: int) -> Path:
    path = directory / "service.toml"
    path.write_text(
        f'[service]\ncluster = "coretest-{uuid.uuid4().hex[:6]}"\nhandler = "unused:Handler"\n'
        f'[relay]\nport = {port}\nembedded = false\nconnect_timeout = "5s"\n'
    )
    return path


@pytest.mark.parametrize(
    ("executor_class", "handler_class"),
    [(ThreadExecutor, ThreadedHandler), (LoopExecutor, AsyncHandler)],
    ids=["threads", "event-loop"],
)
def test_both_executors_turn_the_same_frames_into_the_same_answers(
    relay, tmp_path, wiring, executor_class, handler_class
):
    config = load_config(write_config(tmp_path, relay.port))
    handler = handler_class()
    core = wiring.core()
    executor = executor_class(core, handler, config, wiring.inbox)
    core.attach(executor)
    executor.boot()
    exit_codes: queue.SimpleQueue[int] = queue.SimpleQueue()
    serving = threading.Thread(target=lambda: exit_codes.put(executor.serve()), daemon=True)
    serving.start()

    for frame in (
        frames.Request(1, later(), b"hi"),
        frames.Request(2, later(), b"raise"),
        frames.Request(3, time.monotonic() - 1, b"late"),
        frames.Broadcast(b"news"),
        frames.Tunnel(9),
        frames.TunData(9, b"echo me"),
    ):
        wiring.inbox.put(frame.encode())
    answers = []
    while len(answers) < 6:
        frame = wiring.next_sent()
        answers.append(frame)
        if type(frame) is frames.TunSend:
            wiring.inbox.put(frames.TunSent(9, None).encode())

    assert sorted(answers, key=repr) == sorted(
        [
            frames.Reply(1, True, b"HI"),
            frames.Reply(2, False, "ValueError: refused"),
            frames.Expired(3),
            frames.TunAck(9, 7),
            frames.TunSend(9, b"echo me", None),
            frames.TunClose(9),
        ],
        key=repr,
    )
    assert handler.broadcasts.get(timeout=WAIT) == b"news"

    wiring.inbox.put(frames.Drain().encode())
    assert exit_codes.get(timeout=WAIT) == 0
    assert handler.closed.is_set()
    assert wiring.sent() == []
