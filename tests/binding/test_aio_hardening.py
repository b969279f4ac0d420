"""iris.aio under handler failures and oversized messages, against a real relay.

The asyncio twin of test_binding_hardening.py, with the same failing
handler code (_fail, _raise_for) run as coroutines and as plain methods on
the loop. What it guards against:

- a reply or fault text over the relay's 64 MiB message limit dropped the
  service's whole connection;
- a handler's exceptions were logged as a bare ``repr`` (or, for requests,
  not at all), without traceback, cluster or rate limit;
- a BaseException (SystemExit, KeyboardInterrupt, one of the user's own) in
  any callback must neither end a pool's worker Tasks nor escape to the
  event loop, which asyncio would let it stop.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter

import pytest
from failing_handler import (
    FAULT_TEXTS,
    LIMIT_TEXT,
    OVERSIZE,
    CustomStop,
    UnprintableError,
    _fail,
    _raise_for,
    handler_errors,
)
from test_aio import run, serving, until

import iris
import iris.aio
from iris import codec

# What _raise_for raises, in the order the tests send its messages.
RAISING = (b"system-exit", b"keyboard-interrupt", b"custom")
RAISED = [SystemExit, KeyboardInterrupt, CustomStop]


class AsyncFailing(iris.aio.ServiceHandler):
    """_fail and _raise_for as coroutines that suspend first, as real handlers do."""

    def __init__(self):
        self.broadcasts: asyncio.Queue[bytes] = asyncio.Queue()
        self.tunnels = 0
        self.drops: list[Exception] = []

    async def handle_request(self, request: bytes) -> bytes:
        if request.startswith(b"sleep:"):
            await asyncio.sleep(float(request.removeprefix(b"sleep:")))
            return request
        if request == b"not-bytes":
            return "a str"
        await asyncio.sleep(0)
        return _fail(request)

    async def handle_broadcast(self, message: bytes) -> None:
        await asyncio.sleep(0)
        _raise_for(message)
        await self.broadcasts.put(message)

    async def handle_tunnel(self, tunnel: iris.aio.Tunnel) -> None:
        self.tunnels += 1
        _raise_for(await tunnel.recv(5))
        await tunnel.send(b"survived")
        await tunnel.close()

    async def handle_drop(self, reason: Exception) -> None:
        self.drops.append(reason)
        raise SystemExit("handle_drop exits")


class PlainFailing(iris.aio.ServiceHandler):
    """The same as plain methods, which run on the loop too."""

    def __init__(self):
        self.broadcasts: list[bytes] = []

    def handle_request(self, request: bytes) -> bytes:
        return _fail(request)

    def handle_broadcast(self, message: bytes) -> None:
        _raise_for(message)
        self.broadcasts.append(message)


ONE_AT_A_TIME = iris.ServiceLimits(request_threads=1, broadcast_threads=1)


async def remote_fault(conn: iris.aio.Connection, cluster: str, request: bytes) -> str:
    with pytest.raises(iris.RemoteError) as caught:
        await conn.request(cluster, request, 5)
    return caught.value.fault


# -- sizes are checked before anything is sent ------------------------------------------------


@pytest.mark.parametrize(
    ("request_", "expected"),
    [
        (b"big-reply", f"reply of {LIMIT_TEXT}"),
        (b"big-fault", f"fault text of {OVERSIZE + len('ValueError: ')} bytes exceeds"),
    ],
    ids=["reply", "fault"],
)
def test_an_oversized_answer_is_a_fault_and_the_connection_stays(relay, caplog, request_, expected):
    caplog.set_level(logging.CRITICAL, "iris")  # not 64 MiB of "x" in the test's log

    async def main():
        async with (
            iris.aio.register(relay.port, "failing", AsyncFailing()) as service,
            iris.aio.connect(relay.port) as conn,
        ):
            in_flight = asyncio.ensure_future(conn.request("failing", b"sleep:0.5", 5))
            fault = await remote_fault(conn, "failing", request_)

            assert fault.startswith(expected)
            assert fault.endswith(f"exceeds the relay's message limit of {codec.MAX_MESSAGE} bytes")
            assert await in_flight == b"sleep:0.5"  # answered on the same connection
            assert await conn.request("failing", b"echo:after", 5) == b"echo:after"
            assert not service.conn.closed

    run(main())


def test_oversized_outbound_messages_are_a_local_value_error(relay):
    async def main():
        big = bytes(OVERSIZE)
        handler = AsyncFailing()
        async with serving(relay.port, "failing", handler) as conn:
            tunnel = await conn.tunnel("failing", 5)
            with pytest.raises(ValueError, match=f"tunnel message of {LIMIT_TEXT}"):
                await tunnel.send(big, timeout=5)
            for kind, call in [
                ("request", conn.request("failing", big, 5)),
                ("message", conn.broadcast("failing", big)),
                ("event", conn.publish("news", big)),
            ]:
                with pytest.raises(ValueError, match=f"{kind} of {LIMIT_TEXT}"):
                    await call

            # Nothing was sent: the connection and the tunnel go on working.
            await tunnel.send(b"after")
            assert await tunnel.recv(5) == b"survived"
            assert await conn.request("failing", b"echo:after", 5) == b"echo:after"
            await conn.broadcast("failing", b"after")
            assert await asyncio.wait_for(handler.broadcasts.get(), 5) == b"after"

    run(main())


# -- BaseExceptions stay in the callback that raised them ----------------------------------


@pytest.mark.parametrize("handler_class", [AsyncFailing, PlainFailing])
def test_base_exceptions_in_request_handlers_are_faults_and_the_service_stays(
    relay, caplog, handler_class
):
    async def main():
        async with serving(relay.port, "failing", handler_class(), ONE_AT_A_TIME) as conn:
            for request, expected in FAULT_TEXTS:
                assert await remote_fault(conn, "failing", request) == expected
            # request_threads=1: a lost worker Task would leave nothing to answer this.
            assert await conn.request("failing", b"echo:after", 5) == b"echo:after"

    run(main())
    raised = [type(r.exc_info[1]) for r in handler_errors(caplog)]
    assert raised == [KeyError, SystemExit, KeyboardInterrupt, UnprintableError, ValueError]


def test_base_exceptions_in_broadcast_handlers_do_not_stop_the_pool(relay, caplog):
    async def main():
        coroutines, plain = AsyncFailing(), PlainFailing()
        async with (
            iris.aio.register(relay.port, "failing", coroutines, ONE_AT_A_TIME),
            iris.aio.register(relay.port, "failing", plain, ONE_AT_A_TIME),
            iris.aio.connect(relay.port) as conn,
        ):
            for message in (*RAISING, b"after"):
                await conn.broadcast("failing", message)

            assert await asyncio.wait_for(coroutines.broadcasts.get(), 5) == b"after"
            await until(lambda: plain.broadcasts == [b"after"])

    run(main())
    records = handler_errors(caplog)
    assert Counter(type(r.exc_info[1]) for r in records) == Counter(RAISED * 2)
    assert all("handler raised" in r.getMessage() for r in records)
    assert all("cluster=failing pool=broadcast" in r.getMessage() for r in records)


def test_base_exceptions_in_subscription_callbacks_do_not_stop_the_pool(relay, caplog):
    async def main():
        seen: list[bytes] = []

        def plain(event: bytes) -> None:
            _raise_for(event)
            seen.append(event)

        async def coroutine(event: bytes) -> None:
            await asyncio.sleep(0)
            plain(event)

        class Handler(iris.TopicHandler):
            async def handle_event(self, event: bytes) -> None:
                await coroutine(event)

        async with iris.aio.connect(relay.port) as conn:
            one = iris.TopicLimits(event_threads=1)
            for topic, callback in (("plain", plain), ("async", coroutine), ("handler", Handler())):
                await conn.subscribe(topic, callback, one)
            # Published on the subscribing connection: each arrives after its SUBSCRIBE.
            for topic in ("plain", "async", "handler"):
                for event in (*RAISING, topic.encode()):
                    await conn.publish(topic, event)

            await until(lambda: sorted(seen) == [b"async", b"handler", b"plain"])

    run(main())
    records = handler_errors(caplog)
    assert Counter(type(r.exc_info[1]) for r in records) == Counter(RAISED * 3)
    assert all("pool=topic-" in r.getMessage() for r in records)


def test_base_exceptions_in_tunnel_handlers_close_only_that_tunnel(relay, caplog):
    async def main():
        handler = AsyncFailing()
        async with serving(relay.port, "failing", handler) as conn:
            for message in RAISING:
                tunnel = await conn.tunnel("failing", 5)
                await tunnel.send(message)
                with pytest.raises(iris.ClosedError):
                    await tunnel.recv(5)  # the handler's tunnel was closed for it
            async with await conn.tunnel("failing", 5) as tunnel:
                await tunnel.send(b"fine")
                assert await tunnel.recv(5) == b"survived"
            assert handler.tunnels == 4

    run(main())
    records = handler_errors(caplog)
    assert [type(r.exc_info[1]) for r in records] == RAISED
    assert all("tunnel handler raised" in r.getMessage() for r in records)


def test_a_relay_drop_wakes_every_waiter_and_a_raising_drop_handler_is_logged(
    relay_factory, caplog
):
    relay = relay_factory()

    async def main():
        handler = AsyncFailing()
        service = await iris.aio.register(relay.port, "failing", handler)
        conn = await iris.aio.connect(relay.port)
        tunnel = await conn.tunnel("failing", 5)
        waiters = [
            conn.request("failing", b"sleep:10", 10),  # in the member's handler
            conn.request("nobody", b"x", 10),  # held by the relay for a member
            conn.tunnel("nobody", 10),
            tunnel.recv(),
        ]
        waiting = [asyncio.ensure_future(waiter) for waiter in waiters]
        await asyncio.sleep(0.2)  # every one of them is waiting now
        relay.kill()

        outcomes = await asyncio.wait_for(asyncio.gather(*waiting, return_exceptions=True), 5)
        assert [type(outcome) for outcome in outcomes] == [iris.ClosedError] * 4, outcomes
        await until(lambda: handler.drops)  # and its SystemExit raised, in the same step
        assert isinstance(handler.drops[0], iris.ClosedError)
        assert service.conn.closed and conn.closed

    run(main())  # returns: the drop handler's SystemExit did not escape to the loop
    [record] = handler_errors(caplog)
    assert "drop handler raised" in record.getMessage()
    assert "cluster=failing" in record.getMessage()
    assert isinstance(record.exc_info[1], SystemExit)


# -- every failure is logged with its traceback, at a bounded rate ----------------------------


def test_handler_exceptions_are_logged_with_traceback_and_cluster(relay, caplog):
    async def main():
        async with serving(relay.port, "failing", AsyncFailing()) as conn:
            assert await remote_fault(conn, "failing", b"key") == "KeyError: 'user'"
            fault = await remote_fault(conn, "failing", b"not-bytes")
            assert fault == "TypeError: handle_request returned str, not bytes"

    run(main())
    key, not_bytes = handler_errors(caplog)
    for record in (key, not_bytes):
        assert "request handler raised" in record.getMessage()
        assert "cluster=failing" in record.getMessage()
    assert isinstance(key.exc_info[1], KeyError)
    assert isinstance(not_bytes.exc_info[1], TypeError)
    assert "in _fail" in logging.Formatter().format(key)  # the traceback reaches the handler


def test_handler_exception_logging_is_rate_limited(relay, caplog):
    async def main():
        async with serving(relay.port, "failing", AsyncFailing()) as conn:
            faults = await asyncio.gather(
                *(remote_fault(conn, "failing", b"key") for _ in range(25))
            )
            assert faults == ["KeyError: 'user'"] * 25

    run(main())
    assert len(handler_errors(caplog)) == 10  # HandlerErrorLog's default burst
