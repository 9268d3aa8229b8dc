"""Tests for dicomwatch.layout: the archive path must be predictable for normal data
and must stay inside the root for any tag value whatsoever."""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
from pathlib import Path, PurePosixPath

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from dicomwatch.errors import ConfigError, UnsafePathError
from dicomwatch.layout import (
    DEFAULT_TEMPLATE,
    MAX_COMPONENT_BYTES,
    MISSING,
    Template,
    clean_component,
    clean_filename_field,
    compile_template,
    ensure_inside,
    numbered,
    render,
)

DEFAULT = compile_template(DEFAULT_TEMPLATE)
FIELDS = (
    "PatientID",
    "StudyDate",
    "StudyDescription",
    "SeriesDescription",
    "Modality",
    "SeriesInstanceUID",
    "InstanceNumber",
)
TYPICAL: dict[str, str | None] = {
    "PatientID": "12345",
    "StudyDate": "20240101",
    "StudyDescription": "CT Head w/o contrast",
    "SeriesDescription": "Ax 5mm",
    "Modality": "CT",
    "SeriesInstanceUID": "1.2.3.4",
    "InstanceNumber": "7",
}
SOP = "1.2.3.4.5.6"


def fallback(sop: str) -> str:
    return "uid-" + hashlib.sha256(sop.encode()).hexdigest()[:16]


def assert_safe(root: Path, rel: PurePosixPath) -> None:
    assert not rel.is_absolute()
    assert rel.parts, "empty path"
    for part in rel.parts:
        assert part not in ("", ".", "..")
        assert "/" not in part and "\x00" not in part and "\\" not in part
        assert len(part.encode("utf-8")) <= MAX_COMPONENT_BYTES
        assert not part.endswith((".", " "))
    assert len(rel.parts) == 5
    dest = ensure_inside(root, rel)
    assert dest.resolve().is_relative_to(root.resolve())


def with_value(field: str, value: str | None) -> dict[str, str | None]:
    values = dict(TYPICAL)
    values[field] = value
    return values


# --- classic behaviour ------------------------------------------------------------


def test_default_template_typical_values() -> None:
    assert str(render(DEFAULT, TYPICAL, SOP)) == (
        "12345/20240101/ct_head_w_o_contrast/ax_5mm/CT.1.2.3.4.7.dcm"
    )


def test_default_template_keywords() -> None:
    assert DEFAULT.keywords == frozenset(FIELDS)
    assert DEFAULT.text == DEFAULT_TEMPLATE


def test_template_is_hashable_and_picklable() -> None:
    again = compile_template(DEFAULT_TEMPLATE)
    assert again == DEFAULT and hash(again) == hash(DEFAULT)
    assert pickle.loads(pickle.dumps(DEFAULT)) == DEFAULT


def test_missing_and_empty_both_become_na() -> None:
    values: dict[str, str | None] = {"Modality": "", "SeriesInstanceUID": None}
    values.update({"PatientID": "", "StudyDescription": "Brain"})
    rel = render(DEFAULT, values, SOP)
    assert str(rel) == f"NA/NA/brain/NA/NA.NA.{fallback(SOP)}.dcm"


def test_whitespace_only_value_is_not_missing() -> None:
    assert clean_component(" ") == "_"
    assert clean_component("\t\n") == "__"
    assert clean_filename_field(" ") == "_"


def test_multi_valued_backslash() -> None:
    assert clean_component("a\\b") == "a_b"
    assert clean_filename_field("a\\b") == "a_b"
    rel = render(DEFAULT, with_value("StudyDescription", "HEAD\\NECK"), SOP)
    assert rel.parts[2] == "head_neck"


@pytest.mark.parametrize("char", list('*.,"\\/|[]:;<>?'))
def test_every_forbidden_folder_char(char: str) -> None:
    assert clean_component(f"a{char}b") == "a_b"
    assert clean_component(char * 3) == "___"


@pytest.mark.parametrize(
    "char",
    [
        *[" ", "\t", "\n", "\r", "\x0b", "\x0c", "\x00", "\x01", "\x1f", "\x7f", "\x85"],
        *["\u00a0", "\u2028", "\u2029", "\u200b", "\u200d", "\ufeff", "\u3000", "\ud800"],
    ],
)
def test_whitespace_control_and_format_chars(char: str) -> None:
    assert clean_component(f"A{char}B") == "a_b"
    assert clean_filename_field(f"A{char}B") == "A_B"


