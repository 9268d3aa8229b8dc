"""Index engines for tests: SQLite always, PostgreSQL where DICOMWATCH_TEST_POSTGRES is set.

``DICOMWATCH_TEST_POSTGRES`` is a libpq URL of a throwaway server (``.ci/run`` starts
one on a Unix socket); every test gets a database of its own, dropped afterwards.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import pytest

from dicomwatch.config import Config, config_from_mapping
from dicomwatch.indexdb import Index, open_index

POSTGRES_ENV = "DICOMWATCH_TEST_POSTGRES"
ENGINES = ["sqlite", "postgresql"]


def postgres_url() -> str | None:
    return os.environ.get(POSTGRES_ENV) or None


def with_database(url: str, name: str) -> str:
    """The same server URL naming another database (path or ``dbname=`` query)."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "dbname"]
    tail = f"?{urlencode(query)}" if query else ""
    return f"{parts.scheme}://{parts.netloc}/{name}{tail}"


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> Iterator[str]:
    """``sqlite`` or a fresh PostgreSQL database URL."""
    if request.param == "sqlite":
        yield "sqlite"
        return
    url = postgres_url()
    if url is None:
        pytest.skip(f"{POSTGRES_ENV} is not set (a PostgreSQL server URL; .ci/run starts one)")
    import psycopg

    name = f"dwtest_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield with_database(url, name)
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def make_config(root: Path, engine: str, **extra: Any) -> Config:
    values: dict[str, Any] = {
        "inbox": str(root / "inbox"),
        "archive": str(root / "archive"),
        "quarantine": str(root / "quarantine"),
        "state_dir": str(root / "state"),
        "index": engine,
        "node_id": "n1",
        **extra,
    }
    return config_from_mapping(values, source="test")


def write_config(root: Path, engine: str, name: str = "config.yaml", **extra: Any) -> Path:
    import yaml

    values = {
        "inbox": str(root / "inbox"),
        "archive": str(root / "archive"),
        "quarantine": str(root / "quarantine"),
        "state_dir": str(root / "state"),
        "index": engine,
        "node_id": "n1",
        "workers": 2,
        **extra,
    }
    path = root / name
    path.write_text(yaml.safe_dump(values))
    return path


def dicomwatch(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dicomwatch", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        check=False,
        timeout=300,
    )


def index_of(cfg: Config) -> Index:
    return open_index(cfg, create=False)
