"""DESIGN §4.8 end to end: every rule of the security contract against a real daemon, with real tokens.

Test policy for this module:
- Real parts only. Daemons are real: in process (``start_daemon``, fast) for the
  protocol rules, the real ``aivad serve`` subprocess where its exit status, its
  log or its listeners are what is tested. Clients are real WebSocket
  connections (trio-websocket), or a hand-written HTTP upgrade where the test
  must choose the bytes (a ``Host`` header, a token a client library would not
  send). Tokens are real JWTs: HS256 from a secret file written here; RS256,
  ES256 and EdDSA from keys generated here with ``cryptography``; forged by
  hand only where PyJWT refuses to forge (``alg: none``, algorithm confusion).
  The TLS certificate is made here too.
- "Nothing changes" is checked from outside the connection that was refused:
  what is stored through the control socket (an administrator), what is
  delivered by another subscriber, what is dispatched by a connected worker.
- Real sockets, so real time, bounded by ``trio.fail_after``; time-based rules
  (``auth_timeout_s``, ``exp``) use deadlines of about a second.
- Processes that must fail are started together (``refusals``), so the exit
  status checks cost one start, not one each.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import gc
import hashlib
import hmac
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import jwt
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID
from trio_websocket import ConnectionClosed, ConnectionRejected, open_websocket_url

from aivad import websocket
from aivad.auth import MAX_TOKEN_BYTES, REASONS
from aivad.envelope import rfc3339

from .conftest import (
    REPO,
    DaemonProcess,
    InProcessDaemon,
    control_async,
    free_port,
    poll_until,
    reload_daemon,
    short_tmp_dir,
    start_daemon,
    start_daemon_from_file,
    test_config,
    to_toml,
)
from .wsclient import TestClient, connect, no_more_messages

ISSUER = "https://idp.test"
TIMEOUT_S = 20


# ---- keys, certificates, tokens ---------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _public_pem(private: Any) -> bytes:
    return bytes(private.public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo))


def _private_pem(private: Any) -> bytes:
    return bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    path.chmod(0o600)
    return str(path)


class Keys:
    """An HMAC secret file, a PEM bundle of RSA, P-256 and Ed25519 public keys, and a self-signed certificate."""

    def __init__(self, directory: Path) -> None:
        self.secret = os.urandom(32).hex().encode()  # 64 bytes
        self.secret_file = _write(directory / "hmac.secret", self.secret + b"\n")
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ec = ec.generate_private_key(ec.SECP256R1())
        self.ed = ed25519.Ed25519PrivateKey.generate()
        self.rsa_public_pem = _public_pem(self.rsa)
        self.bundle_file = _write(directory / "public.pem",
                                  self.rsa_public_pem + _public_pem(self.ec) + _public_pem(self.ed))
        # TLS: a certificate for 127.0.0.1 and localhost, trusted by the test's clients only
        tls_key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "aivad test")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(tls_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(tls_key, hashes.SHA256())
        )
        self.cert_file = _write(directory / "cert.pem", cert.public_bytes(serialization.Encoding.PEM))
        self.key_file = _write(directory / "key.pem", _private_pem(tls_key))
        self.other_key_file = _write(directory / "other-key.pem", _private_pem(ec.generate_private_key(ec.SECP256R1())))
        self.garbage_file = _write(directory / "garbage.pem", b"not a certificate\n")

    def client_tls(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.cert_file)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return Keys(tmp_path_factory.mktemp("keys"))


def claims(subject: str = "alice", rights: dict[str, Any] | None = None, ttl_s: float = 600.0,
           **extra: Any) -> dict[str, Any]:
    """Claims of a good token for ``subject`` (``rights`` None: no ``aivad`` claim); ``claim=...`` removes one."""
    now = time.time()
    body: dict[str, Any] = {"sub": subject, "aud": "aivad", "iss": ISSUER, "iat": int(now), "exp": int(now + ttl_s),
                            "jti": uuid.uuid4().hex}
    if rights is not None:
        body["aivad"] = rights
    body.update(extra)
    return {k: v for k, v in body.items() if v is not ...}


def token(keys: Keys, subject: str = "alice", rights: dict[str, Any] | None = None, ttl_s: float = 600.0,
          algorithm: str = "HS256", **extra: Any) -> str:
    """A real token signed with the daemon's secret (HS256) or the private key of ``algorithm``."""
    key: Any = {"HS256": keys.secret, "RS256": keys.rsa, "ES256": keys.ec, "EdDSA": keys.ed}[algorithm]
    return jwt.encode(claims(subject, rights, ttl_s, **extra), key, algorithm=algorithm)


def forge(header: dict[str, Any], body: dict[str, Any], sign: Callable[[bytes], bytes] | None = None) -> str:
    """A token assembled by hand, for what PyJWT will not produce."""
    head = _b64(json.dumps(header).encode())
    payload = _b64(json.dumps(body).encode())
    signature = _b64(sign(f"{head}.{payload}".encode())) if sign else ""
    return f"{head}.{payload}.{signature}"


@pytest.fixture(scope="module")
def bad_tokens(keys: Keys) -> dict[str, tuple[Any, str]]:
    return attacks(keys)


def attacks(keys: Keys) -> dict[str, tuple[Any, str]]:
    """name → (token, the reason the daemon must give). Every one claims alice with ``admin: true``, so that
    accepting any of them on alice's connection would widen her rights."""
    admin = {"admin": True}
    good = claims("alice", admin)
    other_rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    valid = token(keys, "alice", admin)
    return {
        "garbage": ("garbage", "malformed"),
        "empty": ("", "malformed"),
        "not a string": (12345, "malformed"),
        "three parts of junk": ("a.b.c", "malformed"),
        "signature cut off": (valid.rsplit(".", 1)[0] + ".", "bad_signature"),
        "expired": (token(keys, "alice", admin, ttl_s=-30), "expired"),
        "not yet valid": (token(keys, "alice", admin, nbf=int(time.time()) + 600), "not_yet_valid"),
        "wrong secret": (jwt.encode(good, os.urandom(32).hex(), algorithm="HS256"), "bad_signature"),
        "wrong RSA key": (jwt.encode(good, other_rsa, algorithm="RS256"), "bad_signature"),
        "payload swapped": (_swap_payload(valid, claims("alice", admin, ttl_s=86400)), "bad_signature"),
        "alg none": (forge({"alg": "none", "typ": "JWT"}, good), "algorithm"),
        "alg None": (forge({"alg": "None", "typ": "JWT"}, good), "algorithm"),
        "alg none, signed": (forge({"alg": "none"}, good, lambda m: hashlib.sha256(m).digest()), "algorithm"),
        "algorithm not configured (HS512)": (jwt.encode(good, keys.secret, algorithm="HS512"), "algorithm"),
        # HS256 and RS256 are both configured: an HMAC "signed" with the RSA public key must not verify
        "algorithm confusion": (
            forge({"alg": "HS256", "typ": "JWT"}, good,
                  lambda m: hmac.new(keys.rsa_public_pem, m, hashlib.sha256).digest()),
            "bad_signature",
        ),
        "wrong audience": (token(keys, "alice", admin, aud="someone-else"), "bad_audience"),
        "wrong issuer": (token(keys, "alice", admin, iss="https://evil.test"), "bad_issuer"),
        "missing sub": (token(keys, "alice", admin, sub=...), "missing_claim"),
        "missing exp": (token(keys, "alice", admin, exp=...), "missing_claim"),
        "missing aud": (token(keys, "alice", admin, aud=...), "missing_claim"),
        "missing iss": (token(keys, "alice", admin, iss=...), "missing_claim"),
        "rights of the wrong shape": (token(keys, "alice", {"subscribe": "#"}), "bad_claims"),
        "a right this daemon does not know": (token(keys, "alice", {"superuser": True}), "bad_claims"),
        "over-size": (token(keys, "alice", admin, padding="x" * MAX_TOKEN_BYTES), "too_large"),
    }


def _swap_payload(signed: str, body: dict[str, Any]) -> str:
    head, _, signature = signed.split(".")
    return f"{head}.{_b64(json.dumps(body).encode())}.{signature}"


#: the attack names, for parametrize (the tokens are made per test from the module's keys)
ATTACKS = [
    "garbage", "empty", "not a string", "three parts of junk", "signature cut off", "expired", "not yet valid",
    "wrong secret", "wrong RSA key", "payload swapped", "alg none", "alg None", "alg none, signed",
    "algorithm not configured (HS512)", "algorithm confusion", "wrong audience", "wrong issuer", "missing sub",
    "missing exp", "missing aud", "missing iss", "rights of the wrong shape", "a right this daemon does not know",
    "over-size",
]


