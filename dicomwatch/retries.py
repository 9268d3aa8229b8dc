"""What happens after a file could not be filed: the policy (pure) and the back-off queue.

``decide`` is the whole retry policy as one pure function of the result and what is
known of earlier attempts, so tests call it without files or processes.  ``Retries``
holds the state: failures per file, the back-off heap, and when each file first failed,
which is what makes a file that keeps failing visible as *stuck*.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import Enum

from dicomwatch.config import Config
from dicomwatch.reasons import CRASH_REASONS, Reason
from dicomwatch.result import Result
from dicomwatch.sorter import Task

log = logging.getLogger(__name__)


class Next(Enum):
    """What the parent does with a finished task."""

    REPORT = "report"
    """Filed (archive or quarantine): report it, forget its failures."""
    FORGET = "forget"
    """It vanished after we claimed it (someone removed it): nothing left to file or lose."""
    QUARANTINE_NOW = "quarantine_now"
    """Workers died on it ``max_attempts`` times: quarantine it unread."""
    BACK_OFF = "back_off"
    """Try again after a delay that doubles with each failure."""
    HAND_BACK = "hand_back"
    """Stopping: put it back into the inbox for the next start."""


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 3
    initial_seconds: float = 5.0
    max_seconds: float = 300.0

    @classmethod
    def from_config(cls, cfg: Config) -> RetryPolicy:
        return cls(cfg.max_attempts, cfg.retry_initial_seconds, cfg.retry_max_seconds)

    def delay(self, failures: int) -> float:
        """Seconds before attempt ``failures + 1``: doubling, capped."""
        return float(min(self.initial_seconds * (2 ** max(0, failures - 1)), self.max_seconds))


def decide(
    result: Result, crashes: int, policy: RetryPolicy, *, stopping: bool, claim_gone: bool
) -> Next:
    """The retry policy.

    ``crashes``: attempts this file already cost (worker deaths, out of memory, time
    limit).  ``claim_gone``: the claimed file no longer exists (checked by the caller only
    for a ``vanished`` result).
    """
    if result.filed:
        return Next.REPORT
    if result.reason is Reason.VANISHED and claim_gone:
        return Next.FORGET
    if result.reason in CRASH_REASONS and crashes + 1 >= policy.max_attempts:
        return Next.QUARANTINE_NOW
    return Next.HAND_BACK if stopping else Next.BACK_OFF


@dataclass
class Failing:
    """One file that failed and is not filed yet."""

    failures: int
    reason: Reason
    first_at: float
    claim: bool = False
    """It could not even be claimed (keyed by its inbox path, not a claim path)."""
    warned: bool = False


class Retries:
    """Failures per file (by claim or inbox path) and the back-off queue of claimed files."""

    def __init__(self, clock: Callable[[], float], policy: RetryPolicy) -> None:
        self.clock = clock
        self.policy = policy
        self._failing: dict[str, Failing] = {}
        self._heap: list[tuple[float, int, Task]] = []
        self._seq = 0

    def __len__(self) -> int:
        """Files waiting in back-off (the status line's ``failing``)."""
        return len(self._heap)

    def failed(self, key: str, reason: Reason, *, claim: bool = False) -> bool:
        """Record a failure of ``key``; True if it is new or its reason changed (log it)."""
        entry = self._failing.get(key)
        if entry is None:
            self._failing[key] = Failing(1, reason, self.clock(), claim=claim)
            return True
        entry.failures += 1
        changed = entry.reason is not reason
        entry.reason = reason
        return changed

    def resolve(self, key: str) -> Failing | None:
        """``key`` was filed (or claimed, for a claim failure): it is no longer failing."""
        return self._failing.pop(key, None)

    def back_off(self, task: Task, crashes: int) -> None:
        """Queue ``task`` for another attempt after the policy's delay."""
        entry = self._failing.get(task.path)
        delay = self.policy.delay(entry.failures if entry else 1)
        self._seq += 1
        heapq.heappush(
            self._heap, (self.clock() + delay, self._seq, replace(task, attempts=crashes))
        )

    def release_due(self, now: float) -> list[Task]:
        """Tasks whose back-off has passed, oldest due first."""
        out: list[Task] = []
        while self._heap and self._heap[0][0] <= now:
            out.append(heapq.heappop(self._heap)[2])
        return out

    def take_all(self) -> list[Task]:
        """Every task still in back-off (at shutdown, to hand them back)."""
        tasks = [entry[2] for entry in sorted(self._heap)]
        self._heap.clear()
        return tasks

    def stuck(self, now: float) -> tuple[int, float]:
        """Files failing or unclaimable now, and how long the oldest has been."""
        if not self._failing:
            return 0, 0.0
        return len(self._failing), now - min(e.first_at for e in self._failing.values())

    def warn_stuck(self, now: float, limit_seconds: float) -> None:
        """One warning per file once it has been failing for longer than the limit."""
        for key, entry in self._failing.items():
            if not entry.warned and now - entry.first_at > limit_seconds:
                entry.warned = True
                log.warning(
                    "stuck for %s: %s has failed %d times (last: %s)%s",
                    format_age(now - entry.first_at),
                    key,
                    entry.failures,
                    entry.reason,
                    "; the daemon cannot move it out of its folder (see the README: sender "
                    "folders must be group-writable)"
                    if entry.claim
                    else "",
                )

    def prune_claims(self, exists: Callable[[str], bool]) -> None:
        """Forget claim failures of files that are gone (after a full rescan)."""
        for key in [k for k, e in self._failing.items() if e.claim and not exists(k)]:
            del self._failing[key]


def format_age(seconds: float) -> str:
    """``45s``, ``2m10s``, ``3h05m``: short enough for a status line."""
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
