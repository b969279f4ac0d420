"""Who may serve and who may listen: the relay's permissions file (``--permissions``).

Without it the relay trusts every program on the machine, as the original
Iris node does: any local user could register under a service's cluster
and take half its requests, or read any topic. The file names, for each
cluster and topic (exactly, or by a prefix ending in ``*``), the local
users and ``@groups`` that may act on it::

    default = "open"              # or "closed": what the file does not mention

    [cluster.billing]
    serve = ["billing"]           # register under the cluster
    send = ["*"]                  # request, broadcast, open tunnels to it

    [topic."audit-*"]
    subscribe = ["root", "@audit"]
    publish = ["*"]

An exact name wins over a prefix, and a longer prefix over a shorter one;
an action the chosen section does not list follows ``default``. Users and
groups are looked up when the file is read, so a typo is an error then
rather than a rule that never matches; a user's groups are those the user
database gives (``os.getgrouplist``), not those its process holds.

The relay looks up the user of each connection once (peer_uid.py) and
decides each (connection, cluster or topic) once: the decision to let a
connection send to a cluster is kept on the connection (``cleared``), which
the fast path (passthrough.py) checks with one set lookup. A reload clears
every decision and re-checks the registrations and subscriptions that
stand.
"""

from __future__ import annotations

import enum
import grp
import json
import logging
import os
import pwd
import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from ..toml_file import TomlFileError, read_toml

log = logging.getLogger("iris.relay")

EVERYONE = "*"


class PermissionsError(Exception):
    """A permissions file that cannot be used; ``str()`` is the one line to show,
    with the file, the line and the key where they are known."""

    def __init__(self, file: Path, line: int | None, key: str | None, problem: str):
        super().__init__(file, line, key, problem)
        self.file, self.line, self.key, self.problem = file, line, key, problem

    def __str__(self) -> str:
        where = f"{self.file}" if self.line is None else f"{self.file}:{self.line}"
        return (
            f"{where}: {self.problem}"
            if self.key is None
            else f"{where}: {self.key}: {self.problem}"
        )


class Action(enum.Enum):
    """What a connection may be refused; the value is the file's key."""

    SERVE = "serve"
    SEND = "send"
    SUBSCRIBE = "subscribe"
    PUBLISH = "publish"

    @property
    def kind(self) -> str:
        """The namespace the action's name is in: the file's table."""
        return "cluster" if self in (Action.SERVE, Action.SEND) else "topic"

    @property
    def phrase(self) -> str:
        return {
            Action.SERVE: "serve cluster",
            Action.SEND: "send to cluster",
            Action.SUBSCRIBE: "subscribe to topic",
            Action.PUBLISH: "publish to topic",
        }[self]


_ACTIONS = {kind: [a.value for a in Action if a.kind == kind] for kind in ("cluster", "topic")}


@dataclass(frozen=True)
class User:
    """A connection's local user; uid None when it could not be found."""

    uid: int | None
    name: str
    gids: frozenset[int]

    @classmethod
    def of(cls, uid: int | None) -> User:
        if uid is None:
            return cls(None, "unknown", frozenset())
        try:
            entry = pwd.getpwuid(uid)
        except KeyError:  # a uid with no name: only "*" and default match it
            return cls(uid, str(uid), frozenset())
        return cls(uid, entry.pw_name, frozenset(_groups(entry.pw_name, entry.pw_gid)))

    def __str__(self) -> str:
        uid = "unknown" if self.uid is None else self.uid
        return f"user {self.name} (uid {uid})"


def _groups(name: str, gid: int) -> list[int]:
    try:
        return os.getgrouplist(name, gid)
    except OSError:
        return [gid]


@dataclass(frozen=True)
class Who:
    """The users an action's list admits."""

    everyone: bool
    uids: frozenset[int]
    gids: frozenset[int]

    def admits(self, user: User) -> bool:
        return self.everyone or user.uid in self.uids or not self.gids.isdisjoint(user.gids)


# One section's lists, by action; an action not listed follows the default.
_Section = dict[Action, Who]


class _Names:
    """The sections of one table (cluster or topic): exact names and prefixes."""

    def __init__(self) -> None:
        self.exact: dict[str, _Section] = {}
        self.prefixes: list[tuple[str, _Section]] = []  # longest first

    def add(self, name: str, section: _Section) -> None:
        if name.endswith("*"):
            self.prefixes.append((name[:-1], section))
            self.prefixes.sort(key=lambda entry: -len(entry[0]))
        else:
            self.exact[name] = section

    def section(self, name: str) -> _Section | None:
        found = self.exact.get(name)
        if found is not None:
            return found
        for prefix, section in self.prefixes:
            if name.startswith(prefix):
                return section
        return None


