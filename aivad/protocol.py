"""Request parsing shared by the WebSocket ops and the control commands — no I/O.

Both edges take JSON objects from peers; the same field rules and the same
error codes (DESIGN §4.3) apply to both, so they live here once.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import Any

import attrs

from .envelope import BadMessage, Envelope, check_pattern, check_topic

__all__ = [
    "ERROR_CODES",
    "HISTORY_MAX_LIMIT",
    "CollectRequest",
    "HistoryRequest",
    "OpError",
    "SubscribeRequest",
    "WorkerHello",
    "decode_request",
    "dumps",
    "field",
    "loads_json",
    "parse_collect",
    "parse_envelope",
    "parse_history",
    "parse_json",
    "parse_pattern",
    "parse_subscribe",
    "parse_timeout",
    "parse_worker_hello",
    "request_ref",
    "seq_field",
]

#: DESIGN §4.3, fixed
ERROR_CODES = frozenset(
    {
        "bad_json",
        "bad_request",
        "unknown_op",
        "too_large",
        "unauthorized",
        "forbidden",
        "not_found",
        "overloaded",
        "timeout",
        "internal",
    }
)
HISTORY_MAX_LIMIT = 1000


class OpError(Exception):
    """A request failed in a way the peer is told about, with one of ERROR_CODES."""

    def __init__(self, code: str, message: str, ref: Any = None) -> None:
        assert code in ERROR_CODES, code
        super().__init__(message)
        self.code = code
        self.message = message
        #: the request's ref, when the error is raised before the edge could read it (decode_request)
        self.ref = ref


def dumps(obj: Any) -> str:
    """Compact JSON, UTF-8 kept as is: the one encoding of every reply."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def field(frame: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
    """A typed field of a request (``null`` counts as absent), or bad_request naming it."""
    value = frame.get(name)
    if value is None:
        if default is ...:
            raise OpError("bad_request", f"missing field: {name}")
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(k.__name__ for k in kinds).replace("str", "string").replace("int", "integer")
        raise OpError("bad_request", f"{name} must be {names}")
    return value


#: the largest seq (or id) there can be: SQLite's integers are 64-bit
MAX_SEQ = 2**63 - 1


def seq_field(frame: dict[str, Any], name: str, default: Any) -> Any:
    """A seq or a row id: an integer 0..2**63-1 (larger ones no store can hold)."""
    value = field(frame, name, int, default)
    if value is not None and not 0 <= value <= MAX_SEQ:
        raise OpError("bad_request", f"{name} must be 0..{MAX_SEQ}")
    return value


def parse_pattern(frame: dict[str, Any]) -> str:
    try:
        return check_pattern(field(frame, "pattern", str))
    except BadMessage as exc:
        raise OpError("bad_request", str(exc)) from None


def parse_envelope(frame: dict[str, Any]) -> Envelope:
    """A producer's message from the fields of a publish request (a ``seq`` is ignored).

    ``payload`` is required: ``null`` is a value, a missing field is a mistake (DESIGN §4.3).
    """
    try:
        envelope = Envelope.from_fields(
            frame.get("type"),
            frame.get("payload"),
            frame.get("metadata"),
            frame.get("message_id"),
            frame.get("timestamp"),
        )
    except BadMessage as exc:
        raise OpError("bad_request", str(exc)) from None
    if "payload" not in frame:
        raise OpError("bad_request", "missing field: payload (null is a value)")
    return envelope


#: the longest ``epoch`` a client may send back (the daemon's own are 16 characters)
MAX_EPOCH_LENGTH = 64


@attrs.frozen
class SubscribeRequest:
    pattern: str
    since: int | None
    epoch: str | None


def parse_subscribe(frame: dict[str, Any]) -> SubscribeRequest:
    epoch = field(frame, "epoch", str, None)
    if epoch is not None and not 0 < len(epoch) <= MAX_EPOCH_LENGTH:
        raise OpError("bad_request", f"epoch must be 1..{MAX_EPOCH_LENGTH} characters")
    return SubscribeRequest(parse_pattern(frame), seq_field(frame, "since", None), epoch)


#: the most task types one worker may run, and the concurrency it may ask for
MAX_WORKER_TYPES = 100
MAX_WORKER_CONCURRENCY = 10_000
MAX_NAME_LENGTH = 255


@attrs.frozen
class WorkerHello:
    types: list[str]
    concurrency: int
    name: str


def parse_worker_hello(frame: dict[str, Any]) -> WorkerHello:
    types = field(frame, "types", list)
    if not 1 <= len(types) <= MAX_WORKER_TYPES:
        raise OpError("bad_request", f"types must list 1..{MAX_WORKER_TYPES} task types")
    try:
        types = list(dict.fromkeys(check_topic(t, "each task type") for t in types))
    except BadMessage as exc:
        raise OpError("bad_request", str(exc)) from None
    concurrency = field(frame, "concurrency", int, 1)
    if not 1 <= concurrency <= MAX_WORKER_CONCURRENCY:
        raise OpError("bad_request", f"concurrency must be 1..{MAX_WORKER_CONCURRENCY}")
    name = field(frame, "name", str, "")
    if len(name) > MAX_NAME_LENGTH:
        raise OpError("bad_request", f"name must be at most {MAX_NAME_LENGTH} characters")
    return WorkerHello(types, concurrency, name)


def parse_timeout(frame: dict[str, Any], default: float) -> float:
    timeout = field(frame, "timeout", (int, float), default)
    if not 0 <= timeout <= 86400:  # NaN fails this too
        raise OpError("bad_request", "timeout must be 0..86400 seconds")
    return float(timeout)


