"""Soak: a million requests through the whole stack, watching memory and descriptors.

Run as ``python bench/soak.py`` (``--requests`` 1,000,000 by default, and at
most ``--seconds``, 600 by default, whichever ends first; loopback only).

The stack: THREADS client threads in this process, each with its own
connection, send 100-byte requests back to back to an external relay
process (``python -m iris.relay``), which routes them to irishost with 2
workers (``relay.embedded = false``) running an echo handler; every reply is
checked against its request.

Every SAMPLE_EVERY requests it samples the resident memory (psutil) of the
relay, the supervisor and each worker, and the open descriptors of the relay
and the supervisor. It reports the growth per 100k requests after a warm-up
of WARM_UP requests (a least-squares slope over the later samples, so one
noisy sample does not decide it), and the descriptors before and after the
load (clients connected both times). Exit status 1 if a request failed or
got a wrong reply, or a descriptor count grew.
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import _util
import psutil

import iris
from irishost.wire.ring import segment_prefix

THREADS = 8
WORKERS = 2
TIMEOUT = 5.0
PAYLOAD_SIZE = 100
SAMPLE_EVERY = 100_000
WARM_UP = 200_000
MiB = 1 << 20

HANDLER_SOURCE = '''\
"""The handler of bench/soak.py, written here for one run."""

import iris


class EchoHandler(iris.ServiceHandler):
    def handle_request(self, request: bytes) -> bytes:
        return request
'''

CONFIG = """\
[service]
cluster = "{cluster}"
handler = "soak_handler:EchoHandler"
path = ["{directory}"]

[relay]
port = {port}
embedded = false

[workers]
count = {workers}

[limits]
request_threads = 2

[control]
socket = "{directory}/control.sock"

