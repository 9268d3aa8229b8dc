"""The command line itself: help texts, option values, levels and overrides, run as the
real command (``python -m dicomwatch``) against real folders."""

from __future__ import annotations

import os
import pwd
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import wait_for
from daemon_helpers import DaemonProc

UID = "1.2.826.0.1.3680043.8.498.99.1"


def dicomwatch(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dicomwatch", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        check=False,
        timeout=120,
    )


@pytest.fixture
def src(tmp_path: Path, make_dicom: Callable[..., Path]) -> Path:
    """One good instance and one text file."""
    folder = tmp_path / "src"
    make_dicom("good.dcm", folder=folder, SOPInstanceUID=UID, PatientID="P1")
    (folder / "notes.txt").write_text("not DICOM\n")
    return folder


# ----- help ---------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["run", "sort", "check-config"])
def test_every_option_has_help_and_each_command_examples(tmp_path: Path, command: str) -> None:
    out = dicomwatch(command, "--help", cwd=tmp_path)
    assert out.returncode == 0
    text = out.stdout
    options = text[text.index("options:") : text.index("examples:")]
    for line in options.splitlines()[1:]:
        if line.startswith("  -") and "  " not in line.strip():
            # an option alone on its line: its help must follow on the next one
            following = options.splitlines()[options.splitlines().index(line) + 1]
            assert following.startswith("      "), f"no help for {line.strip()}"
    examples = text[text.index("examples:") :]
    # RawDescriptionHelpFormatter: the example lines come out as written
    assert f"\n  dicomwatch {command}" in examples


def test_help_explains_src_no_progress_and_check_configs_config(tmp_path: Path) -> None:
    sort = dicomwatch("sort", "--help", cwd=tmp_path).stdout
    assert "SRC                   a file, or a folder" in sort
    assert "--no-progress         no progress bar" in sort
    check = dicomwatch("check-config", "--help", cwd=tmp_path).stdout
    assert "--config FILE  YAML config file to check" in check
    main = dicomwatch("--help", cwd=tmp_path).stdout
    assert "130 interrupted" in main


# ----- bad values are usage errors ------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["sort", "--workers", "0", "x"], "argument --workers: must be at least 1"),
        (["sort", "--workers", "-3", "x"], "argument --workers: must be at least 1"),
        (["sort", "--workers", "two", "x"], "argument --workers: expected a whole number"),
        (["sort", "--log-level", "trace", "x"], "argument --log-level: 'trace' is not one of"),
        (["run", "--log-level", "loud"], "argument --log-level"),
        (["sort", "--archive", "", "x"], "argument --archive: expected a path"),
        (["run", "--quarantine", ""], "argument --quarantine: expected a path"),
        (["run", "--config", ""], "argument --config: expected a path"),
        (["run", "--template", "{PatientNme}.dcm"], "did you mean 'PatientName'"),
        (["sort", "--template", "/abs/{PatientID}.dcm", "x"], "argument --template"),
        (["sort", "-q", "-v", "x"], "not allowed with argument"),
        (["run", "--quiet", "--log-level", "INFO"], "not allowed with argument"),
    ],
)
def test_bad_option_values_are_usage_errors(tmp_path: Path, args: list[str], named: str) -> None:
    out = dicomwatch(*args, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert named in out.stderr
    assert list(tmp_path.iterdir()) == []


# ----- levels ---------------------------------------------------------------------------


def test_quiet_shows_only_problems(tmp_path: Path, src: Path) -> None:
    out = dicomwatch("sort", "--no-progress", "-q", src, cwd=tmp_path)
    assert out.returncode == 1
    lines = out.stderr.splitlines()
    assert len(lines) == 1, lines
    assert "quarantined" in lines[0] and "notes.txt" in lines[0]


def test_log_level_is_case_insensitive(tmp_path: Path, src: Path) -> None:
    out = dicomwatch("sort", "--no-progress", "--log-level", "warning", src, cwd=tmp_path)
    assert out.returncode == 1
    assert len(out.stderr.splitlines()) == 1


def test_verbose_shows_debug_lines(tmp_path: Path, src: Path) -> None:
    out = dicomwatch("sort", "--no-progress", "-v", src, cwd=tmp_path)
    assert out.returncode == 1
    assert " DEBUG " in out.stderr
    plain = dicomwatch("sort", "--no-progress", src, cwd=tmp_path)
    assert " DEBUG " not in plain.stderr


# ----- overrides ------------------------------------------------------------------------


def test_sort_quarantine_and_template_options(tmp_path: Path, src: Path) -> None:
    out = dicomwatch(
        *("sort", "--no-progress", src, "--quarantine", tmp_path / "bad"),
        *("--template", "{PatientID}/{SOPInstanceUID}.dcm"),
        cwd=tmp_path,
    )
    assert out.returncode == 1, out.stderr
    assert (tmp_path / "archive" / "p1" / f"{UID}.dcm").is_file()
    assert (tmp_path / "bad" / "not_dicom" / "notes.txt").is_file()
    assert not (tmp_path / "quarantine").exists()


def test_run_quarantine_and_template_options(tmp_path: Path, src: Path) -> None:
    inbox = tmp_path / "inbox"
    src.rename(inbox)
    config = tmp_path / "c.yaml"
    config.write_text(f"inbox: {inbox}\nsettle_seconds: 0.1\nworkers: 1\n")
    out = dicomwatch(
        *("run", "--once", "--config", config, "--quarantine", tmp_path / "bad"),
        *("--template", "{SOPInstanceUID}.dcm"),
        cwd=tmp_path,
    )
    assert out.returncode == 1, out.stderr
    assert (tmp_path / "archive" / f"{UID}.dcm").is_file()
    assert (tmp_path / "bad" / "not_dicom" / "notes.txt").is_file()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProc]:
    d = DaemonProc(tmp_path, settle_seconds=0.1, workers=1)
    yield d
    d.ensure_stopped()


