"""A client run as another user by other_user.py; prints one JSON line per outcome.

    other_user_client.py PORT serve CLUSTER       register, answer b"impostor"
    other_user_client.py PORT subscribe TOPIC     print each event
    other_user_client.py PORT request CLUSTER     one request, print the reply

It prints "ready" (or why it could not start), then its outcomes, until
stdin closes or the relay closes the connection, which it prints with the
reason.
"""

import json
import sys
import threading

import iris


def say(*value: object) -> None:
    print(json.dumps(list(value)), flush=True)


class Impostor(iris.ServiceHandler):
    def handle_request(self, request: bytes) -> bytes:
        return b"impostor"


def main() -> None:
    port, action, name = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    try:
        if action == "serve":
            service = iris.register(port, name, Impostor())
            conn = service.conn
        else:
            conn = iris.connect(port)
    except iris.DeniedError as err:
        say("denied", err.reason)
        return
    if action == "subscribe":
        conn.subscribe(name, lambda event: say("event", event.decode()))
    say("ready")
    if action == "request":
        try:
            say("reply", conn.request(name, b"hello", 5).decode())
        except iris.Error as err:
            say("error", type(err).__name__, str(err))
    threading.Thread(target=lambda: (sys.stdin.read(), conn.close()), daemon=True).start()
    conn.wait_closed()
    say("closed", conn.close_reason)


main()