@attrs.frozen
class CollectRequest:
    task_ids: list[str] | None
    group_id: str | None
    timeout_s: float
    min_results: int | None


def parse_collect(frame: dict[str, Any], max_ids: int, default_timeout_s: float) -> CollectRequest:
    task_ids = field(frame, "task_ids", list, None)
    group_id = field(frame, "group_id", str, None)
    if (task_ids is None) == (group_id is None):
        raise OpError("bad_request", "give task_ids or group_id (one of them)")
    if task_ids is not None and (not all(isinstance(t, str) for t in task_ids) or len(task_ids) > max_ids):
        raise OpError("bad_request", f"task_ids must be at most {max_ids} strings")
    min_results = field(frame, "min_results", int, None)
    if min_results is not None and min_results < 1:
        raise OpError("bad_request", "min_results must be >= 1")
    return CollectRequest(
        list(dict.fromkeys(task_ids)) if task_ids is not None else None,
        group_id,
        parse_timeout(frame, default_timeout_s),
        min_results,
    )


@attrs.frozen
class HistoryRequest:
    pattern: str
    after: int
    limit: int


def parse_history(frame: dict[str, Any]) -> HistoryRequest:
    pattern = parse_pattern(frame)
    after = seq_field(frame, "after", 0)
    limit = field(frame, "limit", int, 100)
    if not 1 <= limit <= HISTORY_MAX_LIMIT:
        raise OpError("bad_request", f"limit must be 1..{HISTORY_MAX_LIMIT}")
    return HistoryRequest(pattern, after, limit)


#: a ``\\uD800``..``\\uDFFF`` escape: JSON allows a lone one, which no UTF-8 encoder can write back
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def parse_json(text: str | bytes) -> Any:
    """``json.loads``, except that JSON nested deeper than Python's recursion limit (``[[[[…``,
    a few KB of it) is a ValueError, not the RecursionError ``json`` raises: every caller handles
    ValueError. For JSON aivad wrote or a trusted writer may have (Redis); a peer's goes through
    :func:`loads_json`."""
    return _within_nesting(json.loads, text)


def loads_json(text: str | bytes) -> Any:
    """Parse a peer's JSON (ValueError if it is not JSON), refusing lone surrogates (``LoneSurrogate``).

    Only JSON as RFC 8259 has it: ``NaN``, ``Infinity`` and ``-Infinity`` (which
    Python's ``json`` reads) and numbers past a double's range (``1e999``, read
    as infinity) are ValueErrors. Taken in, they would be written back as
    ``NaN``/``Infinity``, which no browser's ``JSON.parse`` reads: every
    subscriber's frame, history page and HTTP reply holding the message would
    fail to parse, for as long as the message is kept.

    ``"\\ud800"`` is valid JSON but not Unicode: a message holding one could be
    neither stored nor sent on (UTF-8), so it would fail later, far from its
    producer — and take the neighbours of its group commit with it. Escaped
    surrogate *pairs* (an emoji written ``\\ud83d\\ude00``) are fine: only when
    the text has such an escape at all is the decoded value checked. Nesting past the
    recursion limit is a ValueError (:func:`parse_json`).
    """
    if not isinstance(text, str):  # as json.loads decodes bytes
        text = text.decode(json.detect_encoding(text), "surrogatepass")
    value = _within_nesting(_PEER_JSON.decode, text)
    if _SURROGATE_ESCAPE.search(text) and not _encodable(value):
        raise LoneSurrogate(value)
    return value


def _within_nesting(decode: Callable[[Any], Any], text: str | bytes) -> Any:
    try:
        return decode(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


def _finite(number: str) -> float:
    value = float(number)
    if math.isinf(value):
        raise ValueError(f"{number[:40]} is beyond a double's range")
    return value


#: the decoder of peers' JSON: RFC 8259 numbers only
_PEER_JSON = json.JSONDecoder(parse_constant=_not_json, parse_float=_finite)


class LoneSurrogate(ValueError):
    """JSON holding a string no UTF-8 encoder can write: ``value`` is what it decoded to."""

    def __init__(self, value: Any) -> None:
        super().__init__("a string holds a lone UTF-16 surrogate (not valid Unicode)")
        self.value = value


def _encodable(value: Any) -> bool:
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def decode_request(text: str | bytes) -> dict[str, Any]:
    """One request: a JSON object, else bad_json / bad_request.

    A request holding a lone surrogate is ``bad_request``, answered with its
    ``ref`` when the ref itself is clean (the error carries it: ``OpError.ref``).
    """
    if isinstance(text, bytes):
        raise OpError("bad_request", "binary frames are not supported; send JSON text")
    try:
        request = loads_json(text)
    except LoneSurrogate as exc:
        ref = exc.value.get("ref") if isinstance(exc.value, dict) else None
        clean_ref = ref if not isinstance(ref, (dict, list)) and _encodable(ref) else None
        raise OpError("bad_request", str(exc), clean_ref) from None
    except ValueError:
        raise OpError("bad_json", "not valid JSON") from None
    if not isinstance(request, dict):
        raise OpError("bad_request", "a request must be a JSON object")
    return request


def request_ref(request: dict[str, Any]) -> Any:
    """The ``ref`` to echo: any JSON scalar."""
    ref = request.get("ref")
    if isinstance(ref, (dict, list)):
        raise OpError("bad_request", "ref must be a JSON scalar")
    return ref
