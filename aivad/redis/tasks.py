"""The cluster's task book and dead-letter queue in Redis (DESIGN §5 "Tasks").

What lives in Redis (every key in the log's ``{log}`` slot, so one script may
touch them and the log together):

* ``task`` (hash task_id → record JSON: spec, state, attempts, history, result,
  error, owner) and ``task-v`` (hash task_id → version). Every change is a
  compare-and-set on the version (:data:`TASK_CHANGE_LUA`) that appends the
  task's events to the log in the same step — so of two nodes racing to end a
  task (its worker's node and a node that saw the first one die) exactly one
  wins, and the winner's ``task.completed`` / ``task.dead_lettered`` is in the
  history exactly when the end is in the book.
* ``task-open`` (sorted set task_id → created ms): the tasks that have not
  ended, which a starting node loads.
* ``task-running`` (hash task_id → node name): who runs an attempt now; a node
  whose heartbeat expired leaves its entries for another node to retry.
* ``task-ended`` (sorted set task_id → ended ms): ended records are kept up to
  ``[tasks] ended_kept``, the oldest dropped first.
* ``dlq`` (stream, entry ID ``<id>-0``, field ``d``): dead letters of every
  kind (tasks, poison AMQP deliveries, bad ingest entries), ids from ``meta``'s
  ``dlq`` counter. A dead task's letter is added by the change that ends it; a
  replay takes it in the change that queues the task again.

Why Redis and not RabbitMQ queues: the end of a task must be one atomic step
with its event in the cluster log, and only a script in the log's own Redis
gives that; a RabbitMQ ack and a Redis write cannot be one step.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import attrs
import cattrs

from aivad.protocol import OpError, parse_json
from aivad.store import DeadLetter, DeadLetterPage
from aivad.tasks import STATES, TaskSpec

from .client import RedisLogError, _int, _Script, _text
from .group_commit import GroupCommit
from .log import RedisLog
from .lua import DEAD_LETTER_ADD_LUA, TASK_CHANGE_LUA

__all__ = ["RedisDeadLetters", "RedisTaskBook", "TaskChange", "TaskRecord"]

log = logging.getLogger(__name__)
#: checks a record's spec field by field (a wrong type is an error, not a crash later)
_converter = cattrs.Converter(forbid_extra_keys=True)

_CHANGE = _Script(TASK_CHANGE_LUA)
_DEAD_LETTER_ADD = _Script(DEAD_LETTER_ADD_LUA)

#: how many entries one page of a scan reads (records, the running set, dead letters)
_PAGE = 500
#: stream pages one read of the dead-letter queue reads at most (a bound per request)
_PAGES_PER_READ = 20
#: the most task changes one script call carries (a call must not stall Redis)
_MAX_CHANGES = 200


@attrs.frozen
class TaskChange:
    """One compare-and-set of a task's record, with the events it appends (see TASK_CHANGE_LUA)."""

    task_id: str
    expected: int  # 0: a new task
    record: dict[str, Any]
    events: Sequence[tuple[str, str, str]] = ()
    open: str = "="  # + queued again / - ended / = unchanged
    owner: str = "="  # the node that runs it now, "" none, = unchanged
    letter: str = ""  # "+JSON" add a dead letter, "-ID" take one, "" neither


@attrs.frozen
class TaskRecord:
    """A task's record as read (checked: what another writer left in Redis is skipped, not trusted)."""

    version: int
    spec: TaskSpec
    state: str
    attempts: int
    history: list[dict[str, Any]]
    result: Any = None
    error: Any = None
    #: the node running its attempt now ("" none)
    owner: str = ""
    #: when a retrying task is due (wall clock, s)
    due_at: float = 0.0