# ---- daemons and clients ---------------------------------------------------------------------


def secured(keys: Keys, **auth: Any) -> dict[str, Any]:
    """``[auth] required = true`` with HS256 and the three public-key families, leeway 0."""
    return {"required": True, "algorithms": ["HS256", "RS256", "ES256", "EdDSA"],
            "hmac_secret_file": keys.secret_file, "public_key_file": keys.bundle_file, "issuer": ISSUER,
            "leeway_s": 0, **auth}


async def start(nursery: trio.Nursery, directory: Path, keys: Keys, *, with_http: bool = False,
                **sections: dict[str, Any]) -> InProcessDaemon:
    """An in-process daemon with ``[auth]`` = :func:`secured` unless given; ``with_http``: /metrics on a free port."""
    sections.setdefault("auth", secured(keys))
    if with_http:
        sections["http"] = {"enabled": True, "port": 0, **sections.get("http", {})}
    return await start_daemon(nursery, directory, **sections)


@asynccontextmanager
async def client(d: InProcessDaemon, bearer: str | None = None, *, auth: str | None = None,
                 origin: str | None = None) -> AsyncIterator[TestClient]:
    """A WebSocket client; ``bearer`` on the handshake, or ``auth`` as its first frame."""
    headers = []
    if bearer is not None:
        headers.append((b"authorization", f"Bearer {bearer}".encode()))
    if origin is not None:
        headers.append((b"origin", origin.encode()))
    async with connect(d.ws_url, extra_headers=headers) as c:
        if auth is not None:
            await c.ok({"op": "auth", "token": auth})
        yield c


async def rejected_status(d: InProcessDaemon, headers: list[tuple[bytes, bytes]]) -> int:
    """The HTTP status a client library (trio-websocket) sees when the daemon refuses its handshake."""
    with warnings.catch_warnings():
        # trio-websocket 0.12 leaves the socket of a rejected handshake open; collect it here, quietly,
        # or the GC reports it (an error under filterwarnings) in whichever test runs next
        warnings.simplefilter("ignore", ResourceWarning)
        try:
            async with open_websocket_url(d.ws_url, extra_headers=headers):
                pass
        except ConnectionRejected as rejected:
            status = rejected.status_code
        else:
            pytest.fail("the handshake was accepted")
        gc.collect()
    return status


async def error(c: TestClient, frame: dict[str, Any], code: str) -> dict[str, Any]:
    reply = await c.request(dict(frame))
    assert reply["op"] == "error" and reply["code"] == code, (frame, reply)
    return reply


async def stored(d: InProcessDaemon, pattern: str = "#") -> list[str]:
    """The types stored, seen by an administrator (the control socket); the daemon's own events left out."""
    reply = await control_async(d.control_path, {"cmd": "history", "pattern": pattern, "after": 0, "limit": 1000})
    assert reply["ok"], reply
    return [m["type"] for m in reply["messages"] if m["metadata"].get("source") != "aivad"]


async def task_types(d: InProcessDaemon) -> list[str]:
    reply = await control_async(d.control_path, {"cmd": "tasks", "limit": 1000})
    assert reply["ok"], reply
    return sorted(t["type"] for t in reply["tasks"])


async def publish_as_admin(d: InProcessDaemon, topic: str, payload: Any = None) -> None:
    reply = await control_async(d.control_path, {"cmd": "publish", "type": topic, "payload": payload})
    assert reply["ok"], reply


async def next_frame(c: TestClient, op: str) -> dict[str, Any]:
    """The next pushed frame with ``op`` (task, unsubscribed, message), from those kept aside first."""
    for i, frame in enumerate(c.pushes):
        if frame.get("op") == op:
            return c.pushes.pop(i)
    while True:
        frame = await c.receive()
        if frame.get("op") == op:
            return frame
        c.pushes.append(frame)


async def closed_with(c: TestClient) -> tuple[int | None, str | None]:
    """Read until the daemon closes the connection: its close code and reason."""
    try:
        while True:
            c.pushes.append(await c.receive())
    except ConnectionClosed as closed:
        return closed.reason.code, closed.reason.reason


class Response:
    """An HTTP response head and body; ``status`` 0 when the connection closed without an answer."""

    def __init__(self, raw: bytes) -> None:
        head, _, self.body = raw.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        self.status = int(status_line.split(" ")[1]) if status_line.startswith("HTTP/1.1 ") else 0
        self.headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}


async def handshake(port: int, headers: dict[str, str], host: str | None = None,
                    tls: ssl.SSLContext | None = None) -> Response:
    """A WebSocket upgrade written by hand (any Host, any header): the daemon's HTTP answer."""
    key = base64.b64encode(os.urandom(16)).decode()
    lines = ["GET / HTTP/1.1", f"Host: {host or f'127.0.0.1:{port}'}", "Upgrade: websocket", "Connection: Upgrade",
             f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13", *(f"{k}: {v}" for k, v in headers.items())]
    return await http_exchange(port, "\r\n".join(lines).encode() + b"\r\n\r\n", tls)


async def http_get(port: int, path: str, tls: ssl.SSLContext | None = None) -> Response:
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode()
    return await http_exchange(port, request, tls)


async def http_exchange(port: int, request: bytes, tls: ssl.SSLContext | None) -> Response:
    """Send ``request``, read the head and its body (Content-Length), close."""
    with trio.fail_after(TIMEOUT_S):
        stream: trio.abc.Stream
        if tls is None:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
        else:
            stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", port, ssl_context=tls,
                                                         https_compatible=True)
        try:
            await stream.send_all(request)
            raw = b""
            while b"\r\n\r\n" not in raw:
                chunk = await stream.receive_some()
                if not chunk:
                    break
                raw += chunk
            response = Response(raw)
            if response.status != 101:
                need = int(response.headers.get("content-length", "0"))
                while len(response.body) < need and (chunk := await stream.receive_some()):
                    response.body += chunk
            return response
        finally:
            await trio.aclose_forcefully(stream)


