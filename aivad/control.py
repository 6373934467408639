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
from functools import partial
from pathlib import Path
from typing import Any, NoReturn

import trio

from .auth import EVERYTHING
from .boundary import Faults
from .commands import COMMANDS
from .config import ControlConfig
from .ops import Caller, Operations
from .protocol import OpError, decode_request, dumps, field, parse_subscribe, request_ref
from .router import Subscription

__all__ = ["ControlService", "serve_control"]

log = logging.getLogger(__name__)

#: the control socket is local and fully trusted (mode 0600; DESIGN §4.8)
TRUSTED = Caller(EVERYTHING, "control")


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
            if name == "tail":
                await self.tail(request)
                return
            command = COMMANDS.get(name)
            if command is None:
                raise OpError("unknown_op", f"unknown command: {name[:64]}")
            reply = await command(self.service.ops, TRUSTED, request)
            await self.send_line({"ok": True, **({"ref": ref} if ref is not None else {}), **reply})
        except OpError as exc:
            error = {"ok": False, "error": {"code": exc.code, "message": exc.message}}
            ref = ref if ref is not None else exc.ref
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

    async def tail(self, request: dict[str, Any]) -> None:
        """``tail``: the subscribe reply line, then one line per message until the client closes
        its end (or reads too slowly: then an ``overloaded`` line, and the connection closes)."""
        parsed = parse_subscribe(request)
        ops = self.service.ops
        resume = ops.subscribe(TRUSTED, parsed.pattern, parsed.since, parsed.epoch)
        reply: dict[str, Any] = {"ok": True, **resume.reply_fields(parsed.pattern)}
        if request.get("ref") is not None:
            reply["ref"] = request["ref"]
        await self.send_line(reply)
        sub = Subscription(self, parsed.pattern)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._write_stream)
                nursery.start_soon(self._wait_for_close, nursery.cancel_scope)
                await ops.follow(sub, resume)
        except* (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the tail client hung up, or was too slow and has been closed
        finally:
            ops.unsubscribe(sub)

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


class ControlService:
    def __init__(self, cfg: ControlConfig, ops: Operations, faults: Faults) -> None:
        self.cfg = cfg
        self.ops = ops
        self.faults = faults
        self.sessions = 0
        self._accepting: trio.CancelScope | None = None

    async def handle(self, stream: trio.SocketStream) -> None:
        """One control client, behind its error boundary: a fault ends this session only."""
        self.sessions += 1
        try:
            await self.faults.isolated("control.session", "a control client", self._run_session, stream)
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
    ops: Operations,
    faults: Faults,
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
    service = ControlService(cfg, ops, faults)
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
