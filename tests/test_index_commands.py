"""``find``, ``series``, ``studies`` and ``quarantine list``: what they print, on both engines."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_for
from daemon_helpers import DaemonProc
from index_helpers import dicomwatch, engine, make_config, write_config

from dicomwatch import cli
from dicomwatch.indexdb import InstanceRow, open_index

__all__ = ["engine"]

STUDY = "1.2.826.0.1.3680043.8.498.1"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = cli.main(list(argv))
    out = capsys.readouterr().out
    return code, out


def lines(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines()]


@pytest.fixture
def sorted_archive(
    tmp_path: Path, engine: str, make_dicom: Callable[..., Path]
) -> tuple[Path, dict[str, Path]]:
    """Five instances in two series of one study, two patients, one junk file; sorted."""
    src = tmp_path / "src"
    made = {
        "a": make_dicom("a.dcm", folder=src, InstanceNumber=1),
        "b": make_dicom("b.dcm", folder=src / "sub", InstanceNumber=2),
        "c": make_dicom("c.dcm", folder=src, SeriesInstanceUID="1.2.3.9", InstanceNumber=1),
        "q": make_dicom(
            "q.dcm",
            folder=src,
            PatientID="O'Brien%_",
            StudyInstanceUID="1.2.7",
            SeriesInstanceUID="1.2.7.1",
        ),
        "x": make_dicom(
            "x.dcm",
            folder=src,
            PatientID="O'BrienXY",
            StudyInstanceUID="1.2.8",
            SeriesInstanceUID="1.2.8.1",
        ),
    }
    (src / "junk.bin").write_bytes(b"\x00" * 300)
    config = write_config(tmp_path, engine)
    out = dicomwatch("sort", "--config", str(config), "--no-progress", str(src))
    assert out.returncode == 1, out.stderr
    return config, made


def uid_of(path: Path) -> str:
    from pydicom import dcmread

    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def test_find_by_sop_instance_uid_gives_the_archived_path(
    sorted_archive: tuple[Path, dict[str, Path]], capsys: pytest.CaptureFixture[str]
) -> None:
    config, made = sorted_archive
    uid = uid_of(made["a"])
    code, out = run(capsys, "find", "--config", str(config), "--sop-instance-uid", uid, "--json")
    assert code == 0
    (row,) = lines(out)
    assert list(row) == [
        "time",
        "outcome",
        "sop_instance_uid",
        "series_instance_uid",
        "study_instance_uid",
        "patient_id",
        "source",
        "path",
    ]
    assert row["sop_instance_uid"] == uid and row["outcome"] == "sorted"
    assert row["study_instance_uid"] == STUDY and row["patient_id"] == "PID001"
    assert row["source"] == str(made["a"])
    assert Path(row["path"]).is_absolute()
    assert Path(row["path"]).read_bytes() == made["a"].read_bytes()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", row["time"])


def test_find_filters(
    sorted_archive: tuple[Path, dict[str, Path]], capsys: pytest.CaptureFixture[str]
) -> None:
    config, made = sorted_archive
    c = str(config)

    def found(*args: str) -> set[str]:
        code, out = run(capsys, "find", "--config", c, "--json", *args)
        assert code == 0
        return {Path(r["source"]).name for r in lines(out)}

    assert found() == {"a.dcm", "b.dcm", "c.dcm", "q.dcm", "x.dcm"}
    assert found("--study-instance-uid", STUDY) == {"a.dcm", "b.dcm", "c.dcm"}
    assert found("--series-instance-uid", "1.2.3.9") == {"c.dcm"}
    assert found("--source", "b.dcm") == {"b.dcm"}  # a name matches the last component
    assert found("--source", "sub/b.dcm") == {"b.dcm"}
    assert found("--source", str(made["c"])) == {"c.dcm"}
    assert found("--source", "*/src/?.dcm") == {"a.dcm", "c.dcm", "q.dcm", "x.dcm"}
    assert found("--source", "*.dcm") == {"a.dcm", "b.dcm", "c.dcm", "q.dcm", "x.dcm"}
    assert found("--source", "%") == set()
    assert found("--since", "1h") == found()
    assert found("--until", "2000-01-01") == set()
    assert found("--since", "2000-01-01T00:00:00+01:00", "--patient-id", "PID001") == {
        "a.dcm",
        "b.dcm",
        "c.dcm",
    }


def test_patient_id_with_quote_percent_underscore_and_nul_is_a_value_not_sql(
    sorted_archive: tuple[Path, dict[str, Path]],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    engine: str,
) -> None:
    config, _ = sorted_archive
    c = str(config)

    def found(patient: str) -> list[str | None]:
        code, out = run(capsys, "find", "--config", c, "--json", "--patient-id", patient)
        assert code == 0
        return [r["patient_id"] for r in lines(out)]

    assert found("O'Brien%_") == ["O'Brien%_"]  # not a pattern: O'BrienXY is not matched
    assert found("O'Brien%") == []
    assert found("O'Brien%_\x00") == []
    assert found("' OR '1'='1") == []
    with open_index(make_config(tmp_path, engine)) as ix:
        ix.write([InstanceRow(sop_instance_uid="9.9", path="n/1.dcm", patient_id="a\x00b'%_")])
    assert len(found("a\x00b'%_")) == 1
    code, out = run(capsys, "series", "--config", c, "--json", "--patient-id", "x'\x00%")
    assert code == 0 and out == ""


def test_text_output_is_aligned_columns(
    sorted_archive: tuple[Path, dict[str, Path]], capsys: pytest.CaptureFixture[str]
) -> None:
    config, _ = sorted_archive
    code, out = run(capsys, "find", "--config", str(config), "--study-instance-uid", STUDY)
    assert code == 0
    header, *rows = out.splitlines()
    assert header.split() == [
        "TIME",
        "OUTCOME",
        "SOP_INSTANCE_UID",
        "SERIES_INSTANCE_UID",
        "STUDY_INSTANCE_UID",
        "PATIENT_ID",
        "SOURCE",
        "PATH",
    ]
    assert len(rows) == 3
    starts = [m.start() for m in re.finditer(r"(?<=  )\S", header)]
    for row in rows:
        assert [row[s - 2 : s] for s in starts] == ["  "] * len(starts)
        assert all(row[s] != " " for s in starts)


def test_series_and_studies(
    sorted_archive: tuple[Path, dict[str, Path]],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    config, _ = sorted_archive
    code, out = run(
        capsys, "series", "--config", str(config), "--json", "--study-instance-uid", STUDY
    )
    assert code == 0
    series = {r["series_instance_uid"]: r for r in lines(out)}
    assert series["1.2.826.0.1.3680043.8.498.2"]["instances"] == 2
    assert series["1.2.3.9"]["instances"] == 1
    for row in series.values():
        assert Path(row["folder"]).is_dir() and row["first_arrival"] <= row["last_arrival"]
    code, out = run(capsys, "studies", "--config", str(config), "--json")
    studies = {r["study_instance_uid"]: r for r in lines(out)}
    assert set(studies) == {STUDY, "1.2.7", "1.2.8"}
    assert studies[STUDY]["series"] == 2 and studies[STUDY]["instances"] == 3
    assert Path(studies[STUDY]["folder"]).is_dir()
    assert all(
        Path(s["folder"]) in Path(studies[STUDY]["folder"]).parents
        or Path(s["folder"]).is_relative_to(studies[STUDY]["folder"])
        for s in series.values()
    )
    code, out = run(
        capsys, "studies", "--config", str(config), "--json", "--patient-id", "O'Brien%_"
    )
    assert [r["study_instance_uid"] for r in lines(out)] == ["1.2.7"]
    code, out = run(capsys, "studies", "--config", str(config))
    assert out.splitlines()[0].split()[:3] == ["STUDY_INSTANCE_UID", "PATIENT_ID", "STUDY_DATE"]


def test_quarantine_list_from_the_index_and_from_the_sidecars_agree(
    sorted_archive: tuple[Path, dict[str, Path]],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    config, _ = sorted_archive
    code, out = run(capsys, "quarantine", "list", "--config", str(config), "--json")
    assert code == 0
    (row,) = lines(out)
    assert row["reason"] == "not_dicom" and row["source"].endswith("junk.bin")
    assert Path(row["path"]).read_bytes() == b"\x00" * 300
    assert row["message"]
    code, out = run(
        capsys, "quarantine", "list", "--config", str(config), "--json", "--reason", "truncated"
    )
    assert out == ""
    no_index = write_config(tmp_path, "none", name="none.yaml")
    code, out = run(capsys, "quarantine", "list", "--config", str(no_index), "--json")
    (from_sidecar,) = lines(out)
    assert {k: v for k, v in from_sidecar.items() if k != "time"} == {
        k: v for k, v in row.items() if k != "time"
    }
    assert from_sidecar["time"][:19] == row["time"][:19] or from_sidecar["time"] <= row["time"]
    code, out = run(capsys, "quarantine", "list", "--config", str(no_index))
    assert out.splitlines()[0].split() == ["TIME", "REASON", "PATH", "SOURCE", "MESSAGE"]


def test_commands_say_what_is_wrong(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, "sqlite")
    assert cli.main(["find", "--config", str(config)]) == 1
    assert "index rebuild" in capsys.readouterr().err
    none = write_config(tmp_path, "none", name="none.yaml")
    assert cli.main(["series", "--config", str(none)]) == 78
    assert "index: none" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["find", "--config", str(config), "--since", "yesterday-ish"])


def test_find_works_while_the_daemon_runs(tmp_path: Path, make_dicom: Callable[..., Path]) -> None:
    daemon = DaemonProc(tmp_path, index="sqlite")
    daemon.start()
    try:
        made = make_dicom("live.dcm", folder=daemon.inbox)
        uid = uid_of(made)

        def found() -> bool:
            out = dicomwatch(
                "find", "--config", str(daemon.config_path), "--json", "--sop-instance-uid", uid
            )
            return out.returncode == 0 and len(out.stdout.splitlines()) == 1

        assert wait_for(found, 30), daemon.log_path.read_text()
        out = dicomwatch("series", "--config", str(daemon.config_path))
        assert out.returncode == 0 and "1.2.826.0.1.3680043.8.498.2" in out.stdout
    finally:
        assert daemon.stop() == 0
