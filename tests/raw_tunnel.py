"""Tunnels between two raw peers (conftest.RawPeer) of a relay, for wire-level tests.

The sizes are spelled out, not imported from iris.relay, so that the tests
check the relay against the Go relay's values instead of against itself.
"""

from __future__ import annotations

from iris.codec import TunnelAllow, TunnelConfirm, TunnelInit, TunnelResult
from iris.limits import TUNNEL_BUFFER

MiB = 1 << 20
# The largest chunk the relay lets through a tunnel.
CHUNK = 65536
# The relay's buffer for each tunnel direction, granted to each sender.
RELAY_BUFFER = 4 * MiB


def open_raw_tunnel(initiator, member, grant: int | None = TUNNEL_BUFFER) -> None:
    """Open tunnel 0 from ``initiator`` to ``member`` (its id 5) on cluster "t".

    Both ends grant the relay ``grant`` bytes, as a binding does; ``None``
    grants nothing, leaving the allowances to the test.
    """
    initiator.send(TunnelInit(0, "t", 1000))
    offer = member.recv()
    member.send(TunnelConfirm(offer.build_id, 5))
    if grant is not None:
        member.send(TunnelAllow(5, grant))
    assert member.recv() == TunnelAllow(5, RELAY_BUFFER)
    assert initiator.recv() == TunnelResult(0, False, CHUNK)
    assert initiator.recv() == TunnelAllow(0, RELAY_BUFFER)
    if grant is not None:
        initiator.send(TunnelAllow(0, grant))
