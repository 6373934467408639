"""The Python client with tokens (DESIGN §4.6, §4.8), against real daemons that require them.

Test policy for this module:

- Every daemon is the real one, in process, with ``[auth] required = true``,
  an HS256 secret file written by the test and ``leeway_s = 0`` (a token is
  dead the second its ``exp`` passes). Tokens are minted with
  :func:`aivad.auth.mint_token`; a bad one is garbage, wrongly signed or
  expired — never a mock of the daemon or of the client's transport.
- Refresh runs on real time: tokens live 3 s (``mint_token`` rounds ``exp``
  to whole seconds, so 2 to 3 s), so several refreshes fit in a few seconds.
  What is asserted is the promise, not durations: no reconnect (so no 4001),
  every message once and in order, and the token callable asked again.
- Each test with sockets runs under a real ``trio.fail_after``; the whole
  module stays well under a minute. The refresh policy itself (when the
  callable is asked) is tested without sockets on trio's ``MockClock``, with a
  wall clock that moves with it and exact times.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.lowlevel

import aivad.client
from aivad.auth import Rights, mint_token
from aivad.client import AivadError, BlockingClient, ClientOptions, TaskContext, Worker
from aivad.client._token import TokenSource, token_expiry
from tests.conftest import InProcessDaemon, start_daemon
from tests.test_docs import marked_block, page

SECRET = os.urandom(32).hex().encode()  # 64 bytes; the daemon reads it from the file below
FAST = ClientOptions(reconnect_initial_s=0.02, reconnect_max_s=0.2, request_timeout_s=10.0)
#: long enough for several refreshes of a 3 s token
REFRESH_RUN_S = 7.0


@pytest.fixture
async def authd(nursery: trio.Nursery, tmp_dir: Path) -> InProcessDaemon:
    """A daemon that requires tokens, signed with ``SECRET``, and gives them no leeway."""
    secret_file = tmp_dir / "hmac.secret"
    secret_file.write_bytes(SECRET)
    secret_file.chmod(0o600)
    auth = {"required": True, "hmac_secret_file": str(secret_file), "leeway_s": 0}
    return await start_daemon(nursery, tmp_dir, auth=auth)


class Minter:
    """A token callable: a fresh token for ``sub`` each time it is asked, counting the asks."""

    def __init__(self, sub: str, rights: Rights, ttl_s: float = 3.0) -> None:
        self.sub = sub
        self.rights = rights
        self.ttl_s = ttl_s
        self.asks = 0

    def __call__(self) -> str:
        self.asks += 1
        return mint_token(SECRET, sub=self.sub, rights=self.rights, ttl_s=self.ttl_s)


def ticker(client: aivad.client.Client, topic: str, published: list[int], until: float) -> Callable[[], Any]:
    async def publish_until() -> None:
        i = 0
        while trio.current_time() < until:
            published.append((await client.publish(topic, i)).seq)
            i += 1
            await trio.sleep(0.05)

    return publish_until


# ---- the refresh policy, on a virtual clock ----------------------------------------------

T0 = 2_000_000_000.0  # the virtual wall clock's start (integral: mint_token counts whole seconds)


class VirtualIdP:
    """An async token callable on trio's clock: tokens of ``ttl_s`` from a wall clock moving
    with it (so MockClock's jumps age them), or the same token again while ``stuck``."""

    def __init__(self, ttl_s: float = 600.0) -> None:
        self.start = trio.current_time()
        self.ttl_s = ttl_s
        self.asked_at: list[float] = []
        self.stuck = False
        self.token = ""

    def wall(self) -> float:
        return T0 + trio.current_time() - self.start

    async def __call__(self) -> str:
        self.asked_at.append(trio.current_time() - self.start)
        if not (self.stuck and self.token):
            # + 0.5: asks land on whole seconds of the wall clock; never round below one
            self.token = mint_token(SECRET, sub="v", rights=Rights(), ttl_s=self.ttl_s, now=self.wall() + 0.5)
        return self.token


async def run_refresher(source: TokenSource, generation: int, for_s: float) -> list[tuple[float, int]]:
    """Run ``keep_fresh`` for ``for_s`` virtual seconds; when it re-authenticated, with which generation."""
    start = trio.current_time()
    seen: list[tuple[float, int]] = []

    async def reauthenticate(token: str, generation: int) -> None:
        seen.append((trio.current_time() - start, generation))

    with trio.move_on_after(for_s):
        await source.keep_fresh(reauthenticate, generation)
    return seen


def test_token_expiry_reads_exp_without_verifying() -> None:
    token = mint_token(os.urandom(32), sub="x", rights=Rights(), ttl_s=60, now=T0)  # a key nobody knows
    assert token_expiry(token) == T0 + 60
    for not_a_jwt in ("", "garbage", "a.b", "a.!!.c", "a." + "e30" + ".c", "a.eyJleHAiOiJzb29uIn0.c"):
        assert token_expiry(not_a_jwt) is None  # {} and {"exp": "soon"} among them


async def test_refresh_is_asked_ahead_of_each_expiry(autojump_clock: trio.testing.MockClock) -> None:
    idp = VirtualIdP(ttl_s=600)
    source = TokenSource(idp, refresh_before_s=60, wall_clock=idp.wall)
    token, generation = await source.current()
    assert (await source.current()) == (token, generation) and idp.asked_at == [0]  # not due: no ask
    seen = await run_refresher(source, generation, 2000)
    assert idp.asked_at == pytest.approx([0, 540, 1080, 1620], abs=1e-3)
    assert seen == [(pytest.approx(t, abs=1e-3), g) for t, g in ((540, 2), (1080, 3), (1620, 4))]

    # a token shorter than 2 × refresh_before_s is refreshed halfway
    short = VirtualIdP(ttl_s=10)
    source = TokenSource(short, refresh_before_s=60, wall_clock=short.wall)
    await run_refresher(source, (await source.current())[1], 12)
    assert short.asked_at == pytest.approx([0, 5, 10], abs=1e-3)


async def test_the_same_token_again_is_retried_halfway_then_left_to_expire(
    autojump_clock: trio.testing.MockClock,
) -> None:
    idp = VirtualIdP(ttl_s=600)
    idp.stuck = True
    source = TokenSource(idp, refresh_before_s=60, wall_clock=idp.wall)
    _, generation = await source.current()
    seen = await run_refresher(source, generation, 700)
    # 60 s before expiry, then half the rest each time, until less than 1 s would be left
    assert idp.asked_at == pytest.approx([0, 540, 570, 585, 592.5, 596.25, 598.125], abs=1e-3)
    assert seen == []  # nothing new to present
    # expired (the daemon closed with 4001): the reconnect asks again
    idp.stuck = False
    token, newer = await source.current()
    assert newer == generation + 1 and len(idp.asked_at) == 8
    assert token_expiry(token) == pytest.approx(idp.wall() + 600, abs=1)


async def test_one_ask_for_concurrent_connections_and_again_after_a_refusal(
    autojump_clock: trio.testing.MockClock,
) -> None:
    asks = 0

    async def slow_idp() -> str:
        nonlocal asks
        asks += 1
        await trio.sleep(1)
        return mint_token(SECRET, sub="v", rights=Rights(), ttl_s=600)

    source = TokenSource(slow_idp, refresh_before_s=60)
    got: list[tuple[str, int]] = []
    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(lambda: _append(got, source.current()))
    assert asks == 1 and len(set(got)) == 1
    _, generation = got[0]
    source.invalidate(generation - 1)  # an older generation's refusal changes nothing
    assert (await source.current())[1] == generation and asks == 1
    source.invalidate(generation)  # HTTP 401 / close 4001 for the current one: ask again
    await source.current()
    assert asks == 2

    failures = 0

    async def failing_idp() -> str:
        nonlocal failures
        failures += 1
        raise OSError("identity provider down")

    with pytest.raises(aivad.client.AivadConnectionError, match="identity provider down"):
        await TokenSource(failing_idp, refresh_before_s=60).current()
    assert failures == 1


async def _append(into: list[Any], value: Any) -> None:
    into.append(await value)


# ---- a string token ----------------------------------------------------------------------


async def test_string_token_publish_subscribe_dispatch_and_worker(authd: InProcessDaemon) -> None:
    agent = mint_token(SECRET, sub="agent-1", ttl_s=300, rights=Rights(
        subscribe=("scan.#",), publish=("scan.#",), dispatch=("calc.#",)))
    worker = Worker(authd.ws_url, token=mint_token(SECRET, sub="worker-1", ttl_s=300, rights=Rights(work=("calc.#",))),
                    options=FAST, name="calc")

    @worker.handler("calc.add")
    async def add(task: TaskContext) -> int:
        await task.progress(0.5)
        return int(task.payload["a"] + task.payload["b"])

    with trio.fail_after(20):
        async with aivad.client.connect(authd.ws_url, token=agent, options=FAST) as client, worker.running():
            async with client.subscribe("scan.#", since=0) as sub:
                published = await client.publish("scan.completed", {"scan_id": "1"})
                env = await sub.__anext__()
                assert (env.seq, env.payload) == (published.seq, {"scan_id": "1"})
            messages, _ = await client.history("scan.#")
            assert [m.seq for m in messages] == [published.seq]
            task_id = await client.dispatch("calc.add", {"a": 2, "b": 3})
            assert (await client.collect_all([task_id], timeout=10)).completed == {task_id: 5}
            assert await client.request_response("calc.add", {"a": 1, "b": 1}, timeout=10) == 2
            # the token's rights hold: outside them is forbidden, and the connection stays usable
            with pytest.raises(AivadError) as caught:
                await client.publish("alerts.high", 1)
            assert caught.value.code == "forbidden"
            with pytest.raises(AivadError, match="forbidden"):
                await client.subscribe("alerts.#").__aenter__()
            assert (await client.publish("scan.completed", 2)).seq > published.seq
            assert client.statistics().connects == 1


async def test_bad_token_is_unauthorized_at_once(authd: InProcessDaemon) -> None:
    rights = Rights(publish=("a.#",), work=("a.#",))
    wrongly_signed = mint_token(os.urandom(32), sub="mallory", rights=rights, ttl_s=300)
    expired = mint_token(SECRET, sub="late", rights=rights, ttl_s=10, now=time.time() - 60)
    with trio.fail_after(10):
        for token in ("garbage", wrongly_signed, expired):
            with pytest.raises(AivadError) as caught:
                async with aivad.client.connect(authd.ws_url, token=token, options=FAST):
                    pytest.fail("connected with a bad token")
            assert caught.value.code == "unauthorized"
            assert "HTTP 401" in caught.value.message and token not in str(caught.value)

        # a callable is asked once more (the token may have just been rotated), then it is final
        asks = 0

        async def always_wrong() -> str:
            nonlocal asks
            asks += 1
            return wrongly_signed

        with pytest.raises(AivadError, match="unauthorized"):
            async with aivad.client.connect(authd.ws_url, token=always_wrong, options=FAST):
                pytest.fail("connected with a bad token")
        assert asks == 2

        # a callable returning something that is not a token, or a token no header can carry
        for returned in (None, "", "a b\r\nX-Evil: 1"):
            with pytest.raises(AivadError, match="unauthorized"):
                async with aivad.client.connect(authd.ws_url, token=lambda r=returned: r, options=FAST):
                    pytest.fail("connected")

        worker = Worker(authd.ws_url, token=wrongly_signed, options=FAST)
        worker.register("a.run", lambda task: None)
        with pytest.raises(AivadError, match="unauthorized"):
            async with worker.running():
                pytest.fail("a worker with a bad token ran")

        # no token at all: the daemon serves ping, refuses the rest (its rule; the client surfaces it)
        async with aivad.client.connect(authd.ws_url, options=FAST) as anonymous:
            assert await anonymous.ping() >= 0
            with pytest.raises(AivadError, match="unauthorized"):
                await anonymous.publish("a.b", 1)

    with pytest.raises(TypeError, match="token must be"):
        async with aivad.client.connect(authd.ws_url, token=b"bytes"):  # type: ignore[arg-type]
            pytest.fail("connected")


async def test_string_token_ends_with_4001_then_unauthorized(authd: InProcessDaemon) -> None:
    """A string cannot be refreshed: at expiry 4001, and the reconnect's handshake is refused."""
    token = mint_token(SECRET, sub="short", rights=Rights(subscribe=("s.#",), publish=("s.#",)), ttl_s=2)
    with trio.fail_after(15):
        async with aivad.client.connect(authd.ws_url, token=token, options=FAST) as client:
            async with client.subscribe("s.#") as sub:
                published = await client.publish("s.x", 1)
                assert (await sub.__anext__()).seq == published.seq
                with pytest.raises(AivadError) as caught:
                    await sub.__anext__()
                assert caught.value.code == "unauthorized"
                assert caught.value.message.endswith("(HTTP 401: token has expired)")  # the daemon's reason
                with pytest.raises(StopAsyncIteration):
                    await sub.__anext__()  # ended, not retried
            with pytest.raises(AivadError, match="unauthorized"):
                await client.publish("s.x", 2)


# ---- a token callable: refresh ----------------------------------------------------------


async def test_callable_token_refreshes_keep_subscriptions_and_worker_connected(authd: InProcessDaemon) -> None:
    """Tokens of 3 s for 7 s: the client and the worker refresh several times, no connection
    ends (no 4001), and the subscriptions see every message once — also the one nobody reads
    meanwhile (refreshing it is the client's task, not its iterator's)."""
    agent = Minter("agent-1", Rights(subscribe=("feed.#",), publish=("feed.#",), dispatch=("job.#",)))
    worker_tokens = Minter("worker-1", Rights(work=("job.#",)))

    async def agent_token() -> str:  # an async callable for the client, a plain one for the worker
        await trio.lowlevel.checkpoint()
        return agent()

    worker = Worker(authd.ws_url, token=worker_tokens, options=FAST, name="echo")

    @worker.handler("job.echo")
    async def echo(task: TaskContext) -> Any:
        await task.progress(0.5)
        return task.payload

    published: list[int] = []
    live_seqs: list[int] = []
    answers: list[Any] = []
    with trio.fail_after(REFRESH_RUN_S + 20):
        async with (
            aivad.client.connect(authd.ws_url, token=agent_token, options=FAST) as client,
            worker.running(),
            client.subscribe("feed.#") as live,
            client.subscribe("feed.#") as idle,
        ):
            until = trio.current_time() + REFRESH_RUN_S

            async def read_live() -> None:
                async for env in live:
                    assert env.seq is not None
                    live_seqs.append(env.seq)
                    if env.payload == "end":
                        return

            async def request_until() -> None:
                i = 0
                while trio.current_time() < until:
                    answers.append(await client.request_response("job.echo", i, timeout=10))
                    i += 1
                    await trio.sleep(0.3)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_live)
                nursery.start_soon(request_until)
                await ticker(client, "feed.tick", published, until)()
                published.append((await client.publish("feed.tick", "end")).seq)

            idle_seqs = []
            async for env in idle:
                assert env.seq is not None
                idle_seqs.append(env.seq)
                if env.payload == "end":
                    break

            assert live_seqs == published and idle_seqs == published, "a gap or a duplicate"
            assert answers == list(range(len(answers))) and len(answers) >= 10
            assert client.statistics().connects == 1
            assert live.statistics().reconnects == 0 and idle.statistics().reconnects == 0
            assert worker.statistics().connects == 1
    assert agent.asks >= 4 and worker_tokens.asks >= 4, (agent.asks, worker_tokens.asks)


