"""A source is removed only when what was filed is it, whole: issue 15's data-loss cases.

* ``sort --move`` of the archive under another name (a symlink, a bind mount): every
  file was its own duplicate and was deleted.
* a file written to after it was read (a sender pausing longer than ``settle_seconds``)
  was filed partial and its source removed, so the rest of it was lost.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import build_dataset
from pydicom import dcmread
from pydicom.dataset import Dataset

from dicomwatch import batch
from dicomwatch.archive import Filer, StagingOwner
from dicomwatch.cli import main
from dicomwatch.result import Outcome
from dicomwatch.sorter import EngineSettings, Task, process


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the default quarantine is ./quarantine


@pytest.fixture
def settings(tmp_path: Path) -> Iterator[EngineSettings]:
    owners = [StagingOwner(tmp_path / "archive", "t"), StagingOwner(tmp_path / "quarantine", "t")]
    yield EngineSettings(
        archive=tmp_path / "archive",
        quarantine=tmp_path / "quarantine",
        archive_staging=owners[0].path,
        quarantine_staging=owners[1].path,
        template_text="{PatientID}/{InstanceNumber}.dcm",
        fsync=False,
    )
    for owner in owners:
        owner.release()


def sort(*args: str | Path) -> int:
    return main(["sort", "--no-progress", *map(str, args)])


def files_under(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and ".dicomwatch" not in p.parts
    }


def filled_archive(tmp_path: Path, n: int = 4) -> Path:
    src = tmp_path / "incoming"
    src.mkdir()
    for i in range(n):
        build_dataset(seed=i, InstanceNumber=i).save_as(src / f"f{i}", enforce_file_format=True)
    assert sort(src, "--archive", tmp_path / "archive") == 0
    archive = tmp_path / "archive"
    assert len(files_under(archive)) == n
    return archive


@contextlib.contextmanager
def bind_mount(target: Path, mount_point: Path) -> Iterator[Path]:
    """``mount --bind target mount_point`` (root only); skip where it cannot be done."""
    if os.geteuid() != 0:
        pytest.skip("mount --bind needs root")
    if shutil.which("mount") is None or shutil.which("umount") is None:
        pytest.skip("mount/umount are not available")
    mount_point.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "--bind", str(target), str(mount_point)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"mount --bind does not work here: {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        if subprocess.run(["umount", str(mount_point)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


# ----- the archive under another name ----------------------------------------------------


def test_sort_move_refuses_the_archive_reached_through_a_symlink(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    archive = filled_archive(tmp_path)
    before = files_under(archive)
    alias = tmp_path / "alias"
    alias.symlink_to(archive)
    capsys.readouterr()
    # The archive named through the symlink, the source by its real path, and the
    # other way round; and a folder inside the archive.
    assert sort(archive, "--archive", alias, "--move") == 2
    assert "dicomwatch sort:" in capsys.readouterr().err
    assert sort(alias, "--archive", archive, "--move") == 2
    assert sort(archive / "pid001", "--archive", alias, "--move") == 2
    assert files_under(archive) == before


def test_sort_move_refuses_the_archive_reached_through_a_bind_mount(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    archive = filled_archive(tmp_path)
    before = files_under(archive)
    with bind_mount(archive, tmp_path / "bound") as bound:
        capsys.readouterr()
        assert sort(bound, "--archive", archive, "--move") == 2
        assert "is" in capsys.readouterr().err
        assert sort(bound / "pid001", "--archive", archive, "--move") == 2
        # a folder above the archive, mounted elsewhere, contains it
        with bind_mount(tmp_path, tmp_path / "incoming" / "above") as above:
            assert sort(above, "--archive", archive, "--move") == 2
    assert files_under(archive) == before


def test_a_bind_mount_of_the_archive_inside_the_source_is_not_walked(tmp_path: Path) -> None:
    archive = filled_archive(tmp_path)
    before = files_under(archive)
    src = tmp_path / "src"
    src.mkdir()
    build_dataset(seed=99, InstanceNumber=99).save_as(src / "new", enforce_file_format=True)
    with bind_mount(archive, src / "mounted-archive"):
        assert sort(src, "--archive", archive, "--move") == 0
        assert not (src / "new").exists()
        after = files_under(archive)
        assert len(after) == len(before) + 1
        assert all(after[name] == data for name, data in before.items())
        assert len(files_under(src / "mounted-archive")) == len(before) + 1


@pytest.mark.parametrize("how", ["symlink", "bind"])
def test_a_source_that_is_its_own_duplicate_is_never_removed(
    how: str, tmp_path: Path, settings: EngineSettings
) -> None:
    """The sorter's own guard, for callers that did not check the folders first."""
    src = tmp_path / "f"
    build_dataset(InstanceNumber=5).save_as(src, enforce_file_format=True)
    first = process(Task(path=str(src), source=str(src)), settings)
    assert first.outcome is Outcome.SORTED and first.destination
    filed = Path(first.destination)
    data = filed.read_bytes()
    with contextlib.ExitStack() as stack:
        if how == "symlink":
            other = tmp_path / "alias"
            other.symlink_to(settings.archive)
        else:
            other = stack.enter_context(bind_mount(settings.archive, tmp_path / "bound"))
        same = other / filed.relative_to(settings.archive)
        result = process(Task(path=str(same), source=str(same), remove_source=True), settings)
        assert result.outcome is Outcome.FAILED, result
        assert result.reason == "source_is_filed_copy"
        assert filed.read_bytes() == data
        # A copy elsewhere of the same bytes is a duplicate as before, and goes.
        copy = tmp_path / "copy"
        copy.write_bytes(data)
        again = process(Task(path=str(copy), source=str(copy), remove_source=True), settings)
        assert again.outcome is Outcome.DUPLICATE and not copy.exists()
        assert filed.read_bytes() == data


