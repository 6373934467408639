"""Keep "Limits and overload" in docs/operations.md honest: every limit of the config is there, as it is.

Test policy for this module (as tests/test_docs.py): the page is parsed, never
eyeballed. The limit-like keys of aivad/config.py must all be named in the
section (adding a bound without documenting it fails here); every
``[section] key`` it names must exist, with the default its table shows; every
metric it names must be one the daemon serves, and every ``status.…`` field one
that ``aivad status`` (a real in-process daemon) answers with.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import attrs
import trio

from aivad.amqp import AmqpStatistics
from aivad.cluster import ClusterStatistics
from aivad.config import RedisConfig
from aivad.limits import GateStatistics
from aivad.redis_ingest import RedisIngest
from tests.conftest import control_async
from tests.test_docs import code_defaults

REPO = Path(__file__).resolve().parent.parent
SECTION = "## Limits and overload"

#: sections whose every key is a limit
LIMIT_SECTIONS = frozenset({"limits"})
#: elsewhere, a key named like this is a limit
LIMIT_PREFIXES = ("max_",)
LIMIT_SUFFIXES = ("_bytes", "_buffer", "_frames", "_rows", "_timeout_s", "_concurrency", "write_queue", "prefetch",
                  "alert_queue", "_max", "_lines", "_window", "_connections", "_burst", "_per_s")
#: where the metric families the daemon serves are declared
METRIC_SOURCES = ("aivad/metrics.py", "aivad/daemon.py")


def limits_section() -> str:
    text = (REPO / "docs" / "operations.md").read_text(encoding="utf-8")
    parts = text.split(f"\n{SECTION}\n", 1)
    assert len(parts) == 2, f"docs/operations.md needs a '{SECTION}' section"
    return parts[1].split("\n## ", 1)[0]


def is_limit(section: str, key: str) -> bool:
    return section in LIMIT_SECTIONS or key.startswith(LIMIT_PREFIXES) or key.endswith(LIMIT_SUFFIXES)


def served_metric_names() -> set[str]:
    """Names as exposed on /metrics: counters get ``_total``, a histogram its series."""
    names = set()
    for source in METRIC_SOURCES:
        code = (REPO / source).read_text(encoding="utf-8")
        for kind, name in re.findall(r'(Counter|Gauge|Histogram)MetricFamily\(\s*"(aivad_\w+)"', code):
            if kind == "Counter":
                names.add(f"{name}_total")
            elif kind == "Histogram":
                names |= {name, f"{name}_bucket", f"{name}_sum", f"{name}_count"}
            else:
                names.add(name)
        names |= {f"{name}_total" for name in re.findall(r'_by_label\(\s*"(aivad_\w+)"', code)}
    return names


def test_every_limit_key_is_in_the_section() -> None:
    text = limits_section()
    missing = [f"[{section}] {key}" for section, keys in code_defaults().items() for key in keys
               if is_limit(section, key) and f"`[{section}] {key}`" not in text]
    assert not missing, f"limits missing from '{SECTION}' in docs/operations.md: {', '.join(missing)}"


def test_the_rule_finds_the_limits_we_know() -> None:
    """The name rule above is what decides; a rename that slips past it should fail here."""
    known = {("websocket", "send_buffer_bytes"), ("websocket", "max_connections_per_address"),
             ("store", "write_queue"), ("store", "history_scan_rows"), ("store", "history_concurrency"),
             ("control", "max_line_bytes"), ("http", "max_body_bytes"), ("http", "read_timeout_s"),
             ("tasks", "max_queued"), ("amqp", "prefetch"), ("amqp", "outbox_max"), ("redis", "max_pending"),
             ("limits", "publish_burst"), ("auth", "auth_timeout_s")}
    keys = code_defaults()
    for section, key in known:
        assert key in keys[section] and is_limit(section, key), f"{section}.{key}"


def test_named_keys_exist_and_table_defaults_are_the_real_ones() -> None:
    text = limits_section()
    keys = code_defaults()
    for section, key in re.findall(r"`\[(\w+)\] (\w+)`", text):
        assert key in keys.get(section, {}), f"'{SECTION}' names [{section}] {key}, which aivad/config.py lacks"
    rows = re.findall(r"^\| `\[(\w+)\] (\w+)` \| `([^`]*)` \|", text, re.MULTILINE)
    assert len(rows) >= 40
    for section, key, literal in rows:
        value = tomllib.loads(f"v = {literal}")["v"]
        real = keys[section][key]
        assert value == real and type(value) is type(real), (
            f"[{section}] {key}: the table says {literal}, the real default is {real!r}")


def test_named_metrics_are_served() -> None:
    served = served_metric_names()
    named = set(re.findall(r"\baivad_[a-z_]+", limits_section()))
    assert len(named) >= 15
    assert not named - served, f"metrics named in '{SECTION}' that the daemon does not serve: {named - served}"


def status_fields_named() -> set[tuple[str, str]]:
    return set(re.findall(r"`status\.(\w+)\.(\w+)`", limits_section()))


async def test_named_status_fields_exist(daemon: Any) -> None:
    with trio.fail_after(20):
        status = (await control_async(daemon.control_path, {"cmd": "status"}))["status"]
    # sections of services this daemon does not run: their statistics snapshot is what status shows
    status["amqp"] = {f.name: None for f in attrs.fields(AmqpStatistics)}
    status["cluster"] = {**{f.name: None for f in attrs.fields(ClusterStatistics)}, "journal": None}
    status["http"] = {f.name: None for f in attrs.fields(GateStatistics)}
    status["redis_ingress"] = RedisIngest(RedisConfig(ingest_stream=""), None, None, "a").statistics()  # type: ignore[arg-type]
    named = status_fields_named()
    assert len(named) >= 15
    for section, name in sorted(named):
        assert name in status.get(section, {}), f"'{SECTION}' names status.{section}.{name}; status has no such field"


def test_every_alert_code_is_in_the_system_events_table() -> None:
    """A ``system.alert`` code raised anywhere in aivad/ is a row of operations.md's table, and back."""
    raised: set[str] = set()
    for path in (REPO / "aivad").rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        raised |= set(re.findall(r"""alert\(\s*"(?:info|warning|error)",\s*"(\w+)\"""", text))
        raised |= set(re.findall(r"""listener\(\s*"(?:info|warning|error)",\s*"(\w+)\"""", text))
    section = (REPO / "docs" / "operations.md").read_text(encoding="utf-8").split("## System events", 1)[1]
    table = set(re.findall(r"^\| `(\w+)` \|", section.split("\n## ", 1)[0], flags=re.MULTILINE))
    assert raised and raised == table, (raised - table, table - raised)
