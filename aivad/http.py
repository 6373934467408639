"""EDGE: the HTTP server — health, metrics, the HTTP API, the browser client and the console.

The only module that imports hypercorn. Its trio worker serves a small ASGI app
written by hand inside the daemon's own trio loop, so ``/healthz`` answering
*is* the proof that the loop runs. Routes (DESIGN §4.7, §4.9, fixed paths):

* ``GET /healthz``, ``/readyz``, ``/metrics`` — for operators and scrapers;
* ``POST /api/<command>`` — every control command (``aivad.commands``, the same
  table the control socket uses: the same fields, the same replies), JSON in and
  out, ``Authorization: Bearer`` tokens decided by the operations layer; errors
  are ``{"ok": false, "error": {"code", "message"}}`` with the HTTP status of
  their code;
* ``GET /client.js`` — the browser client; ``GET /console`` (and its assets
  under ``/console/``) — the web console; ``GET /console/config.json`` — what
  the console needs to know: where the WebSocket is, whether a token is needed.

The edge only translates: a request body becomes a command call, an
``OpError`` becomes an HTTP status. Bounds: open connections, in all and per
address (``[http] max_connections``, ``max_connections_per_address``: refused
with 503 / 429 before a byte is read, by the gate the WebSocket server uses),
the request body (``[http] max_body_bytes``, 413 beyond), and the same per-peer
rates as a WebSocket connection (one bucket per client address, in a bounded table).

Hypercorn has no bound on its connections, so the accept loop is ours
(:func:`serve_http`): each admitted connection is handed to hypercorn's
``TCPServer`` — the three names imported from ``hypercorn.trio`` internals
below are what ``hypercorn.trio.serve`` itself uses, pinned by tests/test_http.py.
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, MutableMapping
from functools import partial
from typing import Any

import attrs
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.utils import wrap_app

from .boundary import Faults
from .commands import COMMANDS
from .config import HttpConfig
from .limits import PeerGate, peer_of, refuse
from .ops import Caller, Operations, Quota
from .protocol import OpError, decode_request, dumps
from .web import ASSETS, read_asset

__all__ = ["METRICS_CONTENT_TYPE", "STATUS_OF", "Api", "make_app", "serve_http"]

log = logging.getLogger(__name__)

METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_TEXT = b"text/plain; charset=utf-8"
_JSON = b"application/json"

#: DESIGN §4.8: error codes → HTTP statuses (fixed); unknown_op is an unknown path here
STATUS_OF = {
    "bad_json": 400,
    "bad_request": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "not_found": 404,
    "unknown_op": 404,
    "too_large": 413,
    "overloaded": 429,
    "timeout": 504,
    "internal": 500,
}
#: peers whose rate buckets are kept (the oldest is forgotten beyond it)
MAX_PEERS = 4096
#: console pages: path → asset name (the console is assets of aivad.web)
CONSOLE = {"/console": "console.html", "/console/": "console.html"}

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]


@attrs.frozen
class Response:
    status: int
    content_type: bytes
    body: bytes
    headers: tuple[tuple[bytes, bytes], ...] = ()


def _json_response(status: int, obj: Any) -> Response:
    return Response(status, _JSON, dumps(obj).encode())


def _error(exc: OpError) -> Response:
    return _json_response(STATUS_OF[exc.code], {"ok": False, "error": {"code": exc.code, "message": exc.message}})


class Api:
    """``POST /api/<command>`` and the console's config: the HTTP face of the operations layer."""

    def __init__(self, cfg: HttpConfig, ops: Operations, websocket: Callable[[], tuple[str, int]]) -> None:
        self.cfg = cfg
        self.ops = ops
        #: (scheme, port) of the WebSocket server, for the console's config
        self._websocket = websocket
        self._quotas: OrderedDict[str, Quota] = OrderedDict()
        #: error replies by code (too_large, overloaded, unauthorized…): aivad_http_api_errors_total
        self.errors: Counter[str] = Counter()
        #: admits the server's connections (serve_http); its counts are status.http and /metrics'
        self.gate = connection_gate(cfg)

    def _quota(self, address: str) -> Quota:
        quota = self._quotas.pop(address, None) or self.ops.quota()
        self._quotas[address] = quota
        if len(self._quotas) > MAX_PEERS:
            self._quotas.popitem(last=False)
        return quota

    def _caller(self, scope: Scope, headers: dict[bytes, bytes]) -> Caller:
        address = str((scope.get("client") or ("?", 0))[0])
        caller = self.ops.caller("http", address, self._quota(address))
        authorization = headers.get(b"authorization")
        if authorization is not None:
            scheme, _, token = authorization.decode("latin-1").partition(" ")
            if scheme.lower() != "bearer":
                raise OpError("unauthorized", "Authorization must be: Bearer <token>")
            caller = self.ops.authenticate(caller, token.strip())
        self.ops.require_authenticated(caller)
        return caller

    async def command(self, name: str, scope: Scope, receive: Receive) -> Response:
        """Run one command: its body is the request object (``{}`` when empty)."""
        try:
            command = COMMANDS.get(name)
            if command is None:
                raise OpError("unknown_op", f"unknown command: {name[:64]}")
            headers = {k.lower(): v for k, v in scope["headers"]}
            body = await _read_body(receive, self.cfg.max_body_bytes)
            caller = self._caller(scope, headers)
            try:
                request = decode_request(body.decode("utf-8")) if body.strip() else {}
            except UnicodeDecodeError:
                raise OpError("bad_json", "the body is not UTF-8") from None
            reply = await command(self.ops, caller, request)
        except OpError as exc:
            self.errors[exc.code] += 1
            return _error(exc)
        except Exception:  # the error boundary of one request: Cancelled passes
            log.exception("HTTP API command %s failed", name[:64])
            self.errors["internal"] += 1
            return _error(OpError("internal", "internal error"))
        return _json_response(200, {"ok": True, **reply})

    def console_config(self, scope: Scope) -> Response:
        """Where the console's WebSocket is: the host the browser used, the WebSocket port."""
        headers = {k.lower(): v for k, v in scope["headers"]}
        host = headers.get(b"host", b"127.0.0.1").decode("latin-1")
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        scheme, port = self._websocket()
        return _json_response(200, {"websocket_url": f"{scheme}://{name}:{port}/",
                                    "auth_required": self.ops.auth.required})


