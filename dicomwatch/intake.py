"""What arrives in the inbox: events, scans, the settle tracker, special files.

Events are hints, scans are the record (the kernel's event queue can overflow silently,
network filesystems send none); both feed one settle tracker, which says when a file
has been quiet long enough to be claimed.  The intake owns the watcher, the scanner
thread, the wish for an early rescan and the restart of an observer that stopped.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from queue import Empty, Full, Queue

from dicomwatch import watcher
from dicomwatch.config import Config
from dicomwatch.received import ReceivedFiles
from dicomwatch.settle import SettleTracker
from dicomwatch.timers import Every

log = logging.getLogger(__name__)

TRACK_LIMIT = 20_000
"""Paths being settled at once; beyond it the scan pauses and events wait for a rescan."""
OBSERVER_CHECK_SECONDS = 1.0
_SPECIAL_LIMIT = 10_000
_WATCHER_KEYS = ("ignore", "observer", "polling_interval_seconds")
"""Settings the running watcher was built with: a change means a new watcher."""


class _Scanner(threading.Thread):
    """Walks the inbox and feeds a bounded queue: a huge backlog is streamed, not listed."""

    def __init__(
        self,
        inbox: Path,
        ignore: tuple[str, ...],
        out: Queue[tuple[str, str] | None],
        stop: threading.Event,
        tidy: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(name="dicomwatch-scan", daemon=True)
        self.inbox, self.ignore, self.out, self.stop_event, self.tidy = (
            inbox,
            ignore,
            out,
            stop,
            tidy,
        )

    def run(self) -> None:
        try:
            for item in watcher.scan(self.inbox, self.ignore):
                while not self.stop_event.is_set():
                    try:
                        self.out.put(item, timeout=0.5)
                        break
                    except Full:
                        continue
                if self.stop_event.is_set():
                    return
            if self.tidy is not None and not self.stop_event.is_set():
                self.tidy()
        except OSError as exc:
            log.error("scan of %s failed: %s", self.inbox, exc)
        finally:
            with contextlib.suppress(Full):
                self.out.put(None, timeout=5)


class Intake:
    """Inbox events and scans in, settled paths out (:meth:`ready`)."""

    def __init__(
        self,
        cfg: Config,
        *,
        clock: Callable[[], float],
        wake_fd: int,
        once: bool,
        tidy: Callable[[], None],
        after_rescan: Callable[[], None],
    ) -> None:
        self.cfg = cfg
        self.clock = clock
        self.wake_fd = wake_fd
        self.once = once
        self.tidy = tidy
        self.after_rescan = after_rescan
        self.tracker = SettleTracker(cfg.settle_seconds, clock=clock)
        self.watcher: watcher.InboxWatcher | None = None
        self._scan_q: Queue[tuple[str, str] | None] = Queue(maxsize=2048)
        self._scan_stop = threading.Event()
        self._scanner: _Scanner | None = None
        self._scan_is_periodic = False
        self._scan_found = 0
        self._rescan_wanted = False
        self._noted_special: set[str] = set()
        self._inbox_gone = False
        self.initial_scan_done = False
        self.rescan_timer = Every("rescan", cfg.rescan_seconds, self._rescan)
        self.observer_timer = Every("observer", OBSERVER_CHECK_SECONDS, self._keep_watching)
        # files `dicomwatch receive` acknowledged: complete on arrival, never settled
        self.received = ReceivedFiles(cfg, wake_fd=wake_fd, watch=not once)

    # ----- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Start the watcher (not with ``--once``) and the start-up scan."""
        if not self.once:
            self.watcher = self._new_watcher()
            self.watcher.start()
            log.info("watching %s with the %s observer", self.cfg.inbox, self.watcher.kind)
        self.received.start()
        now = self.clock()
        self._start_scan(periodic=False)
        self.rescan_timer.next_at = now + self.cfg.rescan_seconds
        self.observer_timer.next_at = now + OBSERVER_CHECK_SECONDS

    def stop(self) -> None:
        self._scan_stop.set()
        self.received.stop()
        if self.watcher is not None:
            self.watcher.stop()
            self.watcher = None

    def reconfigure(self, old: Config, new: Config) -> None:
        """Apply a reloaded config: settle time, rescan interval, and a new watcher when
        the ignore patterns, the observer kind or the polling interval changed."""
        self.cfg = self.received.cfg = new
        self.tracker.settle_seconds = new.settle_seconds
        if new.rescan_seconds != old.rescan_seconds:
            self.rescan_timer.interval = new.rescan_seconds
            self.rescan_timer.next_at = min(
                self.rescan_timer.next_at, self.clock() + new.rescan_seconds
            )
        if new.ignore != old.ignore:
            self._forget_ignored()
        if self.watcher is not None and any(
            getattr(new, k) != getattr(old, k) for k in _WATCHER_KEYS
        ):
            self._restart_watcher()

    # ----- each turn -------------------------------------------------------------------

    def pump(self) -> None:
        """Events (hints) and scan results (the record) into the settle tracker."""
        self._take_events()
        self._take_scan_results()
        for path, kind in self.tracker.drain_special():
            self._note_special(path, kind)
        if self._rescan_wanted and self._scanner is None and not self.once:
            if self.clock() < self.rescan_timer.next_at:
                log.info(
                    "rescanning the inbox early (events were dropped or a folder was moved in)"
                )
            self.rescan_timer.fire_now(self.clock())

    def ready(self, limit: int) -> list[str]:
        """Settled paths, at most ``limit``; paths now ignored (after a reload) are dropped."""
        if limit <= 0:
            return []
        inbox = str(self.cfg.inbox)
        received = self.received.take(limit)
        return received + [
            path
            for path in self.tracker.ready(limit=limit - len(received))
            if not watcher.is_ignored(os.path.relpath(path, inbox), self.cfg.ignore)
        ]

    def again(self, path: str) -> None:
        """Settle ``path`` once more (its claim name is still taken)."""
        self.tracker.touch(path)

    def next_due(self) -> float | None:
        return self.tracker.next_due()

    @property
    def scanning(self) -> bool:
        return self._scanner is not None

    # ----- inside ----------------------------------------------------------------------

    def _new_watcher(self) -> watcher.InboxWatcher:
        return watcher.InboxWatcher(
            self.cfg.inbox,
            observer=self.cfg.observer,
            ignore=self.cfg.ignore,
            polling_interval_seconds=self.cfg.polling_interval_seconds,
            wake_fd=self.wake_fd,
        )

    def _consider(self, path: str) -> bool:
        """Start or restart the settle timer; False when the tracker is full.

        A close-write hint does not shorten the wait: a sender that reopens the file for
        each chunk (``cat >>`` in a loop, a resumed upload) closes it after every chunk,
        and a file growing with pauses shorter than ``settle_seconds`` must never be
        claimed part-written.  So the watcher's hint is not passed on.
        """
        if path not in self.tracker and len(self.tracker) >= TRACK_LIMIT:
            return False
        self.tracker.touch(path)
        return True

    def _take_events(self) -> None:
        if self.watcher is None:
            return
        for path, _closed_hint in self.watcher.drain(max_items=TRACK_LIMIT):
            if not self._consider(path):
                self._rescan_wanted = True
        if self.watcher.drain_dirs():
            self._rescan_wanted = True
        if self.watcher.take_overflow():
            self._rescan_wanted = True

    def _take_scan_results(self) -> None:
        while self._scanner is not None and len(self.tracker) < TRACK_LIMIT:
            try:
                item = self._scan_q.get_nowait()
            except Empty:
                return
            if item is None:
                self._scan_finished()
                return
            path, kind = item
            if kind != "file":
                self._note_special(path, kind)
                continue
            if path not in self.tracker and self._consider(path) and self._scan_is_periodic:
                self._scan_found += 1

    def _scan_finished(self) -> None:
        assert self._scanner is not None
        self._scanner.join()
        self._scanner = None
        if self._scan_is_periodic:
            if self._scan_found:
                log.info("rescan found %d files that no event announced", self._scan_found)
            self.after_rescan()
        self.initial_scan_done = True

    def _start_scan(self, *, periodic: bool) -> None:
        self._scan_is_periodic, self._scan_found = periodic, 0
        self._scanner = _Scanner(
            self.cfg.inbox,
            self.cfg.ignore,
            self._scan_q,
            self._scan_stop,
            tidy=self.tidy if periodic else None,
        )
        self._scanner.start()

    def _rescan(self, _now: float) -> bool:
        """The rescan timer's action; not due again until a running scan has finished."""
        if self.once or self._scanner is not None:
            return False
        self._rescan_wanted = False
        self.received.rescan()
        self._start_scan(periodic=True)
        return True

    def _keep_watching(self, _now: float) -> None:
        """Keep a live observer on the folder the inbox's name leads to now.

        watchdog can stop watching without an error (an inbox that read as missing
        during a network outage, or was deleted), and an inotify watch on a *renamed*
        inbox carries on watching the old folder under its new name.  Either way events
        for the inbox stop until the next rescan, which may be many minutes away.  So,
        once a second: while the inbox is missing, wait for it (one warning); when its
        name leads to a new folder (made again) or the observer died, start a new
        observer and rescan at once.
        """
        self.received.check()
        if self.once:
            return
        current = self.watcher
        if current is not None and current.alive:
            return
        inbox = self.cfg.inbox
        if not os.path.isdir(inbox):
            if not self._inbox_gone:
                log.warning(
                    "the inbox %s is gone (deleted, renamed or unmounted); files are "
                    "taken again once it is back",
                    inbox,
                )
                self._inbox_gone = True
            if current is not None:
                current.stop()
                self.watcher = None
            return
        if self._inbox_gone or (current is not None and current.replaced):
            log.warning(
                "the inbox %s is a new folder (the old one was deleted or renamed); "
                "watching the new one and rescanning",
                inbox,
            )
        elif current is None:
            return  # could not watch since a reload; the rescans carry on
        else:
            log.warning("the %s observer stopped; starting a new one", current.kind)
        self._inbox_gone = False
        self._restart_watcher()

    def _restart_watcher(self) -> None:
        """A new watcher from the current settings, and a rescan for what it missed."""
        if self.watcher is not None:
            self.watcher.stop()
        self.watcher = self._new_watcher()
        try:
            self.watcher.start()
        except FileNotFoundError:
            self.watcher = None
            self._inbox_gone = True  # gone again already: try once it is back
        except OSError as exc:
            log.error("cannot watch %s (%s); relying on rescans", self.cfg.inbox, exc)
            self.watcher = None
        else:
            log.info("%s observer now watching %s", self.watcher.kind, self.cfg.inbox)
        self._rescan_wanted = True  # events between the two watchers were not seen

    def _forget_ignored(self) -> None:
        inbox = str(self.cfg.inbox)
        for path in [
            p
            for p in self.tracker.paths()
            if watcher.is_ignored(os.path.relpath(p, inbox), self.cfg.ignore)
        ]:
            self.tracker.forget(path)

    def _note_special(self, path: str, kind: str) -> None:
        if path in self._noted_special:
            return
        if len(self._noted_special) > _SPECIAL_LIMIT:
            self._noted_special.clear()
        self._noted_special.add(path)
        log.warning("left alone: %s is a %s, not a regular file", path, kind)
