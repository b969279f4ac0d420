"""An irishost service written against iris.aio: every handler is a coroutine.

irishost runs it on an event loop in each worker; ``request_threads`` then
caps how many handle_request coroutines run at once per worker. Awaiting is
free, blocking is not: a handler that blocks the loop stalls every other
request of its worker (and is logged when it holds the loop over 0.1 s).
"""

import asyncio

import iris.aio


class AsyncEchoHandler(iris.aio.ServiceHandler):
    async def init(self, conn: iris.aio.Connection) -> None:
        self.conn = conn  # the worker's own iris.aio connection, for outbound calls

    async def handle_request(self, request: bytes) -> bytes:
        if request.startswith(b"sleep:"):  # a stand-in for awaiting a database
            await asyncio.sleep(float(request[6:]))
        return request

    async def handle_tunnel(self, tunnel) -> None:
        async with tunnel:
            while True:
                try:
                    await tunnel.send(await tunnel.recv())
                except iris.aio.ClosedError:
                    return