def _parse_record(task_id: str, version: bytes, raw: bytes) -> TaskRecord:
    """The record of ``task_id``, checked; ValueError when it is not one aivad wrote."""
    try:
        obj = parse_json(raw)
        spec = _converter.structure(obj["spec"], TaskSpec)
        found = TaskRecord(_int(version), spec, str(obj["state"]), int(obj["attempts"]), list(obj["history"]),
                           obj.get("result"), obj.get("error"), str(obj.get("owner") or ""),
                           float(obj.get("due_at") or 0))
    except (ValueError, KeyError, TypeError, RedisLogError, cattrs.BaseValidationError) as exc:
        raise ValueError(f"{type(exc).__name__}: {exc}") from None
    if spec.task_id != task_id or found.state not in STATES or found.version < 1:
        raise ValueError("its id, state or version is not a task's")
    return found


class RedisTaskBook:
    """Reads and changes of the task book; every change goes through the one CAS script.

    Changes are group-committed as the log's appends are: concurrent callers'
    changes (claims of one pump pass, the ends of attempts that finished
    together) share one script call, one call in flight per book.
    """

    def __init__(self, redis_log: RedisLog, ended_kept: int, letters_kept: Callable[[], int]) -> None:
        self._log = redis_log
        key = redis_log.settings.key
        self._change_keys = [*redis_log._log_keys, key("task"), key("task-v"), key("task-open"),
                             key("task-running"), key("task-ended"), key("dlq")]
        self._records, self._versions, self._open, self._running, self._ended = self._change_keys[3:8]
        self.ended_kept = ended_kept
        #: ``[store] dead_letters_kept``, read at each call (a reload changes it)
        self._letters_kept = letters_kept
        self._changes = GroupCommit[TaskChange, int]("task change", self._send, max_items=_MAX_CHANGES)
        #: records skipped because they were not aivad's (another writer, a garbled value)
        self.bad_records = 0

    async def change(self, changes: Sequence[TaskChange]) -> list[int]:
        """Apply ``changes`` in order; per change its new version, or -current when the CAS failed.

        One call's changes are sent in one script call (with other callers' waiting ones, up to
        ``_MAX_CHANGES``: :class:`~aivad.redis.group_commit.GroupCommit`).
        """
        return await self._changes.submit(changes, whole=True)

    async def _send(self, changes: Sequence[TaskChange]) -> list[int]:
        redis_log = self._log
        args: list[str | bytes | int] = [redis_log.epoch, redis_log.last_seq, self.ended_kept, self._letters_kept()]
        for c in changes:
            group = c.record["spec"].get("group_id")
            args += [c.task_id, str(c.expected) if c.expected else "", _dumps(c.record), c.open, c.owner,
                     c.letter, self._group_key(group) if group and c.open == "+" else "", len(c.events)]
            for row in c.events:
                args += row
        with redis_log._guard("task change"), redis_log.op_deadline():
            reply = await _CHANGE(redis_log.client, self._change_keys, args)
        return [int(v) for v in reply]

    async def records(self, task_ids: Sequence[str]) -> dict[str, TaskRecord]:
        """The records of the known ones among ``task_ids``."""
        found: dict[str, TaskRecord] = {}
        redis_log = self._log
        for start in range(0, len(task_ids), _PAGE):
            chunk = list(task_ids[start:start + _PAGE])
            with redis_log._guard("task records"), redis_log.op_deadline():
                async with redis_log.client.pipeline(transaction=True) as p:
                    versions = p.hmget(self._versions, chunk)
                    records = p.hmget(self._records, chunk)
                versions_, records_ = await versions, await records
            for task_id, version, record in zip(chunk, versions_, records_, strict=True):
                if version is None or record is None:
                    continue
                try:
                    found[task_id] = _parse_record(task_id, version, record)
                except ValueError as exc:  # written by someone else: that task is unknown here
                    self.bad_records += 1
                    log.warning("redis: skipped the record of task %.64r: not aivad's (%s)", task_id, exc)
        return found

    def _group_key(self, group_id: str) -> str:
        return self._log.settings.key(f"task-group:{group_id}")

    async def group_ids(self, group_id: str, limit: int) -> list[str]:
        """The tasks of a group, in the order they were queued (at most ``limit``)."""
        redis_log = self._log
        with redis_log._guard("group tasks"), redis_log.op_deadline():
            ids = await redis_log.client.zrange(self._group_key(group_id), 0, limit - 1)
        return [_text(i) for i in ids]

    async def ended_ids(self, limit: int) -> list[str]:
        """The tasks that ended, newest first (at most ``limit``)."""
        redis_log = self._log
        with redis_log._guard("ended tasks"), redis_log.op_deadline():
            ids = await redis_log.client.zrange(self._ended, 0, limit - 1, rev=True)
        return [_text(i) for i in ids]

    async def open_ids(self, limit: int) -> list[str]:
        """The tasks not ended, oldest first (at most ``limit``)."""
        redis_log = self._log
        with redis_log._guard("open tasks"), redis_log.op_deadline():
            ids = await redis_log.client.zrange(self._open, 0, limit - 1)
        return [_text(i) for i in ids]

    async def running(self) -> dict[str, str]:
        """task_id → the node running its attempt now."""
        redis_log = self._log
        with redis_log._guard("running tasks"), redis_log.op_deadline():
            found = await redis_log.client.hgetall(self._running)
        return {_text(k): _text(v) for k, v in found.items()}


