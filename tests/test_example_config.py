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
    assert not (tmp_path / "inbox").exists(), "check-config creates nothing"


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
