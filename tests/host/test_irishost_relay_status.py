"""The relay embedded in irishost serves the same status socket as iris-relay."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request

from support import free_port

from iris.relay.status import status_path


def test_embedded_relay_serves_its_status(service):
    service.config(topics=[{"name": "news"}])
    service.start()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "iris.tool",
            "--port",
            str(service.port),
            "relay",
            "status",
            "--json",
        ],
        capture_output=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    assert status["clusters"] == {service.cluster: 1}  # the host is one member for its workers
    assert status["topics"] == {"news": 1}
    assert status_path(service.port).exists()


def test_embedded_relay_serves_metrics_and_its_status_in_the_runtime_directory(service):
    """``[relay] metrics_port``; under systemd, the status socket beside the control socket."""
    runtime = service.dir / "run"
    runtime.mkdir(mode=0o700)
    port = free_port()
    service.config(relay={"metrics_port": port})
    host = service.start(env={"RUNTIME_DIRECTORY": str(runtime)})
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    assert f'iris_relay_members{{cluster="{service.cluster}"}} 1\n' in text
    host.wait_log(f"INFO iris.relay: metrics on {url}")
    assert (runtime / f"{service.port}.sock").exists()
