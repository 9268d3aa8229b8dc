"""Peak memory of one worker filing one large RLE multi-frame instance.

Generates an RLE Lossless multi-frame CT (smooth content, so RLE compresses it), then
files it with ``dicomwatch.sorter.process`` in a fresh child process and reports that
process's peak resident set (``VmHWM``) above its resident set after the imports.

Usage: ``python bench/peak_memory.py [--frames 160] [--rows 512] [--columns 512] [--keep DIR]``

Prints one JSON line: decoded MB, file MB, baseline and peak RSS MB, the peak above the
baseline as a multiple of the decoded size, and the peak address space (``VmPeak``, what
``worker_memory_mb`` / RLIMIT_AS limits).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid

_CHILD = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from dicomwatch.sorter import EngineSettings, Task, process

    root = Path(sys.argv[2])
    settings = EngineSettings(
        archive=root / "archive",
        quarantine=root / "quarantine",
        archive_staging=root / "archive" / ".dicomwatch" / "staging" / "b",
        quarantine_staging=root / "quarantine" / ".dicomwatch" / "staging" / "b",
        template_text="{PatientID}/{SOPInstanceUID}.dcm",
        fsync=False,
    )
    for folder in (settings.archive_staging, settings.quarantine_staging):
        folder.mkdir(parents=True, exist_ok=True)
    def status(key):
        # VmHWM belongs to this process's own address space; ru_maxrss would carry
        # over the parent's peak across fork and exec.  VmPeak is the address space
        # (what RLIMIT_AS limits), not memory in use.
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1])
    base = status("VmHWM")
    result = process(Task(path=sys.argv[1], source=sys.argv[1]), settings)
    peak = status("VmHWM")
    vm_peak = status("VmPeak")
    print(json.dumps({"outcome": str(result.outcome), "reason": result.reason,
                      "destination": result.destination,
                      "base_kib": base, "peak_kib": peak, "vm_peak_kib": vm_peak}))
    """
)


def make_rle_multiframe(path: Path, *, frames: int, rows: int, columns: int) -> int:
    """Write an RLE Lossless 16-bit multi-frame; returns its decoded size in bytes."""
    yy, xx = np.mgrid[0:rows, 0:columns]
    base = ((yy // 8) * 7 + (xx // 16) * 3).astype("<u2") & 0x0FFF
    pixels = np.empty((frames, rows, columns), dtype="<u2")
    for i in range(frames):
        pixels[i] = (base + i) & 0x0FFF
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"
    uid = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"
    ds.SOPInstanceUID = uid
    ds.PatientID = "BIG"
    ds.Modality = "CT"
    ds.SeriesInstanceUID = generate_uid()
    ds.InstanceNumber = 1
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    ds.NumberOfFrames = frames
    ds.PixelData = pixels.tobytes()
    ds.compress(RLELossless, pixels, generate_instance_uid=False)
    ds.save_as(path, enforce_file_format=True)
    return int(pixels.nbytes)


def measure(path: Path, work: Path) -> dict[str, object]:
    """File ``path`` in a fresh process; its peak RSS figures in KiB."""
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path), str(work)],
        capture_output=True,
        text=True,
        check=True,
    )
    record: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return record


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="peak RSS of one worker filing a big RLE file")
    ap.add_argument("--frames", type=int, default=160)
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--columns", type=int, default=512)
    ap.add_argument("--keep", type=Path, help="folder to work in (kept afterwards)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        src = work / "big-rle.dcm"
        decoded = make_rle_multiframe(src, frames=args.frames, rows=args.rows, columns=args.columns)
        rec = measure(src, work)
        base = int(rec["base_kib"])  # type: ignore[call-overload]
        peak = int(rec["peak_kib"])  # type: ignore[call-overload]
        print(
            json.dumps(
                {
                    "outcome": rec["outcome"],
                    "decoded_mb": round(decoded / 1e6, 1),
                    "file_mb": round(src.stat().st_size / 1e6, 1),
                    "baseline_rss_mb": round(base * 1024 / 1e6, 1),
                    "peak_rss_mb": round(peak * 1024 / 1e6, 1),
                    "peak_above_baseline_x_decoded": round((peak - base) * 1024 / decoded, 2),
                    "address_space_peak_mb": round(int(rec["vm_peak_kib"]) * 1024 / 1e6, 1),  # type: ignore[call-overload]
                }
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
