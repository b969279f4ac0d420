"""An iris.aio handler that tests run in irishost workers (copied as aprobe.py).

A request's text names what to do: ``b"peak:S"`` sleeps S seconds on the
loop's timers and answers ``[pid, the most handlers that ran at once]``;
``b"seen"`` answers the broadcasts and events received so far; ``b"fail"``
raises; ``b"conn"`` names init's connection type; anything else is echoed.
``close()`` appends the worker's pid to ``closed.txt`` beside the module.
"""

from __future__ import annotations

import asyncio
import json
import os

import iris.aio


class AsyncProbe(iris.aio.ServiceHandler):
    def __init__(self):
        self.running = 0
        self.peak = 0
        self.seen: list[str] = []

    async def init(self, conn) -> None:
        await asyncio.sleep(0)
        self.conn = conn

    async def handle_request(self, request: bytes) -> bytes:
        if request.startswith(b"peak:"):
            self.running += 1
            self.peak = max(self.peak, self.running)
            try:
                await asyncio.sleep(float(request[5:]))
            finally:
                self.running -= 1
            return json.dumps([os.getpid(), self.peak]).encode()
        if request == b"seen":
            return json.dumps(self.seen).encode()
        if request == b"fail":
            raise RuntimeError("async handler refused")
        if request == b"conn":
            return type(self.conn).__module__.encode()
        return request

    async def close(self) -> None:
        await asyncio.sleep(0)  # a coroutine, awaited on the worker's loop
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "closed.txt")
        with open(path, "a") as closed:
            closed.write(f"{os.getpid()}\n")

    async def handle_broadcast(self, message: bytes) -> None:
        await asyncio.sleep(0)
        self.seen.append("broadcast:" + message.decode())

    async def handle_event(self, topic: str, event: bytes) -> None:
        self.seen.append(f"event:{topic}:{event.decode()}")

    async def handle_tunnel(self, tunnel) -> None:
        async with tunnel:
            while True:
                try:
                    await tunnel.send(await tunnel.recv())
                except iris.aio.ClosedError:
                    return
