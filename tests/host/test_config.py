import contextlib
import datetime
import os
import re
import tomllib
from dataclasses import fields
from pathlib import Path

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from toml_text import to_toml

from iris.limits import ServiceLimits, TopicLimits
from irishost.config import (
    Config,
    ConfigError,
    ControlSection,
    LimitsSection,
    LoggingSection,
    MetricsSection,
    RelaySection,
    ServiceSection,
    TopicSection,
    WorkersSection,
    load_config,
    parse_duration,
    parse_size,
)

MiB = 2**20
CONFIGS = Path(__file__).resolve().parents[2] / "configs"

MINIMAL = """
[service]
cluster = "primes"
handler = "primes:PrimeHandler"
"""

FULL = """
[service]
cluster = "primes"
handler = "primes:PrimeHandler"
path = [".", "lib"]

[relay]
port = 5000
embedded = true
connect_timeout = "2m"

[workers]
count = 3
preload = false
broadcast = "one"
max_requests_jitter = 50
timeout_grace = "500ms"
shutdown_timeout = 12.5
boot_timeout = "90s"
gc_freeze = false

[limits]
request_threads = 4
request_memory = "1GiB"
broadcast_threads = 2
broadcast_memory = 1000
max_rss = "10MB"
max_rss_kill_factor = 2
max_requests = 1000
max_private = "300MiB"

[[topics]]
name = "news"

[[topics]]
name = "ticks"
deliver = "one"
event_threads = 8
event_memory = "100KiB"

[control]
socket = "run/ctl.sock"

[metrics]
port = 9100

[logging]
level = "debug"
"""


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Work in tmp_path so errors name the file exactly as "service.toml"."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RUNTIME_DIRECTORY", raising=False)
    return tmp_path


def write(directory: Path, text: str, name: str = "service.toml") -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def load_error(text: str) -> ConfigError:
    write(Path.cwd(), text)
    return load_error_of("service.toml")