def test_command_line_settings_outlive_a_reload(daemon: DaemonProc) -> None:
    """SIGHUP rereads the file; what the command line said still wins over it."""
    daemon.start("--template", "{SOPInstanceUID}.dcm", "--log-level", "debug")
    daemon.send(signal.SIGHUP)
    assert wait_for(lambda: daemon.count_lines("SIGHUP: config reloaded") == 1, 30)
    reloaded = [r for r in daemon.records() if "SIGHUP" in str(r.get("msg", ""))]
    assert [r["level"] for r in reloaded] == ["info"], reloaded
    assert reloaded[0]["msg"].endswith("(no changes)")
    assert daemon.stop() == 0


# ----- start-up lines ---------------------------------------------------------------------


def test_codecs_are_one_short_line_at_start(tmp_path: Path, src: Path) -> None:
    out = dicomwatch("sort", "--no-progress", src, cwd=tmp_path)
    codec_lines = [line for line in out.stderr.splitlines() if "transfer syntax" in line]
    assert len(codec_lines) == 1, codec_lines
    line = codec_lines[0]
    assert len(line) < 300, line
    for name in ("JPEG-LS", "JPEG 2000", "RLE"):
        assert name in line
    assert "1.2.840.10008" not in line  # the UIDs are for -v


def test_verbose_lists_every_codec(tmp_path: Path, src: Path) -> None:
    out = dicomwatch("sort", "--no-progress", "-v", src, cwd=tmp_path)
    debug = [line for line in out.stderr.splitlines() if " DEBUG " in line]
    assert any("1.2.840.10008.1.2.4.80" in line for line in debug), debug  # JPEG-LS
    assert any("1.2.840.10008.1.2.5" in line for line in debug), debug  # RLE


# ----- sort as root -----------------------------------------------------------------------

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (sort as root)")


def _other_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no 'nobody' user to own the archive")


@needs_root
def test_sort_as_root_into_another_users_archive_warns_once(tmp_path: Path, src: Path) -> None:
    owner = _other_user()
    archive = tmp_path / "archive"
    archive.mkdir()
    os.chown(archive, owner.pw_uid, owner.pw_gid)
    out = dicomwatch("sort", "--no-progress", src, "--archive", archive, cwd=tmp_path)
    assert out.returncode == 1, out.stderr
    warnings = [line for line in out.stderr.splitlines() if "folders made now" in line]
    assert len(warnings) == 1, out.stderr
    assert (
        f"the archive belongs to {owner.pw_name}; folders made now will belong to root "
        f"— run as that user: runuser -u {owner.pw_name} -- dicomwatch sort "
    ) in warnings[0]
    assert " WARNING " in warnings[0]
    # the folders it warned about: made by root, which the daemon could not write to
    made = [p for p in archive.rglob("*") if p.is_dir() and ".dicomwatch" not in p.parts]
    assert made and all(p.stat().st_uid == 0 for p in made)


@needs_root
def test_sort_as_root_into_roots_archive_or_a_dry_run_does_not_warn(
    tmp_path: Path, src: Path
) -> None:
    out = dicomwatch("sort", "--no-progress", src, cwd=tmp_path)
    assert "folders made now" not in out.stderr
    owner = _other_user()
    os.chown(tmp_path / "archive", owner.pw_uid, owner.pw_gid)
    out = dicomwatch("sort", "--no-progress", "--dry-run", src, cwd=tmp_path)
    assert "folders made now" not in out.stderr


@needs_root
def test_sort_as_root_warns_about_a_missing_archive_in_another_users_folder(
    tmp_path: Path, src: Path
) -> None:
    owner = _other_user()
    base = tmp_path / "srv"
    base.mkdir()
    os.chown(base, owner.pw_uid, owner.pw_gid)
    out = dicomwatch("sort", "--no-progress", src, "--archive", base / "archive", cwd=tmp_path)
    assert f"the archive's folder {base} belongs to {owner.pw_name}; folders made" in out.stderr


@needs_root
def test_sort_as_root_names_an_owner_without_an_account(tmp_path: Path, src: Path) -> None:
    uid = 54321
    try:
        pwd.getpwuid(uid)
        pytest.skip(f"uid {uid} has an account here")
    except KeyError:
        pass
    archive = tmp_path / "archive"
    archive.mkdir()
    os.chown(archive, uid, uid)
    out = dicomwatch("sort", "--no-progress", src, "--archive", archive, cwd=tmp_path)
    assert f"the archive belongs to uid {uid}; folders made now will belong to root" in out.stderr
    assert f"setpriv --reuid={uid} --regid={uid} --clear-groups dicomwatch sort" in out.stderr
