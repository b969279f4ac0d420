"""The supervisor's generation policy in-process, with a fake spawner: no fork,
no fork server. Reloads and their arithmetic (all of a generation's slots
ready before it takes over; a scale during a reload applies to the new
generation), one reload at a time, and what each kind of fork-server answer
does to the running generation and to a rollout. The same paths run through
real processes in test_irishost_process_model.py and its neighbours.
"""

from __future__ import annotations

import logging

import pytest

from iris.logs import ContextLog
from irishost.config import Config, load_config
from irishost.exits import Exit, HostError
from irishost.ops.notify import Notifier
from irishost.supervisor.generation import Generation
from irishost.supervisor.generations import Generations
from irishost.supervisor.handle import WorkerHandle, WorkerState
from irishost.supervisor.relay_link import RelayLink
from irishost.supervisor.spawner import LaunchFailed, Spawned, SpawnerEvent, SpawnFailed
from irishost.supervisor.switchboard import Switchboard
from irishost.supervisor.worker_table import Change, WorkerTable
from irishost.supervisor.workforce import Workforce
from irishost.wire.ring import Ring

# Fake workers get pids above the kernel's pid_max, so that no signal the
# policy sends (SIGKILL to a given-up worker) can reach a real process.
with open("/proc/sys/kernel/pid_max") as _file:
    PID_BASE = int(_file.read()) + 1000


class FakeSpawner:
    """What the workforce asks of a Spawner, recorded; the test plays the fork server."""

    def __init__(self) -> None:
        self.launched: list[int] = []  # generation codes
        self.asked: list[tuple[int, int]] = []  # (slot, generation number), unanswered
        self.retained: set[int] | None = None
        self.rings: list[Ring] = []
        self._pids = iter(range(PID_BASE, PID_BASE + 10_000))
        self._generations: dict[int, Generation] = {}

    def launch(self, generation: Generation) -> None:
        self.launched.append(generation.code)
        self._generations[generation.number] = generation

    def spawn(self, slot: int, generation: Generation) -> None:
        self._generations[generation.number] = generation
        self.asked.append((slot, generation.number))

    def spawning(self, generation: int) -> set[int]:
        return {slot for slot, number in self.asked if number == generation}

    def retain(self, generations: set[int]) -> None:
        self.retained = generations

    def answer(self, slot: int, generation: int) -> Spawned:
        """The fork server's answer to the spawn for ``slot``: a worker."""
        self.asked.remove((slot, generation))
        inbox, outbox = Ring.create(1024, "irishost-test"), Ring.create(1024, "irishost-test")
        self.rings += [inbox, outbox]
        handle = WorkerHandle(slot, next(self._pids), inbox, outbox, 0)
        handle.generation = generation
        return Spawned(handle, server=1, threads=1)

    def fail(self, slot: int, generation: int, reason: str = "fork failed (EAGAIN)") -> SpawnFailed:
        self.asked.remove((slot, generation))
        return SpawnFailed(slot, self._generations[generation], reason)

    def generation(self, number: int) -> Generation:
        return self._generations[number]


class Host:
    """A Generations over a real workforce, table, switchboard and link, and the fake spawner."""

    def __init__(self, config: Config):
        self.config = config
        self.log = ContextLog(logging.getLogger("irishost.test"))
        self.table = WorkerTable()
        self.spawner = FakeSpawner()
        self.workforce = Workforce(Generation(0, config, 0), self.table, self.spawner, self.log)
        switchboard = Switchboard(config, self.log, self.table, self.workforce.recycle)
        self.link = RelayLink(config, switchboard, self.log)
        self.generations = Generations(
            self.workforce, switchboard, self.link, Notifier(None, None), self.log, {}
        )
        self.replies: list[tuple[bool, str]] = []

    def reply(self, ok: bool, line: str) -> None:
        self.replies.append((ok, line))

    def tell(self, event: SpawnerEvent) -> WorkerHandle | None:
        return self.generations.on_spawner(event, stopping=False)

    def boot(self, slot: int, generation: int) -> WorkerHandle:
        """The spawn for ``slot`` answered, and its worker READY."""
        handle = self.tell(self.spawner.answer(slot, generation))
        assert handle is not None
        self.table.transition(handle, Change.BOOTED)
        self.workforce.respawner.on_ready(slot)
        self.generations.on_ready(handle)
        return handle

    def start(self) -> list[WorkerHandle]:
        """The first generation up, as Supervisor.run brings it."""
        self.spawner.launch(self.workforce.generation)
        for slot in range(self.workforce.count):
            self.workforce.spawn(slot)
        return [self.boot(slot, 0) for slot in range(self.workforce.count)]

    def close(self) -> None:
        for ring in self.spawner.rings:
            ring.close()