class Permissions:
    """The rules of one permissions file."""

    def __init__(self, file: Path, default_open: bool) -> None:
        self.file = file
        self.default_open = default_open
        self.tables = {"cluster": _Names(), "topic": _Names()}

    def allows(self, user: User, action: Action, name: str) -> bool:
        section = self.tables[action.kind].section(name)
        who = None if section is None else section.get(action)
        return self.default_open if who is None else who.admits(user)

    @classmethod
    def load(cls, path: str | Path) -> Permissions:
        """Read and check the file; PermissionsError names what is wrong and where."""
        file = Path(path)
        try:
            data, text = read_toml(file, "a permissions file")
        except TomlFileError as error:
            raise PermissionsError(file, None, None, str(error)) from None
        return _Reader(file, text).build(data)


class _Reader:
    """Checks a parsed file, naming the line and key of each problem."""

    def __init__(self, file: Path, text: str) -> None:
        self.file = file
        self.lines = _key_lines(text)

    def fail(self, path: tuple[str, ...], problem: str) -> PermissionsError:
        line = next(
            (self.lines[path[:n]] for n in range(len(path), 0, -1) if path[:n] in self.lines), None
        )
        return PermissionsError(self.file, line, ".".join(map(_show_key, path)), problem)

    def build(self, data: dict[str, Any]) -> Permissions:
        for key in data:
            if key not in ("default", "cluster", "topic"):
                raise self.fail((key,), "unknown key; known keys: default, cluster, topic")
        if "default" not in data:
            raise self.fail(("default",), 'required key is missing: default = "open" or "closed"')
        default = data["default"]
        if default not in ("open", "closed"):
            raise self.fail(("default",), f'expected "open" or "closed", got {_show(default)}')
        permissions = Permissions(self.file, default == "open")
        for kind, names in permissions.tables.items():
            table = data.get(kind, {})
            if not isinstance(table, dict):
                raise self.fail(
                    (kind,), f"expected tables such as [{kind}.NAME], got {_show(table)}"
                )
            for name, section in table.items():
                names.add(name, self.section(kind, name, section))
        return permissions

    def section(self, kind: str, name: str, section: Any) -> _Section:
        where = (kind, name)
        if not name:
            raise self.fail(where, f"a {kind} name is not empty")
        if "*" in name[:-1]:
            raise self.fail(where, f"a {kind} name may end in * (a prefix) and hold no other *")
        if not isinstance(section, dict):
            raise self.fail(where, f"expected a table, got {_show(section)}")
        known = _ACTIONS[kind]
        lists: _Section = {}
        for key, value in section.items():
            if key not in known:
                raise self.fail((*where, key), f"unknown key; a {kind} takes {', '.join(known)}")
            lists[Action(key)] = self.who((*where, key), value)
        return lists

    def who(self, where: tuple[str, ...], value: Any) -> Who:
        wanted = 'expected an array of users, "@groups" or "*"'
        if not isinstance(value, list):
            raise self.fail(where, f"{wanted}, got {_show(value)}")
        uids, gids, everyone = set(), set(), False
        for entry in value:
            if not isinstance(entry, str) or entry in ("", "@"):
                raise self.fail(where, f"{wanted}, got {_show(entry)} in it")
            if entry == EVERYONE:
                everyone = True
            elif entry.startswith("@"):
                try:
                    gids.add(grp.getgrnam(entry[1:]).gr_gid)
                except KeyError:
                    raise self.fail(where, f"unknown group {_show(entry)}") from None
            else:
                try:
                    uids.add(pwd.getpwnam(entry).pw_uid)
                except KeyError:
                    raise self.fail(where, f"unknown user {_show(entry)}") from None
        return Who(everyone, frozenset(uids), frozenset(gids))


def _show(value: Any) -> str:
    """A value as it looks in TOML, so the operator recognises it."""
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return repr(value)


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_KEY_PART = r"""(?:[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*"|'[^']*')"""
_KEY = rf"{_KEY_PART}(?:\s*\.\s*{_KEY_PART})*"
_HEADER = re.compile(rf"\s*\[\s*({_KEY})\s*\]")
_ASSIGNMENT = re.compile(rf"\s*({_KEY})\s*=")


def _show_key(part: str) -> str:
    return part if _BARE_KEY.fullmatch(part) else json.dumps(part, ensure_ascii=False)


