"""Pins the trio-websocket internals aivad/websocket.py relies on.

The sender writes pre-built frames with one ``send_all`` under trio-websocket's
own write lock (checking ``_close_reason`` inside it, so no data frame follows a
close frame); the reader takes frames already read ahead from ``_recv_channel``;
reload sets ``_max_message_size``; the server side of a connection is built
from ``WebSocketConnection(stream, WSConnection(SERVER), …)``, its
``_reader_task`` and ``_get_request`` (``WebSocketService._serve_connection``).
If an upgrade renames any of these, this fails before anything subtle breaks.
"""

from __future__ import annotations

import importlib.metadata
import inspect

import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from tests.conftest import InProcessDaemon


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
