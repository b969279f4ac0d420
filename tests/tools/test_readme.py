"""The README's quickstart is examples/, and examples/ runs against a real relay process.

examples/echo_service.py is the README's first example in full, the README's
later snippets, in order, are the body of examples/client.py, and its last
snippet is examples/aio_echo.py. All run here: the echo service as a process
of its own, the client against it, and the asyncio example alone. They run
from copies whose port 55555 is the test relay's.
"""

import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from support import wait_for

import iris

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
EXAMPLES = ROOT / "examples"
SERVICE = "echo_service.py"
CLIENT = "client.py"
ASYNC = "aio_echo.py"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_first_example_is_the_whole_echo_service():
    assert python_blocks()[0] == (EXAMPLES / SERVICE).read_text()


def test_later_snippets_are_the_client_example():
    client = (EXAMPLES / CLIENT).read_text()
    _, imports_end, body = client.partition("import iris\n\n")
    assert imports_end, f"{CLIENT} no longer imports iris last"
    assert "\n".join(python_blocks()[1:-1]) == body


def test_last_example_is_the_asyncio_one():
    assert python_blocks()[-1] == (EXAMPLES / ASYNC).read_text()


@pytest.fixture
def examples(tmp_path, relay) -> Path:
    """Copies of examples/ that use the test relay's port."""
    for example in EXAMPLES.glob("*.py"):
        (tmp_path / example.name).write_text(example.read_text().replace("55555", str(relay.port)))
    yield tmp_path
    shutil.rmtree(tmp_path / "__pycache__", ignore_errors=True)


def served(conn: iris.Connection, cluster: str) -> bool:
    """Whether something answers a request to ``cluster`` within 0.2 s."""
    try:
        conn.request(cluster, b"ping", 0.2)
    except iris.TimeoutError:
        return False
    return True


def test_examples_run_as_written(examples, relay, attach):
    service = subprocess.Popen(
        [sys.executable, str(examples / SERVICE)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        probe = attach.connect(relay.port)
        wait_for(lambda: served(probe, "echo"), 15, what="the echo service to serve")
        client = subprocess.run(
            [sys.executable, str(examples / CLIENT)], capture_output=True, text=True, timeout=60
        )
        service.send_signal(signal.SIGTERM)
        service_out, service_err = service.communicate(timeout=10)
    finally:
        if service.poll() is None:
            service.kill()
            service.communicate()

    assert client.returncode == 0, client.stderr
    assert "reply arrived: b'some request binary'" in client.stdout
    assert "request completed: b'request'" in client.stdout
    assert "event: b'to every subscriber of the topic'" in client.stdout
    assert "info entry, client context included client=1" in client.stderr
    assert 'warning entry client=1 extra="some value"' in client.stderr
    assert "debug entry" not in client.stderr

    assert service.returncode == 0, service_err
    assert "broadcast: b'to every member of the cluster'" in service_out
    with pytest.raises(iris.TimeoutError):  # iris.serve unregistered it on SIGTERM
        probe.request("echo", b"ping", 0.3)


def test_asyncio_example_runs_as_written(examples):
    done = subprocess.run(
        [sys.executable, str(examples / ASYNC)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "async replies: 100" in done.stdout
    assert "async request timed out" in done.stdout
    assert "async event: b'extra!'" in done.stdout
    assert "async tunnel echoed: 200000" in done.stdout


def test_ci_runs_exactly_the_readme_test_command_in_an_environment_of_its_own():
    """.ci/run is the README's test command, which installs apart from the service's
    `.venv`: running the tests never reinstalls what a running example uses."""
    commands = re.findall(r"```sh\n(python3 -m venv .*?)\n```", README.read_text())
    service, tests = commands[0], commands[1]
    assert (ROOT / ".ci" / "run").read_text().rstrip("\n").splitlines()[-1] == tests
    assert ".venv/" in service and ".venv/" not in tests and ".venv-test/" in tests
    assert ".venv-test/" in (ROOT / ".gitignore").read_text().splitlines()
