"""Crash safety and concurrency evidence: real daemons and sorts, really killed.

Every test here runs ``dicomwatch`` as a subprocess, kills it with real signals at
seeded random moments while real files arrive, starts it again, and then checks the
only things that matter to a PACS operator: each instance is in the archive exactly
once, with its bytes intact, under its final name; nothing is half-written anywhere;
nothing was quarantined; the inbox (claims included) or the source tree is empty.

The random choices (kill moments, how each kill is done, how each file is delivered)
come from ``random.Random(seed)``.  The seed defaults to a fixed number and is taken
from ``DICOMWATCH_CRASH_SEED`` when set, so a failing run can be repeated with the same
choices (the scheduler's timing still varies) and the soak can be run with many seeds::

    DICOMWATCH_CRASH_SEED=7 python -m pytest tests/test_crash.py
    python -m pytest -m soak tests/test_crash.py
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import build_dataset, wait_for
from daemon_helpers import DaemonProc, archived, inbox_files, temporaries
from pydicom import dcmread

try:
    import psutil
except ImportError:  # pragma: no cover - psutil is a test dependency
    psutil = None

SEED_ENV = "DICOMWATCH_CRASH_SEED"
DEFAULT_SEED = 20240101
UID_ROOT = "1.2.826.0.1.3680043.8.498.55"
STARTING = '"msg": "dicomwatch starting'
WATCHING = '"msg": "watching '


@pytest.fixture
def crash_seed() -> int:
    """The seed for every random choice of a test; see the module docstring."""
    value = os.environ.get(SEED_ENV, "").strip()
    return int(value) if value else DEFAULT_SEED


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Callable[..., DaemonProc]]:
    """Daemons sharing ``tmp_path``'s inbox, archive and quarantine; all killed at the end."""
    made: list[DaemonProc] = []

    def make(name: str = "a", **overrides: object) -> DaemonProc:
        d = DaemonProc(tmp_path, name, **overrides)
        made.append(d)
        return d

    yield make
    for d in made:
        if d.proc is not None and d.proc.poll() is None:
            kill_tree(d.proc)


# ----- the files -----------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    """One instance to deliver: where it lands (relative to the inbox) and its bytes."""

    uid: str
    rel: str
    data: bytes


def make_items(count: int, rng: random.Random, *, tag: str = "1") -> list[Item]:
    """``count`` tiny, distinct instances spread over patients, series and sub-folders.

    4x4 pixels keep a file under 1 kB, so thousands are written and filed in seconds.
    Each has its own InstanceNumber, so no two want the same archive name: a second file
    with one UID can only come from filing something twice.
    """
    items = []
    for i in range(count):
        uid = f"{UID_ROOT}.{tag}.{i}"
        ds = build_dataset(
            rows=4,
            columns=4,
            seed=i,
            SOPInstanceUID=uid,
            InstanceNumber=i,
            PatientID=f"P{i % 5}",
            SeriesInstanceUID=f"{UID_ROOT}.{tag}.0.{i % 7}",
            SeriesDescription=f"series {i % 7}",
        )
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        folder = rng.choice(["", "ct/", "ward1/", "ward2/s1/", "ward2/s2/", "deep/a/b/c/"])
        items.append(Item(uid, f"{folder}im{i:05d}.dcm", buf.getvalue()))
    return items


@dataclass(frozen=True)
class Delivery:
    """How a group of files arrives: ``write`` in place (cp, storescp), ``rename`` from a
    hidden temporary name (rsync), or ``folder``: written into a hidden folder that is
    renamed into the inbox when complete."""

    how: str
    items: tuple[Item, ...]


def plan_deliveries(items: Sequence[Item], rng: random.Random) -> list[Delivery]:
    out: list[Delivery] = []
    i = 0
    while i < len(items):
        how = rng.choices(["write", "rename", "folder"], weights=[5, 4, 1])[0]
        size = rng.randint(3, 15) if how == "folder" else 1
        group = items[i : i + size]
        if how == "folder":
            # The whole group lands in one fresh folder named by its first file.
            folder = f"batch-{group[0].uid.rsplit('.', 1)[1]}"
            group = [Item(it.uid, f"{folder}/{Path(it.rel).name}", it.data) for it in group]
        out.append(Delivery(how, tuple(group)))
        i += size
    return out


def delivered_items(deliveries: Sequence[Delivery]) -> list[Item]:
    return [it for d in deliveries for it in d.items]


