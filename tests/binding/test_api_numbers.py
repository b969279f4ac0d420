"""Numbers the binding cannot carry are a ValueError before anything is sent (issue 17).

A port out of range raised OverflowError; a timeout of NaN, infinity or one
too long for the binding raised OverflowError or a message that named no
argument, and one past the wire's 64-bit varint (about 1e19 s) was sent and
made the relay drop the whole connection. Each case here checks the error,
then that the same connection still answers, in both bindings, against a real
relay.
"""

from __future__ import annotations

import asyncio

import pytest

import iris
import iris.aio

# Past what the threaded binding can wait (OverflowError), past the wire's
# 64-bit varint (the relay drops the connection), and the non-numbers.
BAD_TIMEOUTS = [float("nan"), float("inf"), -float("inf"), 1e12, 1e19, 0.0, -1.0]
BAD_PORTS = [70000, 65536, 0, -1]


class Echo(iris.ServiceHandler):
    def handle_request(self, request: bytes) -> bytes:
        return request

    def handle_tunnel(self, tunnel: iris.TunnelEnd) -> None:
        with tunnel:
            tunnel.send(tunnel.recv())


@pytest.fixture
def echo(relay):
    with iris.register(relay.port, "echo", Echo()):
        yield relay.port


@pytest.mark.parametrize("timeout", BAD_TIMEOUTS)
def test_a_bad_timeout_is_a_value_error_and_the_connection_goes_on(echo, timeout):
    with iris.connect(echo) as conn:
        with pytest.raises(ValueError, match="timeout must be a number of seconds"):
            conn.request("echo", b"hi", timeout)
        with pytest.raises(ValueError, match="timeout must be a number of seconds"):
            conn.tunnel("echo", timeout)

        assert conn.request("echo", b"still here", 5) == b"still here"
        assert not conn.closed


@pytest.mark.parametrize("timeout", [float("nan"), float("inf"), 1e12, -1.0])
def test_a_bad_tunnel_wait_is_a_value_error(echo, timeout):
    with iris.connect(echo) as conn, conn.tunnel("echo", 5) as tunnel:
        with pytest.raises(ValueError, match="tunnel receive timeout"):
            tunnel.recv(timeout)
        with pytest.raises(ValueError, match="tunnel send timeout"):
            tunnel.send(b"x", timeout)
        tunnel.send(b"round trip")
        assert tunnel.recv(5) == b"round trip"


@pytest.mark.parametrize("port", BAD_PORTS)
def test_a_port_out_of_range_is_a_value_error(port):
    with pytest.raises(ValueError, match="port must be an int from 1 to 65535"):
        iris.connect(port)
    with pytest.raises(ValueError, match="port must be an int from 1 to 65535"):
        iris.register(port, "echo", Echo())


@pytest.mark.parametrize("timeout", BAD_TIMEOUTS)
def test_asyncio_a_bad_timeout_is_a_value_error_and_the_connection_goes_on(echo, timeout):
    async def main() -> None:
        async with iris.aio.connect(echo) as conn:
            with pytest.raises(ValueError, match="timeout must be a number of seconds"):
                await conn.request("echo", b"hi", timeout)
            with pytest.raises(ValueError, match="timeout must be a number of seconds"):
                await conn.tunnel("echo", timeout)
            tunnel = await conn.tunnel("echo", 5)
            with pytest.raises(ValueError, match="tunnel receive timeout"):
                await tunnel.recv(timeout if timeout else float("nan"))
            await tunnel.send(b"round trip")
            assert await tunnel.recv(5) == b"round trip"
            await tunnel.close()

            assert await conn.request("echo", b"still here", 5) == b"still here"
            assert not conn.closed

    asyncio.run(main())


@pytest.mark.parametrize("port", BAD_PORTS)
def test_asyncio_a_port_out_of_range_is_a_value_error(port):
    class AsyncEcho(iris.aio.ServiceHandler):
        async def handle_request(self, request: bytes) -> bytes:
            return request

    async def main() -> None:
        with pytest.raises(ValueError, match="port must be an int from 1 to 65535"):
            await iris.aio.connect(port)
        with pytest.raises(ValueError, match="port must be an int from 1 to 65535"):
            await iris.aio.register(port, "echo", AsyncEcho())

    asyncio.run(main())


BAD_SEND_BUFFERS = [0, -1, 1.5, True, "32", (1 << 40) + 1]


@pytest.mark.parametrize("send_buffer", BAD_SEND_BUFFERS)
def test_a_bad_send_buffer_is_a_value_error(relay, send_buffer):
    """Refused before anything is dialled, in every call that makes a connection."""
    with pytest.raises(ValueError, match="send_buffer must be an int of bytes"):
        iris.connect(relay.port, send_buffer=send_buffer)
    with pytest.raises(ValueError, match="send_buffer must be an int of bytes"):
        iris.register(relay.port, "echo", Echo(), send_buffer=send_buffer)

    class AsyncEcho(iris.aio.ServiceHandler):
        async def handle_request(self, request: bytes) -> bytes:
            return request

    async def main() -> None:
        with pytest.raises(ValueError, match="send_buffer must be an int of bytes"):
            await iris.aio.connect(relay.port, send_buffer=send_buffer)
        with pytest.raises(ValueError, match="send_buffer must be an int of bytes"):
            await iris.aio.register(relay.port, "echo", AsyncEcho(), send_buffer=send_buffer)

    asyncio.run(main())
