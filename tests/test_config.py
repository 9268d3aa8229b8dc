"""Tests for dicomwatch.config: defaults, YAML loading from real files, every mistake a
ConfigError that names its key and says what would be right, folder preparation and
printing the effective configuration."""

from __future__ import annotations

import json
import logging
import math
import os
import socket
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dicomwatch.config import (
    DEFAULT_IGNORE,
    Config,
    config_from_mapping,
    load_config,
    prepare_folders,
    render_yaml,
    validate,
)
from dicomwatch.errors import ConfigError
from dicomwatch.layout import DEFAULT_TEMPLATE

IS_ROOT = os.geteuid() == 0


@pytest.fixture
def cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return Path.cwd()


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def non_default_values(base: Path) -> dict[str, Any]:
    """A value for every key that differs from its default (plain YAML types)."""
    return {
        "inbox": str(base / "in box"),
        "archive": str(base / "arch"),
        "quarantine": str(base / "quar"),
        "processed": str(base / "done"),
        "create_folders": True,
        "template": "{PatientID}/{StudyInstanceUID}/{SOPInstanceUID}.dcm",
        "decompress": False,
        "max_decoded_bytes": 1024,
        "workers": 3,
        "worker_memory_mb": 512,
        "after_filing": "move",
        "observer": "polling",
        "polling_interval_seconds": 0.5,
        "settle_seconds": 5.5,
        "rescan_seconds": 30.0,
        "ignore": ["*.part", "incoming-*"],
        "max_pending": 10,
        "max_attempts": 5,
        "retry_initial_seconds": 1.0,
        "retry_max_seconds": 10.0,
        "task_timeout_seconds": 0.0,
        "stuck_warning_seconds": 30.0,
        "shutdown_timeout_seconds": 5.0,
        "summary_seconds": 60.0,
        "empty_dir_grace_seconds": 0.0,
        "node_id": "node-a_1.example",
        "fsync": False,
        "log_format": "json",
        "log_level": "DEBUG",
        "state_dir": str(base / "state"),
        "index": "none",
    }


# ----- defaults ------------------------------------------------------------------------


def test_defaults(cwd: Path) -> None:
    cfg = load_config(None)
    assert cfg.inbox == cwd / "inbox"
    assert cfg.archive == cwd / "archive"
    assert cfg.quarantine == cwd / "quarantine"
    assert cfg.processed == cwd / "processed"
    assert all(p.is_absolute() for p in (cfg.inbox, cfg.archive, cfg.quarantine, cfg.processed))
    assert cfg.template == DEFAULT_TEMPLATE
    assert cfg.settle_seconds == 2.0
    assert cfg.rescan_seconds == 60.0
    assert cfg.workers == 0
    assert cfg.effective_workers == len(os.sched_getaffinity(0))
    assert cfg.after_filing == "delete"
    assert cfg.decompress is True
    assert cfg.fsync is True
    assert cfg.ignore == DEFAULT_IGNORE
    assert cfg.node_id == ""
    assert cfg.effective_node_id == (socket.gethostname() or "node")
    assert cfg.to_dict()["node_id"] == cfg.effective_node_id
    # loading does not create anything
    assert list(cwd.iterdir()) == []


def test_explicit_workers(cwd: Path) -> None:
    assert config_from_mapping({"workers": 3}).effective_workers == 3


