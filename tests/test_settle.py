"""SettleTracker: every timing rule with a fake clock and a fake file system, no sleeps."""

from __future__ import annotations

import errno
import os
import stat

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dicomwatch.settle import SettleTracker, special_kind

REG = stat.S_IFREG | 0o644
SETTLE = 4.0  # a power of two keeps every clock value below exact in binary floating point


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeFS:
    """``path -> (size, mtime_ns, mode)``; counts stat calls; can fail a path on demand."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.files: dict[str, tuple[int, int, int]] = {}
        self.errors: dict[str, OSError] = {}
        self.calls = 0

    def __call__(self, path: str) -> os.stat_result:
        self.calls += 1
        if path in self.errors:
            raise self.errors[path]
        try:
            size, mtime_ns, mode = self.files[path]
        except KeyError:
            raise FileNotFoundError(errno.ENOENT, "No such file", path) from None
        return os.stat_result(
            (mode, 0, 0, 1, 0, 0, size, 0, mtime_ns // 10**9, 0), {"st_mtime_ns": mtime_ns}
        )

    def write(self, path: str, nbytes: int = 100) -> None:
        """Append ``nbytes`` now: size grows and mtime moves to the clock's time."""
        size = self.files[path][0] if path in self.files else 0
        self.files[path] = (size + nbytes, int(self.clock.now * 1e9), REG)

    def make(self, path: str, mode: int) -> None:
        self.files[path] = (0, int(self.clock.now * 1e9), mode)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def fs(clock: FakeClock) -> FakeFS:
    return FakeFS(clock)


@pytest.fixture
def tracker(clock: FakeClock, fs: FakeFS) -> SettleTracker:
    return SettleTracker(SETTLE, clock=clock, stat=fs)


def test_not_ready_before_settle_ready_at_settle(
    tracker: SettleTracker, clock: FakeClock, fs: FakeFS
) -> None:
    fs.write("a")
    assert tracker.touch("a") is True
    assert "a" in tracker and len(tracker) == 1
    assert tracker.next_due() == clock.now + SETTLE
    clock.advance(SETTLE - 0.25)
    assert tracker.ready() == []
    clock.advance(0.25)
    assert tracker.ready() == ["a"]
    assert "a" not in tracker and len(tracker) == 0
    assert tracker.ready() == []
    assert tracker.next_due() is None


def test_ready_after_settle_too(tracker: SettleTracker, clock: FakeClock, fs: FakeFS) -> None:
    fs.write("a")
    tracker.touch("a")
    clock.advance(10 * SETTLE)
    assert tracker.ready() == ["a"]


def test_touch_returns_true_only_for_new_paths(tracker: SettleTracker, fs: FakeFS) -> None:
    fs.write("a")
    assert tracker.touch("a") is True
    assert tracker.touch("a") is False
    assert tracker.touch("missing") is False
    assert "missing" not in tracker


def test_first_touch_always_stats(tracker: SettleTracker, fs: FakeFS) -> None:
    fs.write("a")
    tracker.touch("a")
    assert fs.calls == 1


def test_event_restarts_timer(tracker: SettleTracker, clock: FakeClock, fs: FakeFS) -> None:
    fs.write("a")
    tracker.touch("a")
    clock.advance(SETTLE / 2)
    fs.write("a")
    tracker.touch("a")
    clock.advance(SETTLE / 2 + 0.25)  # past the first deadline, not the second
    assert tracker.ready() == []
    clock.advance(SETTLE / 2 - 0.25)
    assert tracker.ready() == ["a"]


def test_event_restarts_timer_even_with_same_signature(
    tracker: SettleTracker, clock: FakeClock, fs: FakeFS
) -> None:
    """An event is evidence of a write even where coarse mtimes hide it."""
    fs.write("a")
    tracker.touch("a")
    clock.advance(SETTLE - 1)
    tracker.touch("a")  # nothing visible changed
    clock.advance(1)
    assert tracker.ready() == []
    clock.advance(SETTLE - 1)
    assert tracker.ready() == ["a"]


