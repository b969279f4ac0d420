"""Whose relay it is: ``[relay] embedded = "auto"``, stopping a relay others
use, and how soon the host serves again once a restarted relay listens.

Real processes throughout: ``python -m iris.relay`` for a relay the host does
not own (as under iris-relay.service), and irishost itself.
"""

from __future__ import annotations

import signal
import time

from production_support import steady_load, write_handler
from relay_process import RelayProcess
from support import free_port

import iris


class Echo(iris.ServiceHandler):
    def handle_request(self, request: bytes) -> bytes:
        return request


def test_auto_attaches_to_a_running_relay_and_leaves_it_running_on_stop(relay, attach, service):
    service.config(relay={"port": relay.port, "embedded": "auto"})
    host = service.start()
    assert service.request(b"ping") == b"pong"

    result = service.run("stop", timeout=20)

    assert result.returncode == 0, result.stderr
    assert host.wait_exit() == 0
    assert relay.proc.poll() is None, "the host took down a relay it did not start"
    attach.register(relay.port, "bystander", Echo())
    assert attach.connect(relay.port).request("bystander", b"still here", 5) == b"still here"
    log = host.log()
    assert "using the relay already listening" in log
    assert "started embedded relay" not in log


def test_auto_embeds_a_relay_when_none_listens(service):
    service.config(relay={"embedded": "auto"})
    host = service.start()

    assert service.request(b"ping") == b"pong"
    host.wait_log(f"started embedded relay service={service.cluster} port={service.port}")


def test_true_refuses_a_port_another_relay_holds(relay, service):
    """``true`` means this host's own relay; silently using another's would
    leave the service depending on a relay it does not control."""
    service.config(relay={"port": relay.port, "embedded": True})

    result = service.run(timeout=20)

    assert result.returncode == 5, result.stdout + result.stderr
    assert f"cannot start the embedded relay on port {relay.port}" in result.stderr
    assert 'embedded = "auto" uses it' in result.stderr


def test_stopping_an_embedded_relay_others_use_warns_how_many(service):
    service.config(relay={"embedded": True})
    host = service.start()  # its probe client stays attached
    bystander = service.connect()

    assert host.stop() == 0, host.log()

    warned = [line for line in host.log().splitlines() if "other clients attached" in line]
    assert len(warned) == 1, host.log()
    assert " WARNING " in warned[0] and " clients=2 " in warned[0], warned  # probe + bystander
    assert bystander.wait_closed(5)
    assert bystander.close_reason == "relay shutting down"


def test_stopping_an_embedded_relay_no_one_else_uses_does_not_warn(service):
    service.config(relay={"embedded": True})
    host = service.start()
    service.close_clients()

    assert host.stop() == 0, host.log()
    assert "other clients attached" not in host.log()


# --- reconnecting ----------------------------------------------------------------------------

# When the killed relay is started again: after the backoff has grown past a
# second, as it does while a node restarts. With the old 5 s cap the probes
# came about 0, 0.1, 0.3, 0.7, 1.5, 3.1 and then 6.3 s after the drop (give or
# take the 0.25 s tick), so a relay listening again at about 4.2 s waited 2 s
# and more; with the 1 s cap it waits a second at most.
RELAY_DOWN_SECONDS = 4.0
# How soon after the port opens the host must serve again: the 1 s backoff
# cap, and a moment for fresh workers to boot and register.
SERVES_AGAIN_WITHIN = 1.5


def test_the_host_serves_within_a_second_or_so_of_a_restarted_relay_listening(tmp_path, service):
    port = free_port()
    relay = RelayProcess(["--port", str(port)], tmp_path / "relay-0.log")
    service.config(
        service={"handler": write_handler(service.dir)},
        relay={"port": port, "embedded": False},
        workers={"count": 2},
    )
    service.start()
    try:
        with steady_load(port, service.cluster, threads=6, timeout=0.25, reconnect=True) as load:
            load.wait_for_replies(20)
            relay.proc.send_signal(signal.SIGKILL)
            relay.kill()
            time.sleep(RELAY_DOWN_SECONDS)
            relay = RelayProcess(["--port", str(port)], tmp_path / "relay-1.log")
            listening = time.monotonic()  # its "listening" line has been read
            load.wait_for_replies(5, since=listening, timeout=10)
        first = min(o.at for o in load.outcomes() if o.reply and o.at >= listening)
        assert first - listening < SERVES_AGAIN_WITHIN, first - listening
    finally:
        relay.stop()
