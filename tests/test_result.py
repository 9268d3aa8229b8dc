"""The one result record: both renderings carry the same facts, on one line each."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dicomwatch.logconfig import JsonFormatter, TextFormatter, log_result, setup_logging
from dicomwatch.result import Outcome, Result, render_json, render_text

RESULT = Result(
    outcome=Outcome.SORTED,
    source="inbox/a b.dcm",
    destination="archive/p/x.dcm",
    sop_instance_uid="1.2.3",
    ts_in="1.2.840.10008.1.2.4.90",
    ts_out="1.2.840.10008.1.2.1",
    bytes=1234,
    ms=12.345,
)


def test_text_has_every_field_on_one_line() -> None:
    line = render_text(RESULT)
    assert line == (
        'sorted src="inbox/a b.dcm" dst=archive/p/x.dcm uid=1.2.3 '
        "ts=1.2.840.10008.1.2.4.90->1.2.840.10008.1.2.1 bytes=1234 ms=12.3"
    )


def test_text_escapes_newlines_so_a_hostile_name_cannot_forge_a_line() -> None:
    line = render_text(
        Result(
            outcome=Outcome.QUARANTINED,
            source="x\nsorted src=fake",
            reason="not_dicom",
            message="bad\nthing",
        )
    )
    assert "\n" not in line
    assert line.startswith("quarantined ")
    assert "reason=not_dicom" in line


def test_json_round_trips_the_record() -> None:
    data = json.loads(render_json(RESULT))
    assert data == {
        "event": "file",
        "outcome": "sorted",
        "source": "inbox/a b.dcm",
        "destination": "archive/p/x.dcm",
        "sop_instance_uid": "1.2.3",
        "ts_in": "1.2.840.10008.1.2.4.90",
        "ts_out": "1.2.840.10008.1.2.1",
        "bytes": 1234,
        "ms": 12.3,
    }


def test_filed_means_a_durable_copy_exists() -> None:
    assert all(Result(outcome=o, source="s").filed for o in Outcome if o is not Outcome.FAILED)
    assert not Result(outcome=Outcome.FAILED, source="s").filed


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_log_result_renders_through_the_configured_formatter(fmt: str) -> None:
    stream = io.StringIO()
    setup_logging(fmt, "INFO", stream=stream)
    try:
        log_result(RESULT)
    finally:
        setup_logging("text", "WARNING", stream=io.StringIO())
    out = stream.getvalue().strip().splitlines()
    assert len(out) == 1
    if fmt == "json":
        record = json.loads(out[0])
        assert record["outcome"] == "sorted" and record["level"] == "info"
    else:
        assert out[0].endswith(render_text(RESULT))


def test_journald_lines_have_priority_and_no_timestamp(tmp_path: os.PathLike[str]) -> None:
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "disk full", None, None)
    assert TextFormatter(journald=True).format(record) == "<4>disk full"
    stamped = TextFormatter(journald=False).format(record)
    assert stamped.endswith("WARNING disk full") and stamped[:4].isdigit()
    assert json.loads(JsonFormatter().format(record))["msg"] == "disk full"


def test_a_transfer_syntax_with_a_newline_cannot_forge_a_log_line() -> None:
    forged = Result(
        outcome=Outcome.SORTED,
        source="a.dcm",
        ts_in="1.2.840.10008.1.2.1\nsorted src=forged.dcm",
        ts_out="1.2.840.10008.1.2.1",
    )
    line = render_text(forged)
    assert "\n" not in line
    assert 'ts="1.2.840.10008.1.2.1\\nsorted src=forged.dcm"->1.2.840.10008.1.2.1' in line


def _journal_env_for(path: Path) -> str:
    st = os.stat(path)
    return f"{st.st_dev}:{st.st_ino}"


def test_json_lines_under_journald_carry_the_priority(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """journald reads ``<N>`` at the start of a line as the priority, JSON or not."""
    path = tmp_path / "journal-stream"
    with path.open("w", encoding="utf-8") as stream:
        monkeypatch.setenv("JOURNAL_STREAM", _journal_env_for(path))
        setup_logging("json", "INFO", stream=stream)
        try:
            logging.getLogger("dicomwatch.test").warning("disk full")
            logging.getLogger("dicomwatch.test").info("watching")
        finally:
            setup_logging("text", "WARNING", stream=io.StringIO())
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [line[:3] for line in lines] == ["<4>", "<6>"]
    assert json.loads(lines[0][3:])["msg"] == "disk full"
    assert json.loads(lines[1][3:])["level"] == "info"


def test_json_lines_without_journald_are_plain_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "log"
    with path.open("w", encoding="utf-8") as stream:
        monkeypatch.setenv("JOURNAL_STREAM", "1:2")  # some other stream
        setup_logging("json", "INFO", stream=stream)
        try:
            logging.getLogger("dicomwatch.test").warning("disk full")
        finally:
            setup_logging("text", "WARNING", stream=io.StringIO())
    assert json.loads(path.read_text(encoding="utf-8"))["msg"] == "disk full"


def test_sort_under_journald_writes_json_with_priorities(tmp_path: Path) -> None:
    """The real command with stderr on a stream JOURNAL_STREAM names, as systemd sets it."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "notes.txt").write_text("not DICOM\n")
    err = tmp_path / "stderr"
    with err.open("wb") as stream:
        env = {**os.environ, "JOURNAL_STREAM": _journal_env_for(err)}
        proc = subprocess.run(
            [
                *(sys.executable, "-m", "dicomwatch", "sort", "--no-progress"),
                *("--log-format", "json", "--archive", str(tmp_path / "archive"), str(src)),
            ],
            stderr=stream,
            stdout=subprocess.DEVNULL,
            cwd=tmp_path,
            env=env,
            check=False,
        )
    assert proc.returncode == 1
    lines = err.read_text(encoding="utf-8").splitlines()
    assert lines and all(line[:1] == "<" and line[2:4] == ">{" for line in lines), lines
    by_event = {json.loads(line[3:]).get("outcome"): line[:3] for line in lines}
    assert by_event["quarantined"] == "<4>"
    assert by_event[None] == "<6>"  # the start and summary lines
