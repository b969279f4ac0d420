"""A handler's close(): called once when its service ends gracefully, in both bindings.

Against a real relay process; iris.serve runs in a child process, as it
installs signal handlers (test_serve.py does the same).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import subprocess
import sys

import iris
import iris.aio

RUN_TIMEOUT = 30.0


class Closing(iris.ServiceHandler):
    """Counts its close() calls, noting whether a callback could still follow."""

    def __init__(self, fail: bool = False):
        self.fail = fail
        self.closes: list[bool] = []  # for each close(): was its connection still open?

    def init(self, conn: iris.Connection) -> None:
        self.conn = conn

    def handle_request(self, request: bytes) -> bytes:
        return request

    def close(self) -> None:
        self.closes.append(self.conn.closed)
        if self.fail:
            raise RuntimeError("close refused: the pool is gone")


def test_unregister_calls_close_once_after_the_connection_closed(relay, attach):
    handler = Closing()
    service = attach.register(relay.port, "closing", handler)
    assert attach.connect(relay.port).request("closing", b"hi", 5.0) == b"hi"
    assert handler.closes == []

    service.unregister()
    service.unregister()

    assert handler.closes == [True]  # once, and no callback can follow it


def test_leaving_the_with_block_calls_close(relay, attach):
    handler = Closing()
    with attach.register(relay.port, "closing", handler):
        pass
    assert handler.closes == [True]


def test_a_raising_close_is_logged_with_its_traceback_and_unregister_returns(relay, attach, caplog):
    handler = Closing(fail=True)
    service = attach.register(relay.port, "closing", handler)
    with caplog.at_level(logging.ERROR, logger="iris"):
        service.unregister()

    assert handler.closes == [True]
    (record,) = [r for r in caplog.records if "handler close() raised" in r.getMessage()]
    assert "cluster=closing" in record.getMessage()
    assert record.exc_info is not None and "close refused" in str(record.exc_info[1])


SERVE = """
import sys
import iris

class Handler(iris.ServiceHandler):
    def handle_request(self, request):
        return request

    def close(self):
        print("closed", flush=True)

iris.serve(int(sys.argv[1]), "served-closing", Handler())
print("returned", flush=True)
"""


def test_serve_calls_close_once_before_it_returns(relay, attach):
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVE, str(relay.port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        conn = attach.connect(relay.port)
        for _ in range(100):  # until it has registered
            try:
                conn.request("served-closing", b"x", 0.2)
                break
            except iris.TimeoutError:
                pass
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert (proc.returncode, out) == (0, "closed\nreturned\n"), err


# -- iris.aio ------------------------------------------------------------------------------


class AsyncClosing(iris.aio.ServiceHandler):
    def __init__(self, fail: bool = False):
        self.fail = fail
        self.closes: list[bool] = []

    async def init(self, conn: iris.aio.Connection) -> None:  # type: ignore[override]
        self.conn = conn

    async def handle_request(self, request: bytes) -> bytes:  # type: ignore[override]
        return request

    async def close(self) -> None:  # type: ignore[override]
        await asyncio.sleep(0)  # a real coroutine, awaited
        self.closes.append(self.conn.closed)
        if self.fail:
            raise RuntimeError("close refused: the pool is gone")


def run(coro):
    async def bounded():
        async with asyncio.timeout(RUN_TIMEOUT):
            return await coro

    return asyncio.run(bounded())


def test_aio_unregister_awaits_close_once(relay):
    handler = AsyncClosing()

    async def main() -> None:
        service = await iris.aio.register(relay.port, "aclosing", handler)
        async with iris.aio.connect(relay.port) as conn:
            assert await conn.request("aclosing", b"hi", timeout=5.0) == b"hi"
        assert handler.closes == []
        await service.unregister()
        await service.unregister()

    run(main())
    assert handler.closes == [True]


def test_aio_leaving_async_with_awaits_close(relay):
    handler = AsyncClosing()

    async def main() -> None:
        async with iris.aio.register(relay.port, "aclosing", handler):
            pass

    run(main())
    assert handler.closes == [True]


def test_aio_a_raising_close_is_logged_with_its_traceback(relay, caplog):
    handler = AsyncClosing(fail=True)

    async def main() -> None:
        service = await iris.aio.register(relay.port, "aclosing", handler)
        await service.unregister()

    with caplog.at_level(logging.ERROR, logger="iris"):
        run(main())
    assert handler.closes == [True]
    (record,) = [r for r in caplog.records if "handler close() raised" in r.getMessage()]
    assert record.exc_info is not None and "close refused" in str(record.exc_info[1])


def test_aio_a_plain_close_method_is_called_too(relay):
    closes: list[str] = []

    class Plain(iris.aio.ServiceHandler):
        def close(self) -> None:  # type: ignore[override]
            closes.append("plain")

    async def main() -> None:
        async with iris.aio.register(relay.port, "aclosing", Plain()):
            pass

    run(main())
    assert closes == ["plain"]
