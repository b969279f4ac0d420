"""irishost's own moving parts under fault (issue 16): the fork servers, fork()
itself, and what a reload imports. No part of the host may take the service
down or freeze it.

Each test reproduces one fault through real processes, as an operator or a
hostile machine would cause it, and checks that the service holds:

1. a fork server SIGKILLed under load: no request fails, and SIGTTIN still
   adds a worker (a fresh fork server is launched on demand);
2. a fork() failing with EAGAIN (the fork server in a pids cgroup that is
   full): the host serves on, status shows the slot degraded with the errno,
   and the workers come back within the backoff once the limit lifts;
3. a reload whose import takes 3 s: no reply waits for it (worst latency
   under 1 s), none fails, and exactly ``count`` workers after;
4. a reload of code that exits, segfaults or raises KeyboardInterrupt at
   import: the old workers keep serving, and ``irishost reload --wait``
   exits 1 naming the failure;
5. ten reloads of a module holding a 40 MB table: a new worker's memory
   stays within 1.5x the first generation's (each reload imports in a clean
   interpreter);
6. ``[settings]`` with a 400 KB string: served across a reload and across a
   relay restart;

and the start-up rules: a handler module that exits the process at import
is a handler error (exit 4) for ``--check`` and a start, and a ``max_rss``
below a fresh worker's memory a config error (exit 3) naming both figures.

The handler is one module (``HANDLER`` below) whose import does what the
file ``import-mode`` beside it says, so a reload changes what importing it
does without rewriting the module (and its bytecode cache).
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from typing import NamedTuple

import pytest
from production_support import parse_reply, steady_load
from relay_process import RelayProcess
from support import fork_servers, free_port, gone, wait_for

import iris

HANDLER = '''"""Written by tests/host/test_irishost_process_model.py: what importing it
does is read from the file import-mode beside it."""

import ctypes
import os
import time

import iris

HERE = os.path.dirname(os.path.abspath(__file__))
_MODE_FILE = os.path.join(HERE, "import-mode")
MODE = open(_MODE_FILE).read().strip() if os.path.exists(_MODE_FILE) else ""

if MODE == "slow":
    time.sleep(3)
elif MODE == "exit":
    os._exit(0)
elif MODE == "segv":
    ctypes.string_at(0)  # reads address 0: SIGSEGV
elif MODE == "interrupt":
    raise KeyboardInterrupt

# 40 MiB in 40,960 objects of 1 KiB: real, resident memory, from the allocator's heap.
TABLE = [os.urandom(1024) for _ in range(40 * 1024)] if MODE == "table" else []


class Handler(iris.ServiceHandler):
    def __init__(self, text: str = ""):
        self.text = text

    def handle_request(self, request):
        """Answer "<length of the text setting> <pid> <request>"."""
        return f"{len(self.text)} {os.getpid()} {request.decode()}".encode()
'''


def serve_module(service, mode: str = "", **tables: dict) -> None:
    """Write the handler module, its import mode and the config (``tables`` override)."""
    (service.dir / "handler.py").write_text(HANDLER)
    import_mode(service, mode)
    service.config(service={"handler": "handler:Handler"}, **tables)


def import_mode(service, mode: str) -> None:
    (service.dir / "import-mode").write_text(mode)


def alive(host) -> bool:
    """True; fails the test at once, with the log, if the host has exited."""
    code = host.proc.poll()
    assert code is None, f"irishost exited with {code}:\n{host.log()}"
    return True


def reloaded(host, notify, count: int, timeout: float = 15.0) -> float:
    """Wait for the ``count``-th READY=1 (the first came at start), failing at once
    if the host exits meanwhile; when it came."""
    ready = wait_for(
        lambda: alive(host) and len(found := notify.datagrams("READY")) >= count and found,
        timeout,
        what=f"READY=1 #{count}",
    )
    at: float = ready[count - 1].at
    return at


def status_json(service) -> dict:
    result = service.run("status", "--json", timeout=15)
    assert result.returncode == 0, result.stderr
    snapshot: dict = json.loads(result.stdout)
    return snapshot


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# -- 1. the fork server killed ---------------------------------------------------------------


def test_a_fork_server_killed_under_load_fails_no_request_and_is_relaunched(service):
    serve_module(service, workers={"count": 2}, limits={"request_threads": 2})
    host = service.start()
    workers = {w.pid for w in host.worker_count(2)}
    (server,) = fork_servers(host.pid)

    with steady_load(service.port, service.cluster, threads=4) as load:
        load.wait_for_replies(40)
        os.kill(server.pid, signal.SIGKILL)  # as the OOM killer would
        assert gone(server.pid, wait=5)
        killed = time.monotonic()
        served = wait_for(
            lambda: (
                alive(host)
                and len(hits := [o.reply for o in load.outcomes() if o.at > killed and o.reply])
                >= 100
                and hits
            ),
            what="100 replies after the kill",
        )
        wait_for(lambda: alive(host) and time.monotonic() > killed + 1, what="a second of load")

        host.proc.send_signal(signal.SIGTTIN)
        three = {w.pid for w in host.worker_count(3)}
        load.wait_for_replies(100, since=time.monotonic())

    assert load.failures() == [], load.failures()[:5]
    assert {reply.pid for reply in served} == workers  # untouched by the fork server's death
    assert three > workers
    (relaunched,) = fork_servers(host.pid)
    assert relaunched.pid != server.pid
    assert alive(host)


# -- 2. fork() failing with EAGAIN -----------------------------------------------------------


def test_a_fork_failing_with_eagain_degrades_the_slot_and_recovers_when_the_limit_lifts(
    service, thread_limit
):
    serve_module(service, workers={"count": 2})
    host = service.start()
    first, second = (w.pid for w in host.worker_count(2))
    (server,) = fork_servers(host.pid)
    assert server.num_threads() == 1
    thread_limit.add(server.pid)
    thread_limit.on()  # pids.max 1: the fork server itself, and no child

    os.kill(second, signal.SIGKILL)  # its respawn cannot fork
    host.proc.send_signal(signal.SIGTTIN)  # nor can slot 2's first worker

    def degraded() -> dict[int, str]:
        return {d["slot"]: d["problem"] for d in status_json(service)["degraded"]}

    problems = wait_for(
        lambda: (
            alive(host)
            and len(found := degraded()) == 2
            and all("EAGAIN" in problem for problem in found.values())
            and found
        ),
        what="two slots degraded by EAGAIN",
    )
    served = {parse_reply(service.request(b"during", 5), b"during").pid for _ in range(20)}
    assert alive(host)
    assert [w.pid for w in host.workers()] == [first]
    assert served == {first}
    for problem in problems.values():
        assert "fork failed" in problem and "EAGAIN" in problem, problems

    thread_limit.off()
    lifted = time.monotonic()
    workers = host.worker_count(3, timeout=15)
    wait_for(lambda: not degraded(), timeout=5, what="degraded to clear")
    back = time.monotonic() - lifted

    assert back < 12.0
    assert first in {w.pid for w in workers}
    assert sorted(w["slot"] for w in status_json(service)["workers"]) == [0, 1, 2]
    host.wait_log("EAGAIN")


# -- 3. a slow reload ------------------------------------------------------------------------


class Call(NamedTuple):
    latency: float
    error: str  # "" if answered


class TimedCallers:
    """``threads`` clients requesting one after another until stopped, each call timed."""

    def __init__(self, port: int, cluster: str, threads: int = 4):
        self.calls: list[Call] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(port, cluster, n), daemon=True)
            for n in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    def _run(self, port: int, cluster: str, number: int) -> None:
        with iris.connect(port) as conn:
            count = 0
            while not self._stop.is_set():
                request = f"echo:{number}-{count}".encode()
                count += 1
                started = time.monotonic()
                try:
                    parse_reply(conn.request(cluster, request, 5.0), request)
                    error = ""
                except (iris.RemoteError, iris.TimeoutError, iris.ClosedError) as err:
                    error = f"{type(err).__name__}: {err}"
                except AssertionError as err:
                    error = f"wrong reply: {err}"
                with self._lock:
                    self.calls.append(Call(time.monotonic() - started, error))

    def stop(self) -> list[Call]:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)
        with self._lock:
            return list(self.calls)


def test_a_reload_with_a_3_s_import_freezes_no_reply_and_ends_with_count_workers(notify, service):
    serve_module(service, workers={"count": 2, "preload": True}, limits={"request_threads": 2})
    host = service.start(env=notify.env)
    old = {w.pid for w in host.worker_count(2)}

    callers = TimedCallers(service.port, service.cluster, threads=4)
    try:
        wait_for(lambda: len(callers.calls) >= 40, what="steady requests")
        import_mode(service, "slow")
        sighup = time.monotonic()
        host.proc.send_signal(signal.SIGHUP)
        ready = reloaded(host, notify, count=2, timeout=20)
        wait_for(lambda: all(gone(pid) for pid in old), what="the old workers to exit")
        new = {w.pid for w in host.worker_count(2)}
        time.sleep(0.5)
    finally:
        calls = callers.stop()

    assert ready - sighup >= 3.0, "the import was not slow"
    assert len(calls) > 100
    assert [c for c in calls if c.error] == []
    worst = max(c.latency for c in calls)
    assert worst < 1.0, f"worst latency {worst:.2f} s"
    assert not new & old
    time.sleep(5)
    assert {w.pid for w in host.workers()} == new
    assert len(status_json(service)["workers"]) == 2
    assert notify.states() == ["READY=1", "RELOADING=1", "READY=1"]


# -- 4. a reload that ends the fork server ---------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "failure"),
    [
        ("exit", "exited with code 0"),
        ("segv", "killed by SIGSEGV"),
        ("interrupt", "KeyboardInterrupt"),
    ],
)
def test_a_reload_whose_import_ends_the_process_keeps_the_old_workers_serving(
    notify, service, mode, failure
):
    serve_module(service, workers={"count": 2})
    host = service.start(env=notify.env)
    workers = {w.pid for w in host.worker_count(2)}

    with steady_load(service.port, service.cluster, threads=2) as load:
        load.wait_for_replies(20)
        import_mode(service, mode)
        host.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: alive(host) and "reload failed" in host.log(), what="the reload to fail")
        served = load.wait_for_replies(20, since=time.monotonic())

        waited = service.run("reload", "--wait")
        assert alive(host)
        assert {w.pid for w in host.workers()} == workers
        served += load.wait_for_replies(20, since=time.monotonic())

        import_mode(service, "")
        fixed = service.run("reload", "--wait")
        fresh = load.wait_for_replies(20, since=time.monotonic() + 0.2)

    assert waited.returncode == 1, (waited.stdout, waited.stderr)
    assert "reload failed" in waited.stderr and failure in waited.stderr, waited.stderr
    assert "the running workers carry on" in waited.stderr
    assert {reply.pid for reply in served} <= workers
    assert fixed.returncode == 0, fixed.stderr
    assert not {reply.pid for reply in fresh} & workers
    assert load.failures() == [], load.failures()[:5]
    log = host.log()
    assert log.count("reload failed; keeping the running workers") == 2, log
    assert failure in log
    assert alive(host)


# -- 5. reloads and memory -------------------------------------------------------------------


def test_ten_reloads_of_a_module_with_a_40_mb_table_carry_no_memory_into_new_workers(
    notify, service
):
    serve_module(service, mode="table", workers={"count": 1, "preload": True})
    host = service.start(env=notify.env)
    (worker,) = host.worker_count(1)
    baseline = rss(worker.pid)
    assert baseline > 40 * 2**20  # the table is in it

    sizes = []
    for number in range(2, 12):
        old = worker.pid
        host.proc.send_signal(signal.SIGHUP)
        reloaded(host, notify, count=number)
        wait_for(lambda old=old: gone(old), what="the old worker to exit")
        (worker,) = host.worker_count(1)
        assert worker.pid != old
        sizes.append(rss(worker.pid))

    mib = [f"{size / 2**20:.0f}" for size in [baseline, *sizes]]
    assert max(sizes) <= 1.5 * baseline, f"worker RSS per generation, MiB: {mib}"
    assert parse_reply(service.request(b"still"), b"still")


# -- 6. large settings -----------------------------------------------------------------------


@pytest.fixture
def relay_on(tmp_path):
    """``relay_on(port)`` starts a relay on that very port; stopped at teardown."""
    started: list[RelayProcess] = []

    def start(port: int) -> RelayProcess:
        relay = RelayProcess(["--port", str(port)], tmp_path / f"relay-{len(started)}.log")
        started.append(relay)
        return relay

    yield start
    for relay in started:
        relay.stop()


@pytest.mark.parametrize("across", ["reload", "relay restart"])
def test_a_400_kb_string_setting_is_served_across(notify, relay_on, service, across):
    text = "x" * 400_000
    port = free_port()
    relay = relay_on(port)
    serve_module(service, settings={"text": text}, relay={"port": port, "embedded": False})
    host = service.start(env=notify.env)
    (worker,) = host.worker_count(1)
    assert parse_reply(service.request(b"before"), b"before") == (str(len(text)), worker.pid)

    if across == "reload":
        host.proc.send_signal(signal.SIGHUP)
        reloaded(host, notify, count=2)
    else:
        relay.kill()
        relay = relay_on(port)
    wait_for(lambda: alive(host) and gone(worker.pid), what="fresh workers to take over")

    def answered() -> iris.Connection | None:
        try:
            conn = service.connect()
            reply = conn.request(service.cluster, b"after", 2.0)
        except (OSError, iris.TimeoutError, iris.ClosedError):
            return None
        return parse_reply(reply, b"after")

    after = wait_for(lambda: alive(host) and answered(), timeout=15, what="an answer")
    assert after.version == str(len(text))
    assert after.pid != worker.pid
    assert alive(host)


# -- start-up rules --------------------------------------------------------------------------


def test_a_handler_module_exiting_at_import_is_a_handler_error_for_check_and_start(service):
    serve_module(service, mode="exit")

    check = service.run("--check")
    host = service.start(wait=False)

    assert check.returncode == 4, (check.stdout, check.stderr)
    assert "handler error" in check.stderr and "exited with code 0" in check.stderr
    assert host.wait_exit() == 4, host.log()
    assert "exited with code 0" in host.log()
    assert not host.workers()


def test_boot_timeout_bounds_the_handler_s_import_not_the_interpreter_s_start(service):
    """Every interpreter here starts 1.5 s late (a sitecustomize that sleeps, as
    a loaded machine would): a 1 s boot_timeout still serves; the fork server's
    interpreter start did count against it before."""
    slow_site = service.dir / "slow-site"
    slow_site.mkdir()
    (slow_site / "sitecustomize.py").write_text("import time\ntime.sleep(1.5)\n")
    serve_module(service, workers={"boot_timeout": "1s"})

    host = service.start(env={"PYTHONPATH": str(slow_site)})

    assert parse_reply(service.request(b"pid"), b"pid").pid == host.worker_count(1)[0].pid


def test_a_preloaded_import_past_boot_timeout_fails_the_start_saying_so(service):
    serve_module(service, mode="slow", workers={"boot_timeout": "1s"})  # a 3 s import

    check = service.run("--check")
    host = service.start(wait=False)

    why = "importing the handler took longer than workers.boot_timeout (1 s)"
    assert check.returncode == 4 and why in check.stderr, (check.stdout, check.stderr)
    assert host.wait_exit() == 4, host.log()
    assert why in host.log()
    assert "end the process while being imported" not in host.log()


def test_a_max_rss_below_a_fresh_workers_memory_is_a_config_error_naming_both(service):
    serve_module(service, limits={"max_rss": "1B"})

    check = service.run("--check")
    started = time.monotonic()
    host = service.start(wait=False)

    assert check.returncode == 3, (check.stdout, check.stderr)
    assert host.wait_exit() == 3, host.log()
    # Not after waiting out a worker forked as the host gave up (pool.kill_all).
    assert time.monotonic() - started < 4.0
    figures = re.compile(
        r"limits\.max_rss: (\d+(\.\d+)? ?[KMG]?i?B) is below a fresh worker's "
        r"resident memory \((\d+\.\d) MiB"
    )
    for text in (check.stderr, host.log()):
        found = figures.search(text)
        assert found is not None, text
        assert float(found[3]) > 1.0
