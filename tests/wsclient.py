"""A deliberately plain test client on trio-websocket: send frames, read frames, match refs."""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio
from trio_websocket import WebSocketConnection, open_websocket_url

_refs = itertools.count(1)


class TestClient:
    __test__ = False

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self.pushes: list[dict[str, Any]] = []  # message frames read while waiting for replies

    async def send(self, frame: dict[str, Any] | str | bytes) -> None:
        await self.ws.send_message(frame if isinstance(frame, (str, bytes)) else json.dumps(frame))

    async def receive(self) -> dict[str, Any]:
        return dict(json.loads(await self.ws.get_message()))

    async def request(self, frame: dict[str, Any]) -> dict[str, Any]:
        """Send with a fresh ref and return the reply with that ref (pushes are kept aside)."""
        ref = frame.setdefault("ref", next(_refs))
        await self.send(frame)
        while True:
            reply = await self.receive()
            if reply.get("op") in ("ok", "error", "pong") and reply.get("ref") == ref:
                return reply
            self.pushes.append(reply)

    async def ok(self, frame: dict[str, Any]) -> dict[str, Any]:
        reply = await self.request(frame)
        assert reply["op"] in ("ok", "pong"), reply
        return reply

    async def publish(self, type: str, payload: Any = None, **fields: Any) -> dict[str, Any]:
        return await self.ok({"op": "publish", "type": type, "payload": payload, **fields})

    async def next_message(self) -> dict[str, Any]:
        """The next push frame (``op: message``), from those kept aside first."""
        if self.pushes:
            return self.pushes.pop(0)
        while True:
            frame = await self.receive()
            if frame.get("op") == "message":
                return frame

    async def messages(self, n: int) -> list[dict[str, Any]]:
        return [await self.next_message() for _ in range(n)]


@asynccontextmanager
async def connect(url: str, **kwargs: Any) -> AsyncIterator[TestClient]:
    stream = None
    try:
        async with open_websocket_url(url, **kwargs) as ws:
            stream = ws._stream
            yield TestClient(ws)
    finally:
        # trio-websocket's client leaves its TCP stream open when the peer resets it (a slow
        # consumer closed with 4008, a node killed): close it, or its GC warns
        if stream is not None:
            await trio.aclose_forcefully(stream)


async def no_more_messages(client: TestClient, wait_s: float = 0.2) -> bool:
    """True when no push arrives within ``wait_s`` (ping round trip first, so nothing is in flight)."""
    await client.ok({"op": "ping"})
    if any(p.get("op") == "message" for p in client.pushes):
        return False
    with trio.move_on_after(wait_s):
        await client.next_message()
        return False
    return True