def load_error_of(path: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value


def test_minimal_config_gets_every_default(in_tmp):
    config = load_config(write(in_tmp, MINIMAL))
    socket = config.control.socket  # see test_control_socket_default

    assert config == Config(
        file=in_tmp / "service.toml",
        service=ServiceSection(cluster="primes", handler="primes:PrimeHandler", path=(in_tmp,)),
        relay=RelaySection(port=55555, embedded=False, connect_timeout=10.0),
        workers=WorkersSection(
            count=os.cpu_count() or 1,
            preload=True,
            broadcast="all",
            max_requests_jitter=0,
            timeout_grace=5.0,
            shutdown_timeout=30.0,
            boot_timeout=60.0,
            gc_freeze=True,
        ),
        limits=LimitsSection(
            request_threads=1,
            request_memory=64 * MiB,
            broadcast_threads=1,
            broadcast_memory=64 * MiB,
            max_rss=0,
            max_rss_kill_factor=1.5,
            max_requests=0,
            max_private=0,
        ),
        topics=(),
        control=ControlSection(socket=socket),
        metrics=MetricsSection(port=0),
        logging=LoggingSection(level="info"),
    )


def test_full_config(in_tmp):
    config = load_config(write(in_tmp, FULL))

    assert config.service.path == (in_tmp, in_tmp / "lib")
    assert config.relay == RelaySection(port=5000, embedded=True, connect_timeout=120.0)
    assert config.workers == WorkersSection(
        count=3,
        preload=False,
        broadcast="one",
        max_requests_jitter=50,
        timeout_grace=0.5,
        shutdown_timeout=12.5,
        boot_timeout=90.0,
        gc_freeze=False,
    )
    assert config.limits == LimitsSection(
        request_threads=4,
        request_memory=2**30,
        broadcast_threads=2,
        broadcast_memory=1000,
        max_rss=10_000_000,
        max_rss_kill_factor=2.0,
        max_requests=1000,
        max_private=300 * MiB,
    )
    assert config.topics == (
        TopicSection(name="news", deliver="all", event_threads=1, event_memory=64 * MiB),
        TopicSection(name="ticks", deliver="one", event_threads=8, event_memory=100 * 1024),
    )
    assert config.control.socket == in_tmp / "run" / "ctl.sock"
    assert config.metrics.port == 9100
    assert config.logging.level == "debug"


def test_sections_convert_to_binding_limits(in_tmp):
    config = load_config(write(in_tmp, FULL))

    assert config.limits.service_limits() == ServiceLimits(
        broadcast_threads=2, broadcast_memory=1000, request_threads=4, request_memory=2**30
    )
    assert config.topics[1].topic_limits() == TopicLimits(event_threads=8, event_memory=100 * 1024)


def test_example_configs_are_valid():
    for name in ("echo.toml", "primes.toml", "async_echo.toml"):
        config = load_config(CONFIGS / name)
        assert config.service.path == (CONFIGS,)
        assert config.relay.embedded == "auto"  # a running relay is used, not taken down
        assert config.relay.port == 55555


@pytest.mark.parametrize("written, value", [("true", True), ("false", False), ('"auto"', "auto")])
def test_relay_embedded_takes_true_false_or_auto(in_tmp, written, value):
    config = load_config(write(in_tmp, MINIMAL + f"[relay]\nembedded = {written}"))

    assert config.relay.embedded == value
    assert Config.from_plain(config.to_plain()) == config  # crosses to the fork server as is


# --- errors --------------------------------------------------------------------------------

SECTION_KEYS = {
    "service": ServiceSection,
    "relay": RelaySection,
    "workers": WorkersSection,
    "limits": LimitsSection,
    "control": ControlSection,
    "metrics": MetricsSection,
    "logging": LoggingSection,
}


UNKNOWN_KEY_DOCUMENTS = {
    "service": (MINIMAL + "bogus = 1", ServiceSection),
    **{
        name: (f"{MINIMAL}[{name}]\nbogus = 1", cls)
        for name, cls in SECTION_KEYS.items()
        if name != "service"
    },
    "topics[0]": (f"{MINIMAL}[[topics]]\nname = 'news'\nbogus = 1", TopicSection),
}


@pytest.mark.parametrize("where", UNKNOWN_KEY_DOCUMENTS)
def test_unknown_key_in_each_table(in_tmp, where):
    text, section = UNKNOWN_KEY_DOCUMENTS[where]
    known = ", ".join(f.name for f in fields(section))

    error = load_error(text)

    assert str(error) == f"service.toml: {where}.bogus: unknown key; known keys: {known}"
    assert (error.file, error.key) == (Path("service.toml"), f"{where}.bogus")


KNOWN_TABLES = (
    "known tables: service, relay, workers, limits, control, metrics, logging, topics, settings"
)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "service.cluster: required key is missing"),
        ('[service]\nhandler = "a:B"', "service.cluster: required key is missing"),
        ('[service]\ncluster = "c"', "service.handler: required key is missing"),
        (MINIMAL + "[[topics]]\ndeliver = 'one'", "topics[0].name: required key is missing"),
        (MINIMAL + "[bogus]", f"bogus: unknown table; {KNOWN_TABLES}"),
        ("bogus = 1\n" + MINIMAL, f"bogus: unknown key; {KNOWN_TABLES}"),
        (MINIMAL + "extra = {a = 1}", "service.extra: unknown key; known keys: cluster, "
         "handler, path"),
        ("relay = 5\n" + MINIMAL, "relay: expected a table, got 5"),
        ("settings = 5\n" + MINIMAL, "settings: expected a table, got 5"),
        (MINIMAL + "[logging]\naccess = 1", "logging.access: expected true or false, got 1"),
        (MINIMAL + "[topics]", "topics: expected an array of tables ([[topics]]), got a table"),
        ("topics = [1]\n" + MINIMAL, "topics[0]: expected a table, got 1"),
        (MINIMAL + "[relay]\nembedded = 'yes'", 'relay.embedded: expected true, false or '
         '"auto", got "yes"'),
        (MINIMAL + "[relay]\nembedded = 'Auto'", 'relay.embedded: expected true, false or '
         '"auto", got "Auto"'),
        (MINIMAL + "[relay]\nembedded = 1", 'relay.embedded: expected true, false or "auto", '
         "got 1"),
        (MINIMAL + "[workers]\ncount = '2'", 'workers.count: expected an integer from 1 to '
         '1024, got "2"'),
        (MINIMAL + "[workers]\ncount = true", "workers.count: expected an integer from 1 to "
         "1024, got true"),
        (MINIMAL + "[workers]\ncount = 2.0", "workers.count: expected an integer from 1 to "
         "1024, got 2.0"),
        (MINIMAL + "[workers]\ncount = 0", "workers.count: expected an integer from 1 to 1024, "
         "got 0"),
        (MINIMAL + "[workers]\ncount = 1025", "workers.count: expected an integer from 1 to "
         "1024, got 1025"),
        (MINIMAL + "[workers]\ncount = 100000000000000000000", "workers.count: expected an "
         "integer from 1 to 1024, got 100000000000000000000"),
        (MINIMAL + "[workers]\nmax_requests_jitter = -1", "workers.max_requests_jitter: "
         "expected an integer >= 0, got -1"),
        (MINIMAL + "[relay]\nport = 0", "relay.port: expected an integer from 1 to 65535, "
         "got 0"),
        (MINIMAL + "[relay]\nport = 65536", "relay.port: expected an integer from 1 to 65535, "
         "got 65536"),
        (MINIMAL + "[metrics]\nport = -1", "metrics.port: expected an integer from 0 to 65535, "
         "got -1"),
        (MINIMAL + "[limits]\nmax_rss = 'lots'", 'limits.max_rss: expected a size such as '
         '"512MiB", got "lots"'),
        (MINIMAL + "[limits]\nmax_rss = 1.5", 'limits.max_rss: expected a size such as '
         '"512MiB", got 1.5'),
        (MINIMAL + "[limits]\nmax_private = '1 gigabyte'", 'limits.max_private: expected a '
         'size such as "512MiB", got "1 gigabyte"'),
        (MINIMAL + "[limits]\nmax_private = -1", 'limits.max_private: expected a size such '
         'as "512MiB", got -1'),
        (MINIMAL + "[workers]\ngc_freeze = 1", "workers.gc_freeze: expected true or false, "
         "got 1"),
        (MINIMAL + "[workers]\ngc_freeze = 'yes'", "workers.gc_freeze: expected true or false, "
         'got "yes"'),
        (MINIMAL + "[limits]\nmax_rss_kill_factor = 0.5", "limits.max_rss_kill_factor: "
         "expected a number from 1 to 1000 such as 1.5, got 0.5"),
        (MINIMAL + "[limits]\nmax_rss_kill_factor = '2x'", "limits.max_rss_kill_factor: "
         'expected a number from 1 to 1000 such as 1.5, got "2x"'),
        (MINIMAL + "[workers]\nboot_timeout = 0", 'workers.boot_timeout: expected a '
         'duration above 0 such as "60s", got 0'),
        (MINIMAL + "[limits]\nrequest_memory = 0", 'limits.request_memory: expected a size '
         'above 0 such as "64MiB", got 0'),
        (MINIMAL + "[limits]\nrequest_threads = 0", "limits.request_threads: expected an "
         "integer from 1 to 1024, got 0"),
        (MINIMAL + "[limits]\nbroadcast_threads = 5000", "limits.broadcast_threads: expected "
         "an integer from 1 to 1024, got 5000"),
        (MINIMAL + "[[topics]]\nname = 'a'\nevent_threads = 99999", "topics[0].event_threads: "
         "expected an integer from 1 to 1024, got 99999"),
        (MINIMAL + "[workers]\ntimeout_grace = 'soon'", 'workers.timeout_grace: expected a '
         'duration such as "30s", got "soon"'),
        (MINIMAL + "[relay]\nconnect_timeout = -1", 'relay.connect_timeout: expected a '
         'duration such as "30s", got -1'),
        (MINIMAL + "[relay]\nconnect_timeout = nan", 'relay.connect_timeout: expected a '
         'duration such as "30s", got nan'),
        (MINIMAL + "[relay]\nmetrics_port = 70000", "relay.metrics_port: expected an integer "
         "from 0 to 65535, got 70000"),
        (MINIMAL + "[relay]\nmetrics_port = '9188'", "relay.metrics_port: expected an integer "
         'from 0 to 65535, got "9188"'),
        (MINIMAL + "[relay]\nport = 9188\nmetrics_port = 9188", "relay.metrics_port: 9188 is "
         "relay.port too"),
        (MINIMAL + "[relay]\nmetrics_port = 9188\n[metrics]\nport = 9188", "relay.metrics_port: "
         "9188 is metrics.port too"),
        (MINIMAL + "[workers]\nbroadcast = 'some'", 'workers.broadcast: expected "all" or '
         '"one", got "some"'),
        (MINIMAL + "[[topics]]\nname = 'a'\ndeliver = 'every'", 'topics[0].deliver: '
         'expected "all" or "one", got "every"'),
        (MINIMAL + "[[topics]]\nname = 'a'\n[[topics]]\nname = 'b'\n[[topics]]\nname = 'a'",
         'topics[2].name: duplicate topic "a"'),
        (MINIMAL + "[[topics]]\nname = ''", 'topics[0].name: expected a non-empty string, '
         'got ""'),
        (MINIMAL + "[logging]\nlevel = 'verbose'", 'logging.level: expected "debug" or "info" '
         'or "warning" or "error", got "verbose"'),
        (MINIMAL + "[control]\nsocket = 1979-05-27", "control.socket: expected a string, got "
         "a date"),
        ('[service]\ncluster = ""\nhandler = "a:B"', 'service.cluster: expected a non-empty '
         'string, got ""'),
        ('[service]\ncluster = "a\\u0000b"\nhandler = "a:B"', 'service.cluster: expected a '
         'name without control characters (NUL, tab, newline...), got "a\\u0000b"'),
        (MINIMAL + "[[topics]]\nname = 'a\tb'", 'topics[0].name: expected a name without '
         'control characters (NUL, tab, newline...), got "a\\tb"'),
        (MINIMAL + f"[control]\nsocket = '/run/{'s' * 100}.sock'", f"control.socket: /run/"
         f"{'s' * 100}.sock is 110 bytes long; a unix socket path has at most 107"),
        (MINIMAL + "path = '.'", 'service.path: expected an array of strings such as ["."], '
         'got "."'),
        (MINIMAL + "path = [1]", 'service.path: expected an array of strings such as ["."], '
         "got an array"),
    ],
)  # fmt: skip
def test_invalid_values(in_tmp, text, message):
    assert str(load_error(text)) == f"service.toml: {message}"