def metric(text: str, name: str, **labels: str) -> float:
    """One sample of a Prometheus text exposition (0 when the series is absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    series = f"{name}{{{want}}}" if want else name
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def metrics(d: InProcessDaemon) -> str:
    assert d.endpoints.http_port is not None
    response = await http_get(d.endpoints.http_port, "/metrics")
    assert response.status == 200
    return response.body.decode()


# ---- 1. required = true: before authentication, auth, the header, the deadlines -----------------------


def _valid_frames() -> dict[str, dict[str, Any]]:
    """A well-formed frame of every op but auth and ping: refused for being early, not for their form."""
    task_id = "0" * 32
    return {
        "subscribe": {"op": "subscribe", "pattern": "incident.42.#"},
        "unsubscribe": {"op": "unsubscribe", "pattern": "incident.42.#"},
        "publish": {"op": "publish", "type": "incident.42.note", "payload": {"text": "hi"}},
        "history": {"op": "history", "pattern": "incident.42.#"},
        "worker.hello": {"op": "worker.hello", "types": ["scan.run"]},
        "worker.drain": {"op": "worker.drain"},
        "task.progress": {"op": "task.progress", "task_id": task_id, "progress": 0.5},
        "task.result": {"op": "task.result", "task_id": task_id, "result": 1},
        "task.fail": {"op": "task.fail", "task_id": task_id, "error": "x"},
        "dispatch": {"op": "dispatch", "type": "scan.run", "payload": {}},
        "task.status": {"op": "task.status", "task_id": task_id},
        "collect": {"op": "collect", "task_ids": [task_id], "timeout": 0.1},
        "request": {"op": "request", "type": "scan.run", "payload": {}, "timeout": 0.1},
    }


async def test_before_authentication_only_auth_and_ping(nursery: trio.Nursery, tmp_dir: Path, keys: Keys) -> None:
    d = await start(nursery, tmp_dir, keys)
    frames = _valid_frames()
    assert set(frames) == set(websocket.OPS) - websocket.OPEN_OPS == set(websocket.OPS) - {"auth", "ping"}
    rights = {"subscribe": ["incident.#"], "publish": ["incident.#"], "dispatch": ["scan.*"], "work": ["scan.*"]}
    good = token(keys, "soc-frontend-42", rights)
    with trio.fail_after(TIMEOUT_S):
        async with client(d) as c:
            for frame in frames.values():
                reply = await error(c, frame, "unauthorized")
                assert "auth" in reply["message"]
            assert (await c.ok({"op": "ping"}))["op"] == "pong"
            reply = await c.ok({"op": "auth", "token": good})
            exp = jwt.decode(good, options={"verify_signature": False})["exp"]
            assert reply == {"op": "ok", "ref": reply["ref"], "sub": "soc-frontend-42", "expires_at": rfc3339(exp)}
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", reply["expires_at"])
            # now the same ops are served
            await c.ok(frames["subscribe"])
            await c.ok(frames["publish"])
            assert (await c.next_message())["msg"]["type"] == "incident.42.note"
        assert await stored(d) == ["incident.42.note"]  # the early publish stored nothing
        assert await task_types(d) == []  # the early dispatch queued nothing


async def test_bearer_header_authenticates_the_handshake(nursery: trio.Nursery, tmp_dir: Path, keys: Keys) -> None:
    d = await start(nursery, tmp_dir, keys, auth=secured(keys, auth_timeout_s=0.5))
    with trio.fail_after(TIMEOUT_S):
        async with client(d, bearer=token(keys, "scanner-1", {"publish": ["scan.*"]})) as c:
            await c.publish("scan.completed", {"scan_id": "123"})  # no auth op needed
            await trio.sleep(0.8)  # past auth_timeout_s: authenticated, so not closed
            await c.publish("scan.completed", {"scan_id": "124"})
            await error(c, {"op": "subscribe", "pattern": "scan.*"}, "forbidden")
    assert await stored(d) == ["scan.completed", "scan.completed"]


async def test_bad_header_token_refuses_the_handshake_with_401(nursery: trio.Nursery, tmp_dir: Path,
                                                               keys: Keys) -> None:
    d = await start(nursery, tmp_dir, keys)
    port = d.endpoints.ws_port
    expired = token(keys, ttl_s=-30)
    with trio.fail_after(TIMEOUT_S):
        assert await rejected_status(d, [(b"authorization", f"Bearer {expired}".encode())]) == 401
        for header in (f"Bearer {expired}", "Bearer garbage", "Bearer", f"Basic {expired}", f"Token {expired}"):
            response = await handshake(port, {"Authorization": header})
            assert response.status == 401, header
            assert response.body.startswith(b"aivad: ")
            assert expired.encode() not in response.body and expired.split(".")[1].encode() not in response.body
        good = token(keys)
        assert (await handshake(port, {"Authorization": f"bearer {good}"})).status == 101  # the scheme's case


async def test_not_authenticated_in_time_is_closed_with_4001(nursery: trio.Nursery, tmp_dir: Path,
                                                             keys: Keys) -> None:
    d = await start(nursery, tmp_dir, keys, auth=secured(keys, auth_timeout_s=0.5))
    closes: dict[str, tuple[int | None, str | None]] = {}
    alive: list[str] = []

    async def silent() -> None:
        async with client(d) as c:
            opened = time.monotonic()
            closes["silent"] = await closed_with(c)
            assert time.monotonic() - opened >= 0.4

    async def pinging() -> None:  # ping is served before authentication but does not authenticate
        async with client(d) as c:
            with contextlib.suppress(ConnectionClosed):
                while True:
                    await c.ok({"op": "ping"})
                    await trio.sleep(0.1)
            closes["pinging"] = await closed_with(c)

    async def refused_token() -> None:  # a refused auth does not stop the clock either
        async with client(d) as c:
            await error(c, {"op": "auth", "token": "garbage"}, "unauthorized")
            closes["refused token"] = await closed_with(c)

    async def authenticating() -> None:
        async with client(d) as c:
            await trio.sleep(0.2)
            await c.ok({"op": "auth", "token": token(keys)})
            await trio.sleep(1.0)
            await c.ok({"op": "ping"})
            alive.append("auth op")

    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as clients:
            for run in (silent, pinging, refused_token, authenticating):
                clients.start_soon(run)
    assert closes == {name: (4001, "not authenticated in time") for name in ("silent", "pinging", "refused token")}
    assert alive == ["auth op"]


async def test_token_expiry_without_refresh_closes_with_4001(nursery: trio.Nursery, tmp_dir: Path,
                                                             keys: Keys) -> None:
    """leeway_s = 0: a token whose exp is 1.5 s away ends the connection then, unless it was refreshed."""
    d = await start(nursery, tmp_dir, keys)
    rights = {"subscribe": ["a.#"]}
    exp = time.time() + 1.5
    results: dict[str, Any] = {}

    async def by_auth_op() -> None:
        async with client(d) as c:
            reply = await c.ok({"op": "auth", "token": token(keys, rights=rights, exp=exp)})
            assert reply["expires_at"] == rfc3339(exp)
            await c.ok({"op": "subscribe", "pattern": "a.#"})
            results["auth op"] = await closed_with(c)
            results["closed at"] = time.time()

    async def by_header() -> None:
        async with client(d, bearer=token(keys, rights=rights, exp=exp)) as c:
            results["header"] = await closed_with(c)

    async def refreshed() -> None:
        async with client(d, auth=token(keys, rights=rights, exp=exp)) as c:
            await trio.sleep(0.5)
            reply = await c.ok({"op": "auth", "token": token(keys, rights=rights, ttl_s=600)})
            assert reply["expires_at"] > rfc3339(exp)
            while time.time() < exp + 1.0:
                await trio.sleep(0.1)
            await c.ok({"op": "ping"})
            results["refreshed"] = "open"

    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as clients:
            for run in (by_auth_op, by_header, refreshed):
                clients.start_soon(run)
    assert results["auth op"] == results["header"] == (4001, "token expired")
    assert exp - 0.05 <= results["closed at"] < exp + 2
    assert results["refreshed"] == "open"


@pytest.mark.parametrize("algorithm", ["HS256", "RS256", "ES256", "EdDSA"])
async def test_each_configured_algorithm_is_accepted(nursery: trio.Nursery, tmp_dir: Path, keys: Keys,
                                                     algorithm: str) -> None:
    d = await start(nursery, tmp_dir, keys)
    rights = {"publish": ["scan.*"]}
    with trio.fail_after(TIMEOUT_S):
        async with client(d, bearer=token(keys, "scanner-1", rights, algorithm=algorithm)) as c:
            await c.publish("scan.completed")
        async with client(d, auth=token(keys, "scanner-2", rights, algorithm=algorithm)) as c:
            await c.publish("scan.completed")
    assert await stored(d) == ["scan.completed"] * 2


# ---- 2. attacks: refused, and nothing changes ------------------------------------------------------


@pytest.mark.parametrize("attack", ATTACKS)
async def test_attack_is_unauthorized_and_changes_nothing(nursery: trio.Nursery, tmp_dir: Path, keys: Keys,
                                                          bad_tokens: dict[str, tuple[Any, str]], attack: str) -> None:
    bad, reason = bad_tokens[attack]
    assert reason in REASONS
    d = await start(nursery, tmp_dir, keys, with_http=True)
    alice = token(keys, "alice", {"subscribe": ["incident.42.#"]})
    with trio.fail_after(TIMEOUT_S):
        # on a fresh connection: refused, still unauthenticated
        async with client(d) as c:
            reply = await error(c, {"op": "auth", "token": bad}, "unauthorized")
            assert not isinstance(bad, str) or len(bad) < 8 or bad not in reply["message"]
            await error(c, {"op": "subscribe", "pattern": "incident.42.#"}, "unauthorized")
        # on the handshake: HTTP 401
        response = await handshake(d.endpoints.ws_port, {"Authorization": f"Bearer {bad}"})
        assert response.status == 401
        # on alice's authenticated connection: her identity, rights, expiry and subscription stay
        async with client(d, auth=alice) as c:
            await c.ok({"op": "subscribe", "pattern": "incident.42.#"})
            await error(c, {"op": "auth", "token": bad}, "unauthorized")
            await error(c, {"op": "publish", "type": "incident.42.note", "payload": 1}, "forbidden")
            await error(c, {"op": "subscribe", "pattern": "#"}, "forbidden")
            await error(c, {"op": "dispatch", "type": "scan.run", "payload": {}}, "forbidden")
            await publish_as_admin(d, "incident.42.alert", {"level": "high"})
            message = await c.next_message()
            assert (message["pattern"], message["msg"]["type"]) == ("incident.42.#", "incident.42.alert")
            assert not any(p.get("op") == "unsubscribed" for p in c.pushes)
            # a good refresh still works: the refused one left the subject as it was
            assert (await c.ok({"op": "auth", "token": alice}))["sub"] == "alice"
    assert await stored(d) == ["incident.42.alert"]
    text = await metrics(d)
    assert metric(text, "aivad_auth_unauthorized_total", reason=reason) == 3
    assert metric(text, "aivad_auth_unauthorized_total", reason="missing") == 1


# ---- 3. rights by containment, end to end -----------------------------------------------------------


async def test_subscribe_and_history_by_containment(nursery: trio.Nursery, tmp_dir: Path, keys: Keys) -> None:
    d = await start(nursery, tmp_dir, keys)
    for topic in ("incident.42.alert", "incident.43.alert", "a.b", "a.b.c", "b.x"):
        await publish_as_admin(d, topic)
    with trio.fail_after(TIMEOUT_S):
        async with client(d, auth=token(keys, rights={"subscribe": ["incident.#", "a.#"]})) as c:
            for pattern in ("incident.42.#", "incident.*.alert", "incident", "a.*", "a.#", "a.b.c"):
                await c.ok({"op": "subscribe", "pattern": pattern})
            page = await c.ok({"op": "history", "pattern": "incident.42.#"})
            assert [m["type"] for m in page["messages"]] == ["incident.42.alert"]
            page = await c.ok({"op": "history", "pattern": "a.*"})
            assert [m["type"] for m in page["messages"]] == ["a.b"]
            for pattern in ("#", "*.#", "b.#", "incidents.#", "*.42.#"):
                await error(c, {"op": "subscribe", "pattern": pattern}, "forbidden")
                await error(c, {"op": "history", "pattern": pattern}, "forbidden")
            await publish_as_admin(d, "b.y")  # matches no allowed subscription: not delivered
            await publish_as_admin(d, "a.z")
            message = await c.next_message()
            assert (message["pattern"], message["msg"]["type"]) in {("a.*", "a.z"), ("a.#", "a.z")}
            second = await c.next_message()
            assert {message["pattern"], second["pattern"]} == {"a.*", "a.#"}
            assert await no_more_messages(c)


async def test_publish_outside_the_grants_stores_and_delivers_nothing(nursery: trio.Nursery, tmp_dir: Path,
                                                                      keys: Keys) -> None:
    d = await start(nursery, tmp_dir, keys)
    with trio.fail_after(TIMEOUT_S):
        async with client(d, auth=token(keys, "watcher", {"admin": True})) as watcher:
            await watcher.ok({"op": "subscribe", "pattern": "#"})
            async with client(d, auth=token(keys, "scanner-1", {"publish": ["scan.*"]})) as c:
                await c.publish("scan.completed", 1)
                await error(c, {"op": "publish", "type": "scan.a.b", "payload": 2}, "forbidden")
                await error(c, {"op": "publish", "type": "incident.42.note", "payload": 3}, "forbidden")
                # pipelined: the batch is decided item by item, in one commit for the allowed ones
                refs = ["p1", "p2", "p3", "p4"]
                for ref, topic in zip(refs, ["scan.x", "admin.cmd", "scan.y", "scan"], strict=True):
                    await c.send({"op": "publish", "ref": ref, "type": topic, "payload": ref})
                replies = {}
                while len(replies) < len(refs):
                    frame = await c.receive()
                    replies[frame["ref"]] = frame["op"] if frame["op"] == "ok" else frame["code"]
                assert replies == {"p1": "ok", "p2": "forbidden", "p3": "ok", "p4": "forbidden"}
            seen = [(await watcher.next_message())["msg"]["type"] for _ in range(3)]
            assert seen == ["scan.completed", "scan.x", "scan.y"]
            assert await no_more_messages(watcher)
    assert await stored(d) == ["scan.completed", "scan.x", "scan.y"]


async def test_dispatch_and_tasks_by_task_type(nursery: trio.Nursery, tmp_dir: Path, keys: Keys) -> None:
    d = await start(nursery, tmp_dir, keys)
    with trio.fail_after(TIMEOUT_S):
        async with client(d, auth=token(keys, "worker", {"work": ["scan.*", "secret.*"]})) as worker, \
                client(d, auth=token(keys, "ops", {"admin": True})) as admin, \
                client(d, auth=token(keys, "frontend", {"dispatch": ["scan.*"]})) as c:
            await worker.ok({"op": "worker.hello", "types": ["scan.run", "secret.job"], "concurrency": 4})
            # outside the grant: forbidden, and nothing queued or sent to the worker
            await error(c, {"op": "dispatch", "type": "secret.job", "payload": {}}, "forbidden")
            await error(c, {"op": "request", "type": "secret.job", "payload": {}, "timeout": 5}, "forbidden")
            assert await task_types(d) == []
            # inside: dispatched, and the worker gets exactly that one
            mine = (await c.ok({"op": "dispatch", "type": "scan.run", "payload": {"n": 1}}))["task_id"]
            task = (await next_frame(worker, "task"))["task"]
            assert (task["task_id"], task["type"]) == (mine, "scan.run")
            await worker.send({"op": "task.result", "task_id": mine, "result": "scan done"})
            # task.status / collect by the type of the tasks named
            theirs = (await admin.ok({"op": "dispatch", "type": "secret.job", "payload": {}}))["task_id"]
            task = (await next_frame(worker, "task"))["task"]
            assert task["task_id"] == theirs
            await worker.send({"op": "task.result", "task_id": theirs, "result": "top secret"})
            collected = await c.ok({"op": "collect", "task_ids": [mine], "timeout": 5})
            assert collected["completed"] == {mine: "scan done"}
            assert (await c.ok({"op": "task.status", "task_id": mine}))["state"] == "completed"
            await error(c, {"op": "task.status", "task_id": theirs}, "forbidden")
            await error(c, {"op": "collect", "task_ids": [theirs], "timeout": 1}, "forbidden")
            await error(c, {"op": "collect", "task_ids": [mine, theirs], "timeout": 1}, "forbidden")
            unknown = uuid.uuid4().hex
            await error(c, {"op": "task.status", "task_id": unknown}, "not_found")
            await error(c, {"op": "collect", "task_ids": [unknown], "timeout": 1}, "not_found")
            # request by type: the worker answers it
            async with trio.open_nursery() as background:
                background.start_soon(_answer_one, worker, "scan result")
                reply = await c.ok({"op": "request", "type": "scan.run", "payload": {"quick": True}, "timeout": 10})
            assert reply["result"] == "scan result"
            assert not [p for p in worker.pushes if p.get("op") == "task"]
    assert await task_types(d) == ["scan.run", "scan.run", "secret.job"]


async def _answer_one(worker: TestClient, result: Any) -> None:
    task = (await next_frame(worker, "task"))["task"]
    await worker.send({"op": "task.result", "task_id": task["task_id"], "result": result})


async def test_collect_of_a_group_returns_no_result_outside_the_grants(nursery: trio.Nursery, tmp_dir: Path,
                                                                       keys: Keys) -> None:
    """A group id is the client's choice: tasks of another type put into it later must not leak through collect."""
    d = await start(nursery, tmp_dir, keys)
    with trio.fail_after(TIMEOUT_S):
        async with client(d, auth=token(keys, "worker", {"work": ["#"]})) as worker, \
                client(d, auth=token(keys, "ops", {"admin": True})) as admin, \
                client(d, auth=token(keys, "frontend", {"dispatch": ["scan.*"]})) as c:
            await worker.ok({"op": "worker.hello", "types": ["scan.run", "secret.job"], "concurrency": 4})
            mine = (await c.ok({"op": "dispatch", "type": "scan.run", "payload": {}, "group_id": "g1"}))["task_id"]
            await c.send({"op": "collect", "ref": "watch", "group_id": "g1", "timeout": 1.5})
            await trio.sleep(0.2)  # the collect is waiting
            theirs = (await admin.ok({"op": "dispatch", "type": "secret.job", "payload": {}, "group_id": "g1"}))
            for _ in range(2):
                task = (await next_frame(worker, "task"))["task"]
                result = "top secret" if task["type"] == "secret.job" else "scan done"
                await worker.send({"op": "task.result", "task_id": task["task_id"], "result": result})
            while True:
                reply = await c.receive()
                if reply.get("ref") == "watch":
                    break
            assert (reply["op"], reply.get("code")) == ("error", "forbidden"), reply
            assert "top secret" not in json.dumps(reply) and theirs["task_id"] not in json.dumps(reply)
            assert (await c.ok({"op": "task.status", "task_id": mine}))["result"] == "scan done"
            # a group of the client's own types is collected as before
            again = (await c.ok({"op": "dispatch", "type": "scan.run", "payload": {}, "group_id": "g2"}))["task_id"]
            await _answer_one(worker, "scan again")
            collected = await c.ok({"op": "collect", "group_id": "g2", "timeout": 5})
            assert (collected["completed"], collected["reason"]) == ({again: "scan again"}, "all_done")


