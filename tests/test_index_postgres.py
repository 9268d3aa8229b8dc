"""A PostgreSQL index that goes away mid-burst: filing goes on, every row arrives once."""

from __future__ import annotations

import glob
import os
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import wait_for
from daemon_helpers import DaemonProc, archived
from index_helpers import POSTGRES_ENV, postgres_url, with_database

from dicomwatch.config import config_from_mapping
from dicomwatch.indexdb import IndexError_, open_index

PG_DIR_ENV = "PG_TEST_DIR"


def pg_ctl(action: str) -> None:
    """Stop or start the throwaway cluster ``.ci/postgres`` made (as its owner)."""
    folder = os.environ[PG_DIR_ENV]
    (binary,) = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))[-1:]
    owner = Path(folder).owner()
    cmd = [binary, "-D", f"{folder}/data", "-l", f"{folder}/log", "-w"]
    if action == "stop":
        cmd += ["-m", "fast", "stop"]
    else:
        cmd += ["-o", f"-k {folder} -c listen_addresses='' -c fsync=off", "start"]
    if os.getuid() == 0 and owner != "root":
        cmd = ["runuser", "-u", owner, "--", *cmd]
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)


@pytest.fixture
def pg_database() -> Iterator[str]:
    url = postgres_url()
    if url is None or PG_DIR_ENV not in os.environ:
        pytest.skip(f"{POSTGRES_ENV} and {PG_DIR_ENV} are not set (.ci/postgres start sets both)")
    import psycopg

    name = f"dwtest_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield with_database(url, name)
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_the_server_stops_mid_burst_and_every_instance_is_indexed_once(
    tmp_path: Path, pg_database: str, make_dicom: Callable[..., Path]
) -> None:
    made = tmp_path / "made"
    total = 40
    files = [make_dicom(f"f{n:03d}.dcm", folder=made, InstanceNumber=n) for n in range(total)]
    daemon = DaemonProc(tmp_path, index=pg_database, settle_seconds=0.1)
    cfg = config_from_mapping(dict(daemon.config), source="test")

    def indexed() -> int:
        try:
            with open_index(cfg, create=False) as ix:
                return len(ix.instance_rows())
        except IndexError_:
            return -1

    daemon.start()
    stopped = False
    try:
        for path in files[: total // 2]:
            path.rename(daemon.inbox / path.name)
        assert wait_for(lambda: indexed() == total // 2, 30), daemon.log_path.read_text()
        pg_ctl("stop")
        stopped = True
        for path in files[total // 2 :]:
            path.rename(daemon.inbox / path.name)
        # Filing does not wait for the index.
        assert wait_for(lambda: len(archived(daemon.archive)) == total, 60)
        assert wait_for(lambda: daemon.count_lines("index unavailable") == 1, 30)
        pg_ctl("start")
        stopped = False
        assert wait_for(lambda: indexed() == total, 90), daemon.log_path.read_text()
        assert daemon.count_lines("index is available again") == 1
    finally:
        if stopped:
            pg_ctl("start")
        assert daemon.stop() == 0
    assert daemon.count_lines("index unavailable") == 1
    with open_index(cfg, create=False) as ix:
        rows = ix.instance_rows()
        (series,) = ix.select("SELECT instances FROM series")
    assert len(rows) == total == len({r.sop_instance_uid for r in rows})
    assert series["instances"] == total
    assert all(r.time is not None for r in rows)
