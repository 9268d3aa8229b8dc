"""Property tests over hostile header values, and a bounded, seeded mutation fuzz run.

The property test drives the engine in-process (``sorter.process``) with arbitrary raw
bytes in the values the default template uses.  The mutation run feeds corrupted real
vendor files (JPEG 2000, JPEG-LS, RLE, JPEG, deflated, native) through the same engine.
That run happens in a child process under an address-space limit, watched by this one:
a decoder that hangs or allocates without bound on a mutant must show up as a named
finding, not as a test session that never ends or a machine that swaps.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import resource
import shutil
import struct
import subprocess
import sys
import time
import traceback
import unicodedata
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import build_dataset, vendor_file
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_hostile import SPECIFIC_CHARACTER_SET, TEMPLATE_KEYWORDS, VR_OF, encode, splice

from dicomwatch import dicomio
from dicomwatch.archive import StagingOwner
from dicomwatch.layout import DEFAULT_TEMPLATE
from dicomwatch.result import Outcome
from dicomwatch.sorter import EngineSettings, Task, process

FUZZ_SOURCES = [
    "JPEG2000.dcm",
    "MR_small_RLE.dcm",
    "CT_small.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "image_dfl.dcm",
    "SC_rgb_jpeg_dcmtk.dcm",
]
FUZZ_CASES = 500
FUZZ_SEED = 20240101
CASE_TIMEOUT = 30.0
"""Seconds one mutant may take before the watcher calls it a hang."""
CHILD_ADDRESS_SPACE = 3 * 1024**3
"""The child's RLIMIT_AS: a decoder that tries to allocate far beyond what a small file
can need fails with MemoryError (reported by ``process`` as ``out_of_memory``)."""
MAX_DECODED = 64 * 1024 * 1024
CLEAR_EVERY = 500
"""Mutants of one source share a UID and a path, so every new one is compared with all
earlier ones (a conflict reads each); a long run empties the roots now and then."""


def make_settings(root: Path, **overrides: Any) -> tuple[EngineSettings, list[StagingOwner]]:
    """Engine settings over ``root/archive`` and ``root/quarantine``, staging owned here."""
    owners = [StagingOwner(root / "archive", "fuzz"), StagingOwner(root / "quarantine", "fuzz")]
    values: dict[str, Any] = {
        "archive": root / "archive",
        "quarantine": root / "quarantine",
        "archive_staging": owners[0].path,
        "quarantine_staging": owners[1].path,
        "template_text": DEFAULT_TEMPLATE,
        "fsync": False,
        "max_decoded_bytes": MAX_DECODED,
        **overrides,
    }
    return EngineSettings(**values), owners


@contextlib.contextmanager
def engine(root: Path, **overrides: Any) -> Iterator[EngineSettings]:
    engine_settings, owners = make_settings(root, **overrides)
    try:
        yield engine_settings
    finally:
        for owner in owners:
            owner.release()


def is_sane_component(part: str) -> bool:
    try:
        raw = part.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return (
        0 < len(raw) <= 255
        and part not in (".", "..")
        and "/" not in part
        and "\x00" not in part
        and not any(unicodedata.category(c) in ("Cc", "Cs") for c in part)
    )


def files_under(root: Path, *, internal: bool = True) -> list[Path]:
    """Files (and links) below ``root``; ``internal=False`` leaves out staging and locks."""
    return [
        p
        for p in root.rglob("*")
        if (p.is_file() or p.is_symlink()) and (internal or ".dicomwatch" not in p.parts)
    ]


# --------------------------------------------------------------------------- properties

# Raw bytes for a text value: any text (surrogates included, written as the bytes a
# careless encoder would produce) or any bytes at all.
raw_value = st.one_of(
    st.text(max_size=200).map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.binary(max_size=300),
)
charsets = st.sampled_from(
    [None, b"ISO_IR 192", b"ISO_IR 100", b"ISO 2022 IR 87", b"GB18030", b"ISO_IR 999", b"\\"]
)
PROPERTY_KEYWORDS = (
    "PatientID",
    "StudyDescription",
    "SeriesDescription",
    "Modality",
    "SeriesInstanceUID",
    "InstanceNumber",
)


def test_hostile_values_are_filed_inside_the_archive_and_never_overwrite(tmp_path: Path) -> None:
    """Any bytes in the template's values: filed inside the archive under sane names, and
    distinct (SOPInstanceUID, content) pairs each keep their own file and bytes."""
    counter = iter(range(10**9))
    inbox = tmp_path / "in"
    inbox.mkdir()

    with engine(tmp_path) as eng:

        @settings(
            max_examples=200,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
            database=None,
        )
        @given(
            values=st.fixed_dictionaries({k: raw_value for k in PROPERTY_KEYWORDS}),
            charset=charsets,
            private=st.binary(max_size=512),
            private_vr=st.sampled_from(["OB", "UN"]),
        )
        def check(
            values: dict[str, bytes], charset: bytes | None, private: bytes, private_vr: str
        ) -> None:
            n = next(counter)
            changes: dict[int, tuple[str, bytes] | None] = {
                TEMPLATE_KEYWORDS[k]: (VR_OF[k], v) for k, v in values.items()
            }
            changes[SPECIFIC_CHARACTER_SET] = None if charset is None else ("CS", charset)
            changes[0x00090010] = ("LO", b"FUZZ")
            changes[0x00091001] = (private_vr, private)
            uid_a, uid_b = (
                f"1.2.826.0.1.3680043.8.498.9.{n}.1",
                f"1.2.826.0.1.3680043.8.498.9.{n}.2",
            )
            # a and b: two instances that map to the same path; c: a's UID, other pixels.
            inputs = {
                "a": splice(encode(build_dataset(seed=1, SOPInstanceUID=uid_a)), changes),
                "b": splice(encode(build_dataset(seed=1, SOPInstanceUID=uid_b)), changes),
                "c": splice(encode(build_dataset(seed=2, SOPInstanceUID=uid_a)), changes),
            }
            destinations: dict[str, Path] = {}
            for name, data in inputs.items():
                path = inbox / f"{n}{name}"
                path.write_bytes(data)
                result = process(Task(path=str(path), source=str(path)), eng)
                expected = Outcome.CONFLICT if name == "c" else Outcome.SORTED
                assert result.outcome is expected, result
                dest = Path(result.destination or "")
                rel = dest.relative_to(tmp_path / "archive")
                assert dest.resolve().is_relative_to((tmp_path / "archive").resolve())
                assert all(is_sane_component(p) for p in rel.parts), rel
                destinations[name] = dest
                path.unlink()
            assert len(set(destinations.values())) == 3, destinations
            for name, dest in destinations.items():
                assert dest.read_bytes() == inputs[name]
            assert files_under(tmp_path / "quarantine", internal=False) == []

        check()
    outside = [p for p in files_under(tmp_path) if p.relative_to(tmp_path).parts[0] != "archive"]
    assert outside == []


# --------------------------------------------------------------------------- mutations

_VRS = [
    b"OB",
    b"OW",
    b"UN",
    b"SQ",
    b"UT",
    b"UL",
    b"US",
    b"LO",
    b"UI",
    b"CS",
    b"IS",
    b"DS",
    b"SH",
    b"PN",
    b"DA",
    b"TM",
    b"ST",
    b"LT",
    b"AE",
    b"AT",
    b"FL",
    b"FD",
    b"SL",
    b"SS",
]
_LONG = {b"OB", b"OW", b"UN", b"SQ", b"UT"}
_ITEM = b"\xfe\xff\x00\xe0"
_MARKERS = [b"\xff\x4f\xff\x51", b"\xff\xc0", b"\xff\xc1", b"\xff\xc3", b"\xff\xf7", b"\xff\xc4"]


def _positions(data: bytes, needle: bytes, limit: int = 400) -> list[int]:
    found, pos = [], data.find(needle)
    while pos >= 0 and len(found) < limit:
        found.append(pos)
        pos = data.find(needle, pos + 1)
    return found


def _nasty(rng: random.Random, old: int, bits: int) -> int:
    top = (1 << bits) - 1
    return rng.choice(
        [
            0,
            1,
            2,
            3,
            top,
            top - 1,
            top >> 1,
            rng.randrange(top + 1),
            max(0, min(top, old + rng.randrange(-16, 17))),
        ]
    )


def _bit_flips(rng: random.Random, data: bytearray) -> str:
    count = rng.randint(1, 16)
    for _ in range(count):
        pos = rng.randrange(len(data))
        data[pos] ^= 1 << rng.randrange(8)
    return f"flip{count}"


def _byte_run(rng: random.Random, data: bytearray) -> str:
    pos, size = rng.randrange(len(data)), rng.randint(1, 64)
    value = rng.choice([0x00, 0xFF, rng.randrange(256)])
    data[pos : pos + size] = bytes([value]) * len(data[pos : pos + size])
    return f"run{value:02x}@{pos}+{size}"


def _truncate(rng: random.Random, data: bytearray) -> str:
    cut = rng.randrange(len(data))
    del data[cut:]
    return f"cut@{cut}"


def _duplicate(rng: random.Random, data: bytearray) -> str:
    start, size = rng.randrange(len(data)), rng.randint(1, 256)
    chunk = bytes(data[start : start + size])
    at = rng.randrange(len(data) + 1)
    data[at:at] = chunk
    return f"dup{start}+{len(chunk)}@{at}"


def _length_field(rng: random.Random, data: bytearray) -> str:
    raw = bytes(data)
    candidates = [(p, vr) for vr in _VRS for p in _positions(raw, vr, 50) if p >= 4]
    items = _positions(raw, _ITEM, 200)
    if items and (not candidates or rng.random() < 0.4):
        pos = rng.choice(items) + 4
        (old,) = struct.unpack_from("<L", raw, pos) if pos + 4 <= len(raw) else (0,)
        if pos + 4 <= len(raw):
            struct.pack_into("<L", data, pos, _nasty(rng, old, 32))
        return f"itemlen@{pos}"
    if not candidates:
        return _bit_flips(rng, data)
    pos, vr = rng.choice(candidates)
    if vr in _LONG and pos + 8 <= len(raw):
        (old,) = struct.unpack_from("<L", raw, pos + 4)
        struct.pack_into("<L", data, pos + 4, _nasty(rng, old, 32))
    elif pos + 4 <= len(raw):
        (old,) = struct.unpack_from("<H", raw, pos + 2)
        struct.pack_into("<H", data, pos + 2, _nasty(rng, old, 16))
    return f"len{vr.decode()}@{pos}"


def _codestream_header(rng: random.Random, data: bytearray) -> str:
    """Corrupt what decoders size their output by: SIZ, SOF, or a fragment's first bytes."""
    raw = bytes(data)
    markers = [(p, m) for m in _MARKERS for p in _positions(raw, m, 20)]
    if markers and rng.random() < 0.7:
        pos, marker = rng.choice(markers)
        if marker == b"\xff\x4f\xff\x51" and pos + 44 <= len(raw):
            field = rng.choice([8, 12, 16, 20, 40])  # Xsiz, Ysiz, XOsiz, YOsiz, Csiz
            bits = 16 if field == 40 else 32
            fmt = ">H" if bits == 16 else ">L"
            (old,) = struct.unpack_from(fmt, raw, pos + field)
            struct.pack_into(fmt, data, pos + field, _nasty(rng, old, bits))
            return f"siz+{field}@{pos}"
        if pos + 10 <= len(raw):
            field = rng.choice([4, 5, 7, 9])  # precision, Y, X, components
            fmt = ">B" if field in (4, 9) else ">H"
            bits = 8 if fmt == ">B" else 16
            (old,) = struct.unpack_from(fmt, raw, pos + field)
            struct.pack_into(fmt, data, pos + field, _nasty(rng, old, bits))
            return f"sof{marker[1]:02x}+{field}@{pos}"
    items = _positions(raw, _ITEM, 200)
    if not items:
        return _byte_run(rng, data)
    start = rng.choice(items) + 8
    for _ in range(rng.randint(1, 8)):
        pos = start + rng.randrange(64)
        if pos < len(data):
            data[pos] = rng.randrange(256)
    return f"fragment@{start}"