@pytest.mark.parametrize(
    "handler", ["primes", "primes:", ":PrimeHandler", "pri mes:X", "a:B.", "a..b:C", "a:1B"]
)
def test_malformed_handler_spec(in_tmp, handler):
    error = load_error(f'[service]\ncluster = "c"\nhandler = "{handler}"')

    assert error.key == "service.handler"
    assert error.problem == (
        f'expected "module:attribute" such as "primes:PrimeHandler", got "{handler}"'
    )


def test_dotted_handler_spec_is_accepted(in_tmp):
    config = load_config(write(in_tmp, '[service]\ncluster = "c"\nhandler = "pkg.mod:Out.In"'))

    assert config.service.handler == "pkg.mod:Out.In"


def test_toml_syntax_error_names_file_and_line(in_tmp):
    error = load_error('[service]\ncluster = "primes"\nhandler = \n')

    assert error.key is None
    assert str(error) == "service.toml: invalid TOML: Invalid value (at line 3, column 11)"


def test_missing_file(in_tmp):
    with pytest.raises(ConfigError) as info:
        load_config("absent.toml")

    assert str(info.value) == "absent.toml: cannot read: No such file or directory"
    assert info.value.file == Path("absent.toml")


def test_file_that_is_not_utf8(in_tmp):
    (in_tmp / "service.toml").write_bytes(b'[service]\ncluster = "\xff"\n')

    with pytest.raises(ConfigError, match=r"^service.toml: invalid TOML: not UTF-8 \(at line 2\)$"):
        load_config("service.toml")


