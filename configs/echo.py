"""The smallest useful irishost service: answers every request with its own bytes.

Handy as a first deployment check and as a baseline for benchmarks, since the
handler itself costs next to nothing.
"""

import iris


class EchoHandler(iris.ServiceHandler):
    def handle_request(self, request: bytes) -> bytes:
        return request