@pytest.mark.parametrize("char", list('/\\*,"|[]:;<>?'))
def test_every_forbidden_filename_char(char: str) -> None:
    assert clean_filename_field(f"A{char}B") == "A_B"


def test_filename_field_keeps_case_and_dots() -> None:
    assert clean_filename_field("MR") == "MR"
    assert clean_filename_field("1.2.840.10008.5") == "1.2.840.10008.5"
    assert clean_filename_field(None) == MISSING
    assert clean_filename_field("") == MISSING


def test_no_collapsing_of_replacements() -> None:
    assert clean_component("a  b") == "a__b"
    assert clean_component("a, b.") == "a__b_"


def test_non_ascii_stays_readable() -> None:
    assert clean_component("Müller^Jürgen") == "müller^jürgen"
    assert clean_component("日本語 テスト") == "日本語_テスト"
    assert clean_component("胸部CT") == "胸部ct"
    assert clean_filename_field("Müller") == "Müller"


def test_nfc_normalisation() -> None:
    decomposed = "Mu\u0308ller"
    assert clean_component(decomposed) == "m\u00fcller"
    assert clean_filename_field(decomposed) == "M\u00fcller"


def test_missing_marker() -> None:
    assert clean_component(None) == MISSING == "NA"
    assert clean_component("") == MISSING
    assert clean_component(MISSING) == MISSING


def test_literal_text_kept_as_written() -> None:
    tpl = compile_template("Archive-{PatientID}/Study {StudyDate}/{Modality}_IMG.dcm")
    rel = render(tpl, {"PatientID": "AB.C", "StudyDate": "2024", "Modality": "Mr"}, SOP)
    assert str(rel) == "Archive-ab_c/Study 2024/Mr_IMG.dcm"


def test_braces_escaped_in_template() -> None:
    tpl = compile_template("{{x}}/{Modality}.dcm")
    assert tpl.keywords == frozenset({"Modality"})
    assert str(render(tpl, {"Modality": "CT"}, SOP)) == "{x}/CT.dcm"


def test_filename_only_template() -> None:
    tpl = compile_template("{SOPInstanceUID}.dcm")
    assert tpl.folders == ()
    assert str(render(tpl, {"SOPInstanceUID": "1.2.3"}, SOP)) == "1.2.3.dcm"
    assert str(render(tpl, {}, SOP)) == f"{SOP}.dcm"


def test_template_without_fields_in_file_name() -> None:
    tpl = compile_template("{PatientID}/image.dcm")
    assert str(render(tpl, {"PatientID": "P1"}, SOP)) == "p1/image.dcm"


def test_values_are_never_template_syntax() -> None:
    values = with_value("PatientID", "{PatientID}")
    values["Modality"] = "%(PatientID)s{Modality}"
    rel = render(DEFAULT, values, SOP)
    assert rel.parts[0] == "{patientid}"
    assert rel.parts[4] == "%(PatientID)s{Modality}.1.2.3.4.7.dcm"


# --- InstanceNumber fallback ------------------------------------------------------


@pytest.mark.parametrize("missing", [None, ""])
def test_instance_number_fallback_in_file_name(missing: str | None) -> None:
    rel = render(DEFAULT, with_value("InstanceNumber", missing), "1.2.3.9")
    assert rel.name == f"CT.1.2.3.4.{fallback('1.2.3.9')}.dcm"
    assert rel.name != render(DEFAULT, with_value("InstanceNumber", missing), "1.2.3.8").name


def test_instance_number_fallback_in_folder() -> None:
    tpl = compile_template("{InstanceNumber}/{Modality}.dcm")
    rel = render(tpl, {"Modality": "CT"}, "9.9")
    assert rel.parts[0] == fallback("9.9")


def test_instance_number_zero_is_kept() -> None:
    assert render(DEFAULT, with_value("InstanceNumber", "0"), SOP).name == "CT.1.2.3.4.0.dcm"


# --- finishing: reserved names, trailing dots, length -----------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("CON", "_con"),
        ("aux", "_aux"),
        ("Nul", "_nul"),
        ("com1", "_com1"),
        ("LPT9", "_lpt9"),
        ("com10", "com10"),
        ("console", "console"),
        (".", "_"),
        ("..", "__"),
    ],
)
def test_folder_finishing(value: str, expected: str) -> None:
    tpl = compile_template("{PatientID}/x.dcm")
    assert render(tpl, {"PatientID": value}, SOP).parts[0] == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("CON", "_CON"),
        ("con.txt", "_con.txt"),
        ("nul.dcm", "_nul.dcm"),
        ("PRN.tar.gz", "_PRN.tar.gz"),
        ("x.", "x_"),
        ("x. .", "x.__"),
        ("..", "__"),
        (".", "_"),
        ("Con ", "Con_"),
    ],
)
def test_filename_finishing(value: str, expected: str) -> None:
    tpl = compile_template("a/{SOPInstanceUID}")
    assert render(tpl, {"SOPInstanceUID": value}, SOP).name == expected