async def _read_body(receive: Receive, limit: int) -> bytes:
    """The request body, at most ``limit`` bytes (``too_large`` beyond: the rest is not read)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise OpError("bad_request", "the client went away")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise OpError("too_large", f"a request body is limited to {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _static(name: str) -> Response:
    """A packaged asset; the browser client may be imported from pages of any origin (CORS)."""
    headers = ((b"access-control-allow-origin", b"*"),) if name == "client.js" else ()
    return Response(200, ASSETS[name].encode(), read_asset(name), headers)


def make_app(readiness: Callable[[], list[str]], metrics_text: Callable[[], bytes], api: Api | None = None) -> App:
    """The ASGI app: the routes of this module's docstring; 404 elsewhere, 405 for other methods.

    Handles the lifespan protocol itself (nothing to start or stop) so hypercorn
    does not log a lifespan warning on every start.
    """

    def get(path: str, scope: Scope) -> Response | None:
        if path == "/healthz":
            return Response(200, _TEXT, b"ok\n")
        if path == "/readyz":
            reasons = readiness()
            if not reasons:
                return Response(200, _TEXT, b"ready\n")
            return Response(503, _TEXT, "".join(f"{r}\n" for r in reasons).encode("utf-8"))
        if path == "/metrics":
            return Response(200, METRICS_CONTENT_TYPE.encode("ascii"), metrics_text())
        if api is None:
            return None
        if path == "/client.js":
            return _static("client.js")
        if path == "/console/config.json":
            return api.console_config(scope)
        if path in CONSOLE and CONSOLE[path] in ASSETS:
            return _static(CONSOLE[path])
        asset = path.removeprefix("/console/")
        if path.startswith("/console/") and asset in ASSETS:
            return _static(asset)
        return None

    async def route(scope: Scope, receive: Receive) -> Response:
        path, method = scope["path"], scope["method"]
        if api is not None and path.startswith("/api/"):
            if method != "POST":
                return Response(405, _TEXT, b"method not allowed: POST a JSON object\n", ((b"allow", b"POST"),))
            return await api.command(path.removeprefix("/api/"), scope, receive)
        if method in ("GET", "HEAD"):
            found = get(path, scope)
            if found is not None:
                return found
        if get(path, scope) is not None:
            return Response(405, _TEXT, b"method not allowed\n", ((b"allow", b"GET, HEAD"),))
        return Response(404, _TEXT, b"not found\n")

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return  # a websocket upgrade on this port: hypercorn closes it
        response = await route(scope, receive)
        headers = [
            *response.headers,
            (b"content-type", response.content_type),
            (b"content-length", str(len(response.body)).encode("ascii")),
            (b"cache-control", b"no-store"),
            (b"x-content-type-options", b"nosniff"),
        ]
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else response.body})

    return app


def connection_gate(cfg: HttpConfig) -> PeerGate:
    """The gate of the HTTP server's connections: in all and per address (no handshake phase)."""
    return PeerGate(cfg.max_connections, cfg.max_connections_per_address, cfg.max_connections)


