"""The control edge: a unix socket speaking newline-delimited JSON (DESIGN §4.4).

The ``aivad`` CLI's peer. One request per line, ``{"cmd": …}``; one reply per
line, ``{"ok": true, …}`` or ``{"ok": false, "error": {"code", "message"}}``.
``tail`` streams one line per message until the client closes. Garbage gets an
error line and the connection stays usable; an over-long line gets
``too_large`` and the connection is closed (the rest of that line cannot be
told apart from the next request).
"""

from __future__ import annotations

import contextlib
import errno
import grp
import logging
import os
import socket as stdlib_socket
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import attrs
import trio

from .config import ControlConfig
from .protocol import (
    OpError,
    decode_request,
    dumps,
    field,
    parse_envelope,
    parse_history,
    parse_subscribe,
    request_ref,
)
from .router import Subscription
from .tasks import STATES, parse_task_spec

if TYPE_CHECKING:
    from .daemon import Daemon

__all__ = ["ControlService", "serve_control"]

log = logging.getLogger(__name__)

#: a command: (session, request) → the fields of its ok reply, or None if it answered itself
Command = Callable[["Session", dict[str, Any]], Awaitable[dict[str, Any] | None]]


def encode_line(pattern_json: str, msg_json: str) -> bytes:
    return f'{{"op":"message","pattern":{pattern_json},"msg":{msg_json}}}\n'.encode()


