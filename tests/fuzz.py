"""The protocol fuzzer: a hypothesis state machine against a real ``aivad serve`` (issue 9, item 6).

It holds several raw WebSocket connections (:class:`tests.hostile.RawClient`:
they send exactly the bytes they are given) and, step by step, sends
generated, mutated and hostile frames for every op of DESIGN §4.3 (valid ones,
wrong types, missing and extra fields, huge numbers, NaN, deep nesting, every
id-like field at 255 characters and one over, binary frames, invalid UTF-8,
fragments, oversize frames, RFC 6455 violations), answers the tasks it is sent
as a worker, attacks the handshake (garbage, partial requests, slowloris), and
ends connections every way: closing handshake, reset (``SO_LINGER 0``) after
the upgrade or in the middle of a frame, half-close.

After every step it checks:

1. the daemon process is alive and a fresh client gets ``pong`` for ``ping``;
2. every frame that carried a ``ref`` got exactly one ``ok``/``error``/``pong``
   reply echoing it, and no reply echoes a ref that was not sent — except on a
   connection that we ended, or that the daemon closed with a documented code;
3. per subscription, message seqs strictly ascend (no seq twice), and no
   message arrives for a pattern the connection is not subscribed to;
4. every error code is one of DESIGN §4.3; the daemon closes a connection only
   with 4008 (slow consumer) or for the RFC 6455 violation we committed on it
   (1002/1007 or just a TCP close, 1009 for an oversize message).

Short run: ``tests/test_fuzz.py`` in the normal test command. Long run::

    .venv/bin/python -m tests.fuzz --frames 100000

prints a summary; docs/operations.md ("Fuzzing") has the last result.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import math
import os
import re
import select
import shutil
import signal
import socket
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import attrs
import jwt
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from tests.conftest import DaemonProcess, short_tmp_dir
from tests.hostile import (
    HOSTILE_LITERALS,
    HOSTILE_SCALARS,
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    HandshakeRefused,
    Raw,
    RawClient,
    encode_frame,
    handshake_request,
    hostile_value_strategy,
    id_string_strategy,
    read_http_head,
    render,
    reset,
    split_frames,
)

__all__ = ["FUZZ_CONFIG", "FuzzMachine", "Harness", "main", "run_fuzz"]

#: DESIGN §4.3, fixed
ERROR_CODES = frozenset(
    {"bad_json", "bad_request", "unknown_op", "too_large", "unauthorized", "forbidden", "not_found", "overloaded",
     "timeout", "internal"}
)
MAX_FRAME_BYTES = 65_536
#: the daemon under fuzz: small frames (oversize is cheap to send), short handshake and task
#: timeouts (abandoned handshakes and unanswered tasks end within a run), retention (replays stay short)
FUZZ_CONFIG: dict[str, dict[str, Any]] = {
    "websocket": {"max_frame_bytes": MAX_FRAME_BYTES, "handshake_timeout_s": 2.0, "close_timeout_s": 2.0},
    "store": {"retention_max_messages": 20_000, "retention_interval_s": 1.0},
    "tasks": {"request_timeout_s": 2.0, "default_timeout_s": 3.0, "default_backoff_factor_s": 0.05,
              "default_max_backoff_s": 0.2},
}
#: a reply that should come now (not a waiting op's) may take this long before it counts as a hang
REPLY_TIMEOUT_S = 20.0
#: a waiting op (request, collect) with a timeout of at most this much must have answered by timeout + grace
WAIT_BOUND_S = 5.0
WAIT_GRACE_S = 15.0
MAX_CONNECTIONS = 6
#: close codes the daemon may send unprovoked: 4008 slow consumer (DESIGN §4.3); 4001 too once the
#: connection sent a token (it may expire)
UNPROVOKED_CLOSES = frozenset({4008})
TOKEN_EXPIRED = 4001

TYPES = ("fz.a", "fz.b", "fz.c.d")
PATTERNS = ("#", "fz.#", "fz.*", "fz.a", "*.b", "fz.c.#", "#.d", "*.*.*", "fz.*.d")
OPS = ("subscribe", "unsubscribe", "publish", "history", "ping", "auth", "worker.hello", "worker.drain",
       "task.progress", "task.result", "task.fail", "dispatch", "task.status", "collect", "request")
WAITING_OPS = frozenset({"request", "collect"})


# ---- what to send ---------------------------------------------------------------------


@attrs.frozen
class Known:
    """Stands for a value the run has seen (a task id, a group id, a seq), picked when sending."""

    kind: str


@attrs.frozen
class Message:
    """One client message: a JSON object (rendered, a ref attached) or raw bytes, maybe fragmented."""

    obj: dict[str, Any] | None = None
    raw: bytes | None = None
    binary: bool = False
    ref: Any = "unique"  # "unique", "none", or a scalar to use as is (not unique: counted)
    cuts: tuple[int, ...] = ()
    ping_between: bool = False


@attrs.frozen
class Violation:
    """Bytes that break RFC 6455 (or the frame limit): the daemon must end this connection."""

    kind: str


small_json = st.recursive(
    st.none() | st.booleans() | st.integers(-1000, 1000) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=10,
)
payloads = st.one_of(
    small_json,
    small_json,
    st.sampled_from(HOSTILE_SCALARS),
    st.sampled_from(HOSTILE_LITERALS),
    st.integers(0, MAX_FRAME_BYTES).map(lambda n: "p" * n),  # up to the frame limit, often over it
)
topics = st.one_of(st.sampled_from(TYPES), st.sampled_from(TYPES), id_string_strategy("t"))
patterns = st.one_of(
    st.sampled_from(PATTERNS),
    st.sampled_from(PATTERNS),
    id_string_strategy("p"),
    st.sampled_from(["#." * 127 + "#", "*." * 127 + "*", "#." * 127 + "#.", "a." * 128]),
)
seqs = st.one_of(st.integers(0, 5), st.just(Known("seq")), st.just(Known("seq")))
task_ids = st.one_of(st.just(Known("task_id")), st.just(Known("task_id")), id_string_strategy("k", dots=False))
group_ids = st.one_of(
    st.sampled_from(["g1", "g2"]), st.just(Known("group_id")), id_string_strategy("g", dots=False),
    st.integers(200, 256).map(lambda n: "g" * n),
)
names = id_string_strategy("n", dots=False)
short_timeouts = st.one_of(st.floats(0.0, 1.0), st.integers(0, 1))
@attrs.frozen
class Token:
    """A JWT signed with the fuzzed daemon's secret, made when sending (DESIGN §4.8)."""

    sub: str
    rights: str  # a key of TOKEN_RIGHTS
    expires_in_s: float
    audience: str = "aivad"


