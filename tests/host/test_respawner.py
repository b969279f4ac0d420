"""The respawn policy in-process, as test_router.py tests the router: no fork,
no clock; time and observations are passed in."""

from __future__ import annotations

from dataclasses import replace

import pytest

from irishost.config import Config, load_config
from irishost.exits import Exit, HostError
from irishost.supervisor.handle import WorkerState
from irishost.supervisor.respawner import (
    BACKOFF_CAP,
    BACKOFF_START,
    MAX_BOOT_DEATHS,
    STABLE_SECONDS,
    Death,
    Respawner,
    memory_verdict,
    private_verdict,
    stuck_reason,
)

BOOTING, READY, DRAINING = WorkerState.BOOTING, WorkerState.READY, WorkerState.DRAINING
MiB = 2**20


def crash(slot: int = 0, lived: float = 1.0, state=READY) -> Death:
    return Death(slot, state, "killed by SIGSEGV", lived)


def failed_start(
    slot: int = 0, traceback: str | None = "Traceback\nRuntimeError: db down"
) -> Death:
    return Death(slot, BOOTING, "exited with code 3", 0.5, traceback, killed=traceback is None)


@pytest.fixture
def config(tmp_path) -> Config:
    (tmp_path / "h.py").write_text("class H:\n    pass\n")
    path = tmp_path / "service.toml"
    path.write_text(
        '[service]\ncluster = "c"\nhandler = "h:H"\n'
        '[workers]\ntimeout_grace = "2s"\nboot_timeout = "30s"\n'
        '[limits]\nmax_rss = "100MiB"\nmax_rss_kill_factor = 1.5\nmax_private = "40MiB"\n'
    )
    return load_config(path)


# -- backoff ------------------------------------------------------------------------------


def test_quick_deaths_double_the_backoff_up_to_the_cap():
    policy = Respawner(ever_ready=True)
    delays = [policy.on_death(crash(), now=100.0, count=1) for _ in range(12)]
    assert delays[:4] == [BACKOFF_START, 2 * BACKOFF_START, 4 * BACKOFF_START, 8 * BACKOFF_START]
    assert delays[-1] == BACKOFF_CAP
    assert policy.restarts == 12 and policy.slot_restarts == {0: 12}


def test_a_worker_that_lived_long_resets_its_slots_backoff():
    policy = Respawner(ever_ready=True)
    for _ in range(3):
        policy.on_death(crash(), now=0.0, count=1)
    assert policy.on_death(crash(lived=STABLE_SECONDS), now=0.0, count=1) == BACKOFF_START


def test_slots_back_off_independently():
    policy = Respawner(ever_ready=True)
    policy.on_death(crash(slot=0), now=0.0, count=2)
    policy.on_death(crash(slot=0), now=0.0, count=2)
    assert policy.on_death(crash(slot=1), now=0.0, count=2) == BACKOFF_START


def test_respawns_come_due_once_at_their_time():
    policy = Respawner(ever_ready=True)
    policy.on_death(crash(slot=0), now=10.0, count=2)
    assert policy.next_due() == 10.0 + BACKOFF_START
    assert policy.due(10.0) == []
    assert policy.due(10.0 + BACKOFF_START) == [0]
    assert policy.due(11.0) == [] and policy.next_due() is None


def test_a_slot_scaled_away_meanwhile_is_not_respawned():
    policy = Respawner(ever_ready=True)
    assert policy.on_death(crash(slot=3), now=0.0, count=2) is None
    assert policy.due(100.0) == [] and policy.restarts == 0


# -- start-up: only the initial start may be fatal -----------------------------------------


def test_a_failed_initial_start_stops_the_host_with_its_traceback():
    with pytest.raises(HostError) as caught:
        Respawner().on_death(failed_start(), now=0.0, count=1)
    assert caught.value.code is Exit.HANDLER
    assert str(caught.value) == "worker 0 failed to start"
    assert "RuntimeError: db down" in caught.value.details


def test_a_boot_timeout_at_the_initial_start_is_fatal_too():
    death = failed_start(traceback=None)  # killed booting: boot_timeout or max_rss
    with pytest.raises(HostError, match="worker 0 failed to start: exited with code 3"):
        Respawner().on_death(death, now=0.0, count=1)