class Session:
    """One control client: reads request lines, writes reply lines."""

    encode = staticmethod(encode_line)

    def __init__(self, service: ControlService, stream: trio.SocketStream) -> None:
        self.service = service
        self.stream = stream
        self._buffer = bytearray()
        self._send_lock = trio.Lock()
        self._outbox, self._outbox_rx = trio.open_memory_channel[bytes](service.cfg.tail_buffer_lines)
        self._slow = False

    async def send_line(self, obj: Any) -> None:
        async with self._send_lock:
            await self.stream.send_all(dumps(obj).encode() + b"\n")

    async def receive_line(self) -> bytes | None:
        """The next line without its newline; None at end of stream; OpError when too long."""
        limit = self.service.cfg.max_line_bytes
        while True:
            end = self._buffer.find(b"\n")
            if end > limit:
                raise OpError("too_large", f"a request line is limited to {limit} bytes")
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 1]
                return line
            if len(self._buffer) > limit:
                raise OpError("too_large", f"a request line is limited to {limit} bytes")
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                return None
            self._buffer += chunk

    async def run(self) -> None:
        while True:
            try:
                line = await self.receive_line()
            except OpError as exc:
                await self.send_line({"ok": False, "error": {"code": exc.code, "message": exc.message}})
                return
            if line is None:
                return
            if not line.strip():
                continue
            await self._handle(line)

    async def _handle(self, line: bytes) -> None:
        ref: Any = None
        try:
            try:
                request = decode_request(line.decode("utf-8"))
            except UnicodeDecodeError:
                raise OpError("bad_json", "not valid UTF-8") from None
            ref = request_ref(request)
            name = field(request, "cmd", str)
            command = self.service.commands.get(name)
            if command is None:
                raise OpError("unknown_op", f"unknown command: {name[:64]}")
            reply = await command(self, request)
            if reply is not None:
                await self.send_line({"ok": True, **({"ref": ref} if ref is not None else {}), **reply})
        except OpError as exc:
            error = {"ok": False, "error": {"code": exc.code, "message": exc.message}}
            await self.send_line({**error, "ref": ref} if ref is not None else error)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise
        except Exception:  # the error boundary of one request: Cancelled passes
            log.exception("control command failed")
            await self.send_line({"ok": False, "error": {"code": "internal", "message": "internal error"}})

    # ---- streaming (tail): the Sink protocol of the router -------------------

    def offer(self, frame: bytes) -> bool:
        try:
            self._outbox.send_nowait(frame)
        except trio.WouldBlock:
            return False
        return True

    async def put(self, frame: bytes) -> None:
        await self._outbox.send(frame)

    def overflowed(self) -> None:
        self._slow = True

    def overtaken(self) -> None:
        self._slow = True
        with contextlib.suppress(trio.WouldBlock):
            self._outbox.send_nowait(b"")  # wakes an idle writer, which then reports and closes

    async def stream_subscription(self, sub: Subscription, since: int) -> None:
        """Replay and follow ``sub`` until the client closes its end (or reads too slowly)."""
        router = self.service.daemon.router
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._write_stream)
                nursery.start_soon(self._wait_for_close, nursery.cancel_scope)
                await router.follow(sub, since)
        except* (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the tail client hung up, or was too slow and has been closed
        finally:
            router.remove(sub)

    async def _write_stream(self) -> None:
        while not self._slow:
            lines = [await self._outbox_rx.receive()]
            while True:
                try:
                    lines.append(self._outbox_rx.receive_nowait())
                except trio.WouldBlock:
                    break
            async with self._send_lock:
                await self.stream.send_all(b"".join(lines))
        await self.send_line(
            {"ok": False, "error": {"code": "overloaded", "message": "tail fell behind; resume with since"}}
        )
        await self.stream.aclose()

    async def _wait_for_close(self, scope: trio.CancelScope) -> None:
        while await self.stream.receive_some(4096):
            pass
        scope.cancel()


# ---- commands -----------------------------------------------------------------


async def _cmd_status(session: Session, request: dict[str, Any]) -> dict[str, Any]:
    return {"status": session.service.daemon.status()}


async def _cmd_publish(session: Session, request: dict[str, Any]) -> dict[str, Any]:
    daemon = session.service.daemon
    if daemon.draining:
        raise OpError("overloaded", "aivad is draining")
    appended = await daemon.store.append(parse_envelope(request))
    daemon.ingest.count("control")
    return {"seq": appended.seq, "duplicate": appended.duplicate}


async def _cmd_history(session: Session, request: dict[str, Any]) -> dict[str, Any]:
    parsed = parse_history(request)
    history = await session.service.daemon.store.history(parsed.pattern, parsed.after, parsed.limit)
    return history.page(parsed.after)


async def _cmd_tail(session: Session, request: dict[str, Any]) -> None:
    parsed = parse_subscribe(request)
    resume = session.service.daemon.router.resume_point(parsed.since)
    reply: dict[str, Any] = {"ok": True, **resume.reply_fields(parsed.pattern)}
    if request.get("ref") is not None:
        reply["ref"] = request["ref"]
    await session.send_line(reply)
    await session.stream_subscription(Subscription(session, parsed.pattern), resume.replay_after)


async def _cmd_drain(session: Session, request: dict[str, Any]) -> dict[str, Any]:
    session.service.daemon.request_drain("aivad drain")
    return {"draining": True}


async def _cmd_reload(session: Session, request: dict[str, Any]) -> dict[str, Any]:
    outcome = await session.service.daemon.reload()
    if outcome.error is not None:
        raise OpError("bad_request", f"config refused, the old one stays: {outcome.error}")
    return {"applied": outcome.applied, "needs_restart": outcome.needs_restart}


async def _cmd_dispatch(session: Session, request: dict[str, Any]) -> dict[str, Any]:
    daemon = session.service.daemon
    task_id, duplicate = await daemon.dispatcher.submit(parse_task_spec(request, daemon.cfg.tasks))
    return {"task_id": task_id, "duplicate": duplicate}


async def _cmd_task(session: Session, request: dict[str, Any]) -> dict[str, Any]:
    view = await session.service.daemon.dispatcher.view(field(request, "task_id", str))
    if view is None:
        raise OpError("not_found", "no such task")
    return {"task": attrs.asdict(view)}


async def _cmd_tasks(session: Session, request: dict[str, Any]) -> dict[str, Any]:
    state = field(request, "state", str, None)
    if state is not None and state not in STATES:
        raise OpError("bad_request", f"state must be one of {', '.join(STATES)}")
    limit = field(request, "limit", int, 100)
    if not 1 <= limit <= 10_000:
        raise OpError("bad_request", "limit must be 1..10000")
    views = await session.service.daemon.dispatcher.views(state=state, limit=limit)
    return {"tasks": [{k: v for k, v in attrs.asdict(view).items() if k not in ("history", "spec")} for view in views]}


async def _cmd_workers(session: Session, request: dict[str, Any]) -> dict[str, Any]:
    return {"workers": [attrs.asdict(w) for w in session.service.daemon.dispatcher.worker_views()]}


async def _cmd_dlq(session: Session, request: dict[str, Any]) -> dict[str, Any]:
    """``dlq`` with ``action``: list, show (id), replay (id or all), purge (confirm: true)."""
    daemon = session.service.daemon
    action = field(request, "action", str)
    if action == "list":
        limit = field(request, "limit", int, 100)
        letters = await daemon.store.dead_letters(
            field(request, "kind", str, None), limit, field(request, "after", int, 0)
        )
        return {"dead_letters": [{**attrs.asdict(d), "detail": None, "body": d.body[:200]} for d in letters]}
    if action == "show":
        letter_id = field(request, "id", int)
        letters = await daemon.store.dead_letters(None, 1, letter_id - 1)
        if not letters or letters[0].id != letter_id:
            raise OpError("not_found", f"no dead letter {letter_id}")
        return {"dead_letter": attrs.asdict(letters[0])}
    if action == "replay":
        if request.get("all") is True:
            replayed, after = [], 0
            while letters := await daemon.store.dead_letters("task", 500, after):
                for letter in letters:
                    replayed.append(await daemon.dispatcher.replay(letter.id))
                after = letters[-1].id
            return {"replayed": replayed}
        return {"replayed": [await daemon.dispatcher.replay(field(request, "id", int))]}
    if action == "purge":
        if request.get("confirm") is not True:
            raise OpError("bad_request", "purge deletes every dead letter: send confirm: true")
        return {"purged": await daemon.store.purge_dead_letters()}
    raise OpError("bad_request", "action must be list, show, replay or purge")


COMMANDS: dict[str, Command] = {
    "dispatch": _cmd_dispatch,
    "task": _cmd_task,
    "tasks": _cmd_tasks,
    "workers": _cmd_workers,
    "dlq": _cmd_dlq,
    "status": _cmd_status,
    "publish": _cmd_publish,
    "history": _cmd_history,
    "tail": _cmd_tail,
    "drain": _cmd_drain,
    "reload": _cmd_reload,
}


class ControlService:
    def __init__(self, cfg: ControlConfig, daemon: Daemon, commands: dict[str, Command]) -> None:
        self.cfg = cfg
        self.daemon = daemon
        self.commands = commands
        self.sessions = 0
        self._accepting: trio.CancelScope | None = None

    async def handle(self, stream: trio.SocketStream) -> None:
        """One control client, behind its error boundary: a fault ends this session only."""
        self.sessions += 1
        try:
            await self.daemon.faults.isolated("control.session", "a control client", self._run_session, stream)
        finally:
            self.sessions -= 1
            await trio.aclose_forcefully(stream)

    async def _run_session(self, stream: trio.SocketStream) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await Session(self, stream).run()

    def drain(self) -> None:
        """Stop accepting new control connections (open sessions may finish)."""
        if self._accepting is not None:
            self._accepting.cancel()


def _claim_socket_path(cfg: ControlConfig) -> Path:
    """Create the socket's directory; remove a stale socket, refuse a live one (another daemon)."""
    path = Path(cfg.socket)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.is_socket() or path.exists():
        probe = stdlib_socket.socket(stdlib_socket.AF_UNIX)
        try:
            probe.connect(str(path))
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise
            path.unlink(missing_ok=True)  # a stale socket from a daemon that died
        else:
            raise OSError(errno.EADDRINUSE, f"another aivad is serving {path}")
        finally:
            probe.close()
    return path


async def _open_listener(cfg: ControlConfig) -> tuple[trio.SocketListener, Path]:
    path = _claim_socket_path(cfg)  # start-up only: a few local syscalls
    sock = trio.socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
    old_umask = os.umask(0o777 & ~cfg.mode)
    try:
        await sock.bind(str(path))
    finally:
        os.umask(old_umask)
    os.chmod(path, cfg.mode)
    if cfg.group:
        os.chown(path, -1, grp.getgrnam(cfg.group).gr_gid)
    sock.listen(128)
    return trio.SocketListener(sock), path


async def serve_control(
    cfg: ControlConfig,
    daemon: Daemon,
    commands: dict[str, Command],
    *,
    task_status: trio.TaskStatus[ControlService] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Answer control commands on a unix socket until cancelled.

    Returns: never. Resource handling: a stale socket file is replaced, a live
    one (another daemon) is an error; the file is removed on exit.
    Error handling: a failing command is answered with an error line; a broken
    client ends its own session only.
    """
    listener, path = await _open_listener(cfg)
    service = ControlService(cfg, daemon, commands)
    try:
        async with trio.open_nursery() as sessions:
            with trio.CancelScope() as accepting:
                service._accepting = accepting
                async with trio.open_nursery() as acceptor:
                    await acceptor.start(
                        partial(trio.serve_listeners, service.handle, [listener], handler_nursery=sessions)
                    )
                    log.info("control socket listening on %s", path)
                    task_status.started(service)
            await listener.aclose()
            await trio.sleep_forever()
    finally:
        path.unlink(missing_ok=True)
    raise AssertionError("unreachable")
