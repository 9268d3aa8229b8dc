"""``quarantine retry``: quarantined files go back through the inbox and get filed."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from conftest import build_dataset, wait_for
from daemon_helpers import DaemonProc, archived_uids
from index_helpers import dicomwatch, make_config, write_config
from pydicom.encaps import encapsulate

from dicomwatch.requeue import inbox_name

MPEG2 = "1.2.840.10008.1.2.4.100"


def quarantined(root: Path) -> list[Path]:
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and not p.name.endswith(".reason.json") and ".dicomwatch" not in p.parts
    )


def test_a_repaired_file_is_retried_and_filed_by_the_running_daemon(
    tmp_path: Path, make_dicom: Callable[..., Path]
) -> None:
    good = make_dicom("good.dcm", folder=tmp_path / "made")
    data = good.read_bytes()
    daemon = DaemonProc(tmp_path, index="sqlite")
    config = str(daemon.config_path)
    daemon.start()
    try:
        (daemon.inbox / "cut.dcm").write_bytes(data[: len(data) // 2])

        def listed() -> list[dict[str, str]]:
            out = dicomwatch("quarantine", "list", "--config", config, "--json")
            return [json.loads(line) for line in out.stdout.splitlines()]

        assert wait_for(lambda: len(listed()) == 1, 30), daemon.log_path.read_text()
        (row,) = listed()
        assert row["reason"] == "truncated"
        path = Path(row["path"])
        sidecar = path.with_name(path.name + ".reason.json")
        assert sidecar.is_file()
        path.write_bytes(data)  # the admin puts the complete copy in its place

        out = dicomwatch("quarantine", "retry", "--config", config, "--dry-run", str(path))
        assert out.returncode == 0 and "would retry" in out.stdout
        assert path.is_file() and sidecar.is_file()

        out = dicomwatch("quarantine", "retry", "--config", config, str(path))
        assert out.returncode == 0, out.stderr
        assert not path.exists() and not sidecar.exists()
        assert wait_for(lambda: archived_uids(daemon.archive) != [], 30)
        assert listed() == []
        uid = archived_uids(daemon.archive)[0]

        def found() -> list[dict[str, str]]:
            out = dicomwatch("find", "--config", config, "--json", "--sop-instance-uid", uid)
            return [json.loads(line) for line in out.stdout.splitlines()]

        assert wait_for(lambda: len(found()) == 1, 30)
        (hit,) = found()
        assert Path(hit["path"]).read_bytes() == data
        assert hit["source"].endswith("cut.dcm")
    finally:
        assert daemon.stop() == 0
    assert quarantined(daemon.quarantine) == []


def test_retry_never_overwrites_and_picks_a_name_that_is_not_ignored(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / ".hidden.part").write_bytes(b"junk one")
    (src / "plain.dcm").write_bytes(b"junk two")
    config = write_config(tmp_path, "sqlite")
    assert dicomwatch("sort", "--config", str(config), str(src)).returncode == 1
    cfg = make_config(tmp_path, "sqlite")
    cfg.inbox.mkdir()
    (cfg.inbox / "plain.dcm").write_bytes(b"a sender's file")

    out = dicomwatch("quarantine", "retry", "--config", str(config), "--reason", "not_dicom")
    assert out.returncode == 0, out.stderr
    names = sorted(p.name for p in cfg.inbox.iterdir() if p.is_file())
    assert names == ["hidden.part.dcm", "plain.dcm", "plain~1.dcm"]
    assert (cfg.inbox / "plain.dcm").read_bytes() == b"a sender's file"
    assert (cfg.inbox / "plain~1.dcm").read_bytes() == b"junk two"
    assert quarantined(cfg.quarantine) == []
    assert list(cfg.quarantine.rglob("*.reason.json")) == []
    listed = dicomwatch("quarantine", "list", "--config", str(config), "--json")
    assert listed.stdout == ""


def test_inbox_names() -> None:
    cfg = make_config(Path("/tmp/x"), "none")
    assert inbox_name("not_dicom/.a.tmp", cfg) == "a.tmp.dcm"
    assert inbox_name("truncated/sub_x.dcm", cfg) == "sub_x.dcm"
    assert inbox_name("truncated/...", cfg) == "retried.dcm"


def test_a_decode_error_is_not_retried_while_its_decoder_is_missing(tmp_path: Path) -> None:
    ds = build_dataset()
    ds.file_meta.TransferSyntaxUID = MPEG2
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + b"\x00" * 60])
    ds["PixelData"].VR = "OB"
    src = tmp_path / "src"
    src.mkdir()
    ds.save_as(src / "video.dcm", enforce_file_format=True)
    config = write_config(tmp_path, "sqlite")
    assert dicomwatch("sort", "--config", str(config), str(src)).returncode == 1
    cfg = make_config(tmp_path, "sqlite")
    (bad,) = quarantined(cfg.quarantine)
    assert bad.parent.name == "decode_error"

    out = dicomwatch("quarantine", "retry", "--config", str(config), "--all")
    assert out.returncode == 1
    assert "no decoder for MPEG2" in out.stderr and "decompress: false" in out.stderr
    assert bad.is_file() and bad.with_name(bad.name + ".reason.json").is_file()

    config = write_config(tmp_path, "sqlite", decompress=False)
    out = dicomwatch("quarantine", "retry", "--config", str(config), str(bad))
    assert out.returncode == 0, out.stderr
    assert not bad.exists()


def test_retry_refuses_paths_outside_the_quarantine(tmp_path: Path) -> None:
    config = write_config(tmp_path, "none")
    (tmp_path / "elsewhere").write_bytes(b"x")
    out = dicomwatch("quarantine", "retry", "--config", str(config), str(tmp_path / "elsewhere"))
    assert out.returncode == 2 and "not in the quarantine" in out.stderr
    assert dicomwatch("quarantine", "retry", "--config", str(config)).returncode == 2