async def test_worker_hello_needs_a_work_grant_for_every_type(nursery: trio.Nursery, tmp_dir: Path,
                                                              keys: Keys) -> None:
    d = await start(nursery, tmp_dir, keys)
    with trio.fail_after(TIMEOUT_S):
        async with client(d, auth=token(keys, "ops", {"admin": True})) as admin, \
                client(d, auth=token(keys, "scanner-1", {"work": ["scan.run"], "dispatch": ["#"]})) as w:
            await error(w, {"op": "worker.hello", "types": ["scan.run", "scan.delete"]}, "forbidden")
            await error(w, {"op": "worker.hello", "types": ["scan.*"]}, "bad_request")  # a type, not a pattern
            workers = await control_async(d.control_path, {"cmd": "workers"})
            assert workers["workers"] == []
            await admin.ok({"op": "dispatch", "type": "scan.delete", "payload": {}})
            await w.ok({"op": "worker.hello", "types": ["scan.run"]})
            await admin.ok({"op": "dispatch", "type": "scan.run", "payload": {}})
            task = (await next_frame(w, "task"))["task"]
            assert task["type"] == "scan.run"  # never scan.delete
            await w.ok({"op": "ping"})
            assert not [p for p in w.pushes if p.get("op") == "task"]
    assert await task_types(d) == ["scan.delete", "scan.run"]


