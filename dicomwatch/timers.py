"""Periodic actions on the injected clock: the daemon's watchdog, status, summary, rescan.

Each timer is an object that knows when it is next due (pynetdicom keeps its ARTIM timer
the same way), so the loop asks "what is due?" instead of carrying a ``next_*`` variable
per action, and a test drives every timer by advancing a fake clock.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass


@dataclass
class Every:
    """Run ``action(now)`` every ``interval`` seconds, the first time at ``next_at``.

    An action that returns ``False`` could not run yet (a rescan while the last one is
    still walking): it stays due and is tried again on the next turn.
    """

    name: str
    interval: float
    action: Callable[[float], bool | None]
    next_at: float = 0.0

    def due(self, now: float) -> bool:
        return now >= self.next_at

    def fire_if_due(self, now: float) -> None:
        if self.due(now) and self.action(now) is not False:
            self.next_at = now + self.interval

    def fire_now(self, now: float) -> None:
        """Run at once (an early rescan), then restart the interval from now."""
        if self.action(now) is not False:
            self.next_at = now + self.interval


class Timers:
    """The daemon's timers; ``fire_due`` runs what is due, ``next_due`` bounds the wait."""

    def __init__(self, timers: Iterable[Every] = ()) -> None:
        self._timers: list[Every] = list(timers)

    def add(self, timer: Every) -> Every:
        self._timers.append(timer)
        return timer

    def fire_due(self, now: float) -> None:
        for timer in self._timers:
            timer.fire_if_due(now)

    def next_due(self) -> float | None:
        return min((t.next_at for t in self._timers), default=None)