def test_a_fifo_is_refused_without_waiting_for_a_writer(in_tmp):
    os.mkfifo(in_tmp / "service.toml")

    assert str(load_error_of("service.toml")) == (
        "service.toml: not a regular file (a FIFO, device or directory?)"
    )


def test_a_device_is_refused():
    assert str(load_error_of("/dev/zero")) == (
        "/dev/zero: not a regular file (a FIFO, device or directory?)"
    )


def test_a_file_over_a_mebibyte_is_refused(in_tmp):
    write(in_tmp, MINIMAL + "#" * 2**20)

    assert str(load_error_of("service.toml")) == "service.toml: too large for a config (over 1 MiB)"


# --- sizes and durations -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [
        (0, 0),
        (4096, 4096),
        ("512B", 512),
        ("100KiB", 100 * 1024),
        ("64MiB", 64 * MiB),
        ("1GiB", 2**30),
        ("2TiB", 2 * 2**40),
        ("10KB", 10_000),
        ("10MB", 10_000_000),
        ("3GB", 3 * 10**9),
        ("1TB", 10**12),
        ("1.5KiB", 1536),
        (" 8 MiB ", 8 * MiB),
    ],
)
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize(
    "text", ["lots", "", "512", "512M", "512mib", "-1KiB", "0.5B", "1e3KB", -1, 1.0, True, None]
)
def test_parse_size_rejects(text):
    with pytest.raises(ValueError, match=r'^expected a size such as "512MiB", got '):
        parse_size(text)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        (0, 0.0),
        (30, 30.0),
        (2.5, 2.5),
        ("30s", 30.0),
        ("500ms", 0.5),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("1.5s", 1.5),
        (" 10 s ", 10.0),
    ],
)
def test_parse_duration(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text",
    ["soon", "", "30", "30S", "1d", "-1s", -1, float("inf"), float("nan"), 10**400, True, []],
)
def test_parse_duration_rejects(text):
    with pytest.raises(ValueError, match=r'^expected a duration such as "30s", got '):
        parse_duration(text)


