"""iris.aio (the asyncio binding) against a real relay process.

Each test is a plain function that drives one coroutine with asyncio.run
(no pytest plugin), bounded by RUN_TIMEOUT so a hang fails instead of
stalling the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

import pytest

import iris
import iris.aio

MiB = 1 << 20
# Every test's coroutine must finish within this; most take a fraction of a second.
RUN_TIMEOUT = 30.0
# Slack for "arrives at about the timeout" on a loaded two-core machine.
LATE = 0.3


def run(coro):
    async def bounded():
        async with asyncio.timeout(RUN_TIMEOUT):
            return await coro

    return asyncio.run(bounded())


class Echo(iris.aio.ServiceHandler):
    """Async callbacks: echoes requests and tunnel messages, queues broadcasts."""

    def __init__(self):
        self.broadcasts: asyncio.Queue[bytes] = asyncio.Queue()
        self.drops: list[Exception] = []

    async def handle_request(self, request: bytes) -> bytes:
        if request.startswith(b"sleep:"):
            await asyncio.sleep(float(request[6:]))
        elif request == b"fail":
            raise RuntimeError("the database is down")
        elif request == b"cancel":
            asyncio.current_task().cancel()
            await asyncio.sleep(5)
        elif request == b"not-bytes":
            return "a str"
        return request

    async def handle_broadcast(self, message: bytes) -> None:
        await self.broadcasts.put(message)

    async def handle_tunnel(self, tunnel: iris.aio.Tunnel) -> None:
        async with tunnel:
            while True:
                try:
                    await tunnel.send(await tunnel.recv())
                except iris.ClosedError:
                    return

    async def handle_drop(self, reason: Exception) -> None:
        await asyncio.sleep(0)
        self.drops.append(reason)


class PlainEcho(iris.aio.ServiceHandler):
    """Plain (non-async) callbacks are allowed too; they run on the loop."""

    def handle_request(self, request: bytes) -> bytes:
        return request.upper()


class Gate(iris.aio.ServiceHandler):
    """Requests wait for ``release``; tracks how many run at once."""

    def __init__(self):
        self.release = asyncio.Event()
        self.running = 0
        self.peak = 0
        self.started = 0

    async def handle_request(self, request: bytes) -> bytes:
        self.started += 1
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            await self.release.wait()
            return request
        finally:
            self.running -= 1


@contextlib.asynccontextmanager
async def serving(
    port: int,
    cluster: str,
    handler: iris.aio.ServiceHandler,
    limits: iris.ServiceLimits | None = None,
) -> AsyncIterator[iris.aio.Connection]:
    """``handler`` registered as ``cluster``, and a connection to call it."""
    async with (
        iris.aio.register(port, cluster, handler, limits),
        iris.aio.connect(port) as conn,
    ):
        yield conn


async def until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


PROBE = b"probe-"


async def subscribed(conn: iris.aio.Connection, topic: str, callback, seen: list) -> None:
    """Subscribe and wait until the relay has the subscription: a probe
    published on the same connection arrives after the SUBSCRIBE."""
    await conn.subscribe(topic, callback)
    probe = PROBE + b"%d" % id(seen)
    await conn.publish(topic, probe)
    await until(lambda: probe in seen)


def events(seen: list) -> list:
    """What a subscriber received, without the probes (every subscriber gets each)."""
    return [event for event in seen if not event.startswith(PROBE)]


# ---------------------------------------------------------------------------
# Request/reply.


def test_request_reply_with_async_with_and_await(relay):
    async def main():
        async with (
            iris.aio.register(relay.port, "echo", Echo()) as service,
            iris.aio.connect(relay.port) as conn,
        ):
            assert await conn.request("echo", b"ping", 1) == b"ping"
            assert await conn.request("echo", b"sleep:0.01", 1) == b"sleep:0.01"
            replies = await asyncio.gather(
                *(conn.request("echo", b"%d" % i, 5) for i in range(200))
            )
            assert replies == [b"%d" % i for i in range(200)]
        assert conn.closed and service.conn.closed
        other = await iris.aio.connect(relay.port)
        with pytest.raises(iris.TimeoutError):  # the cluster left with the service
            await other.request("echo", b"anyone?", 0.1)
        await other.close()
        await other.close()  # idempotent

    run(main())


def test_connect_without_relay_fails(relay_factory):
    relay = relay_factory()
    port = relay.port
    assert relay.stop() == 0

    async def main():
        with pytest.raises(ConnectionRefusedError, match=str(port)):
            await iris.aio.connect(port)

    run(main())


def test_plain_handler_methods_run_on_the_loop(relay):
    async def main():
        async with serving(relay.port, "plain", PlainEcho()) as conn:
            assert await conn.request("plain", b"abc", 1) == b"ABC"

    run(main())


def test_handler_failures_are_remote_errors(relay):
    async def main():
        async with serving(relay.port, "echo", Echo()) as conn:
            with pytest.raises(iris.RemoteError) as failed:
                await conn.request("echo", b"fail", 1)
            assert failed.value.fault == "RuntimeError: the database is down"
            with pytest.raises(iris.RemoteError, match="returned str, not bytes"):
                await conn.request("echo", b"not-bytes", 1)

    run(main())


def test_a_cancelled_handler_answers_a_fault(relay):
    async def main():
        async with serving(relay.port, "echo", Echo()) as conn:
            with pytest.raises(iris.RemoteError, match="cancelled"):
                await conn.request("echo", b"cancel", 2)
            assert await conn.request("echo", b"after", 1) == b"after"

    run(main())


def test_timeouts_raise_iris_timeout_error_at_the_timeout(relay):
    async def main():
        async with serving(relay.port, "echo", Echo()) as conn:
            for cluster, request in (("nobody", b"x"), ("echo", b"sleep:2")):
                start = time.monotonic()
                with pytest.raises(iris.TimeoutError, match="timed out after 0.2 s"):
                    await conn.request(cluster, request, 0.2)
                assert 0.2 <= time.monotonic() - start < 0.2 + LATE

    run(main())


def test_local_argument_errors_are_value_errors(relay):
    async def main():
        async with iris.aio.connect(relay.port) as conn:
            for call in (
                conn.request("", b"x", 1),
                conn.request("echo", b"", 1),
                conn.request("echo", "text", 1),
                conn.request("echo", b"x", 0.0001),
                conn.broadcast("", b"x"),
                conn.publish("topic", b""),
                conn.subscribe("topic", 42),
                conn.unsubscribe("never-subscribed"),
                conn.tunnel("echo", 0),
            ):
                with pytest.raises(ValueError):
                    await call
        with pytest.raises(ValueError, match="iris.aio.ServiceHandler"):
            await iris.aio.register(relay.port, "echo", iris.ServiceHandler())
        with pytest.raises(ValueError, match="cluster"):
            await iris.aio.register(relay.port, "", Echo())

    run(main())


def test_cancelling_a_request_frees_its_slot_and_drops_the_late_reply(relay):
    async def main():
        gate = Gate()
        async with serving(relay.port, "gate", gate) as conn:
            waiting = asyncio.ensure_future(conn.request("gate", b"late", 5))
            await until(lambda: gate.started == 1)
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            assert not conn._session.pending  # the slot is free at once, not at the deadline
            gate.release.set()  # the late reply arrives and is dropped
            assert await conn.request("gate", b"next", 1) == b"next"
            assert not conn._session.pending

    run(main())


def test_close_wakes_every_waiter_with_closed_error(relay):
    async def main():
        gate = Gate()
        async with (
            iris.aio.register(relay.port, "gate", gate),
            iris.aio.register(relay.port, "echo", Echo()),
        ):
            conn = await iris.aio.connect(relay.port)
            tunnel = await conn.tunnel("echo", 1)
            waiters = [asyncio.ensure_future(conn.request("gate", b"%d" % i, 10)) for i in range(5)]
            waiters.append(asyncio.ensure_future(tunnel.recv()))
            await until(lambda: gate.started == 5)
            await conn.close()
            for outcome in await asyncio.gather(*waiters, return_exceptions=True):
                assert isinstance(outcome, iris.ClosedError), outcome
            with pytest.raises(iris.ClosedError):
                await conn.request("gate", b"after", 1)
            with pytest.raises(iris.ClosedError):
                await conn.publish("topic", b"after")
            gate.release.set()

    run(main())


# ---------------------------------------------------------------------------
# Broadcast and publish/subscribe.


def test_broadcast_reaches_every_member(relay):
    async def main():
        members = [Echo(), Echo()]
        async with (
            iris.aio.register(relay.port, "bcast", members[0]),
            iris.aio.register(relay.port, "bcast", members[1]),
            iris.aio.connect(relay.port) as conn,
        ):
            await conn.broadcast("bcast", b"hello all")
            for member in members:
                assert await asyncio.wait_for(member.broadcasts.get(), 5) == b"hello all"

    run(main())


def test_publish_subscribe_with_async_and_plain_callbacks(relay):
    async def main():
        async_seen: list[bytes] = []
        plain_seen: list[bytes] = []

        async def on_async(event: bytes) -> None:
            await asyncio.sleep(0)
            async_seen.append(event)

        async with iris.aio.connect(relay.port) as first, iris.aio.connect(relay.port) as second:
            await subscribed(first, "news", on_async, async_seen)
            await subscribed(second, "news", plain_seen.append, plain_seen)
            with pytest.raises(ValueError, match="already subscribed"):
                await first.subscribe("news", on_async)
            await first.publish("news", b"story")
            await until(lambda: events(async_seen) == events(plain_seen) == [b"story"])
            await second.unsubscribe("news")
            await first.publish("news", b"second story")
            await until(lambda: events(async_seen) == [b"story", b"second story"])
            await asyncio.sleep(0.1)
            assert events(plain_seen) == [b"story"]

    run(main())


# ---------------------------------------------------------------------------
# Limits.


def test_request_threads_caps_concurrent_handler_coroutines(relay):
    async def main():
        gate = Gate()
        async with serving(relay.port, "gate", gate, iris.ServiceLimits(request_threads=2)) as conn:
            calls = [asyncio.ensure_future(conn.request("gate", b"%d" % i, 5)) for i in range(8)]
            await until(lambda: gate.started == 2)
            await asyncio.sleep(0.1)
            assert gate.started == 2  # the other six wait for a slot
            gate.release.set()
            assert await asyncio.gather(*calls) == [b"%d" % i for i in range(8)]
            assert gate.peak == 2

    run(main())


def test_request_over_the_memory_cap_faults_at_once_naming_the_limit(relay):
    async def main():
        gate = Gate()
        async with serving(
            relay.port, "gate", gate, iris.ServiceLimits(request_threads=1, request_memory=1000)
        ) as conn:
            first = asyncio.ensure_future(conn.request("gate", b"runs", 5))
            await until(lambda: gate.started == 1)
            queued = asyncio.ensure_future(conn.request("gate", b"q" * 600, 5))
            await asyncio.sleep(0.05)
            start = time.monotonic()
            with pytest.raises(iris.RemoteError, match="request memory limit exceeded.*limit 1000"):
                await conn.request("gate", b"x" * 600, 5)
            assert time.monotonic() - start < 1.0  # at once, not at the timeout
            gate.release.set()
            assert await first == b"runs"
            assert await queued == b"q" * 600

    run(main())


def test_a_request_that_waited_past_its_timeout_is_not_run(relay):
    async def main():
        gate = Gate()
        async with serving(relay.port, "gate", gate, iris.ServiceLimits(request_threads=1)) as conn:
            first = asyncio.ensure_future(conn.request("gate", b"first", 5))
            await until(lambda: gate.started == 1)
            with pytest.raises(iris.TimeoutError):
                await conn.request("gate", b"expires in the queue", 0.1)
            # The member's deadline counts from when the relay delivered the
            # request, a moment after its caller's: a loaded machine stretches
            # that moment, so let it pass before a handler is free.
            await asyncio.sleep(0.1)
            gate.release.set()
            assert await first == b"first"
            await asyncio.sleep(0.1)
            assert gate.started == 1

    run(main())


def test_a_handler_holding_the_loop_is_logged(relay, caplog):
    class Blocking(iris.aio.ServiceHandler):
        async def handle_request(self, request: bytes) -> bytes:
            await asyncio.sleep(0)
            time.sleep(0.15)  # the bug being reported: a blocking call on the loop
            return request

    async def main():
        async with serving(relay.port, "blocking", Blocking()) as conn:
            assert await conn.request("blocking", b"x", 2) == b"x"

    with caplog.at_level(logging.WARNING, logger="iris"):
        run(main())
    held = [r for r in caplog.records if "held the event loop" in r.getMessage()]
    assert len(held) == 1 and "pool=request" in held[0].getMessage()


# ---------------------------------------------------------------------------
# Tunnels.


def test_tunnel_carries_16_mib_messages_both_ways(relay):
    async def main():
        async with (
            serving(relay.port, "stream", Echo()) as conn,
            await conn.tunnel("stream", 2) as tunnel,
        ):
            for fill in (b"a", b"b"):
                message = fill * (16 * MiB)
                await tunnel.send(message, timeout=20)
                assert await tunnel.recv(timeout=20) == message
            small = [b"%d" % i for i in range(100)]
            for message in small:
                await tunnel.send(message)
            assert [await tunnel.recv(5) for _ in small] == small

    run(main())


def test_threaded_and_asyncio_tunnel_ends_interoperate(relay, attach):
    class ThreadedEcho(iris.ServiceHandler):
        def handle_tunnel(self, tunnel: iris.Tunnel) -> None:
            with tunnel:
                tunnel.send(tunnel.recv())

    attach.register(relay.port, "threaded", ThreadedEcho())

    async def main():
        async with (
            iris.aio.connect(relay.port) as conn,
            await conn.tunnel("threaded", 2) as tunnel,
        ):
            await tunnel.send(b"z" * (3 * MiB), timeout=10)
            assert await tunnel.recv(10) == b"z" * (3 * MiB)

    run(main())


def test_tunnel_timeouts_and_close(relay):
    async def main():
        async with serving(relay.port, "stream", Echo()) as conn:
            with pytest.raises(iris.TimeoutError, match="timed out after 0.1 s"):
                await conn.tunnel("nobody", 0.1)
            tunnel = await conn.tunnel("stream", 2)
            start = time.monotonic()
            with pytest.raises(iris.TimeoutError, match="receive timed out"):
                await tunnel.recv(timeout=0.1)
            assert time.monotonic() - start < 0.1 + LATE
            await tunnel.close()
            with pytest.raises(iris.ClosedError):
                await tunnel.recv()
            with pytest.raises(iris.ClosedError):
                await tunnel.send(b"after close")
            with pytest.raises(ValueError):
                await tunnel.send(b"")

    run(main())


# ---------------------------------------------------------------------------
# Service life cycle and relay drop.


def test_init_runs_first_and_a_failing_init_unregisters(relay):
    class Init(iris.aio.ServiceHandler):
        def __init__(self, fail: bool):
            self.fail = fail
            self.conn = None

        async def init(self, conn: iris.aio.Connection) -> None:
            await asyncio.sleep(0.05)
            if self.fail:
                raise RuntimeError("init refused")
            self.conn = conn

        async def handle_request(self, request: bytes) -> bytes:
            return b"ready" if self.conn is not None else b"too early"

    async def main():
        with pytest.raises(RuntimeError, match="init refused"):
            await iris.aio.register(relay.port, "init", Init(fail=True))
        async with iris.aio.connect(relay.port) as conn:
            early = asyncio.ensure_future(conn.request("init", b"x", 2))
            async with iris.aio.register(relay.port, "init", Init(fail=False)):
                assert await conn.request("init", b"x", 1) == b"ready"
            with pytest.raises(iris.TimeoutError):
                await early  # sent before anyone registered

    run(main())


def test_relay_drop_fails_pending_calls_and_tells_the_service(relay_factory):
    relay = relay_factory()

    async def main():
        gate, echo = Gate(), Echo()
        gated = await iris.aio.register(relay.port, "gate", gate)
        service = await iris.aio.register(relay.port, "echo", echo)
        conn = await iris.aio.connect(relay.port)
        pending = asyncio.ensure_future(conn.request("gate", b"x", 10))
        tunnel = await conn.tunnel("echo", 1)
        receiving = asyncio.ensure_future(tunnel.recv())
        await until(lambda: gate.started == 1)
        relay.kill()
        for waiter in (pending, receiving):
            with pytest.raises(iris.ClosedError, match="connection"):
                await waiter
        await until(lambda: len(echo.drops) == 1)
        assert isinstance(echo.drops[0], iris.ClosedError)
        assert conn.closed and service.conn.closed
        with pytest.raises(iris.ClosedError):
            await conn.request("echo", b"after", 1)
        for closable in (conn, service.conn, gated.conn):
            await closable.close()  # a no-op once dropped

    run(main())


def test_graceful_unregister_is_not_a_drop(relay):
    async def main():
        echo = Echo()
        service = await iris.aio.register(relay.port, "echo", echo)
        await service.unregister()
        await asyncio.sleep(0.1)
        assert echo.drops == []

    run(main())
