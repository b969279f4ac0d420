"""Unix sockets only their owner can use: irishost's control socket, the relay's status.

File permissions decide who may connect to a unix socket, so a socket that
tells what a process holds (or takes commands) lives at mode 0600 in a
directory of mode 0700 that belongs to its user. Both irishost and the
relay need the same checks, so they live here rather than in either.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from pathlib import Path


class PrivateSocketError(Exception):
    """The socket's place is unsafe or taken; ``str()`` is the line to show."""


def make_private_directory(directory: Path, what: str, remedy: str) -> None:
    """Create ``directory`` 0700, or check that an existing one is ours.

    A directory another user owns (a /tmp fallback is world-writable, so
    anyone can create it first) would let that user replace our ``what``.
    """
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    owner = directory.stat().st_uid
    if owner not in (os.geteuid(), 0):
        raise PrivateSocketError(
            f"{directory} belongs to uid {owner}, not to this user; "
            f"another user could replace the {what} there"
        )
    refuse_shared_directory(directory, what, remedy)


def refuse_shared_directory(directory: Path, what: str, remedy: str) -> None:
    """Refuse a directory that others may write to, whoever owns it.

    There another user could swap the socket for their own: the owner's
    process would serve nobody, and its clients would print the impostor's
    answers.
    """
    mode = directory.stat().st_mode
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise PrivateSocketError(
            f"{directory} is writable by group or others (mode {stat.S_IMODE(mode):04o}); "
            f"another user could replace the {what} there: {remedy}"
        )


def remove_stale_socket(path: Path, in_use: str) -> bool:
    """Remove a socket left by a process that died; PrivateSocketError(``in_use``)
    if one still answers. Whether there was a stale socket to remove."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return False
    if not stat.S_ISSOCK(mode):
        raise PrivateSocketError(f"{path} exists and is not a socket; not replacing it")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        error = probe.connect_ex(str(path))
    if error == 0:
        raise PrivateSocketError(in_use)
    if error != errno.ECONNREFUSED:
        raise PrivateSocketError(f"cannot tell whether {path} is in use: {os.strerror(error)}")
    path.unlink()
    return True


def owner_only(sock: socket.socket) -> None:
    """Make the file that binding ``sock`` creates 0600; call it before bind.

    Linux creates a socket file with the socket's own mode (less the umask),
    so setting it before bind leaves no moment in which the file exists and
    others could connect.
    """
    os.fchmod(sock.fileno(), 0o600)
