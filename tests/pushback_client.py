"""Many concurrent large requests from one iris.aio connection, in a process
of its own so that its RSS is the client's alone (test_send_buffer.py).

    pushback_client.py PORT COUNT SIZE

Prints one JSON object: how many replies matched, and the RSS in MiB when
connected and at its peak while the requests ran (sampled every 5 ms).
"""

import asyncio
import json
import sys
import threading

import psutil

import iris.aio

MiB = 1024 * 1024


async def main(port: int, count: int, size: int) -> None:
    process = psutil.Process()
    payload = b"x" * size  # one object for every request: the client's copies are what counts
    async with iris.aio.connect(port) as conn:
        start = peak = process.memory_info().rss
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.wait(0.005):
                peak = max(peak, process.memory_info().rss)

        sampler = threading.Thread(target=sample)
        sampler.start()

        async def one() -> bool:
            return await conn.request("echo", payload, 120) == payload

        try:
            answered = sum(await asyncio.gather(*(one() for _ in range(count))))
        finally:
            done.set()
            sampler.join()
    print(json.dumps({"answered": answered, "start_mib": start / MiB, "peak_mib": peak / MiB}))


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])))
