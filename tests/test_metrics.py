"""/healthz, /readyz and /metrics of a real daemon, scraped over real HTTP while it works."""

from __future__ import annotations

import re
from pathlib import Path

import trio

from aivad.config import parse_config
from aivad.daemon import Endpoints, run_daemon
from tests.conftest import test_config
from tests.wsclient import connect


async def http_get(port: int, path: str) -> tuple[int, str]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    if b"chunked" in head.lower():
        decoded, rest = b"", body
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line, 16)
            if size == 0:
                break
            decoded, rest = decoded + rest[:size], rest[size + 2 :]
        body = decoded
    return int(head.split()[1]), body.decode()


def sample(text: str, name: str, labels: str = "") -> float:
    match = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    assert match, f"{name}{labels} not in metrics"
    return float(match.group(1))


async def test_metrics_move_with_load(nursery: trio.Nursery, tmp_dir: Path) -> None:
    cfg = parse_config(test_config(tmp_dir, http={"enabled": True, "port": 0}))
    endpoints: Endpoints = await nursery.start(lambda task_status: run_daemon(cfg, handle_signals=False,
                                                                              task_status=task_status))
    assert endpoints.http_port
    with trio.fail_after(20):
        assert (await http_get(endpoints.http_port, "/healthz"))[0] == 200
        status, _ = await http_get(endpoints.http_port, "/readyz")
        assert status == 200
        status, before = await http_get(endpoints.http_port, "/metrics")
        assert status == 200
        assert sample(before, "aivad_messages_ingested_total", '{ingress="websocket"}') == 0
        assert sample(before, "aivad_websocket_connections") == 0
        for state in ("queued", "dispatched", "running", "retrying", "completed", "dead"):
            sample(before, "aivad_tasks", f'{{state="{state}"}}')
        async with connect(endpoints.ws_url) as sub, connect(endpoints.ws_url) as pub:
            await sub.ok({"op": "subscribe", "pattern": "load.#"})
            for i in range(50):
                await pub.publish("load.x", i)
            await sub.messages(50)
            _, during = await http_get(endpoints.http_port, "/metrics")
            assert sample(during, "aivad_messages_ingested_total", '{ingress="websocket"}') == 50
            assert sample(during, "aivad_deliveries_total") == 50
            assert sample(during, "aivad_websocket_connections") == 2
            assert sample(during, "aivad_websocket_subscriptions") == 1
            assert sample(during, "aivad_store_last_seq") == 50
            assert sample(during, "aivad_store_commit_seconds_count") >= 1
            assert sample(during, "aivad_event_loop_lag_seconds") >= 0
        assert (await http_get(endpoints.http_port, "/nope"))[0] == 404