[logging]
level = "warning"
"""


class Sample:
    """What the processes hold after ``requests`` requests."""

    def __init__(self, requests: int, elapsed: float, relay: psutil.Process, host: psutil.Process):
        self.requests = requests
        self.elapsed = elapsed
        self.relay_rss = relay.memory_info().rss
        self.supervisor_rss = host.memory_info().rss
        # Workers are the children of the fork server, the host's only child.
        workers = sorted((w for c in host.children() for w in c.children()), key=lambda p: p.pid)
        self.worker_pids = [w.pid for w in workers]
        self.worker_rss = [w.memory_info().rss for w in workers]
        self.relay_fds = relay.num_fds()
        self.supervisor_fds = host.num_fds()
        self.relay_threads = relay.num_threads()
        self.supervisor_threads = host.num_threads()


class Soak:
    def __init__(self, total: int, seconds: float, threads: int):
        self.total = total
        self.seconds = seconds
        self.threads = threads
        self.issued = itertools.count()
        self.done = [0] * threads  # per client thread, so no lock is needed
        self.errors: list[str] = []
        self.stopping = threading.Event()

    def client(self, index: int, conn: iris.Connection, cluster: str) -> None:
        pad = b"." * PAYLOAD_SIZE
        while not self.stopping.is_set():
            number = next(self.issued)
            if number >= self.total:
                return
            payload = (b"%d|" % number + pad)[:PAYLOAD_SIZE]
            try:
                reply = conn.request(cluster, payload, TIMEOUT)
            except Exception as err:
                self.errors.append(f"request {number}: {err!r}")
                reply = None
            if reply is not None and reply != payload:
                self.errors.append(f"request {number}: wrong reply {reply[:30]!r}")
            self.done[index] += 1

    def completed(self) -> int:
        return sum(self.done)


def wait_serving(port: int, cluster: str, host: _util.Child) -> None:
    deadline = time.monotonic() + 30
    while True:
        if not host.alive() or time.monotonic() > deadline:
            raise RuntimeError(f"irishost did not start{host.stderr_tail()}")
        try:
            with iris.connect(port) as conn:
                conn.request(cluster, b"ping", 0.5)
                return
        except (OSError, iris.TimeoutError, iris.ClosedError):
            time.sleep(0.1)


def slope_per_100k(samples: list[Sample], value) -> float:
    """Least-squares growth of ``value(sample)`` per 100k requests, in bytes."""
    xs = [s.requests for s in samples]
    ys = [value(s) for s in samples]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    if not spread:
        return float("nan")
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / spread * 1e5


def mib(value: float) -> str:
    return f"{value / MiB:.1f}"


def kib(value: float) -> str:
    return "n/a" if value != value else f"{value / 1024:+,.0f}"


def report(
    args, machine: dict, soak: Soak, samples: list[Sample], before: Sample, after: Sample
) -> bool:
    done = soak.completed()
    elapsed = after.elapsed
    print(f"## Soak: {done:,} requests in {elapsed:.0f} s ({done / elapsed:,.0f} per second)")
    print()
    print(
        f"{soak.threads} client threads (own connection each, {PAYLOAD_SIZE}-byte requests) -> "
        f"relay process -> irishost with {WORKERS} workers (echo); asked for "
        f"{args.requests:,} requests within {args.seconds:g} s."
    )
    machine["load_at_end"] = _util.load_average()
    print(_util.describe_machine(machine))
    print()
    header = ["requests", "s", "relay RSS MiB", "supervisor RSS MiB", "worker RSS MiB"]
    header += ["relay fds", "supervisor fds"]
    rows = [
        [
            f"{s.requests:,}",
            f"{s.elapsed:.0f}",
            mib(s.relay_rss),
            mib(s.supervisor_rss),
            " / ".join(mib(r) for r in s.worker_rss),
            str(s.relay_fds),
            str(s.supervisor_fds),
        ]
        for s in samples
    ]
    print(_util.markdown_table(header, rows))
    print()

    late = [s for s in samples if s.requests >= WARM_UP]
    same_workers = all(s.worker_pids == late[0].worker_pids for s in late) if late else False
    if len(late) >= 2:
        rows = [
            ["relay", kib(slope_per_100k(late, lambda s: s.relay_rss))],
            ["supervisor", kib(slope_per_100k(late, lambda s: s.supervisor_rss))],
        ]
        if same_workers:
            for i in range(len(late[0].worker_rss)):
                rows.append(
                    [f"worker {i}", kib(slope_per_100k(late, lambda s, i=i: s.worker_rss[i]))]
                )
        first, last = late[0], late[-1]
        print(
            f"### Growth per 100k requests after warm-up ({first.requests:,} to "
            f"{last.requests:,} requests, least-squares slope)"
        )
        print()
        print(_util.markdown_table(["process", "KiB per 100k requests"], rows))
        print()
    else:
        print(f"Too few samples after the {WARM_UP:,}-request warm-up for a growth figure.")
        print()

    rows = [
        ["relay fds", str(before.relay_fds), str(after.relay_fds)],
        ["supervisor fds", str(before.supervisor_fds), str(after.supervisor_fds)],
        ["relay threads", str(before.relay_threads), str(after.relay_threads)],
        ["supervisor threads", str(before.supervisor_threads), str(after.supervisor_threads)],
        ["worker pids", *(" ".join(map(str, s.worker_pids)) for s in (before, after))],
    ]
    print("### Before and after the load (clients connected both times)")
    print()
    print(_util.markdown_table(["", "before", "after"], rows))
    print()
    grew = after.relay_fds > before.relay_fds or after.supervisor_fds > before.supervisor_fds
    print(f"failed requests: {len(soak.errors)}")
    for error in soak.errors[:10]:
        print(f"  {error}")
    ok = not soak.errors and not grew and done > 0
    print("RESULT:", "ok" if ok else "FAILED" + (" (descriptors grew)" if grew else ""))
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1_000_000, help="how many (1,000,000)")
    parser.add_argument("--seconds", type=float, default=600.0, help="at most this long (600)")
    parser.add_argument("--threads", type=int, default=THREADS, help=f"client threads ({THREADS})")
    args = parser.parse_args(argv)
    machine = _util.machine()

    directory = Path(tempfile.mkdtemp(prefix="irishost-soak-"))
    cluster = f"soak-{uuid.uuid4().hex[:8]}"
    relay, port = _util.start_relay()
    host = None
    conns: list[iris.Connection] = []
    try:
        (directory / "soak_handler.py").write_text(HANDLER_SOURCE)
        config = directory / "soak.toml"
        config.write_text(
            CONFIG.format(cluster=cluster, directory=directory, port=port, workers=WORKERS)
        )
        host = _util.Child([sys.executable, "-m", "irishost", "-c", str(config)], "irishost")
        wait_serving(port, cluster, host)
        soak = Soak(args.requests, args.seconds, args.threads)
        conns = [iris.connect(port) for _ in range(args.threads)]
        relay_ps, host_ps = relay.ps, host.ps
        start = time.monotonic()
        before = Sample(0, 0.0, relay_ps, host_ps)
        samples = [before]
        threads = [
            threading.Thread(target=soak.client, args=(i, conn, cluster), daemon=True)
            for i, conn in enumerate(conns)
        ]
        for thread in threads:
            thread.start()
        deadline = start + args.seconds
        next_sample = SAMPLE_EVERY
        while any(thread.is_alive() for thread in threads):
            if time.monotonic() > deadline:
                soak.stopping.set()
            done = soak.completed()
            if done >= next_sample:
                samples.append(Sample(done, time.monotonic() - start, relay_ps, host_ps))
                next_sample += SAMPLE_EVERY
            time.sleep(0.02)
        for thread in threads:
            thread.join()
        after = Sample(soak.completed(), time.monotonic() - start, relay_ps, host_ps)
        if after.requests > samples[-1].requests:
            samples.append(after)
        ok = report(args, machine, soak, samples, before, after)
    finally:
        for conn in conns:
            conn.close()
        if host is not None:
            host.stop()  # SIGTERM: a graceful stop, which must exit 0
        relay.stop()
        shutil.rmtree(directory, ignore_errors=True)
    codes = {"irishost": host.proc.returncode, "relay": relay.proc.returncode}
    prefix = segment_prefix(cluster) + "-"
    leftovers = [path.name for path in Path("/dev/shm").iterdir() if path.name.startswith(prefix)]
    print(f"exit codes on SIGTERM: {codes}; left in /dev/shm: {leftovers or 'nothing'}")
    return 0 if ok and not leftovers and set(codes.values()) == {0} else 1


if __name__ == "__main__":
    sys.exit(main())
