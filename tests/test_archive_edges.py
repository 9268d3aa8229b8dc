"""Edges of durable filing: no-replace moves of claims, a staging folder removed under us."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dicomwatch.archive import move_noreplace


def test_moves_when_free(tmp_path: Path) -> None:
    src, dst = tmp_path / "a", tmp_path / "b"
    src.write_bytes(b"claimed")
    move_noreplace(str(src), str(dst))
    assert dst.read_bytes() == b"claimed" and not src.exists()


def test_never_replaces(tmp_path: Path) -> None:
    src, dst = tmp_path / "a", tmp_path / "b"
    src.write_bytes(b"claimed")
    dst.write_bytes(b"newer arrival")
    with pytest.raises(FileExistsError):
        move_noreplace(str(src), str(dst))
    assert dst.read_bytes() == b"newer arrival" and src.read_bytes() == b"claimed"


def test_missing_source(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        move_noreplace(str(tmp_path / "gone"), str(tmp_path / "b"))
    assert not os.path.lexists(tmp_path / "b")


def test_removed_staging_folder_is_made_again(tmp_path: Path) -> None:
    """Tidying ``<root>/.dicomwatch`` away must not stop filing until a restart."""
    import shutil
    from pathlib import PurePosixPath

    from dicomwatch.archive import Filer, StagingOwner

    root = tmp_path / "archive"
    root.mkdir()
    owner = StagingOwner(root, "t")
    try:
        filer = Filer(root, owner.path)
        shutil.rmtree(root / ".dicomwatch")
        placed = filer.place(PurePosixPath("a/b.dcm"), b"payload")
        assert placed.path.read_bytes() == b"payload" and not placed.duplicate
        assert list(owner.path.iterdir()) == []
    finally:
        owner.release()


def test_staging_owner_names_differ_even_for_one_pid(tmp_path: Path) -> None:
    """Two containers sharing one archive both run dicomwatch as pid 1: the pid alone
    would give both the same staging folder, and the second would refuse to start."""
    from dicomwatch.archive import StagingOwner
    from dicomwatch.config import Config
    from dicomwatch.staging import owner_name

    cfg = Config(node_id="n")
    first, second = owner_name(cfg, "sort"), owner_name(cfg, "sort")
    assert first != second and first.startswith(f"n.sort.{os.getpid()}.")
    held = [StagingOwner(tmp_path, first), StagingOwner(tmp_path, second)]
    assert held[0].path != held[1].path
    for owner in held:
        owner.release()
