"""Run ``dicomwatch run`` as a real subprocess against real folders, and read its log."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from conftest import wait_for
from pydicom import dcmread


class DaemonProc:
    """One daemon process with its own config file and JSON-lines log file."""

    def __init__(self, root: Path, name: str = "a", **overrides: Any) -> None:
        self.root = root
        self.name = name
        self.inbox = Path(overrides.pop("inbox", root / "inbox"))
        self.archive = Path(overrides.pop("archive", root / "archive"))
        self.quarantine = Path(overrides.pop("quarantine", root / "quarantine"))
        self.config = {
            "inbox": str(self.inbox),
            "archive": str(self.archive),
            "quarantine": str(self.quarantine),
            "processed": str(root / "processed"),
            "create_folders": True,  # the tests' folders are made on the first start
            "state_dir": str(root / f"state-{name}"),
            "settle_seconds": 0.3,
            "rescan_seconds": 3.0,
            "workers": 2,
            "node_id": name,
            "log_format": "json",
            "retry_initial_seconds": 0.2,
            "retry_max_seconds": 1.0,
            "empty_dir_grace_seconds": 3600.0,
            "shutdown_timeout_seconds": 30.0,
            **overrides,
        }
        self.config_path = root / f"config-{name}.yaml"
        self.write_config()
        self.log_path = root / f"daemon-{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def write_config(self, **changes: Any) -> None:
        self.config.update(changes)
        self.config_path.write_text(yaml.safe_dump(self.config))

    def start(self, *args: str, env: dict[str, str] | None = None, wait: bool = True) -> None:
        self.starts += 1
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "dicomwatch",
                    "run",
                    "--config",
                    str(self.config_path),
                    *args,
                ],
                stdout=log,
                stderr=log,
                env={**os.environ, **(env or {})},
            )
        if wait and "--once" not in args:
            starts = self.starts
            assert wait_for(
                lambda: (
                    self.count_lines("dicomwatch starting") >= starts and self._watching() >= starts
                ),
                30,
            ), self.log_path.read_text()

    def _watching(self) -> int:
        return (
            self.count_lines("with the ")
            if "--once" not in (self.proc.args if self.proc else [])
            else 0
        )

    def records(self) -> list[dict[str, Any]]:
        out = []
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return []
        for line in text.splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def files(self) -> list[dict[str, Any]]:
        return [r for r in self.records() if r.get("event") == "file"]

    def count_lines(self, needle: str) -> int:
        try:
            return self.log_path.read_text(errors="replace").count(needle)
        except FileNotFoundError:
            return 0

    def send(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 60) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        code = self.proc.wait(timeout)
        return code

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def wait_exit(self, timeout: float = 60) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def ensure_stopped(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def archived(archive: Path) -> list[Path]:
    return sorted(p for p in archive.rglob("*.dcm") if ".dicomwatch" not in p.parts)


def archived_uids(archive: Path) -> list[str]:
    return sorted(
        str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in archived(archive)
    )


def inbox_files(inbox: Path) -> list[Path]:
    """Files still waiting in the inbox, including ones claimed but not yet filed."""
    return sorted(p for p in inbox.rglob("*") if p.is_file() and not p.name.endswith(".lock"))


def temporaries(*roots: Path) -> list[Path]:
    return [
        p
        for root in roots
        if root.exists()
        for p in root.rglob("*")
        if p.is_file()
        and (p.name.endswith(".dwtmp") or ("staging" in p.parts and not p.name.endswith(".lock")))
    ]


def slow_write(path: Path, data: bytes, chunks: int, pause: float) -> None:
    """A writer that pauses mid-file, as a slow network copy does."""
    step = max(1, len(data) // chunks)
    with path.open("wb") as fh:
        for offset in range(0, len(data), step):
            fh.write(data[offset : offset + step])
            fh.flush()
            os.fsync(fh.fileno())
            time.sleep(pause)
