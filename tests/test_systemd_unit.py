"""The shipped systemd files say what the daemon relies on, and the sandbox stays tight.

The unit is read with a small parser of our own rather than ``configparser``: systemd
repeats keys (``SystemCallFilter=`` twice), gives an empty assignment the meaning
"reset the list", and continues lines with a trailing backslash, none of which
``configparser`` models.  When ``systemd-analyze`` is installed, its offline security
rating and its verifier are run on the real file as well.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath

import pytest

from dicomwatch import config as dw_config

SYSTEMD_DIR = Path(__file__).resolve().parent.parent / "systemd"
UNIT = SYSTEMD_DIR / "dicomwatch.service"
SYSUSERS = SYSTEMD_DIR / "dicomwatch.sysusers.conf"
TMPFILES = SYSTEMD_DIR / "dicomwatch.tmpfiles.conf"

FOLDERS = [
    PurePosixPath("/srv/dicomwatch") / name
    for name in ("inbox", "archive", "quarantine", "processed")
]

MAX_EXPOSURE = 2.0

Unit = dict[str, dict[str, list[str]]]


def parse_unit(text: str) -> Unit:
    """Sections -> key -> every value assigned, in order (systemd.syntax(7) subset)."""
    unit: Unit = {}
    section: dict[str, list[str]] | None = None
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line[0] in "#;"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.startswith("[") and line.endswith("]"):
            section = unit.setdefault(line[1:-1], {})
            continue
        assert section is not None, f"assignment outside a section: {raw!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not a KEY=VALUE line: {raw!r}"
        section.setdefault(key.strip(), []).append(value.strip())
    return unit


def effective_list(values: list[str]) -> list[str]:
    """A list setting after systemd's rules: an empty assignment clears what came before."""
    out: list[str] = []
    for value in values:
        if value == "":
            out = []
        else:
            out.extend(value.split())
    return out


def is_true(value: str) -> bool:
    return value.lower() in {"1", "yes", "true", "on"}


def seconds(value: str) -> float:
    """A systemd time span such as ``90``, ``90s``, ``1min 30s`` or ``5min``."""
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "ms": 0.001}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(number) * units[unit]
    return total