async def test_admin_grants_everything(nursery: trio.Nursery, tmp_dir: Path, keys: Keys) -> None:
    d = await start(nursery, tmp_dir, keys)
    with trio.fail_after(TIMEOUT_S):
        async with client(d, bearer=token(keys, "ops-console", {"admin": True})) as c:
            await c.ok({"op": "subscribe", "pattern": "#"})
            await c.ok({"op": "history", "pattern": "#"})
            await c.publish("anything.at.all", 1)
            await c.ok({"op": "worker.hello", "types": ["any.type"]})
            task_id = (await c.ok({"op": "dispatch", "type": "any.type", "payload": {}}))["task_id"]
            assert (await next_frame(c, "task"))["task"]["task_id"] == task_id
            await c.ok({"op": "task.status", "task_id": task_id})


async def test_a_token_without_the_aivad_claim_grants_nothing(nursery: trio.Nursery, tmp_dir: Path,
                                                              keys: Keys) -> None:
    d = await start(nursery, tmp_dir, keys)
    with trio.fail_after(TIMEOUT_S):
        async with client(d, auth=token(keys, "nobody", rights=None)) as c:
            for frame in ({"op": "subscribe", "pattern": "a"}, {"op": "history", "pattern": "a"},
                          {"op": "publish", "type": "a", "payload": 1}, {"op": "dispatch", "type": "a", "payload": 1},
                          {"op": "request", "type": "a", "payload": 1, "timeout": 1},
                          {"op": "worker.hello", "types": ["a"]}):
                await error(c, frame, "forbidden")
            await c.ok({"op": "ping"})
            # unsubscribe needs no grant: it is judged by the subscriptions alone
            await error(c, {"op": "unsubscribe", "pattern": "a"}, "not_found")
        async with client(d, auth=token(keys, "reader", {"subscribe": ["a.#"]})) as c:
            await c.ok({"op": "subscribe", "pattern": "a.#"})
            await c.ok({"op": "unsubscribe", "pattern": "a.#"})
    assert await stored(d) == []
    assert await task_types(d) == []


async def test_task_events_reach_a_subscriber_only_where_its_rights_allow(nursery: trio.Nursery, tmp_dir: Path,
                                                                         keys: Keys) -> None:
    d = await start(nursery, tmp_dir, keys)
    with trio.fail_after(TIMEOUT_S):
        async with client(d, auth=token(keys, "ops", {"admin": True, "work": ["scan.run"]})) as admin, \
                client(d, auth=token(keys, "tasks", {"subscribe": ["task.*"]})) as tasks, \
                client(d, auth=token(keys, "scans", {"subscribe": ["scan.#"], "dispatch": ["scan.run"]})) as scans:
            await tasks.ok({"op": "subscribe", "pattern": "task.*"})
            await scans.ok({"op": "subscribe", "pattern": "scan.#"})
            for pattern in ("#", "task.*", "task.#", "*.created"):
                await error(scans, {"op": "subscribe", "pattern": pattern}, "forbidden")
            await admin.ok({"op": "worker.hello", "types": ["scan.run"]})
            task_id = (await scans.ok({"op": "dispatch", "type": "scan.run", "payload": {}}))["task_id"]
            await _answer_one(admin, "done")
            events = []
            while not events or events[-1] != "task.completed":
                message = await tasks.next_message()
                assert message["msg"]["payload"]["task_id"] == task_id
                events.append(message["msg"]["type"])
            assert events[0] == "task.created"
            assert await no_more_messages(scans)  # its own task's events are not within scan.#


# ---- 4. refresh -------------------------------------------------------------------------------------


async def test_refresh_replaces_rights_and_ends_subscriptions_no_longer_allowed(nursery: trio.Nursery,
                                                                                tmp_dir: Path, keys: Keys) -> None:
    d = await start(nursery, tmp_dir, keys)
    first = token(keys, "soc-frontend-42", {"subscribe": ["incident.42.#", "chat.42.#"]}, ttl_s=600)
    second = token(keys, "soc-frontend-42", {"subscribe": ["incident.42.#"], "publish": ["chat.42.*"]}, ttl_s=1200)
    with trio.fail_after(TIMEOUT_S):
        async with client(d, auth=first) as c:
            await c.ok({"op": "subscribe", "pattern": "incident.42.#"})
            await c.ok({"op": "subscribe", "pattern": "chat.42.#"})
            await error(c, {"op": "publish", "type": "chat.42.msg", "payload": "hi"}, "forbidden")
            reply = await c.ok({"op": "auth", "token": second})
            exp = jwt.decode(second, options={"verify_signature": False})["exp"]
            assert (reply["sub"], reply["expires_at"]) == ("soc-frontend-42", rfc3339(exp))
            assert await next_frame(c, "unsubscribed") == {"op": "unsubscribed", "pattern": "chat.42.#",
                                                           "reason": "forbidden"}
            await publish_as_admin(d, "chat.42.msg", "not for you any more")
            await publish_as_admin(d, "incident.42.alert", "still yours")
            message = await c.next_message()
            assert (message["pattern"], message["msg"]["type"]) == ("incident.42.#", "incident.42.alert")
            assert await no_more_messages(c)
            await error(c, {"op": "subscribe", "pattern": "chat.42.#"}, "forbidden")
            await c.publish("chat.42.msg", "hello")  # the new publish right
            # another subject: forbidden, and the identity stays soc-frontend-42 with the second token's rights
            await error(c, {"op": "auth", "token": token(keys, "mallory", {"admin": True})}, "forbidden")
            await error(c, {"op": "subscribe", "pattern": "#"}, "forbidden")
            await c.publish("chat.42.msg", "still me")
    assert await stored(d) == ["chat.42.msg", "incident.42.alert", "chat.42.msg", "chat.42.msg"]


async def test_refresh_that_drops_a_work_grant_drains_the_worker(nursery: trio.Nursery, tmp_dir: Path,
                                                                 keys: Keys) -> None:
    """The worker's analogue of ``unsubscribed``: it gets no new task, and finishes what it holds."""
    d = await start(nursery, tmp_dir, keys)
    working = {"work": ["scan.run"], "publish": ["scan.*"]}
    with trio.fail_after(TIMEOUT_S):
        async with client(d, auth=token(keys, "ops", {"admin": True})) as admin, \
                client(d, auth=token(keys, "scanner-1", working)) as w:
            await w.ok({"op": "worker.hello", "types": ["scan.run"], "concurrency": 2})
            held = (await admin.ok({"op": "dispatch", "type": "scan.run", "payload": {}}))["task_id"]
            assert (await next_frame(w, "task"))["task"]["task_id"] == held
            # a refresh that keeps the grant changes nothing for the worker
            await w.ok({"op": "auth", "token": token(keys, "scanner-1", working)})
            await admin.ok({"op": "dispatch", "type": "scan.run", "payload": {}})
            await _answer_one(w, "second")
            # one that drops it: no new task
            await w.ok({"op": "auth", "token": token(keys, "scanner-1", {"publish": ["scan.*"]})})
            queued = (await admin.ok({"op": "dispatch", "type": "scan.run", "payload": {}}))["task_id"]
            await w.ok({"op": "ping"})
            with trio.move_on_after(0.5):
                task = await next_frame(w, "task")
                pytest.fail(f"a worker without the work grant got {task}")
            # what it held when its rights changed it may still finish
            await w.ok({"op": "task.result", "task_id": held, "result": "first"})
            collected = await admin.ok({"op": "collect", "task_ids": [held], "timeout": 5})
            assert collected["completed"] == {held: "first"}
            assert (await admin.ok({"op": "task.status", "task_id": queued}))["state"] == "queued"


