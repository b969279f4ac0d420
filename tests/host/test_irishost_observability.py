"""What a real irishost tells about each request: the access log and the metrics'
request-duration histogram and failure counters by cause.
"""

from __future__ import annotations

import re
import signal
import urllib.request

import pytest
from support import free_port, wait_for

import iris

ACCESS_LINE = re.compile(
    r"irishost\.access: request cluster=(?P<cluster>\S+) worker=(?P<worker>\S+) "
    r"size=(?P<size>\d+) duration=(?P<duration>[0-9.]+) outcome=(?P<outcome>\w+)"
)


def access_lines(host) -> list[dict]:
    return [match.groupdict() for match in ACCESS_LINE.finditer(host.log())]


def faults(service, *requests: bytes, timeout: float = 5.0) -> list[str]:
    """Send each request; the fault texts (every one must fail)."""
    texts = []
    for request in requests:
        with pytest.raises(iris.RemoteError) as caught:
            service.request(request, timeout)
        texts.append(str(caught.value))
    return texts


def test_access_log_has_one_line_per_request_with_its_outcome(service):
    service.config(logging={"level": "warning", "access": True})  # access lines are INFO
    host = service.start()

    service.request(b"pid|pad")
    faults(service, b"fail:boom", b"segv|padding")

    def lines() -> list[dict]:
        # Sizes of our own: the fixture's start-up pings ("ping") are 4 bytes.
        found = [line for line in access_lines(host) if line["size"] in ("7", "9", "12")]
        return found if len(found) >= 3 else []

    lines = wait_for(lines, what="3 access lines")
    assert [line["outcome"] for line in lines] == ["ok", "fault", "worker_died"]
    assert [line["size"] for line in lines] == ["7", "9", "12"]
    assert {line["cluster"] for line in lines} == {service.cluster}
    assert {line["worker"] for line in lines} == {"0"}
    assert all(0 < float(line["duration"]) < 5 for line in lines)


def test_no_access_log_unless_asked(service):
    host = service.start()

    service.request(b"pid")
    faults(service, b"fail:boom")

    assert "irishost.access" not in host.log()
    assert access_lines(host) == []


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def sample(text: str, series: str) -> float:
    match = re.search(rf"^{re.escape(series)} (\S+)$", text, re.M)
    assert match, f"{series} not in:\n{text}"
    return float(match[1])


COUNT = "irishost_request_duration_seconds_count"


def test_metrics_count_durations_and_failures_by_cause(service):
    port = free_port()
    service.config(metrics={"port": port}, limits={"request_threads": 1})
    service.start()
    baseline = scrape(port)

    service.request(b"sleep:0.3")  # above the 0.25 s bucket
    faults(service, b"fail:boom", b"segv")
    wait_for(lambda: service.request(b"ping") == b"pong", what="replacement worker")
    # A request queued in the worker behind a slow one, past its deadline when its turn comes.
    slow = service.request_async(b"sleep:0.6")
    wait_for(lambda: service.records("request")[-1][2] == "sleep:0.6", what="slow one running")
    with pytest.raises(iris.TimeoutError):
        service.request(b"pid", timeout=0.2)
    slow.result(5)

    def counted() -> str | None:
        text = scrape(port)
        return text if delta(text, COUNT) >= 6 else None

    def delta(text: str, series: str) -> float:
        return sample(text, series) - sample(baseline, series)

    text = wait_for(counted, what="6 more requests counted")
    # 6 with the ping; 7 if the fixture's last start-up ping was counted after the
    # baseline (a reply reaches its caller before it is counted).
    assert delta(text, COUNT) in (6, 7)
    failed = 'irishost_requests_failed_total{cause="%s"}'
    causes = ("fault", "worker_died", "expired", "no_room", "shutdown")
    assert [delta(text, failed % cause) for cause in causes] == [1, 1, 1, 0, 0]
    # sleep:0.3, sleep:0.6, and the expired one, answered once sleep:0.6 was done;
    # on a loaded machine a quick one (the segv's fault, a ping) may be slow too.
    quick = 'irishost_request_duration_seconds_bucket{le="0.25"}'
    assert delta(text, COUNT) - delta(text, quick) >= 3
    assert delta(text, "irishost_request_duration_seconds_sum") >= 0.3 + 0.6 + 0.2


def test_refused_requests_are_logged_as_no_room_and_shutdown(service):
    service.config(limits={"request_memory": "1KiB"}, logging={"access": True})
    host = service.start()

    faults(service, b"pid|" + b"x" * 2000)  # over any worker's request memory
    held = service.request_async(b"wait:release")
    wait_for(lambda: service.records("request"), what="request running")
    host.proc.send_signal(signal.SIGTERM)
    host.wait_log("stopping")
    assert "shutting down" in faults(service, b"pid|late")[0]
    service.open_gate("release")
    held.result(10)
    assert host.wait_exit() == 0

    outcomes = {line["size"]: (line["worker"], line["outcome"]) for line in access_lines(host)}
    assert outcomes["2004"] == ("-", "no_room")
    assert outcomes["8"] == ("-", "shutdown")
    assert outcomes["12"] == ("0", "ok")  # the held one, finished while stopping
