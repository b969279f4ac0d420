"""Loading and validating the host's TOML config (``irishost -c service.toml``).

The host runs unattended under systemd, so a bad config must fail at start with
one line that says which file, which key and what is wrong -- never with a
traceback, and never by silently ignoring a misspelt key. Every section is
described once, declaratively, in ``_SECTIONS``; ``load_config`` walks those
specs, so adding a key means adding one line there and one dataclass field.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import re
import unicodedata
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import Any, TypeGuard

from iris.limits import ServiceLimits, TopicLimits
from iris.toml_file import TomlFileError, read_toml


class ConfigError(Exception):
    """A config file that cannot be used; ``str()`` is the one line to show the operator."""

    def __init__(self, file: Path, key: str | None, problem: str):
        # Passing the fields on to Exception keeps the error picklable.
        super().__init__(file, key, problem)
        self.file = file
        self.key = key
        self.problem = problem

    def __str__(self) -> str:
        if self.key is None:
            return f"{self.file}: {self.problem}"
        return f"{self.file}: {self.key}: {self.problem}"


@dataclass(frozen=True)
class ServiceSection:
    cluster: str
    handler: str  # "module:attribute", checked for shape only; irishost.loader imports it
    path: tuple[Path, ...]  # absolute


@dataclass(frozen=True)
class RelaySection:
    port: int
    embedded: bool | str  # True, False or "auto" (see _embedded)
    connect_timeout: float
    metrics_port: int = 0  # the embedded relay's Prometheus metrics; 0 = off
    permissions: Path | None = None  # the embedded relay's permissions file; absolute


@dataclass(frozen=True)
class WorkersSection:
    count: int
    preload: bool
    broadcast: str  # "all" or "one"
    max_requests_jitter: int
    timeout_grace: float
    shutdown_timeout: float
    boot_timeout: float  # a worker still in import or init() after this is killed
    gc_freeze: bool = True  # the fork server freezes its objects (gc.freeze) before forking


@dataclass(frozen=True)
class LimitsSection:
    request_threads: int
    request_memory: int
    broadcast_threads: int
    broadcast_memory: int
    max_rss: int  # bytes; 0 = never recycle for memory
    # above max_rss (or max_private) times this, killed at once instead of drained
    max_rss_kill_factor: float
    max_requests: int  # 0 = never recycle for request count
    max_private: int = 0  # bytes of private memory (USS); 0 = never recycle for it

    def service_limits(self) -> ServiceLimits:
        return ServiceLimits(
            broadcast_threads=self.broadcast_threads,
            broadcast_memory=self.broadcast_memory,
            request_threads=self.request_threads,
            request_memory=self.request_memory,
        )


@dataclass(frozen=True)
class TopicSection:
    name: str
    deliver: str  # "all" or "one"
    event_threads: int
    event_memory: int

    def topic_limits(self) -> TopicLimits:
        return TopicLimits(event_threads=self.event_threads, event_memory=self.event_memory)


@dataclass(frozen=True)
class ControlSection:
    socket: Path  # absolute


@dataclass(frozen=True)
class MetricsSection:
    port: int  # 0 = off


@dataclass(frozen=True)
class LoggingSection:
    level: str
    access: bool = False  # one line per request on the logger irishost.access
    file: Path | None = None  # absolute; None = stderr. Reopened on SIGUSR1


@dataclass(frozen=True)
class Config:
    file: Path  # absolute, so a reload still finds it after a chdir
    service: ServiceSection
    relay: RelaySection
    workers: WorkersSection
    limits: LimitsSection
    topics: tuple[TopicSection, ...]
    control: ControlSection
    metrics: MetricsSection
    logging: LoggingSection
    # [settings]: keyword arguments for the handler class, any TOML values.
    # Whether the handler takes them is checked where it is imported
    # (irishost.loader), since only the class can tell.
    settings: dict[str, Any] = field(default_factory=dict)

    def to_plain(self) -> dict[str, Any]:
        """The config as plain values (str, int, float, bool, lists, dicts), for
        msgpack to carry to the fork server; :meth:`from_plain` rebuilds it."""
        data = asdict(self)
        data["file"] = str(self.file)
        data["service"]["path"] = [str(entry) for entry in self.service.path]
        data["control"]["socket"] = str(self.control.socket)
        data["relay"]["permissions"] = _optional_text(self.relay.permissions)
        data["logging"]["file"] = _optional_text(self.logging.file)
        times: list[list[Any]] = []
        data["settings"] = _times_as_text(self.settings, [], times)
        data["settings_times"] = times
        return data

    @classmethod
    def from_plain(cls, data: dict[str, Any]) -> Config:
        service, relay = data["service"], data["relay"]
        log_file = data["logging"]["file"]  # None or a path
        return cls(
            file=Path(data["file"]),
            service=ServiceSection(**{**service, "path": tuple(map(Path, service["path"]))}),
            relay=RelaySection(**{**relay, "permissions": _optional_path(relay["permissions"])}),
            workers=WorkersSection(**data["workers"]),
            limits=LimitsSection(**data["limits"]),
            topics=tuple(TopicSection(**topic) for topic in data["topics"]),
            control=ControlSection(socket=Path(data["control"]["socket"])),
            metrics=MetricsSection(**data["metrics"]),
            logging=LoggingSection(**{**data["logging"], "file": _optional_path(log_file)}),
            settings=_text_as_times(data["settings"], data["settings_times"]),
        )

    def with_overrides(self, workers: int | None = None, log_level: str | None = None) -> Config:
        """Apply ``--workers`` / ``--log-level``, validated like the keys they override.

        A bad flag value raises ConfigError with the flag as the key, so the
        command line reports it the same way as a bad file.
        """
        config = self
        if workers is not None:
            count = _flag(self.file, "--workers", parse_worker_count, workers)
            config = replace(config, workers=replace(config.workers, count=count))
        if log_level is not None:
            level = _flag(self.file, "--log-level", _log_level, log_level)
            config = replace(config, logging=replace(config.logging, level=level))
        return config


# --- value parsers -------------------------------------------------------------------------
# Each takes a raw TOML value and returns the typed value or raises ValueError whose message
# reads "expected ..., got ..."; load_config prefixes the file and key.

_Parser = Callable[[Any], Any]

_SIZE_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KiB": 2**10,
    "MiB": 2**20,
    "GiB": 2**30,
    "TiB": 2**40,
}
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_NUMBER_WITH_UNIT = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]+)")


def _show(value: Any) -> str:
    """Render a value the way it looks in TOML, so the operator recognises it."""
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return f"a {type(value).__name__}"  # TOML dates and times


def _is_number(value: object) -> TypeGuard[int | float]:
    # TOML booleans arrive as Python bools, which are ints; they are never numbers here.
    return isinstance(value, int | float) and not isinstance(value, bool)


def parse_size(text: str | int) -> int:
    """Bytes in ``text``: an int, or a number with a unit such as "512MiB" or "10MB".

    Binary units (KiB..TiB) and decimal ones (KB..TB) both exist because
    operators copy numbers from tools that use either; the unit spells out which.
    """
    error = ValueError(f'expected a size such as "512MiB", got {_show(text)}')
    if _is_number(text):
        if isinstance(text, float) or text < 0:
            raise error
        return text
    match = _NUMBER_WITH_UNIT.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None or match[2] not in _SIZE_UNITS:
        raise error
    size = Fraction(match[1]) * _SIZE_UNITS[match[2]]
    if size.denominator != 1:  # "0.5B"
        raise error
    return int(size)


def parse_duration(text: str | float) -> float:
    """Seconds in ``text``: a number of seconds, or a number with a unit such as "500ms"."""
    error = ValueError(f'expected a duration such as "30s", got {_show(text)}')
    match = _NUMBER_WITH_UNIT.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is not None and match[2] in _DURATION_UNITS:
        seconds = float(match[1]) * _DURATION_UNITS[match[2]]
    elif _is_number(text) and abs(text) < 1e300:  # float() of a huge int would overflow
        seconds = float(text)
    else:
        raise error
    if not math.isfinite(seconds) or seconds < 0:
        raise error
    return seconds


def _positive_size(value: Any) -> int:
    size = parse_size(value)
    if size == 0:
        raise ValueError(f'expected a size above 0 such as "64MiB", got {_show(value)}')
    return size


def _positive_duration(value: Any) -> float:
    seconds = parse_duration(value)
    if seconds == 0:
        raise ValueError(f'expected a duration above 0 such as "60s", got {_show(value)}')
    return seconds


def _kill_factor(value: Any) -> float:
    """How far over max_rss (or max_private) a worker may get before it is killed
    instead of drained."""
    if not _is_number(value) or not 1 <= value <= 1000:
        raise ValueError(f"expected a number from 1 to 1000 such as 1.5, got {_show(value)}")
    return float(value)


def _integer(low: int, high: int | None = None) -> Callable[[Any], int]:
    wanted = f"an integer >= {low}" if high is None else f"an integer from {low} to {high}"

    def parse(value: Any) -> int:
        if (
            not isinstance(value, int)
            or isinstance(value, bool)
            or value < low
            or (high is not None and value > high)
        ):
            raise ValueError(f"expected {wanted}, got {_show(value)}")
        return value

    return parse


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {_show(value)}")
    return value


def _embedded(value: Any) -> bool | str:
    """``[relay] embedded``: true, false or "auto".

    "auto" uses a relay already listening on the port and embeds one only when
    none is, so a host never takes a shared relay down with it when it stops.
    """
    if isinstance(value, bool):
        return value
    if value == "auto":
        return "auto"
    raise ValueError(f'expected true, false or "auto", got {_show(value)}')


def _choice(*options: str) -> _Parser:
    wanted = " or ".join(_show(option) for option in options)

    def parse(value: Any) -> str:
        if not isinstance(value, str) or value not in options:
            raise ValueError(f"expected {wanted}, got {_show(value)}")
        return value

    return parse


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {_show(value)}")
    return value


def _name(value: Any) -> str:
    """A cluster or topic name: any non-empty string, as the protocol allows, but for
    control characters. Those would break the host's log lines and its process title
    (a NUL made setproctitle fail at start), and no real name needs one.
    """
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a non-empty string, got {_show(value)}")
    if any(unicodedata.category(char) == "Cc" for char in value):
        raise ValueError(
            f"expected a name without control characters (NUL, tab, newline...), got {_show(value)}"
        )
    return value


def _handler_spec(value: Any) -> str:
    text = value if isinstance(value, str) else ""
    module, colon, attribute = text.partition(":")
    names = [*module.split("."), *attribute.split(".")]
    if not colon or not all(name.isidentifier() for name in names):
        raise ValueError(
            f'expected "module:attribute" such as "primes:PrimeHandler", got {_show(value)}'
        )
    return text


def _string_list(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValueError(f'expected an array of strings such as ["."], got {_show(value)}')
    return tuple(value)


# Each worker is a process with its own copy of the handler, and a slip of the
# keyboard (count = 10000) would fork them as fast as the supervisor can. 1024 is
# far beyond any machine's useful parallelism and still a number a host survives.
MAX_WORKERS = 1024
# Pool threads start on demand, one per queued task; a count beyond this only
# risks running out of threads (pids) under a burst without adding throughput.
MAX_THREADS = 1024

# Also the bound of ``irishost scale`` (irishost.ops.control).
parse_worker_count = _integer(1, MAX_WORKERS)
_thread_count = _integer(1, MAX_THREADS)
_log_level = _choice("debug", "info", "warning", "error")
_all_or_one = _choice("all", "one")

# --- the schema ----------------------------------------------------------------------------
# key -> (parser, default as it would be written in the file). Running defaults through the
# parser keeps them in the file's own notation here and checks them like any other value.

_REQUIRED = object()

_Spec = dict[str, tuple[_Parser, Any]]

_SECTIONS: dict[str, tuple[type, _Spec]] = {
    "service": (
        ServiceSection,
        {
            "cluster": (_name, _REQUIRED),
            "handler": (_handler_spec, _REQUIRED),
            "path": (_string_list, ["."]),  # made absolute by load_config
        },
    ),
    "relay": (
        RelaySection,
        {
            "port": (_integer(1, 65535), 55555),
            "embedded": (_embedded, False),
            "connect_timeout": (parse_duration, "10s"),
            "metrics_port": (_integer(0, 65535), 0),
            "permissions": (_string, ""),  # "" = none; made absolute and read by load_config
        },
    ),
    "workers": (
        WorkersSection,
        {
            "count": (parse_worker_count, min(os.cpu_count() or 1, MAX_WORKERS)),
            "preload": (_boolean, True),
            "broadcast": (_all_or_one, "all"),
            "max_requests_jitter": (_integer(0), 0),
            "timeout_grace": (parse_duration, "5s"),
            "shutdown_timeout": (parse_duration, "30s"),
            "boot_timeout": (_positive_duration, "60s"),
            "gc_freeze": (_boolean, True),
        },
    ),
    "limits": (
        LimitsSection,
        {
            "request_threads": (_thread_count, 1),
            "request_memory": (_positive_size, "64MiB"),
            "broadcast_threads": (_thread_count, 1),
            "broadcast_memory": (_positive_size, "64MiB"),
            "max_rss": (parse_size, 0),
            "max_rss_kill_factor": (_kill_factor, 1.5),
            "max_requests": (_integer(0), 0),
            "max_private": (parse_size, 0),
        },
    ),
    "control": (ControlSection, {"socket": (_string, "")}),  # "" = see _control_socket
    "metrics": (MetricsSection, {"port": (_integer(0, 65535), 0)}),
    "logging": (
        LoggingSection,
        {
            "level": (_log_level, "info"),
            "access": (_boolean, False),
            "file": (_string, ""),  # "" = stderr; made absolute by load_config
        },
    ),
}

# Each [[topics]] entry.
_TOPIC: _Spec = {
    "name": (_name, _REQUIRED),
    "deliver": (_all_or_one, "all"),
    "event_threads": (_thread_count, 1),
    "event_memory": (_positive_size, "64MiB"),
}


# Tables not described by _SECTIONS: [[topics]] (a list of tables) and [settings] (free-form).
_FREE_TABLES = ("topics", "settings")

# --- loading -------------------------------------------------------------------------------


def load_config(path: str | Path) -> Config:
    """Read, validate and complete the config at ``path``; raises ConfigError."""
    file = Path(path)
    data = _read_toml(file)
    for name, value in data.items():
        if name not in _SECTIONS and name not in _FREE_TABLES:
            kind = "table" if isinstance(value, dict) else "key"
            known = ", ".join([*_SECTIONS, *_FREE_TABLES])
            raise ConfigError(file, name, f"unknown {kind}; known tables: {known}")

    sections = {
        name: _parse_table(file, name, data.get(name, {}), spec)
        for name, (_, spec) in _SECTIONS.items()
    }
    # Resolve relative paths against the config's directory rather than the current one, so
    # the same file works from a shell and from systemd.
    absolute = Path(os.path.abspath(file))
    directory = absolute.parent
    service = sections["service"]
    service["path"] = tuple(Path(os.path.normpath(directory / entry)) for entry in service["path"])
    control = sections["control"]
    try:
        control["socket"] = _control_socket(absolute, control["socket"])
    except ValueError as error:
        raise ConfigError(file, "control.socket", str(error)) from None

    log_section = sections["logging"]
    try:
        log_section["file"] = _log_file(directory, log_section["file"])
    except ValueError as error:
        raise ConfigError(file, "logging.file", str(error)) from None

    relay = sections["relay"]
    try:
        relay["permissions"] = _permissions_file(directory, relay["permissions"])
    except ValueError as error:
        raise ConfigError(file, "relay.permissions", str(error)) from None

    _check_ports(file, sections)
    built = {name: cls(**sections[name]) for name, (cls, _) in _SECTIONS.items()}
    return Config(
        file=absolute,
        topics=_parse_topics(file, data.get("topics", [])),
        settings=_parse_settings(file, data.get("settings", {})),
        **built,
    )


def _check_ports(file: Path, sections: dict[str, dict[str, Any]]) -> None:
    """Refuse a relay metrics port that another key already takes: one of the
    two would be refused at start, each time, with the config to blame."""
    metrics_port = sections["relay"]["metrics_port"]
    for key, port in (
        ("relay.port", sections["relay"]["port"]),
        ("metrics.port", sections["metrics"]["port"]),
    ):
        if metrics_port and metrics_port == port:
            raise ConfigError(file, "relay.metrics_port", f"{metrics_port} is {key} too")


def _read_toml(file: Path) -> dict[str, Any]:
    try:
        data, _ = read_toml(file, "a config")
    except TomlFileError as error:
        raise ConfigError(file, None, str(error)) from None
    return data


def _parse_table(file: Path, where: str, table: Any, spec: _Spec) -> dict[str, Any]:
    """Parse one table against its spec, filling in defaults."""
    if not isinstance(table, dict):
        raise ConfigError(file, where, f"expected a table, got {_show(table)}")
    for key in table:
        if key not in spec:
            known = ", ".join(spec)
            raise ConfigError(file, f"{where}.{key}", f"unknown key; known keys: {known}")
    values = {}
    for key, (parse, default) in spec.items():
        if key not in table and default is _REQUIRED:
            raise ConfigError(file, f"{where}.{key}", "required key is missing")
        try:
            values[key] = parse(table.get(key, default))
        except ValueError as error:
            raise ConfigError(file, f"{where}.{key}", str(error)) from None
    return values


def _parse_topics(file: Path, entries: Any) -> tuple[TopicSection, ...]:
    if not isinstance(entries, list):
        raise ConfigError(
            file, "topics", f"expected an array of tables ([[topics]]), got {_show(entries)}"
        )
    topics = []
    seen = set()
    for index, entry in enumerate(entries):
        topic = TopicSection(**_parse_table(file, f"topics[{index}]", entry, _TOPIC))
        if topic.name in seen:
            raise ConfigError(file, f"topics[{index}].name", f"duplicate topic {_show(topic.name)}")
        seen.add(topic.name)
        topics.append(topic)
    return tuple(topics)


# TOML's dates and times, the only [settings] values msgpack does not carry
# (and the fork server unpacks with no hooks), cross as ISO text;
# ``settings_times`` lists where each one is and its type, so no string can pass for one.
_TIME_TYPES = {kind.__name__: kind for kind in (datetime.datetime, datetime.date, datetime.time)}


def _times_as_text(value: Any, path: list[str | int], times: list[list[Any]]) -> Any:
    """``value`` with its dates and times as ISO text; each one's path and type go in ``times``."""
    if isinstance(value, dict):
        return {key: _times_as_text(item, [*path, key], times) for key, item in value.items()}
    if isinstance(value, list):
        return [_times_as_text(item, [*path, index], times) for index, item in enumerate(value)]
    if isinstance(value, (datetime.date, datetime.time)):
        times.append([path, type(value).__name__])
        return value.isoformat()
    return value


