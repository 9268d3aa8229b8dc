"""The claim folder in-process: claims, tidying and the internal folder's checks.

Real folders in ``tmp_path``; the clock is injected where time matters, so no test
waits for a grace period to pass.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from dicomwatch.claims import Claims
from dicomwatch.config import INTERNAL_DIR
from dicomwatch.errors import ConfigError
from dicomwatch.sorter import Task

DAY = 86_400.0


class FakeClock:
    """A monotonic clock that only moves when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    path = tmp_path / "inbox"
    path.mkdir()
    return path


def locked(inbox: Path, **kw: object) -> Claims:
    claims = Claims(inbox, "n", **kw)  # type: ignore[arg-type]
    claims.lock()
    return claims


def backdate(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


# ----- tidying: the grace is measured on the monotonic clock -------------------------------


def test_a_fresh_folder_with_an_old_mtime_is_not_removed_at_once(inbox: Path) -> None:
    """A wall-clock jump of a day (or ``rsync -t`` keeping a folder's old mtime) must not
    make a folder a sender has just made look abandoned."""
    claims = locked(inbox)
    try:
        fresh = inbox / "fresh"
        fresh.mkdir()
        backdate(fresh, DAY)
        claims.tidy(3600)
        assert fresh.is_dir(), "removed although it was seen empty for the first time"
    finally:
        claims.unlock()


def test_an_empty_folder_goes_once_it_stayed_empty_for_the_grace(
    inbox: Path, tmp_path: Path
) -> None:
    clock = FakeClock()
    claims = locked(inbox, clock=clock)
    try:
        folder = inbox / "study" / "series"
        folder.mkdir(parents=True)
        backdate(folder, DAY)
        (inbox / "full").mkdir()
        (inbox / "full" / "x.dcm").write_bytes(b"x")
        (inbox / "linked").mkdir()
        (inbox / "linked" / "l").symlink_to(tmp_path / "nowhere")
        claims.tidy(3600)
        clock.advance(3599)
        claims.tidy(3600)
        assert folder.is_dir()
        clock.advance(2)
        claims.tidy(3600)
        assert not folder.exists()
        # Removing ``series`` changed ``study``: its own grace starts now.
        assert (inbox / "study").is_dir()
        claims.tidy(3600)
        assert (inbox / "study").is_dir()
        clock.advance(3600)
        claims.tidy(3600)
        assert not (inbox / "study").exists()
        assert (inbox / "full" / "x.dcm").is_file() and (inbox / "linked" / "l").is_symlink()
        assert inbox.is_dir() and (inbox / INTERNAL_DIR / "claims" / "n").is_dir()
    finally:
        claims.unlock()


def test_a_folder_that_changed_while_empty_starts_its_grace_again(inbox: Path) -> None:
    clock = FakeClock()
    claims = locked(inbox, clock=clock)
    try:
        folder = inbox / "ward"
        folder.mkdir()
        claims.tidy(60)
        clock.advance(50)
        (folder / "x.dcm").write_bytes(b"x")
        (folder / "x.dcm").unlink()  # a file came and went: the mtime moved
        os.utime(folder, ns=(time.time_ns(), time.time_ns() + 1_000_000_000))
        claims.tidy(60)
        clock.advance(50)
        claims.tidy(60)
        assert folder.is_dir(), "the grace must restart when the folder changed"
        clock.advance(11)
        claims.tidy(60)
        assert not folder.exists()
    finally:
        claims.unlock()


def test_empty_claim_sub_folders_are_tidied_too(inbox: Path) -> None:
    clock = FakeClock()
    claims = locked(inbox, clock=clock)
    try:
        (inbox / "s").mkdir()
        (inbox / "s" / "x.dcm").write_bytes(b"x")
        task = claims.claim(str(inbox / "s" / "x.dcm"))
        assert isinstance(task, Task)
        os.unlink(task.path)
        claims.release(task)
        claim_dir = inbox / INTERNAL_DIR / "claims" / "n" / "s"
        assert claim_dir.is_dir()
        backdate(claim_dir, DAY)
        backdate(inbox / "s", DAY)
        claims.tidy(10)
        assert claim_dir.is_dir() and (inbox / "s").is_dir()
        clock.advance(10)
        claims.tidy(10)
        assert not claim_dir.exists() and not (inbox / "s").exists()
    finally:
        claims.unlock()


# ----- claiming never follows a symlink below the inbox -----------------------------------


def test_claim_never_follows_a_parent_folder_swapped_for_a_symlink(
    inbox: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x.dcm").write_bytes(b"outside")
    claims = locked(inbox)
    try:
        (inbox / "sub").mkdir()
        (inbox / "sub" / "x.dcm").write_bytes(b"inside")
        (inbox / "sub").rename(inbox / ".old")
        (inbox / "sub").symlink_to(outside)
        assert claims.claim(str(inbox / "sub" / "x.dcm")) == "gone"
        assert (outside / "x.dcm").read_bytes() == b"outside"
        assert os.listdir(outside) == ["x.dcm"]
    finally:
        claims.unlock()


def test_claim_and_unclaim_round_trip(inbox: Path) -> None:
    claims = locked(inbox)
    try:
        (inbox / "a" / "b").mkdir(parents=True)
        (inbox / "a" / "b" / "x.dcm").write_bytes(b"data")
        task = claims.claim(str(inbox / "a" / "b" / "x.dcm"))
        assert isinstance(task, Task)
        assert task.source == str(inbox / "a" / "b" / "x.dcm")
        assert task.rel_source == os.path.join("a", "b", "x.dcm")
        assert not (inbox / "a" / "b" / "x.dcm").exists()
        with open(task.path, "rb") as fh:  # what a worker reads
            assert fh.read() == b"data"
        (inbox / "a" / "b").rmdir()  # tidied meanwhile: handing back makes it again
        claims.unclaim(task)
        assert (inbox / "a" / "b" / "x.dcm").read_bytes() == b"data"
        assert task.path not in claims.claimed
    finally:
        claims.unlock()


def test_nothing_is_claimed_from_inside_the_internal_folder(inbox: Path) -> None:
    claims = locked(inbox)
    try:
        (inbox / INTERNAL_DIR / "planted.dcm").write_bytes(b"x")
        assert claims.claim(str(inbox / INTERNAL_DIR / "planted.dcm")) == "gone"
        assert (inbox / INTERNAL_DIR / "planted.dcm").is_file()
    finally:
        claims.unlock()


def test_a_renamed_internal_folder_is_never_claimed_from(inbox: Path) -> None:
    """A sender renames ``.dicomwatch`` to a name the scans do not skip: the claims and
    the lock file in it stay the daemon's, never claimed again as inbox files."""
    claims = locked(inbox)
    try:
        (inbox / "s").mkdir()
        (inbox / "s" / "x.dcm").write_bytes(b"x")
        task = claims.claim(str(inbox / "s" / "x.dcm"))
        assert isinstance(task, Task)
        (inbox / INTERNAL_DIR).rename(inbox / "old")
        (inbox / "y.dcm").write_bytes(b"y")
        assert isinstance(claims.claim(str(inbox / "y.dcm")), Task)  # into a new folder
        moved = inbox / "old" / "claims" / "n"
        assert claims.claim(str(moved / "s" / "x.dcm")) == "gone"
        assert claims.claim(str(inbox / "old" / "claims" / "n.lock")) == "gone"
        assert (moved / "s" / "x.dcm").read_bytes() == b"x"
        with open(task.path, "rb") as fh:  # the worker still finds it where it went
            assert fh.read() == b"x"
        assert (inbox / INTERNAL_DIR / "claims" / "n" / "y.dcm").read_bytes() == b"y"
    finally:
        claims.unlock()


# ----- the internal folder must be the service user's own folder --------------------------


@pytest.mark.parametrize("level", [".dicomwatch", "claims", "claims/n"])
@pytest.mark.parametrize("what", ["symlink", "file"])
def test_internal_folder_that_is_not_a_folder_is_refused(
    inbox: Path, tmp_path: Path, level: str, what: str
) -> None:
    target = inbox / INTERNAL_DIR if level == ".dicomwatch" else inbox / INTERNAL_DIR / level
    target.parent.mkdir(parents=True, exist_ok=True)
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "claims" / "n").mkdir(parents=True)
    (elsewhere / "claims" / "n" / "x.dcm").write_bytes(b"x")
    if what == "symlink":
        target.symlink_to(elsewhere)
    else:
        target.write_bytes(b"")
    claims = Claims(inbox, "n")
    with pytest.raises(ConfigError, match="symbolic link" if what == "symlink" else "not a folder"):
        claims.lock()
    claims.unlock()
    assert (elsewhere / "claims" / "n" / "x.dcm").read_bytes() == b"x"


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a folder to another user needs root")
@pytest.mark.parametrize("level", [".dicomwatch", "claims", "claims/n"])
def test_internal_folder_of_another_user_is_refused(inbox: Path, level: str) -> None:
    parts = [INTERNAL_DIR, *([] if level == ".dicomwatch" else level.split("/"))]
    (inbox.joinpath(*parts)).mkdir(parents=True)
    os.chown(inbox.joinpath(*parts), 65534, 65534)
    claims = Claims(inbox, "n")
    with pytest.raises(ConfigError, match="belongs to uid 65534"):
        claims.lock()
    claims.unlock()


def test_internal_folders_are_closed_to_group_and_others(inbox: Path) -> None:
    """Senders share the inbox's group: they must not write dicomwatch's folders, nor
    open its lock file (holding its flock would keep the daemon from starting)."""
    (inbox / INTERNAL_DIR / "claims").mkdir(parents=True)
    (inbox / INTERNAL_DIR).chmod(0o777)
    (inbox / INTERNAL_DIR / "claims").chmod(0o775)
    (inbox / INTERNAL_DIR / "claims" / "n.lock").touch(0o644)
    claims = locked(inbox)
    try:
        for path in (
            inbox / INTERNAL_DIR,
            inbox / INTERNAL_DIR / "claims",
            inbox / INTERNAL_DIR / "claims" / "n",
            inbox / INTERNAL_DIR / "claims" / "n.lock",
        ):
            assert path.stat().st_mode & 0o077 == 0, path
    finally:
        claims.unlock()
