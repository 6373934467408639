"""Log formats: one event per line, text for people, JSON for machines.

Policy: configure_logging writes into a StringIO (or a real file, for the
journald detection), records are made through ordinary ``logging`` calls, and
every assertion is on the exact lines produced. The root logger's handlers and
level are restored after each test.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from aivad.logs import configure_logging, set_level

TS = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"


@pytest.fixture(autouse=True)
def restore_root() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)


def lines(out: io.StringIO) -> list[str]:
    text = out.getvalue()
    assert text.endswith("\n")
    return text[:-1].split("\n")


def test_text_line() -> None:
    out = io.StringIO()
    configure_logging("INFO", "text", stream=out, capture_warnings=False)
    logging.getLogger("aivad.store").info("committed %d rows", 100, extra={"last_seq": 4711, "path": "/var/lib/a b"})
    [line] = lines(out)
    assert re.fullmatch(TS + r' INFO aivad\.store: committed 100 rows last_seq=4711 path="/var/lib/a b"', line), line


def test_text_exception_stays_on_one_line() -> None:
    out = io.StringIO()
    configure_logging("INFO", "text", stream=out, capture_warnings=False)
    try:
        raise ValueError("bad\nvalue")
    except ValueError:
        logging.getLogger("aivad.x").exception("multi\nline message")
    [line] = lines(out)
    assert 'aivad.x: multi\\nline message exc="Traceback (most recent call last):\\n' in line
    assert "ValueError: bad\\nvalue" in line


def test_json_line() -> None:
    out = io.StringIO()
    configure_logging("DEBUG", "json", stream=out, capture_warnings=False)
    log = logging.getLogger("aivad.websocket")
    log.debug("closed %s", "peer", extra={"code": 4008, "level": "clash", "obj": object()})
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        log.error("boom")
    first, second = (json.loads(line) for line in lines(out))
    assert re.fullmatch(TS, first.pop("ts"))
    assert first.pop("obj").startswith("<object object")
    assert first == {
        "level": "DEBUG",
        "logger": "aivad.websocket",
        "msg": "closed peer",
        "code": 4008,
        "extra_level": "clash",
    }
    assert "exc" not in first
    assert second["level"] == "ERROR"
    assert second["msg"] == "boom"
    assert "exc" not in second  # log.error without exc_info: no traceback


def test_json_exception() -> None:
    out = io.StringIO()
    configure_logging("INFO", "json", stream=out, capture_warnings=False)
    try:
        raise KeyError("k")
    except KeyError:
        logging.getLogger("aivad").exception("failed")
    [event] = (json.loads(line) for line in lines(out))
    assert event["msg"] == "failed"
    assert event["exc"].startswith("Traceback (most recent call last):\n")
    assert event["exc"].endswith("KeyError: 'k'")


def test_level_and_set_level() -> None:
    out = io.StringIO()
    configure_logging("WARNING", "text", stream=out, capture_warnings=False)
    log = logging.getLogger("aivad.t")
    log.info("hidden")
    set_level("debug")
    log.debug("shown")
    set_level("ERROR")
    log.warning("hidden too")
    assert [line.split(" ", 1)[1] for line in lines(out)] == ["DEBUG aivad.t: shown"]
    with pytest.raises(ValueError, match="unknown log level"):
        set_level("LOUD")


def test_reconfigure_replaces_its_own_handler_only() -> None:
    other = logging.StreamHandler(io.StringIO())
    logging.getLogger().addHandler(other)
    first, second = io.StringIO(), io.StringIO()
    configure_logging("INFO", "text", stream=first, capture_warnings=False)
    configure_logging("INFO", "json", stream=second, capture_warnings=False)
    logging.getLogger("aivad").warning("once")
    assert first.getvalue() == ""
    assert json.loads(second.getvalue())["msg"] == "once"
    assert other in logging.getLogger().handlers


def test_bad_format_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown log format"):
        configure_logging("INFO", "xml", stream=io.StringIO())  # type: ignore[arg-type]


def test_journald_gets_syslog_priority_prefix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with (tmp_path / "journal").open("w+") as stream:
        st = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        configure_logging("INFO", "text", stream=stream, capture_warnings=False)
        logging.getLogger("aivad").warning("careful")
        logging.getLogger("aivad").error("broken")
        configure_logging("INFO", "json", stream=stream, capture_warnings=False)
        logging.getLogger("aivad").error("as json")
        stream.seek(0)
        got = stream.read().splitlines()
    assert got[0].startswith("<4>")
    assert got[0].endswith("WARNING aivad: careful")
    assert got[1].startswith("<3>")
    assert json.loads(got[2])["msg"] == "as json"  # JSON stays parseable


def test_no_prefix_when_stderr_is_not_the_journal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", "1:2")
    out = io.StringIO()
    configure_logging("INFO", "text", stream=out, capture_warnings=False)
    logging.getLogger("aivad").warning("plain")
    assert re.match(TS, out.getvalue())