@given(st.integers(min_value=0, max_value=10**6), st.sampled_from(["B", "KB", "MiB", "TiB"]))
def test_parse_size_scales_by_unit(number, unit):
    factor = {"B": 1, "KB": 1000, "MiB": MiB, "TiB": 2**40}[unit]

    assert parse_size(f"{number}{unit}") == number * factor


# --- paths ---------------------------------------------------------------------------------


def test_import_paths_are_relative_to_the_config_directory(in_tmp, monkeypatch):
    text = MINIMAL + 'path = [".", "lib", "../common", "/opt/handlers"]\n'
    config_file = write(in_tmp / "app", text)
    (in_tmp / "elsewhere").mkdir()
    monkeypatch.chdir(in_tmp / "elsewhere")

    config = load_config(os.path.relpath(config_file))

    assert config.file == config_file
    assert config.service.path == (
        in_tmp / "app",
        in_tmp / "app" / "lib",
        in_tmp / "common",
        Path("/opt/handlers"),
    )


@pytest.mark.parametrize(
    ("runtime_directory", "directory"),
    [
        (None, f"/tmp/irishost-{os.getuid()}"),
        ("/run/irishost", "/run/irishost"),
        ("/run/first:/run/second", "/run/first"),
    ],
)
def test_control_socket_default(in_tmp, monkeypatch, runtime_directory, directory):
    if runtime_directory is not None:
        monkeypatch.setenv("RUNTIME_DIRECTORY", runtime_directory)

    socket = load_config(write(in_tmp, MINIMAL, name="primes.toml")).control.socket

    assert socket.parent == Path(directory)
    assert re.fullmatch(r"primes-[0-9a-f]{12}\.sock", socket.name), socket.name


