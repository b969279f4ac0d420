"""A tour of the client side, against examples/echo_service.py.

With a relay (iris-relay) and the echo service running:

    python3 examples/client.py
"""

import logging
import time

from echo_service import EchoHandler

import iris

conn = iris.connect(55555)
reply = conn.request("echo", b"some request binary", timeout=1.0)
print("reply arrived:", reply)

try:
    reply = conn.request("echo", b"request", timeout=1.0)
except iris.TimeoutError:
    print("request timed out")
except iris.ClosedError:
    print("connection terminated")
except iris.RemoteError as err:
    print("request failed remotely:", err.fault)
else:
    print("request completed:", reply)

conn.broadcast("echo", b"to every member of the cluster")

conn.subscribe("news", lambda event: print(f"event: {event}"))
conn.publish("news", b"to every subscriber of the topic")

time.sleep(0.2)  # both are delivered asynchronously, on handler threads


class StreamHandler(iris.ServiceHandler):
    def handle_tunnel(self, tunnel: iris.Tunnel) -> None:
        with tunnel:
            while True:
                try:
                    tunnel.send(tunnel.recv())
                except iris.ClosedError:
                    return


streams = iris.register(55555, "stream", StreamHandler())
with conn.tunnel("stream", timeout=1.0) as tunnel:
    tunnel.send(b"x" * 200_000)  # chunked, flow controlled, reassembled
    assert len(tunnel.recv(timeout=5.0)) == 200_000
streams.unregister()

limits = iris.ServiceLimits(request_threads=4, request_memory=16 * 1024 * 1024)
capped = iris.register(55555, "capped", EchoHandler(), limits)
conn.subscribe("ticks", lambda event: None, iris.TopicLimits(event_threads=1))

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
conn.log.debug("debug entry, hidden by default")
conn.log.info("info entry, client context included")
conn.log.warning("warning entry", extra="some value")

capped.unregister()
conn.close()