TOKEN_RIGHTS: dict[str, dict[str, Any] | None] = {
    "admin": {"admin": True},
    "narrow": {"subscribe": ["fz.a", "fz.c.#"], "publish": ["fz.#"], "dispatch": ["fz.a"], "work": ["fz.b"]},
    "nothing": {},
    "no-claim": None,
}
tokens = st.one_of(
    st.builds(Token, st.sampled_from(["fz-user", "fz-other"]), st.sampled_from(sorted(TOKEN_RIGHTS)),
              st.sampled_from([3600.0, 2.0, -60.0]), st.sampled_from(["aivad", "aivad", "someone-else"])),
    st.text(max_size=20),
    st.sampled_from([
        "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4IiwiZXhwIjo5OTk5OTk5OTk5fQ.",  # alg none
        "a.b.c", "..", "x" * 10_000,
    ]),
)


def _op(op: str, required: dict[str, Any], optional: dict[str, Any] | None = None) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({"op": st.just(op), **required}, optional=optional or {})


VALID = {
    "subscribe": _op("subscribe", {"pattern": patterns}, {"since": seqs, "epoch": st.text(max_size=8)}),
    "unsubscribe": _op("unsubscribe", {"pattern": patterns}),
    "publish": _op(
        "publish",
        {"type": topics, "payload": payloads},
        {"metadata": st.dictionaries(st.text(max_size=8), small_json, max_size=3),
         "message_id": st.one_of(st.sampled_from(["m1", "m2"]), id_string_strategy("m", dots=False)),
         "timestamp": st.sampled_from(["2026-01-01T00:00:00Z", "0001-01-01T00:00:00+00:00", "9999-12-31T23:59:59Z",
                                       "2026-01-01T00:00:00", "nope"])},
    ),
    "history": _op("history", {"pattern": patterns}, {"after": seqs, "limit": st.integers(1, 1000)}),
    "ping": _op("ping", {}),
    "auth": _op("auth", {"token": tokens}),
    "worker.hello": _op(
        "worker.hello",
        {"types": st.lists(st.sampled_from(TYPES), min_size=1, max_size=3)},
        {"concurrency": st.integers(1, 4), "name": names},
    ),
    "worker.drain": _op("worker.drain", {}),
    "task.progress": _op("task.progress", {"task_id": task_ids, "progress": st.floats(0, 1)},
                         {"note": st.text(max_size=10)}),
    "task.result": _op("task.result", {"task_id": task_ids, "result": small_json}),
    "task.fail": _op("task.fail", {"task_id": task_ids, "error": small_json}, {"retryable": st.booleans()}),
    "dispatch": _op(
        "dispatch",
        {"type": topics, "payload": small_json},
        {"priority": st.sampled_from(["low", "normal", "high", "critical", 0, 9]),
         "retry_policy": st.fixed_dictionaries({}, optional={"max_attempts": st.integers(1, 3),
                                                             "backoff_factor": st.floats(0, 0.1),
                                                             "max_backoff": st.floats(0, 0.2)}),
         "timeout": st.floats(0.05, 2.0), "heartbeat": st.floats(0.05, 2.0),
         "affinity_key": id_string_strategy("f", dots=False), "group_id": group_ids},
    ),
    "task.status": _op("task.status", {"task_id": task_ids}),
    "collect": st.one_of(
        _op("collect", {"task_ids": st.lists(task_ids, max_size=4)},
            {"timeout": short_timeouts, "min_results": st.integers(1, 3)}),
        _op("collect", {"group_id": group_ids}, {"timeout": short_timeouts, "min_results": st.integers(1, 3)}),
    ),
    "request": _op("request", {"type": st.sampled_from(TYPES), "payload": small_json},
                   {"timeout": st.floats(0.05, 1.0), "group_id": group_ids}),
}
EXTRA_KEYS = ("seq", "x", "ref2", "payload", "type", "pattern", "task_id", "group_id", "timeout", "since", "")


@st.composite
def mutated(draw: st.DrawFn) -> dict[str, Any]:
    """A valid frame with 1–3 mutations: a field dropped, a field (or an extra one) set to a hostile value,
    or the op replaced."""
    frame = dict(draw(st.sampled_from(OPS).flatmap(lambda op: VALID[op])))
    for _ in range(draw(st.integers(1, 3))):
        action = draw(st.sampled_from(["drop", "set", "set", "extra", "op"]))
        keys = sorted(frame)
        if action == "drop" and keys:
            del frame[draw(st.sampled_from(keys))]
        elif action == "set" and keys:
            frame[draw(st.sampled_from(keys))] = draw(hostile_value_strategy())
        elif action == "extra":
            frame[draw(st.sampled_from(EXTRA_KEYS))] = draw(hostile_value_strategy())
        else:
            frame["op"] = draw(st.one_of(st.sampled_from([*OPS, "", "PING", "ping ", "message", "ok", "task"]),
                                         hostile_value_strategy()))
    return frame


