"""Pins the trio-websocket internals aivad/websocket.py relies on.

The sender writes pre-built frames with one ``send_all`` under trio-websocket's
own write lock (checking ``_close_reason`` inside it, so no data frame follows a
close frame); the reader takes frames already read ahead from ``_recv_channel``;
reload sets ``_max_message_size``; the server side of a connection is built
from ``WebSocketConnection(stream, WSConnection(SERVER), …)``, its
``_reader_task`` and ``_get_request`` (``WebSocketService._serve_connection``);
``release_handshake`` drops what wsproto keeps of a finished handshake
(``handshake._h11_connection``, ``_initiating_request``, ``_events``).
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
from collections import Counter
from contextlib import AsyncExitStack

import trio
from trio_websocket import WebSocketConnection, open_websocket_url
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request, TextMessage

import aivad.websocket
from aivad.websocket import Connection, release_handshake
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


def test_release_handshake_leaves_a_working_wsproto_connection() -> None:
    server = WSConnection(ConnectionType.SERVER)
    client = WSConnection(ConnectionType.CLIENT)
    server.receive_data(client.send(Request(host="localhost", target="/")))
    assert [type(e) for e in server.events()] == [Request]
    client.receive_data(server.send(AcceptConnection()))
    for name in ("_h11_connection", "_initiating_request", "_events"):
        assert hasattr(server.handshake, name), name

    class Holder:
        _wsproto = server

    release_handshake(Holder)  # type: ignore[arg-type]
    assert server.handshake._h11_connection is None and server.handshake._initiating_request is None
    server.receive_data(client.send(TextMessage(data="after")))
    assert [e.data for e in server.events() if isinstance(e, TextMessage)] == ["after"]
    client.receive_data(server.send(TextMessage(data="back")))
    assert [e.data for e in client.events() if isinstance(e, TextMessage)] == ["back"]


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


async def test_an_idle_subscribed_connection_holds_two_tasks_of_its_own_and_nothing_made_lazily(
    daemon: InProcessDaemon,
) -> None:
    """A connection that only subscribes: trio-websocket's reader and the sender (beside trio's
    handler task); no replier, auth-deadline or waiting-op task; no channel, semaphore or event
    of the publish path; wsproto's handshake state released."""
    n = 3
    with trio.fail_after(10):
        before = _websocket_tasks()  # the service's own
        async with AsyncExitStack() as stack:
            clients = [await stack.enter_async_context(connect(daemon.ws_url)) for _ in range(n)]
            for i, client in enumerate(clients):
                await client.ok({"op": "subscribe", "pattern": f"idle.c{i}.#"})
            await trio.testing.wait_all_tasks_blocked()
            assert _websocket_tasks() - before == {"WebSocketService._serve_handshake.<locals>.read": n,
                                                   "Connection._send_loop": n}
            port = daemon.endpoints.ws_port  # (a test before may have left garbage of its own)
            conns = [o for o in gc.get_objects() if type(o) is Connection and o.service.port == port]  # (not proxies)
            assert len(conns) == n
            for conn in conns:
                assert not hasattr(conn, "__dict__")
                assert conn._pending is None and conn._inflight is None and conn._background is None
                assert conn._auth_deadline is None and conn._room is None and conn._writing is None
                assert conn._sender is not None  # parked, waiting for a frame
                assert conn.ws._wsproto.handshake._h11_connection is None
            # the check can see a lazily made task: a publish starts the replier of its connection
            await clients[0].publish("idle.c1.x", {})
            await trio.testing.wait_all_tasks_blocked()
            assert (_websocket_tasks() - before)["Connection._reply_loop"] == 1