def test_paths_are_fixed_at_load_time(cwd: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config(None)
    (cwd / "elsewhere").mkdir()
    monkeypatch.chdir(cwd / "elsewhere")
    assert cfg.archive == cwd / "archive"
    assert load_config(None).archive == cwd / "elsewhere" / "archive"


# ----- YAML files ----------------------------------------------------------------------


def test_every_key_round_trips_from_a_file(cwd: Path) -> None:
    values = non_default_values(cwd)
    assert set(values) == {f.name for f in fields(Config)}, "a key is missing from this test"
    defaults = Config().to_dict()
    for key, value in values.items():
        assert value != defaults[key], key
    lines = ["# dicomwatch configuration", ""]
    for key, value in values.items():
        lines += [f"# {key}", f"{key}: {json.dumps(value)}  # set by the test"]
    path = write(cwd / "dicomwatch.yaml", "\n".join(lines) + "\n")
    cfg = load_config(path)
    assert cfg.to_dict() == values
    assert cfg.ignore == tuple(values["ignore"])
    assert isinstance(cfg.inbox, Path)
    assert cfg.effective_workers == 3


def test_plain_yaml_style(cwd: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = cwd / "home"
    monkeypatch.setenv("HOME", str(home))
    path = write(
        cwd / "c.yaml",
        """\
# paths relative to the working directory, or to the home folder
inbox: incoming            # relative
archive: ~/pacs            # home
quarantine: ./q/../quarantine
after_filing: move
processed: /srv/done/
settle_seconds: 3          # a whole number is fine for seconds
ignore:
  - "*.part"
  - .*
decompress: no             # YAML 1.1 boolean
""",
    )
    cfg = load_config(path)
    assert cfg.inbox == cwd / "incoming"
    assert cfg.archive == home / "pacs"
    assert cfg.quarantine == cwd / "quarantine"
    assert cfg.processed == Path("/srv/done")
    assert cfg.settle_seconds == 3.0
    assert isinstance(cfg.settle_seconds, float)
    assert cfg.ignore == ("*.part", ".*")
    assert cfg.decompress is False


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n", "~\n"])
def test_empty_file_is_the_default(cwd: Path, text: str) -> None:
    cfg = load_config(write(cwd / "empty.yaml", text))
    assert cfg == load_config(None)


def test_empty_ignore_list_is_allowed(cwd: Path) -> None:
    assert config_from_mapping({"ignore": []}).ignore == ()


# ----- errors --------------------------------------------------------------------------

ERRORS: list[tuple[str, list[str]]] = [
    ("setle_seconds: 3", ["setle_seconds", "did you mean 'settle_seconds'"]),
    ("Inbox: x", ["Inbox", "did you mean 'inbox'"]),
    ("colour: blue", ["unknown key 'colour'"]),
    ("1: 2", ["unknown key 1"]),
    ('workers: "two"', ["workers", "whole number", "'two'"]),
    ("workers: 2.5", ["workers", "whole number"]),
    ("workers: true", ["workers", "whole number"]),
    ('decompress: "yes"', ["decompress", "true or false", "'yes'"]),
    ("fsync: 1", ["fsync", "true or false"]),
    ("settle_seconds: true", ["settle_seconds", "number"]),
    ('settle_seconds: "2"', ["settle_seconds", "number"]),
    ("settle_seconds: .nan", ["settle_seconds", "finite"]),
    ("rescan_seconds: .inf", ["rescan_seconds", "finite"]),
    ("shutdown_timeout_seconds: 1" + "0" * 400, ["shutdown_timeout_seconds", "finite"]),
    ('ignore: "*.tmp"', ["ignore", "list"]),
    ("ignore: ['']", ["ignore", "non-empty"]),
    ("ignore: [1]", ["ignore", "list of non-empty strings"]),
    ('inbox: ""', ["inbox", "folder path"]),
    ("inbox: 5", ["inbox", "folder path"]),
    ("inbox: [a]", ["inbox", "folder path"]),
    ('inbox: "in\\0box"', ["inbox", "folder path"]),
    ("quarantine: ~no_such_user_here/q", ["quarantine", "cannot expand", "~no_such_user_here"]),
    ("template: 5", ["template", "text"]),
    ("node_id: 7", ["node_id", "text"]),
    ("observer: inotify", ["observer", "'inotify'", "auto, native, polling"]),
    ("after_filing: remove", ["after_filing", "delete, move", "did you mean 'move'"]),
    ("log_format: xml", ["log_format", "text, json"]),
    ("log_level: TRACE", ["log_level", "DEBUG, INFO, WARNING, ERROR"]),
    ("settle_seconds: -1", ["settle_seconds", ">= 0", "-1"]),
    ("rescan_seconds: 0", ["rescan_seconds", "> 0"]),
    ("polling_interval_seconds: 0", ["polling_interval_seconds", "> 0"]),
    ("retry_initial_seconds: 0", ["retry_initial_seconds", "> 0"]),
    ("summary_seconds: -0.5", ["summary_seconds", "> 0"]),
    ("shutdown_timeout_seconds: -1", ["shutdown_timeout_seconds", ">= 0"]),
    ("empty_dir_grace_seconds: -1", ["empty_dir_grace_seconds", ">= 0"]),
    ("workers: -1", ["workers", ">= 0"]),
    ("worker_memory_mb: -5", ["worker_memory_mb", ">= 0"]),
    ("max_attempts: 0", ["max_attempts", ">= 1"]),
    ("max_pending: 0", ["max_pending", ">= 1"]),
    ("max_decoded_bytes: 0", ["max_decoded_bytes", "> 0"]),
    (
        "retry_initial_seconds: 10\nretry_max_seconds: 5",
        ["retry_max_seconds", "retry_initial_seconds", ">="],
    ),
    ("node_id: a/b", ["node_id", "only letters, digits"]),
    ("node_id: a b", ["node_id", "only letters, digits"]),
    ("node_id: ..", ["node_id", "'..'"]),
    ("node_id: .", ["node_id", "'.'"]),
    ("template: '{PatientNme}/x.dcm'", ["template", "PatientNme", "did you mean 'PatientName'"]),
    ("template: '{modality}.dcm'", ["template", "modality", "did you mean 'Modality'"]),
    ("template: '/abs/{PatientID}.dcm'", ["template", "relative"]),
    ("template: 'a//{PatientID}.dcm'", ["template", "empty path component"]),
    ("template: '{PatientID!r}.dcm'", ["template", "conversion"]),
    ("template: '{PatientID:>5}.dcm'", ["template", "format spec"]),
    ("template: '{PatientID'", ["template", "braces"]),
    ("inbox: data\narchive: data", ["inbox", "archive", "equal to or inside"]),
    ("inbox: store/new\narchive: store", ["inbox", "archive", "equal to or inside"]),
    ("inbox: q/new\nquarantine: q", ["inbox", "quarantine", "equal to or inside"]),
    ("archive: inbox/sorted", ["archive", "inside the inbox"]),
    ("quarantine: inbox/bad", ["quarantine", "inside the inbox"]),
    ("after_filing: move\nprocessed: inbox/done", ["processed", "inside the inbox"]),
    ("after_filing: move\nprocessed: inbox", ["processed", "equal to or inside"]),
    ("archive: same\nquarantine: same", ["archive", "quarantine", "different"]),
    ("archive: same\nquarantine: ./same/", ["archive", "quarantine", "different"]),
]


@pytest.mark.parametrize(("text", "expected"), ERRORS, ids=[e[0][:40] for e in ERRORS])
def test_errors_name_the_key_and_hint(cwd: Path, text: str, expected: list[str]) -> None:
    path = write(cwd / "bad.yaml", f"# a comment\n{text}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message
    for part in expected:
        assert part in message
    assert list(cwd.iterdir()) == [path]  # nothing was created


def test_processed_inside_inbox_is_fine_when_originals_are_deleted(cwd: Path) -> None:
    cfg = config_from_mapping({"after_filing": "delete", "processed": "inbox/done"})
    assert cfg.processed == cwd / "inbox" / "done"


def test_archive_reaching_the_inbox_through_a_symlink(cwd: Path) -> None:
    (cwd / "inbox" / "sorted").mkdir(parents=True)
    (cwd / "archive-link").symlink_to(cwd / "inbox" / "sorted", target_is_directory=True)
    with pytest.raises(ConfigError, match=r"archive .* is inside the inbox"):
        config_from_mapping({"archive": "archive-link"})
    (cwd / "alias").symlink_to(cwd / "inbox", target_is_directory=True)
    with pytest.raises(ConfigError, match=r"inbox .* is equal to or inside archive"):
        config_from_mapping({"archive": "alias"})
    (cwd / "q").mkdir()
    (cwd / "q-link").symlink_to(cwd / "q", target_is_directory=True)
    with pytest.raises(ConfigError, match="archive and quarantine must be different"):
        config_from_mapping({"archive": "q", "quarantine": "q-link"})


@pytest.mark.parametrize(
    "text",
    ["inbox: [a, b", "a: b: c", "key: 'unterminated", "\tinbox: x", "a:\n  - b\n c: d"],
)
def test_invalid_yaml(cwd: Path, text: str) -> None:
    path = write(cwd / "broken.yaml", text)
    with pytest.raises(ConfigError, match="not valid YAML") as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert "line" in str(info.value)  # the parser's position is kept for the reader
    assert "<unicode string>" not in str(info.value)


def test_invalid_yaml_names_the_file_and_line(cwd: Path) -> None:
    path = write(cwd / "broken.yaml", "# folders\ninbox: in\narchive: [a, b\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: line 4, column 1: not valid YAML: ")
    assert "flow sequence" in message and "line 3" in message  # where the list began


def test_unprintable_character_names_the_file(cwd: Path) -> None:
    path = write(cwd / "bell.yaml", "inbox: in\nnode_id: a\x07b\n")
    with pytest.raises(ConfigError, match="not valid YAML") as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert "<unicode string>" not in str(info.value)
    assert "line 2" in str(info.value)


def test_duplicate_keys_are_refused_with_both_lines(cwd: Path) -> None:
    path = write(cwd / "dup.yaml", "inbox: in\narchive: a\n\ninbox: other\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        f"{path}: line 4: duplicate key 'inbox' (first on line 1; each key may appear once)"
    )


def test_duplicate_keys_inside_a_value_are_refused(cwd: Path) -> None:
    path = write(cwd / "dup.yaml", "ignore: {a: 1, a: 2}\n")
    with pytest.raises(ConfigError, match=r"line 1: duplicate key 'a'"):
        load_config(path)


def test_every_problem_is_reported_each_on_its_own_line(cwd: Path) -> None:
    path = write(
        cwd / "many.yaml",
        "setle_seconds: 3\nworkers: two\nlog_format: xml\ninbox: x\ninbox: y\n",
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    lines = str(info.value).splitlines()
    assert len(lines) == 4, lines
    assert all(line.startswith(f"{path}: ") for line in lines)
    assert "line 5: duplicate key 'inbox'" in lines[0]
    assert "did you mean 'settle_seconds'" in lines[1]
    assert "workers: expected a whole number" in lines[2]
    assert "log_format" in lines[3]


def test_relations_of_a_refused_value_are_not_checked(cwd: Path) -> None:
    """A bad value is not replaced by its default for the checks between keys."""
    path = write(cwd / "r.yaml", "retry_initial_seconds: soon\nretry_max_seconds: 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        f"{path}: retry_initial_seconds: expected a number of seconds, got 'soon'"
    )


def test_every_relation_problem_is_reported(cwd: Path) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_mapping(
            {
                "archive": "inbox/a",
                "quarantine": "inbox/q",
                "retry_initial_seconds": 10,
                "retry_max_seconds": 5,
                "node_id": "..",
            },
            source="c",
        )
    lines = str(info.value).splitlines()
    assert len(lines) == 4, lines
    assert any("archive" in line and "inside the inbox" in line for line in lines)
    assert any("quarantine" in line and "inside the inbox" in line for line in lines)
    assert any("retry_max_seconds" in line for line in lines)
    assert any("node_id" in line for line in lines)


@pytest.mark.parametrize("text", ["- inbox: x\n- archive: y\n", "just text\n", "42\n"])
def test_top_level_must_be_a_mapping(cwd: Path, text: str) -> None:
    path = write(cwd / "list.yaml", text)
    with pytest.raises(ConfigError, match="top level must be a mapping") as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_mapping_required_from_code_too() -> None:
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        config_from_mapping(["inbox", "x"], source="api")  # type: ignore[arg-type]


def test_missing_file(cwd: Path) -> None:
    path = cwd / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "cannot read config file" in str(info.value)
    assert str(path) in str(info.value)
    assert "No such file" in str(info.value)


def test_folder_instead_of_file(cwd: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file") as info:
        load_config(cwd)
    assert "directory" in str(info.value)


@pytest.mark.skipif(IS_ROOT, reason="root can read a file whatever its mode")
def test_unreadable_file(cwd: Path) -> None:
    path = write(cwd / "secret.yaml", "workers: 2\n")
    path.chmod(0)
    with pytest.raises(ConfigError, match=r"cannot read config file .*ermission denied"):
        load_config(path)


def test_file_that_is_not_utf8(cwd: Path) -> None:
    path = cwd / "latin1.yaml"
    path.write_bytes("node_id: M\u00fcller\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8") as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_validate_with_an_explicit_keyword_check(cwd: Path) -> None:
    def only_foo(name: str) -> bool:
        return name == "Foo"

    cfg = validate(Config(template="{Foo}/x.dcm"), is_keyword=only_foo)
    assert cfg.template == "{Foo}/x.dcm"
    assert cfg.inbox == cwd / "inbox"
    with pytest.raises(ConfigError, match=r"api: template: .*'Bar'"):
        validate(Config(template="{Foo}/{Bar}.dcm"), source="api", is_keyword=only_foo)


# ----- prepare_folders -----------------------------------------------------------------


def test_prepare_folders_creates_what_is_missing(cwd: Path) -> None:
    cfg = config_from_mapping(
        {"inbox": "a/in", "archive": "b/c/arch", "quarantine": "q", "create_folders": True}
    )
    prepare_folders(cfg)
    for folder in (cfg.inbox, cfg.archive, cfg.quarantine):
        assert folder.is_dir()
    assert not cfg.processed.exists()  # originals are deleted: no processed folder
    prepare_folders(cfg)  # existing folders are fine


def test_prepare_folders_processed_only_when_moving(cwd: Path) -> None:
    cfg = config_from_mapping({"after_filing": "move"})
    prepare_folders(cfg, include_inbox=False)
    assert cfg.processed.is_dir()
    assert cfg.archive.is_dir()
    assert cfg.quarantine.is_dir()
    assert not cfg.inbox.exists()


def test_prepare_folders_without_create(cwd: Path) -> None:
    """check-config before the first run: missing folders that can be created are fine."""
    cfg = replace(load_config(None), create_folders=True)  # the quick start
    prepare_folders(cfg, create=False)
    assert list(cwd.iterdir()) == []


def test_prepare_folders_without_create_refuses_uncreatable(cwd: Path) -> None:
    (cwd / "plain.txt").write_text("not a folder")
    cfg = config_from_mapping({"archive": "plain.txt/archive"})
    with pytest.raises(ConfigError, match=r"archive: .* cannot be created"):
        prepare_folders(cfg, create=False)
    assert sorted(p.name for p in cwd.iterdir()) == ["plain.txt"]


def test_prepare_folders_under_a_regular_file(cwd: Path) -> None:
    (cwd / "plain.txt").write_text("not a folder")
    cfg = config_from_mapping({"archive": "plain.txt/archive", "create_folders": True})
    with pytest.raises(ConfigError, match=r"archive: cannot create .*plain.txt/archive"):
        prepare_folders(cfg)
    assert (cwd / "plain.txt").read_text() == "not a folder"


def test_prepare_folders_path_is_a_file(cwd: Path) -> None:
    (cwd / "quarantine").write_text("a file")
    with pytest.raises(ConfigError, match="quarantine: cannot create"):
        prepare_folders(load_config(None))


@pytest.mark.skipif(IS_ROOT, reason="root may write into any folder whatever its mode")
def test_prepare_folders_not_writable(cwd: Path) -> None:
    (cwd / "archive").mkdir(mode=0o555)
    try:
        with pytest.raises(ConfigError, match=r"archive: .* is not writable"):
            prepare_folders(load_config(None))
    finally:
        (cwd / "archive").chmod(0o755)


# ----- render_yaml ---------------------------------------------------------------------


def round_trip(cfg: Config) -> Config:
    return config_from_mapping(yaml.safe_load(render_yaml(cfg)), source="rendered")


def test_render_yaml_round_trips_defaults(cwd: Path) -> None:
    cfg = load_config(None)
    text = render_yaml(cfg)
    assert text.startswith("inbox: ")  # in the order of the settings
    assert round_trip(cfg) == replace(cfg, node_id=cfg.effective_node_id)


def test_render_yaml_round_trips_every_key(cwd: Path) -> None:
    cfg = config_from_mapping(non_default_values(cwd))
    assert round_trip(cfg) == cfg


def test_render_yaml_quotes_what_yaml_would_misread(cwd: Path) -> None:
    tricky = ["yes", "no", "~", "null", "#x", "a: b", "0x10", "1e3", "- x", "*", "@x", "'q'"]
    cfg = config_from_mapping(
        {
            "inbox": "yes",
            "archive": "arch #1: new",
            "quarantine": "q~",
            "ignore": tricky,
            "node_id": "0.10",
        }
    )
    back = round_trip(cfg)
    assert back == cfg
    assert back.ignore == tuple(tricky)
    assert back.node_id == "0.10"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ignore=st.lists(st.text(min_size=1, max_size=12), max_size=4),
    settle=st.floats(min_value=0, max_value=1e9, allow_nan=False),
    node=st.text(alphabet="abcXYZ019-_.", min_size=1, max_size=10),
)
def test_render_yaml_round_trips_any_values(ignore: list[str], settle: float, node: str) -> None:
    if node in (".", ".."):
        node = "n" + node
    cfg = config_from_mapping(
        {"ignore": ignore, "settle_seconds": settle, "node_id": node, "inbox": "/srv/in"}
    )
    back = round_trip(cfg)
    assert back == cfg
    assert math.copysign(1, back.settle_seconds) == math.copysign(1, settle)


def test_render_yaml_keeps_unicode_readable_and_exact(cwd: Path) -> None:
    plain = config_from_mapping({"archive": "Müller/日本", "node_id": "n1"})
    assert "Müller/日本" in render_yaml(plain)
    assert round_trip(plain) == plain
    tricky = config_from_mapping({"archive": "Müller/日本", "ignore": ["a\x85b", "ü*"]})
    assert round_trip(tricky) == replace(tricky, node_id=tricky.effective_node_id)


# ----- create_folders ------------------------------------------------------------------


def test_a_config_file_does_not_create_folders_by_default(cwd: Path) -> None:
    assert load_config(write(cwd / "c.yaml", "workers: 1\n")).create_folders is False
    assert load_config(None).create_folders is False  # sort's built-in set-up too


def test_missing_inbox_is_refused_naming_the_key(cwd: Path) -> None:
    cfg = config_from_mapping({"inbox": "share/inbox"})
    with pytest.raises(ConfigError) as info:
        prepare_folders(cfg)
    assert str(info.value).startswith(f"inbox: {cwd / 'share' / 'inbox'} does not exist")
    assert "create_folders: true" in str(info.value)
    assert list(cwd.iterdir()) == [], "nothing is created when the inbox is refused"


def test_outputs_are_made_where_their_parent_exists(
    cwd: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (cwd / "inbox").mkdir()
    cfg = config_from_mapping({})
    with caplog.at_level(logging.INFO, logger="dicomwatch"):
        prepare_folders(cfg)
    assert cfg.archive.is_dir() and cfg.quarantine.is_dir()
    made = [r for r in caplog.records if "created" in r.getMessage()]
    assert [r.levelno for r in made] == [logging.INFO, logging.INFO]
    assert f"created the archive folder {cfg.archive}" in made[0].getMessage()


def test_outputs_without_their_parent_are_refused(cwd: Path) -> None:
    (cwd / "inbox").mkdir()
    cfg = config_from_mapping({"archive": "nas/pacs/archive", "quarantine": "nas/pacs/q"})
    with pytest.raises(ConfigError) as info:
        prepare_folders(cfg)
    lines = str(info.value).splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith(f"archive: {cwd / 'nas/pacs/archive'} does not exist, nor")
    assert all("create_folders: true" in line for line in lines)
    assert sorted(p.name for p in cwd.iterdir()) == ["inbox"]


def test_create_folders_makes_every_missing_folder_and_says_so(
    cwd: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = config_from_mapping({"create_folders": True, "inbox": "a/b/in", "archive": "c/d/arch"})
    with caplog.at_level(logging.INFO, logger="dicomwatch"):
        prepare_folders(cfg)
    assert cfg.inbox.is_dir() and cfg.archive.is_dir() and cfg.quarantine.is_dir()
    made = [r.getMessage() for r in caplog.records if "created" in r.getMessage()]
    assert len(made) == 3, made
    assert f"created the inbox folder {cfg.inbox}" in made[0]


def test_check_mode_refuses_what_run_would_refuse(cwd: Path) -> None:
    cfg = config_from_mapping({})
    with pytest.raises(ConfigError, match=r"inbox: .* does not exist"):
        prepare_folders(cfg, create=False)
    (cwd / "inbox").mkdir()
    prepare_folders(cfg, create=False)  # archive and quarantine can be made: fine
    assert sorted(p.name for p in cwd.iterdir()) == ["inbox"]


def test_check_config_never_prints_the_index_password(tmp_path: Path) -> None:
    from dicomwatch.config import config_from_mapping, render_yaml

    cfg = config_from_mapping(
        {"index": "postgresql://dw:s3cret@db.example:5432/dicomwatch", "inbox": str(tmp_path)}
    )
    text = render_yaml(cfg)
    assert "s3cret" not in text
    assert "postgresql://dw:***@db.example:5432/dicomwatch" in text
    assert cfg.index.endswith("s3cret@db.example:5432/dicomwatch")  # the daemon keeps it