def test_unannounced_change_detected_at_deadline(
    tracker: SettleTracker, clock: FakeClock, fs: FakeFS
) -> None:
    """No event for the second write (network share): the stat at the deadline sees it."""
    fs.write("a")
    tracker.touch("a")
    clock.advance(1)
    fs.write("a")
    clock.advance(SETTLE - 1)
    assert tracker.ready() == []
    assert "a" in tracker
    assert tracker.next_due() == clock.now + SETTLE
    clock.advance(SETTLE)
    assert tracker.ready() == ["a"]


def test_rescans_do_not_postpone_readiness(
    tracker: SettleTracker, clock: FakeClock, fs: FakeFS
) -> None:
    fs.write("a")
    tracker.touch("a", changed=False)
    for _ in range(3):
        clock.advance(SETTLE / 4)
        assert tracker.touch("a", changed=False) is False
    clock.advance(SETTLE / 4)
    assert tracker.ready() == ["a"]


def test_rescan_that_sees_a_change_restarts(
    tracker: SettleTracker, clock: FakeClock, fs: FakeFS
) -> None:
    fs.write("a")
    tracker.touch("a", changed=False)
    clock.advance(SETTLE / 2)
    fs.write("a")
    tracker.touch("a", changed=False)
    clock.advance(SETTLE / 2)
    assert tracker.ready() == []
    clock.advance(SETTLE / 2)
    assert tracker.ready() == ["a"]


@pytest.mark.parametrize("with_events", [True, False], ids=["events", "scans-only"])
def test_slow_writer_never_ready_mid_file(
    tracker: SettleTracker, clock: FakeClock, fs: FakeFS, with_events: bool
) -> None:
    """A sender that pauses settle/2 between chunks is never reported until it stops."""
    fs.write("slow")
    tracker.touch("slow")
    tick = SETTLE / 8
    for step in range(200):
        clock.advance(tick)
        if step % 4 == 3:  # every settle/2
            fs.write("slow")
            if with_events:
                tracker.touch("slow")
        if not with_events:
            tracker.touch("slow", changed=False)  # a rescan every tick
        assert tracker.ready() == [], f"reported mid-file at step {step}"
    last_write = clock.now
    reported_at = None
    for _ in range(40):
        clock.advance(tick)
        if tracker.ready() == ["slow"]:
            reported_at = clock.now
            break
    assert reported_at is not None
    assert reported_at - last_write >= SETTLE
    assert reported_at - last_write <= 2 * SETTLE


def test_closed_hint_shortens_wait(tracker: SettleTracker, clock: FakeClock, fs: FakeFS) -> None:
    assert tracker.closed_settle_seconds == SETTLE / 4
    fs.write("a")
    tracker.touch("a")
    fs.write("a")
    tracker.touch("a", closed=True)
    clock.advance(SETTLE / 4 - 0.25)
    assert tracker.ready() == []
    clock.advance(0.25)
    assert tracker.ready() == ["a"]


def test_closed_hint_on_unchanged_file_shortens_running_timer(
    tracker: SettleTracker, clock: FakeClock, fs: FakeFS
) -> None:
    fs.write("a")
    tracker.touch("a")
    clock.advance(1)
    tracker.touch("a", closed=True, changed=False)
    clock.advance(SETTLE / 4)
    assert tracker.ready() == ["a"]


def test_explicit_closed_settle(clock: FakeClock, fs: FakeFS) -> None:
    tracker = SettleTracker(SETTLE, clock=clock, stat=fs, closed_settle_seconds=0.5)
    fs.write("a")
    tracker.touch("a", closed=True)
    clock.advance(0.25)
    assert tracker.ready() == []
    clock.advance(0.25)
    assert tracker.ready() == ["a"]


def test_closed_hint_is_not_trusted_blindly(
    tracker: SettleTracker, clock: FakeClock, fs: FakeFS
) -> None:
    """The writer reopens and appends after the close, without any further event."""
    fs.write("a")
    tracker.touch("a", closed=True)
    clock.advance(SETTLE / 8)
    fs.write("a")
    clock.advance(SETTLE / 8)
    assert tracker.ready() == []  # the signature changed: a full settle timer now
    clock.advance(SETTLE / 4)
    assert tracker.ready() == []
    clock.advance(SETTLE - SETTLE / 4)
    assert tracker.ready() == ["a"]


