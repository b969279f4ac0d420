"""When to replace a worker, and when to give up: the supervisor's policy, pure.

Nothing here forks, signals or reads a clock: the supervisor passes the time
and what it observed, and acts on the answers. That keeps the rules testable
in-process (tests/host/test_respawner.py), as ``Router`` keeps the relay's.

- A worker that dies is respawned after a backoff that doubles per quick
  death of its slot, up to a cap; one that lived ``STABLE_SECONDS`` resets it.
- Only the initial start may be fatal: before any worker was ever ready, a
  worker that fails to start (its init raised, or it was killed booting), or
  ``MAX_BOOT_DEATHS`` deaths in a row while booting, stop the host, since
  forking forever would not help. After that, a failed start is a crash of
  its slot, retried with the backoff and reported as a problem of the slot.
- Stuck workers (a handler past its deadline plus the grace, a drain past its
  deadline, a boot past ``boot_timeout``) are killed; bloated ones are
  recycled over ``max_rss`` or ``max_private`` and killed at once far over
  either.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import Config
from ..exits import Exit, HostError
from .handle import WorkerState

# Respawn backoff after a crash: doubles per quick death, up to the cap.
BACKOFF_START, BACKOFF_CAP = 0.1, 10.0
# A worker that lived this long resets its slot's backoff.
STABLE_SECONDS = 10.0
# This many workers in a row dying before any was ever ready means they
# cannot start at all; the host exits instead of forking forever.
MAX_BOOT_DEATHS = 3


@dataclass(frozen=True)
class Death:
    """What the supervisor knows of a worker that exited."""

    slot: int
    state: WorkerState  # its state when it died
    how: str  # "exited with code 1", or why the supervisor killed it
    lived: float  # seconds
    failure: str | None = None  # the traceback of its FAILED frame
    killed: bool = False  # by the supervisor

    @property
    def failed_start(self) -> bool:
        """init raised (FAILED frame), or the supervisor killed it booting."""
        return self.state is WorkerState.BOOTING and (self.failure is not None or self.killed)

    @property
    def problem(self) -> str:
        """One line on what is wrong with its slot, for STATUS= and `irishost status`."""
        if self.failed_start:
            return f"failed to start: {_last_line(self.failure) or self.how}"
        return self.how


@dataclass
class Respawner:
    ever_ready: bool = False  # a worker has been ready: start-up failures stop being fatal
    restarts: int = 0
    slot_restarts: dict[int, int] = field(default_factory=dict)
    problems: dict[int, str] = field(default_factory=dict)  # until the slot is ready again
    _boot_deaths: int = 0
    _slot_failures: dict[int, int] = field(default_factory=dict)
    _due: list[tuple[float, int]] = field(default_factory=list)  # (when, slot)

    def on_ready(self, slot: int) -> None:
        self.ever_ready = True
        self.problems.pop(slot, None)

    def on_death(self, death: Death, now: float, count: int) -> float | None:
        """Schedule the slot's respawn; the delay, or None when the slot is not wanted.

        Raises HostError when the host cannot start at all.
        """
        if not self.ever_ready:
            self._check_start_up(death)
        if death.slot >= count:
            return None  # scaled down meanwhile
        self.restarts += 1
        self.slot_restarts[death.slot] = self.slot_restarts.get(death.slot, 0) + 1
        return self._schedule(death.slot, death.problem, death.lived >= STABLE_SECONDS, now)

    def on_spawn_failure(self, slot: int, reason: str, now: float, count: int) -> float | None:
        """No worker could be forked for ``slot`` (fork failed, the fork server
        died or missed its deadline): retry with the slot's backoff; the delay,
        or None when the slot is not wanted. Never fatal: the cause lies
        outside the handler (a process limit, memory), and may lift."""
        if slot >= count:
            return None
        return self._schedule(slot, reason, False, now)

    def _schedule(self, slot: int, problem: str, stable: bool, now: float) -> float:
        """The slot's respawn after its backoff, which doubles per quick failure."""
        self.problems[slot] = problem
        failures = 0 if stable else self._slot_failures.get(slot, 0)
        self._slot_failures[slot] = failures + 1
        delay: float = min(BACKOFF_START * 2**failures, BACKOFF_CAP)
        self._due.append((now + delay, slot))
        return delay

    def _check_start_up(self, death: Death) -> None:
        if death.failed_start:
            message = f"worker {death.slot} failed to start"
            if death.failure is None:
                raise HostError(Exit.HANDLER, f"{message}: {death.how}")
            raise HostError(Exit.HANDLER, message, death.failure)
        if death.state is WorkerState.BOOTING:
            self._boot_deaths += 1
            if self._boot_deaths >= MAX_BOOT_DEATHS:
                raise HostError(
                    Exit.HANDLER, f"workers keep dying during start-up; the last one {death.how}"
                )

    def due(self, now: float) -> list[int]:
        """The slots whose respawn is due, forgotten here once returned."""
        slots = [slot for when, slot in self._due if when <= now]
        self._due = [(when, slot) for when, slot in self._due if when > now]
        return slots

    def next_due(self) -> float | None:
        return min((when for when, _ in self._due), default=None)

    def slot_problems(self, count: int) -> dict[int, str]:
        return {slot: text for slot, text in sorted(self.problems.items()) if slot < count}


