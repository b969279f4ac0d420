"""The relay's event loop: sockets, buffers and timers around the Router.

One thread, one selector. Each loop turn reads what every ready socket has,
routes the decoded packets, answers expired deadlines, then flushes every
connection that got output in one ``send`` each, so a burst of small packets
costs one system call per connection rather than one per packet.

A connection that breaks the protocol, sends an oversized message, stops
reading (see "Slow consumers" below), or holds input past the limits of
input_guard.py (handshake and packet deadlines, the budget for partial
packets) is closed alone, with the reason logged; the loop and every other
connection carry on.

Slow consumers: what the relay has routed to a peer and not yet written is
bounded three ways, so the relay's memory is bounded whatever its clients do:

- per connection, by the outbound cap (``--outbound-cap``);
- for all connections together, by the outbound budget
  (``--outbound-budget``): past it, the peers holding the most unsent bytes
  are cut first, which frees the most with the fewest cuts and spares a
  reader that keeps up, whose backlog stays small;
- in time, by the write deadline (``--write-deadline``): a peer that has
  taken nothing for that long while data waits for it is cut, however
  little it holds, so stalled peers do not sit on the budget (and on the
  requests routed to them) until it fills.

Such a peer is hung up on at once, without a CLOSE: it reads nothing, and
its stream may stop inside a packet. Each cut is one WARNING, and counted
by cause in the status snapshot. The total of unsent bytes is summed once
per loop turn over the connections left with a backlog, the same ones the
turn's flush has just visited, so a packet's path carries no bookkeeping.

With a permissions file, each accepted connection's local user is found
at once (peer_uid.py), and the router asks the Gate (permissions.py)
before it registers, subscribes or routes for it; without one, nothing of
that runs.

Deadlines that are not requests' (those, the router keeps) are checked on a
housekeeping tick that runs on the loop's own timeout, only while something
is watched, so the path of a packet carries no timer.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import queue
import selectors
import socket
import threading
import time
from concurrent.futures import CancelledError, Future
from pathlib import Path
from typing import cast

from .. import codec
from ..version import __version__
from . import metrics
from .input_guard import InputGuard, InputLimits
from .passthrough import route_leading
from .peer_uid import Address, OwnerFinder
from .permissions import Action, Gate, Permissions, PermissionsError, User
from .router import ProtocolViolation, Router, TunnelEnd
from .status import Snapshot, StatusListener

log = logging.getLogger("iris.relay")

DEFAULT_PORT = 55555
# Beyond this many unsent bytes a peer is taken to have stopped reading.
# Generous, because one 64 MiB message to a slow reader is legitimate.
DEFAULT_OUTBOUND_CAP = 256 * 1024 * 1024
# Unsent bytes of all connections together. With the budget for partial input
# (input_guard.DEFAULT_PARTIAL_BUDGET, also 256 MiB) a relay's buffers stay
# within 512 MiB whatever its clients do; four 64 MiB messages to four slow
# readers still fit. Equal to the cap, so by default a single peer may hold it
# all; the cap matters when the budget is raised.
DEFAULT_OUTBOUND_BUDGET = 256 * 1024 * 1024
# A healthy client reads its socket on a thread of its own whatever its
# handlers do, and any progress restarts the clock, so a large message to a
# slow reader never trips it; only a stopped or wedged process takes nothing
# for half a minute, which also rides out a badly loaded machine.
DEFAULT_WRITE_DEADLINE = 30.0
# Why slow consumers were cut, as counted in the snapshot: named after the flags.
SLOW_CAUSES = ("outbound_cap", "outbound_budget", "write_deadline")
# One read takes a whole batch of small packets or a tunnel chunk. Not larger:
# glibc serves allocations over 128 KiB with mmap, which made every 256 KiB
# read cost ten times as much as a 64 KiB one.
RECV_SIZE = 64 * 1024
# How many ports to try when asked for any free one (port 0).
PORT_PICKS = 5
# A closing connection whose peer does not read its last packets is cut after this.
LINGER_SECONDS = 5.0
# How long a stopping relay keeps flushing goodbyes to peers slow to read them.
SHUTDOWN_GRACE = 1.0
# Buffers handed to one sendmsg call; Linux refuses more than IOV_MAX (1024).
MAX_IOV = 1024
# Longest single wait of the loop. A client's timeout is an unbounded varint,
# and epoll refuses waits past 2**31 ms (about 25 days) with OverflowError,
# which would end the loop for every connection; a far deadline is reached
# in several waits instead.
MAX_WAIT_SECONDS = 3600.0
# Out of file descriptors, accepting pauses this long between tries: the
# listener stays readable while connections wait in its backlog, so retrying
# at once would spin the loop on failing accepts.
ACCEPT_PAUSE_SECONDS = 0.5
# Failing accepts are reported at most this often, with a count.
ACCEPT_REPORT_SECONDS = 10.0
# How long another thread waits for the loop to build it a snapshot. Woken,
# the loop answers within its turn; one that has not come round by then is stuck.
SNAPSHOT_WAIT_SECONDS = 5.0


class PeerConnection:
    """One accepted socket: decoder, outbound buffer and the router's peer state."""

    __slots__ = (
        "sock",
        "name",
        "decoder",
        "partial",
        "out",
        "out_bytes",
        "closing",
        "cluster",
        "closed",
        "outstanding",
        "requests",
        "topics",
        "tunnels",
        "user",
        "cleared",
        "cleared_topics",
        "stalled_since",
        "_server",
        "_writing",
    )

    def __init__(self, server: RelayServer, sock: socket.socket, address: Address) -> None:
        self.sock = sock
        self.name = f"{address[0]}:{address[1]}"
        # None once the connection stops reading, which frees a partial packet.
        self.decoder: codec.Decoder[codec.ClientPacket] | None = codec.Decoder(
            codec.Side.CLIENT, server.max_message
        )
        self.partial = 0  # bytes of an incomplete packet; kept by the InputGuard
        # What is still to send; the first item becomes a view of its unsent
        # rest when a send takes part of it.
        self.out: list[bytes | memoryview] = []
        self.out_bytes = 0
        self.closing = False  # no more input is read; close once flushed
        self.cluster: str | None = None
        self.closed = False  # set by the router once it stops routing here
        self.outstanding = 0
        self.requests: set[int] = set()
        self.topics: set[str] = set()
        self.tunnels: dict[int, TunnelEnd] = {}
        # Set at accept when the relay has permissions (see permissions.Gate).
        self.user: User | None = None
        self.cleared: set[bytes] | None = None
        self.cleared_topics: set[str] | None = None
        self._server = server
        self._writing = False  # registered for write readiness
        # While a backlog waits: when the socket last took some of it, or the
        # backlog began (the write deadline counts from there).
        self.stalled_since = 0.0

    def send(self, data: bytes) -> None:
        if self.closing and self.closed:
            return
        if not self.out:
            self._server.dirty.append(self)
        self.out.append(data)
        self.out_bytes += len(data)

    def close(self, reason: str | None) -> None:
        """Finish this connection: send CLOSE(reason) unless None, then hang up."""
        if reason is not None:
            self.send(codec.Closed(reason).encode())
        self._server.drop(self, None)