class RedisDeadLetters:
    """The cluster's dead-letter queue, with the embedded store's shape (``aivad.ops.DeadLetterBook``).

    Redis unreachable is ``OpError("overloaded")``, as a failed commit of the store is an OpError.
    """

    def __init__(self, redis_log: RedisLog, letters_kept: Callable[[], int]) -> None:
        self._log = redis_log
        #: ``[store] dead_letters_kept``, read at each add (a reload changes it)
        self._letters_kept = letters_kept
        self._keys = [redis_log._log_keys[0], redis_log.settings.key("dlq")]
        self._stream = self._keys[1]

    @contextlib.contextmanager
    def _call(self, what: str) -> Iterator[None]:
        try:
            with self._log._guard(what), self._log.op_deadline():
                yield
        except RedisLogError as exc:
            raise OpError("overloaded", f"the dead-letter queue (Redis) is unreachable now: {exc}") from None

    async def add_dead_letter(self, kind: str, reason: str, body: str, detail: dict[str, Any]) -> int:
        with self._call("dead letter"):
            return int(await _DEAD_LETTER_ADD(self._log.client, self._keys,
                                              [letter_json(kind, reason, body, detail), self._letters_kept()]))

    async def dead_letters(self, kind: str | None = None, limit: int = 100, after_id: int = 0) -> DeadLetterPage:
        """Up to ``limit`` letters after ``after_id`` (of ``kind``), reading at most ``_PAGES_PER_READ``
        pages of the stream: a read filtered by kind that stops there says where to go on."""
        found: list[DeadLetter] = []
        after = after_id
        for _ in range(_PAGES_PER_READ):
            with self._call("dead letters"):
                entries = await self._log.client.xrange(self._stream, f"{after + 1}-0", "+", count=_PAGE)
            for entry in entries:
                after = _int(_text(entry.identifier).partition("-")[0])
                letter = _letter(after, entry.field_values)
                if letter is not None and (kind is None or letter.kind == kind):
                    found.append(letter)
                    if len(found) == limit:
                        return DeadLetterPage(found, after)
            if len(entries) < _PAGE:
                return DeadLetterPage(found, None)
        return DeadLetterPage(found, after)

    async def purge_dead_letters(self) -> int:
        with self._call("purge dead letters"):
            async with self._log.client.pipeline(transaction=True) as p:
                count = p.xlen(self._stream)
                p.delete([self._stream])
            return int(await count)


def letter_json(kind: str, reason: str, body: str, detail: dict[str, Any]) -> str:
    return _dumps({"kind": kind, "reason": reason, "created_at": time.time(), "body": body, "detail": detail})


def _letter(letter_id: int, fields: dict[Any, Any]) -> DeadLetter | None:
    try:
        obj = parse_json(fields[b"d"])
        return DeadLetter(letter_id, str(obj["kind"]), str(obj["reason"]), float(obj["created_at"]),
                          str(obj["body"]), dict(obj["detail"]))
    except (KeyError, ValueError, TypeError):
        return None  # not written by aivad: not a letter


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


