"""A signal wake-up pipe: signal handlers only note a signal, the loop wakes.

``signal.set_wakeup_fd`` makes the interpreter write a byte to the pipe when
a signal arrives, so a loop blocked in ``poll``/``select`` on it wakes at
once; the loop empties it and handles what the handlers noted. Used by the
supervisor and by the fork server, each for its own loop. Another thread
that queues work for the loop (the control socket's) wakes it with
:meth:`WakeupPipe.wake`.
"""

from __future__ import annotations

import os
import signal


class WakeupPipe:
    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        for fd in (self._read, self._write):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)

    def fileno(self) -> int:
        return self._read

    def wake(self) -> None:
        try:
            os.write(self._write, b"\0")
        except BlockingIOError:
            pass  # the pipe is full: the loop has a wake-up pending already

    def empty(self) -> None:
        try:
            while os.read(self._read, 4096):
                pass
        except BlockingIOError:
            pass