def _hypercorn_config(cfg: HttpConfig) -> HypercornConfig:
    """Hypercorn settings for an internal endpoint: quiet, no access log (the listeners are ours)."""
    config = HypercornConfig()
    config.accesslog = None  # scrapes every 15 s are not events
    server_log = logging.getLogger(f"{__name__}.server")
    server_log.setLevel(logging.WARNING)  # drops "Running on … (CTRL + C to quit)"; errors still log
    config.errorlog = server_log  # a Logger: hypercorn uses it as is, our handler formats it
    config.include_server_header = False
    config.h11_max_incomplete_size = 16 * 1024  # request line and headers
    # a peer that sends nothing for read_timeout_s — mid-request, between requests, or having sent
    # nothing before it went (hypercorn then holds the connection, and its place at the gate, until
    # keep_alive_timeout) — is dropped; Prometheus keeps its connection between scrapes (15 s)
    config.read_timeout = max(1, round(cfg.read_timeout_s))  # hypercorn takes whole seconds
    config.keep_alive_timeout = config.read_timeout
    if cfg.tls_cert_file:  # https: the console and the API over TLS
        config.certfile, config.keyfile = cfg.tls_cert_file, cfg.tls_key_file
    return config


async def serve_http(
    cfg: HttpConfig,
    readiness: Callable[[], list[str]],
    metrics_text: Callable[[], bytes],
    api: Api | None = None,
    *,
    faults: Faults | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the HTTP routes on ``cfg.host:cfg.port`` until cancelled.

    Returns: never (cancel the enclosing scope to stop). ``started()`` gets the
    bound TCP port once the socket listens (the real one when ``cfg.port`` is 0).
    Without ``api`` only the operator routes are served.
    Resource handling: the listeners and every connection close on exit; a
    connection beyond ``max_connections`` (or ``max_connections_per_address``)
    is answered 503 (429) and closed before a byte of it is read.
    Error handling: a failing command is its error response (``internal``
    logged); a failing ``readiness()``/``metrics_text()`` becomes a 500 logged by
    hypercorn; what else escapes hypercorn for one connection ends that connection
    alone (recorded in ``faults``); a bind error (port in use) raises OSError out of
    ``start()``, before readiness.
    """
    config = _hypercorn_config(cfg)
    try:
        listeners = await trio.open_tcp_listeners(cfg.port, host=cfg.host)
    except OSError as exc:  # the operator reads "http 127.0.0.1:8766: Address already in use"
        raise OSError(exc.errno, f"http {cfg.host}:{cfg.port}: {exc.strerror}") from None
    served: list[trio.abc.Listener[Any]] = list(listeners)
    if cfg.tls_cert_file:  # https: hypercorn's own TLS settings (ALPN among them)
        context = config.create_ssl_context()
        assert context is not None  # certfile is set
        served = [trio.SSLListener(listener, context, https_compatible=True) for listener in listeners]
    gate = api.gate if api is not None else connection_gate(cfg)
    faults = faults or Faults()
    app = wrap_app(make_app(readiness, metrics_text, api), config.wsgi_max_body_size, "asgi")  # type: ignore[arg-type]
    worker = WorkerContext(None)

    async def serve_connection(stream: trio.SocketStream | trio.SSLStream[trio.SocketStream]) -> None:
        peer = peer_of(stream)
        if peer is None:
            await stream.aclose()
            return
        admission = gate.enter(peer[0])
        if isinstance(admission, str):
            await refuse(stream, admission)
            return
        gate.handshake_done(admission)  # (HTTP has no handshake phase: a connection counts as one)
        try:  # the connection's error boundary: what escapes hypercorn ends this connection alone
            await TCPServer(app, config, worker, {}, stream)  # type: ignore[arg-type]
        except* Exception as group:  # noqa: BLE001 - recorded, then ended
            faults.record("http.connection", f"{peer[0]}:{peer[1]}", group)
        finally:
            gate.leave(admission)

    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as handlers:
        await handlers.start(partial(trio.serve_listeners, serve_connection, served, handler_nursery=handlers))
        log.info("HTTP on %s://%s:%d", "https" if cfg.tls_cert_file else "http", cfg.host, port)
        task_status.started(port)
