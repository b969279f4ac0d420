"""The embedded single-node Iris relay (``iris-relay``).

Speaks the relay side of docs/protocol.md so that the Python binding, irishost
and any official Iris binding can run on one machine with nothing else
installed. It does not federate: multi-machine networks use the Iris node.
"""

from .server import DEFAULT_PORT, RelayServer

__all__ = ["DEFAULT_PORT", "RelayServer"]
