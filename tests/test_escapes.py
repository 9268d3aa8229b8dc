"""A hostile sender (anyone who can write the inbox) against real daemons.

What a sender can do to the inbox: rename or replace ``inbox/.dicomwatch``, plant
symlinks, FIFOs and folders anywhere they can write, swap a folder for a symlink while
the daemon works in it, delete or rename the inbox itself if they can write its parent.
None of it may make the daemon read, move or delete anything outside the inbox, remove
archived files, or let a second daemon with the same ``node_id`` run beside the first.

Each test runs ``dicomwatch run`` as a subprocess on real folders (``tmp_path``) and
checks the folders afterwards; waits poll with a deadline.  The one timed loop (the
folder-swapping race) is the attacker's timing, not synchronisation.
"""

from __future__ import annotations

import io
import shutil
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import build_dataset, wait_for
from daemon_helpers import DaemonProc, archived

UID = "1.2.826.0.1.3680043.8.498.15"


def dicom(i: int, **tags: object) -> bytes:
    ds = build_dataset(seed=i, SOPInstanceUID=f"{UID}.{i}", InstanceNumber=i, **tags)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def tail(d: DaemonProc) -> str:
    try:
        return d.log_path.read_text(errors="replace")[-4000:]
    except FileNotFoundError:
        return ""


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Callable[..., DaemonProc]]:
    made: list[DaemonProc] = []

    def make(name: str = "a", **overrides: Any) -> DaemonProc:
        d = DaemonProc(tmp_path, name, **overrides)
        d.inbox.mkdir(exist_ok=True)
        made.append(d)
        return d

    yield make
    for d in made:
        d.ensure_stopped()


# ----- 10. the inbox deleted or renamed under a running daemon ------------------------------


@pytest.mark.parametrize("how", ["renamed", "deleted"])
def test_an_inbox_made_again_is_watched_again_without_waiting_for_a_rescan(
    daemons: Callable[..., DaemonProc], tmp_path: Path, how: str
) -> None:
    d = daemons(rescan_seconds=600)
    d.start()
    (d.inbox / "before.dcm").write_bytes(dicom(1))
    assert wait_for(lambda: len(archived(d.archive)) == 1, 20), tail(d)
    if how == "renamed":
        d.inbox.rename(tmp_path / "inbox.old")
    else:
        shutil.rmtree(d.inbox)
    d.inbox.mkdir()
    (d.inbox / "ward").mkdir()
    (d.inbox / "ward" / "after.dcm").write_bytes(dicom(2))
    assert wait_for(lambda: len(archived(d.archive)) == 2, 10), tail(d)
    assert d.count_lines("watching the new one") == 1, tail(d)
    (d.inbox / "later.dcm").write_bytes(dicom(3))
    assert wait_for(lambda: len(archived(d.archive)) == 3, 10), tail(d)
    assert d.stop(signal.SIGTERM) == 0
    if how == "renamed":
        assert not [p for p in (tmp_path / "inbox.old").rglob("*.dcm")]
