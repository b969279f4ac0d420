"""Tests for irishost.wire.ring on real shared memory and real forked processes."""

from __future__ import annotations

import array
import multiprocessing
import os
import random
import re
import select
import signal
import stat
import threading
import time
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ring_stress import SOUND_HERE

from irishost.wire import ring as ring_module
from irishost.wire.ordering import Ordering
from irishost.wire.ring import Ring, remove_stale_segments, segment_prefix, wait_readable

CTX = multiprocessing.get_context("fork")
SHM = "/dev/shm"


@pytest.fixture
def prefix() -> str:
    return f"ringtest-{uuid.uuid4().hex[:12]}"


@pytest.fixture(params=SOUND_HERE, ids=lambda ordering: ordering.value)
def make_ring(prefix, request):
    """Rings of each discipline sound here (irishost.wire.ordering): every
    test that makes its rings with this runs once per discipline."""
    rings = []

    def make(capacity: int = 64 * 1024) -> Ring:
        ring = Ring.create(capacity, prefix=prefix, ordering=request.param)
        rings.append(ring)
        return ring

    yield make
    for ring in rings:
        ring.close()


@pytest.fixture
def spawn():
    """Start forked children; whatever is still alive at teardown is killed."""
    children = []

    def start(target, *args) -> multiprocessing.Process:
        child = CTX.Process(target=target, args=args, daemon=True)
        child.start()
        children.append(child)
        return child

    yield start
    for child in children:
        if child.is_alive():
            child.kill()
        child.join(5)


def join_ok(child: multiprocessing.Process, timeout: float = 10.0) -> None:
    child.join(timeout)
    assert not child.is_alive(), "child did not finish"
    assert child.exitcode == 0, f"child failed with exit code {child.exitcode}"


