"""The relay embedded in irishost serves the same status socket as iris-relay."""

from __future__ import annotations

import json
import subprocess
import sys

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
