"""The one result record: both renderings carry the same facts, on one line each."""

from __future__ import annotations

import io
import json
import logging
import os

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
