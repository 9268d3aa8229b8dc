"""Where every per-file result goes: one set of sinks that ``run`` and ``sort`` share.

The log line, the counters (and the index, series tracking and metrics as they come)
are each one sink.  The parent hands every result to :class:`Sinks` once, so a new
consumer is one more sink, never another hand-written pump in each command.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Protocol

from dicomwatch.logconfig import log_result
from dicomwatch.reasons import Reason
from dicomwatch.result import Outcome, Result
from dicomwatch.sorter import Task


class ResultSink(Protocol):
    def on_result(self, task: Task, result: Result) -> None:
        """One finished attempt at one file (filed, or failed and to be retried)."""

    def flush(self) -> None:
        """Make buffered work durable: from a timer and at shutdown, never per file."""


class Counters:
    """Attempts and outcomes, each counted exactly once per result."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.started = clock()
        self.outcomes: dict[Outcome, int] = dict.fromkeys(Outcome, 0)
        self.bytes = 0

    def on_result(self, task: Task, result: Result) -> None:
        self.outcomes[result.outcome] += 1
        self.bytes += result.bytes

    def flush(self) -> None:
        pass

    @property
    def filed(self) -> int:
        """Files with a durable copy (archive or quarantine)."""
        return sum(v for k, v in self.outcomes.items() if k is not Outcome.FAILED)

    @property
    def total(self) -> int:
        return sum(self.outcomes.values())

    @property
    def bad(self) -> int:
        """Quarantined files and failed attempts: what makes the exit status 1."""
        return self.outcomes[Outcome.QUARANTINED] + self.outcomes[Outcome.FAILED]

    def filed_text(self) -> str:
        c = self.outcomes
        return (
            f"filed {self.filed} (sorted {c[Outcome.SORTED]}, duplicates "
            f"{c[Outcome.DUPLICATE]}, conflicts {c[Outcome.CONFLICT]}, quarantined "
            f"{c[Outcome.QUARANTINED]})"
        )

    def sort_summary(self) -> str:
        """``sort``'s closing line: counts, rate and volume."""
        elapsed = max(self.clock() - self.started, 1e-9)
        c = self.outcomes
        return (
            f"sorted {c[Outcome.SORTED]}, duplicates {c[Outcome.DUPLICATE]}, "
            f"conflicts {c[Outcome.CONFLICT]}, quarantined {c[Outcome.QUARANTINED]}, "
            f"failed {c[Outcome.FAILED]}; {self.total} files in {elapsed:.1f} s, "
            f"{self.total / elapsed:.1f} files/s, {self.bytes / elapsed / 1e6:.1f} MB/s"
        )


class LogSink:
    """The one line per file.  A file that keeps failing for the same reason is logged
    once, not on every retry: the stuck counter and its warning say that it goes on."""

    MAX_REMEMBERED = 100_000

    def __init__(self) -> None:
        self._last_failure: dict[str, Reason | None] = {}

    def on_result(self, task: Task, result: Result) -> None:
        if result.outcome is Outcome.FAILED:
            if task.path in self._last_failure and self._last_failure[task.path] == result.reason:
                return
            if len(self._last_failure) >= self.MAX_REMEMBERED:
                self._last_failure.clear()
            self._last_failure[task.path] = result.reason
        else:
            self._last_failure.pop(task.path, None)
        log_result(result)

    def flush(self) -> None:
        pass


class Sinks:
    """Fan one result out to every sink, in order."""

    def __init__(self, sinks: Iterable[ResultSink]) -> None:
        self.sinks = list(sinks)

    def on_result(self, task: Task, result: Result) -> None:
        for sink in self.sinks:
            sink.on_result(task, result)

    def flush(self) -> None:
        for sink in self.sinks:
            sink.flush()