RAW_TEXTS = (
    b"", b"not json", b"[1,2]", b'"a string"', b"null", b"NaN", b"Infinity", b"1e999", b"-0", b"{}",
    b'{"op":"ping","ref":1,"ref":2}', b'{"op":"ping","ref":3} trailing', b'\xef\xbb\xbf{"op":"ping","ref":4}',
    b'{"op":"ping","ref":1e999}', b'{"op":"ping","ref":NaN}', b'{"op":"ping","ref":-0}', b'{"op":"ping","ref":-0.0}',
    b'{"op":"ping","ref":"\\ud800"}', b'{"op":"ping","ref":123456789012345678901234567890}',
    b'{"op":"ping","ref":"' + b"r" * 10_000 + b'"}', b"{" * 10_000, b"[" * 10_000 + b"]" * 10_000,
    b'{"op":"ping","ref":5,"x":' + b"[" * 10_000 + b"]" * 10_000 + b"}",
    b'{"op":"publish","type":"fz.a","payload":' + b'{"a":' * 5_000 + b"1" + b"}" * 5_000 + b',"ref":6}',
    b'{"op":"ping","ref":7,"\\u0000":"\\u0000"}', b'{"op":"\\u0070ing","ref":8}', b"\x00", b"\xc0\x80",
    b"\xed\xa0\x80", b'{"op":"ping","ref":9}\n{"op":"ping","ref":10}',
)
refs = st.one_of(
    st.just("unique"), st.just("unique"), st.just("unique"), st.just("unique"), st.just("none"),
    st.sampled_from([True, False, 0, -0.0, 1e308, 2**80, float("nan"), float("inf"), "", "é", "x" * 1000,
                     "\ud800", Raw("1e999"), Raw("-0"), Raw("123456789012345678901234567890")]),
)
VIOLATIONS = (
    "rsv", "unmasked", "opcode-3", "opcode-b", "ping-fragmented", "ping-126", "orphan-continuation",
    "text-in-fragmented", "close-code-999", "close-code-1005", "close-one-byte", "close-reason-not-utf8",
    "text-not-utf8", "fragments-not-utf8", "length-msb", "oversize", "oversize-fragmented",
)


@st.composite
def messages(draw: st.DrawFn) -> Message | Violation:
    kind = draw(st.sampled_from(["valid"] * 6 + ["mutated"] * 4 + ["raw", "binary", "fragmented", "violation"]))
    if kind == "violation":
        return Violation(draw(st.sampled_from(VIOLATIONS)))
    if kind == "raw":
        return Message(raw=draw(st.one_of(st.sampled_from(RAW_TEXTS), st.binary(max_size=40))), ref="none")
    if kind == "binary":
        return Message(raw=draw(st.one_of(st.binary(max_size=40), st.sampled_from(RAW_TEXTS))), binary=True,
                       ref="none")
    obj = draw(st.sampled_from(OPS).flatmap(lambda op: VALID[op]) if kind != "mutated" else mutated())
    ref = draw(refs)
    if kind == "fragmented":
        cuts = tuple(draw(st.lists(st.integers(1, 200), min_size=1, max_size=4)))
        return Message(obj=obj, ref=ref, cuts=cuts, ping_between=draw(st.booleans()))
    return Message(obj=obj, ref=ref)


