"""The control commands (DESIGN §4.4) — also the HTTP API's (§4.9): one table behind both edges.

A command takes the request's JSON object and answers the fields of its ``ok``
reply, or raises :class:`~aivad.protocol.OpError`. Parsing the fields is here,
deciding is in :mod:`aivad.ops`; the edges only move lines (control) or HTTP
bodies (``POST /api/<command>``) in and out, so the same request gets the same
reply on both. ``tail`` streams, so it lives with the control edge alone.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import attrs

from .dispatcher import TaskView
from .ops import Caller, Operations
from .protocol import OpError, field, parse_envelope, parse_history, parse_json, seq_field
from .store import DeadLetter
from .tasks import STATES, parse_task_spec

__all__ = ["COMMANDS", "Command"]

#: a command: (operations, caller, request) → the fields of its ok reply
Command = Callable[[Operations, Caller, dict[str, Any]], Awaitable[dict[str, Any]]]

#: the most rows ``tasks`` and ``dlq.list`` return in one reply
MAX_LIST_LIMIT = 10_000


def _limit(request: dict[str, Any], default: int = 100) -> int:
    limit = field(request, "limit", int, default)
    if not 1 <= limit <= MAX_LIST_LIMIT:
        raise OpError("bad_request", f"limit must be 1..{MAX_LIST_LIMIT}")
    return int(limit)


async def _status(ops: Operations, caller: Caller, request: dict[str, Any]) -> dict[str, Any]:
    return {"status": ops.status(caller)}


async def _publish(ops: Operations, caller: Caller, request: dict[str, Any]) -> dict[str, Any]:
    appended = await ops.publish(caller, parse_envelope(request))
    return {"seq": appended.seq, "duplicate": appended.duplicate}


async def _history(ops: Operations, caller: Caller, request: dict[str, Any]) -> dict[str, Any]:
    parsed = parse_history(request)
    history = await ops.history(caller, parsed.pattern, parsed.after, parsed.limit)
    return history.page(parsed.after, parsed.limit)


async def _dispatch(ops: Operations, caller: Caller, request: dict[str, Any]) -> dict[str, Any]:
    task_id, duplicate = await ops.dispatch(caller, parse_task_spec(request, ops.tasks))
    return {"task_id": task_id, "duplicate": duplicate}


async def _task(ops: Operations, caller: Caller, request: dict[str, Any]) -> dict[str, Any]:
    return {"task": attrs.asdict(await ops.task(caller, field(request, "task_id", str)))}


def _task_row(view: TaskView) -> dict[str, Any]:
    return {k: v for k, v in attrs.asdict(view).items() if k not in ("history", "spec")}


async def _tasks(ops: Operations, caller: Caller, request: dict[str, Any]) -> dict[str, Any]:
    state = field(request, "state", str, None)
    if state is not None and state not in STATES:
        raise OpError("bad_request", f"state must be one of {', '.join(STATES)}")
    return {"tasks": [_task_row(v) for v in await ops.tasks_list(caller, state, _limit(request))]}


async def _workers(ops: Operations, caller: Caller, request: dict[str, Any]) -> dict[str, Any]:
    return {"workers": [attrs.asdict(w) for w in ops.workers(caller)]}


def _letter_row(letter: DeadLetter) -> dict[str, Any]:
    """A dead letter in a list: its detail left out, its body cut (``dlq.show`` has them whole).

    A dead task's ``type`` is read from its whole body (the task's spec) first, so a list can
    say which tasks died without a ``dlq.show`` per row; null for other kinds.
    """
    return {**attrs.asdict(letter), "detail": None, "body": letter.body[:200], "type": _task_type(letter)}


def _task_type(letter: DeadLetter) -> str | None:
    if letter.kind != "task":
        return None
    try:
        spec = parse_json(letter.body)
    except ValueError:
        return None
    task_type = spec.get("type") if isinstance(spec, dict) else None
    return task_type if isinstance(task_type, str) else None


async def _dlq_list(ops: Operations, caller: Caller, request: dict[str, Any]) -> dict[str, Any]:
    page = await ops.dead_letters(
        caller, field(request, "kind", str, None), _limit(request), seq_field(request, "after", 0)
    )
    return {"dead_letters": [_letter_row(d) for d in page.letters], "next_after": page.next_after}


async def _dlq_show(ops: Operations, caller: Caller, request: dict[str, Any]) -> dict[str, Any]:
    return {"dead_letter": attrs.asdict(await ops.dead_letter(caller, seq_field(request, "id", ...)))}


async def _dlq_replay(ops: Operations, caller: Caller, request: dict[str, Any]) -> dict[str, Any]:
    if field(request, "all", bool, False):
        return {"replayed": await ops.replay(caller, None)}
    return {"replayed": await ops.replay(caller, [seq_field(request, "id", ...)])}


async def _dlq_purge(ops: Operations, caller: Caller, request: dict[str, Any]) -> dict[str, Any]:
    if field(request, "yes", bool, False) is not True:
        raise OpError("bad_request", 'purge deletes every dead letter: send "yes": true')
    return {"purged": await ops.purge(caller)}


async def _drain(ops: Operations, caller: Caller, request: dict[str, Any]) -> dict[str, Any]:
    ops.drain(caller, f"drain command ({caller.ingress})")
    return {"draining": True}


async def _reload(ops: Operations, caller: Caller, request: dict[str, Any]) -> dict[str, Any]:
    return await ops.reload(caller)


#: DESIGN §4.9, fixed names (the HTTP API's paths are ``/api/<name>``)
COMMANDS: dict[str, Command] = {
    "status": _status,
    "publish": _publish,
    "history": _history,
    "dispatch": _dispatch,
    "task": _task,
    "tasks": _tasks,
    "workers": _workers,
    "dlq.list": _dlq_list,
    "dlq.show": _dlq_show,
    "dlq.replay": _dlq_replay,
    "dlq.purge": _dlq_purge,
    "drain": _drain,
    "reload": _reload,
}