async def test_4001_reconnects_with_a_fresh_token_and_resumes(authd: InProcessDaemon) -> None:
    """A callable whose cache renews only at expiry: refreshing brings nothing new, so the daemon
    closes with 4001; the reconnect asks again, gets a new token and resumes without a gap."""
    rights = Rights(subscribe=("r.#",), publish=("r.#",))
    cached = ""
    asks = 0

    def late_cache() -> str:
        nonlocal cached, asks
        asks += 1
        if not cached or time.time() >= token_expiry(cached):  # type: ignore[operator]
            cached = mint_token(SECRET, sub="cache", rights=rights, ttl_s=2)
        return cached

    published: list[int] = []
    seqs: list[int] = []
    with trio.fail_after(25):
        async with (
            aivad.client.connect(authd.ws_url, token=late_cache, options=FAST) as client,
            client.subscribe("r.#") as sub,
        ):
            async with trio.open_nursery() as nursery:

                async def read() -> None:
                    async for env in sub:
                        assert env.seq is not None
                        seqs.append(env.seq)
                        if env.payload == "end":
                            return

                nursery.start_soon(read)
                await ticker(client, "r.x", published, trio.current_time() + 4.5)()
                published.append((await client.publish("r.x", "end")).seq)
            assert seqs == published, "a gap or a duplicate"
            assert sub.statistics().reconnects >= 1  # at least one 4001 happened
            assert sub.statistics().gaps == 0
    assert asks >= 3


