"""The operator HTTP endpoints, served by hypercorn's HTTP/1.1 and HTTP/2 machinery on a real port.

Policy: ``serve_http`` runs inside the test's trio loop on port 0 and is asked
over a real TCP connection with hand-written HTTP/1.1 (no client library, so
what is tested is the bytes a curl or a Prometheus scraper would see). Real
sockets: real time, bounded by ``trio.fail_after``, never the autojump clock.
"""

from __future__ import annotations

import contextlib
import gc
import socket
import warnings
from collections.abc import AsyncIterator, Callable

import pytest
import trio

from aivad.config import HttpConfig
from aivad.http import METRICS_CONTENT_TYPE, serve_http


class Response:
    def __init__(self, raw: bytes) -> None:
        head, _, self.body = raw.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        self.status = int(status_line.split(" ")[1])
        self.headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in header_lines)}


async def request(port: int, method: str, path: str, host: str = "127.0.0.1") -> Response:
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream(host, port)
        async with stream:
            await stream.send_all(
                f"{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode()
            )
            raw = b""
            while chunk := await stream.receive_some():
                raw += chunk
    return Response(raw)


class State:
    """What the daemon would own: readiness reasons and a metrics renderer."""

    def __init__(self) -> None:
        self.reasons: list[str] = []
        self.scrapes = 0

    def readiness(self) -> list[str]:
        return list(self.reasons)

    def metrics(self) -> bytes:
        self.scrapes += 1
        return b"# TYPE aivad_websocket_connections gauge\naivad_websocket_connections 3\n"


@pytest.fixture
def state() -> State:
    return State()


@pytest.fixture
async def port(state: State) -> AsyncIterator[int]:
    async with trio.open_nursery() as nursery:
        bound: int = await nursery.start(serve_http, HttpConfig(enabled=True, port=0), state.readiness, state.metrics)
        yield bound
        nursery.cancel_scope.cancel()


async def test_started_reports_the_real_port(port: int) -> None:
    assert port != 0
    assert (await request(port, "GET", "/healthz")).status == 200


async def test_healthz(port: int) -> None:
    response = await request(port, "GET", "/healthz")
    assert (response.status, response.body) == (200, b"ok\n")
    assert response.headers["content-type"].startswith("text/plain")


async def test_readyz_follows_readiness(port: int, state: State) -> None:
    response = await request(port, "GET", "/readyz")
    assert (response.status, response.body) == (200, b"ready\n")
    state.reasons = ["amqp: enabled but not consuming (connection refused)", "store: opening"]
    response = await request(port, "GET", "/readyz")
    assert response.status == 503
    assert response.body.decode().splitlines() == state.reasons
    state.reasons = []
    assert (await request(port, "GET", "/readyz")).status == 200


async def test_metrics(port: int, state: State) -> None:
    response = await request(port, "GET", "/metrics?name[]=x")
    assert response.status == 200
    assert response.headers["content-type"] == METRICS_CONTENT_TYPE
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert b"aivad_websocket_connections 3\n" in response.body
    assert int(response.headers["content-length"]) == len(response.body)
    assert state.scrapes == 1


async def test_head_has_no_body(port: int) -> None:
    response = await request(port, "HEAD", "/healthz")
    assert (response.status, response.body) == (200, b"")


@pytest.mark.parametrize("path", ["/", "/health", "/healthz/", "/metrics/x"])
async def test_unknown_path_is_404(port: int, path: str) -> None:
    assert (await request(port, "GET", path)).status == 404


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE"])
async def test_wrong_method_is_405(port: int, method: str) -> None:
    response = await request(port, method, "/healthz")
    assert response.status == 405
    assert response.headers["allow"] == "GET, HEAD"


async def test_failing_callback_is_a_500_and_the_server_stays(caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> list[str]:
        raise RuntimeError("readiness exploded")

    metrics: Callable[[], bytes] = lambda: b""  # noqa: E731
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_http, HttpConfig(enabled=True, port=0), broken, metrics)
        assert (await request(port, "GET", "/readyz")).status == 500
        assert (await request(port, "GET", "/healthz")).status == 200
        nursery.cancel_scope.cancel()
    assert "readiness exploded" in caplog.text


async def test_no_access_log_at_info(port: int, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO")
    await request(port, "GET", "/metrics")
    await request(port, "GET", "/nope")
    # no line per request (an access log); the server's own start-up line may land here too
    assert [r for r in caplog.records if "/metrics" in r.getMessage() or "/nope" in r.getMessage()] == []


async def _read_all(stream: trio.SocketStream) -> Response:
    raw = b""
    while chunk := await stream.receive_some():
        raw += chunk
    return Response(raw)


@pytest.mark.parametrize(("limits", "status"), [
    ({"max_connections": 2}, 503),
    ({"max_connections_per_address": 2}, 429),
])
async def test_connections_beyond_the_limits_are_refused_before_a_byte_is_read(
    state: State, limits: dict[str, int], status: int
) -> None:
    """Idle peers hold at most the limit: the next one is answered at once and closed, and a place
    that frees up serves again (hypercorn alone keeps every connection until its read timeout)."""
    cfg = HttpConfig(enabled=True, port=0, read_timeout_s=1.0, **limits)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_http, cfg, state.readiness, state.metrics)
            idle = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(2)]
            await trio.sleep(0.2)  # both accepted and admitted
            async with await trio.open_tcp_stream("127.0.0.1", port) as third:
                refused = await _read_all(third)  # sent nothing: the answer comes unasked
            assert refused.status == status and b"too many connections" in refused.body
            assert refused.headers["connection"] == "close"
            await idle.pop().aclose()
            with trio.fail_after(10):  # a peer that sent nothing keeps its place until read_timeout_s
                while True:  # until the server has let it go (a refusal may reset our unread request)
                    with contextlib.suppress(trio.BrokenResourceError):
                        if (response := await request(port, "GET", "/healthz")).status == 200:
                            break
                    await trio.sleep(0.05)
            assert response.body == b"ok\n"
            for stream in idle:
                await stream.aclose()
            nursery.cancel_scope.cancel()


async def test_port_in_use_is_one_oserror() -> None:
    with socket.socket() as taken, warnings.catch_warnings():
        # hypercorn 0.18 does not close the socket whose bind() failed; the
        # daemon exits on this error anyway, but here the GC would report it
        # in a later test. Collect it now, with its ResourceWarning ignored.
        warnings.simplefilter("ignore", ResourceWarning)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        in_use = taken.getsockname()[1]
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(serve_http, HttpConfig(enabled=True, port=in_use), list, bytes)
        except ExceptionGroup as group:
            # start() raised one plain OSError naming the address; the group is this test's nursery.
            [error] = group.exceptions
            message = str(error)
            assert isinstance(error, OSError)
        else:
            pytest.fail("serve_http started on a port in use")
        del error
        gc.collect()
    assert message.endswith(f"http 127.0.0.1:{in_use}: Address already in use")


async def test_ipv6_loopback() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback")
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_http, HttpConfig(enabled=True, host="::1", port=0), list, bytes)
        assert (await request(port, "GET", "/healthz", host="::1")).status == 200
        nursery.cancel_scope.cancel()
