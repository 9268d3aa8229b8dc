"""Signals as flags plus a wake-up pipe: the handler records, the loop decides.

A handler that did real work could run in the middle of any line of the loop; this one
only appends the signal number.  ``signal.set_wakeup_fd`` writes a byte to a pipe the
loop also waits on, so a signal ends the wait at once instead of at the next timeout.
The observer uses the same pipe to say "a file event is queued".
"""

from __future__ import annotations

import contextlib
import os
import signal
from types import FrameType
from typing import Any

HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Signals:
    """Pending signals and the wake pipe (``fd`` to wait on, ``wake_fd`` to write to)."""

    def __init__(self) -> None:
        self._pending: list[int] = []
        self.fd, self.wake_fd = os.pipe()
        os.set_blocking(self.fd, False)
        os.set_blocking(self.wake_fd, False)
        self._old: dict[int, Any] = {}

    def install(self) -> None:
        """Take over SIGTERM, SIGINT and SIGHUP (main thread only)."""
        signal.set_wakeup_fd(self.wake_fd, warn_on_full_buffer=False)
        for sig in HANDLED:
            self._old[sig] = signal.signal(sig, self._handler)

    def _handler(self, signum: int, _frame: FrameType | None) -> None:
        self._pending.append(signum)

    def take(self) -> list[int]:
        """The signals received since the last call, oldest first."""
        taken, self._pending = self._pending, []
        return taken

    def pending_stop(self) -> int | None:
        """A stop signal that arrived and was not yet taken (a second SIGTERM)."""
        return next((s for s in self._pending if s != signal.SIGHUP), None)

    def drain(self) -> None:
        """Empty the wake pipe after a wait, so the next wait blocks again."""
        with contextlib.suppress(BlockingIOError, OSError):
            while os.read(self.fd, 512):
                pass

    def restore(self) -> None:
        for sig, previous in self._old.items():
            signal.signal(sig, previous)
        if self._old:
            signal.set_wakeup_fd(-1)
        self._old.clear()

    def close(self) -> None:
        self.restore()
        for fd in (self.fd, self.wake_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
