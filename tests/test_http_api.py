"""The HTTP API (DESIGN §4.9): POST /api/<command>, /client.js and the console's config, against a real daemon.

Test policy: an in-process daemon with ``[http] enabled`` on free ports, asked
with hand-written HTTP/1.1 over real TCP (what curl or a browser sends), so the
bytes on the wire are what is tested. The same requests go to the control
socket where the API promises the same replies. Hostile requests (garbage,
oversize, wrong types, wrong methods, stalls) end with the daemon still serving.
"""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path
from typing import Any

import trio

from aivad.auth import Rights, mint_token
from tests.conftest import InProcessDaemon, control_async, start_daemon
from tests.wsclient import connect

SECRET = "s" * 32


async def http(port: int, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None,
               ) -> tuple[int, dict[str, str], bytes]:
    """One request; the status, the headers (lower-case names) and the body."""
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(head.encode() + b"\r\n" + body)
            raw = b""
            while chunk := await stream.receive_some():
                raw += chunk
    top, _, payload = raw.partition(b"\r\n\r\n")
    status_line, *lines = top.decode("latin-1").split("\r\n")
    return int(status_line.split()[1]), {k.lower(): v.strip() for k, v in (x.split(":", 1) for x in lines)}, payload


async def api(port: int, command: str, request: Any = None, token: str | None = None) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {token}"} if token else {})
    body = b"" if request is None else json.dumps(request).encode()
    status, _, payload = await http(port, "POST", f"/api/{command}", body, headers)
    return status, json.loads(payload)


async def with_http(nursery: trio.Nursery, tmp_dir: Path, **sections: dict[str, Any]) -> InProcessDaemon:
    return await start_daemon(nursery, tmp_dir, http={"enabled": True, "port": 0, **sections.pop("http", {})},
                              **sections)


async def test_every_command_answers_as_the_control_socket_does(nursery: trio.Nursery, tmp_dir: Path) -> None:
    d = await with_http(nursery, tmp_dir)
    port = d.endpoints.http_port
    assert port is not None
    status, published = await api(port, "publish", {"type": "api.x", "payload": {"n": 1}, "message_id": "m-1"})
    assert (status, published) == (200, {"ok": True, "seq": 1, "duplicate": False})
    again = await control_async(d.control_path, {"cmd": "publish", "type": "api.x", "payload": 2, "message_id": "m-1"})
    assert again == {"ok": True, "seq": 1, "duplicate": True}
    _, by_api = await api(port, "history", {"pattern": "api.#"})
    by_control = await control_async(d.control_path, {"cmd": "history", "pattern": "api.#"})
    assert by_api == by_control and [m["payload"] for m in by_api["messages"]] == [{"n": 1}]
    status, dispatched = await api(port, "dispatch", {"type": "job.run", "payload": 1, "timeout": 0.05,
                                                      "retry_policy": {"max_attempts": 1}})
    assert status == 200 and dispatched["ok"] and dispatched["duplicate"] is False
    task_id = dispatched["task_id"]
    assert (await api(port, "task", {"task_id": task_id}))[1]["task"]["task_id"] == task_id
    assert (await api(port, "tasks", {"state": "queued"}))[1]["tasks"][0]["task_id"] == task_id
    assert (await api(port, "workers", {}))[1] == {"ok": True, "workers": []}
    status, state = await api(port, "status")  # an empty body is {}
    assert status == 200 and state["status"]["store"]["last_seq"] >= 2
    # a request with no worker, abandoned: a dead letter to show, replay and purge
    async with connect(d.ws_url) as c:
        await c.request({"op": "request", "type": "nobody.runs", "payload": 1, "timeout": 0.05})
    with trio.fail_after(10):
        while not (letters := (await api(port, "dlq.list", {}))[1]["dead_letters"]):
            await trio.sleep(0.05)
    letter_id = letters[0]["id"]
    assert (await api(port, "dlq.show", {"id": letter_id}))[1]["dead_letter"]["id"] == letter_id
    assert (await api(port, "dlq.purge", {}))[0] == 400  # without "yes": true
    assert len((await api(port, "dlq.replay", {"id": letter_id}))[1]["replayed"]) == 1
    assert (await api(port, "dlq.purge", {"yes": True}))[1] == {"ok": True, "purged": 0}
    assert (await api(port, "dlq.show", {"id": letter_id}))[0] == 404
    assert (await api(port, "drain", {}))[1] == {"ok": True, "draining": True}


