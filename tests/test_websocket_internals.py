"""Pins the trio-websocket and wsproto internals aivad/wsserver.py relies on.

trio-websocket reads a connection's opening handshake: the server side is built from
``WebSocketConnection(stream, WSConnection(SERVER), …)``, its ``_reader_task`` runs until
``_get_request`` returns the request, and is then cancelled; the bytes that came right behind the
request are wsproto's ``handshake._h11_connection.trailing_data``; the request's ``Host`` is
``WebSocketRequest._event.host``. After the accept the connection is :class:`aivad.wsserver.ServerSocket`'s
alone. If an upgrade renames any of these, this fails before anything subtle breaks.

It also pins what an idle connection holds (docs/performance.md, idle memory):
a connection that only subscribes has no task of aivad's but trio's handler, and none of the
structures made at a first publish, waiting op or auth deadline. Never bytes: those are
measured by bench/fanout.py --idle and bench/idle_profile.py.
"""

from __future__ import annotations

import gc
import importlib.metadata
import inspect
from collections import Counter
from contextlib import AsyncExitStack

import pytest
import trio
from trio_websocket import WebSocketConnection, WebSocketRequest
from wsproto import ConnectionType, WSConnection
from wsproto.events import Request

import aivad.websocket
from aivad.websocket import Connection
from aivad.wsframes import OP_TEXT, encode_frame
from aivad.wsserver import request_host
from tests.conftest import InProcessDaemon
from tests.wsclient import connect


def test_versions_are_in_the_pinned_ranges() -> None:
    major, minor = (int(x) for x in importlib.metadata.version("trio-websocket").split(".")[:2])
    assert (major, minor) == (0, 12)
    assert importlib.metadata.version("wsproto").split(".")[0] == "1"


def test_the_handshake_reader_and_request_internals_exist() -> None:
    for name in ("_reader_task", "_get_request"):
        assert callable(getattr(WebSocketConnection, name, None)), name
    params = inspect.signature(WebSocketConnection).parameters
    assert {"stream", "ws_connection", "message_queue_size"} <= set(params), params
    assert "self._wsproto = ws_connection" in inspect.getsource(WebSocketConnection.__init__)
    assert "self._event = event" in inspect.getsource(WebSocketRequest.__init__)


def test_what_came_behind_the_request_is_the_h11_connections_trailing_data() -> None:
    """A client may send frames before it has read the 101: wsproto leaves them in h11's buffer."""
    server = WSConnection(ConnectionType.SERVER)
    client = WSConnection(ConnectionType.CLIENT)
    frame = encode_frame(OP_TEXT, b'{"op":"ping"}', mask=True)
    server.receive_data(client.send(Request(host="example.test:8765", target="/")) + frame)
    (request,) = list(server.events())
    assert isinstance(request, Request) and request.host == "example.test:8765"
    assert server.handshake._h11_connection.trailing_data[0] == frame
    assert request_host(WebSocketRequest(None, request)) == "example.test:8765"  # type: ignore[arg-type]


def _websocket_tasks() -> Counter[str]:
    """Live trio tasks whose coroutine is a function of aivad/websocket.py, by qualified name."""
    counts: Counter[str] = Counter()

    def walk(task: trio.lowlevel.Task) -> None:
        code = getattr(task.coro, "cr_code", None)
        if code is not None and code.co_filename == aivad.websocket.__file__:
            counts[code.co_qualname] += 1
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                walk(child)

    walk(trio.lowlevel.current_root_task())
    return counts


async def test_an_idle_subscribed_connection_holds_no_task_of_its_own_and_nothing_made_lazily(
    daemon: InProcessDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection that only subscribes: trio's handler task, which reads its frames, and a
    sender only until it has been idle for a while; no reader, replier, auth-deadline or waiting-op
    task; no channel, semaphore or event of the publish path. A frame queued later is written by the
    service's writer: no sender task is started for it."""
    monkeypatch.setattr(aivad.websocket, "IDLE_SENDER_S", 0.05)  # from the sweep after the current one
    n = 3
    with trio.fail_after(10):
        before = _websocket_tasks()  # the service's own
        async with AsyncExitStack() as stack:
            clients = [await stack.enter_async_context(connect(daemon.ws_url)) for _ in range(n)]
            for i, client in enumerate(clients):
                await client.ok({"op": "subscribe", "pattern": f"idle.c{i}.#"})
            while tasks := _websocket_tasks() - before:
                assert set(tasks) <= {"Connection._send_loop"}
                await trio.sleep(0.02)  # the senders end once idle
            port = daemon.endpoints.ws_port  # (a test before may have left garbage of its own)
            conns = [o for o in gc.get_objects() if type(o) is Connection and o.service.port == port]  # (not proxies)
            assert len(conns) == n
            for conn in conns:
                assert not hasattr(conn, "__dict__")
                assert conn._pending is None and conn._inflight is None and conn._background is None
                assert conn._auth_deadline is None and conn._room is None and conn._writing is None
                assert conn._sender is None and not conn._sending and conn._outbox == []
                assert conn.sock._ready == [] and conn.sock._finished is None and conn.sock.closed is None
            # the service's writer writes a frame (no sender task); a publish starts its connection's replier
            await clients[0].publish("idle.c1.x", {"n": 1})
            assert (await clients[1].next_message())["msg"]["payload"] == {"n": 1}
            await trio.testing.wait_all_tasks_blocked()
            assert _websocket_tasks() - before == Counter({"Connection._reply_loop": 1})


def _fail_once(monkeypatch: pytest.MonkeyPatch, method: str) -> list[Connection]:
    """Make ``Connection.<method>`` raise on its first call (a bug in the service's task that calls
    it for every connection); returns the connections it was called for."""
    calls: list[Connection] = []
    original = getattr(Connection, method)

    def failing_once(conn: Connection) -> None:
        calls.append(conn)
        if len(calls) == 1:
            raise RuntimeError(f"a bug in {method}")
        original(conn)

    monkeypatch.setattr(Connection, method, failing_once)
    return calls


async def test_a_failed_idle_sender_sweep_is_recorded_and_the_next_one_runs(
    daemon: InProcessDaemon, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(aivad.websocket, "IDLE_SENDER_S", 0.02)  # from the sweep after the current one
    sweeps = _fail_once(monkeypatch, "retire_if_idle")
    with trio.fail_after(10):
        async with connect(daemon.ws_url) as client:
            await client.ok({"op": "subscribe", "pattern": "sweep.#"})
            while len(sweeps) < 3:
                await trio.sleep(0.02)
            await client.publish("sweep.x", 1)  # the server serves on
            assert (await client.next_message())["msg"]["payload"] == 1
    assert "websocket.sweep ended by its error boundary" in caplog.text


async def test_a_failed_write_is_recorded_and_the_connections_sender_writes_the_frame(
    daemon: InProcessDaemon, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The service's writer is one task for every connection: one connection's failure there is
    recorded, and that connection's frames go out through its own sender task."""
    _fail_once(monkeypatch, "write_now")
    with trio.fail_after(10):
        async with connect(daemon.ws_url) as client:
            await client.ok({"op": "subscribe", "pattern": "writer.#"})  # its ok reply: the failed write
            await client.publish("writer.x", 1)
            assert (await client.next_message())["msg"]["payload"] == 1
    assert "websocket.write ended by its error boundary" in caplog.text