def test_reserved_name_with_extension_in_default_template() -> None:
    rel = render(DEFAULT, with_value("Modality", "nul"), SOP)
    assert rel.name == "_nul.1.2.3.4.7.dcm"


def test_literal_trailing_dot_is_finished() -> None:
    tpl = compile_template("data. /{Modality}. .")
    assert render(tpl, {"Modality": "CT"}, SOP).parts == ("data__", "CT___")


def test_long_folder_value_truncated_with_hash() -> None:
    value = "x" * 1000
    part = render(DEFAULT, with_value("StudyDescription", value), SOP).parts[2]
    digest = hashlib.sha256(value.encode()).hexdigest()[:12]
    assert part == "x" * (255 - 13) + "~" + digest
    assert len(part.encode()) == 255


def test_long_filename_keeps_extension() -> None:
    uid = "1." * 400 + "9"
    name = render(DEFAULT, with_value("SeriesInstanceUID", uid), SOP).name
    full = f"CT.{uid}.7.dcm"
    assert (
        name == full[: 255 - 13 - 4] + "~" + hashlib.sha256(full.encode()).hexdigest()[:12] + ".dcm"
    )
    assert len(name.encode()) == 255


def test_multibyte_truncation_on_char_boundary() -> None:
    value = "日本語" * 200
    rel = render(DEFAULT, with_value("SeriesDescription", value), SOP)
    part = rel.parts[3]
    assert len(part.encode()) <= 255
    assert part.startswith("日本語日本語")
    assert part[-13] == "~"
    name = render(DEFAULT, with_value("Modality", value), SOP).name
    assert name.endswith(".dcm") and len(name.encode()) <= 255


def test_long_values_with_shared_prefix_stay_distinct() -> None:
    prefix = "p" * 300
    seen_folders = set()
    seen_names = set()
    for suffix in ("a", "b", "c", "aa", ""):
        seen_folders.add(render(DEFAULT, with_value("PatientID", prefix + suffix), SOP).parts[0])
        seen_names.add(render(DEFAULT, with_value("Modality", prefix + suffix), SOP).name)
    assert len(seen_folders) == 5
    assert len(seen_names) == 5


# --- hostile values in every field ------------------------------------------------

HOSTILE = [
    "../../x",
    "../../../../../../etc/passwd",
    "/abs",
    "/etc",
    "/",
    "a/b\\c",
    "\\\\server\\share",
    "C:\\Windows",
    ".",
    "..",
    "...",
    "",
    None,
    "\x00",
    "a\x00b",
    *[chr(c) for c in range(1, 0x20)],
    "\x7f",
    "\n",
    "line\nbreak",
    "x" * 1000,
    "日本語" * 200,
    "😀" * 100,
    "CON",
    "AUX",
    "nul.dcm",
    "com1.txt",
    "trailing.",
    "trailing ",
    "trailing. . .",
    "{PatientID}",
    "%(PatientID)s",
    "{0}",
    "\ud800",
    "\u202e",
    "~",
]


@pytest.mark.parametrize("field", FIELDS)
@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_value_stays_inside(tmp_path: Path, field: str, value: str | None) -> None:
    rel = render(DEFAULT, with_value(field, value), SOP)
    assert_safe(tmp_path, rel)


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_value_everywhere_at_once(tmp_path: Path, value: str | None) -> None:
    rel = render(DEFAULT, dict.fromkeys(FIELDS, value), SOP)
    assert_safe(tmp_path, rel)


def test_hostile_value_in_filename_only_template(tmp_path: Path) -> None:
    tpl = compile_template("{SOPInstanceUID}")
    for value in ("..", ".", "/", "", "../x", "CON", "a" * 300):
        rel = render(tpl, {"SOPInstanceUID": value}, SOP)
        assert len(rel.parts) == 1
        assert rel.parts[0] not in ("", ".", "..")
        ensure_inside(tmp_path, rel)