# ----- a source written to while it is filed ---------------------------------------------


def encoded(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.mark.parametrize("change", ["append", "rewrite_in_place"])
def test_a_source_written_to_while_it_is_filed_stays_and_files_whole_later(
    change: str, tmp_path: Path, settings: EngineSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    ds = build_dataset(InstanceNumber=3, rows=16, columns=16)
    partial = encoded(ds)  # up to and including the pixel data
    ds.private_block(0x7FE1, "ACME 1.0", create=True).add_new(0x01, "LO", "trailing element")
    full = encoded(ds)
    assert full.startswith(partial) and len(full) > len(partial)
    src = tmp_path / "inbox" / "IM0001"
    src.parent.mkdir()
    src.write_bytes(partial)

    real_place = Filer.place

    def place_then_writer_resumes(self: Filer, *args: Any, **kwargs: Any) -> Any:
        placed = real_place(self, *args, **kwargs)
        # The sender, paused after the pixel data longer than settle_seconds, goes on.
        if change == "append":
            with src.open("ab") as fh:
                fh.write(full[len(partial) :])
        else:
            st = src.stat()
            with src.open("r+b") as fh:
                fh.seek(len(partial) - 10)  # inside the pixel data
                fh.write(b"X")
            os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        return placed

    monkeypatch.setattr(Filer, "place", place_then_writer_resumes)
    task = Task(path=str(src), source=str(src), remove_source=True)
    result = process(task, settings)
    assert result.outcome is Outcome.FAILED, result
    assert result.reason == "changed_while_filing" and result.retryable
    assert src.exists(), "the source must stay: the rest of it would be lost"
    now = src.read_bytes()
    assert now == full if change == "append" else len(now) == len(partial)

    monkeypatch.undo()
    later = process(task, settings)
    assert later.outcome is Outcome.CONFLICT, later  # same UID, other content: kept beside
    assert not src.exists()
    assert sorted(files_under(settings.archive).values()) == sorted([partial, now])


# ----- sort --move on a tree still being written -----------------------------------------

WRITER = """
import sys, time
data = open(sys.argv[1], "rb").read()
pause, forever = float(sys.argv[3]), sys.argv[4] == "1"
step = max(1, len(data) // 40)
with open(sys.argv[2], "wb") as out:
    pos = len(data) // 4
    out.write(data[:pos])
    out.flush()
    print("started", flush=True)
    stop = time.monotonic() + 60  # never outlives a test run
    while (pos < len(data) or forever) and time.monotonic() < stop:
        time.sleep(pause)  # the sender's own pace, shorter than settle_seconds
        out.write(data[pos : pos + step] if pos < len(data) else b"\\0")
        pos += step
        out.flush()
print("done", flush=True)
"""


def start_writer(full: Path, dst: Path, *, forever: bool) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(full), str(dst), "0.05", "1" if forever else "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "started"
    return proc


def test_sort_move_files_only_settled_files_and_leaves_one_still_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(batch, "SETTLE_PATIENCE_SECONDS", 5.0)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("settle_seconds: 1.0\nlog_format: json\n")
    src = tmp_path / "src"
    src.mkdir()
    hour_ago = time.time_ns() - 3600 * 10**9
    for i in range(3):  # written long ago: filed at once
        old = src / f"old{i}"
        build_dataset(seed=i, InstanceNumber=i).save_as(old, enforce_file_format=True)
        os.utime(old, ns=(hour_ago, hour_ago))
    ds = build_dataset(seed=10, InstanceNumber=10, rows=64, columns=64)
    ds.private_block(0x7FE1, "ACME 1.0", create=True).add_new(0x01, "LO", "trailing element")
    full = tmp_path / "full.dcm"
    ds.save_as(full, enforce_file_format=True)
    forever_ds = build_dataset(seed=11, InstanceNumber=11, rows=64, columns=64)
    forever_full = tmp_path / "forever.dcm"
    forever_ds.save_as(forever_full, enforce_file_format=True)

    slow = start_writer(full, src / "slow", forever=False)
    endless = start_writer(forever_full, src / "endless", forever=True)
    try:
        code = sort(src, "--archive", tmp_path / "archive", "--move", "--config", cfg)
        slow.communicate(timeout=60)
        assert slow.returncode == 0
    finally:
        for proc in (endless, slow):
            proc.kill()
            proc.communicate()
    assert code == 1
    records = [
        json.loads(line)
        for line in capsys.readouterr().err.splitlines()
        if '"event": "file"' in line
    ]
    outcomes = {Path(r["source"]).name: (r["outcome"], r.get("reason")) for r in records}
    assert outcomes == {
        "old0": ("sorted", None),
        "old1": ("sorted", None),
        "old2": ("sorted", None),
        "slow": ("sorted", None),
        "endless": ("failed", "still_changing"),
    }
    assert sorted(p.name for p in src.iterdir()) == ["endless"]
    slow_filed = next(
        p for p in (tmp_path / "archive").rglob("*.dcm") if dcmread(p).InstanceNumber == 10
    )
    back = dcmread(slow_filed)
    assert back.PixelData == ds.PixelData
    assert back[0x7FE11001].value == "trailing element"
    assert not list((tmp_path / "quarantine").rglob("*.reason.json"))