MUTATIONS: list[Callable[[random.Random, bytearray], str]] = [
    _bit_flips,
    _byte_run,
    _truncate,
    _duplicate,
    _length_field,
    _codestream_header,
]


def mutant(sources: list[bytes], index: int, seed: int) -> tuple[bytes, str]:
    """The ``index``-th mutant: reproducible from (seed, index) alone."""
    rng = random.Random(seed * 1_000_003 + index)
    which = index % len(sources)
    data = bytearray(sources[which])
    steps = [f"src{which}"]
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        if not data:
            break
        steps.append(rng.choice(MUTATIONS)(rng, data))
    return bytes(data), " ".join(steps)


def fuzz_child(config: dict[str, Any], start: int) -> None:
    """Run mutants ``start..cases-1`` through ``process``; one JSON line before and after each.

    Runs in its own process under RLIMIT_AS; the parent turns a missing "done" line into
    a hang (no progress) or a crash (the child died) for that case.
    """
    resource.setrlimit(resource.RLIMIT_AS, (CHILD_ADDRESS_SPACE, CHILD_ADDRESS_SPACE))
    root = Path(config["root"])
    sources = [Path(p).read_bytes() for p in config["sources"]]
    inbox = root / "in"
    inbox.mkdir(exist_ok=True)
    archive, quarantine = root / "archive", root / "quarantine"
    with (
        engine(root, max_decoded_bytes=MAX_DECODED) as eng,
        open(config["progress"], "a", buffering=1) as progress,
    ):
        for index in range(start, config["cases"]):
            data, how = mutant(sources, index, config["seed"])
            progress.write(json.dumps({"start": index, "how": how}) + "\n")
            path = inbox / f"m{index:05d}.dcm"
            path.write_bytes(data)
            problems: list[str] = []
            outcome = reason = None
            try:
                result = process(Task(path=str(path), source=str(path)), eng)
            except BaseException:
                problems.append("process raised: " + traceback.format_exc(limit=8))
            else:
                outcome, reason = result.outcome.value, result.reason
                problems += check_result(result, data, archive, quarantine)
            path.unlink()
            if (index + 1) % CLEAR_EVERY == 0:
                clear_filed(archive, quarantine)
            progress.write(
                json.dumps(
                    {
                        "done": index,
                        "outcome": outcome,
                        "reason": reason,
                        "problems": problems,
                        "how": how,
                        "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                    }
                )
                + "\n"
            )


def clear_filed(*roots: Path) -> None:
    for root in roots:
        for entry in root.iterdir():
            if entry.name != ".dicomwatch":
                shutil.rmtree(entry)


def check_result(result: Any, data: bytes, archive: Path, quarantine: Path) -> list[str]:
    """What is wrong with one result, as text (empty: nothing)."""
    problems = []
    if result.outcome is Outcome.FAILED:
        return [f"failed: {result.reason}: {result.message}"]
    dest = Path(result.destination or "")
    if result.outcome is Outcome.QUARANTINED:
        if not dest.resolve().is_relative_to(quarantine.resolve()):
            problems.append(f"quarantined outside the quarantine: {dest}")
        elif dest.read_bytes() != data:
            problems.append("quarantined copy differs from the original")
        return problems
    if not dest.resolve().is_relative_to(archive.resolve()):
        return [f"filed outside the archive: {dest}"]
    try:
        dicomio.parse(dest.read_bytes())
    except Exception as exc:
        problems.append(f"archived file does not parse: {type(exc).__name__}: {exc}")
    return problems


def _last_line(path: Path) -> dict[str, Any] | None:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return None
    for line in reversed(lines):
        with contextlib.suppress(json.JSONDecodeError):
            parsed: dict[str, Any] = json.loads(line)
            return parsed
    return None


def run_fuzz(root: Path, sources: list[Path], cases: int, seed: int) -> list[dict[str, Any]]:
    """Drive the child, restarting it after a hang or crash; every "done" line plus one
    synthetic line per hung or crashed case."""
    progress = root / "progress.jsonl"
    config = {
        "root": str(root),
        "sources": [str(s) for s in sources],
        "cases": cases,
        "seed": seed,
        "progress": str(progress),
    }
    extra: list[dict[str, Any]] = []
    start = 0
    while start < cases:
        stderr_path = root / f"child-{start}.stderr"
        with stderr_path.open("wb") as stderr:
            child = subprocess.Popen(
                [sys.executable, __file__, json.dumps(config), str(start)],
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                cwd=root,
            )
        last_change, last_seen = time.monotonic(), None
        while child.poll() is None:
            line = _last_line(progress)
            if line != last_seen:
                last_change, last_seen = time.monotonic(), line
            elif time.monotonic() - last_change > CASE_TIMEOUT:
                child.kill()
                child.wait()
                break
            time.sleep(0.05)
        code = child.returncode
        line = _last_line(progress)
        if code == 0 and line is not None and line.get("done") == cases - 1:
            break
        # The child hung or died: blame the case it had started, then carry on after it.
        if line is not None and "start" in line:
            index = line["start"]
            kind = "hang" if code == -9 else f"child exited {code}"
            tail = stderr_path.read_text(errors="replace")[-2000:]
            extra.append(
                {
                    "done": index,
                    "outcome": None,
                    "reason": None,
                    "how": line["how"],
                    "problems": [f"{kind} on this mutant; stderr: {tail}"],
                }
            )
            start = index + 1
        else:
            tail = stderr_path.read_text(errors="replace")[-4000:]
            raise AssertionError(f"fuzz child exited {code} outside any case: {tail}")
    done = [json.loads(x) for x in progress.read_text().splitlines() if '"done"' in x]
    return done + extra


def check_fuzz_run(root: Path, cases: int, seed: int) -> dict[str, int]:
    """Run ``cases`` mutants and assert everything the engine promises; outcome counts."""
    sources = [vendor_file(name) for name in FUZZ_SOURCES]
    root.mkdir()
    results = run_fuzz(root, sources, cases, seed)
    assert sorted(r["done"] for r in results) == list(range(cases))
    findings = [r for r in results if r["problems"]]
    report = "\n".join(
        f"case {r['done']} ({r['how']}): {'; '.join(r['problems'])[:1500]}" for r in findings
    )
    assert not findings, f"{len(findings)} findings (seed {seed}):\n{report}"
    counts: dict[str, int] = {}
    for r in results:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    assert set(counts) <= {"sorted", "duplicate", "conflict", "quarantined"}, counts
    peak_kb = max(r.get("maxrss_kb", 0) for r in results)
    assert peak_kb < 1024 * 1024, f"the fuzz child peaked at {peak_kb // 1024} MB"
    allowed = {"archive", "quarantine", "in", "progress.jsonl"}
    stray = [
        p
        for p in files_under(root)
        if p.relative_to(root).parts[0] not in allowed and not p.name.startswith("child-")
    ]
    assert stray == []
    assert files_under(root / "in") == []
    return counts


def test_mutated_vendor_files_never_escape_the_engine(tmp_path: Path) -> None:
    """Seeded mutants of real files: ``process`` never raises, never reports ``failed``
    for what is in a file, never hangs, stays within a modest amount of memory, writes
    only into the archive and quarantine, keeps quarantined originals byte for byte, and
    archives only files that parse."""
    started = time.monotonic()
    counts = check_fuzz_run(tmp_path / "fuzz", FUZZ_CASES, FUZZ_SEED)
    assert counts.get("sorted", 0) + counts.get("conflict", 0) > 0, counts
    assert counts.get("quarantined", 0) > 0, counts
    assert time.monotonic() - started < 240


@pytest.mark.soak
def test_mutation_soak(tmp_path: Path) -> None:
    """The same run at length (``FUZZ_SOAK_SEED`` picks another sequence)."""
    seed = int(os.environ.get("FUZZ_SOAK_SEED", "1"))
    check_fuzz_run(tmp_path / "fuzz", int(os.environ.get("FUZZ_SOAK_CASES", "20000")), seed)


def test_mutants_are_reproducible_in_a_fresh_interpreter() -> None:
    """A finding is only useful if (seed, index) rebuilds the same bytes elsewhere."""
    sources = [vendor_file(name).read_bytes() for name in FUZZ_SOURCES]
    here = [hashlib.sha256(mutant(sources, i, FUZZ_SEED)[0]).hexdigest() for i in range(40)]
    script = (
        "import hashlib, json, sys; from conftest import vendor_file; "
        "from test_fuzz import FUZZ_SOURCES, FUZZ_SEED, mutant; "
        "s = [vendor_file(n).read_bytes() for n in FUZZ_SOURCES]; "
        "print(json.dumps([hashlib.sha256(mutant(s, i, FUZZ_SEED)[0]).hexdigest() "
        "for i in range(40)]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        cwd=Path(__file__).parent,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "12345"},
    )
    assert json.loads(out.stdout) == here
    assert len(set(here)) > 30, "mutants differ from one another"


if __name__ == "__main__":
    fuzz_child(json.loads(sys.argv[1]), int(sys.argv[2]))
