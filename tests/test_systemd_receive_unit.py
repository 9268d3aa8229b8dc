"""The receiver's unit: writes only the inbox, loopback-only by default, sandbox as tight."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path, PurePosixPath

import pytest
from test_systemd_unit import MAX_EXPOSURE, SYSTEMD_DIR, Unit, effective_list, is_true, one
from test_systemd_unit import parse_unit as parse

from dicomwatch.receiver import STOP_WAIT_SECONDS
from dicomwatch.receiver_config import ReceiverConfig

UNIT = SYSTEMD_DIR / "dicomwatch-receive.service"
DAEMON_UNIT = SYSTEMD_DIR / "dicomwatch.service"


@pytest.fixture(scope="module")
def unit() -> Unit:
    return parse(UNIT.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def service(unit: Unit) -> dict[str, list[str]]:
    return unit["Service"]


def test_lifecycle(unit: Unit, service: dict[str, list[str]]) -> None:
    assert one(service, "Type") == "notify"
    assert one(service, "NotifyAccess") == "main"
    assert one(service, "ExecStart") == (
        "/opt/dicomwatch/venv/bin/dicomwatch receive --config /etc/dicomwatch/config.yaml"
    )
    assert one(service, "Restart") == "on-failure"
    assert "78" in effective_list(service["RestartPreventExitStatus"])
    assert "multi-user.target" in effective_list(unit["Install"]["WantedBy"])
    stop = one(service, "TimeoutStopSec")
    assert float(stop) > STOP_WAIT_SECONDS, "SIGKILL must not cut the drain short"


def test_same_user_as_the_daemon(service: dict[str, list[str]]) -> None:
    """The daemon trusts the received folder only if its own user owns it."""
    daemon = parse(DAEMON_UNIT.read_text(encoding="utf-8"))["Service"]
    for key in ("User", "Group"):
        assert one(service, key) == one(daemon, key) == "dicomwatch"
    assert int(one(service, "UMask"), 8) & 0o022 == 0o022


def test_writes_only_the_inbox(service: dict[str, list[str]]) -> None:
    assert one(service, "ProtectSystem") == "strict"
    writable = [PurePosixPath(p.lstrip("-+")) for p in effective_list(service["ReadWritePaths"])]
    assert writable == [PurePosixPath("/srv/dicomwatch/inbox")]


def test_network_is_loopback_only_by_default(service: dict[str, list[str]]) -> None:
    assert not is_true(one(service, "PrivateNetwork"))
    assert one(service, "IPAddressDeny") == "any"
    assert effective_list(service["IPAddressAllow"]) == ["localhost"]
    assert ReceiverConfig().bind == "127.0.0.1"
    assert effective_list(service["RestrictAddressFamilies"]) == ["AF_UNIX", "AF_INET", "AF_INET6"]
    assert service["CapabilityBoundingSet"] == [""]
    assert ReceiverConfig().port > 1024, "an unprivileged port needs no capability"


def test_sandbox_matches_the_daemon(service: dict[str, list[str]]) -> None:
    daemon = parse(DAEMON_UNIT.read_text(encoding="utf-8"))["Service"]
    for key in (
        "NoNewPrivileges",
        "ProtectHome",
        "PrivateTmp",
        "PrivateDevices",
        "PrivateUsers",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectKernelLogs",
        "ProtectControlGroups",
        "ProtectClock",
        "ProtectHostname",
        "RestrictNamespaces",
        "RestrictRealtime",
        "RestrictSUIDSGID",
        "LockPersonality",
        "MemoryDenyWriteExecute",
        "RemoveIPC",
        "ProtectProc",
        "ProcSubset",
        "DevicePolicy",
        "SystemCallArchitectures",
    ):
        assert one(service, key) == one(daemon, key), key
    assert service["SystemCallFilter"] == daemon["SystemCallFilter"]


def _analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.skip("systemd-analyze is not installed")
    return path


def test_security_exposure_is_low() -> None:
    proc = subprocess.run(
        [_analyze(), "security", "--offline=true", "--no-pager", str(UNIT)],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": ""},
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    match = re.search(r"exposure level for dicomwatch-receive\.service: (\d+(?:\.\d+)?)", last)
    assert match, f"unexpected last line: {last!r}\n{proc.stderr}"
    assert float(match.group(1)) <= MAX_EXPOSURE, proc.stdout


def test_verify_is_clean(tmp_path: Path) -> None:
    analyze = _analyze()
    true = shutil.which("true")
    if true is None:
        pytest.skip("needs true on this machine")
    copy = tmp_path / "dicomwatch-receive.service"
    copy.write_text(
        UNIT.read_text(encoding="utf-8").replace(
            "ExecStart=/opt/dicomwatch/venv/bin/dicomwatch ", f"ExecStart={true} "
        ),
        encoding="utf-8",
    )
    proc = subprocess.run(
        [analyze, "verify", "--man=no", str(copy)],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": ""},
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stderr.strip() == "", proc.stderr
