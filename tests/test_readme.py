"""The README's quickstart runs as written, against a real relay process."""

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_quickstart_runs_as_written(relay, tmp_path):
    blocks = python_blocks()
    assert len(blocks) >= 6, "the quickstart lost its examples"
    script = "\n".join(blocks).replace("55555", str(relay.port))
    path = tmp_path / "quickstart.py"
    path.write_text(script)
    done = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "reply arrived: b'some request binary'" in done.stdout
    assert "request completed: b'request'" in done.stdout
    assert "broadcast: b'to every member of the cluster'" in done.stdout
    assert "event: b'to every subscriber of the topic'" in done.stdout
    assert "info entry, client context included client=1" in done.stderr
    assert 'warning entry client=1 extra="some value"' in done.stderr
    assert "debug entry" not in done.stderr
    assert "async replies: 100" in done.stdout
    assert "async request timed out" in done.stdout
    assert "async event: b'extra!'" in done.stdout
    assert "async tunnel echoed: 200000" in done.stdout