# ---- 5. required = false ------------------------------------------------------------------------------


async def test_without_required_anonymous_has_every_right_and_a_token_only_its_own(nursery: trio.Nursery,
                                                                                   tmp_dir: Path, keys: Keys) -> None:
    d = await start(nursery, tmp_dir, keys, auth=secured(keys, required=False))
    with trio.fail_after(TIMEOUT_S):
        async with client(d) as anonymous:
            await anonymous.ok({"op": "subscribe", "pattern": "#"})
            await anonymous.ok({"op": "history", "pattern": "#"})
            await anonymous.publish("anything", 1)
            await anonymous.ok({"op": "worker.hello", "types": ["any.type"]})
            await anonymous.ok({"op": "dispatch", "type": "any.type", "payload": {}})
            # a refused token changes nothing: still anonymous, with every right
            await error(anonymous, {"op": "auth", "token": token(keys, ttl_s=-30)}, "unauthorized")
            await anonymous.publish("still.anything", 2)
        limited = token(keys, "reader", {"subscribe": ["a.#"]})
        async with client(d, auth=limited) as c:
            await c.ok({"op": "subscribe", "pattern": "a.#"})
            await error(c, {"op": "subscribe", "pattern": "#"}, "forbidden")
            await error(c, {"op": "publish", "type": "a.b", "payload": 1}, "forbidden")
        async with client(d, bearer=limited) as c:
            await error(c, {"op": "publish", "type": "a.b", "payload": 1}, "forbidden")
            await error(c, {"op": "worker.hello", "types": ["any.type"]}, "forbidden")
        assert (await handshake(d.endpoints.ws_port, {"Authorization": "Bearer garbage"})).status == 401
    assert await stored(d) == ["anything", "still.anything"]


# ---- 6. origins ----------------------------------------------------------------------------------------


async def test_origins(nursery: trio.Nursery, tmp_dir: Path, keys: Keys) -> None:
    d = await start(nursery, tmp_dir, keys, with_http=True, auth={},
                    websocket={"allowed_origins": ["https://*.example.com", "http://localhost:3000",
                                                "http://console.example.com:*"]})
    port, http_port = d.endpoints.ws_port, d.endpoints.http_port
    with trio.fail_after(TIMEOUT_S):
        for origin, status in [
            ("https://soc.example.com", 101),
            ("https://a.b.example.com", 101),
            ("HTTPS://SOC.EXAMPLE.COM", 101),
            ("http://localhost:3000", 101),
            (f"http://127.0.0.1:{http_port}", 101),  # the daemon's own [http] server (the console)
            ("https://example.com", 403),
            ("http://soc.example.com", 403),  # the scheme is part of the origin
            ("https://soc.example.com.evil.test", 403),
            ("https://soc.example.com:8443", 403),
            ("http://localhost:3001", 403),
            (f"http://127.0.0.1:{port}", 403),  # the WebSocket port is not the console
            (f"https://127.0.0.1:{http_port}", 403),
            ("null", 403),
            ("https://" + "a" * 2000 + ".example.com", 403),
        ]:
            response = await handshake(port, {"Origin": origin})
            assert response.status == status, origin
        assert (await handshake(port, {})).status == 101  # no Origin: an agent
        # the console's origin is the name the browser reached the daemon by: localhost, an address
        for host in ("localhost", "127.0.0.1", "[::1]"):
            response = await handshake(port, {"Origin": f"http://{host}:{http_port}"}, host=f"{host}:{port}")
            assert response.status == 101, host
        # DNS rebinding: a page loaded from http://rebind.evil.test:<http port>, whose name the attacker's DNS
        # then points at 127.0.0.1, must not pass for the console; a console reached by name is listed
        for name, status in (("rebind.evil.test", 403), ("console.example.com", 101)):
            response = await handshake(port, {"Origin": f"http://{name}:{http_port}"}, host=f"{name}:{port}")
            assert response.status == status, name
        async with client(d, origin="https://soc.example.com") as c:  # a real client, allowed
            await c.publish("from.the.browser")
        assert await rejected_status(d, [(b"origin", b"https://evil.test")]) == 403


async def test_origin_check_applies_with_auth_required_too(nursery: trio.Nursery, tmp_dir: Path,
                                                           keys: Keys) -> None:
    d = await start(nursery, tmp_dir, keys, websocket={"allowed_origins": ["https://soc.example.com"]})
    good = token(keys)
    with trio.fail_after(TIMEOUT_S):
        response = await handshake(d.endpoints.ws_port, {"Origin": "https://evil.test",
                                                         "Authorization": f"Bearer {good}"})
        assert response.status == 403
        response = await handshake(d.endpoints.ws_port, {"Origin": "https://soc.example.com",
                                                         "Authorization": f"Bearer {good}"})
        assert response.status == 101


# ---- keys: rotation (docs/security.md) ------------------------------------------------------------------


async def test_key_rotation_takes_a_restart(nursery: trio.Nursery, tmp_dir: Path, keys: Keys) -> None:
    """A public key bundle verifies tokens of either key; the key files are read at start, so a changed
    file takes effect on a restart (``reload`` names it among the keys that need one)."""
    old_key, new_key = keys.rsa, rsa.generate_private_key(public_exponent=65537, key_size=2048)
    _write(tmp_dir / "both.pem", _public_pem(old_key) + _public_pem(new_key))
    _write(tmp_dir / "new.pem", _public_pem(new_key))
    new_secret = os.urandom(32).hex().encode()
    _write(tmp_dir / "new.secret", new_secret)

    def sign(key: Any, algorithm: str = "RS256") -> str:
        return jwt.encode(claims("scanner-1", {"publish": ["scan.*"]}), key, algorithm=algorithm)

    def auth(public: str, secret: str) -> dict[str, Any]:
        return secured(keys, algorithms=["HS256", "RS256"], public_key_file=str(tmp_dir / public),
                       hmac_secret_file=secret)

    async def accepted(d: InProcessDaemon, signed: str) -> bool:
        return (await handshake(d.endpoints.ws_port, {"Authorization": f"Bearer {signed}"})).status == 101

    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as first:  # while the issuer moves to the new key: both verify
            d = await start_daemon_from_file(first, tmp_dir, auth=auth("both.pem", keys.secret_file))
            assert await accepted(d, sign(old_key)) and await accepted(d, sign(new_key))
            assert await accepted(d, sign(keys.secret, "HS256"))
            reply = await reload_daemon(d, tmp_dir, auth=auth("new.pem", str(tmp_dir / "new.secret")))
            assert {"auth.public_key_file", "auth.hmac_secret_file"} <= set(reply["needs_restart"]), reply
            assert await accepted(d, sign(old_key)) and await accepted(d, sign(keys.secret, "HS256"))
            first.cancel_scope.cancel()
        # restarted: the old key and the old secret are refused, the new ones verify
        d = await start_daemon_from_file(nursery, tmp_dir, auth=auth("new.pem", str(tmp_dir / "new.secret")))
        assert not await accepted(d, sign(old_key)) and not await accepted(d, sign(keys.secret, "HS256"))
        assert await accepted(d, sign(new_key)) and await accepted(d, sign(new_secret, "HS256"))
        async with client(d) as c:
            reply = await error(c, {"op": "auth", "token": sign(old_key)}, "unauthorized")
            assert reply["message"] == "token signature does not verify"


# ---- 7. TLS --------------------------------------------------------------------------------------------