def deliver(inbox: Path, delivery: Delivery, rng: random.Random) -> None:
    if delivery.how == "folder":
        final = inbox / Path(delivery.items[0].rel).parent
        stage = inbox / f".{final.name}.incoming"
        stage.mkdir(parents=True)
        for it in delivery.items:
            (stage / Path(it.rel).name).write_bytes(it.data)
        os.rename(stage, final)
        return
    for it in delivery.items:
        path = inbox / it.rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if delivery.how == "write":
            path.write_bytes(it.data)
        else:
            tmp = path.with_name(f".{path.name}.{rng.randrange(16**6):06x}")
            with tmp.open("wb") as fh:
                fh.write(it.data)
                fh.flush()
                os.fsync(fh.fileno())
            os.rename(tmp, path)


class Dropper(threading.Thread):
    """Delivers files into the inbox over about ``seconds``, like a modality sending a
    study while the daemon is being killed; keeps any error for the test to raise."""

    def __init__(
        self, inbox: Path, deliveries: Sequence[Delivery], seconds: float, seed: int
    ) -> None:
        super().__init__(name="crash-dropper", daemon=True)
        self.inbox = inbox
        self.deliveries = deliveries
        self.pause = seconds / max(1, len(deliveries))
        self.rng = random.Random(seed)
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for delivery in self.deliveries:
                deliver(self.inbox, delivery, self.rng)
                # Pacing only, not synchronisation: bursts of about 25 deliveries, faster
                # than the daemon files them (so kills find claims in flight), then a pause.
                if self.rng.random() < 1 / 25:
                    time.sleep(self.pause * 25 * self.rng.uniform(0.0, 2.0))
        except BaseException as exc:
            self.error = exc

    def finish(self, timeout: float = 120) -> None:
        self.join(timeout)
        assert not self.is_alive(), "the dropper did not finish"
        if self.error is not None:
            raise self.error


# ----- processes -----------------------------------------------------------------------


