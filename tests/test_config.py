"""Configuration: the documented example, strict parsing, and `aivad serve`'s exit 2."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import attrs
import pytest

from aivad.config import Config, ConfigError, load_config, parse_config

REPO = Path(__file__).resolve().parent.parent


def _fields(node: type, prefix: str = "") -> list[str]:
    names = []
    for field in attrs.fields(node):
        if attrs.has(field.type if isinstance(field.type, type) else type(field.default)):
            names += _fields(type(getattr(node(), field.name)), f"{field.name}.")
        else:
            names.append(prefix + field.name)
    return names


def test_config_toml_is_the_defaults_and_documents_every_key() -> None:
    assert attrs.evolve(load_config(REPO / "config.toml"), control=Config().control) == Config()
    text = (REPO / "config.toml").read_text()
    sections = dict(re.findall(r"^\[(\w+)\]\n(.*?)(?=^\[|\Z)", text, re.S | re.M))
    for key in _fields(Config):
        section, name = key.split(".")
        assert re.search(rf"^#? ?{name} = .*# .+", sections[section], re.M), f"config.toml does not document {key}"


def test_no_config_is_the_embedded_defaults() -> None:
    cfg = load_config(None)
    assert (cfg.websocket.host, cfg.websocket.port) == ("127.0.0.1", 8765)
    assert cfg.store.path == "./var/aivad.db"
    assert cfg.control.socket.endswith("control.sock")
    assert not cfg.amqp.enabled and not cfg.redis.enabled


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"websocket": {"prot": 1}}, "websocket: extra fields found (prot)"),
        ({"websockets": {}}, "(top level): extra fields found (websockets)"),
        ({"websocket": {"port": "8765"}}, "websocket.port: expected int, got str"),
        ({"websocket": {"port": True}}, "websocket.port: expected int, got bool"),
        ({"websocket": {"port": 70000}}, "websocket.port: must be 0..65535"),
        ({"store": {"max_batch": 0}}, "store.max_batch: must be >= 1"),
        ({"store": {"wal_max_bytes": 1_048_575}}, "store.wal_max_bytes: must be >= 1048576"),
        ({"store": {"wal_max_bytes": "1GiB"}}, "store.wal_max_bytes: expected int, got str"),
        ({"store": {"lazy_write_delay_s": -0.01}}, "store.lazy_write_delay_s: must be 0..1"),
        ({"store": {"lazy_write_delay_s": 2}}, "store.lazy_write_delay_s: must be 0..1"),
        ({"shutdown": {"grace_s": -1}}, "shutdown.grace_s: must be > 0"),
        ({"log": {"level": "LOUD"}}, "log.level: must be one of 'DEBUG', 'INFO', 'WARNING', 'ERROR'"),
        ({"store": {"synchronous": "OFF"}}, "store.synchronous: must be one of 'NORMAL', 'FULL'"),
        ({"http": {"enabled": "yes"}}, "http.enabled: expected bool, got str"),
        ({"control": {"mode": 0o1777}}, "control.mode: must be a file mode"),
        ({"websocket": []}, "websocket"),
    ],
)
def test_bad_values_name_the_key(doc: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_config(doc)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def _serve(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "aivad", "serve", *args], capture_output=True, text=True,
                          timeout=30, cwd=cwd)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[websocket]\nport = 'x'\n", "websocket.port: expected int, got str"),
        ("[websocket\n", "not valid TOML"),
        ("[amqp]\nprefech = 5\n", "amqp: extra fields found (prefech)"),
        ("\xff\xfe", "cannot read"),
        ("a = " + "[" * 100_000, "not valid TOML: nested too deeply"),
    ],
)
def test_serve_exits_2_with_one_line(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_bytes(text.encode("latin-1"))
    result = _serve("--config", str(path), cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.stderr


def test_serve_missing_config_file_exits_2(tmp_path: Path) -> None:
    result = _serve("--config", str(tmp_path / "nope.toml"), cwd=tmp_path)
    assert result.returncode == 2 and "no such config file" in result.stderr


def test_bad_cli_usage_exits_2(tmp_path: Path) -> None:
    for args in (["serve", "--bogus"], ["frobnicate"], ["history"], ["tail", "x", "--since", "abc"]):
        result = subprocess.run([sys.executable, "-m", "aivad", *args], capture_output=True, text=True, timeout=30)
        assert result.returncode == 2, args


def test_check_config_validates_without_starting(tmp_path: Path) -> None:
    assert _serve("--config", str(REPO / "config.toml"), "--check-config", cwd=tmp_path).stdout == "config ok\n"
    bad = tmp_path / "bad.toml"
    bad.write_text("[store]\nmax_batch = 0\n")
    result = _serve("--config", str(bad), "--check-config", cwd=tmp_path)
    assert result.returncode == 2 and "store.max_batch: must be >= 1" in result.stderr
    assert not (tmp_path / "var").exists()  # nothing was started
