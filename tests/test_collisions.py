"""Many different files wanting one name: bounded cost per file, then quarantine.

10,001 instances rendering to one name used to cost more per file the more there were
(every numbered name was linked, opened and read again), and past ``MAX_COLLISIONS``
the file failed as retryable and was retried for ever.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from conftest import build_dataset

from dicomwatch import archive
from dicomwatch.archive import Filer, StagingOwner
from dicomwatch.result import Outcome
from dicomwatch.sorter import EngineSettings, Task, process

REL = PurePosixPath("p/x.dcm")


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Counts os.link and the stat family; the real calls still run."""
    calls: Counter[str] = Counter()
    for name in ("link", "stat", "lstat", "fstat"):
        real = getattr(os, name)

        def counting(
            *args: Any, _real: Callable[..., Any] = real, _name: str = name, **kw: Any
        ) -> Any:
            calls[_name] += 1
            return _real(*args, **kw)

        monkeypatch.setattr(os, name, counting)
    return calls


@pytest.fixture
def roots(tmp_path: Path) -> Iterator[EngineSettings]:
    owners = [StagingOwner(tmp_path / "archive", "t"), StagingOwner(tmp_path / "quarantine", "t")]
    yield EngineSettings(
        archive=tmp_path / "archive",
        quarantine=tmp_path / "quarantine",
        archive_staging=owners[0].path,
        quarantine_staging=owners[1].path,
        template_text="{PatientID}/same.dcm",
        fsync=False,
    )
    for owner in owners:
        owner.release()


def test_cost_per_placement_stays_bounded_and_duplicates_are_still_found(
    tmp_path: Path, counted: Counter[str]
) -> None:
    root = tmp_path / "archive"
    owner = StagingOwner(root, "t")
    try:
        filer = Filer(root, owner.path, fsync=False)
        blobs = [f"instance {i:04d} ".encode() * 50 for i in range(300)]  # one size for all
        per_placement = []
        for i, blob in enumerate(blobs):
            counted.clear()
            placed = filer.place(REL, blob)
            per_placement.append(sum(counted.values()))
            assert placed.path.name == ("x.dcm" if i == 0 else f"x~{i}.dcm")
            assert not placed.duplicate
        # Resolving and checking the destination path costs the same stats every time
        # (more for a deeper tmp_path); a collision may add only a few calls to that.
        base = per_placement[0]
        assert max(per_placement) <= base + 4, per_placement

        # The same bytes again, under any number: a duplicate, found at the same cost.
        for i in (0, 1, 150, 299):
            counted.clear()
            again = filer.place(REL, blobs[i])
            assert again.duplicate and again.path.name == ("x.dcm" if i == 0 else f"x~{i}.dcm")
            assert sum(counted.values()) <= base + 4, counted

        # A restarted process looks at the numbered names once, then is as cheap.
        fresh = Filer(root, owner.path, fsync=False)
        assert fresh.place(REL, blobs[200]).path.name == "x~200.dcm"
        counted.clear()
        assert fresh.place(REL, blobs[201]).path.name == "x~201.dcm"
        placed = fresh.place(REL, b"new " * 300)
        assert placed.path.name == "x~300.dcm" and not placed.duplicate
        assert sum(counted.values()) <= 2 * (base + 4), counted
        assert len(os.listdir(root / "p")) == 301

        # Another writer takes the next numbers: stepped over, and still no second copy.
        (root / "p" / "x~301.dcm").write_bytes(b"someone else")
        (root / "p" / "x~302.dcm").write_bytes(b"identical")
        counted.clear()
        placed = fresh.place(REL, b"identical")
        assert placed.duplicate and placed.path.name == "x~302.dcm"
        assert sum(counted.values()) <= base + 8, counted
        assert fresh.place(REL, b"later").path.name == "x~303.dcm"
        assert (root / "p" / "x~301.dcm").read_bytes() == b"someone else"
    finally:
        owner.release()


def test_one_more_than_max_collisions_is_quarantined(
    roots: EngineSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, counted: Counter[str]
) -> None:
    limit = 40
    monkeypatch.setattr(archive, "MAX_COLLISIONS", limit)
    src = tmp_path / "src"
    src.mkdir()
    paths = []
    for i in range(limit + 1):
        path = src / f"f{i:03d}"
        build_dataset(seed=i, InstanceNumber=i).save_as(path, enforce_file_format=True)
        paths.append(path)
    costs = []
    results = []
    for path in paths:
        counted.clear()
        results.append(process(Task(path=str(path), source=str(path)), roots))
        costs.append(counted["link"] + counted["lstat"] + counted["stat"])
    assert [r.outcome for r in results[:limit]] == [Outcome.SORTED] * limit
    last = results[limit]
    assert last.outcome is Outcome.QUARANTINED, last
    assert last.reason == "too_many_collisions" and not last.retryable
    assert (roots.quarantine / "too_many_collisions" / "f040").read_bytes() == paths[
        -1
    ].read_bytes()
    assert len(os.listdir(roots.archive / "pid001")) == limit
    assert max(costs[1:limit]) <= costs[0] + 4, costs