async def test_tls_serves_wss_and_https(nursery: trio.Nursery, tmp_dir: Path, keys: Keys) -> None:
    tls = {"tls_cert_file": keys.cert_file, "tls_key_file": keys.key_file}
    d = await start(nursery, tmp_dir, keys, websocket=dict(tls), http={"enabled": True, "port": 0, **tls})
    port, http_port = d.endpoints.ws_port, d.endpoints.http_port
    assert http_port is not None
    with trio.fail_after(TIMEOUT_S):
        wss = f"wss://127.0.0.1:{port}/"
        bearer = [(b"authorization", f"Bearer {token(keys, rights={'publish': ['a.#']})}".encode())]
        async with open_websocket_url(wss, keys.client_tls(), extra_headers=bearer) as ws:
            await ws.send_message(json.dumps({"op": "publish", "ref": 1, "type": "a.b", "payload": "over tls"}))
            assert json.loads(await ws.get_message())["op"] == "ok"
        assert await stored(d) == ["a.b"]
        # a client that does not trust the certificate fails its TLS handshake; a plain ws:// one gets no answer
        with pytest.raises(trio.BrokenResourceError) as broken:
            await handshake(port, {}, tls=ssl.create_default_context())
        assert isinstance(broken.value.__cause__, ssl.SSLCertVerificationError)
        assert (await handshake(port, {})).status == 0
        # HTTPS for /healthz (and the console's origin is https://…:<http port>)
        response = await http_get(http_port, "/healthz", tls=keys.client_tls())
        assert (response.status, response.body) == (200, b"ok\n")
        response = await handshake(port, {"Origin": f"https://127.0.0.1:{http_port}"}, tls=keys.client_tls())
        assert response.status == 101
        assert (await http_get(http_port, "/healthz")).status != 200  # plain http to the https port


# ---- 7 and 8. what makes `aivad serve` refuse to start -------------------------------------------------


def _serve_cases(keys: Keys, directory: Path) -> dict[str, tuple[dict[str, Any], str]]:
    """case → (config sections, what the one line must say)."""
    ws_tls = {"tls_cert_file": keys.cert_file, "tls_key_file": keys.key_file}
    missing = str(directory / "missing.pem")
    return {
        "websocket cert missing": ({"websocket": {**ws_tls, "tls_cert_file": missing}},
                                   "websocket.tls_cert_file: cannot read"),
        "websocket key missing": ({"websocket": {**ws_tls, "tls_key_file": missing}},
                                  "websocket.tls_key_file: cannot read"),
        "websocket cert without key": ({"websocket": {"tls_cert_file": keys.cert_file}},
                                       "websocket.tls_cert_file: tls_cert_file and tls_key_file go together"),
        "websocket cert garbage": ({"websocket": {**ws_tls, "tls_cert_file": keys.garbage_file}},
                                   "websocket.tls_cert_file: cannot use"),
        "websocket key of another cert": ({"websocket": {**ws_tls, "tls_key_file": keys.other_key_file}},
                                          "websocket.tls_cert_file: cannot use"),
        "http cert missing": ({"http": {"enabled": True, "port": 0, **ws_tls, "tls_cert_file": missing}},
                              "http.tls_cert_file: cannot read"),
        "http cert garbage": ({"http": {"enabled": True, "port": 0, **ws_tls, "tls_cert_file": keys.garbage_file}},
                              "http.tls_cert_file"),
        "websocket host 0.0.0.0 anonymous": ({"websocket": {"host": "0.0.0.0"}},
                                             "websocket.host: '0.0.0.0' is not loopback and auth.required = false"),
        "http host non-loopback anonymous": ({"http": {"enabled": True, "host": "::", "port": 0}},
                                             "http.host: '::' is not loopback and auth.required = false"),
        "hmac secret missing": ({"auth": {"required": True, "hmac_secret_file": missing}},
                                "auth.hmac_secret_file: cannot read"),
    }


SERVE_CASES = ["websocket cert missing", "websocket key missing", "websocket cert without key",
               "websocket cert garbage", "websocket key of another cert", "http cert missing",
               "http cert garbage",
               "websocket host 0.0.0.0 anonymous", "http host non-loopback anonymous", "hmac secret missing"]


@pytest.fixture(scope="module")
def refusals(keys: Keys) -> Iterator[dict[str, subprocess.CompletedProcess[str]]]:
    """Every case of ``_serve_cases`` run by a real ``aivad serve`` at once; their results by case."""
    directory = short_tmp_dir()
    procs = {}
    for n, (case, (sections, _)) in enumerate(_serve_cases(keys, directory).items()):
        home = directory / str(n)
        home.mkdir()
        doc = test_config(home, **sections)
        doc["websocket"].setdefault("port", 0)
        (home / "config.toml").write_text(to_toml(doc))
        procs[case] = subprocess.Popen([sys.executable, "-m", "aivad", "serve", "--config", "config.toml"],
                                       cwd=home, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = {}
    try:
        for case, proc in procs.items():
            try:
                out, err = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
            results[case] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        yield results
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.parametrize("case", SERVE_CASES)
def test_aivad_serve_refuses_to_start_with_one_line(refusals: dict[str, subprocess.CompletedProcess[str]],
                                                    keys: Keys, case: str) -> None:
    result = refusals[case]
    expected = _serve_cases(keys, Path("/"))[case][1]
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("aivad: config:")]
    assert len(lines) == 1, result.stderr
    assert expected in lines[0], lines[0]


def test_allow_anonymous_remote_starts_on_a_wildcard_host(tmp_dir: Path) -> None:
    proc = DaemonProcess(tmp_dir, websocket={"host": "0.0.0.0"}, auth={"allow_anonymous_remote": True})
    proc.start()
    try:
        assert _listening_addresses(proc.ws_port) == {"0.0.0.0"}
        assert stat.S_IMODE(Path(proc.control_path).stat().st_mode) == 0o600
        result = trio.run(_anonymous_publish, proc.ws_url)
        assert result == "ok"
    finally:
        proc.stop()
    assert proc.proc is not None and proc.proc.returncode == 0


async def _anonymous_publish(url: str) -> str:
    with trio.fail_after(TIMEOUT_S):
        async with connect(url) as c:
            await c.ok({"op": "subscribe", "pattern": "#"})
            return str((await c.publish("anonymous.remote", 1))["op"])