def _text_as_times(settings: dict[str, Any], times: list[list[Any]]) -> dict[str, Any]:
    """Undo :func:`_times_as_text`, in place."""
    for path, kind in times:
        *parents, last = path
        holder: Any = settings
        for key in parents:
            holder = holder[key]
        holder[last] = _TIME_TYPES[kind].fromisoformat(holder[last])
    return settings


def _parse_settings(file: Path, table: Any) -> dict[str, Any]:
    """[settings]: any keys and TOML values; the handler class decides which it takes."""
    if not isinstance(table, dict):
        raise ConfigError(file, "settings", f"expected a table, got {_show(table)}")
    _check_integers(file, table, "settings")
    return table


# The integers msgpack carries: the config crosses to the fork server in it.
_MSGPACK_INTEGERS = range(-(2**63), 2**64)


def _check_integers(file: Path, value: Any, where: str) -> None:
    """ConfigError naming the first integer in ``value`` that msgpack cannot carry.

    The config crosses to the fork server as msgpack (:meth:`Config.to_plain`)
    at every reload and relay reconnect (the first generation is forked with
    it in memory). Such an integer would pass ``--check`` and the start, then
    end the host with OverflowError on the next SIGHUP; found here, it is a
    config error like any other.
    """
    if isinstance(value, dict):
        for key, item in value.items():
            _check_integers(file, item, f"{where}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_integers(file, item, f"{where}[{index}]")
    elif isinstance(value, int) and value not in _MSGPACK_INTEGERS:
        raise ConfigError(
            file,
            where,
            f"integer {value} is out of range: settings carry integers from -2**63 to 2**64-1",
        )


# A unix socket's path must fit sockaddr_un.sun_path: 108 bytes with the NUL.
MAX_SOCKET_PATH = 107


def _control_socket(file: Path, configured: str) -> Path:
    """Where the status/control socket of ``file`` (absolute) lives: ``[control] socket``,
    or a default; ValueError if the path is too long for a unix socket.

    Under systemd, RuntimeDirectory= gives a private directory that is cleaned up
    on stop; elsewhere a per-user directory in /tmp keeps users' hosts apart. The
    default name is the config's stem (for the operator) and a hash of its full
    path, so that hosts of /srv/a/service.toml and /srv/b/service.toml sharing a
    directory do not take each other's socket. Checked here, not at start, so
    that ``--check`` finds a path the kernel would refuse.
    """
    if configured:
        path = Path(os.path.normpath(file.parent / configured))
    else:
        digest = hashlib.sha256(os.fsencode(os.path.realpath(file))).hexdigest()[:12]
        path = _runtime_directory() / f"{file.stem[:40]}-{digest}.sock"
    return check_socket_path(path)


def check_socket_path(path: Path) -> Path:
    """``path``, or ValueError if it is too long for a unix socket's address."""
    size = len(os.fsencode(path))
    if size > MAX_SOCKET_PATH:
        raise ValueError(
            f"{path} is {size} bytes long; a unix socket path has at most {MAX_SOCKET_PATH}"
        )
    return path


def _log_file(directory: Path, configured: str) -> Path | None:
    """``[logging] file`` made absolute (against the config's ``directory``), or
    None for stderr; ValueError if the host could not append to it.

    Checked here, so that ``--check`` finds a typo in the directory or a
    permission problem rather than the first line the host writes.
    """
    if not configured:
        return None
    if "\0" in configured:
        raise ValueError(f"expected a path, got {_show(configured)}")
    path = Path(os.path.normpath(directory / configured))
    if path.is_dir():
        raise ValueError(f"{path} is a directory; expected a file to append to")
    if not path.parent.is_dir():
        raise ValueError(f"{path.parent}: no such directory")
    writable = path if path.exists() else path.parent
    if not os.access(writable, os.W_OK):
        raise ValueError(f"{writable}: not writable by this user (uid {os.getuid()})")
    return path


def _permissions_file(directory: Path, configured: str) -> Path | None:
    """``[relay] permissions`` made absolute (against the config's ``directory``),
    or None; ValueError if the file cannot be used, so that ``--check`` and a
    reload find its mistakes rather than the relay. The relay reads it again
    when it starts, and on each reload."""
    # Imported here: every fork server and worker imports this module, and
    # importing iris.relay would load the whole relay into each of them.
    from iris.relay.permissions import Permissions, PermissionsError

    if not configured:
        return None
    path = Path(os.path.normpath(directory / configured))
    try:
        Permissions.load(path)
    except PermissionsError as error:
        raise ValueError(str(error)) from None
    return path


def _optional_path(text: str | None) -> Path | None:
    return None if text is None else Path(text)


def _optional_text(path: Path | None) -> str | None:
    return None if path is None else str(path)


def _runtime_directory() -> Path:
    runtime = os.environ.get("RUNTIME_DIRECTORY", "")
    if runtime:
        # systemd joins several RuntimeDirectory= entries with ":".
        return Path(runtime.split(":")[0])
    return Path("/tmp") / f"irishost-{os.getuid()}"


def _flag(file: Path, flag: str, parse: _Parser, value: Any) -> Any:
    try:
        return parse(value)
    except ValueError as error:
        raise ConfigError(file, flag, str(error)) from None
