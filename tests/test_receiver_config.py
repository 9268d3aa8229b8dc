"""The ``receiver:`` section: defaults, strict validation, and the allow-list rules."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from dicomwatch.config import config_from_mapping
from dicomwatch.errors import ConfigError
from dicomwatch.receiver_config import ReceiverConfig, load, receiver_from_mapping


def test_defaults_listen_on_loopback_only() -> None:
    rc = receiver_from_mapping(None)
    assert rc == ReceiverConfig()
    assert (rc.bind, rc.port, rc.ae_title, rc.max_associations) == (
        "127.0.0.1",
        11112,
        "DICOMWATCH",
        10,
    )
    assert rc.network_timeout_seconds == 30.0
    assert rc.peer_allowed("127.0.0.1") and rc.peer_allowed("::1")
    assert rc.peer_allowed("::ffff:127.0.0.1")
    assert not rc.peer_allowed("192.0.2.7")
    assert rc.calling_ae_allowed("ANYONE", "127.0.0.1")
    assert not rc.calling_ae_allowed("ANYONE", "192.0.2.7")


def test_allow_lists() -> None:
    rc = receiver_from_mapping(
        {"allowed_peers": ["192.0.2.0/24", "2001:db8::1"], "allowed_calling_ae_titles": ["CT1 "]}
    )
    assert rc.allowed_calling_ae_titles == ("CT1",)
    assert rc.peer_allowed("192.0.2.200") and rc.peer_allowed("2001:db8::1")
    assert not rc.peer_allowed("127.0.0.1"), "a list replaces the loopback default"
    assert not rc.peer_allowed("198.51.100.1") and not rc.peer_allowed("not-an-ip")
    assert rc.calling_ae_allowed("CT1", "192.0.2.9")
    assert not rc.calling_ae_allowed("CT2", "127.0.0.1")


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"prot": 104}, "unknown key 'prot' (did you mean 'port'?)"),
        ({"port": 0}, "port: must be between 1 and 65535"),
        ({"port": "104"}, "port: expected a whole number"),
        ({"bind": "localhost"}, "bind: 'localhost' is not an IP address"),
        ({"ae_title": "A" * 17}, "ae_title"),
        ({"ae_title": "   "}, "ae_title"),
        ({"ae_title": "BAD\\AE"}, "ae_title"),
        ({"allowed_peers": ["10.0.0.0/33"]}, "allowed_peers: '10.0.0.0/33'"),
        ({"allowed_peers": "10.0.0.1"}, "allowed_peers: expected a list"),
        ({"allowed_calling_ae_titles": ["X" * 20]}, "allowed_calling_ae_titles"),
        ({"max_associations": 0}, "max_associations: must be >= 1"),
        ({"max_pdu": 100}, "max_pdu"),
        ({"network_timeout_seconds": 0}, "network_timeout_seconds"),
        ({"network_timeout_seconds": True}, "network_timeout_seconds"),
        ({"tls_cert": "/etc/c.pem"}, "tls_cert and tls_key go together"),
        (
            {"tls_cert": "/c.pem", "tls_key": "/k.pem", "tls_require_client_cert": True},
            "needs tls_ca",
        ),
        ({"tls_ca": "/ca.pem"}, "only checked with TLS on"),
        ({"tls_cert": "c.pem", "tls_key": "k.pem"}, "must be an absolute path"),
        ({"tls_require_client_cert": "yes"}, "expected true or false"),
    ],
)
def test_mistakes_name_their_key(section: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        receiver_from_mapping(section, source="c.yaml")
    assert message in str(info.value)
    assert str(info.value).startswith("c.yaml: receiver")


def test_the_main_config_validates_the_section(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="receiver: unknown key 'portt'"):
        config_from_mapping({"receiver": {"portt": 1}})
    with pytest.raises(ConfigError, match="receiver: expected a mapping"):
        config_from_mapping({"receiver": [1, 2]})
    cfg = config_from_mapping({"receiver": {"port": 104}, "settle_seconds": 1.0})
    assert cfg.settle_seconds == 1.0


def test_load_reads_the_section(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "c.yaml"
    path.write_text("inbox: in\nreceiver:\n  port: 4242\n  ae_title: STORE\n")
    cfg, rc = load(path)
    assert cfg.inbox == tmp_path / "in"
    assert (rc.port, rc.ae_title) == (4242, "STORE")
    assert load(None)[1] == ReceiverConfig()


def test_check_config_refuses_a_bad_receiver_section(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(f"inbox: {tmp_path / 'in'}\nreceiver:\n  allowed_peers: [nonsense]\n")
    out = subprocess.run(
        [sys.executable, "-m", "dicomwatch", "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 78
    assert "allowed_peers: 'nonsense'" in out.stderr
    for command in ("run", "receive"):
        out = subprocess.run(
            [sys.executable, "-m", "dicomwatch", command, "--config", str(path)],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        assert out.returncode == 78, (command, out.stderr)


ROOT = Path(__file__).resolve().parent.parent


def test_documented_defaults_are_the_defaults() -> None:
    """The commented block in config.example.yaml and the README's block say the truth."""
    import yaml

    example = (ROOT / "config.example.yaml").read_text(encoding="utf-8")
    lines = example.split("# receiver:\n", 1)[1].splitlines()
    block = "\n".join(line[2:] for line in lines if line.startswith("#   "))
    assert receiver_from_mapping(yaml.safe_load(block)) == ReceiverConfig()
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("```yaml\nreceiver:\n", 1)[1].split("```", 1)[0]
    assert receiver_from_mapping(yaml.safe_load(section)) == ReceiverConfig()
