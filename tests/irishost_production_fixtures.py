"""Fixtures of the irishost production tests; load with ``pytest_plugins``.

``notify``
    A NotifyListener (irishost_production_support.py) on a path in tmp_path,
    systemd's end of NOTIFY_SOCKET; ``notify.env`` goes into the host's
    environment. List it before ``service`` so that it outlives the host and
    hears its STOPPING=1.
"""

from __future__ import annotations

import pytest
from irishost_production_support import NotifyListener


@pytest.fixture
def notify(tmp_path):
    listener = NotifyListener(str(tmp_path / "notify.sock"))
    yield listener
    listener.close()
