"""An echo service: answers every request with the request itself.

With a relay running (iris-relay), start it and ask it something:

    python3 examples/echo_service.py
    iris request echo hello
"""

import iris


class EchoHandler(iris.ServiceHandler):
    def init(self, conn: iris.Connection) -> None:
        self.conn = conn  # for outbound requests of our own

    def handle_request(self, request: bytes) -> bytes:
        return request  # an exception here becomes the caller's RemoteError

    def handle_broadcast(self, message: bytes) -> None:
        print(f"broadcast: {message}", flush=True)


if __name__ == "__main__":
    # Registers, serves until Ctrl-C or SIGTERM, then unregisters.
    iris.serve(55555, "echo", EchoHandler())