async def test_narrowed_rights_end_the_subscription_with_forbidden(authd: InProcessDaemon) -> None:
    """A refresh that takes ``b.#`` (and the task events ``on_result`` follows) away ends those
    subscriptions with ``forbidden``; ``a.#`` and the client go on."""
    wide = Rights(subscribe=("a.#", "b.#", "task.*"), publish=("a.#", "b.#"), dispatch=("n.#",))
    narrow = Rights(subscribe=("a.#",), publish=("a.#", "b.#"), dispatch=("n.#",))
    narrowed = False

    def token() -> str:
        return mint_token(SECRET, sub="ui", rights=narrow if narrowed else wide, ttl_s=3)

    with trio.fail_after(15):
        async with (
            aivad.client.connect(authd.ws_url, token=token, options=FAST) as client,
            client.subscribe("a.#") as a,
            client.subscribe("b.#") as b,
        ):
            first = await client.publish("b.x", 1)
            assert (await b.__anext__()).seq == first.seq
            task_id = await client.dispatch("n.run", None)  # no worker: it stays queued
            await client.on_result(task_id, lambda status: pytest.fail("no result was expected"))
            narrowed = True  # the next refresh (in 1 to 1.5 s) narrows the rights
            with pytest.raises(AivadError) as caught:
                async for _ in b:
                    pytest.fail("nothing was published to b.# meanwhile")
            assert caught.value.code == "forbidden"
            with pytest.raises(StopAsyncIteration):
                await b.__anext__()  # ended for good, not resubscribed
            later = await client.publish("a.x", 2)
            assert (await a.__anext__()).seq == later.seq
            assert a.statistics().reconnects == 0 and b.statistics().reconnects == 0
            with pytest.raises(AivadError, match="forbidden"):
                await client.subscribe("b.#").__aenter__()
            while client._results is not None:  # the on_result watcher ended too, not the client
                await trio.sleep(0.01)
            with pytest.raises(AivadError, match="forbidden"):
                await client.on_result(task_id, lambda status: None)
            assert (await client.get_task_status(task_id)).state == "queued"