class RelayServer:
    """A single-node Iris relay; run it with :meth:`serve_forever` or :meth:`start`."""

    def __init__(
        self,
        port: int = DEFAULT_PORT,
        max_message: int = codec.MAX_MESSAGE,
        outbound_cap: int = DEFAULT_OUTBOUND_CAP,
        limits: InputLimits | None = None,
        metrics_port: int | None = None,
        permissions: Path | None = None,
        outbound_budget: int = DEFAULT_OUTBOUND_BUDGET,
        write_deadline: float = DEFAULT_WRITE_DEADLINE,
    ) -> None:
        """``outbound_cap``, ``outbound_budget``, ``write_deadline``: the bounds
        on slow consumers (module docstring).
        ``metrics_port``: serve Prometheus metrics there (0: any free port;
        None: not at all); a taken one costs the metrics, not the relay.
        ``permissions``: the permissions file (permissions.py), read here
        (PermissionsError) and again on :meth:`reload_permissions`; None:
        every local program may do anything, as on the original relay."""
        limits = limits or InputLimits()
        limits.check_fits(max_message)
        self.max_message = max_message
        self.outbound_cap = outbound_cap
        self.outbound_budget = outbound_budget
        self.write_deadline = write_deadline
        self._guard: InputGuard[PeerConnection] = InputGuard(limits)
        # Deadlines are met within a quarter of themselves (input_guard.py).
        self._tick_seconds = min(limits.tick, write_deadline / 4)
        self._next_tick = math.inf  # when housekeeping is due; never while nothing is watched
        self._accept_paused_until: float | None = None
        self._accept_failures = 0  # failed accepts not yet reported
        self._accept_troubled = False  # a failure was reported, and its end not yet
        self._accept_report_due = 0.0
        self.permissions = permissions
        self._gate = None if permissions is None else Gate(Permissions.load(permissions))
        self._owners = None if permissions is None else OwnerFinder()
        if self._owners is not None:
            log.info("permissions from %s; users found by %s", permissions, self._owners.method)
        self._reload_due = False  # reload_permissions was asked for
        self.router = Router(gate=self._gate)
        # Traffic, for the status socket: integer adds per read and per flush.
        self.in_msgs = self.in_bytes = self.out_msgs = self.out_bytes = 0
        self.slow_consumers = dict.fromkeys(SLOW_CAUSES, 0)  # cut, by cause
        self.unsent = 0  # unsent bytes of all connections, as of the last flush
        self._started = time.monotonic()
        self.dirty: list[PeerConnection] = []
        self.peers: set[PeerConnection] = set()
        self._selector = selectors.DefaultSelector()
        self._listeners = _listen(port)
        self.port = self._listeners[0].getsockname()[1]
        for listener in self._listeners:
            listener.setblocking(False)
            self._selector.register(listener, selectors.EVENT_READ, None)
        self._status = StatusListener.open(self.port)
        if self._status is not None:
            self._selector.register(self._status.sock, selectors.EVENT_READ, None)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, self)
        # Snapshots other threads wait for; the loop answers them when woken.
        self._snapshot_requests: queue.SimpleQueue[Future[Snapshot]] = queue.SimpleQueue()
        # Held while another thread writes to the wake-up pipe, and while the
        # loop closes it, so such a write never lands on a reused descriptor.
        self._wake_lock = threading.Lock()
        self._lingering: dict[PeerConnection, float] = {}  # closing peers: hang-up deadline
        self._stopping = False
        self._serving = False
        self._thread: threading.Thread | None = None
        self._finished = threading.Event()
        self._metrics = (
            None
            if metrics_port is None
            else metrics.serve_optionally(metrics_port, self.snapshot_from_thread)
        )

    @property
    def addresses(self) -> list[str]:
        return [_format_address(sock.getsockname()) for sock in self._listeners]

    @property
    def metrics_port(self) -> int | None:
        """Where the metrics are served; None when they are not."""
        return None if self._metrics is None else self._metrics.port

    def snapshot(self) -> Snapshot:
        """What the relay holds and has carried, for the status socket (status.py);
        on the loop's thread, which alone changes what it reads."""
        clusters, topics, pending = self.router.census()
        return {
            "server": "iris-relay",
            "version": __version__,
            "pid": os.getpid(),
            "port": self.port,
            "uptime": time.monotonic() - self._started,
            "connections": len(self.peers),
            "clusters": clusters,
            "topics": topics,
            "pending": pending,
            "in_msgs": self.in_msgs + self.router.fast_packets,
            "in_bytes": self.in_bytes,
            "out_msgs": self.out_msgs,
            "out_bytes": self.out_bytes,
            "slow_consumers": sum(self.slow_consumers.values()),
            "slow_consumer_causes": dict(self.slow_consumers),
            "unsent_bytes": self.unsent,
            "outbound_budget": self.outbound_budget,
            "partial_bytes": self._guard.partial_total,
            "partial_budget": self._guard.limits.partial_budget,
            "permissions": None if self.permissions is None else str(self.permissions),
            "refusals": (
                dict.fromkeys((action.value for action in Action), 0)
                if self._gate is None
                else dict(self._gate.refusals)
            ),
        }

    def snapshot_from_thread(self) -> Snapshot | None:
        """:meth:`snapshot`, from any thread but the loop's: built on the loop's
        next turn, as the status socket's is; None if it is stopping, or has
        not answered within SNAPSHOT_WAIT_SECONDS."""
        answer: Future[Snapshot] = Future()
        self._snapshot_requests.put(answer)
        if not self._wake():
            return None
        try:
            return answer.result(SNAPSHOT_WAIT_SECONDS)
        except (TimeoutError, CancelledError):  # cancelled: the relay stopped first
            return None

    def reload_permissions(self) -> None:
        """Re-read the permissions file on the loop's next turn; from any
        thread, or a signal handler (SIGHUP). A file that cannot be used is
        logged, and the rules in force stay."""
        self._reload_due = True
        self._wake()

    def _wake(self) -> bool:
        """Wake the loop from another thread or a signal handler; False once it
        is stopping, when its wake-up pipe may be closed already.

        ``_stopping`` is checked before the lock too: it is set before
        _shutdown takes the lock, so a signal handler on the loop's own
        thread never waits for a lock that thread holds.
        """
        if self._stopping:
            return False
        with self._wake_lock:
            if self._stopping:
                return False
            try:
                os.write(self._wake_w, b"x")
            except BlockingIOError:
                pass  # a wake-up is already pending
        return True

    def _reload(self) -> None:
        self._reload_due = False
        if self._gate is None or self.permissions is None:
            log.warning("no permissions file to reload (iris-relay --permissions)")
            return
        try:
            permissions = Permissions.load(self.permissions)
        except PermissionsError as err:
            log.error("permissions not reloaded, the rules in force stay: %s", err)
            return
        self._gate.replace(permissions, list(self.peers))
        log.info("permissions reloaded from %s", self.permissions)

    def _answer_snapshot_requests(self) -> None:
        waiting = []
        while not self._snapshot_requests.empty():
            waiting.append(self._snapshot_requests.get())
        if waiting:
            snapshot = self.snapshot()
            for answer in waiting:
                answer.set_result(snapshot)

    # -- running --------------------------------------------------------------------

    def start(self) -> RelayServer:
        """Serve on a background thread (in-process use: tests, irishost)."""
        self._thread = threading.Thread(target=self.serve_forever, name="iris-relay", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Close every connection with "relay shutting down" and stop; any thread."""
        self.request_stop()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        elif self._serving:
            self._finished.wait()
        else:  # never served: release the sockets here
            self._shutdown()

    def request_stop(self) -> None:
        """Ask the loop to shut down, without waiting; safe in a signal handler.

        Only the first request wakes the loop: once the loop has ended its
        wake-up pipe is closed, and its descriptor may already be reused.
        """
        if self._stopping:
            return
        self._stopping = True
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass  # a wake-up is already pending

    def __enter__(self) -> RelayServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def serve_forever(self) -> None:
        self._serving = True
        try:
            self._loop()
        finally:
            self._stopping = True  # also when the loop failed: later requests are no-ops
            self._shutdown()
            self._finished.set()

    def _loop(self) -> None:
        select, router, dirty = self._selector.select, self.router, self.dirty
        monotonic = time.monotonic
        while not self._stopping:
            now = monotonic()
            if now >= self._next_tick:
                self._tick(now)
            wake = self._next_tick
            deadline = router.next_deadline()
            if deadline is not None and deadline < wake:
                wake = deadline
            timeout = None if wake == math.inf else min(max(0.0, wake - now), MAX_WAIT_SECONDS)
            for key, mask in select(timeout):
                peer = key.data
                if peer is None:  # only the listeners are registered without data
                    self._accept(cast(socket.socket, key.fileobj))
                elif peer is self:
                    _drain(self._wake_r)
                    self._answer_snapshot_requests()
                    if self._reload_due:
                        self._reload()
                else:
                    if mask & selectors.EVENT_READ:
                        self._read(peer)
                    if mask & selectors.EVENT_WRITE and not peer.out:
                        self._set_writing(peer, False)
            router.expire()
            if dirty:
                self._flush_all()

    def _tick(self, now: float) -> None:
        """Housekeeping: cut lingering peers, enforce the input deadlines and
        the write deadline, resume accepting; then plan the next tick, if
        anything is watched."""
        for peer, deadline in list(self._lingering.items()):
            if now >= deadline:
                self._close_socket(peer, "closing peer did not read its last packets")
        for peer, reason in self._guard.overdue(now):
            self._expel(peer, reason)
        self._cut_stalled(now)
        if self._accept_paused_until is not None and now >= self._accept_paused_until:
            self._accept_paused_until = None
            for listener in self._listeners:
                self._selector.register(listener, selectors.EVENT_READ, None)
        self._next_tick = math.inf
        if self._lingering or self._guard.watching or self.dirty:
            self._next_tick = now + self._tick_seconds
        if self._accept_paused_until is not None:
            self._next_tick = min(self._next_tick, self._accept_paused_until)

    def _watch(self, now: float) -> None:
        """Something needs the housekeeping tick: make sure it is planned."""
        self._next_tick = min(self._next_tick, now + self._tick_seconds)

    def _accept(self, listener: socket.socket) -> None:
        if self._status is not None and listener is self._status.sock:
            self._status.serve(self.snapshot)
            return
        now = time.monotonic()
        accepted: list[tuple[PeerConnection, Address]] = []
        while True:
            try:
                sock, address = listener.accept()
            except (BlockingIOError, InterruptedError):
                break
            except ConnectionAbortedError:
                continue  # reset by the client while still in the backlog
            except OSError as err:  # e.g. out of file descriptors: keep serving the rest
                self._pause_accepting(err, now)
                break
            if self._accept_troubled:
                self._report_accepting()
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            peer = PeerConnection(self, sock, address)
            self.peers.add(peer)
            self._selector.register(sock, selectors.EVENT_READ, peer)
            self._guard.accepted(peer, now)
            accepted.append((peer, address))
        if accepted and self._gate is not None and self._owners is not None:
            self._identify(self._gate, self._owners, accepted, listener.getsockname())
        if self._guard.watching:
            self._watch(now)

    @staticmethod
    def _identify(
        gate: Gate,
        finder: OwnerFinder,
        accepted: list[tuple[PeerConnection, Address]],
        relay: Address,
    ) -> None:
        """Find the user of each new connection (peer_uid.py), and start its
        decisions afresh."""
        owners = finder.owners((address, relay) for _, address in accepted)
        for peer, address in accepted:
            uid = owners[(address, relay)]
            if uid is None:
                log.warning("cannot find the user of %s; it counts as an unknown user", peer.name)
            peer.user = gate.user(uid)
            peer.cleared, peer.cleared_topics = set(), set()

    def _pause_accepting(self, err: OSError, now: float) -> None:
        """Stop watching the listeners for ACCEPT_PAUSE_SECONDS; served
        connections carry on. A failure is reported at most once per
        ACCEPT_REPORT_SECONDS, and its end once after each report."""
        self._accept_failures += 1
        if now >= self._accept_report_due:
            log.warning(
                "cannot accept connections: %s; retrying every %g s "
                "(%d failed attempts since the last report)",
                err.strerror or err,
                ACCEPT_PAUSE_SECONDS,
                self._accept_failures,
            )
            self._accept_failures = 0
            self._accept_troubled = True
            self._accept_report_due = now + ACCEPT_REPORT_SECONDS
        if self._accept_paused_until is None:
            for other in self._listeners:
                self._selector.unregister(other)
        self._accept_paused_until = now + ACCEPT_PAUSE_SECONDS
        self._next_tick = min(self._next_tick, self._accept_paused_until)

    def _report_accepting(self) -> None:
        """Accepting works again after a reported failure: say so, once."""
        log.info(
            "accepting connections again (%d failed attempts since the last report)",
            self._accept_failures,
        )
        self._accept_failures = 0
        self._accept_troubled = False

    def _read(self, peer: PeerConnection) -> None:
        decoder = peer.decoder
        if decoder is None:  # closing: its input is no longer read
            return
        try:
            data = peer.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:
            self.drop(peer, f"read failed: {err}")
            return
        if not data:
            self.drop(peer, None)
            return
        self.in_bytes += len(data)
        view: bytes | memoryview = data
        try:
            if peer.cluster is not None and not peer.partial:  # attached, nothing buffered
                taken = route_leading(self.router, peer, data, self.max_message)
                if taken == len(data):
                    return
                view = memoryview(data)[taken:]
            handle = self.router.handle
            packets = decoder.feed(view)
            self.in_msgs += len(packets)
            for packet in packets:
                handle(peer, packet)
                if peer.closing:
                    return
        except (codec.ProtocolError, ProtocolViolation) as err:
            self._expel(peer, f"protocol violation: {err}")
            return
        except Exception:
            # A bug of ours, met while serving this peer: losing the one
            # connection beats losing every connection with the relay.
            log.exception("internal error while serving %s; closing it", peer.name)
            self._expel(peer, "relay internal error")
            return
        buffered = decoder.buffered
        if buffered or peer.partial:  # a packet is incomplete, or was until now
            self._note_partial(peer, buffered, bool(packets))

    def _note_partial(self, peer: PeerConnection, buffered: int, completed: bool) -> None:
        now = time.monotonic()
        budget = self._guard.limits.partial_budget
        for offender in self._guard.received(peer, buffered, completed, now):
            self._expel(
                offender,
                f"partial packets of all connections exceed the relay's budget of {budget} "
                f"bytes, and this connection's ({offender.partial} bytes) is among the oldest",
            )
        if self._guard.watching:
            self._watch(now)

    # -- output -----------------------------------------------------------------------

    def _flush_all(self) -> None:
        """Flush every peer with output; those left with a backlog stay in
        ``dirty``, and are what the outbound budget and the tick look at."""
        dirty, self.dirty = self.dirty, []
        for peer in dirty:
            self._flush(peer)
        if self.dirty:
            self._bound_backlog()
        else:
            self.unsent = 0

    def _bound_backlog(self) -> None:
        """Sum the backlog; over the outbound budget, cut the peers holding
        the most until the rest fit. Keep the tick planned for the write deadline."""
        self.unsent = sum(peer.out_bytes for peer in self.dirty)
        budget = self.outbound_budget
        if self.unsent > budget:
            for peer in sorted(self.dirty, key=lambda peer: peer.out_bytes, reverse=True):
                if self.unsent <= budget:
                    break
                self.unsent -= peer.out_bytes
                self._cut_slow(
                    peer,
                    "outbound_budget",
                    f"unsent bytes of all connections over the relay's budget of {budget} "
                    f"bytes, and this connection holds the most ({peer.out_bytes} bytes)",
                )
            self.dirty = [peer for peer in self.dirty if peer.out]
        self._watch(time.monotonic())

    def _cut_stalled(self, now: float) -> None:
        """Cut the peers that have taken nothing for the write deadline while
        data waited; closing ones have their linger instead."""
        deadline = self.write_deadline
        for peer in self.dirty:
            if peer.out and not peer.closing and now - peer.stalled_since >= deadline:
                self._cut_slow(
                    peer,
                    "write_deadline",
                    f"nothing taken for {deadline:g} s while {peer.out_bytes} bytes wait",
                )

    def _flush(self, peer: PeerConnection) -> None:
        """Send what the socket takes of ``peer.out``, gathered without copying.

        Joining the backlog into one buffer per attempt would copy all of it
        each loop turn: quadratic in the backlog of a slow reader, and paid by
        every other connection while it grows.
        """
        out = peer.out
        if not out:
            return
        try:
            sent = peer.sock.sendmsg(out[:MAX_IOV])
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as err:
            out.clear()
            self._close_socket(peer, f"write failed: {err}")
            return
        self.out_bytes += sent
        if sent == peer.out_bytes:  # the common case: the socket took everything
            self.out_msgs += len(out)
            out.clear()
            peer.out_bytes = 0
        else:
            drained = sent > 0
            peer.out_bytes -= sent
            done = 0
            while sent >= len(out[done]):
                sent -= len(out[done])
                done += 1
            self.out_msgs += done
            del out[:done]
        if not out:
            if peer.closing:
                self._close_socket(peer, None)
            elif peer._writing:
                self._set_writing(peer, False)
            return
        if sent:
            out[0] = memoryview(out[0])[sent:]  # later sends resume from here
        if peer.out_bytes > self.outbound_cap and not peer.closing:
            self._cut_slow(peer, "outbound_cap", f"over {self.outbound_cap} bytes unsent")
            return
        if drained or not peer._writing:  # progress, or a backlog that starts now
            peer.stalled_since = time.monotonic()
        self.dirty.append(peer)  # retried when writable
        self._set_writing(peer, True)

    def _set_writing(self, peer: PeerConnection, writing: bool) -> None:
        if peer._writing != writing and peer in self.peers:
            peer._writing = writing
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if writing else 0)
            self._selector.modify(peer.sock, events, peer)

    # -- ending connections ---------------------------------------------------------

    def _cut_slow(self, peer: PeerConnection, cause: str, why: str) -> None:
        """Hang up on a peer that does not read, at once and without a CLOSE
        (it would wait behind what the peer does not read); count it under ``cause``."""
        self.slow_consumers[cause] += 1
        self._close_socket(peer, f"peer stopped reading: {why}")

    def _expel(self, peer: PeerConnection, reason: str) -> None:
        """Tell ``peer`` why in a CLOSE, log it, and drop the connection."""
        if peer.closing:
            return
        peer.send(codec.Closed(reason).encode())
        self.drop(peer, reason)

    def drop(self, peer: PeerConnection, reason: str | None) -> None:
        """Stop routing to ``peer`` and hang up once its output is flushed."""
        if peer.closing:
            return
        self._stop_reading(peer)
        if reason:
            log.warning("closing %s: %s", peer.name, reason)
        if peer.out:
            now = time.monotonic()
            self._lingering[peer] = now + LINGER_SECONDS
            self._watch(now)
            # Its input is no longer read: left watched, unread bytes or an EOF
            # would wake the selector at once, every turn, until the cut.
            peer._writing = True
            self._selector.modify(peer.sock, selectors.EVENT_WRITE, peer)
        else:
            self._close_socket(peer, None)

    def _stop_reading(self, peer: PeerConnection) -> None:
        """No more input from ``peer``: no routing to it, no partial packet kept."""
        peer.closing = True
        self.router.detach(peer)
        self._guard.forget(peer)
        peer.decoder = None

    def _close_socket(self, peer: PeerConnection, reason: str | None) -> None:
        if peer not in self.peers:
            return
        if reason:
            log.warning("closing %s: %s", peer.name, reason)
        self._stop_reading(peer)
        peer.out.clear()
        peer.out_bytes = 0
        self._lingering.pop(peer, None)
        self.peers.discard(peer)
        self._selector.unregister(peer.sock)
        peer.sock.close()

    def _shutdown(self) -> None:
        """Say goodbye to every peer, flush for up to SHUTDOWN_GRACE, close.

        Flushing is non-blocking and shared: a peer that does not read cannot
        use up the grace period of those that do, which would leave them
        without the reason they were closed.
        """
        if self._metrics is not None:
            self._metrics.close()
        if self._owners is not None:
            self._owners.close()
        for listener in self._listeners:
            if self._accept_paused_until is None:
                self._selector.unregister(listener)
            listener.close()
        self._selector.unregister(self._wake_r)
        if self._status is not None:
            self._selector.unregister(self._status.sock)
            self._status.close()
        for peer in list(self.peers):
            if not peer.closing:
                peer.send(codec.Closed("relay shutting down").encode())
                self.drop(peer, None)
        deadline = time.monotonic() + SHUTDOWN_GRACE
        self._flush_all()
        while self.dirty and (remaining := deadline - time.monotonic()) > 0:
            self._selector.select(remaining)  # until a backed-up peer can take more
            self._flush_all()
        for peer in list(self.peers):
            self._close_socket(peer, None)
        self._selector.close()
        with self._wake_lock:  # _stopping is set: no other thread asks after this
            while not self._snapshot_requests.empty():
                self._snapshot_requests.get().cancel()
            os.close(self._wake_r)
            os.close(self._wake_w)
        log.info("relay stopped")


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def _format_address(address: Address) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _listen(port: int) -> list[socket.socket]:
    """Listen on 127.0.0.1 and ::1 (the same port); fail only if neither works.

    A busy port is an error on either address: a relay that shares its port
    with another would split the clients between two unrelated relays. With
    port 0 the kernel picks the IPv4 port, which may happen to be taken on
    ::1; then another pick is tried.
    """
    for _ in range(PORT_PICKS - 1 if port == 0 else 0):
        try:
            return _listen_once(port)
        except OSError as err:
            if err.errno != errno.EADDRINUSE:
                raise
    return _listen_once(port)


def _listen_once(port: int) -> list[socket.socket]:
    listeners: list[socket.socket] = []
    errors: list[OSError] = []
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as err:
            errors.append(err)
            continue
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((host, port))
            sock.listen(1024)
        except OSError as err:
            sock.close()
            if err.errno == errno.EADDRINUSE:
                for other in listeners:
                    other.close()
                raise OSError(err.errno, f"port {port} is already in use on {host}") from err
            errors.append(err)
            continue
        listeners.append(sock)
        port = sock.getsockname()[1]  # port 0: the v6 listener takes the v4 one's port
    if not listeners:
        raise OSError(f"cannot listen on 127.0.0.1 or ::1 port {port}: {errors}")
    return listeners
