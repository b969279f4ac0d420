"""A generation: the workers started from one reading of the config."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import Config


@dataclass(frozen=True)
class Generation:
    """The workers started from one reading of the config: the start, each
    reload and each reconnect make one, numbered from 0 and never reused.

    ``code`` names the generation whose handler code it runs, and so the fork
    server that forks its workers: a reload brings new code (``code`` is its
    own number), a reconnect restarts the running code in fresh workers.
    """

    number: int
    config: Config
    code: int
