"""Pins the trio-websocket internals aivad/websocket.py relies on.

The sender writes pre-built frames with one ``send_all`` under trio-websocket's
own write lock (checking ``_close_reason`` inside it, so no data frame follows a
close frame); the reader takes frames already read ahead from ``_recv_channel``;
reload sets ``_max_message_size``; the server side of a connection is built
from ``WebSocketConnection(stream, WSConnection(SERVER), …)``, its
``_reader_task`` and ``_get_request`` (``WebSocketService._serve_connection``);
``trim_connection`` drops what wsproto keeps of a finished handshake
(``handshake._h11_connection``, ``_initiating_request``, ``_events``), swaps
the wsproto connection's ``_events`` deque for a list, and shares one set
event for trio-websocket's ``_open_handshake`` and
``_for_testing_peer_closed_connection``, which a server connection never awaits.
If an upgrade renames any of these, this fails before anything subtle breaks.

It also pins what an idle connection holds (docs/performance.md, idle memory):
a connection that only subscribes has three tasks and none of the structures
made at a first publish, waiting op or auth deadline. Never bytes: those are
measured by bench/fanout.py --idle and bench/idle_profile.py.
"""

from __future__ import annotations

import gc
import importlib.metadata
import inspect
from collections import Counter, deque
from contextlib import AsyncExitStack

import pytest
import trio
from trio_websocket import WebSocketConnection, open_websocket_url
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Request, TextMessage

import aivad.websocket
from aivad.websocket import Connection, trim_connection
from tests.conftest import InProcessDaemon
from tests.wsclient import connect


def test_version_is_in_the_pinned_range() -> None:
    major, minor = (int(x) for x in importlib.metadata.version("trio-websocket").split(".")[:2])
    assert (major, minor) == (0, 12)


async def test_connection_and_server_attributes_exist(daemon: InProcessDaemon) -> None:
    with trio.fail_after(10):
        async with open_websocket_url(daemon.ws_url) as ws:
            for name in ("_stream", "_stream_lock", "_close_reason", "_recv_channel", "_max_message_size"):
                assert hasattr(ws, name), name
            assert isinstance(ws._stream_lock, trio.StrictFIFOLock)
            assert hasattr(ws._recv_channel, "receive_nowait")
            await ws.aclose()
    for name in ("_reader_task", "_get_request"):
        assert callable(getattr(WebSocketConnection, name, None)), name
    params = inspect.signature(WebSocketConnection).parameters
    assert {"stream", "ws_connection", "message_queue_size", "max_message_size"} <= set(params), params


def test_the_events_trim_connection_shares_are_never_awaited_by_a_server_connection() -> None:
    source = inspect.getsource(WebSocketConnection)
    for name in ("_open_handshake", "_for_testing_peer_closed_connection"):
        assert f"self.{name} = trio.Event()" in source, name
        assert f"{name}.wait" not in source, name
        assert f"{name}.set()" in source, name


def test_trim_connection_leaves_a_working_wsproto_connection() -> None:
    server = WSConnection(ConnectionType.SERVER)
    client = WSConnection(ConnectionType.CLIENT)
    server.receive_data(client.send(Request(host="localhost", target="/")))
    assert [type(e) for e in server.events()] == [Request]
    client.receive_data(server.send(AcceptConnection()))
    for name in ("_h11_connection", "_initiating_request", "_events"):
        assert hasattr(server.handshake, name), name
    assert server.connection is not None and isinstance(server.connection._events, deque)

    class Holder:
        _wsproto = server
        _open_handshake = _for_testing_peer_closed_connection = None

    trim_connection(Holder)  # type: ignore[arg-type]
    assert server.handshake._h11_connection is None and server.handshake._initiating_request is None
    server.receive_data(client.send(TextMessage(data="after")))
    assert [e.data for e in server.events() if isinstance(e, TextMessage)] == ["after"]
    client.receive_data(server.send(TextMessage(data="back")))
    assert [e.data for e in client.events() if isinstance(e, TextMessage)] == ["back"]
    server.receive_data(None)  # the peer vanished: wsproto queues an abnormal closure itself
    assert [(type(e), e.code) for e in server.events()] == [(CloseConnection, 1006)]
    assert list(server.events()) == []


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


async def test_an_idle_subscribed_connection_holds_no_task_of_its_own_but_the_reader_and_nothing_made_lazily(
    daemon: InProcessDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection that only subscribes: trio-websocket's reader (beside trio's handler task), and
    a sender only until it has been idle for a while; no replier, auth-deadline or waiting-op task;
    no channel, semaphore or event of the publish path; wsproto's handshake state released. A frame
    queued later starts a sender again."""
    monkeypatch.setattr(aivad.websocket, "IDLE_SENDER_S", 0.05)  # from the sweep after the current one
    n = 3
    with trio.fail_after(10):
        before = _websocket_tasks()  # the service's own
        async with AsyncExitStack() as stack:
            clients = [await stack.enter_async_context(connect(daemon.ws_url)) for _ in range(n)]
            for i, client in enumerate(clients):
                await client.ok({"op": "subscribe", "pattern": f"idle.c{i}.#"})
            read = "WebSocketService._serve_connection.<locals>.read"
            while (tasks := _websocket_tasks() - before) != {read: n}:
                assert set(tasks) <= {read, "Connection._send_loop"}
                await trio.sleep(0.02)  # the senders end once idle
            port = daemon.endpoints.ws_port  # (a test before may have left garbage of its own)
            conns = [o for o in gc.get_objects() if type(o) is Connection and o.service.port == port]  # (not proxies)
            assert len(conns) == n
            for conn in conns:
                assert not hasattr(conn, "__dict__")
                assert conn._pending is None and conn._inflight is None and conn._background is None
                assert conn._auth_deadline is None and conn._room is None and conn._writing is None
                assert conn._sender is None and not conn._sending and conn._outbox == []
                assert conn.ws._wsproto.handshake._h11_connection is None
                assert conn.ws._open_handshake is conns[0].ws._for_testing_peer_closed_connection  # shared
            # a frame starts a sender again; a publish starts the replier of its connection
            await clients[0].publish("idle.c1.x", {"n": 1})
            assert (await clients[1].next_message())["msg"]["payload"] == {"n": 1}
            await trio.testing.wait_all_tasks_blocked()
            assert (_websocket_tasks() - before)["Connection._reply_loop"] == 1
