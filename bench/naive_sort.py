"""Naive classic sort: the widely copied one-process "DICOM sorting" script.

Standalone on purpose (only pydicom) so it can be timed as its own process. For every
file: read it, build ``patient/studydate/studydesc/seriesdesc/
Modality.SeriesInstanceUID.InstanceNumber.dcm`` from cleaned tag values, decompress,
save. No fsync, no temp file + rename, no duplicate or collision handling: this is
the baseline a durable, parallel sorter is compared against, not a model to follow.

Usage: ``python bench/naive_sort.py SRC DST``

Deviation from the classic script, for pydicom 3: ``ds.decompress()`` now generates
a new SOP Instance UID by default; a sorter must not change instance identity, so it is
called with ``generate_instance_uid=False`` (the cost difference is one UID, nothing).
Uncompressed input is saved as is (pydicom 3 raises on decompressing it, older pydicom
silently did nothing).

Prints one JSON line: files written and errors.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from pydicom import dcmread

_FORBIDDEN = ("*", ".", ",", '"', "\\", "/", "|", "[", "]", ":", ";", " ")


def clean_text(value: object) -> str:
    """The classic clean_text: forbidden symbols and spaces to '_', lower-case."""
    text = str(value)
    for symbol in _FORBIDDEN:
        text = text.replace(symbol, "_")
    return text.lower()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="classic one-process DICOM sort of SRC into DST")
    ap.add_argument("src")
    ap.add_argument("dst")
    args = ap.parse_args(argv)

    files = errors = 0
    with os.scandir(args.src) as it:
        paths = sorted(e.path for e in it if e.is_file())
    for path in paths:
        try:
            ds = dcmread(path, force=True)
            patient_id = clean_text(ds.get("PatientID", "NA"))
            study_date = clean_text(ds.get("StudyDate", "NA"))
            study_description = clean_text(ds.get("StudyDescription", "NA"))
            series_description = clean_text(ds.get("SeriesDescription", "NA"))
            modality = ds.get("Modality", "NA")
            series_instance_uid = ds.get("SeriesInstanceUID", "NA")
            instance_number = str(ds.get("InstanceNumber", "0"))
            file_name = f"{modality}.{series_instance_uid}.{instance_number}.dcm"

            if ds.file_meta.TransferSyntaxUID.is_compressed:
                ds.decompress(generate_instance_uid=False)

            folder = os.path.join(
                args.dst, patient_id, study_date, study_description, series_description
            )
            os.makedirs(folder, exist_ok=True)
            ds.save_as(os.path.join(folder, file_name))
        except Exception as exc:
            errors += 1
            print(f"{path}: {type(exc).__name__}: {exc}", file=sys.stderr)
            continue
        files += 1
    print(json.dumps({"files": files, "errors": errors}))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
