"""Minimal reproductions of what the protocol fuzzer (tests/fuzz.py) found, against a real ``aivad serve``.

Test policy for this module: each test is the smallest input that showed the
fault — a real subprocess, raw sockets (tests/hostile.py), real resets — and
ends by showing the daemon still serves. The docstring of each says what the
daemon did wrong when it was found.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import resource
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import DaemonProcess, poll_until
from tests.hostile import OP_CLOSE, OP_TEXT, RawClient, encode_frame, handshake_request, read_http_head, reset

#: a JSON string holding a lone surrogate: valid JSON, but no UTF-8 encoder can write it back
SURROGATE = "\\ud800"


def replies(client: RawClient, n: int, timeout_s: float = 10.0) -> list[dict[str, Any]]:
    """The next ``n`` text frames as JSON; fewer if the daemon closes the connection first."""
    out: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout_s
    while len(out) < n and time.monotonic() < deadline and client.closed is None and not client.eof:
        out += [json.loads(payload) for opcode, payload in client.receive(0.2) if opcode == OP_TEXT]
    return out


def ask(client: RawClient, text: str) -> dict[str, Any]:
    """Send one raw text frame, return the one reply (fails if the connection ends instead)."""
    client.send_text(text.encode())
    got = replies(client, 1)
    assert got, f"no reply to {text[:100]!r}; the daemon closed with {client.closed} (eof {client.eof})"
    return got[0]


def assert_serves(daemon: DaemonProcess) -> None:
    """The daemon runs and a fresh client is answered (else: its exit status and its log)."""
    assert daemon.proc is not None
    try:
        client = RawClient.connect("127.0.0.1", daemon.ws_port)
    except OSError as exc:
        with contextlib.suppress(Exception):
            daemon.proc.wait(5)
        raise AssertionError(f"{exc!r}; the daemon exited with {daemon.proc.poll()}:\n{daemon.log()[-3000:]}") from None
    try:
        assert ask(client, '{"op":"ping","ref":"alive"}') == {"op": "pong", "ref": "alive"}
        assert ask(client, '{"op":"publish","type":"probe.alive","payload":1,"ref":2}')["op"] == "ok"
    finally:
        client.close()


@pytest.mark.parametrize(
    "request_head", [b"not http\r\n\r\n", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"], ids=["garbage", "get-no-upgrade"]
)
def test_a_refused_handshake_whose_peer_resets_does_not_stop_the_daemon(
    daemon_proc: DaemonProcess, request_head: bytes
) -> None:
    """Found before the error boundaries landed: trio-websocket answers a request it cannot
    upgrade with an HTTP error; when the peer has already reset, that write raised
    ConnectionClosed out of the server's own reader task and the daemon exited 1.
    A different path from a reset after a complete upgrade (test_hardening.py)."""
    for _ in range(5):
        with socket.create_connection(("127.0.0.1", daemon_proc.ws_port), timeout=5) as sock:
            sock.sendall(request_head)
            reset(sock)
    time.sleep(0.3)
    assert_serves(daemon_proc)


@pytest.mark.parametrize(
    "frame",
    [f'{{"op":"ping","ref":"{SURROGATE}"}}', f'{{"op":"subscribe","pattern":"#","ref":"{SURROGATE}"}}',
     f'{{"op":"{SURROGATE}","ref":1}}'],
    ids=["ref-of-ping", "ref-of-subscribe", "op"],
)
def test_a_lone_surrogate_in_ref_or_op_gets_an_answer_and_the_connection_stays_open(
    daemon_proc: DaemonProcess, frame: str
) -> None:
    """The reply echoes the ref (or the op, in unknown_op's message); encoding it as UTF-8
    raised, the error frame for that raised again, and the connection's error boundary
    closed it with 1000: no reply, and a bad frame ended the connection (DESIGN §4.3:
    "a bad frame gets an error and the connection stays open")."""
    client = RawClient.connect("127.0.0.1", daemon_proc.ws_port)
    try:
        reply = ask(client, frame)
        assert reply["op"] in ("error", "pong", "ok"), reply
        assert ask(client, '{"op":"ping","ref":"next"}') == {"op": "pong", "ref": "next"}
    finally:
        client.close()
    assert_serves(daemon_proc)


def test_a_publish_with_a_lone_surrogate_does_not_fail_another_clients_publishes(daemon_proc: DaemonProcess) -> None:
    """The store's commit raised UnicodeEncodeError for the whole group commit: every publish
    of other clients that shared the batch was answered ``internal`` (and the store was
    reported failing). The bad publish must be refused (``bad_request``) or stored, alone."""
    good = RawClient.connect("127.0.0.1", daemon_proc.ws_port)
    bad = RawClient.connect("127.0.0.1", daemon_proc.ws_port)
    try:
        frames = [encode_frame(OP_TEXT, json.dumps({"op": "publish", "type": "ok.t", "payload": i, "ref": i}).encode())
                  for i in range(200)]
        good.send(b"".join(frames[:100]))
        bad.send_text(f'{{"op":"publish","type":"bad.t","payload":"{SURROGATE}","ref":"bad"}}'.encode())
        good.send(b"".join(frames[100:]))
        answers = replies(good, 200)
        assert [a["op"] for a in answers] == ["ok"] * 200, [a for a in answers if a["op"] != "ok"][:3]
        (answer,) = replies(bad, 1)
        assert answer["op"] == "ok" or answer["code"] == "bad_request", answer
    finally:
        good.close()
        bad.close()
    assert daemon_proc.control({"cmd": "status"})["status"]["ready"] is True
    assert_serves(daemon_proc)


@pytest.mark.parametrize(
    "frame",
    [
        f'{{"op":"publish","type":"a","payload":1,"message_id":"{SURROGATE}","ref":1}}',
        f'{{"op":"publish","type":"a","payload":1,"metadata":{{"{SURROGATE}":1}},"ref":1}}',
        f'{{"op":"dispatch","type":"a","payload":1,"group_id":"{SURROGATE}","ref":1}}',
        f'{{"op":"task.status","task_id":"{SURROGATE}","ref":1}}',
        f'{{"op":"collect","task_ids":["{SURROGATE}"],"timeout":0.1,"ref":1}}',
        f'{{"op":"collect","group_id":"{SURROGATE}","timeout":0.1,"ref":1}}',
        '{"op":"history","pattern":"#","after":1208925819614629174706176,"ref":1}',
        '{"op":"history","pattern":"a.#","after":9223372036854775808,"ref":1}',
    ],
    ids=["publish-message-id", "publish-metadata-key", "dispatch-group-id", "task-status-task-id",
         "collect-task-ids", "collect-group-id", "history-after-2**80", "history-after-2**63"],
)
def test_a_field_no_store_can_hold_is_a_bad_request_not_internal(daemon_proc: DaemonProcess, frame: str) -> None:
    """Each was answered ``internal`` (an exception the daemon did not expect: the store could
    not encode a lone surrogate, SQLite could not bind an integer over 2**63). A field the
    daemon cannot take is the peer's ``bad_request`` (or ``not_found`` for an id it cannot
    know, or a plain ``ok``): ``internal`` is reserved for the daemon's own faults and is
    what operators are paged for."""
    client = RawClient.connect("127.0.0.1", daemon_proc.ws_port)
    try:
        reply = ask(client, frame)
        assert reply["op"] == "ok" or reply["code"] in ("bad_request", "not_found"), reply
    finally:
        client.close()
    assert_serves(daemon_proc)


def test_the_daemon_answers_a_close_frame(daemon_proc: DaemonProcess) -> None:
    """A sanity check of the raw client these reproductions use: the closing handshake is answered."""
    client = RawClient.connect("127.0.0.1", daemon_proc.ws_port)
    client.send(encode_frame(OP_CLOSE, b"\x03\xe8"))
    replies(client, 1)
    assert client.closed is not None and client.closed.code == 1000
    client.close()


def test_a_subscriber_that_never_reads_and_never_closes_is_closed_and_released(tmp_dir: Path) -> None:
    """The daemon marked such a subscriber a slow consumer (its outbox overflowed) but kept the
    connection for ever: its sender stays blocked in ``send_all`` on a peer whose receive window
    is shut, so the 4008 close it would write is never reached. Each such peer holds a
    descriptor and its buffers until it goes away — under ``ulimit -n`` a few hundred of them
    stop the daemon from accepting anyone (found by tests/soak.py)."""
    daemon = DaemonProcess(tmp_dir, websocket={"send_buffer_frames": 16, "close_timeout_s": 2.0})
    daemon.start()
    stalled = socket.socket()
    try:
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window: shut after a few frames
        stalled.settimeout(10)
        stalled.connect(("127.0.0.1", daemon.ws_port))
        stalled.sendall(handshake_request("127.0.0.1", daemon.ws_port))
        read_http_head(stalled, 10)
        stalled.sendall(encode_frame(OP_TEXT, b'{"op":"subscribe","pattern":"#","ref":1}'))
        publisher = RawClient.connect("127.0.0.1", daemon.ws_port)
        for i in range(300):  # ~1.2 MB for the subscriber, which reads none of it; one at a time, so
            # the subscriber's sender is already blocked writing when its outbox overflows
            publisher.send_json({"op": "publish", "type": "flood", "payload": "x" * 4000, "ref": i})
            assert replies(publisher, 1)[0]["op"] == "ok"
        def websocket() -> dict[str, Any]:
            return dict(daemon.control({"cmd": "status"})["status"]["websocket"])

        poll_until(lambda: websocket()["connections"] <= 1, 20,  # close_timeout_s is 2: ten times that
                   lambda: f"the subscriber that reads nothing is still connected: {websocket()}", every_s=0.2)
        assert websocket()["slow_consumer_closes"] == 1
        publisher.close()
    finally:
        reset(stalled)
        daemon.stop()


def test_a_subscribe_whose_replay_cannot_read_gets_one_reply_and_no_silent_subscription(tmp_dir: Path) -> None:
    """Out of descriptors (``ulimit -n``), the store cannot open another reader connection for a
    replay. The subscriber was sent ``ok`` and then ``error internal`` for the same ref (two
    replies), and kept a subscription that was never made live: no message ever came, nothing
    said so, and subscribing again was "already subscribed" (found by tests/soak.py)."""
    daemon = DaemonProcess(tmp_dir)
    daemon.start()
    assert daemon.proc is not None
    pid = daemon.proc.pid
    clients = [RawClient.connect("127.0.0.1", daemon.ws_port) for _ in range(4)]
    idle: list[socket.socket] = []
    try:
        publisher = clients[0]
        publisher.send(b"".join(encode_frame(OP_TEXT, json.dumps({"op": "publish", "type": "t", "payload": i,
                                                                  "ref": i}).encode()) for i in range(2000)))
        assert len(replies(publisher, 2000, timeout_s=30)) == 2000
        limit = len(os.listdir(f"/proc/{pid}/fd")) + 2
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, limit))
        idle = [socket.create_connection(("127.0.0.1", daemon.ws_port), timeout=5) for _ in range(8)]
        # the daemon took what it could: now it is out of descriptors
        poll_until(lambda: len(os.listdir(f"/proc/{pid}/fd")) >= limit, 10, "the daemon did not run out of fds")
        for k, client in enumerate(clients):
            client.send_json({"op": "subscribe", "pattern": "t", "since": 0, "ref": f"s{k}"})
        for k, client in enumerate(clients):
            frames = replies(client, 2001, timeout_s=5)  # the reply, then the 2000 messages of the replay
            answers = [f for f in frames if f.get("ref") == f"s{k}"]
            assert len(answers) == 1, f"client {k}: {answers}"
            if answers[0]["op"] == "ok":
                told = client.closed is not None or any(f["op"] == "unsubscribed" for f in frames)
                got = [f["msg"]["seq"] for f in frames if f["op"] == "message"]
                assert got == list(range(1, 2001)) or told, f"client {k}: ok, then {len(got)} messages and silence"
    finally:
        for sock in idle:
            reset(sock)
        for client in clients:
            client.reset()
        daemon.stop()


def test_a_subscriber_that_resets_as_its_outbox_overflows_does_not_stop_the_daemon(tmp_dir: Path) -> None:
    """Crash: the router tells an overflowing subscriber it is a slow consumer from inside the
    store's commit callback, and ``_close_slow`` logs ``ws.remote`` — ``getpeername()``, which
    raises ENOTCONN once the peer has reset. When the reset lands in the same scheduler batch as
    the commit that overflows its outbox, the OSError escapes through the store's writer and the
    daemon exits 1. Under a steady stream it took 1–4 s of subscribers that subscribe and reset."""
    daemon = DaemonProcess(tmp_dir, websocket={"send_buffer_frames": 16})
    daemon.start()
    publisher = RawClient.connect("127.0.0.1", daemon.ws_port)
    stop = threading.Event()
    frames = encode_frame(OP_TEXT, b'{"op":"publish","type":"stream","payload":"z"}') * 200

    def stream() -> None:
        with contextlib.suppress(OSError):
            while not stop.is_set():
                publisher.send(frames)

    def drain() -> None:
        while not stop.is_set() and not publisher.eof:
            publisher.receive(0.2)

    threads = [threading.Thread(target=stream), threading.Thread(target=drain)]
    for thread in threads:
        thread.start()
    rng = random.Random(9)
    try:
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline and daemon.proc is not None and daemon.proc.poll() is None:
            subscriber = socket.socket()
            subscriber.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            try:
                subscriber.settimeout(10)
                subscriber.connect(("127.0.0.1", daemon.ws_port))
                subscriber.sendall(handshake_request("127.0.0.1", daemon.ws_port))
                read_http_head(subscriber, 10)
                subscriber.sendall(encode_frame(OP_TEXT, b'{"op":"subscribe","pattern":"#","ref":1}'))
                time.sleep(rng.uniform(0, 0.002))
            except OSError:
                break  # the daemon is gone: the assertion below says so
            finally:
                reset(subscriber)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
        publisher.reset()
    try:
        assert_serves(daemon)
    finally:
        daemon.stop()


def test_a_peer_that_resets_after_the_upgrade_is_not_a_fault_of_the_daemon(daemon_proc: DaemonProcess) -> None:
    """Each such reset was logged at ERROR as a unit of work "ended by its error boundary"
    (OSError ENOTCONN from ``ws.remote`` while setting the connection up) and counted as a
    fault: the log, the fault metric and the alerts built on them fill with a peer's ordinary
    behaviour, and hide the daemon's real faults."""
    for _ in range(10):
        with socket.create_connection(("127.0.0.1", daemon_proc.ws_port), timeout=5) as sock:
            sock.sendall(handshake_request("127.0.0.1", daemon_proc.ws_port))
            read_http_head(sock, 5)
            reset(sock)
    assert_serves(daemon_proc)
    errors = [line[:300] for line in daemon_proc.log().splitlines() if " ERROR " in line]
    assert not errors, errors[:2]