def kill_tree(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL a process and all its descendants at once, as systemd kills a unit's
    cgroup or the OOM killer takes a whole service: workers die mid-file too."""
    kids = []
    if psutil is not None:
        with contextlib.suppress(psutil.Error):
            kids = psutil.Process(proc.pid).children(recursive=True)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    for kid in kids:
        with contextlib.suppress(psutil.Error):
            kid.kill()
    proc.wait(30)


def hard_kill(proc: subprocess.Popen[bytes], rng: random.Random) -> str:
    """SIGKILL the main process only (its workers finish their file as orphans and race
    the next run) or the whole tree; returns which, for failure messages."""
    if psutil is not None and rng.random() < 0.5:
        kill_tree(proc)
        return "tree"
    proc.kill()
    proc.wait(30)
    return "main"


def launch(d: DaemonProc, until: str = WATCHING) -> None:
    """Start ``d`` and wait for its next ``until`` log line (counted from now, so runs
    killed before they logged anything do not confuse the count)."""
    before = d.count_lines(until)
    d.start(wait=False)
    assert d.proc is not None
    proc = d.proc
    assert wait_for(lambda: d.count_lines(until) > before or proc.poll() is not None, 60)
    assert proc.poll() is None, f"daemon {d.name} exited {proc.returncode}:\n{tail(d.log_path)}"


def tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except FileNotFoundError:
        return ""


def count_dcm(root: Path) -> int:
    """Files under their final names (temporaries end in ``.dwtmp``, never ``.dcm``)."""
    return sum(1 for _ in root.rglob("*.dcm")) if root.exists() else 0


def claim_files(d: DaemonProc) -> list[Path]:
    """Files claimed by node ``d`` and not yet filed (or filed, not yet released)."""
    folder = d.inbox / ".dicomwatch" / "claims" / d.name
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


def messages(d: DaemonProc, pattern: str) -> list[re.Match[str]]:
    rx = re.compile(pattern)
    return [m for r in d.records() if (m := rx.search(str(r.get("msg", "")))) is not None]


# ----- the checks ----------------------------------------------------------------------


def uid_of(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def assert_archive_exact(
    archive: Path, items: Sequence[Item], rng: random.Random, context: str = ""
) -> None:
    """Every instance exactly once, byte for byte, fully parseable; nothing else there."""
    want = {it.uid: it.data for it in items}
    seen: dict[str, list[Path]] = {}
    for path in archived(archive):
        seen.setdefault(uid_of(path), []).append(path)
    twice = {uid: paths for uid, paths in seen.items() if len(paths) > 1}
    assert not twice, f"filed more than once: {twice} {context}"
    missing = sorted(set(want) - set(seen))
    assert not missing, f"{len(missing)} lost, e.g. {missing[:5]} {context}"
    assert set(seen) == set(want), f"unexpected: {sorted(set(seen) - set(want))[:5]} {context}"
    for uid, (path,) in seen.items():
        # Native Explicit VR Little Endian is filed as sent: any truncation or torn write
        # under a final name shows up as a byte difference.
        assert path.read_bytes() == want[uid], f"{path} differs from what was sent {context}"
    for uid in rng.sample(sorted(seen), min(20, len(seen))):
        (path,) = seen[uid]
        out = dcmread(path)
        sent = dcmread(io.BytesIO(want[uid]))
        assert np.array_equal(out.pixel_array, sent.pixel_array), path
    strays = [
        p
        for p in archive.rglob("*")
        if p.is_file() and p.suffix != ".dcm" and not p.name.endswith(".lock")
    ]
    assert strays == [], f"not an archived instance: {strays[:5]} {context}"


def assert_clean(archive: Path, quarantine: Path, inbox: Path | None, context: str = "") -> None:
    """No temporary, nothing quarantined, and (for the daemon) the inbox fully drained."""
    roots = [archive, quarantine] + ([inbox] if inbox is not None else [])
    assert temporaries(*roots) == [], context
    assert [p for root in roots for p in root.rglob("*.dwtmp")] == [], context
    kept = (
        [p for p in quarantine.rglob("*") if p.is_file() and not p.name.endswith(".lock")]
        if quarantine.exists()
        else []
    )
    assert kept == [], f"quarantined: {kept[:5]} {context}"
    if inbox is not None:
        assert inbox_files(inbox) == [], f"left in the inbox: {inbox_files(inbox)[:5]} {context}"
        claims = inbox / ".dicomwatch" / "claims"
        assert not claims.exists() or not [
            p for p in claims.rglob("*") if p.is_file() and not p.name.endswith(".lock")
        ], context


def assert_records_sane(procs: Sequence[DaemonProc], context: str = "") -> None:
    """What the logs say agrees with the archive: only ``sorted``/``duplicate`` outcomes
    (a re-run after a kill between link and claim removal finds a duplicate), and no
    instance reported ``sorted`` twice: a new archive name was made at most once each."""
    records = [r for d in procs for r in d.files()]
    outcomes = Counter(str(r["outcome"]) for r in records)
    assert set(outcomes) <= {"sorted", "duplicate"}, f"{outcomes} {context}"
    sorted_uids = Counter(r.get("sop_instance_uid") for r in records if r["outcome"] == "sorted")
    assert [u for u, n in sorted_uids.items() if n > 1] == [], context


# ----- 1 and 2: one daemon, killed again and again ------------------------------------


def kill_loop_run(
    make: Callable[..., DaemonProc], seed: int, *, files: int, kills: int, drop_seconds: float
) -> None:
    """Drop ``files`` files while SIGKILLing the daemon ``kills`` times, then check.

    Each cycle restarts the daemon and kills it after one of: a random delay after it
    started watching; a random number of newly archived files; or a random delay after
    its first log line, which lands in claim recovery, the stale-staging clean-up, the
    worker pool start or the start-up scan of the backlog.
    """
    rng = random.Random(seed)
    d = make("a")
    deliveries = plan_deliveries(make_items(files, rng), rng)
    items = delivered_items(deliveries)
    dropper = Dropper(d.inbox, deliveries, drop_seconds, seed + 1)
    d.inbox.mkdir(parents=True, exist_ok=True)
    history: list[str] = []
    dropper.start()
    try:
        for cycle in range(kills):
            mode = rng.choices(["delay", "progress", "startup"], weights=[4, 3, 3])[0]
            if mode == "startup":
                launch(d, until=STARTING)
                time.sleep(rng.uniform(0.0, 0.6))  # the kill moment, not a synchronisation
            else:
                launch(d)
                if mode == "delay":
                    time.sleep(rng.uniform(0.1, 1.5))  # the kill moment
                else:
                    goal = min(len(items), count_dcm(d.archive) + rng.randint(1, 40))
                    wait_for(lambda goal=goal: count_dcm(d.archive) >= goal, 15)
            assert d.proc is not None
            assert d.proc.poll() is None, f"daemon died by itself:\n{tail(d.log_path)}"
            how = hard_kill(d.proc, rng)
            history.append(f"{cycle}:{mode}/{how}@{count_dcm(d.archive)}+{len(claim_files(d))}")
    finally:
        dropper.finish()
    context = f"seed={seed} kills={' '.join(history)}"
    print(f"crash history: {context}")  # shown with the captured output of a failure
    launch(d)
    # A claim is removed only after its archive copy is durable, so an empty inbox means
    # every file has been dealt with; the archive checks below say whether correctly.
    assert wait_for(lambda: inbox_files(d.inbox) == [], 120), (
        f"not drained: {len(inbox_files(d.inbox))} left {context}\n{tail(d.log_path)}"
    )
    assert d.stop() == 0, tail(d.log_path)
    assert_archive_exact(d.archive, items, rng, context)
    assert_clean(d.archive, d.quarantine, d.inbox, context)
    assert_records_sane([d], context)
    assert d.starts == kills + 1


def test_daemon_sigkill_loop_loses_and_doubles_nothing(
    daemons: Callable[..., DaemonProc], crash_seed: int
) -> None:
    """600 files, 12 kills at random moments: each instance filed exactly once, intact."""
    kill_loop_run(daemons, crash_seed, files=600, kills=12, drop_seconds=14)


@pytest.mark.soak
def test_soak_daemon_sigkill_loop(daemons: Callable[..., DaemonProc], crash_seed: int) -> None:
    """3000 files, 36 kills (a third of them during start-up and the backlog scan).

    Run with ``python -m pytest -m soak tests/test_crash.py`` (about a minute on two
    cores); set ``DICOMWATCH_CRASH_SEED`` to vary or repeat the kill pattern.
    """
    kill_loop_run(daemons, crash_seed, files=3000, kills=36, drop_seconds=50)


# ----- 3: dicomwatch sort --move, interrupted --------------------------------------------


def start_sort(tmp_path: Path, src: Path, archive: Path, log: Path) -> subprocess.Popen[bytes]:
    """``dicomwatch sort --move`` in its own session, so a Ctrl-C can go to its group."""
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "dicomwatch", "sort", str(src), "--archive", str(archive),
             "--move", "--no-progress"],
            cwd=tmp_path, stdout=out, stderr=out, start_new_session=True,
        )  # fmt: skip


def source_uids(src: Path) -> list[str]:
    return [uid_of(p) for p in src.rglob("*") if p.is_file()]


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGINT], ids=["sigkill", "sigint"])
def test_sort_move_interrupted_then_rerun(
    tmp_path: Path, crash_seed: int, signum: signal.Signals
) -> None:
    """A ``sort --move`` killed (or Ctrl-C'd) mid-run, several times, then run to the end.

    After every interruption each instance is in the archive, in the source tree, or (only
    after SIGKILL, between link and source removal) both; a Ctrl-C finishes the files in
    flight, exits 130 and leaves nothing in both places and no staging debris.  The final
    run exits 0 with each instance archived once and the source tree empty.
    """
    rng = random.Random(crash_seed + signum)
    src, archive, quarantine = tmp_path / "src", tmp_path / "archive", tmp_path / "quarantine"
    items = make_items(300, rng, tag="3")
    for it in items:
        path = src / it.rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(it.data)
    everything = sorted(it.uid for it in items)
    log = tmp_path / "sort.log"
    history: list[str] = []
    for cycle in range(4):
        proc = start_sort(tmp_path, src, archive, log)
        goal = count_dcm(archive) + rng.randint(1, 40)
        assert wait_for(lambda p=proc, g=goal: count_dcm(archive) >= g or p.poll() is not None, 60)
        assert proc.poll() is None, f"finished before it was interrupted:\n{tail(log)}"
        if signum == signal.SIGINT:
            os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
            assert proc.wait(60) == 130, tail(log)
            how = "ctrl-c"
        elif psutil is not None and rng.random() < 0.5:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
            how = "group"
        else:
            proc.kill()
            proc.wait(30)
            how = "main"
        history.append(f"{cycle}:{how}@{count_dcm(archive)}")
        context = f"seed={crash_seed} {' '.join(history)}"
        # Workers orphaned by a SIGKILL of the main process may still be finishing a file
        # (link, then remove the source): listing the source before the archive never
        # misses a file that moves between the two listings.
        left = source_uids(src)
        filed = [uid_of(p) for p in archived(archive)]
        assert len(filed) == len(set(filed)), f"filed twice {context}"
        assert set(filed) | set(left) == set(everything), f"lost {context}"
        assert len(left) == len(set(left))
        for path in archived(archive):
            dcmread(path)  # nothing truncated under a final name
        if signum == signal.SIGINT:
            assert not set(filed) & set(left), f"filed but not removed after Ctrl-C {context}"
            assert temporaries(archive, quarantine) == [], context
            assert "interrupted" in tail(log, 2000)
    final = subprocess.run(
        [sys.executable, "-m", "dicomwatch", "sort", str(src), "--archive", str(archive),
         "--move", "--no-progress"],
        cwd=tmp_path, capture_output=True, timeout=300, check=False,
    )  # fmt: skip
    context = f"seed={crash_seed} {' '.join(history)}"
    assert final.returncode == 0, final.stderr.decode(errors="replace")[-3000:]
    assert [p for p in src.rglob("*") if p.is_file()] == [], context
    assert_archive_exact(archive, items, rng, context)
    assert_clean(archive, quarantine, None, context)


# ----- 4: two daemons, one inbox, one archive --------------------------------------------


def test_two_daemons_burst_with_kill_restart_and_takeover(
    daemons: Callable[..., DaemonProc], crash_seed: int
) -> None:
    """Two nodes on one inbox during a 1000-file burst.

    Node b (one worker, so it holds a backlog of claims) is SIGKILLed mid-burst with
    claims in hand; restarted, it files exactly those claims itself.  Later b is killed
    for good, again holding claims; node a, restarted, hands b's claims back to the inbox
    and files them.  Nothing is filed twice and nothing is lost.
    """
    rng = random.Random(crash_seed)
    a = daemons("a")
    b = daemons("b", workers=1)
    deliveries = plan_deliveries(make_items(1000, rng, tag="4"), rng)
    items = delivered_items(deliveries)
    a.inbox.mkdir(parents=True)
    launch(a)
    launch(b)
    dropper = Dropper(a.inbox, deliveries, 10, crash_seed + 1)
    dropper.start()
    try:
        # b killed with claims in hand, restarted: it recovers those claims itself.
        assert wait_for(lambda: len(claim_files(b)) >= 5, 60), tail(b.log_path)
        assert b.proc is not None
        kill_tree(b.proc)
        held = claim_files(b)
        assert held, "b held no claims when killed"
        launch(b)
        recovered = messages(b, r"recovered (\d+) files claimed by an earlier run of node b")
        assert [int(m.group(1)) for m in recovered] == [len(held)], tail(b.log_path)
        assert wait_for(lambda: not any(p.exists() for p in held), 60), tail(b.log_path)

        # b stopped for good, holding claims; a restarts and takes them over.
        assert wait_for(lambda: len(claim_files(b)) >= 3, 60), tail(b.log_path)
        assert b.proc is not None
        kill_tree(b.proc)
        orphaned = claim_files(b)
        assert orphaned, "b held no claims when stopped for good"
    finally:
        dropper.finish()
    assert all(p.exists() for p in orphaned), "a running daemon never touches b's claims"
    assert a.stop() == 0, tail(a.log_path)
    launch(a)
    returned = messages(a, r"returned (\d+) files claimed by stopped node b to the inbox")
    assert [int(m.group(1)) for m in returned] == [len(orphaned)], tail(a.log_path)
    claims_root = a.inbox / ".dicomwatch" / "claims"
    assert not (claims_root / "b").exists() and not (claims_root / "b.lock").exists()

    context = f"seed={crash_seed}"
    assert wait_for(lambda: inbox_files(a.inbox) == [], 120), (
        f"not drained: {inbox_files(a.inbox)[:5]} {context}\n{tail(a.log_path)}"
    )
    assert a.stop() == 0, tail(a.log_path)
    assert_archive_exact(a.archive, items, rng, context)
    assert_clean(a.archive, a.quarantine, a.inbox, context)
    assert_records_sane([a, b], context)
    assert a.files() and b.files(), "both nodes filed part of the burst"


# ----- 5: re-filing what was filed before a crash ----------------------------------------


def test_refiling_after_crash_between_link_and_removal_is_idempotent(
    daemons: Callable[..., DaemonProc], tmp_path: Path
) -> None:
    """The state a crash between "linked into the archive" and "source removed" leaves:
    the archive holds the instances and the inbox (or our claim folder) still holds them
    too.  Filing again reports every one a duplicate and changes no archive byte."""
    rng = random.Random(5)
    d = daemons("a", settle_seconds=0.1)
    items = make_items(40, rng, tag="5")
    src = tmp_path / "src"
    for it in items:
        (src / it.rel).parent.mkdir(parents=True, exist_ok=True)
        (src / it.rel).write_bytes(it.data)
    first = subprocess.run(
        [sys.executable, "-m", "dicomwatch", "sort", "--config", str(d.config_path), str(src),
         "--no-progress"],
        cwd=tmp_path, capture_output=True, timeout=120, check=False,
    )  # fmt: skip
    assert first.returncode == 0, first.stderr.decode(errors="replace")[-3000:]
    assert_archive_exact(d.archive, items, rng)

    def snapshot() -> dict[str, tuple[bytes, int]]:
        return {
            str(p.relative_to(d.archive)): (p.read_bytes(), p.stat().st_ino)
            for p in d.archive.rglob("*")
            if p.is_file() and ".dicomwatch" not in p.parts
        }

    before = snapshot()
    claims = d.inbox / ".dicomwatch" / "claims" / "a"
    for i, it in enumerate(items):
        target = (claims if i % 2 else d.inbox) / it.rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(it.data)
    d.start("--once")
    assert d.wait_exit(120) == 0, tail(d.log_path)
    assert sorted(r["outcome"] for r in d.files()) == ["duplicate"] * len(items)
    assert {r["sop_instance_uid"] for r in d.files()} == {it.uid for it in items}
    recovered = messages(d, r"recovered (\d+) files claimed by an earlier run of node a")
    assert [int(m.group(1)) for m in recovered] == [len(items) // 2]
    assert snapshot() == before, "the archive changed"
    assert_clean(d.archive, d.quarantine, d.inbox)


# ----- a node restarting while another returns its claims ---------------------------------


def numbered_copies(count: int, tag: str) -> Iterator[tuple[str, bytes]]:
    """``count`` distinct tiny instances made by patching the UID of one encoded file,
    which is thousands of times faster than encoding each (both UIDs have one width)."""
    width = len(str(count))
    placeholder = f"{UID_ROOT}.{tag}.{'9' * width}"
    ds = build_dataset(rows=2, columns=2, SOPInstanceUID=placeholder)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    template = buf.getvalue()
    assert template.count(placeholder.encode()) == 2
    for i in range(count):
        uid = f"{UID_ROOT}.{tag}.{i:0{width}d}"
        yield uid, template.replace(placeholder.encode(), uid.encode())


def test_node_starting_while_another_returns_its_claims_is_not_refused(
    daemons: Callable[..., DaemonProc],
) -> None:
    """Both hosts come back after a power cut.  Node a, up first, is still handing node
    b's claims back to the inbox (it holds b's lock meanwhile) when b starts.

    b must not mistake that for a twin with its node_id and exit 78 (the systemd unit
    never restarts after 78, so b would stay down): it waits for a to finish and starts,
    holding the lock file that is actually linked (a removes b's old one).  Nothing is
    lost or doubled.  20,000 claims (b ran with ``max_pending: 20000``) keep a busy long
    enough for b to arrive in the middle.
    """
    template = "{PatientID}/{SOPInstanceUID}.dcm"
    a = daemons("a", template=template)
    b = daemons("b", template=template)
    claims_root = a.inbox / ".dicomwatch" / "claims"
    names: dict[str, str] = {}
    for i, (uid, data) in enumerate(numbered_copies(20_000, "6")):
        path = claims_root / "b" / f"s{i % 40}" / f"x{i}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        names[path.name] = uid
    (claims_root / "b.lock").touch()

    a.start(wait=False)
    assert wait_for(lambda: a.count_lines(STARTING) > 0, 60, interval=0.005), tail(a.log_path)
    launch(b)  # fails if b exits (78) instead of starting
    assert wait_for(lambda: a.count_lines(WATCHING) > 0, 60), tail(a.log_path)
    returned = messages(a, r"returned (\d+) files claimed by stopped node b to the inbox")
    assert [int(m.group(1)) for m in returned] == [len(names)], tail(a.log_path)
    # b's lock is the linked b.lock, held: a third node could not adopt b's claims now.
    fd = os.open(claims_root / "b.lock", os.O_RDWR)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)
    assert wait_for(lambda: count_dcm(a.archive) >= 200, 60)
    assert a.stop() == 0 and b.stop() == 0

    filed = [p.name.removesuffix(".dcm") for p in archived(a.archive)]
    waiting = [names[p.name] for p in inbox_files(a.inbox)]
    assert len(filed) == len(set(filed)), "filed twice"
    assert not set(filed) & set(waiting), "filed and still waiting after a clean stop"
    assert sorted(filed + waiting) == sorted(names.values()), "lost"
    assert_records_sane([a, b])
    assert temporaries(a.archive, a.quarantine) == []