# --- compile_template errors ------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "fragment"),
    [
        ("{PatientID}/{}.dcm", "empty field"),
        ("{0}/x.dcm", "positional"),
        ("{PatientID.real}/x.dcm", "plain keyword"),
        ("{PatientID[0]}/x.dcm", "plain keyword"),
        ("{ PatientID }/x.dcm", "plain keyword"),
        ("{PatientID!r}/x.dcm", "conversion"),
        ("{InstanceNumber:04d}.dcm", "format spec"),
        ("{PatientID:{Modality}}.dcm", "format spec"),
        ("{PatientID/x.dcm", "unbalanced"),
        ("PatientID}/x.dcm", "unbalanced"),
        ("{PatientID}}.dcm", "unbalanced"),
        ("/{PatientID}/x.dcm", "leading '/'"),
        ("{PatientID}//x.dcm", "empty path component"),
        ("{PatientID}/", "empty path component"),
        ("", "empty path component"),
        ("./{PatientID}.dcm", "'.'"),
        ("{PatientID}/../x.dcm", "'..'"),
        ("..", "'..'"),
        ("{PatientID}\x00/x.dcm", "control"),
        ("{PatientID}\n/x.dcm", "control"),
        ("a\x7f/x.dcm", "control"),
        ("a\u200b/x.dcm", "control"),
        ("{PatientID}\\x.dcm", "backslash"),
    ],
)
def test_compile_errors(template: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        compile_template(template)
    message = str(info.value)
    assert fragment in message
    assert repr(template) in message


def test_is_keyword_rejects_unknown() -> None:
    known = {"PatientID", "Modality", "PatientName"}
    with pytest.raises(ConfigError, match="unknown DICOM keyword 'PatientNme' in template"):
        compile_template("{PatientNme}/{Modality}.dcm", known.__contains__)
    tpl = compile_template("{PatientName}/{Modality}.dcm", known.__contains__)
    assert tpl.keywords == frozenset({"PatientName", "Modality"})


def test_is_keyword_checks_file_name_fields_too() -> None:
    with pytest.raises(ConfigError, match="'Bogus'"):
        compile_template("{PatientID}/{Bogus}.dcm", {"PatientID"}.__contains__)


# --- numbered ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "n", "expected"),
    [
        ("CT.1.2.3.5.dcm", 0, "CT.1.2.3.5.dcm"),
        ("CT.1.2.3.5.dcm", 1, "CT.1.2.3.5~1.dcm"),
        ("CT.1.2.3.5.dcm", 12, "CT.1.2.3.5~12.dcm"),
        ("CT.1.2.3.5", 1, "CT.1.2.3.5~1"),
        ("image", 2, "image~2"),
        ("image.DCM", 3, "image~3.DCM"),
        ("archive.tar.gz", 1, "archive.tar~1.gz"),
    ],
)
def test_numbered(name: str, n: int, expected: str) -> None:
    assert numbered(name, n) == expected


def test_numbered_long_name() -> None:
    name = "a" * 251 + ".dcm"
    result = numbered(name, 1)
    assert result.endswith("~1.dcm")
    assert len(result.encode()) == 255


def test_numbered_never_returns_original_after_truncation() -> None:
    name = "b" * 249 + "~5.dcm"
    assert len(name.encode()) == 255
    assert numbered(name, 5) != name
    assert len(numbered(name, 5).encode()) <= 255


def test_numbered_rejects_negative() -> None:
    with pytest.raises(ValueError, match=">= 0"):
        numbered("x.dcm", -1)


# --- ensure_inside ----------------------------------------------------------------


def test_ensure_inside_accepts_normal_path(tmp_path: Path) -> None:
    rel = PurePosixPath("a/b/c.dcm")
    assert ensure_inside(tmp_path, rel) == tmp_path / "a" / "b" / "c.dcm"


@pytest.mark.parametrize(
    "rel", ["../x.dcm", "a/../../x.dcm", "a/..", "a/b/../c.dcm", "/etc/passwd", "/", ".", ""]
)
def test_ensure_inside_rejects(tmp_path: Path, rel: str) -> None:
    with pytest.raises(UnsafePathError):
        ensure_inside(tmp_path, PurePosixPath(rel))


def test_ensure_inside_rejects_nul(tmp_path: Path) -> None:
    with pytest.raises(UnsafePathError):
        ensure_inside(tmp_path, PurePosixPath("a\x00b"))


def test_ensure_inside_rejects_symlink_escape(tmp_path: Path) -> None:
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(UnsafePathError, match="outside"):
        ensure_inside(root, PurePosixPath("link/x.dcm"))