def stuck_reason(
    state: WorkerState,
    running_deadline: float | None,
    started: float,
    drain_deadline: float,
    now: float,
    config: Config,
) -> str | None:
    """Why a worker must be killed as stuck, or None."""
    grace = config.workers.timeout_grace
    boot_timeout = config.workers.boot_timeout
    if running_deadline is not None and now > running_deadline + grace:
        return f"a handler ran past its deadline plus {grace:g} s"
    if state is WorkerState.DRAINING and now > drain_deadline:
        return "did not drain in time"
    if state is WorkerState.BOOTING and now > started + boot_timeout:
        return f"still starting after workers.boot_timeout ({boot_timeout:g} s)"
    return None


def memory_verdict(rss: int, state: WorkerState, config: Config) -> tuple[str, str] | None:
    """("kill", reason) far over max_rss, ("recycle", reason) over it, else None."""
    return _cap_verdict("resident memory", "max_rss", rss, config.limits.max_rss, state, config)


def private_verdict(uss: int, state: WorkerState, config: Config) -> tuple[str, str] | None:
    """The same for private memory and max_private."""
    cap = config.limits.max_private
    return _cap_verdict("private memory", "max_private", uss, cap, state, config)


def _cap_verdict(
    what: str, key: str, size: int, cap: int, state: WorkerState, config: Config
) -> tuple[str, str] | None:
    """("kill", reason) far over ``cap``, ("recycle", reason) over it, else None.

    Recycling drains a worker first, which takes as long as its slowest
    request: a handler leaking fast would reach many times the cap
    meanwhile. So beyond ``max_rss_kill_factor`` times the cap a worker,
    booting, ready or draining, is killed without waiting.
    """
    if not cap:
        return None
    factor = config.limits.max_rss_kill_factor
    if size > cap * factor:
        return (
            "kill",
            f"{what} {_mib(size)} exceeded {key} {_mib(cap)} more than {factor:g} times",
        )
    if size > cap and state is WorkerState.READY:
        return ("recycle", f"{what} {_mib(size)} is over {key}")
    return None


def fresh_memory_problem(max_rss: int, rss: int) -> str | None:
    """Why ``max_rss`` cannot work when a fresh worker starts with ``rss``, or None.

    Every worker would be recycled at birth, and the slot crash-loop.
    """
    if not max_rss or rss <= max_rss:
        return None
    return (
        f"{_mib(max_rss)} is below a fresh worker's resident memory "
        f"({_mib(rss)}, the fork server's after importing the handler)"
    )


def _last_line(text: str | None) -> str:
    """A traceback's last line (the exception), to name a failure in one line."""
    lines = (text or "").strip().splitlines()
    return lines[-1] if lines else ""


def _mib(size: int) -> str:
    if size < 2**20:  # "0.0 MiB" would hide a limit of a few bytes
        return f"{size} B"
    return f"{size / 2**20:.1f} MiB"