# ---- the blocking facade, and the documented example ---------------------------------------


async def test_blocking_client_with_tokens(authd: InProcessDaemon) -> None:
    rights = Rights(subscribe=("blk.#",), publish=("blk.#",))
    minter = Minter("sync-agent", rights)

    def agent() -> list[int]:
        with BlockingClient(authd.ws_url, token=minter, options=FAST) as client, client.subscribe("blk.#") as sub:
            published = []
            deadline = time.monotonic() + 4.0  # across at least two refreshes
            while time.monotonic() < deadline:
                published.append(client.publish("blk.a", len(published)).seq)
                time.sleep(0.1)
            received = [env.seq for _, env in zip(published, sub, strict=False)]  # published first: it ends
            assert received == published
            assert sub.statistics().reconnects == 0 and client.statistics().connects == 1
        with pytest.raises(AivadError, match="unauthorized"), BlockingClient(authd.ws_url, token="garbage"):
            pytest.fail("connected with a bad token")
        with BlockingClient(authd.ws_url, token=mint_token(SECRET, sub="s", rights=rights, ttl_s=60)) as client:
            return [client.publish("blk.b", 1).seq]

    with trio.fail_after(30):
        assert len(await trio.to_thread.run_sync(agent, abandon_on_cancel=True)) == 1
    assert minter.asks >= 3


async def test_documented_token_example_runs(authd: InProcessDaemon, tmp_dir: Path) -> None:
    """The marked example of docs/protocol.md, run as its own process against a daemon requiring tokens."""
    code = marked_block(page("protocol.md"), "python-client-token")
    token_file = tmp_dir / "token"
    token_file.write_text(mint_token(SECRET, sub="scanner-1", rights=Rights(
        subscribe=("scan.*",), publish=("scan.*",)), ttl_s=60) + "\n")
    assert "ws://127.0.0.1:8765/" in code and "/run/aivad/token" in code
    code = code.replace("ws://127.0.0.1:8765/", authd.ws_url).replace("/run/aivad/token", str(token_file))
    with trio.fail_after(30):
        done = await trio.run_process([sys.executable, "-c", code], capture_stdout=True, capture_stderr=True,
                                      check=False)
    assert done.returncode == 0, done.stderr.decode()
    assert b"scan_id" in done.stdout
