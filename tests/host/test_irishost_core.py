"""irishost's core against its own races and broken workers (issue 12): a
worker retired while it boots must stay retired when its READY arrives, and
a worker that writes an undecodable frame is replaced like a crashed one.
Each runs a real host, real workers and real signals.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time

import psutil
import pytest
from support import fork_servers, gone, wait_for

import iris


def test_a_worker_retired_while_booting_never_takes_requests(service):
    """SIGTTOU while the second worker is still in init retires it; its READY,
    arriving later, must not make it take requests (it drains and exits 0)."""
    service.config(workers={"count": 1}, limits={"request_threads": 2})
    host = service.start(env={"PROBE_INIT": "hang-while:init-hangs"})
    first = host.worker_count(1)[0].pid
    held = service.request_async(b"wait:release", timeout=30)  # keeps `first` loaded
    wait_for(lambda: service.records("request"), what="the held request running")

    service.open_gate("init-hangs")
    os.kill(host.proc.pid, signal.SIGTTIN)
    wait_for(lambda: len(service.records("init")) == 2, what="the second worker in init")
    late = next(pid for _, pid, *_ in service.records("init") if pid != first)
    os.kill(host.proc.pid, signal.SIGTTOU)
    wait_for(lambda: "scaling workers" in host.log().split("after=2")[-1], what="SIGTTOU seen")

    stop = threading.Event()
    replies: list[bytes] = []
    faults: list[str] = []

    def call() -> None:
        while not stop.is_set():
            try:
                replies.append(service.conn.request(service.cluster, b"pid", 10))
            except iris.RemoteError as err:
                faults.append(err.fault)

    callers = [threading.Thread(target=call) for _ in range(8)]
    for caller in callers:
        caller.start()
    time.sleep(0.2)
    os.unlink(service.dir / "init-hangs")  # the retired worker finishes init: READY
    assert gone(late, wait=10)
    time.sleep(0.2)
    stop.set()
    for caller in callers:
        caller.join(15)
    service.open_gate("release")
    held.result(10)

    assert faults == []
    assert replies and set(replies) == {str(first).encode()}
    host.wait_log("retired worker exited")
    assert "worker died" not in host.log()


def test_a_worker_sending_an_undecodable_frame_is_replaced_and_faults_only_its_work(service):
    """Garbage from one worker kills that worker as broken, through the normal
    death path: exactly its requests are faulted; the other worker carries on."""
    service.config(workers={"count": 2})
    host = service.start()
    workers = {worker.pid for worker in host.worker_count(2)}
    held = service.request_async(b"wait:release")
    wait_for(lambda: service.records("request"), what="the held request running")
    holder = service.records("request")[0][1]

    broken = service.request_async(b"garbage:1")

    fault = pytest.raises(iris.RemoteError, broken.result, 10).value.fault
    assert "sent an undecodable frame" in fault
    (culprit,) = workers - {holder}
    assert gone(culprit, wait=5)
    service.open_gate("release")
    assert held.result(10) == str(holder).encode()
    host.wait_log("worker sent an undecodable frame")
    host.worker_count(2)
    assert host.proc.poll() is None


# -- fork safety -----------------------------------------------------------------------------


FORKED = re.compile(r"forked worker .*worker=(\d+) pid=(\d+) forked_by=(\d+) threads_at_fork=(\d+)")


def spawns(host) -> list[tuple[int, int, int, int]]:
    return [tuple(map(int, match)) for match in FORKED.findall(host.log())]


@pytest.mark.parametrize("preload", [True, False])
def test_no_worker_is_forked_from_a_multi_threaded_process(service, preload):
    """Start, scale up, respawn after a crash, reload: every worker comes from
    a fork server, which had exactly one thread at each fork, while the
    supervisor runs several (relay reader, control server, embedded relay);
    and every worker is then the supervisor's child."""
    service.config(workers={"count": 1, "preload": preload}, logging={"level": "debug"})
    host = service.start()
    os.kill(host.pid, signal.SIGTTIN)
    first, second = host.worker_count(2)
    os.kill(first.pid, signal.SIGKILL)
    wait_for(lambda: len(spawns(host)) == 3, what="the respawn")
    os.kill(host.pid, signal.SIGHUP)
    host.wait_log("reload complete")
    # The fork server's answer (and its log line) may come after the new worker's ready.
    wait_for(lambda: len(spawns(host)) >= 4, what="the reload's spawn")
    service.request(b"pid")

    assert psutil.Process(host.pid).num_threads() > 1
    (fork_server,) = fork_servers(host.pid)  # the reload's; the first one's ended with it
    assert len(os.listdir(f"/proc/{fork_server.pid}/task")) == 1
    made = spawns(host)
    assert len(made) == 4  # 1 at start, 1 scaled, 1 respawned, 1 by the reload (count = 1)
    assert len({forked_by for _, _, forked_by, _ in made}) == 2  # one per generation
    assert made[-1][2] == fork_server.pid
    assert host.pid not in {forked_by for _, _, forked_by, _ in made}
    assert {threads for *_, threads in made} == {1}
    assert {w.ppid() for w in host.workers()} == {host.pid}
    assert "several threads" not in host.log()


def test_workers_and_fork_server_die_with_a_killed_supervisor(service):
    service.config(workers={"count": 2})
    host = service.start()
    workers = [w.pid for w in host.worker_count(2)]
    (fork_server,) = fork_servers(host.pid)

    os.kill(host.pid, signal.SIGKILL)

    assert host.wait_exit() == -signal.SIGKILL
    assert gone(fork_server.pid, wait=5)
    assert all(gone(pid, wait=5) for pid in workers)


def test_a_preloaded_handler_starting_a_thread_at_import_is_warned_about(service):
    """The one way left to fork with several threads: say so."""
    (service.dir / "threaded.py").write_text(
        "import threading\nimport iris\n\n"
        "threading.Thread(target=threading.Event().wait, daemon=True).start()\n\n\n"
        "class Handler(iris.ServiceHandler):\n"
        "    def init(self, conn):\n        pass\n\n"
        "    def handle_request(self, request):\n        return request\n"
    )
    service.config(service={"handler": "threaded:Handler"}, workers={"preload": True})
    host = service.start()

    assert service.request(b"hi") == b"hi"
    host.wait_log("worker forked from a process with several threads")