def test_control_socket_default_tells_configs_of_the_same_name_apart(in_tmp):
    """Two hosts of /srv/a/service.toml and /srv/b/service.toml share /tmp/irishost-<uid>."""
    first = load_config(write(in_tmp / "a", MINIMAL)).control.socket
    second = load_config(write(in_tmp / "b", MINIMAL)).control.socket
    (in_tmp / "link").symlink_to(in_tmp / "a")

    assert first != second
    assert first.parent == second.parent
    # `irishost status` finds the host however the operator spells the config's path.
    assert load_config("a/service.toml").control.socket == first
    assert load_config(in_tmp / "link" / "service.toml").control.socket == first


@pytest.mark.parametrize(
    ("configured", "socket"), [("ctl.sock", "conf/ctl.sock"), ("/run/x.sock", "/run/x.sock")]
)
def test_control_socket_configured(in_tmp, monkeypatch, configured, socket):
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/ignored")

    config = load_config(write(in_tmp / "conf", MINIMAL + f'[control]\nsocket = "{configured}"'))

    assert config.control.socket == in_tmp / socket


# --- command-line overrides ----------------------------------------------------------------


def test_overrides(in_tmp):
    config = load_config(write(in_tmp, MINIMAL))

    changed = config.with_overrides(workers=7, log_level="debug")

    assert changed.workers.count == 7
    assert changed.logging.level == "debug"
    assert changed.workers.preload == config.workers.preload
    assert config.workers.count == (os.cpu_count() or 1)  # the original is untouched
    assert config.with_overrides(workers=None, log_level=None) == config


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"workers": 0}, "--workers: expected an integer from 1 to 1024, got 0"),
        ({"workers": 100000}, "--workers: expected an integer from 1 to 1024, got 100000"),
        (
            {"log_level": "loud"},
            '--log-level: expected "debug" or "info" or "warning" or "error", got "loud"',
        ),
    ],
)
def test_invalid_overrides(in_tmp, overrides, message):
    config = load_config(write(in_tmp, MINIMAL))

    with pytest.raises(ConfigError) as info:
        config.with_overrides(**overrides)

    assert str(info.value) == f"{in_tmp / 'service.toml'}: {message}"


# --- robustness ----------------------------------------------------------------------------
# Whatever the file holds, the operator must get a ConfigError line, never a traceback.

FULL_DOCUMENT = tomllib.loads(FULL)
FULL_TABLES = [table for name, table in FULL_DOCUMENT.items() if name != "topics"]
FULL_KEYS = sorted({key for table in [*FULL_TABLES, *FULL_DOCUMENT["topics"]] for key in table})

plausible = st.sampled_from(
    ["primes", "primes:PrimeHandler", "a:B.C", ".", "", "all", "one", "info", "512MiB", "0.5B",
     "1.5KiB", "30s", "500ms", "-1s", "9" * 400 + "s", "9" * 400 + "TiB", 0, 1, -1, 65536, 2**70,
     True, 1.5, float("inf"), float("nan"), ["."], [1]]
)  # fmt: skip
anything = st.recursive(
    st.one_of(
        st.booleans(),
        st.integers(),
        st.floats(),
        st.text(max_size=12),
        st.datetimes(),
        st.dates(),
        st.times(),
    ),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=6,
)
values = plausible | anything


