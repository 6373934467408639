"""Tasks: the spec a producer submits, priorities, retry policy, backoff — no I/O.

Every ingress that accepts tasks (WebSocket ``dispatch``/``request``, control
``dispatch``, the AMQP ``aivad.tasks`` queue) parses the spec here, so the same
fields mean the same thing and produce the same errors everywhere.
"""

from __future__ import annotations

import random
from typing import Any

import attrs

from .config import TasksConfig
from .envelope import BadMessage, check_topic, new_id
from .protocol import OpError, field

__all__ = [
    "ACTIVE_STATES",
    "PRIORITY_NAMES",
    "STATES",
    "TERMINAL_STATES",
    "TaskSpec",
    "backoff_s",
    "parse_priority",
    "parse_task_spec",
]

#: DESIGN §4.3 task states, fixed
STATES = ("queued", "dispatched", "running", "retrying", "completed", "dead")
TERMINAL_STATES = frozenset({"completed", "dead"})
ACTIVE_STATES = frozenset({"dispatched", "running"})
#: named priorities on the 0–9 scale (AMQP's, with x-max-priority 10)
PRIORITY_NAMES = {"low": 1, "normal": 4, "high": 7, "critical": 9}


def parse_priority(value: Any) -> int:
    if value is None:
        return PRIORITY_NAMES["normal"]
    if isinstance(value, str) and value in PRIORITY_NAMES:
        return PRIORITY_NAMES[value]
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 9:
        return value
    raise OpError("bad_request", "priority must be low, normal, high, critical or 0..9")


@attrs.frozen
class TaskSpec:
    """A validated task as submitted: what to run and how hard to try."""

    task_id: str
    type: str
    payload: Any
    priority: int
    max_attempts: int
    backoff_factor_s: float
    max_backoff_s: float
    timeout_s: float
    heartbeat_s: float | None
    affinity_key: str | None
    group_id: str | None
    reply_to: str | None = None
    correlation_id: str | None = None

    def to_json_dict(self) -> dict[str, Any]:
        """The fields as a dict, the payload itself in it (not a copy).

        ``attrs.asdict`` would copy the payload deeply, twice per task (stored, then
        ended): 3.4 ms for a payload of 2,000 small objects, on the event loop.
        """
        return attrs.asdict(self, recurse=False)


def _positive_number(frame: dict[str, Any], name: str, default: float | None) -> Any:
    value = field(frame, name, (int, float), default)
    if value is not None and not 0 < value <= 7 * 86400:
        raise OpError("bad_request", f"{name} must be > 0 and at most 7 days (seconds)")
    return value


def parse_task_spec(frame: dict[str, Any], defaults: TasksConfig, *, task_id: str | None = None) -> TaskSpec:
    """Validate the fields of a ``dispatch`` (DESIGN §4.3) into a TaskSpec, or OpError."""
    try:
        task_type = check_topic(frame.get("type"), "type")
    except BadMessage as exc:
        raise OpError("bad_request", str(exc)) from None
    policy = field(frame, "retry_policy", dict, {})
    unknown = set(policy) - {"max_attempts", "backoff_factor", "max_backoff"}
    if unknown:
        raise OpError("bad_request", f"retry_policy: unknown fields {', '.join(sorted(unknown))}")
    max_attempts = field(policy, "max_attempts", int, defaults.default_max_attempts)
    if not 1 <= max_attempts <= 100:
        raise OpError("bad_request", "retry_policy.max_attempts must be 1..100")
    backoff_factor = field(policy, "backoff_factor", (int, float), defaults.default_backoff_factor_s)
    max_backoff = field(policy, "max_backoff", (int, float), defaults.default_max_backoff_s)
    if backoff_factor < 0 or max_backoff < 0:
        raise OpError("bad_request", "retry_policy backoff values must be >= 0")
    affinity_key = field(frame, "affinity_key", str, None)
    group_id = field(frame, "group_id", str, None)
    for name, value in (("affinity_key", affinity_key), ("group_id", group_id)):
        if value is not None and not 0 < len(value) <= 255:
            raise OpError("bad_request", f"{name} must be 1..255 characters")
    return TaskSpec(
        task_id=task_id or new_id(),
        type=task_type,
        payload=frame.get("payload"),
        priority=parse_priority(frame.get("priority")),
        max_attempts=max_attempts,
        backoff_factor_s=float(backoff_factor),
        max_backoff_s=float(max_backoff),
        timeout_s=float(_positive_number(frame, "timeout", defaults.default_timeout_s)),
        heartbeat_s=_positive_number(frame, "heartbeat", None),
        affinity_key=affinity_key,
        group_id=group_id,
    )


def backoff_s(spec: TaskSpec, attempt: int, rng: random.Random | None = None) -> float:
    """Delay before attempt ``attempt + 1``: min(max_backoff, factor × 2^(attempt−1)), ±20 % jitter."""
    base = min(spec.max_backoff_s, spec.backoff_factor_s * 2 ** (attempt - 1))
    return float(base * (rng or random).uniform(0.8, 1.2))
