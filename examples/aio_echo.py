"""An asyncio echo service and a client of it, in one program (needs a relay)."""

import asyncio

import iris
import iris.aio


class AsyncEcho(iris.aio.ServiceHandler):
    async def handle_request(self, request: bytes) -> bytes:
        await asyncio.sleep(0.01)  # awaiting a database, say
        return request

    async def handle_tunnel(self, tunnel: iris.aio.Tunnel) -> None:
        async with tunnel:
            while True:
                try:
                    await tunnel.send(await tunnel.recv())
                except iris.ClosedError:
                    return


async def main() -> None:
    limits = iris.ServiceLimits(request_threads=100)  # at most 100 handlers at once
    async with (
        iris.aio.register(55555, "async-echo", AsyncEcho(), limits),
        iris.aio.connect(55555) as conn,
    ):
        replies = await asyncio.gather(
            *(conn.request("async-echo", b"%d" % i, timeout=1.0) for i in range(100))
        )
        print("async replies:", len(replies))
        try:
            await conn.request("nobody", b"hello", timeout=0.1)
        except iris.TimeoutError:
            print("async request timed out")

        events = asyncio.Queue()
        await conn.subscribe("async-news", events.put)  # a coroutine or a plain callable
        await conn.publish("async-news", b"extra!")
        print("async event:", await events.get())

        async with await conn.tunnel("async-echo", timeout=1.0) as tunnel:
            await tunnel.send(b"x" * 200_000)
            print("async tunnel echoed:", len(await tunnel.recv(timeout=5.0)))


asyncio.run(main())