@st.composite
def documents(draw) -> dict:
    """The full config with random keys left out, then up to three random changes.

    Starting from a valid document lets the changes reach every check, not just
    the first one a purely random document would trip.
    """
    keep = st.integers(0, 3).map(bool)  # keep 3 keys in 4
    document = {
        name: [{**topic} for topic in table if draw(keep)]
        if name == "topics"
        else {key: value for key, value in table.items() if draw(keep)}
        for name, table in FULL_DOCUMENT.items()
    }
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from([*FULL_DOCUMENT]) | st.text(max_size=6))
        key = draw(st.none() | st.sampled_from(FULL_KEYS) | st.text(max_size=6))
        value = draw(values)
        table = document.get(name)
        if isinstance(table, list) and table:
            table = table[0]
        if key is not None and isinstance(table, dict):
            table[key] = value
        else:
            document[name] = value
    return document


ROBUSTNESS = settings(
    max_examples=300,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def load_or_config_error(path: Path) -> None:
    with contextlib.suppress(ConfigError):
        assert isinstance(load_config(path), Config)


@ROBUSTNESS
@given(documents())
def test_random_documents_load_or_raise_config_error(tmp_path, document):
    text = "\n".join(f"{to_toml(key)} = {to_toml(value)}" for key, value in document.items())
    load_or_config_error(write(tmp_path, text))


@ROBUSTNESS
@given(st.text())
def test_random_text_loads_or_raises_config_error(tmp_path, text):
    load_or_config_error(write(tmp_path, text))


SETTINGS = """
[settings]
limit = 1_000
prefix = "n="
ratio = 0.5
verbose = true
names = ["a", "b"]
"odd key" = 1
database = { host = "db", port = 5432 }
"""


def test_settings_keep_any_toml_values(in_tmp):
    config = load_config(write(in_tmp, MINIMAL + SETTINGS))

    assert config.settings == {
        "limit": 1000,
        "prefix": "n=",
        "ratio": 0.5,
        "verbose": True,
        "names": ["a", "b"],
        "odd key": 1,
        "database": {"host": "db", "port": 5432},
    }
    assert load_config(write(in_tmp, MINIMAL)).settings == {}


OUT_OF_RANGE = "is out of range: settings carry integers from -2**63 to 2**64-1"


@pytest.mark.parametrize(
    ("settings", "key", "value"),
    [
        ("big = 1180591620717411303424", "settings.big", 2**70),
        ("big = 18446744073709551616", "settings.big", 2**64),
        ("small = -9223372036854775809", "settings.small", -(2**63) - 1),
        ("[settings.table]\nok = 1\nkey = 0x10000000000000000", "settings.table.key", 2**64),
        ("list = [1, [2, 36893488147419103232]]", "settings.list[1][1]", 2**65),
        ("rows = [{ n = 1 }, { n = -36893488147419103232 }]", "settings.rows[1].n", -(2**65)),
    ],
)
def test_a_settings_integer_msgpack_cannot_carry_is_a_config_error(in_tmp, settings, key, value):
    """The config crosses to the fork server as msgpack at every reload: such an
    integer passed --check, then ended the host with OverflowError on SIGHUP."""
    text = MINIMAL + ("" if settings.startswith("[") else "[settings]\n") + settings + "\n"

    error = load_error(text)

    assert str(error) == f"service.toml: {key}: integer {value} {OUT_OF_RANGE}"


def test_settings_integers_at_the_ends_of_msgpacks_range_cross_unchanged(in_tmp):
    ends = {"low": -(2**63), "high": 2**64 - 1, "nested": [{"high": 2**64 - 1}]}
    lines = "".join(f"{key} = {to_toml(value)}\n" for key, value in ends.items())
    config = load_config(write(in_tmp, MINIMAL + "[settings]\n" + lines))

    crossed = Config.from_plain(msgpack.unpackb(msgpack.packb(config.to_plain()), raw=False))

    assert crossed.settings == ends


def test_a_400_kb_string_setting_crosses_to_the_fork_server_unchanged(in_tmp):
    """Any size crosses (the fork server's transport is a stream, not one datagram)."""
    big = "0123456789abcdef" * 25_000
    config = load_config(write(in_tmp, MINIMAL + f"[settings]\nbig = {to_toml(big)}\n"))

    crossed = Config.from_plain(msgpack.unpackb(msgpack.packb(config.to_plain()), raw=False))

    assert crossed.settings == {"big": big} and crossed == config


def test_access_log_is_off_by_default_and_survives_a_log_level_flag(in_tmp):
    assert load_config(write(in_tmp, MINIMAL)).logging.access is False

    config = load_config(write(in_tmp, MINIMAL + "[logging]\naccess = true"))

    assert config.with_overrides(log_level="debug").logging == LoggingSection("debug", True)


def test_a_config_crosses_to_the_fork_server_as_plain_values_unchanged(in_tmp):
    """The fork server gets a reload's config over msgpack (no pickle), its
    [settings] too, TOML's dates and times included: the handlers it forks
    are made with them."""
    times = "day = 2026-11-29\nat = 07:32:00\nlocal = 1979-05-27T07:32:00\n"
    times += "zoned = 1979-05-27T07:32:00-07:00\n"
    with_settings = write(in_tmp, MINIMAL + SETTINGS + times)
    for path in [*sorted(CONFIGS.glob("*.toml")), with_settings]:
        config = load_config(path).with_overrides(workers=3)
        plain = msgpack.unpackb(msgpack.packb(config.to_plain()), raw=False)
        crossed = Config.from_plain(plain)
        assert crossed == config
    assert crossed.settings["database"] == {"host": "db", "port": 5432}
    assert crossed.settings["day"] == datetime.date(2026, 11, 29)
    assert crossed.settings["at"] == datetime.time(7, 32)
    assert type(crossed.settings["local"]) is datetime.datetime
    assert crossed.settings["zoned"].utcoffset() == datetime.timedelta(hours=-7)
    # Text that only looks like a date stays text.
    text = write(in_tmp, MINIMAL + '[settings]\nday = "2026-11-29"\nlist = [[1979-05-27]]\n')
    config = load_config(text)
    crossed = Config.from_plain(msgpack.unpackb(msgpack.packb(config.to_plain()), raw=False))
    assert crossed.settings == {"day": "2026-11-29", "list": [[datetime.date(1979, 5, 27)]]}


def test_log_file_is_made_absolute_against_the_configs_directory(in_tmp):
    (in_tmp / "conf" / "logs").mkdir(parents=True)
    config = load_config(write(in_tmp / "conf", MINIMAL + '[logging]\nfile = "logs/host.log"'))

    assert config.logging.file == in_tmp / "conf" / "logs" / "host.log"
    plain = msgpack.unpackb(msgpack.packb(config.to_plain()), raw=False)
    assert Config.from_plain(plain) == config  # the fork server gets it too
    assert load_config(write(in_tmp, MINIMAL)).logging.file is None  # stderr


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ('"missing/host.log"', r"/missing: no such directory"),
        ('"."', r" is a directory; expected a file to append to"),
        ("true", r"expected a string, got true"),
        ('"a\\u0000b"', r"expected a path, got "),
    ],
)
def test_log_file_errors_name_the_key_and_the_problem(in_tmp, value, problem):
    err = load_error(MINIMAL + f"[logging]\nfile = {value}")

    assert err.key == "logging.file"
    assert re.search(problem, str(err)), str(err)
    assert str(err).startswith("service.toml: logging.file: ")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_log_file_in_a_directory_this_user_cannot_write_is_refused(in_tmp):
    locked = in_tmp / "locked"
    locked.mkdir(mode=0o500)

    err = load_error(MINIMAL + '[logging]\nfile = "locked/host.log"')

    assert "not writable by this user" in str(err)
