"""Hostile input at irishost's boundaries: the worker frame decoder and the
config loader. ``irishost.wire.frames.decode`` raises only FrameError;
``load_config`` only ConfigError.

test_config.py feeds the loader random documents and random text; the relay's
and the binding's sockets are fuzzed in relay/test_fuzz.py.
"""

from __future__ import annotations

import time

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from irishost.config import Config, ConfigError, load_config
from irishost.wire import frames

# ---------------------------------------------------------------------------
# The worker frame decoder.


def _frame_or_frame_error(data: bytes) -> None:
    try:
        frame = frames.decode(data)
    except frames.FrameError:
        return
    assert isinstance(frame, frames.Frame)
    assert type(frames.decode(frame.encode())) is type(frame)  # a frame, exactly as typed


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_random_bytes_decode_to_a_frame_or_frame_error(data):
    _frame_or_frame_error(data)


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=4) | st.integers(0, 9), inner, max_size=3)
    ),
    max_leaves=12,
)
REAL_FRAMES = [
    frames.Request(7, 12345.5, b"payload").encode(),
    frames.Reply(7, False, "fault text").encode(),
    frames.TunSend(3, b"data", 1.5).encode(),
    frames.Event("topic", b"event").encode(),
]


@st.composite
def mutated_frames(draw) -> bytes:
    """Real frames, or msgpack of any shape, with octets set, inserted or cut."""
    wire = bytearray(
        draw(st.sampled_from(REAL_FRAMES) | msgpack_values.map(msgpack.packb)) or b"\x90"
    )
    for _ in range(draw(st.integers(0, 4))):
        pos = draw(st.integers(0, max(0, len(wire) - 1)))
        octet = draw(st.integers(0, 255))
        action = draw(st.sampled_from(["set", "insert", "truncate"]))
        if action == "set" and wire:
            wire[pos] = octet
        elif action == "insert":
            wire.insert(pos, octet)
        else:
            del wire[pos:]
    return bytes(wire)


@settings(max_examples=300)
@given(mutated_frames())
def test_mutated_frames_decode_to_a_frame_or_frame_error(data):
    _frame_or_frame_error(data)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"\xdd\xff\xff\xff\xff", id="array of 2**32-1 items, none sent"),
        pytest.param(b"\xdf\xff\xff\xff\xff", id="map of 2**32-1 pairs, none sent"),
        pytest.param(b"\xdb\xff\xff\xff\xff", id="str of 4 GiB, none sent"),
        pytest.param(b"\xc6\xff\xff\xff\xff", id="bin of 4 GiB, none sent"),
        pytest.param(b"\xc9\xff\xff\xff\xff\x05", id="ext of 4 GiB, none sent"),
        pytest.param(b"\x91" * 100_000 + b"\x01", id="nested 100000 deep"),
        pytest.param(b"\xd6\xff\x00\x00", id="timestamp ext cut short"),
        pytest.param(b"\xc7\x03\xff\x00\x00\x00", id="timestamp ext of a bad length"),
        pytest.param(b"\x92\x01\xc1", id="reserved octet 0xc1"),
        pytest.param(b"\x81\x01\x02", id="map with an int key"),
        pytest.param(b"\x92\xc3\x01", id="kind is a bool"),
        pytest.param(b"\x92\x01\x02\x03", id="trailing bytes"),
        pytest.param(b"", id="empty"),
    ],
)
def test_hostile_frames(data):
    started = time.monotonic()
    _frame_or_frame_error(data)
    assert time.monotonic() - started < 1.0


# ---------------------------------------------------------------------------
# The config loader. test_config feeds it random documents and random text;
# here: random bytes, a valid file damaged octet by octet, input that
# tomllib itself trips over, and the command-line overrides.

VALID = b"""\
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
timeout_grace = "500ms"
shutdown_timeout = 12.5

[limits]
request_memory = "1GiB"
max_rss = "10MB"

[[topics]]
name = "news"
event_memory = "100KiB"
"""

CONFIG_FUZZ = settings(
    max_examples=150,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def load_or_config_error(path) -> Config | None:
    try:
        config = load_config(path)
    except ConfigError as err:
        assert str(err).startswith(f"{path}: ")
        return None
    assert isinstance(config, Config)
    return config


@CONFIG_FUZZ
@given(st.binary(max_size=400))
def test_random_bytes_load_or_raise_config_error(tmp_path, data):
    path = tmp_path / "service.toml"
    path.write_bytes(data)
    load_or_config_error(path)


@st.composite
def damaged(draw) -> bytes:
    wire = bytearray(VALID)
    for _ in range(draw(st.integers(1, 6))):
        pos = draw(st.integers(0, len(wire) - 1))
        octet = draw(st.sampled_from(b'"[]{}=.,#\n\\ 0129aeu\x00\xff') | st.integers(0, 255))
        action = draw(st.sampled_from(["set", "insert", "delete"]))
        if action == "set":
            wire[pos] = octet
        elif action == "insert":
            wire.insert(pos, octet)
        else:
            del wire[pos]
    return bytes(wire)


@CONFIG_FUZZ
@given(damaged())
def test_damaged_config_loads_or_raises_config_error(tmp_path, data):
    path = tmp_path / "service.toml"
    path.write_bytes(data)
    load_or_config_error(path)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        pytest.param("[" * 1000 + "]" * 1000, "nested too deeply", id="deep array"),
        pytest.param("{a = " * 1000 + "1" + "}" * 1000, "nested too deeply", id="deep table"),
        pytest.param("9" * 5000, "Exceeds the limit (4300 digits)", id="long integer"),
    ],
)
def test_what_tomllib_trips_over_is_a_config_error(tmp_path, text, problem):
    """tomllib raises RecursionError and plain ValueError for these, not its
    TOMLDecodeError; they used to escape as a traceback (and, on SIGHUP, end
    the running host)."""
    path = tmp_path / "service.toml"
    path.write_text(f'[service]\ncluster = "c"\nhandler = "m:H"\nx = {text}\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value).startswith(f"{path}: invalid TOML: {problem}")


@CONFIG_FUZZ
@given(
    st.none() | st.integers() | st.text(max_size=6) | st.floats() | st.booleans(),
    st.none() | st.text(max_size=8) | st.integers() | st.sampled_from(["debug", "error"]),
)
def test_random_overrides_apply_or_raise_config_error(tmp_path, workers, log_level):
    path = tmp_path / "service.toml"
    path.write_bytes(VALID)
    config = load_config(path)
    try:
        overridden = config.with_overrides(workers=workers, log_level=log_level)
    except ConfigError as err:
        assert str(err).startswith(f"{path}: --")
        return
    assert overridden.workers.count == (config.workers.count if workers is None else workers)