async def test_errors_are_json_with_the_status_of_their_code(nursery: trio.Nursery, tmp_dir: Path) -> None:
    d = await with_http(nursery, tmp_dir, http={"max_body_bytes": 4096})
    port = d.endpoints.http_port
    assert port is not None
    cases: list[tuple[str, str, bytes, int, str | None]] = [
        ("POST", "/api/nope", b"{}", 404, "unknown_op"),
        ("POST", "/api/publish", b"{not json", 400, "bad_json"),
        ("POST", "/api/publish", b"[1,2]", 400, "bad_request"),
        ("POST", "/api/publish", b'{"type":"a.b"}', 400, "bad_request"),  # payload is required
        ("POST", "/api/publish", b'{"type":"a.b","payload":"\\ud800"}', 400, "bad_request"),
        ("POST", "/api/publish", b'\xff\xfe', 400, "bad_json"),
        ("POST", "/api/publish", b'{"type":"a.b","payload":{"x":NaN}}', 400, "bad_json"),  # not RFC 8259 JSON
        ("POST", "/api/history", b'{"pattern":"#","limit":5000}', 400, "bad_request"),
        ("POST", "/api/task", b'{"task_id":"nope"}', 404, "not_found"),
        ("POST", "/api/publish", b'{"type":"a.b","payload":"' + b"x" * 5000 + b'"}', 413, "too_large"),
        ("POST", "/api/" + "x" * 10_000, b"{}", 404, "unknown_op"),
        ("GET", "/api/status", b"", 405, None),
        ("POST", "/healthz", b"", 405, None),
        ("GET", "/nothing/here", b"", 404, None),
    ]
    for method, path, body, expected, code in cases:
        status, _, payload = await http(port, method, path, body)
        assert status == expected, (path[:40], body[:40], status, payload[:200])
        if code is not None:
            reply = json.loads(payload)
            assert reply["ok"] is False and reply["error"]["code"] == code and len(reply["error"]["message"]) < 200
    assert (await api(port, "publish", {"type": "still.serving", "payload": None}))[0] == 200
    _, _, metrics = await http(port, "GET", "/metrics", b"")
    for line in ('aivad_http_api_errors_total{code="too_large"} 1.0',
                 'aivad_http_api_errors_total{code="bad_json"} 3.0',
                 'aivad_http_api_errors_total{code="unknown_op"} 2.0'):
        assert line in metrics.decode(), line


async def test_tokens_and_rights_on_the_api(nursery: trio.Nursery, tmp_dir: Path) -> None:
    secret = tmp_dir / "jwt.secret"
    secret.write_text(SECRET)
    d = await with_http(nursery, tmp_dir, auth={"required": True, "hmac_secret_file": str(secret)})
    port = d.endpoints.http_port
    assert port is not None
    agent = mint_token(SECRET.encode(), sub="agent", rights=Rights(publish=("scan.*",), subscribe=("scan.#",)),
                       ttl_s=600)
    admin = mint_token(SECRET.encode(), sub="ops", rights=Rights(admin=True), ttl_s=600)
    expired = mint_token(SECRET.encode(), sub="agent", rights=Rights(admin=True), ttl_s=1, now=1_000_000)
    assert (await api(port, "publish", {"type": "scan.done", "payload": 1}))[0] == 401  # no token
    assert (await api(port, "publish", {"type": "scan.done", "payload": 1}, token="garbage"))[0] == 401
    assert (await api(port, "publish", {"type": "scan.done", "payload": 1}, token=expired))[0] == 401
    status, _, _ = await http(port, "POST", "/api/status", b"", {"Authorization": f"Basic {agent}"})
    assert status == 401
    assert (await api(port, "publish", {"type": "scan.done", "payload": 1}, token=agent))[0] == 200
    status, refused = await api(port, "publish", {"type": "other.thing", "payload": 1}, token=agent)
    assert (status, refused["error"]["code"]) == (403, "forbidden")
    assert (await api(port, "history", {"pattern": "scan.#"}, token=agent))[0] == 200
    assert (await api(port, "history", {"pattern": "#"}, token=agent))[0] == 403
    assert (await api(port, "status", {}, token=agent))[0] == 403  # admin commands need admin
    assert (await api(port, "dlq.list", {}, token=agent))[0] == 403
    status, state = await api(port, "status", {}, token=admin)
    assert status == 200 and state["status"]["store"]["last_seq"] == 1  # nothing refused was stored


