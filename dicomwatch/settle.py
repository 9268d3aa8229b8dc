"""Decide when a file in the inbox has finished arriving.

Senders give no reliable "done" signal: ``cp`` and ``storescp`` write in place, ``scp``
may set times after the last write, network shares deliver no events at all for remote
writers, and a slow sender can pause mid-file for seconds.  The only evidence that holds
everywhere is the file itself: if its ``(st_size, st_mtime_ns)`` signature stays the same
for ``settle_seconds`` on the monotonic clock, nobody is writing to it.

This module is deliberately pure: no threads, no sleeps, no watchdog.  The clock and the
``stat`` function are injected, so every timing rule is tested with a fake clock and a
fake file system instead of real sleeps.

Readiness always rests on two successful stats with the same signature, taken at least
the applicable wait apart, with no change reported in between.  Events (``touch``) only
restart timers or, for an inotify close-write, shorten the wait; they never replace that
check.
"""

from __future__ import annotations

import os
import stat as stat_mod
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

__all__ = ["SettleTracker", "Signature", "special_kind"]

Signature = tuple[int, int]
"""``(st_size, st_mtime_ns)``: what must stay unchanged for a file to count as complete."""

MAX_REMEMBERED_SPECIAL = 100_000
"""How many rejected special paths are remembered so each is reported once, not on every
rescan.  Bounded so that a flood of symlinks cannot grow memory without limit; past the
bound the oldest are forgotten and may be reported again."""


def special_kind(mode: int) -> str | None:
    """Name the kind of a non-regular file from its ``st_mode``; ``None`` for a regular file.

    Shared with :func:`dicomwatch.watcher.scan` so that the scan and the tracker report
    the same words for the same thing.  The mode must come from ``lstat`` (or
    ``DirEntry.stat(follow_symlinks=False)``): following a link would let a symlink in
    the inbox smuggle in a file from anywhere on the machine.
    """
    if stat_mod.S_ISREG(mode):
        return None
    if stat_mod.S_ISLNK(mode):
        return "symlink"
    if stat_mod.S_ISDIR(mode):
        return "directory"
    if stat_mod.S_ISFIFO(mode):
        return "fifo"
    if stat_mod.S_ISSOCK(mode):
        return "socket"
    if stat_mod.S_ISCHR(mode) or stat_mod.S_ISBLK(mode):
        return "device"
    return "other"


@dataclass(slots=True)
class _Entry:
    """One tracked path.  ``slots`` because 100,000 of these must stay cheap."""

    sig: Signature | None
    """Signature at the last stat, or ``None`` when that stat failed (not yet known)."""
    deadline: float
    """Clock time at which the signature is compared again."""
    first_seen: float
    """Clock time the path started being tracked (for ``oldest_age``)."""
    fast: bool
    """True while the path waits the shorter close-write time (it sits in the fast queue)."""