@pytest.fixture(scope="module")
def unit() -> Unit:
    return parse_unit(UNIT.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def service(unit: Unit) -> dict[str, list[str]]:
    return unit["Service"]


def one(section: dict[str, list[str]], key: str) -> str:
    """The value of a single-valued setting (the last assignment wins, as in systemd)."""
    assert key in section, f"{key}= missing"
    return section[key][-1]


def test_parser_handles_repeats_resets_and_continuations() -> None:
    parsed = parse_unit("[Service]\n# c\nA=1\nA=\nA=2 \\\n  3\n; c\nB=x=y\n")
    assert parsed == {"Service": {"A": ["1", "", "2  3"], "B": ["x=y"]}}  # "\\" -> " "
    assert effective_list(parsed["Service"]["A"]) == ["2", "3"]


def test_service_lifecycle(unit: Unit, service: dict[str, list[str]]) -> None:
    assert one(service, "Type") == "notify"
    assert one(service, "NotifyAccess") == "main"
    assert one(service, "ExecStart") == (
        "/opt/dicomwatch/venv/bin/dicomwatch run --config /etc/dicomwatch/config.yaml"
    )
    # check the file first: a config the daemon would refuse fails the reload itself
    assert service["ExecReload"] == [
        "/opt/dicomwatch/venv/bin/dicomwatch check-config --quiet "
        "--config /etc/dicomwatch/config.yaml",
        "/bin/kill -HUP $MAINPID",
    ]
    assert one(service, "Restart") == "on-failure"
    assert seconds(one(service, "RestartSec")) == 5
    assert "78" in effective_list(service["RestartPreventExitStatus"])
    assert seconds(one(service, "WatchdogSec")) > 0
    assert one(service, "KillMode") == "mixed"
    assert one(service, "LimitNOFILE") == "65536"
    assert one(service, "OOMPolicy") == "continue"
    assert seconds(one(unit["Unit"], "StartLimitIntervalSec")) > 0
    assert int(one(unit["Unit"], "StartLimitBurst")) > 0
    assert "multi-user.target" in effective_list(unit["Install"]["WantedBy"])


def test_stop_timeout_outlasts_the_daemons_own_drain(service: dict[str, list[str]]) -> None:
    """SIGKILL must not arrive while the daemon is still finishing files in flight."""
    defaults = {f.name: f.default for f in dataclasses.fields(dw_config.Config)}
    drain = defaults["shutdown_timeout_seconds"]
    assert isinstance(drain, float)
    assert seconds(one(service, "TimeoutStopSec")) > drain


def test_static_user(service: dict[str, list[str]]) -> None:
    assert one(service, "User") == "dicomwatch"
    assert one(service, "Group") == "dicomwatch"
    assert not is_true(service.get("DynamicUser", ["no"])[-1])
    assert one(service, "UMask") == "0027"


def test_read_write_paths_cover_every_folder(service: dict[str, list[str]]) -> None:
    assert one(service, "ProtectSystem") == "strict"
    writable = [PurePosixPath(p.lstrip("-+")) for p in effective_list(service["ReadWritePaths"])]
    for folder in FOLDERS:
        assert any(folder == w or w in folder.parents for w in writable), folder


def test_privileges_dropped(service: dict[str, list[str]]) -> None:
    assert service["CapabilityBoundingSet"] == [""]
    assert service["AmbientCapabilities"] == [""]
    for key in (
        "NoNewPrivileges",
        "ProtectHome",
        "PrivateTmp",
        "PrivateDevices",
        "PrivateUsers",
        "PrivateNetwork",
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
    ):
        assert is_true(one(service, key)), key
    assert one(service, "ProtectProc") == "invisible"
    assert one(service, "ProcSubset") == "pid"
    assert one(service, "DevicePolicy") == "closed"
    assert one(service, "IPAddressDeny") == "any"


def test_sockets_and_system_calls(service: dict[str, list[str]]) -> None:
    # AF_UNIX is the only family: the notify socket and multiprocessing's pipes.
    assert effective_list(service["RestrictAddressFamilies"]) == ["AF_UNIX"]
    assert one(service, "SystemCallArchitectures") == "native"
    filters = service["SystemCallFilter"]
    assert filters[0] == "@system-service"
    denied = {name for line in filters if line.startswith("~") for name in line[1:].split()}
    assert {"@privileged", "@resources"} <= denied
    # prlimit64 carries glibc's setrlimit(): worker memory ceilings need it allowed.
    assert "prlimit64" not in denied


def test_sysusers_defines_the_account() -> None:
    lines = [
        line.split()
        for line in SYSUSERS.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    users = [fields for fields in lines if fields[0] == "u"]
    assert len(users) == 1
    assert users[0][1] == "dicomwatch"
    assert "/srv/dicomwatch" in users[0]


def test_tmpfiles_create_the_folders_without_ageing_them() -> None:
    entries = {}
    for line in TMPFILES.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        kind, path, mode, user, group, age = line.split()[:6]
        if kind == "d":
            entries[PurePosixPath(path)] = (kind, mode, user, group, age)
    for folder in [PurePosixPath("/srv/dicomwatch"), *FOLDERS]:
        kind, mode, user, group, age = entries[folder]
        assert (kind, user, group) == ("d", "dicomwatch", "dicomwatch"), folder
        # systemd-tmpfiles --clean must never delete files from the inbox or archive.
        assert age == "-", folder
        assert int(mode, 8) & 0o007 == 0, f"{folder} open to others"
    assert entries[PurePosixPath("/srv/dicomwatch/inbox")][1] == "2770"
    kind, mode, user, group, _ = entries[PurePosixPath("/etc/dicomwatch")]
    assert (kind, user, group) == ("d", "root", "dicomwatch")
    assert int(mode, 8) & 0o022 == 0, "the daemon must not be able to change its config"


def _systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.skip("systemd-analyze is not installed")
    return path


def test_security_exposure_is_low() -> None:
    """``systemd-analyze security --offline=true`` rates the unit file itself.

    With systemd 252 the path can be passed directly (no --root, no copy), as long as
    the file name ends in ``.service``.
    """
    analyze = _systemd_analyze()
    proc = subprocess.run(
        [analyze, "security", "--offline=true", "--no-pager", str(UNIT)],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": ""},
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    match = re.search(r"Overall exposure level for dicomwatch\.service: (\d+(?:\.\d+)?)", last)
    assert match, f"unexpected last line: {last!r}\n{proc.stderr}"
    assert float(match.group(1)) <= MAX_EXPOSURE, proc.stdout


def test_verify_is_clean(tmp_path: Path) -> None:
    """``systemd-analyze verify`` finds nothing but the binary this machine lacks.

    verify insists that ExecStart= and ExecReload= exist, so a copy pointing at ``true``
    is checked.
    """
    analyze = _systemd_analyze()
    true = shutil.which("true")
    if true is None or not Path("/bin/kill").exists():
        pytest.skip("needs true and /bin/kill on this machine")
    text = UNIT.read_text(encoding="utf-8")
    copy = tmp_path / "dicomwatch.service"
    copy.write_text(
        text.replace("=/opt/dicomwatch/venv/bin/dicomwatch ", f"={true} "),
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


# A stand-in for the daemon: SIGHUP is blocked, so it stays pending and can be counted;
# it reports once standard input closes.
_MAIN = """
import signal, sys
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
print("ready", flush=True)
sys.stdin.read()
print("hup" if signal.SIGHUP in signal.sigpending() else "no hup", flush=True)
"""


def run_reload(service: dict[str, list[str]], config: Path) -> tuple[list[int], str]:
    """Run the unit's ExecReload= lines in order, as systemd does: stop at the first failure.

    The installed binary becomes this interpreter's ``-m dicomwatch``, the config path
    the test's file, and ``$MAINPID`` a real process standing in for the daemon.
    """
    with subprocess.Popen(
        [sys.executable, "-c", _MAIN], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as main:
        assert main.stdout is not None and main.stdin is not None
        assert main.stdout.readline() == "ready\n"
        codes: list[int] = []
        for line in service["ExecReload"]:
            argv = shlex.split(line.replace("$MAINPID", str(main.pid)))
            if argv[0] == "/opt/dicomwatch/venv/bin/dicomwatch":
                argv[:1] = [sys.executable, "-m", "dicomwatch"]
            argv = [str(config) if a == "/etc/dicomwatch/config.yaml" else a for a in argv]
            proc = subprocess.run(argv, capture_output=True, text=True, check=False)
            codes.append(proc.returncode)
            assert proc.stdout == "", "systemd would log this on every reload"
            if proc.returncode != 0:
                break
        main.stdin.close()
        return codes, main.stdout.read().strip()


@pytest.mark.skipif(not Path("/bin/kill").exists(), reason="needs /bin/kill")
def test_reload_of_a_rejected_config_fails_and_sends_no_signal(
    service: dict[str, list[str]], tmp_path: Path
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(f"inbox: {tmp_path}/in\narchive: {tmp_path}/in/archive\n")
    codes, seen = run_reload(service, config)
    assert codes == [78]
    assert seen == "no hup"


@pytest.mark.skipif(not Path("/bin/kill").exists(), reason="needs /bin/kill")
def test_reload_of_a_good_config_signals_the_daemon(
    service: dict[str, list[str]], tmp_path: Path
) -> None:
    (tmp_path / "in").mkdir()
    config = tmp_path / "config.yaml"
    config.write_text(
        f"inbox: {tmp_path}/in\narchive: {tmp_path}/archive\nquarantine: {tmp_path}/q\n"
    )
    codes, seen = run_reload(service, config)
    assert codes == [0, 0]
    assert seen == "hup"


# ----- docs/SYSTEMD.md ---------------------------------------------------------------

GUIDE = SYSTEMD_DIR.parent / "docs" / "SYSTEMD.md"
CHECKOUT = "/path/to/dicomwatch"


def guide_install_commands() -> list[str]:
    """The ``install ...`` lines of the guide's fenced shell blocks, in order."""
    commands: list[str] = []
    shell = False
    for line in GUIDE.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            shell = not shell and line[3:].strip() in ("sh", "shell", "bash", "console")
            continue
        if shell and line.startswith("install "):
            commands.append(line)
    return commands


def test_guide_install_commands_work_on_an_empty_root(tmp_path: Path) -> None:
    """Every ``install`` line of docs/SYSTEMD.md, run against an empty root.

    Debian 12 has no /etc/sysusers.d, and a fresh host may lack others: each command must
    make its target folder itself.  ``/etc/`` and ``/usr/`` are moved below a temporary
    root (``DESTDIR``-style) and the checkout is this one.  ``-o``/``-g`` are dropped:
    the account they name is made by an earlier step, not on this machine.
    """
    commands = guide_install_commands()
    assert len(commands) >= 4, commands
    root = tmp_path / "root"
    root.mkdir()
    repo = SYSTEMD_DIR.parent
    installed: list[tuple[Path, int]] = []
    for command in commands:
        text = command.replace(CHECKOUT, str(repo))
        text = text.replace(" /etc/", f" {root}/etc/").replace(" /usr/", f" {root}/usr/")
        argv = shlex.split(text)
        kept: list[str] = []
        skip = False
        for arg in argv:
            if skip:
                skip = False
            elif arg in ("-o", "-g"):
                skip = True
            else:
                kept.append(arg)
        proc = subprocess.run(kept, cwd=repo, capture_output=True, text=True, check=False)
        assert proc.returncode == 0, f"{command}\n{proc.stderr}"
        dest = Path(kept[-1])
        assert root in dest.parents, f"{command} installs outside /etc and /usr"
        mode = int(kept[kept.index("-m") + 1], 8)
        installed.append((dest, mode))
    for dest, mode in installed:
        assert dest.is_file(), dest
        assert dest.stat().st_mode & 0o7777 == mode, dest
    assert (root / "etc/sysusers.d/dicomwatch.conf").read_bytes() == SYSUSERS.read_bytes()
    assert (root / "etc/systemd/system/dicomwatch.service").read_bytes() == UNIT.read_bytes()