def test_change_event_after_close_restarts_with_full_settle(
    tracker: SettleTracker, clock: FakeClock, fs: FakeFS
) -> None:
    fs.write("a")
    tracker.touch("a", closed=True)
    clock.advance(SETTLE / 8)
    fs.write("a")
    tracker.touch("a")
    clock.advance(SETTLE / 2)
    assert tracker.ready() == []
    clock.advance(SETTLE / 2)
    assert tracker.ready() == ["a"]


def test_vanished_files_dropped_silently(
    tracker: SettleTracker, clock: FakeClock, fs: FakeFS
) -> None:
    fs.write("a")
    fs.write("b")
    tracker.touch("a")
    tracker.touch("b")
    del fs.files["a"]
    clock.advance(SETTLE)
    assert tracker.ready() == ["b"]
    assert len(tracker) == 0
    assert tracker.drain_special() == []


def test_touch_of_vanished_tracked_file_forgets_it(tracker: SettleTracker, fs: FakeFS) -> None:
    fs.write("a")
    tracker.touch("a")
    del fs.files["a"]
    assert tracker.touch("a") is False
    assert "a" not in tracker


@pytest.mark.parametrize(
    ("mode", "kind"),
    [
        (stat.S_IFLNK | 0o777, "symlink"),
        (stat.S_IFIFO | 0o644, "fifo"),
        (stat.S_IFSOCK | 0o755, "socket"),
        (stat.S_IFCHR | 0o600, "device"),
        (stat.S_IFBLK | 0o600, "device"),
        (stat.S_IFDIR | 0o755, "directory"),
    ],
)
def test_special_files_rejected_and_reported_once(
    tracker: SettleTracker, clock: FakeClock, fs: FakeFS, mode: int, kind: str
) -> None:
    fs.make("x.dcm", mode)
    assert tracker.touch("x.dcm") is False
    assert "x.dcm" not in tracker
    assert tracker.touch("x.dcm", changed=False) is False  # a rescan sees it again
    assert tracker.drain_special() == [("x.dcm", kind)]
    tracker.touch("x.dcm")
    clock.advance(SETTLE)
    assert tracker.ready() == []
    assert tracker.drain_special() == []


def test_file_replaced_by_symlink_before_ready(
    tracker: SettleTracker, clock: FakeClock, fs: FakeFS
) -> None:
    fs.write("a")
    tracker.touch("a")
    fs.make("a", stat.S_IFLNK | 0o777)
    clock.advance(SETTLE)
    assert tracker.ready() == []
    assert "a" not in tracker
    assert tracker.drain_special() == [("a", "symlink")]


def test_special_reported_again_after_being_a_regular_file(
    tracker: SettleTracker, clock: FakeClock, fs: FakeFS
) -> None:
    fs.make("x", stat.S_IFIFO | 0o644)
    tracker.touch("x")
    assert tracker.drain_special() == [("x", "fifo")]
    del fs.files["x"]
    fs.write("x")
    assert tracker.touch("x") is True
    fs.make("x", stat.S_IFIFO | 0o644)
    clock.advance(SETTLE)
    assert tracker.ready() == []
    assert tracker.drain_special() == [("x", "fifo")]


def test_special_kind_names() -> None:
    assert special_kind(REG) is None
    assert special_kind(stat.S_IFLNK) == "symlink"
    assert special_kind(stat.S_IFIFO) == "fifo"
    assert special_kind(stat.S_IFSOCK) == "socket"
    assert special_kind(stat.S_IFCHR) == "device"
    assert special_kind(stat.S_IFDIR) == "directory"


def test_transient_stat_error_keeps_the_file(
    tracker: SettleTracker, clock: FakeClock, fs: FakeFS
) -> None:
    fs.write("a")
    fs.errors["a"] = OSError(errno.EIO, "I/O error")
    assert tracker.touch("a") is True  # tracked with an unknown signature
    clock.advance(SETTLE)
    assert tracker.ready() == []
    del fs.errors["a"]
    clock.advance(SETTLE)
    assert tracker.ready() == []  # first good stat: a baseline, not yet a pair
    clock.advance(SETTLE)
    assert tracker.ready() == ["a"]