@pytest.fixture
def host(tmp_path):
    (tmp_path / "h.py").write_text("class H:\n    pass\n")
    path = tmp_path / "service.toml"
    path.write_text('[service]\ncluster = "c"\nhandler = "h:H"\n[workers]\ncount = 2\n')
    made = Host(load_config(path))
    yield made
    made.close()


def test_a_reload_takes_over_once_every_slot_of_it_is_ready(host):
    old = host.start()
    host.generations.reload(host.reply)
    assert host.replies == [(True, host.replies[0][1])]
    assert host.replies[0][1].startswith("reload started (generation 1)")
    assert host.spawner.launched == [0, 1]
    assert sorted(host.spawner.spawning(1)) == [0, 1]

    host.boot(0, 1)
    assert host.workforce.generation.number == 0  # one of two: not yet
    host.boot(1, 1)
    assert host.workforce.generation.number == 1
    assert host.generations.rollout is None
    assert [w.state for w in old] == [WorkerState.DRAINING] * 2
    assert host.spawner.retained == {1}


def test_a_reload_during_a_reload_is_refused_and_says_which(host):
    host.start()
    host.generations.reload(host.reply)
    host.generations.reload(host.reply)
    assert host.replies[1] == (False, "reload already in progress (generation 1)")
    assert host.spawner.launched == [0, 1]


def test_a_scale_during_a_reload_applies_to_the_new_generation(host):
    host.start()
    host.generations.reload(host.reply, wait=True)
    answer = host.generations.scale(3)
    assert answer == "scaling to 3 workers: applies to the reload in progress (generation 1)"
    assert sorted(host.spawner.spawning(1)) == [0, 1, 2]
    host.boot(0, 1)
    host.boot(1, 1)
    assert host.workforce.generation.number == 0  # slot 2 is not ready yet
    host.boot(2, 1)
    assert (host.workforce.generation.number, host.workforce.count) == (1, 3)
    assert host.replies == [(True, "reload complete (generation 1)")]


def test_a_failed_spawn_fails_the_reload_and_keeps_the_running_workers(host):
    old = host.start()
    host.generations.reload(host.reply, wait=True)
    host.boot(0, 1)
    host.tell(host.spawner.fail(1, 1))
    assert host.generations.rollout is None
    assert host.workforce.generation.number == 0
    assert [w.state for w in old] == [WorkerState.READY] * 2
    assert host.replies == [
        (
            False,
            "reload failed: could not start new worker 1: fork failed (EAGAIN); "
            "the running workers carry on",
        )
    ]
    assert host.spawner.retained == {0}
    (fresh,) = host.table.of_generation(1)
    assert fresh.kill_reason is not None  # killed, reaped later


def test_a_fork_server_that_cannot_start_fails_the_reload_not_the_host(host):
    host.start()
    host.generations.reload(host.reply, wait=True)
    generation = host.spawner.generation(1)
    host.tell(LaunchFailed(generation, Exit.HANDLER, "handler error: boom", "Traceback"))
    assert host.replies == [
        (False, "reload failed: handler error: boom; the running workers carry on")
    ]
    assert host.workforce.generation.number == 0


def test_a_fork_server_that_cannot_start_at_start_up_ends_the_host(host):
    host.spawner.launch(host.workforce.generation)
    host.workforce.spawn(0)
    with pytest.raises(HostError) as raised:
        host.tell(LaunchFailed(host.workforce.generation, Exit.HANDLER, "handler error: boom"))
    assert raised.value.code == Exit.HANDLER


def test_a_failed_spawn_of_the_running_generation_is_retried_with_backoff(host):
    host.start()
    host.workforce.spawn(1)  # a respawn, say
    host.tell(host.spawner.fail(1, 0))
    assert host.workforce.respawner.problems == {1: "fork failed (EAGAIN)"}
    assert host.workforce.respawner.next_due() is not None
    assert host.workforce.respawner.restarts == 0  # no worker died


def test_a_worker_of_a_generation_given_up_meanwhile_is_not_taken_on(host):
    host.start()
    host.generations.reload(host.reply)
    host.tell(host.spawner.fail(0, 1))  # the reload fails; slot 1's spawn is still out
    assert host.tell(host.spawner.answer(1, 1)) is None
    assert host.table.of_generation(1) == []


def test_a_config_the_fork_server_refuses_at_start_up_ends_the_host_with_exit_3(host):
    """[settings] the class does not take, or a max_rss below a fresh worker's memory."""
    host.spawner.launch(host.workforce.generation)
    failed = LaunchFailed(
        host.workforce.generation, Exit.CONFIG, "config error: limits.max_rss: ..."
    )
    with pytest.raises(HostError) as raised:
        host.tell(failed)
    assert raised.value.code == Exit.CONFIG