def _listening_addresses(port: int) -> set[str]:
    """The local addresses with a listening TCP socket on ``port`` (from /proc/net/tcp and tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for row in f.read().splitlines()[1:]:
                local, state = row.split()[1], row.split()[3]
                address, _, hex_port = local.partition(":")
                if state == "0A" and int(hex_port, 16) == port:
                    raw = bytes.fromhex(address)
                    if len(raw) == 4:
                        found.add(str(ipaddress.IPv4Address(raw[::-1])))
                    else:
                        words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
                        found.add(str(ipaddress.IPv6Address(words)))
    return found


def test_readme_first_command_runs_anonymous_on_loopback() -> None:
    """``aivad serve`` with no config: loopback only, every right without a token, control socket 0600."""
    readme = (REPO / "README.md").read_text()
    first = re.search(r"^```sh\n(.*?)\n```", readme, re.S | re.M)
    assert first is not None
    assert first.group(1).strip().endswith(".venv/bin/aivad serve")
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the daemon does
        try:
            probe.bind(("127.0.0.1", 8765))
        except OSError:
            pytest.skip(f"port 8765 (the embedded default) is in use on this machine: {_listening_addresses(8765)}")
    directory = short_tmp_dir()
    aivad = Path(sys.executable).with_name("aivad")
    command = [str(aivad), "serve"] if aivad.exists() else [sys.executable, "-m", "aivad", "serve"]
    env = {**os.environ, "XDG_RUNTIME_DIR": str(directory)}
    with (directory / "daemon.log").open("wb") as log:
        proc = subprocess.Popen(command, cwd=directory, env=env, stdout=log, stderr=log)
    try:
        control = directory / "aivad" / "control.sock"
        def up() -> bool:
            if proc.poll() is not None:
                log = (directory / "daemon.log").read_text()
                if "Address already in use" in log:  # taken since the probe above
                    pytest.skip("port 8765 (the embedded default) is in use on this machine")
                pytest.fail(log)
            return control.exists()

        poll_until(up, 20, "the control socket did not appear")
        assert stat.S_IMODE(control.stat().st_mode) == 0o600
        assert trio.run(_anonymous_publish, "ws://127.0.0.1:8765/") == "ok"
        assert _listening_addresses(8765) == {"127.0.0.1"}
        assert (directory / "var" / "aivad.db").exists()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(directory, ignore_errors=True)


# ---- 9. audit: metrics, rate-limited logs without tokens -----------------------------------------------


async def test_metrics_count_refusals_by_reason_and_right(nursery: trio.Nursery, tmp_dir: Path, keys: Keys,
                                                          bad_tokens: dict[str, tuple[Any, str]]) -> None:
    d = await start(nursery, tmp_dir, keys, with_http=True, websocket={"allowed_origins": ["https://soc.example"]})
    bad = bad_tokens
    with trio.fail_after(TIMEOUT_S):
        async with client(d) as c:
            await error(c, {"op": "subscribe", "pattern": "a"}, "unauthorized")
            await error(c, {"op": "publish", "type": "a", "payload": 1}, "unauthorized")
            for name in ("expired", "expired", "alg none", "algorithm confusion", "wrong audience"):
                await error(c, {"op": "auth", "token": bad[name][0]}, "unauthorized")
            await c.ok({"op": "auth", "token": token(keys, "alice", {"subscribe": ["a.#"]})})
            for pattern in ("#", "b.#", "*"):
                await error(c, {"op": "subscribe", "pattern": pattern}, "forbidden")
            await error(c, {"op": "history", "pattern": "#"}, "forbidden")
            await error(c, {"op": "publish", "type": "a.b", "payload": 1}, "forbidden")
            await error(c, {"op": "dispatch", "type": "x", "payload": 1}, "forbidden")
            await error(c, {"op": "worker.hello", "types": ["x"]}, "forbidden")
            await error(c, {"op": "auth", "token": token(keys, "bob")}, "forbidden")
        assert (await handshake(d.endpoints.ws_port, {"Authorization": f"Bearer {bad['garbage'][0]}"})).status == 401
        for _ in range(2):
            assert (await handshake(d.endpoints.ws_port, {"Origin": "https://evil.test"})).status == 403
        text = await metrics(d)
    unauthorized = {reason: metric(text, "aivad_auth_unauthorized_total", reason=reason)
                    for reason in ("missing", "expired", "algorithm", "bad_signature", "bad_audience", "malformed")}
    assert unauthorized == {"missing": 2, "expired": 2, "algorithm": 1, "bad_signature": 1, "bad_audience": 1,
                            "malformed": 1}
    forbidden = {right: metric(text, "aivad_auth_forbidden_total", right=right)
                 for right in ("subscribe", "publish", "dispatch", "work", "sub")}
    assert forbidden == {"subscribe": 4, "publish": 1, "dispatch": 1, "work": 1, "sub": 1}
    assert metric(text, "aivad_requests_refused_total", reason="forbidden") == 8
    # handshakes refused after they were read: by a bad Authorization header, by Origin
    assert metric(text, "aivad_connections_refused_total", reason="unauthorized") == 1
    assert metric(text, "aivad_connections_refused_total", reason="origin") == 2
    assert "# TYPE aivad_auth_unauthorized_total counter" in text
    assert "# TYPE aivad_auth_forbidden_total counter" in text


def test_a_flood_of_bad_tokens_logs_a_few_lines_and_never_a_token(tmp_dir: Path, keys: Keys) -> None:
    """The real ``aivad serve``: 200 refused tokens (on the auth op and on the handshake), then its log."""
    http_port = free_port()
    proc = DaemonProcess(tmp_dir, auth=secured(keys), http={"enabled": True, "port": http_port})
    proc.start()
    try:
        sent = trio.run(_flood, proc.ws_url, keys)
        text = trio.run(_scrape, http_port)
    finally:
        proc.stop()
    log = proc.log()
    refusal_lines = [line for line in log.splitlines() if "refused a token" in line]
    assert 1 <= len(refusal_lines) <= len(REASONS), log
    assert len(log.splitlines()) < 30, log
    assert sum(metric(text, "aivad_auth_unauthorized_total", reason=r) for r in REASONS) == len(sent)
    for bad in sent:
        assert bad not in log
        for part in bad.split("."):
            assert len(part) < 16 or part not in log, part
    assert "alice" not in log and "mallory" not in log  # nor a sub read from a refused token


async def _flood(url: str, keys: Keys) -> list[str]:
    """200 refused tokens: 180 on one connection's auth op, 20 on handshakes. Returns them."""
    kinds = [(name, bad) for name, (bad, _) in attacks(keys).items() if isinstance(bad, str) and len(bad) > 16]
    sent: list[str] = []
    port = int(url.rsplit(":", 1)[1].strip("/"))
    with trio.fail_after(TIMEOUT_S * 2):
        async with connect(url) as c:
            for i in range(180):
                name, bad = kinds[i % len(kinds)]
                if name == "expired":  # a fresh one each time: every token in the flood is distinct
                    bad = token(keys, "mallory", {"admin": True}, ttl_s=-30)
                elif name == "wrong secret":
                    bad = jwt.encode(claims("mallory", {"admin": True}), os.urandom(32).hex(), algorithm="HS256")
                sent.append(bad)
                await error(c, {"op": "auth", "token": bad}, "unauthorized")
        for _ in range(20):
            bad = jwt.encode(claims("mallory", {"admin": True}), os.urandom(32).hex(), algorithm="HS256")
            sent.append(bad)
            assert (await handshake(port, {"Authorization": f"Bearer {bad}"})).status == 401
    return sent


async def _scrape(port: int) -> str:
    response = await http_get(port, "/metrics")
    assert response.status == 200
    return response.body.decode()


# ---- 10. `aivad token` mints what the daemon accepts -----------------------------------------------------


async def test_aivad_token_is_accepted_end_to_end(nursery: trio.Nursery, tmp_dir: Path, keys: Keys) -> None:
    d = await start_daemon_from_file(nursery, tmp_dir, auth=secured(keys))
    result = await trio.run_process(
        [sys.executable, "-m", "aivad", "token", "--sub", "soc-frontend-42", "--subscribe", "incident.42.#",
         "--publish", "incident.42.note", "--ttl", "10m", "--config", str(tmp_dir / "config.toml")],
        capture_stdout=True, capture_stderr=True, check=False,
    )
    assert result.returncode == 0, result.stderr
    minted = result.stdout.decode().strip()
    with trio.fail_after(TIMEOUT_S):
        async with client(d, auth=minted) as c:
            reply = await c.ok({"op": "auth", "token": minted})
            assert reply["sub"] == "soc-frontend-42"
            expires = datetime.datetime.fromisoformat(reply["expires_at"].replace("Z", "+00:00")).timestamp()
            assert abs(expires - (time.time() + 600)) < 60
            await c.ok({"op": "subscribe", "pattern": "incident.42.alerts.*"})
            await error(c, {"op": "subscribe", "pattern": "incident.#"}, "forbidden")
            await c.publish("incident.42.note", "from a minted token")
            await error(c, {"op": "publish", "type": "incident.43.note", "payload": 1}, "forbidden")
        async with client(d, bearer=minted) as c:
            await c.publish("incident.42.note", "on the handshake")
    assert await stored(d) == ["incident.42.note", "incident.42.note"]


# ---- docs/security.md: the worked session is real --------------------------------------------------------


def _session() -> tuple[dict[str, tuple[str, dict[str, Any]]], list[tuple[str, str]]]:
    """The block marked ``security-session``: its tokens (name → sub, rights) and its →/← lines."""
    text = (REPO / "docs" / "security.md").read_text(encoding="utf-8")
    found = re.findall(r"^<!-- test: security-session -->\n```text\n(.*?)^```", text, re.S | re.M)
    assert len(found) == 1
    tokens = {m[0]: (m[1], json.loads(m[2]))
              for m in re.findall(r'^# (T\d+): sub "([^"]+)", aivad (\{.*\})$', found[0], re.M)}
    steps = [(line[0], line[2:]) for line in found[0].splitlines() if line[:2] in ("→ ", "← ")]
    return tokens, steps


def _like(documented: Any, real: Any) -> bool:
    """``real`` is what the docs show, where the string ``"…"`` stands for any value."""
    if documented == "…":
        return True
    if isinstance(documented, dict):
        return isinstance(real, dict) and documented.keys() == real.keys() and all(
            _like(value, real[key]) for key, value in documented.items())
    return bool(documented == real)


async def test_the_session_in_security_md_is_real(nursery: trio.Nursery, tmp_dir: Path, keys: Keys) -> None:
    tokens, steps = _session()
    assert set(tokens) == {"T1", "T2", "T3"} and len(steps) >= 20
    minted = {name: token(keys, sub, rights) for name, (sub, rights) in tokens.items()}
    d = await start(nursery, tmp_dir, keys)
    with trio.fail_after(TIMEOUT_S):
        async with client(d) as c:
            for direction, line in steps:
                frame = json.loads(line)
                if direction == "→":
                    if frame.get("token") in minted:
                        frame["token"] = minted[frame["token"]]
                    await c.send(frame)
                else:
                    real = await c.receive()
                    assert _like(frame, real), f"documented {line}\n      real {json.dumps(real)}"
            assert await no_more_messages(c)