def test_transient_error_at_deadline_retries(
    tracker: SettleTracker, clock: FakeClock, fs: FakeFS
) -> None:
    fs.write("a")
    tracker.touch("a")
    fs.errors["a"] = OSError(errno.ESTALE, "Stale file handle")
    clock.advance(SETTLE)
    assert tracker.ready() == []
    assert "a" in tracker
    del fs.errors["a"]
    clock.advance(SETTLE)
    assert tracker.ready() == []
    clock.advance(SETTLE)
    assert tracker.ready() == ["a"]


def test_limit_respected_rest_come_next_call(
    tracker: SettleTracker, clock: FakeClock, fs: FakeFS
) -> None:
    for name in "abcde":
        fs.write(name)
        tracker.touch(name)
        clock.advance(0.25)
    clock.advance(SETTLE)
    calls = fs.calls
    assert tracker.ready(limit=0) == []
    assert fs.calls == calls  # nothing stat'ed
    assert tracker.ready(limit=2) == ["a", "b"]
    assert fs.calls == calls + 2  # the rest were not even looked at
    assert tracker.ready(limit=2) == ["c", "d"]
    assert tracker.ready(limit=2) == ["e"]
    assert tracker.ready(limit=2) == []


def test_limit_counts_ready_paths_not_rescheduled_ones(
    tracker: SettleTracker, clock: FakeClock, fs: FakeFS
) -> None:
    for name in "abc":
        fs.write(name)
        tracker.touch(name)
    fs.write("a")  # changed without an event: rescheduled, not ready
    clock.advance(SETTLE)
    assert tracker.ready(limit=2) == ["b", "c"]
    assert "a" in tracker


def test_ordering_by_deadline(tracker: SettleTracker, clock: FakeClock, fs: FakeFS) -> None:
    for name in "abc":
        fs.write(name)
        tracker.touch(name)
        clock.advance(1)
    fs.write("a")
    tracker.touch("a")  # restarted: now the latest deadline
    fs.write("d")
    tracker.touch("d", closed=True)  # the shortest wait: the earliest deadline
    assert tracker.next_due() == clock.now + SETTLE / 4
    clock.advance(2 * SETTLE)
    assert tracker.ready() == ["d", "b", "c", "a"]


def test_ready_with_many_tracked_and_nothing_due_does_not_stat(
    tracker: SettleTracker, clock: FakeClock, fs: FakeFS
) -> None:
    n = 100_000
    for i in range(n):
        path = f"f{i:06d}.dcm"
        fs.files[path] = (1, 1, REG)
        tracker.touch(path)
        if i % 1000 == 999:
            clock.advance(0.001)
    assert len(tracker) == n
    fs.calls = 0
    assert tracker.ready() == []
    assert fs.calls == 0
    # Exactly the first batch of 1,000 becomes due; only those are stat'ed.
    first_due = tracker.next_due()
    assert first_due is not None
    clock.now = first_due
    assert len(tracker.ready()) == 1000
    assert fs.calls == 1000
    assert len(tracker) == n - 1000


def test_forget(tracker: SettleTracker, clock: FakeClock, fs: FakeFS) -> None:
    fs.write("a")
    tracker.touch("a", closed=True)
    tracker.forget("a")
    tracker.forget("never-seen")
    assert "a" not in tracker
    assert tracker.next_due() is None
    clock.advance(SETTLE)
    assert tracker.ready() == []


def test_oldest_age(tracker: SettleTracker, clock: FakeClock, fs: FakeFS) -> None:
    assert tracker.oldest_age() == 0.0
    fs.write("a")
    tracker.touch("a")
    clock.advance(1)
    fs.write("b")
    tracker.touch("b")
    clock.advance(1)
    fs.write("a")
    tracker.touch("a")  # a restart does not make it younger
    assert tracker.oldest_age() == 2.0
    tracker.forget("a")
    assert tracker.oldest_age() == 1.0