async def test_the_rate_of_one_peer_is_bounded(nursery: trio.Nursery, tmp_dir: Path) -> None:
    d = await with_http(nursery, tmp_dir, limits={"publish_rate_per_s": 0.001, "publish_burst": 3})
    port = d.endpoints.http_port
    assert port is not None
    statuses = [(await api(port, "publish", {"type": "r.x", "payload": i}))[0] for i in range(5)]
    assert statuses == [200, 200, 200, 429, 429]


async def test_client_js_and_the_console_config(nursery: trio.Nursery, tmp_dir: Path) -> None:
    d = await with_http(nursery, tmp_dir)
    port = d.endpoints.http_port
    assert port is not None
    status, headers, body = await http(port, "GET", "/client.js")
    assert status == 200 and headers["content-type"].startswith("text/javascript")
    assert headers["access-control-allow-origin"] == "*" and b"export function connect" in body
    status, _, body = await http(port, "GET", "/console/config.json")
    config = json.loads(body)
    assert status == 200 and config == {"websocket_url": f"ws://127.0.0.1:{d.endpoints.ws_port}/",
                                        "auth_required": False}
    assert (await http(port, "GET", "/console/../aivad/__init__.py"))[0] == 404


async def test_a_peer_that_stalls_mid_request_does_not_hold_the_server(nursery: trio.Nursery, tmp_dir: Path) -> None:
    d = await with_http(nursery, tmp_dir, http={"read_timeout_s": 1.0})
    port = d.endpoints.http_port
    assert port is not None
    stalled = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
    try:
        for s in stalled:  # a body promised and never sent
            s.sendall(b"POST /api/publish HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        assert (await api(port, "publish", {"type": "ok.x", "payload": 1}))[0] == 200
        with trio.fail_after(10):
            for s in stalled:  # each is dropped after read_timeout_s
                s.settimeout(5)
                while await trio.to_thread.run_sync(s.recv, 4096):
                    pass
    finally:
        for s in stalled:
            s.close()


async def test_connections_over_the_limit_are_refused_and_counted(nursery: trio.Nursery, tmp_dir: Path) -> None:
    d = await with_http(nursery, tmp_dir, http={"max_connections_per_address": 1, "read_timeout_s": 1.0})
    port = d.endpoints.http_port
    assert port is not None
    with socket.create_connection(("127.0.0.1", port)):  # holds this address's one place
        with trio.fail_after(10):
            while (await control_async(d.control_path, {"cmd": "status"}))["status"]["http"]["connections"] < 1:
                await trio.sleep(0.02)
        status, _, body = await http(port, "GET", "/healthz")
        assert (status, body) == (429, b"aivad: too many connections from your address\n")
    http_status = (await control_async(d.control_path, {"cmd": "status"}))["status"]["http"]
    assert http_status["refused"] == {"per_address": 1}
    with trio.fail_after(10):  # a peer that sent nothing gives its place back at read_timeout_s
        while (response := await http(port, "GET", "/metrics"))[0] != 200:
            await trio.sleep(0.05)
    counted = re.search(rb'aivad_http_connections_refused_total\{reason="per_address"\} (\d+)\.0', response[2])
    assert counted and int(counted[1]) >= 1, response[2]  # (and the refusals while it waited)
