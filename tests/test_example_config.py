"""config.example.yaml documents every key with its real default, and check-config works."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from dicomwatch.config import Config, load_config

EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.yaml"


def test_example_lists_every_key() -> None:
    raw = yaml.safe_load(EXAMPLE.read_text())
    assert set(raw) == {f.name for f in fields(Config)}


def test_example_values_are_the_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_config(EXAMPLE) == load_config(None)


def test_check_config_before_first_run_prints_effective_config(tmp_path: Path) -> None:
    (tmp_path / "inbox").mkdir()  # create_folders: false: the inbox must be there
    out = subprocess.run(
        [sys.executable, "-m", "dicomwatch", "check-config", "--config", str(EXAMPLE)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    printed = yaml.safe_load(out.stdout)
    assert printed["inbox"] == str(tmp_path / "inbox")
    assert printed["settle_seconds"] == 2.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inbox"], "check-config creates nothing"


def test_check_config_refuses_overlapping_folders(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"inbox: {tmp_path / 'archive' / 'in'}\narchive: {tmp_path / 'archive'}\n")
    out = subprocess.run(
        [sys.executable, "-m", "dicomwatch", "check-config", "--config", str(cfg)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 78
    assert "inside archive" in out.stderr


def check_config(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dicomwatch", "check-config", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        check=False,
    )


def test_check_config_quiet_prints_nothing_for_a_good_file(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("settle_seconds: 3\n")
    (tmp_path / "inbox").mkdir()
    out = check_config("--quiet", "--config", str(cfg), cwd=tmp_path)
    assert (out.returncode, out.stdout, out.stderr) == (0, "", "")


def test_check_config_quiet_still_names_the_problem(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("setle_seconds: 3\n")
    out = check_config("-q", "--config", str(cfg), cwd=tmp_path)
    assert out.returncode == 78
    assert out.stdout == ""
    assert "setle_seconds" in out.stderr and "did you mean 'settle_seconds'" in out.stderr


def test_check_config_prints_every_problem(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("workers: two\nobserver: inotify\n")
    out = check_config("--config", str(cfg), cwd=tmp_path)
    assert out.returncode == 78
    lines = out.stderr.splitlines()
    assert len(lines) == 2, lines
    assert all(line.startswith(f"dicomwatch: configuration error: {cfg}: ") for line in lines)
    assert "workers" in lines[0] and "observer" in lines[1]


def dicomwatch(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dicomwatch", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        check=False,
        timeout=120,
    )


def test_run_refuses_a_missing_inbox(tmp_path: Path) -> None:
    """An unmounted share must not become an empty local folder the daemon watches."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"inbox: {tmp_path}/share/inbox\n")
    out = dicomwatch("run", "--config", str(cfg), cwd=tmp_path)
    assert out.returncode == 78, out.stderr
    assert f"inbox: {tmp_path}/share/inbox does not exist" in out.stderr
    assert "create_folders" in out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]


def test_check_config_refuses_a_missing_inbox(tmp_path: Path) -> None:
    out = dicomwatch("check-config", "--config", str(EXAMPLE), cwd=tmp_path)
    assert out.returncode == 78
    assert "inbox:" in out.stderr and "create_folders" in out.stderr


def test_run_without_a_config_creates_its_folders_and_logs_it(tmp_path: Path) -> None:
    out = dicomwatch("run", "--once", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    for name in ("inbox", "archive", "quarantine"):
        assert (tmp_path / name).is_dir()
        assert f"created the {name} folder {tmp_path / name}" in out.stderr


def test_run_with_create_folders_makes_the_parents(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"create_folders: true\ninbox: {tmp_path}/x/y/inbox\n")
    out = dicomwatch("run", "--once", "--config", str(cfg), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "x/y/inbox").is_dir()
    assert f"created the inbox folder {tmp_path}/x/y/inbox" in out.stderr