def test_ensure_inside_allows_symlink_within_root(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "real", target_is_directory=True)
    assert ensure_inside(tmp_path, PurePosixPath("alias/x.dcm")) == tmp_path / "alias/x.dcm"


def test_ensure_inside_rejects_symlink_to_root_parent_file(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "x.dcm").symlink_to(tmp_path / "victim")
    with pytest.raises(UnsafePathError):
        ensure_inside(root, PurePosixPath("x.dcm"))


def test_ensure_inside_symlink_loop(tmp_path: Path) -> None:
    os.symlink("loop", tmp_path / "loop")
    # Refusing is as good as accepting (nothing can be written there), but it must not
    # raise anything other than UnsafePathError.
    with contextlib.suppress(UnsafePathError):
        ensure_inside(tmp_path, PurePosixPath("loop/x.dcm"))


def test_render_checks_are_defensive() -> None:
    # A Template built by hand, bypassing compile_template, still cannot yield '..'.
    tpl = Template("x", frozenset(), (((("..", None),),)), (("..", None),))
    rel = render(tpl, {}, SOP)
    assert rel.parts == ("__", "__")


# --- properties -------------------------------------------------------------------

ANY_CHAR = st.characters(exclude_categories=())
ANY_TEXT = st.text(ANY_CHAR)
VALUE = st.one_of(st.none(), ANY_TEXT, st.sampled_from([".", "..", "/", "", "CON", "nul.x"]))
PROPS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPS
@given(values=st.fixed_dictionaries({f: VALUE for f in FIELDS}), sop=ANY_TEXT)
def test_property_default_template_always_safe(
    tmp_path_factory: pytest.TempPathFactory, values: dict[str, str | None], sop: str
) -> None:
    root = tmp_path_factory.getbasetemp()
    rel = render(DEFAULT, values, sop)
    assert_safe(root, rel)


@PROPS
@given(values=st.dictionaries(st.sampled_from(FIELDS), VALUE), sop=ANY_TEXT)
def test_property_partial_values_always_safe(
    tmp_path_factory: pytest.TempPathFactory, values: dict[str, str | None], sop: str
) -> None:
    assert_safe(tmp_path_factory.getbasetemp(), render(DEFAULT, values, sop))


@PROPS
@given(value=ANY_TEXT)
def test_property_clean_component_idempotent_and_safe(value: str) -> None:
    once = clean_component(value)
    assert clean_component(once) == once
    assert once != "" and "/" not in once and "\x00" not in once and "." not in once
    once.encode("utf-8")


@PROPS
@given(value=ANY_TEXT)
def test_property_clean_filename_field_idempotent_and_safe(value: str) -> None:
    once = clean_filename_field(value)
    assert clean_filename_field(once) == once
    assert once != "" and "/" not in once and "\x00" not in once
    once.encode("utf-8")


@PROPS
@given(a=ANY_TEXT, b=ANY_TEXT)
def test_property_missing_instance_number_distinct_per_sop(a: str, b: str) -> None:
    assume(a != b)
    values = with_value("InstanceNumber", None)
    assert render(DEFAULT, values, a).name != render(DEFAULT, values, b).name


@PROPS
@given(
    name=st.one_of(ANY_TEXT, st.text(min_size=240, max_size=300)),
    ns=st.sets(st.integers(0, 10**6), min_size=2, max_size=10),
)
def test_property_numbered_distinct_and_short(name: str, ns: set[int]) -> None:
    name = clean_filename_field(name)
    results = {numbered(name, n) for n in ns}
    assert len(results) == len(ns)
    for n in ns:
        if n > 0:
            assert len(numbered(name, n).encode("utf-8")) <= MAX_COMPONENT_BYTES


@PROPS
@given(
    stem=st.text(st.sampled_from("ab~.1é日"), min_size=240, max_size=260), n=st.integers(1, 10**4)
)
def test_property_numbered_near_limit(stem: str, n: int) -> None:
    name = stem + ".dcm"
    result = numbered(name, n)
    assert result != name
    assert result.endswith(f"~{n}.dcm")
    assert len(result.encode("utf-8")) <= MAX_COMPONENT_BYTES


def test_file_name_never_hidden() -> None:
    """A value of '.' or '.x' first in the file name must not make a hidden file."""
    template = compile_template("{Modality}.dcm")
    path = render(template, {"Modality": ".hidden"}, "1.2.3")
    assert not path.name.startswith(".")
    assert path.name == "_hidden.dcm"