def _key_lines(text: str) -> dict[tuple[str, ...], int]:
    """The line of each table header and key, by its full path.

    tomllib gives values, not lines; each header and key is read back here
    with tomllib itself, so quoting and dotted keys mean what they mean in
    the file. A key it cannot place (inside an inline table, say) is
    reported at the line of its nearest placed parent.
    """
    lines: dict[tuple[str, ...], int] = {}
    table: tuple[str, ...] = ()
    for number, line in enumerate(text.splitlines(), 1):
        header = _HEADER.match(line)
        if header:
            table = _key_path(header[1])
            lines.setdefault(table, number)
            continue
        assignment = _ASSIGNMENT.match(line)
        if assignment:
            lines.setdefault((*table, *_key_path(assignment[1])), number)
    return lines


def _key_path(key: str) -> tuple[str, ...]:
    try:
        value: Any = tomllib.loads(f"{key} = 0")
    except tomllib.TOMLDecodeError:
        return ()
    path = []
    while isinstance(value, dict):
        (name, value), *_ = value.items()
        path.append(name)
    return tuple(path)


# A name as a connection's decisions keep it: a cluster's UTF-8 bytes (as the
# fast path meets it on the wire), a topic's text.
_Key = TypeVar("_Key", bytes, str)


class Guarded(Protocol):
    """What the gate needs of a connection (server.PeerConnection)."""

    name: str
    closed: bool
    user: User | None  # found at accept; None without permissions
    cleared: set[bytes] | None  # clusters it may send to, by UTF-8 name
    cleared_topics: set[str] | None  # topics it may publish to
    cluster: str | None
    topics: set[str]

    def close(self, reason: str | None) -> None: ...


class Gate:
    """The relay's permissions in force: decisions, and the refusals counted."""

    def __init__(self, permissions: Permissions) -> None:
        self.permissions = permissions
        self.refusals = {action.value: 0 for action in Action}
        self._users: dict[int | None, User] = {}

    def user(self, uid: int | None) -> User:
        """The user of ``uid``, looked up once per uid until a reload."""
        user = self._users.get(uid)
        if user is None:
            user = self._users[uid] = User.of(uid)
        return user

    def refusal(self, peer: Guarded, action: Action, name: str) -> str | None:
        """Why ``peer`` may not do ``action`` on ``name`` (logged and counted),
        or None if it may."""
        user = peer.user or self.user(None)
        if self.permissions.allows(user, action, name):
            return None
        self.refusals[action.value] += 1
        log.warning(
            "permission refused: uid=%s user=%s action=%s %s=%s peer=%s",
            "unknown" if user.uid is None else user.uid,
            user.name,
            action.value,
            action.kind,
            name,
            peer.name,
        )
        return f"permission denied: {user} may not {action.phrase} {_show(name)}"

    def may_send(self, peer: Guarded, cluster: str) -> bool:
        """Whether ``peer`` may send to ``cluster``; a refusal closes it."""
        return self._cleared(peer, peer.cleared, cluster.encode(), Action.SEND, cluster)

    def may_publish(self, peer: Guarded, topic: str) -> bool:
        """Whether ``peer`` may publish to ``topic``; a refusal closes it."""
        return self._cleared(peer, peer.cleared_topics, topic, Action.PUBLISH, topic)

    def _cleared(
        self, peer: Guarded, cleared: set[_Key] | None, key: _Key, action: Action, name: str
    ) -> bool:
        """Decide once per connection and name: a yes is kept in ``cleared``
        (None: the peer came before the gate), a no closes the connection."""
        if cleared is None or key in cleared:
            return True
        if self._expelled(peer, action, name):
            return False
        cleared.add(key)
        return True

    def may_subscribe(self, peer: Guarded, topic: str) -> bool:
        """Whether ``peer`` may subscribe to ``topic``; a refusal closes it."""
        return not self._expelled(peer, Action.SUBSCRIBE, topic)

    def _expelled(self, peer: Guarded, action: Action, name: str) -> bool:
        reason = self.refusal(peer, action, name)
        if reason is not None:
            peer.close(reason)
        return reason is not None

    def replace(self, permissions: Permissions, peers: Iterable[Guarded]) -> None:
        """Put new rules in force: forget every decision, and close the
        connections whose registration or subscriptions they no longer allow."""
        self.permissions = permissions
        self._users.clear()
        for peer in peers:
            if peer.user is None or peer.closed:
                continue  # gone, or never identified
            peer.user = self.user(peer.user.uid)
            peer.cleared, peer.cleared_topics = set(), set()
            standing = [(Action.SUBSCRIBE, topic) for topic in sorted(peer.topics)]
            if peer.cluster:
                standing.insert(0, (Action.SERVE, peer.cluster))
            for action, name in standing:
                if self._expelled(peer, action, name):
                    break
