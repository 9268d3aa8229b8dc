"""The one result record per file, and its two renderings.

Operators follow the service with ``journalctl -f`` (text) or feed a log pipeline (JSON
lines); both read the same record, so the two never disagree about what happened.
Patient names never appear here: the record carries identifiers, not demographics.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any

from dicomwatch.reasons import Reason


class Outcome(StrEnum):
    """What became of one file.  ``failed`` means it is still where it was, to be retried."""

    SORTED = "sorted"
    DUPLICATE = "duplicate"
    CONFLICT = "conflict"
    QUARANTINED = "quarantined"
    FAILED = "failed"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Instance:
    """Which instance a file holds, as its header says: what the parent's sinks key on.

    The index, series tracking and metrics need these; the log line does not show them
    (a PatientID is PHI), so :meth:`Result.as_dict` and the text rendering leave them out.
    """

    series_instance_uid: str | None = None
    study_instance_uid: str | None = None
    patient_id: str | None = None
    modality: str | None = None
    study_date: str | None = None
    series_number: str | None = None
    instance_number: str | None = None
    template_values: Mapping[str, str | None] = field(default_factory=dict)
    """The header values the path template was rendered from, by keyword."""


@dataclass(frozen=True)
class Result:
    """One file's result: small and picklable, it crosses the worker pipe."""

    outcome: Outcome
    source: str
    destination: str | None = None
    sop_instance_uid: str | None = None
    ts_in: str | None = None
    ts_out: str | None = None
    bytes: int = 0
    ms: float = 0.0
    reason: Reason | None = None
    message: str | None = None
    retryable: bool = False
    instance: Instance | None = field(default=None, compare=False)
    """Identifiers for the sinks; never rendered into the log line."""
    sha256: str | None = field(default=None, compare=False)
    """SHA-256 (hex) of the bytes in the archive, for the index; not in the log line."""

    @property
    def filed(self) -> bool:
        """True when a durable copy exists (archive or quarantine) and the source may go."""
        return self.outcome is not Outcome.FAILED

    def as_dict(self) -> dict[str, Any]:
        """The fields a log line shows (JSON): set ones only, no instance identifiers."""
        data: dict[str, Any] = {}
        for f in _RENDERED_FIELDS:
            value = getattr(self, f)
            if value is None or (f == "retryable" and not value):
                continue
            data[f] = value
        data["outcome"] = self.outcome.value
        data["ms"] = round(self.ms, 1)
        if self.reason is not None:
            data["reason"] = str(self.reason)
        return data


_RENDERED_FIELDS = tuple(f.name for f in fields(Result) if f.name not in ("instance", "sha256"))


# Printable ASCII except space, '"' and '=': the common case, checked by one regex.
_PLAIN_ASCII = re.compile(r"[!#-<>-~]+")


def _quote(value: str) -> str:
    """Quote values with spaces or odd characters so each log line stays one parseable line."""
    if _PLAIN_ASCII.fullmatch(value) or (
        value and all(c.isprintable() and c not in ' "=' for c in value)
    ):
        return value
    return json.dumps(value, ensure_ascii=False)


def render_text(result: Result) -> str:
    """``sorted src=... dst=... uid=... ts=in->out bytes=... ms=...`` on one line."""
    parts = [result.outcome.value, f"src={_quote(result.source)}"]
    if result.destination:
        parts.append(f"dst={_quote(result.destination)}")
    if result.sop_instance_uid:
        parts.append(f"uid={_quote(result.sop_instance_uid)}")
    if result.ts_in or result.ts_out:
        # Taken from the file's own meta: as hostile as a file name.
        ts_in = _quote(result.ts_in) if result.ts_in else "-"
        ts_out = _quote(result.ts_out) if result.ts_out else "-"
        parts.append(f"ts={ts_in}->{ts_out}")
    parts.append(f"bytes={result.bytes}")
    parts.append(f"ms={result.ms:.1f}")
    if result.reason:
        parts.append(f"reason={result.reason}")
    if result.message:
        parts.append(f"msg={_quote(result.message)}")
    return " ".join(parts)


def render_json(result: Result) -> str:
    return json.dumps({"event": "file", **result.as_dict()}, ensure_ascii=False, sort_keys=False)
