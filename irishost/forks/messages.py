"""What crosses between the supervisor and a fork server, pure: the launch
(argv and a memfd holding the config), the messages on their socket (msgpack
arrays whose first element names them) and the descriptors they carry.

The supervisor's side (:mod:`irishost.supervisor.spawner`) and the fork
server (:mod:`irishost.forks.server`) both build on this module, so neither
needs the other's code.
"""

from __future__ import annotations

import array
import os
import socket
import sys
from dataclasses import dataclass
from typing import Any

import msgpack

from ..config import Config

# Requests and replies are msgpack arrays of a few fields (the config does
# not cross the socket: it comes in a memfd): one datagram each, at most this big.
MAX_MESSAGE = 1 << 16
# Descriptors per spawned worker: (segment, data eventfd, space eventfd) per ring.
RING_FDS = 6
# The ancillary space a "spawned" answer's descriptors take (C ints).
RING_FDS_SPACE = socket.CMSG_LEN(RING_FDS * array.array("i").itemsize)


@dataclass(frozen=True)
class Launch:
    """What a fork server is started with; it crosses to it as argv and a memfd."""

    generation: int  # the number of the generation whose code it runs
    config: Config
    check: bool = False  # import, report, exit (irishost --check)


def command(launch: Launch, sock: int, alive: int, config_fd: int) -> list[str]:
    """The fork server's argv; the three descriptors must be inheritable."""
    argv = [sys.executable, "-m", "irishost.forks.server", "--generation", str(launch.generation)]
    argv += ["--supervisor", str(os.getpid()), "--socket", str(sock), "--alive", str(alive)]
    argv += ["--config-fd", str(config_fd)]
    return argv + (["--check"] if launch.check else [])


def config_memfd(config: Config) -> int:
    """A memfd holding the config as msgpack, read once by the fork server."""
    fd = os.memfd_create("irishost-config", os.MFD_CLOEXEC)
    data = pack(config.to_plain())
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.lseek(fd, 0, os.SEEK_SET)  # the offset is shared with the fork server's copy
    return fd


def pack(message: object) -> bytes:
    packed: bytes = msgpack.packb(message, use_bin_type=True)
    return packed


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, use_list=True)


def received_fds(cmsgs: list[tuple[int, int, bytes]]) -> list[int]:
    """The descriptors an SCM_RIGHTS message carried."""
    fds = array.array("i")
    for level, kind, payload in cmsgs:
        if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS):
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    return list(fds)
