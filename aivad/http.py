"""HTTP for operators: ``/healthz``, ``/readyz``, ``/metrics`` (DESIGN §4.7).

EDGE module: the only one that imports hypercorn. The ASGI app is a dozen lines
written by hand — three fixed GET routes need no framework — and hypercorn's
trio worker serves it inside the daemon's own trio loop, so ``/healthz``
answering *is* the proof that the loop runs.

The daemon hands in two synchronous callables and keeps ownership of the state
behind them: ``readiness()`` returns the reasons it is not ready ([] = ready),
``metrics_text()`` renders the Prometheus text format. Both are called on the
loop for each request, so they must be cheap and must not block.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

from aivad.config import HttpConfig
from aivad.exceptions import sole_exception

__all__ = ["METRICS_CONTENT_TYPE", "make_app", "serve_http"]

log = logging.getLogger(__name__)

METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_TEXT = b"text/plain; charset=utf-8"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]


def make_app(readiness: Callable[[], list[str]], metrics_text: Callable[[], bytes]) -> App:
    """The ASGI app: three GET (and HEAD) routes, 404 elsewhere, 405 for other methods.

    Handles the lifespan protocol itself (nothing to start or stop) so hypercorn
    does not log a lifespan warning on every start.
    """

    def route(path: str) -> tuple[int, bytes, bytes] | None:
        if path == "/healthz":
            return 200, _TEXT, b"ok\n"
        if path == "/readyz":
            reasons = readiness()
            if not reasons:
                return 200, _TEXT, b"ready\n"
            return 503, _TEXT, "".join(f"{r}\n" for r in reasons).encode("utf-8")
        if path == "/metrics":
            return 200, METRICS_CONTENT_TYPE.encode("ascii"), metrics_text()
        return None

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
            return  # websocket upgrade on the metrics port: hypercorn closes it
        headers: list[tuple[bytes, bytes]] = []
        found = route(scope["path"]) if scope["method"] in ("GET", "HEAD") else None
        if found is not None:
            status, content_type, body = found
        elif scope["path"] in ("/healthz", "/readyz", "/metrics"):
            status, content_type, body = 405, _TEXT, b"method not allowed\n"
            headers.append((b"allow", b"GET, HEAD"))
        else:
            status, content_type, body = 404, _TEXT, b"not found\n"
        headers += [
            (b"content-type", content_type),
            (b"content-length", str(len(body)).encode("ascii")),
            (b"cache-control", b"no-store"),
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})

    return app


def _hypercorn_config(cfg: HttpConfig) -> HypercornConfig:
    """Hypercorn settings for an internal endpoint: quiet, no access log, prompt shutdown."""
    config = HypercornConfig()
    host = f"[{cfg.host}]" if ":" in cfg.host and not cfg.host.startswith("[") else cfg.host
    config.bind = [f"{host}:{cfg.port}"]
    config.accesslog = None  # scrapes every 15 s are not events
    server_log = logging.getLogger(f"{__name__}.server")
    server_log.setLevel(logging.WARNING)  # drops "Running on … (CTRL + C to quit)"; errors still log
    config.errorlog = server_log  # a Logger: hypercorn uses it as is, our handler formats it
    config.include_server_header = False
    config.graceful_timeout = 1.0
    if cfg.tls_cert_file:  # https: the console and the API over TLS
        config.certfile, config.keyfile = cfg.tls_cert_file, cfg.tls_key_file
    config.keep_alive_timeout = 30.0  # Prometheus keeps its connection between scrapes
    return config


async def serve_http(
    cfg: HttpConfig,
    readiness: Callable[[], list[str]],
    metrics_text: Callable[[], bytes],
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the operator endpoints on ``cfg.host:cfg.port`` until cancelled.

    Returns: never (cancel the enclosing scope to stop). ``started()`` gets the
    bound TCP port once the socket listens (the real one when ``cfg.port`` is 0).
    Resource handling: hypercorn owns and closes the listening socket.
    Error handling: a failing ``readiness()``/``metrics_text()`` becomes a 500
    logged by hypercorn; a bind error (port in use) raises OSError out of
    ``start()``, before readiness.
    """
    config = _hypercorn_config(cfg)

    class _Status:
        """Turns hypercorn's ``started(["http://host:port"])`` into ``started(port)``."""

        done = False

        def started(self, binds: list[str] | None = None) -> None:
            self.done = True
            port = int(binds[0].rsplit(":", 1)[1]) if binds else cfg.port
            log.info("HTTP health and metrics on %s", ", ".join(binds or []))
            task_status.started(port)

    status = _Status()
    try:
        await serve(
            make_app(readiness, metrics_text),  # type: ignore[arg-type]
            config,
            task_status=status,  # duck-typed: only .started() is called
            mode="asgi",
        )
    except BaseExceptionGroup as group:
        # hypercorn nests a bind failure three nurseries deep; the operator
        # should read "http 127.0.0.1:8766: Address already in use", not a tree.
        leaf = sole_exception(group)
        if not status.done and isinstance(leaf, OSError):
            raise OSError(leaf.errno, f"http {cfg.host}:{cfg.port}: {leaf.strerror}") from group
        raise