def pattern(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def shm_entries(prefix: str) -> list[str]:
    return [name for name in os.listdir(SHM) if name.startswith(prefix)]


# ------------------------------------------------------------ frame format


def test_frames_of_boundary_sizes_round_trip(make_ring):
    ring = make_ring(1024)
    largest_single = 1024 // 2 - 8
    sizes = [0, 1, 3, 4, 5, 7, 8, 9, 100, largest_single - 1, largest_single]
    sizes += [largest_single + 1]  # the smallest frame that is fragmented
    for size in sizes:
        frame = pattern(size, size)
        ring.put(frame, timeout=1)
        assert ring.get(timeout=1) == frame, size
    assert ring.get_nowait() is None


def test_records_wrap_around_the_buffer_many_times(make_ring):
    ring = make_ring(256)
    produced = consumed = 0
    # Odd sizes put record boundaries and payloads at every offset, so many
    # records straddle the end of the buffer.
    for round_ in range(3000):
        batch = [pattern(produced + i, (produced + i) * 7 % 61) for i in range(round_ % 3 + 1)]
        for frame in batch:
            ring.put(frame, timeout=1)
        produced += len(batch)
        assert ring.drain() == batch
        consumed += len(batch)
    assert consumed == produced == 6000
    assert not ring.readable()


def test_accepts_bytearray_and_memoryview(make_ring):
    ring = make_ring()
    words = array.array("I", range(10))
    ring.put(bytearray(b"abc"))
    ring.put(memoryview(words))
    assert ring.drain() == [b"abc", words.tobytes()]


def test_drain_respects_max_frames(make_ring):
    ring = make_ring()
    for i in range(10):
        ring.put(bytes([i]))
    assert ring.drain(max_frames=4) == [bytes([i]) for i in range(4)]
    assert ring.drain() == [bytes([i]) for i in range(4, 10)]
    assert ring.drain() == []


@settings(max_examples=60)
@given(st.lists(st.tuples(st.integers(0, 300), st.booleans()), max_size=80))
def test_any_put_and_drain_interleaving_keeps_frames_intact(steps):
    ring = Ring.create(512, prefix=f"ringtest-hyp-{os.getpid()}")
    try:
        sent, received = [], []
        for index, (size, drain_now) in enumerate(steps):
            frame = pattern(index, size)
            try:
                ring.put(frame, timeout=0)
            except TimeoutError:
                received += ring.drain()
                ring.put(frame, timeout=0)
            sent.append(frame)
            if drain_now:
                received += ring.drain()
        received += ring.drain()
        assert received == sent
    finally:
        ring.close()


# ------------------------------------------------------- across processes


def _put_all(ring: Ring, frames: list[bytes]) -> None:
    for frame in frames:
        ring.put(frame, timeout=10)


def test_frame_larger_than_capacity_across_fork(make_ring, spawn):
    ring = make_ring(1024 * 1024)
    big = pattern(1, 5 * 1024 * 1024 + 3)
    child = spawn(_put_all, ring, [big, b"next", big[:1000]])
    assert ring.get(timeout=10) == big
    assert ring.get(timeout=10) == b"next"
    assert ring.get(timeout=10) == big[:1000]
    join_ok(child)


def _put_numbered(ring: Ring, count: int) -> None:
    for i in range(count):
        ring.put(i.to_bytes(4, "little") * (i % 16), timeout=10)


def test_100k_frames_arrive_in_order_and_intact(make_ring, spawn):
    ring = make_ring(64 * 1024)
    count = 100_000
    child = spawn(_put_numbered, ring, count)
    expected = 0
    deadline = time.monotonic() + 20
    while expected < count and time.monotonic() < deadline:
        batch = ring.drain()
        if not batch:
            frame = ring.get(timeout=1)
            batch = [] if frame is None else [frame]
        for frame in batch:
            assert frame == expected.to_bytes(4, "little") * (expected % 16)
            expected += 1
    assert expected == count
    join_ok(child)


def _echo(requests: Ring, replies: Ring) -> None:
    while (frame := requests.get(timeout=10)) != b"stop":
        replies.put(frame[::-1], timeout=10)


def test_ping_pong_with_a_ring_pair(make_ring, spawn):
    requests, replies = make_ring(), make_ring()
    child = spawn(_echo, requests, replies)
    for i in range(2000):
        requests.put(b"ping %d" % i)
        assert replies.get(timeout=5) == (b"ping %d" % i)[::-1]
    requests.put(b"stop")
    join_ok(child)


def _echo_asleep(requests: Ring, replies: Ring) -> None:
    while (frame := requests.get(timeout=10, spin=False)) != b"stop":
        replies.put(frame, timeout=10)


def test_readers_that_sleep_at_once_miss_no_wakeup(make_ring, spawn):
    """Both readers sleep on their eventfd for every frame, and bursts of one
    to three frames land while a reader is being woken. A wake-up lost (the
    TSO publisher lowers the reader's flag as it signals; the reader raises
    it again before each sleep) would cost a whole SLEEP_SLICE_SECONDS."""
    requests, replies = make_ring(), make_ring()
    child = spawn(_echo_asleep, requests, replies)
    slowest = 0.0
    for i in range(2000):
        burst = [b"%d.%d" % (i, j) for j in range(1 + i % 3)]
        start = time.monotonic()
        for frame in burst:
            requests.put(frame)
        assert [replies.get(timeout=5, spin=False) for _ in burst] == burst
        slowest = max(slowest, time.monotonic() - start)
    requests.put(b"stop")
    join_ok(child)
    assert slowest < ring_module.SLEEP_SLICE_SECONDS / 2


# ---------------------------------------------------------------- timeouts


def test_get_times_out_with_none(make_ring):
    ring = make_ring()
    start = time.monotonic()
    assert ring.get(timeout=0.2) is None
    assert 0.2 <= time.monotonic() - start < 0.4
    assert ring.get(timeout=0) is None


def test_put_times_out_when_full_and_ring_stays_usable(make_ring):
    ring = make_ring(1024)
    frames = []
    with pytest.raises(TimeoutError):
        while True:
            frame = pattern(len(frames), 100)
            ring.put(frame, timeout=0.05)
            frames.append(frame)
    assert len(frames) == (1024 - 8) // 104
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        ring.put(b"x" * 100, timeout=0.1)
    assert 0.1 <= time.monotonic() - start < 0.3
    assert ring.drain() == frames
    ring.put(b"after", timeout=0)
    assert ring.get_nowait() == b"after"


def test_put_batch_publishes_once_and_says_how_many_fit(make_ring, monkeypatch):
    ring = make_ring(1024)
    published = []
    publish = ring._publish
    monkeypatch.setattr(ring, "_publish", lambda tail: published.append(tail) or publish(tail))
    batch = [pattern(i, 100) for i in range(12)]  # room for 9 of 104 bytes each
    assert ring.put_batch(batch[:3], timeout=0) == 3
    assert len(published) == 1 and ring.drain() == batch[:3]
    assert ring.put_batch(batch, timeout=0.05) == (1024 - 8) // 104
    assert ring.drain() == batch[: (1024 - 8) // 104]
    big = pattern(99, 600)  # over half the ring: fragmented, through put()
    assert ring.put_batch([batch[0], big, batch[1]], timeout=1.0) == 3
    assert ring.drain() == [batch[0], big, batch[1]]


def test_fragmented_put_that_times_out_is_dropped_by_the_reader(make_ring):
    ring = make_ring(1024)
    ring.put(b"before")
    with pytest.raises(TimeoutError):
        ring.put(pattern(2, 3000), timeout=0.05)  # first fragment fits, the second not
    assert ring.drain() == [b"before"]
    assert not ring.readable()
    ring.put(b"after")
    assert ring.get(timeout=1) == b"after"


def test_reader_drops_partial_frame_collected_before_abort(make_ring):
    ring = make_ring(1024)
    outcome = []

    def writer() -> None:
        try:
            ring.put(pattern(3, 10_000), timeout=0.3)
        except TimeoutError:
            outcome.append("timed out")
        ring.put(b"after", timeout=5)

    thread = threading.Thread(target=writer)
    thread.start()
    # Take the first fragments, then stop reading so the writer times out
    # while this reader holds a partial frame.
    deadline = time.monotonic() + 5
    while not ring._fragments and time.monotonic() < deadline:
        assert ring.drain() == []
    assert ring._fragments
    thread.join(5)
    assert outcome == ["timed out"]
    assert ring.get(timeout=1) == b"after"
    assert not ring._fragments


# -------------------------------------------------------- waiting on many


def _put_later(ring: Ring, delay: float, frame: bytes) -> None:
    time.sleep(delay)
    ring.put(frame, timeout=5)


def test_wait_readable_returns_the_rings_with_data(make_ring, spawn):
    rings = [make_ring() for _ in range(4)]
    start = time.monotonic()
    assert wait_readable(rings, timeout=0.1) == []
    assert 0.1 <= time.monotonic() - start < 0.3

    child = spawn(_put_later, rings[2], 0.1, b"hello")
    assert wait_readable(rings, timeout=5) == [rings[2]]
    assert rings[2].get_nowait() == b"hello"
    join_ok(child)

    rings[0].put(b"a")
    rings[3].put(b"b")
    assert wait_readable(rings, timeout=0) == [rings[0], rings[3]]


def test_data_fd_can_be_polled_with_other_descriptors(make_ring, spawn):
    ring = make_ring()
    other_r, other_w = os.pipe()
    try:
        poller = select.poll()
        poller.register(ring.data_fd, select.POLLIN)
        poller.register(other_r, select.POLLIN)
        ring.arm()
        assert not ring.readable()
        child = spawn(_put_later, ring, 0.05, b"wake")
        events = poller.poll(5000)
        ring.disarm()
        assert [fd for fd, _ in events] == [ring.data_fd]
        assert ring.get_nowait() == b"wake"
        join_ok(child)
    finally:
        os.close(other_r)
        os.close(other_w)


def _put_without_wakeup(ring: Ring, frame: bytes) -> None:
    os.eventfd_write = lambda fd, value: None  # this forked child only
    time.sleep(0.1)
    ring.put(frame)


@pytest.mark.skipif(Ordering.TSO not in SOUND_HERE, reason="the fast path is not used here")
def test_a_lost_wakeup_only_delays_the_reader(prefix, spawn):
    """TSO: the eventfd only wakes, the tail publishes. (Under KERNEL a write
    to the eventfd that never happens is a publication that never happens.)"""
    ring = Ring.create(64 * 1024, prefix=prefix, ordering=Ordering.TSO)
    try:
        child = spawn(_put_without_wakeup, ring, b"late")
        start = time.monotonic()
        assert ring.get(timeout=5) == b"late"
        assert time.monotonic() - start < 0.1 + ring_module.SLEEP_SLICE_SECONDS + 0.1
        join_ok(child)
    finally:
        ring.close()


# ------------------------------------------------------------- dying peers


def _die_soon() -> None:
    time.sleep(0.05)
    os._exit(0)


def test_reader_is_not_stuck_when_the_writer_dies(make_ring, spawn):
    ring = make_ring()
    child = spawn(_die_soon)
    start = time.monotonic()
    assert ring.get(timeout=0.5) is None
    assert time.monotonic() - start < 1.0
    child.join(5)


def _die_in_the_middle_of_a_frame(ring: Ring) -> None:
    # With nobody reading, the put stops after the first fragments.
    threading.Thread(target=ring.put, args=(b"x" * 100_000,), daemon=True).start()
    time.sleep(0.1)
    os._exit(0)


def test_half_a_frame_from_a_dead_writer_is_never_returned(make_ring, spawn):
    ring = make_ring(4096)
    child = spawn(_die_in_the_middle_of_a_frame, ring)
    child.join(5)
    assert ring.readable()
    start = time.monotonic()
    assert ring.get(timeout=0.3) is None
    assert time.monotonic() - start < 0.6
    assert ring._fragments, "the reader holds the fragments that did arrive"


def test_writer_is_not_stuck_when_the_reader_dies(make_ring, spawn):
    ring = make_ring(1024)
    child = spawn(_die_soon)
    with pytest.raises(TimeoutError):
        for _ in range(100):
            ring.put(b"y" * 100, timeout=0.3)
    child.join(5)


# ------------------------------------------------------------------ idling


def test_idle_get_uses_almost_no_cpu(make_ring):
    ring = make_ring()
    cpu = time.process_time()
    assert ring.get(timeout=1.0) is None
    assert time.process_time() - cpu < 0.05


def test_idle_wait_readable_uses_almost_no_cpu(make_ring):
    rings = [make_ring() for _ in range(8)]
    cpu = time.process_time()
    assert wait_readable(rings, timeout=0.5) == []
    assert time.process_time() - cpu < 0.025


# ----------------------------------------------------------- shm segments


def test_segment_is_private_and_unlinked_at_once(prefix, monkeypatch):
    modes = {}
    real_unlink = os.unlink

    def spying_unlink(path, *args, **kwargs):
        modes[path] = stat.S_IMODE(os.stat(path).st_mode)
        real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", spying_unlink)
    ring = Ring.create(4096, prefix=prefix)
    monkeypatch.undo()
    try:
        assert list(modes.values()) == [0o600]
        assert all(os.path.basename(path).startswith(prefix) for path in modes)
        assert shm_entries(prefix) == []
        ring.put(b"still works")
        assert ring.get_nowait() == b"still works"
    finally:
        ring.close()


def _create_and_hang(prefix: str) -> None:
    ring = Ring.create(4096, prefix=prefix)
    ring.put(b"x")
    time.sleep(60)


def test_nothing_left_in_dev_shm_after_kill_9(prefix, spawn):
    child = spawn(_create_and_hang, prefix)
    time.sleep(0.2)
    os.kill(child.pid, signal.SIGKILL)
    child.join(5)
    assert shm_entries(prefix) == []


def _exit_at_once() -> None:
    os._exit(0)


def test_remove_stale_segments_removes_only_dead_creators(prefix, spawn):
    dead = spawn(_exit_at_once)
    dead.join(5)
    names = {
        "dead": f"{prefix}-{dead.pid}-00ff",
        "live": f"{prefix}-{os.getpid()}-00ff",
        "reused": f"{prefix}-{os.getpid()}-11ee",  # pid now held by a newer process
        "other": f"{prefix}x-{dead.pid}-00ff",  # a different prefix
    }
    try:
        for name in names.values():
            os.close(os.open(os.path.join(SHM, name), os.O_CREAT | os.O_WRONLY, 0o600))
        long_ago = time.time() - 3600
        os.utime(os.path.join(SHM, names["reused"]), (long_ago, long_ago))

        removed = remove_stale_segments(prefix)

        assert sorted(removed) == sorted([names["dead"], names["reused"]])
        assert sorted(shm_entries(prefix)) == sorted([names["live"], names["other"]])
    finally:
        for name in names.values():
            try:
                os.unlink(os.path.join(SHM, name))
            except FileNotFoundError:
                pass


@pytest.mark.parametrize(
    "cluster", ["billing/v2", "x" * 220, "é" * 300, "..", "a b\\c", "billing-v2"]
)
def test_segment_prefix_makes_a_usable_name_from_any_cluster(cluster):
    prefix = segment_prefix(cluster)
    ring = Ring.create(4096, prefix=prefix)  # raised ENAMETOOLONG or ENOENT for the raw name
    ring.close()
    longest = f"{prefix}-{2**22}-{'0' * 16}"  # pid_max, Ring.create's random part
    assert len(longest.encode()) <= 255
    assert re.fullmatch(r"irishost-[A-Za-z0-9_.-]+-[0-9a-f]{12}", prefix)


def test_segment_prefixes_of_different_clusters_differ():
    """billing/v2 and billing_v2 read the same once made filename-safe."""
    assert segment_prefix("billing/v2") != segment_prefix("billing_v2")
    assert segment_prefix("billing/v2") == segment_prefix("billing/v2")


def test_create_validates_its_arguments(prefix):
    with pytest.raises(ValueError):
        Ring.create(1001, prefix=prefix)
    with pytest.raises(ValueError):
        Ring.create(1024, prefix="a/b")


# --------------------------------------------------------------- lifecycle


def test_close_is_idempotent(prefix):
    ring = Ring.create(4096, prefix=prefix)
    ring.close()
    ring.close()


def test_header_fields_sit_on_their_own_cache_lines():
    offsets = [
        ring_module._HEAD * 8,
        ring_module._TAIL * 8,
        ring_module._READER_WAITING * 4,
        ring_module._WRITER_WAITING * 4,
    ]
    assert sorted({offset // 64 for offset in offsets}) == [0, 1, 2, 3]
