"""The shipped systemd files: the unit verifies, and it agrees with the config.

Policy: systemd's own tools judge the files (``systemd-analyze verify``,
``systemd-sysusers --dry-run``) when they are installed, else those tests
skip; no running systemd is needed. ``verify`` insists that ExecStart's binary
exists, so it checks a copy whose ExecStart points at an existing executable;
everything else is the file as shipped. The cross-checks (drain grace vs.
TimeoutStopSec, paths vs. the directories the unit creates) are plain parsing.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from aivad.config import load_config

SYSTEMD = Path(__file__).resolve().parent.parent / "systemd"
UNIT = SYSTEMD / "aivad.service"


def directives(path: Path) -> dict[str, list[str]]:
    """``Key=value`` lines of a unit file, every value of a repeated key kept."""
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def seconds(value: str) -> float:
    units = {"": 1, "s": 1, "sec": 1, "min": 60, "ms": 0.001}
    number = value.rstrip("abcdefghijklmnopqrstuvwxyz")
    return float(number) * units[value[len(number) :]]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    text = UNIT.read_text()
    [exec_start] = directives(UNIT)["ExecStart"]
    binary = exec_start.split()[0]
    stand_in = shutil.which("true")
    assert stand_in is not None
    copy = tmp_path / UNIT.name
    copy.write_text(text.replace(f"ExecStart={binary}", f"ExecStart={stand_in}"))
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(copy)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "aivad.service" not in result.stderr, result.stderr


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="systemd-sysusers not installed")
def test_sysusers_creates_the_unit_user(tmp_path: Path) -> None:
    result = subprocess.run(
        ["systemd-sysusers", "--dry-run", f"--root={tmp_path}", str(SYSTEMD / "aivad.sysusers")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "Creating user 'aivad'" in result.stdout + result.stderr


def test_unit_contract() -> None:
    unit = directives(UNIT)
    for key, value in {
        "Type": "notify",  # systemd 252 (Debian 12): no notify-reload
        "NotifyAccess": "main",
        "WatchdogSec": "30",
        "KillSignal": "SIGTERM",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "User": "aivad",
        "RuntimeDirectory": "aivad",
        "StateDirectory": "aivad",
        "ConfigurationDirectory": "aivad",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
    }.items():
        assert unit.get(key) == [value], key
    assert "@system-service" in unit["SystemCallFilter"]
    assert unit["ExecStart"][0].endswith("aivad serve --config /etc/aivad/config.toml")


def test_production_config_fits_the_unit() -> None:
    cfg = load_config(SYSTEMD / "config.toml")
    unit = directives(UNIT)
    assert cfg.control.socket.startswith("/run/aivad/")  # RuntimeDirectory
    assert cfg.control.mode == 0o660
    assert cfg.control.group == "aivad"
    assert cfg.store.path.startswith("/var/lib/aivad/")  # StateDirectory
    # A drain must finish before systemd gives up and sends SIGKILL.
    [stop] = unit["TimeoutStopSec"]
    assert seconds(stop) >= cfg.shutdown.grace_s + 10