def violation_bytes(kind: str) -> tuple[bytes, frozenset[int]]:
    """The bytes of a violation, and the close codes that answer it (RFC 6455 §7.4.1)."""
    ping = b'{"op":"ping","ref":"violation"}'
    protocol = frozenset({1002})
    cases: dict[str, tuple[bytes, frozenset[int]]] = {
        "rsv": (encode_frame(OP_TEXT, ping, rsv=4), protocol),
        "unmasked": (encode_frame(OP_TEXT, ping, mask=False), protocol),
        "opcode-3": (encode_frame(0x3, ping), protocol),
        "opcode-b": (encode_frame(0xB, b"x"), protocol),
        "ping-fragmented": (encode_frame(OP_PING, b"x", fin=False), protocol),
        "ping-126": (encode_frame(OP_PING, b"x" * 126), protocol),
        "orphan-continuation": (encode_frame(OP_CONTINUATION, ping), protocol),
        "text-in-fragmented": (encode_frame(OP_TEXT, ping[:5], fin=False) + encode_frame(OP_TEXT, ping), protocol),
        "close-code-999": (encode_frame(OP_CLOSE, struct.pack("!H", 999)), protocol),
        "close-code-1005": (encode_frame(OP_CLOSE, struct.pack("!H", 1005)), protocol),
        "close-one-byte": (encode_frame(OP_CLOSE, b"\x03"), protocol),
        "close-reason-not-utf8": (encode_frame(OP_CLOSE, struct.pack("!H", 1000) + b"\xff"), frozenset({1002, 1007})),
        "text-not-utf8": (encode_frame(OP_TEXT, b'{"op":"ping","ref":"\xff"}'), frozenset({1007})),
        "fragments-not-utf8": (
            encode_frame(OP_TEXT, b'{"op":"ping","ref":"\xe2\x82', fin=False) + encode_frame(OP_CONTINUATION, b'("}'),
            frozenset({1007}),
        ),
        "length-msb": (encode_frame(OP_TEXT, b"x", length=2**63 + 1)[:10], frozenset({1002, 1009})),
        "oversize": (encode_frame(OP_TEXT, b"o" * (MAX_FRAME_BYTES + 1)), frozenset({1009})),
        "oversize-fragmented": (
            encode_frame(OP_TEXT, b"o" * (MAX_FRAME_BYTES // 2), fin=False)
            + encode_frame(OP_CONTINUATION, b"o" * (MAX_FRAME_BYTES // 2 + 1)),
            frozenset({1009}),
        ),
    }
    return cases[kind]


HANDSHAKE_ATTACKS = (
    "garbage", "partial-request-reset", "upgrade-then-reset", "upgrade-101-then-reset",
    "upgrade-half-frame-reset", "plain-get", "bad-version", "no-key", "huge-header", "many-headers",
    "slowloris", "http-1.0", "two-upgrades", "post-with-body", "tls-hello", "half-close-after-upgrade",
)

# ---- bookkeeping ----------------------------------------------------------------------


def ref_key(ref: Any) -> str:
    """Refs compared as their JSON text (NaN included: it is echoed as NaN)."""
    return json.dumps(ref, sort_keys=True)


def _not_json(constant: str) -> Any:
    raise ValueError(constant)


def _finite(number: str) -> float:
    if math.isinf(value := float(number)):
        raise ValueError(number)
    return value


def decode_as_the_daemon(text: bytes) -> Any:
    """RFC 8259 JSON: ``NaN``, ``Infinity`` and ``1e999`` are refused (ValueError), as the daemon refuses them."""
    return json.loads(text.decode("utf-8"), parse_constant=_not_json, parse_float=_finite)


def expected_ref(text: bytes) -> Any:
    """The ref the daemon must echo for this text frame, decoded as the daemon decodes it; None: no ref."""
    try:
        request = decode_as_the_daemon(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(request, dict):
        return None
    ref = request.get("ref")
    if isinstance(ref, str) and ref.encode("utf-8", "surrogatepass").decode("utf-8", "ignore") != ref:
        return None  # a lone surrogate cannot be written back: the error is answered with ref null
    return None if isinstance(ref, (dict, list)) else ref


def waiting_due(text: bytes, now: float) -> float | None:
    """For a ``request``/``collect``: when its reply is due (None: its timeout is too long to wait for)."""
    try:
        request = decode_as_the_daemon(text)
    except (ValueError, RecursionError):
        return now
    timeout = request.get("timeout", FUZZ_CONFIG["tasks"]["request_timeout_s"]) if isinstance(request, dict) else 0
    if timeout is None:
        timeout = FUZZ_CONFIG["tasks"]["request_timeout_s"]
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or math.isnan(timeout):
        return now  # refused at once
    if timeout > WAIT_BOUND_S:
        return None
    return now + max(timeout, 0) + WAIT_GRACE_S


class Violated(AssertionError):
    """An invariant of DESIGN §3/§4.3 does not hold."""


class Conn:
    """One machine connection and what it is owed."""

    def __init__(self, name: str, client: RawClient) -> None:
        self.name = name
        self.client = client
        self.sent: collections.Counter[str] = collections.Counter()
        self.replied: collections.Counter[str] = collections.Counter()
        #: refs of waiting ops → when their reply is due (None: unbounded)
        self.waiting: dict[str, float | None] = {}
        #: active subscriptions: pattern → the last seq delivered on it (0: none yet)
        self.subscriptions: dict[str, int] = {}
        self.tasks: list[str] = []
        self.doomed: frozenset[int] | None = None  # close codes that may answer a violation we sent
        self.ended = False  # by us: nothing more is owed
        self.sent_token = False
        self.texts: dict[str, bytes] = {}  # the last frame sent with each ref, for reports
        self.last_activity = time.monotonic()

    @property
    def usable(self) -> bool:
        return not self.ended and self.doomed is None and self.client.closed is None and not self.client.eof

    def owed(self, now: float) -> list[str]:
        """Refs whose reply is due by now and has not come."""
        owed = []
        for key, n in self.sent.items():
            if self.replied[key] >= n:
                continue
            due = self.waiting.get(key, 0.0)
            if key not in self.waiting or (due is not None and due <= now):
                owed.append(key)
        return owed


@attrs.define
class Stats:
    counts: collections.Counter[str] = attrs.field(factory=collections.Counter)
    #: frames whose reply was `internal`: a bad request the daemon did not expect (shown, first few)
    internal: list[str] = attrs.field(factory=list)

    def add(self, name: str, n: int = 1) -> None:
        self.counts[name] += n


# ---- the daemon -----------------------------------------------------------------------


class Harness:
    """One ``aivad serve`` for many examples, started again (fresh directory) after it died.

    ``crashes`` keeps the log tail of every death, so a long run reports them all.
    """

    def __init__(self, sections: dict[str, dict[str, Any]] | None = None, *, avoid: frozenset[str] = frozenset()):
        self.sections = sections or FUZZ_CONFIG
        self.avoid = avoid
        self.daemon: DaemonProcess | None = None
        self.stats = Stats()
        self.crashes: list[str] = []
        self.directories: list[Path] = []
        self.secret = os.urandom(32).hex().encode()  # HS256 wants at least 32 bytes

    def ensure(self) -> DaemonProcess:
        if self.daemon is not None and self.daemon.proc is not None and self.daemon.proc.poll() is None:
            return self.daemon
        if self.daemon is not None:
            self.crashes.append(self.daemon.log()[-4000:])
            self.daemon.stop()
        directory = short_tmp_dir()
        self.directories.append(directory)
        (directory / "hmac.secret").write_bytes(self.secret)
        sections = {name: dict(values) for name, values in self.sections.items()}
        sections.setdefault("auth", {})["hmac_secret_file"] = str(directory / "hmac.secret")
        self.daemon = DaemonProcess(directory, **sections)
        self.daemon.start()
        self.stats.add("daemon starts")
        return self.daemon

    def close(self) -> None:
        if self.daemon is not None:
            self.daemon.stop()
        for directory in self.directories:
            shutil.rmtree(directory, ignore_errors=True)

    def resources(self) -> dict[str, int]:
        """The daemon's RSS (KiB) and open file descriptors, from /proc."""
        assert self.daemon is not None and self.daemon.proc is not None
        pid = self.daemon.proc.pid
        rss = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                   if line.startswith("VmRSS:"))
        return {"rss_kib": rss, "fds": len(os.listdir(f"/proc/{pid}/fd"))}


# ---- the machine ----------------------------------------------------------------------


class FuzzMachine(RuleBasedStateMachine):
    harness: ClassVar[Harness]

    def __init__(self) -> None:
        super().__init__()
        self.daemon = self.harness.ensure()
        self.stats = self.harness.stats
        self.stats.add("examples")
        self.conns: list[Conn] = []
        self.names = 0
        self.refs = 0
        self.seqs: list[int] = []
        self.task_ids: list[str] = []
        self.group_ids: list[str] = []
        self.lingering: list[socket.socket] = []  # slowloris sockets, closed at teardown
        self.journal: collections.deque[str] = collections.deque(maxlen=30)

    # -- helpers --

    def fail(self, what: str) -> None:
        log = self.daemon.log()
        alive = self.daemon.proc is not None and self.daemon.proc.poll() is None
        raise Violated(
            f"{what}\n-- daemon {'alive' if alive else 'DEAD'}; last actions:\n  " + "\n  ".join(self.journal)
            + "\n-- daemon log (tail):\n" + log[-6000:]
        )

    def note(self, action: str) -> None:
        self.journal.append(action[:300])

    def usable(self) -> list[Conn]:
        return [c for c in self.conns if c.usable]

    def pick(self, index: int) -> Conn:
        """A usable connection (one is opened if none is left: rules never depend on the daemon's
        timing to be enabled, so hypothesis can replay a program)."""
        usable = self.usable() or [self.open_conn()]
        return usable[index % len(usable)]

    def resolve(self, value: Any, pick: int) -> Any:
        if isinstance(value, Token):
            claims: dict[str, Any] = {"sub": value.sub, "aud": value.audience,
                                      "exp": int(time.time() + value.expires_in_s)}
            if TOKEN_RIGHTS[value.rights] is not None:
                claims["aivad"] = TOKEN_RIGHTS[value.rights]
            return jwt.encode(claims, self.harness.secret, algorithm="HS256")
        if isinstance(value, Known):
            pools: dict[str, list[Any]] = {"seq": self.seqs, "task_id": self.task_ids, "group_id": self.group_ids}
            pool = pools[value.kind]
            if not pool:
                return {"seq": 0, "task_id": "no-such-task", "group_id": "g1"}[value.kind]
            return pool[-1 - pick % min(len(pool), 20)]
        if isinstance(value, dict):
            return {k: self.resolve(v, pick) for k, v in value.items()}
        if isinstance(value, list):
            return [self.resolve(v, pick) for v in value]
        return value

    def avoided(self, text: bytes) -> bytes:
        """Known bugs being fixed right now can be stepped around in a long run (``--avoid``)."""
        if "surrogates" in self.harness.avoid:
            text = re.sub(rb"\\ud[89a-f][0-9a-f]{2}", b"?", text, flags=re.IGNORECASE)
        if "long-group-id" in self.harness.avoid:
            text = re.sub(rb'"(g{200,})"', lambda m: b'"' + m.group(1)[:200] + b'"', text)
        return text

    def send_bytes(self, conn: Conn, data: bytes) -> bool:
        try:
            conn.client.send(data)
        except OSError as exc:
            # the daemon closed first (an oversize frame is refused before it is all read)
            self.note(f"{conn.name}: send failed: {exc!r}")
            conn.client.eof = conn.client.eof or conn.doomed is not None
            return False
        return True

    def track(self, conn: Conn, text: bytes) -> None:
        ref = expected_ref(text)
        if ref is None:
            return
        key = ref_key(ref)
        conn.sent[key] += 1
        conn.texts[key] = text[:300]
        try:
            op = json.loads(text.decode())["op"]
        except (ValueError, KeyError, TypeError, RecursionError):
            op = None
        if isinstance(op, str) and op in WAITING_OPS:
            conn.waiting[key] = waiting_due(text, time.monotonic())

    def open_conn(self) -> Conn:
        self.names += 1
        try:
            client = RawClient.connect("127.0.0.1", self.daemon.ws_port)
        except (OSError, HandshakeRefused) as exc:
            self.fail(f"a new connection failed: {exc!r}")
        conn = Conn(f"c{self.names}", client)
        self.conns.append(conn)
        self.note(f"open {conn.name}")
        return conn

    # -- reading and checking --

    def absorb(self, conn: Conn, events: list[tuple[int, bytes]]) -> None:
        for opcode, payload in events:
            self.stats.add("frames received")
            if opcode == OP_CLOSE:
                code = conn.client.closed.code if conn.client.closed else None
                self.stats.add(f"closed by daemon {code}")
                if conn.ended:
                    continue
                allowed = UNPROVOKED_CLOSES | (conn.doomed or frozenset())
                if conn.sent_token:
                    allowed |= {TOKEN_EXPIRED}
                if code not in allowed:
                    self.fail(f"{conn.name}: the daemon closed with {code} {payload[2:100]!r}; allowed: "
                              f"{sorted(allowed)}")
                continue
            if opcode in (OP_PING, OP_PONG):
                continue
            if opcode != OP_TEXT:
                self.fail(f"{conn.name}: the daemon sent opcode {opcode}")
            try:
                frame = json.loads(payload.decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as exc:
                self.fail(f"{conn.name}: the daemon sent a text frame that is not JSON: {exc}: {payload[:200]!r}")
            self.check_frame(conn, frame)

    def check_frame(self, conn: Conn, frame: dict[str, Any]) -> None:
        op = frame.get("op")
        if op in ("ok", "error", "pong"):
            if op == "error":
                self.stats.add(f"error {frame.get('code')}")
                if frame.get("code") not in ERROR_CODES:
                    self.fail(f"{conn.name}: undocumented error code: {frame}")
                if frame.get("code") == "internal" and len(self.stats.internal) < 20:
                    sent = conn.texts.get(ref_key(frame.get("ref")), b"(no ref: see the last actions)")
                    self.stats.internal.append(f"{sent!r} → {frame}; last actions: {list(self.journal)[-2:]}")
            else:
                self.stats.add(op)
            ref = frame.get("ref")
            if ref is not None:
                key = ref_key(ref)
                conn.replied[key] += 1
                if conn.replied[key] > conn.sent[key]:
                    self.fail(f"{conn.name}: reply #{conn.replied[key]} for ref {key[:80]}, "
                              f"which was sent {conn.sent[key]} time(s): {str(frame)[:300]}")
            if op == "ok" and "recovered" in frame and isinstance(frame.get("pattern"), str):
                conn.subscriptions[frame["pattern"]] = 0
            elif op == "ok" and set(frame) == {"op", "ref", "pattern"}:
                conn.subscriptions.pop(frame["pattern"], None)
            elif op == "ok" and isinstance(frame.get("seq"), int):
                self.seqs.append(frame["seq"])
            elif op == "ok" and isinstance(frame.get("task_id"), str):
                self.task_ids.append(frame["task_id"])
        elif op == "message":
            pattern, seq = str(frame.get("pattern")), frame.get("msg", {}).get("seq")
            if pattern not in conn.subscriptions:
                self.fail(f"{conn.name}: message for {pattern!r}, not subscribed ({sorted(conn.subscriptions)})")
            if not isinstance(seq, int) or seq <= conn.subscriptions[pattern]:
                self.fail(f"{conn.name}: seq {seq} on {pattern!r} after seq {conn.subscriptions[pattern]}")
            conn.subscriptions[pattern] = seq
            self.stats.add("messages")
        elif op == "unsubscribed":
            conn.subscriptions.pop(str(frame.get("pattern")), None)
        elif op == "task":
            task = frame.get("task", {})
            conn.tasks.append(task.get("task_id"))
            self.task_ids.append(task.get("task_id"))
            if task.get("payload") is not None and isinstance(task.get("task_id"), str):
                self.stats.add("tasks received")
        else:
            self.fail(f"{conn.name}: unexpected frame from the daemon: {str(frame)[:300]}")

    def settle(self) -> None:
        """Read every connection until nothing that is due is owed; fail on a hang."""
        deadline = time.monotonic() + REPLY_TIMEOUT_S
        while True:
            now = time.monotonic()
            waiting_on = []
            for conn in self.conns:
                if conn.ended or conn.client.eof:
                    continue
                self.absorb(conn, conn.client.receive(0))
                if conn.client.closed is not None or conn.client.eof:
                    self.ended_by_daemon(conn)
                    continue
                if conn.doomed is not None or conn.owed(now):
                    waiting_on.append(conn)
            if not waiting_on:
                break
            if now > deadline:
                details = "; ".join(
                    f"{c.name}: {'waiting for its close' if c.doomed else 'owes ' + ', '.join(c.owed(now))[:300]}"
                    for c in waiting_on
                )
                self.fail(f"no reply within {REPLY_TIMEOUT_S} s: {details}")
            select.select([c.client.sock for c in waiting_on], [], [], 0.05)
        for conn in self.conns:
            if conn.ended or conn.client.eof:
                conn.client.sock.close()
        self.conns = [c for c in self.conns if not (c.ended or c.client.eof)]

    def ended_by_daemon(self, conn: Conn) -> None:
        if conn.client.closed is None and conn.doomed is None:
            if self.daemon.proc is not None and self.daemon.proc.poll() is not None:
                self.fail(f"{conn.name}: the daemon died")
            self.fail(f"{conn.name}: the daemon dropped the connection without a close frame")
        if not conn.client.eof and conn.client.closed is not None:
            conn.client.close()  # answer its close
        conn.client.eof = True

    def probe(self) -> None:
        """The daemon is alive and a fresh client gets pong."""
        proc = self.daemon.proc
        assert proc is not None
        if proc.poll() is not None:
            self.fail(f"the daemon exited with {proc.returncode}")
        try:
            client = RawClient.connect("127.0.0.1", self.daemon.ws_port, timeout_s=REPLY_TIMEOUT_S)
        except (OSError, HandshakeRefused) as exc:
            self.fail(f"a fresh client could not connect: {exc!r}")
        try:
            client.send_json({"op": "ping", "ref": "probe"})
            deadline = time.monotonic() + REPLY_TIMEOUT_S
            while time.monotonic() < deadline:
                for opcode, payload in client.receive(0.5):
                    if opcode == OP_TEXT and json.loads(payload) == {"op": "pong", "ref": "probe"}:
                        return
                if client.eof:
                    break
            self.fail("a fresh client got no pong")
        finally:
            client.close()

    # -- rules --

    @initialize()
    def start(self) -> None:
        self.open_conn()
        self.open_conn()

    @invariant()
    def daemon_keeps_its_promises(self) -> None:
        self.settle()
        self.probe()

    @rule()
    def connect(self) -> None:
        if len(self.usable()) < MAX_CONNECTIONS:
            self.open_conn()

    # hypothesis picks among enabled rules evenly: sending frames has four rules to get four shares
    send_args: ClassVar[dict[str, Any]] = {
        "index": st.integers(0, MAX_CONNECTIONS - 1), "message": messages(), "pick": st.integers(0, 1000)
    }

    @rule(**send_args)
    def send(self, index: int, message: Message | Violation, pick: int) -> None:
        self.send_message(index, message, pick)

    @rule(**send_args)
    def send_more(self, index: int, message: Message | Violation, pick: int) -> None:
        self.send_message(index, message, pick)

    @rule(**send_args)
    def send_again(self, index: int, message: Message | Violation, pick: int) -> None:
        self.send_message(index, message, pick)

    @rule(**send_args)
    def send_once_more(self, index: int, message: Message | Violation, pick: int) -> None:
        self.send_message(index, message, pick)

    def send_message(self, index: int, message: Message | Violation, pick: int) -> None:
        self.stats.add("rule send")
        conn = self.pick(index)
        if isinstance(message, Violation):
            data, codes = violation_bytes(message.kind)
            conn.doomed = codes
            self.note(f"{conn.name}: violation {message.kind}")
            self.stats.add(f"violation {message.kind}")
            self.stats.add("frames sent")
            self.send_bytes(conn, data)
            return
        if message.raw is not None:
            text = self.avoided(message.raw)
            if message.binary:
                self.note(f"{conn.name}: binary {text[:80]!r}")
                self.stats.add("binary frames")
                self.stats.add("frames sent")
                self.send_bytes(conn, encode_frame(OP_BINARY, text))
                return
        else:
            assert message.obj is not None
            obj = self.resolve(message.obj, pick)
            if message.ref == "unique":
                self.refs += 1
                obj["ref"] = self.refs if self.refs % 2 else f"r{self.refs}"
            elif message.ref != "none":
                obj["ref"] = message.ref
            text = self.avoided(render(obj).encode())
        try:
            text.decode("utf-8")
        except UnicodeDecodeError:
            conn.doomed = frozenset({1007})
        self.track(conn, text)
        if b'"auth"' in text:
            conn.sent_token = True
        if message.cuts:
            frames = split_frames(OP_TEXT, text, message.cuts, ping_between=message.ping_between)
        else:
            frames = [encode_frame(OP_TEXT, text)]
        if len(text) > MAX_FRAME_BYTES:
            conn.doomed = frozenset({1009})
        op = message.obj.get("op") if message.obj else "raw"
        self.note(f"{conn.name}: {op if isinstance(op, str) else type(op).__name__} ({len(frames)} frame(s)) "
                  f"{text[:200]!r}")
        self.stats.add(f"op {op if isinstance(op, str) and op in OPS else 'other'}")
        self.stats.add("frames sent", len(frames))
        self.send_bytes(conn, b"".join(frames))

    @rule(index=st.integers(0, MAX_CONNECTIONS - 1), count=st.integers(2, 20), topic=st.sampled_from(TYPES),
          subscribe_first=st.booleans())
    def burst(self, index: int, count: int, topic: str, subscribe_first: bool) -> None:
        """Pipelined publishes (and a subscribe), read ahead by the daemon and stored in one commit."""
        self.stats.add("rule burst")
        conn = self.pick(index)
        frames = []
        if subscribe_first and "#" not in conn.subscriptions:
            self.refs += 1
            frames.append({"op": "subscribe", "pattern": "#", "ref": self.refs})
        for i in range(count):
            self.refs += 1
            frames.append({"op": "publish", "type": topic, "payload": i, "ref": self.refs})
        data = b""
        for frame in frames:
            text = render(frame).encode()
            self.track(conn, text)
            data += encode_frame(OP_TEXT, text)
        self.note(f"{conn.name}: burst of {len(frames)}")
        self.stats.add("frames sent", len(frames))
        self.send_bytes(conn, data)

    @rule(index=st.integers(0, MAX_CONNECTIONS - 1), how=st.sampled_from(["result", "fail", "progress", "mutated"]),
          value=small_json, with_ref=st.booleans())
    def answer_task(self, index: int, how: str, value: Any, with_ref: bool) -> None:
        """Answer a task this worker was sent (or, with none, one it was not: a report to ignore)."""
        workers = [c for c in self.usable() if c.tasks] or [self.pick(index)]
        conn = workers[index % len(workers)]
        task_id = conn.tasks.pop(0) if conn.tasks else "not-sent-to-this-worker"
        frame: dict[str, Any] = {
            "result": {"op": "task.result", "task_id": task_id, "result": value},
            "fail": {"op": "task.fail", "task_id": task_id, "error": value, "retryable": bool(index % 2)},
            "progress": {"op": "task.progress", "task_id": task_id, "progress": 0.5, "note": value},
            "mutated": {"op": "task.result", "task_id": task_id, "result": Raw("NaN"), "extra": HOSTILE_SCALARS[index]},
        }[how]
        if with_ref:
            self.refs += 1
            frame["ref"] = self.refs
        text = self.avoided(render(frame).encode())
        self.track(conn, text)
        self.note(f"{conn.name}: answer {text[:200]!r}")
        self.stats.add(f"task {how}")
        self.stats.add("frames sent")
        self.send_bytes(conn, encode_frame(OP_TEXT, text))

    @rule(index=st.integers(0, MAX_CONNECTIONS - 1),
          how=st.sampled_from(["close", "reset", "reset-mid-frame", "half-close", "close-frame-then-reset"]),
          cut=st.integers(1, 30))
    def end(self, index: int, how: str, cut: int) -> None:
        conn = self.pick(index)
        conn.ended = True
        self.note(f"{conn.name}: end by {how}")
        self.stats.add(f"end {how}")
        if how == "close":
            conn.client.close()
        elif how == "reset":
            conn.client.reset()
        elif how == "reset-mid-frame":
            frame = encode_frame(OP_TEXT, b'{"op":"publish","type":"fz.a","payload":"cut short","ref":0}')
            with contextlib.suppress(OSError):
                conn.client.send(frame[:cut])
            conn.client.reset()
        elif how == "half-close":
            with contextlib.suppress(OSError):
                conn.client.sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + REPLY_TIMEOUT_S
            while not conn.client.eof and time.monotonic() < deadline:
                conn.client.receive(0.2)
            if not conn.client.eof:
                self.fail(f"{conn.name}: half-closed, and the daemon kept the connection for {REPLY_TIMEOUT_S} s")
            conn.client.sock.close()
        else:
            with contextlib.suppress(OSError):
                conn.client.send(encode_frame(OP_CLOSE, struct.pack("!H", 1000)))
            conn.client.reset()
        conn.client.eof = True

    @rule(attack=st.sampled_from(HANDSHAKE_ATTACKS), data=st.binary(max_size=300), cut=st.integers(1, 200))
    def attack_handshake(self, attack: str, data: bytes, cut: int) -> None:
        """A connection that never becomes a proper WebSocket; the daemon must end it (or serve it)."""
        self.note(f"handshake attack {attack}")
        self.stats.add(f"handshake {attack}")
        host, port = "127.0.0.1", self.daemon.ws_port
        request = handshake_request(host, port)
        try:
            sock = socket.create_connection((host, port), timeout=REPLY_TIMEOUT_S)
        except OSError as exc:
            self.fail(f"connecting failed: {exc!r}")
        try:
            if attack == "garbage":
                sock.sendall(data or b"\x00")
            elif attack == "partial-request-reset":
                sock.sendall(request[: cut % len(request)])
            elif attack == "upgrade-then-reset":
                sock.sendall(request)
                if "reset-after-upgrade" in self.harness.avoid:
                    read_http_head(sock, REPLY_TIMEOUT_S)
            elif attack in ("upgrade-101-then-reset", "upgrade-half-frame-reset", "half-close-after-upgrade"):
                sock.sendall(request)
                read_http_head(sock, REPLY_TIMEOUT_S)
                if attack == "upgrade-half-frame-reset":
                    sock.sendall(encode_frame(OP_TEXT, b'{"op":"ping","ref":1}')[: cut % 20 + 1])
                elif attack == "half-close-after-upgrade":
                    sock.shutdown(socket.SHUT_WR)
                    self.await_end(sock, attack)
            elif attack == "slowloris":
                self.lingering.append(sock)  # closed at teardown
                sock.sendall(request[: cut % len(request)])
                return
            else:
                payloads = {
                    "plain-get": f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode(),
                    "bad-version": request.replace(b"Version: 13", b"Version: 8"),
                    "no-key": re.sub(rb"Sec-WebSocket-Key: [^\r]*\r\n", b"", request),
                    "huge-header": request[:-2] + b"X-Big: " + b"b" * 200_000 + b"\r\n\r\n",
                    "many-headers": request[:-2] + b"".join(b"X-%d: v\r\n" % i for i in range(5000)) + b"\r\n",
                    "http-1.0": request.replace(b"HTTP/1.1", b"HTTP/1.0"),
                    "two-upgrades": request + request,
                    "post-with-body": request.replace(b"GET", b"POST")[:-2] + b"Content-Length: 5\r\n\r\nhello",
                    "tls-hello": bytes.fromhex("16030100a5010000a10303") + os.urandom(32) + b"\x00" * 40,
                }
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    sock.sendall(payloads[attack])
                self.await_end(sock, attack)
        except (BrokenPipeError, ConnectionResetError) as exc:
            self.note(f"  ({exc!r})")
        finally:
            if attack != "slowloris":
                reset(sock)

    def await_end(self, sock: socket.socket, attack: str) -> None:
        """Read until the daemon ends the connection or upgrades it (then it is a WebSocket: fine)."""
        sock.settimeout(REPLY_TIMEOUT_S)
        seen = b""
        try:
            while chunk := sock.recv(65536):
                seen += chunk
                if seen.startswith(b"HTTP/1.1 101 ") and b"\r\n\r\n" in seen:
                    return
        except (ConnectionResetError, BrokenPipeError):
            return
        except TimeoutError:
            self.fail(f"after {attack}, the daemon kept the connection {REPLY_TIMEOUT_S} s; it sent {seen[:200]!r}")

    def teardown(self) -> None:
        try:
            if self.daemon.proc is not None and self.daemon.proc.poll() is None:
                self.final_check()
        finally:
            for i, conn in enumerate(self.conns):  # half of them go with a reset, half with a close
                if conn.ended or conn.client.eof or i % 2:
                    conn.client.reset()
                else:
                    conn.client.close()
            for sock in self.lingering:
                reset(sock)

    def final_check(self) -> None:
        """Wait for the waiting ops that have a short timeout; every ref answered exactly once."""
        deadline = time.monotonic() + WAIT_BOUND_S + WAIT_GRACE_S + 1
        while time.monotonic() < deadline:
            live = [c for c in self.conns if not (c.ended or c.client.eof or c.doomed)]
            pending = [c for c in live if any(
                c.replied[k] < c.sent[k] and due is not None for k, due in c.waiting.items())]
            self.settle()
            if not pending:
                break
            time.sleep(0.05)
        for conn in self.conns:
            if conn.ended or conn.client.eof or conn.doomed:
                continue
            for key, due in conn.waiting.items():
                if due is not None and conn.replied[key] < conn.sent[key]:
                    self.fail(f"{conn.name}: the waiting op with ref {key} was never answered")


def run_fuzz(
    harness: Harness, *, examples: int, steps: int, phases: tuple[Phase, ...] = tuple(Phase)
) -> None:
    """Run ``examples`` random programs of up to ``steps`` steps against ``harness``'s daemon."""
    FuzzMachine.harness = harness
    run_state_machine_as_test(
        FuzzMachine,
        settings=settings(
            max_examples=examples,
            stateful_step_count=steps,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            phases=phases,
            report_multiple_bugs=False,
        ),
    )


def summary(harness: Harness, started: float, before: dict[str, int], outcome: str) -> str:
    counts = harness.stats.counts
    after = harness.resources() if harness.daemon and harness.daemon.proc and harness.daemon.proc.poll() is None else {}
    lines = [
        f"aivad protocol fuzz: {outcome}",
        f"  {counts['frames sent']} frames sent in {counts['examples']} programs, {time.monotonic() - started:.0f} s;"
        f" daemon started {counts['daemon starts']} time(s), crashes {len(harness.crashes)}",
        f"  replies: ok {counts['ok']}, pong {counts['pong']}, errors "
        + ", ".join(f"{k[6:]} {v}" for k, v in sorted(counts.items()) if k.startswith("error ")),
        f"  messages delivered {counts['messages']}, tasks received {counts['tasks received']}",
        "  closes by the daemon: "
        + (", ".join(f"{k[17:]} {v}" for k, v in sorted(counts.items()) if k.startswith("closed by daemon "))
           or "none"),
        "  ends by the fuzzer: " + ", ".join(f"{k[4:]} {v}" for k, v in sorted(counts.items()) if k.startswith("end ")),
        f"  handshake attacks {sum(v for k, v in counts.items() if k.startswith('handshake '))}, "
        f"RFC 6455 violations {sum(v for k, v in counts.items() if k.startswith('violation '))}",
        "  ops: " + ", ".join(f"{k[3:]} {v}" for k, v in sorted(counts.items()) if k.startswith("op ")),
        f"  daemon RSS {before.get('rss_kib', 0) // 1024} → {after.get('rss_kib', 0) // 1024} MiB, "
        f"fds {before.get('fds')} → {after.get('fds')}",
    ]
    if harness.stats.internal:
        lines.append(f"  `internal` errors (a request the daemon did not expect): {len(harness.stats.internal)}, e.g.")
        lines += [f"    {line[:300]}" for line in harness.stats.internal[:5]]
    for i, crash in enumerate(harness.crashes):
        lines.append(f"  crash {i + 1}, log tail:\n" + "\n".join("    " + line for line in crash.splitlines()[-25:]))
    return "\n".join(lines)


def printable(text: str) -> str:
    """``text`` with lone surrogates (the fuzzer sends them) escaped, so it can be printed."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=100_000, help="stop after this many frames (default 100000)")
    parser.add_argument("--steps", type=int, default=60, help="steps per program (default 60)")
    parser.add_argument("--avoid", action="append", default=[],
                        choices=["reset-after-upgrade", "surrogates", "long-group-id"],
                        help="step around a known bug that is being fixed (never in the test suite)")
    args = parser.parse_args(argv)
    harness = Harness(avoid=frozenset(args.avoid))
    started = time.monotonic()
    harness.ensure()
    before = harness.resources()
    outcome = "passed"
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    try:
        while harness.stats.counts["frames sent"] < args.frames:
            run_fuzz(harness, examples=20, steps=args.steps)
    except Exception as exc:  # noqa: BLE001 - every failure is reported with the summary
        outcome = f"FAILED\n{type(exc).__name__}: {exc}"
    except KeyboardInterrupt:
        outcome = "interrupted"
    finally:
        print(printable(summary(harness, started, before, outcome.splitlines()[0])))
        if outcome.startswith("FAILED"):
            print(printable(outcome))
        harness.close()
    return 0 if outcome == "passed" else 1


@contextlib.contextmanager
def harness_for_tests() -> Iterator[Harness]:
    harness = Harness()
    try:
        yield harness
    finally:
        harness.close()


if __name__ == "__main__":
    sys.exit(main())