class SettleTracker:
    """Track files that are still arriving and report those that have stopped changing.

    Entries live in two insertion-ordered queues, one per wait length (``settle_seconds``
    and ``closed_settle_seconds``).  Every (re)schedule appends ``now + wait`` to the end
    of one queue; since the clock is monotonic and the wait of a queue is fixed, each
    queue stays sorted by deadline without any sorting.  ``ready`` therefore only ever
    looks at queue heads: with 100,000 tracked paths and nothing due it does not call
    ``stat`` at all.
    """

    def __init__(
        self,
        settle_seconds: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        stat: Callable[[str], os.stat_result] = os.lstat,
        closed_settle_seconds: float | None = None,
    ) -> None:
        """Create a tracker.

        ``stat`` defaults to ``os.lstat`` so symlinks are classified, never followed.
        ``closed_settle_seconds`` defaults to a quarter of ``settle_seconds``: a
        close-write is strong evidence the writer is done, but not proof (it may reopen),
        so a shorter signature check still has to pass.
        """
        if not settle_seconds > 0:  # also rejects NaN
            raise ValueError(f"settle_seconds must be > 0, got {settle_seconds!r}")
        closed = settle_seconds / 4 if closed_settle_seconds is None else closed_settle_seconds
        if not 0 <= closed <= settle_seconds:
            raise ValueError(
                f"closed_settle_seconds must be between 0 and settle_seconds "
                f"({settle_seconds!r}), got {closed!r}"
            )
        self._settle = float(settle_seconds)
        self._closed_settle = float(closed)
        self._closed_is_derived = closed_settle_seconds is None
        self._clock = clock
        self._stat = stat
        self._slow: OrderedDict[str, _Entry] = OrderedDict()
        self._fast: OrderedDict[str, _Entry] = OrderedDict()
        # A third view ordered by first sighting, so oldest_age() is O(1) as well.
        self._by_age: OrderedDict[str, _Entry] = OrderedDict()
        self._special_pending: list[tuple[str, str]] = []
        self._special_known: OrderedDict[str, str] = OrderedDict()

    @property
    def settle_seconds(self) -> float:
        """How long a signature must stay unchanged without a close-write hint.

        Settable (configuration reload).  Timers already running keep their deadline;
        only later (re)starts use the new value.  Lowering it can therefore delay a path
        queued behind older, longer timers by at most the old value, but never makes
        anything ready early.  A derived ``closed_settle_seconds`` (the default quarter)
        follows; an explicit one is capped at the new value.
        """
        return self._settle

    @settle_seconds.setter
    def settle_seconds(self, value: float) -> None:
        if not value > 0:
            raise ValueError(f"settle_seconds must be > 0, got {value!r}")
        self._settle = float(value)
        if self._closed_is_derived:
            self._closed_settle = self._settle / 4
        else:
            self._closed_settle = min(self._closed_settle, self._settle)

    @property
    def closed_settle_seconds(self) -> float:
        """How long a signature must stay unchanged after a close-write hint."""
        return self._closed_settle

    def touch(self, path: str, *, closed: bool = False, changed: bool = True) -> bool:
        """Record that ``path`` was seen; return True if this call started tracking it.

        The path is stat'ed on every call, so the signature the timer is measured
        against is always the one at the moment of the latest event.  That lets a file
        become ready one wait after its last change instead of two.

        ``changed=True`` (the default, for events) restarts the timer even if the
        signature looks the same: an event is evidence of a write, and coarse mtime
        granularity on some file systems can hide a same-size rewrite.  Rescans must
        pass ``changed=False``: a path merely seen again keeps its timer unless its
        signature differs, so frequent rescans can never postpone readiness forever.

        ``closed=True`` (an inotify close-write) schedules the check after
        ``closed_settle_seconds`` instead of ``settle_seconds``.

        A path that has vanished is dropped; a path that is not a regular file is
        dropped and reported once through :meth:`drain_special`.  A path whose stat
        fails for another reason (EIO, ESTALE on a network share) stays tracked with an
        unknown signature and is retried, so a transient error never loses a file.
        """
        now = self._clock()
        entry = self._by_age.get(path)
        sig: Signature | None
        try:
            st = self._stat(path)
        except (FileNotFoundError, NotADirectoryError):
            if entry is not None:
                self._remove(path, entry)
            return False
        except OSError:
            sig = None
        else:
            kind = special_kind(st.st_mode)
            if kind is not None:
                if entry is not None:
                    self._remove(path, entry)
                self._reject(path, kind)
                return False
            self._special_known.pop(path, None)
            sig = (st.st_size, st.st_mtime_ns)

        if entry is None:
            entry = _Entry(sig=sig, deadline=now, first_seen=now, fast=False)
            self._by_age[path] = entry
            self._schedule(path, entry, now, fast=closed)
            return True
        if changed or sig is None or sig != entry.sig:
            entry.sig = sig
            self._schedule(path, entry, now, fast=closed)
        elif closed and now + self._closed_settle < entry.deadline:
            # Unchanged since the baseline stat, and now known to be closed: the
            # baseline stays valid, only the remaining wait shrinks.
            self._schedule(path, entry, now, fast=True)
        return False

    def ready(self, limit: int | None = None) -> list[str]:
        """Return up to ``limit`` paths whose signature held still for their whole wait.

        Only paths whose deadline has passed are stat'ed, in deadline order.  Returned
        paths are no longer tracked.  A path whose signature changed gets a new full
        ``settle_seconds`` timer (the close-write hint is stale once the file changed
        again); vanished paths are dropped silently; non-regular ones are dropped and
        reported through :meth:`drain_special`.

        ``limit`` is back-pressure: the caller takes only what its queue can hold, and
        due paths beyond the limit are left untouched (not stat'ed) for the next call.
        """
        out: list[str] = []
        if limit is not None and limit <= 0:
            return out
        now = self._clock()
        while limit is None or len(out) < limit:
            due = self._head(now)
            if due is None:
                break
            path, entry = due
            try:
                st = self._stat(path)
            except (FileNotFoundError, NotADirectoryError):
                self._remove(path, entry)
                continue
            except OSError:
                entry.sig = None
                self._schedule(path, entry, now, fast=False)
                continue
            kind = special_kind(st.st_mode)
            if kind is not None:
                self._remove(path, entry)
                self._reject(path, kind)
                continue
            sig = (st.st_size, st.st_mtime_ns)
            if sig == entry.sig:
                self._remove(path, entry)
                out.append(path)
            else:
                entry.sig = sig
                self._schedule(path, entry, now, fast=False)
        return out

    def forget(self, path: str) -> None:
        """Stop tracking ``path`` (e.g. the caller handled or deleted it another way)."""
        entry = self._by_age.get(path)
        if entry is not None:
            self._remove(path, entry)

    def drain_special(self) -> list[tuple[str, str]]:
        """Return and clear the ``(path, kind)`` pairs rejected as non-regular files.

        A path is reported again only after it was seen as a regular file in between
        (or was pushed out of the bounded memory of reported paths), so a FIFO sitting in
        the inbox is logged once, not on every rescan.
        """
        out = self._special_pending
        self._special_pending = []
        return out

    def paths(self) -> list[str]:
        """Every tracked path, longest-tracked first (a copy: safe to forget while iterating)."""
        return list(self._by_age)

    def __contains__(self, path: object) -> bool:
        return isinstance(path, str) and path in self._by_age

    def __len__(self) -> int:
        return len(self._by_age)

    def __iter__(self) -> Iterator[str]:
        """The tracked paths, oldest first (a snapshot: forgetting while iterating is fine)."""
        return iter(list(self._by_age))

    def next_due(self) -> float | None:
        """Clock time of the earliest deadline, or ``None`` if nothing is tracked.

        The daemon uses it to bound its wait, so it wakes exactly when a file may be
        ready instead of polling.
        """
        deadlines = [q[next(iter(q))].deadline for q in (self._slow, self._fast) if q]
        return min(deadlines) if deadlines else None

    def oldest_age(self) -> float:
        """Seconds since the longest-tracked path was first seen (0 if none).

        A steadily growing value in the status line means a file that never settles,
        e.g. a sender that stalled forever.
        """
        if not self._by_age:
            return 0.0
        first = self._by_age[next(iter(self._by_age))]
        return max(0.0, self._clock() - first.first_seen)

    # -- internals ------------------------------------------------------------------

    def _head(self, now: float) -> tuple[str, _Entry] | None:
        """The earliest-deadline entry of both queues if it is due at ``now``."""
        best: tuple[str, _Entry] | None = None
        for queue in (self._slow, self._fast):
            if queue:
                path = next(iter(queue))
                entry = queue[path]
                if best is None or entry.deadline < best[1].deadline:
                    best = (path, entry)
        if best is None or best[1].deadline > now:
            return None
        return best

    def _schedule(self, path: str, entry: _Entry, now: float, *, fast: bool) -> None:
        """Move ``entry`` to the end of the queue for its wait, due at ``now + wait``."""
        (self._fast if entry.fast else self._slow).pop(path, None)
        entry.fast = fast
        if fast:
            entry.deadline = now + self._closed_settle
            self._fast[path] = entry
        else:
            entry.deadline = now + self._settle
            self._slow[path] = entry

    def _remove(self, path: str, entry: _Entry) -> None:
        del self._by_age[path]
        (self._fast if entry.fast else self._slow).pop(path, None)

    def _reject(self, path: str, kind: str) -> None:
        if self._special_known.get(path) == kind:
            return
        self._special_known[path] = kind
        self._special_known.move_to_end(path)
        while len(self._special_known) > MAX_REMEMBERED_SPECIAL:
            self._special_known.popitem(last=False)
        if len(self._special_pending) < MAX_REMEMBERED_SPECIAL:
            self._special_pending.append((path, kind))