def test_workers_dying_in_a_row_before_any_was_ready_stop_the_host():
    policy = Respawner()
    for _ in range(MAX_BOOT_DEATHS - 1):
        policy.on_death(crash(state=BOOTING), now=0.0, count=1)
    with pytest.raises(HostError, match="keep dying during start-up; the last one killed by"):
        policy.on_death(crash(state=BOOTING), now=0.0, count=1)


def test_once_a_worker_was_ready_a_failed_start_is_a_crash_of_its_slot():
    policy = Respawner()
    policy.on_ready(1)
    assert policy.on_death(failed_start(slot=0), now=0.0, count=2) == BACKOFF_START
    assert policy.slot_problems(2) == {0: "failed to start: RuntimeError: db down"}
    policy.on_ready(0)
    assert policy.slot_problems(2) == {}


def test_problems_of_slots_scaled_away_are_not_shown():
    policy = Respawner(ever_ready=True)
    policy.on_death(crash(slot=1), now=0.0, count=2)
    assert policy.slot_problems(2) == {1: "killed by SIGSEGV"}
    assert policy.slot_problems(1) == {}


# -- stuck and bloated workers --------------------------------------------------------------


def test_a_handler_past_its_deadline_plus_grace_is_stuck(config):
    assert stuck_reason(READY, 10.0, 0.0, 0.0, now=11.9, config=config) is None
    reason = stuck_reason(READY, 10.0, 0.0, 0.0, now=12.1, config=config)
    assert reason == "a handler ran past its deadline plus 2 s"


def test_a_drain_past_its_deadline_is_stuck(config):
    assert stuck_reason(DRAINING, None, 0.0, 5.0, now=4.0, config=config) is None
    assert stuck_reason(DRAINING, None, 0.0, 5.0, now=6.0, config=config) == "did not drain in time"


def test_a_boot_past_boot_timeout_is_stuck(config):
    assert stuck_reason(BOOTING, None, 100.0, 0.0, now=129.0, config=config) is None
    reason = stuck_reason(BOOTING, None, 100.0, 0.0, now=131.0, config=config)
    assert reason == "still starting after workers.boot_timeout (30 s)"


def test_over_max_rss_a_ready_worker_is_recycled(config):
    assert memory_verdict(99 * MiB, READY, config) is None
    assert memory_verdict(120 * MiB, READY, config) == (
        "recycle",
        "resident memory 120.0 MiB is over max_rss",
    )
    assert memory_verdict(120 * MiB, BOOTING, config) is None  # nothing to recycle yet


@pytest.mark.parametrize("state", list(WorkerState))
def test_far_over_max_rss_any_worker_is_killed_at_once(config, state):
    action, reason = memory_verdict(151 * MiB, state, config)
    assert action == "kill"
    assert reason == "resident memory 151.0 MiB exceeded max_rss 100.0 MiB more than 1.5 times"


def test_without_max_rss_memory_is_not_watched(config):
    unlimited = replace(config, limits=replace(config.limits, max_rss=0))
    assert memory_verdict(10_000 * MiB, READY, unlimited) is None


def test_over_max_private_a_ready_worker_is_recycled_and_far_over_it_killed(config):
    assert private_verdict(39 * MiB, READY, config) is None
    assert private_verdict(50 * MiB, READY, config) == (
        "recycle",
        "private memory 50.0 MiB is over max_private",
    )
    assert private_verdict(50 * MiB, DRAINING, config) is None  # already on its way out
    assert private_verdict(61 * MiB, DRAINING, config) == (
        "kill",
        "private memory 61.0 MiB exceeded max_private 40.0 MiB more than 1.5 times",
    )


def test_max_private_and_max_rss_judge_separately(config):
    """A preloaded worker resident beyond max_private is not over it for that."""
    assert memory_verdict(90 * MiB, READY, config) is None
    assert private_verdict(10 * MiB, READY, config) is None
    unlimited = replace(config, limits=replace(config.limits, max_private=0))
    assert private_verdict(10_000 * MiB, READY, unlimited) is None