def test_contains_accepts_any_object(tracker: SettleTracker) -> None:
    assert 42 not in tracker
    assert None not in tracker


def test_settle_seconds_can_change_at_runtime(
    tracker: SettleTracker, clock: FakeClock, fs: FakeFS
) -> None:
    fs.write("old")
    tracker.touch("old")
    tracker.settle_seconds = 2 * SETTLE
    assert tracker.closed_settle_seconds == SETTLE / 2
    fs.write("new")
    tracker.touch("new")
    clock.advance(SETTLE)
    assert tracker.ready() == ["old"]  # keeps the deadline it was given
    clock.advance(SETTLE)
    assert tracker.ready() == ["new"]
    with pytest.raises(ValueError):
        tracker.settle_seconds = 0


def test_explicit_closed_settle_capped_when_settle_lowered(clock: FakeClock, fs: FakeFS) -> None:
    tracker = SettleTracker(SETTLE, clock=clock, stat=fs, closed_settle_seconds=3.0)
    tracker.settle_seconds = 2.0
    assert tracker.closed_settle_seconds == 2.0


@pytest.mark.parametrize(
    ("settle", "closed"), [(0, None), (-1, None), (float("nan"), None), (4, 5), (4, -1)]
)
def test_invalid_arguments(settle: float, closed: float | None) -> None:
    with pytest.raises(ValueError):
        SettleTracker(settle, closed_settle_seconds=closed)


def test_defaults_use_lstat_on_real_files(tmp_path: os.PathLike[str]) -> None:
    """With the real clock and os.lstat, a symlink is rejected, not followed."""
    target = os.path.join(tmp_path, "target.dcm")
    with open(target, "wb") as f:
        f.write(b"x")
    link = os.path.join(tmp_path, "link.dcm")
    os.symlink(target, link)
    tracker = SettleTracker(60)
    assert tracker.touch(target) is True
    assert tracker.touch(link) is False
    assert tracker.drain_special() == [(link, "symlink")]


# -- property: no mid-file readiness, and eventual readiness ---------------------------

QUARTER = SETTLE / 16  # clock step of the simulation; all times are exact multiples


@settings(max_examples=300, deadline=None)
@given(
    pauses=st.lists(st.integers(min_value=1, max_value=15), min_size=1, max_size=25),
    events=st.booleans(),
    scan_every=st.sampled_from([None, 1, 3, 8, 40]),
    close_after=st.one_of(st.none(), st.integers(min_value=0, max_value=4)),
)
def test_property_never_ready_mid_file(
    pauses: list[int], events: bool, scan_every: int | None, close_after: int | None
) -> None:
    """Writers pausing up to settle - 1/4 s; events and/or rescans; an optional close.

    Whatever the mix, the file is never reported before the last write, only after the
    applicable wait has passed since it, and always within a bounded time after it.
    """
    if not events and scan_every is None:
        scan_every = 8  # something has to notice the file
    clock = FakeClock(0.0)
    fs = FakeFS(clock)
    tracker = SettleTracker(SETTLE, clock=clock, stat=fs)
    write_steps: set[int] = set()
    step = 0
    for pause in pauses:
        step += pause
        write_steps.add(step)
    last_write = step
    close_step = None if close_after is None or not events else last_write + close_after
    reported: list[int] = []
    for now in range(0, last_write + 16 * 6):
        clock.now = now * QUARTER
        if now in write_steps:
            fs.write("f")
            if events:
                tracker.touch("f")
        if now == close_step:
            tracker.touch("f", closed=True)
        if scan_every is not None and now % scan_every == 0 and "f" in fs.files:
            tracker.touch("f", changed=False)
        if tracker.ready() == ["f"]:
            reported.append(now)
            break
    assert reported, "never reported"
    at = reported[0]
    assert at > last_write
    waited = (at - last_write) * QUARTER
    assert waited >= tracker.closed_settle_seconds
    if close_step is None:
        assert waited >= SETTLE
    bound = 2 * SETTLE + (scan_every or 0) * QUARTER + QUARTER
    assert waited <= bound
