"""The web console (``GET /console``) and the browser client (``/client.js``) in a real Chromium.

Test policy for this module:

- Real parts only. Each daemon is a real ``aivad serve`` subprocess
  (:class:`ConsoleDaemon`, conftest's ``DaemonProcess`` with ``[http] enabled``)
  on free ports in its own temp dir. Tests are plain synchronous code driving
  Playwright's sync API (asyncio-based, so it cannot share a trio loop); the
  agents are the real Python client and Worker on a trio loop of their own in
  a thread (:class:`Agents`).
- The browser is Debian's ``chromium`` (``/usr/bin/chromium``, or
  ``$AIVAD_CHROMIUM``), headless, with the flags that keep it off the network
  — never a browser a tool downloads. One browser serves the module. Without
  it the module skips, unless ``AIVAD_REQUIRE_BROWSER`` is set: ``scripts/test``
  installs chromium and sets it, so CI fails rather than skips.
- What a page shows is compared with what the daemon holds, read over the
  HTTP API (``/api/history``, ``tasks``, ``workers``, ``dlq.list``, ``status``).
- Waits are bounded (Playwright's expectations, ``wait_until``) so a hang
  fails; no test asserts how fast anything was. The burst test proves the page
  keeps up by what it shows and that it still answers a click, not by timing.
- Every page fails its test if it raised an uncaught exception.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from playwright.sync_api import Browser, Page, expect, sync_playwright

import aivad.client
from aivad.auth import Rights, mint_token
from aivad.client import PermanentError, TaskContext
from tests.brokers import Redis
from tests.conftest import DaemonProcess, free_port

CHROMIUM = os.environ.get("AIVAD_CHROMIUM", "/usr/bin/chromium")
#: what python.md's probe runs Chromium with here: no sandbox as root, and no background traffic
CHROMIUM_FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
#: bound on every wait for the page (a slow CI machine, not a performance figure)
WAIT_MS = 30_000
SECRET = "console-test-secret-" + "x" * 24

expect.set_options(timeout=WAIT_MS)


# ---- real daemons, and a trio loop for the agents --------------------------------------------------


class ConsoleDaemon(DaemonProcess):
    """A real ``aivad serve`` subprocess (conftest's :class:`DaemonProcess`) with its HTTP server on.

    ``stop()`` then ``start()`` is a restart on the same ports and the same store: what an open
    page must live through. The helpers read what the daemon holds over the HTTP API."""

    def __init__(self, directory: Path, **sections: dict[str, Any]) -> None:
        self.http_port = free_port()
        super().__init__(
            directory,
            http={"enabled": True, "port": self.http_port, **sections.pop("http", {})},
            # no periodic health messages in the tail
            system={"health_interval_s": 3600.0, **sections.pop("system", {})},
            **sections,
        )

    @property
    def console_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/console"

    def restart(self) -> None:
        self.stop()
        self.start()

    def api(self, command: str, body: dict[str, Any] | None = None, token: str | None = None) -> dict[str, Any]:
        """``POST /api/<command>``; the reply (``ok: true``), else AssertionError with the error."""
        status, reply = self.api_status(command, body, token)
        assert status == 200, (command, status, reply)
        return reply

    def api_status(self, command: str, body: dict[str, Any] | None = None, token: str | None = None,
                   ) -> tuple[int, dict[str, Any]]:
        headers = {"content-type": "application/json"} | ({"authorization": f"Bearer {token}"} if token else {})
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}/api/{command}",
                                         data=json.dumps(body or {}).encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, dict(json.loads(response.read()))
        except urllib.error.HTTPError as exc:
            return exc.code, dict(json.loads(exc.read()))

    def history(self, pattern: str = "#", after: int = 0, token: str | None = None) -> list[dict[str, Any]]:
        """Every stored message matching ``pattern`` after ``after``, page by page."""
        messages: list[dict[str, Any]] = []
        while True:
            page = self.api("history", {"pattern": pattern, "after": after, "limit": 1000}, token)
            messages += page["messages"]
            if not page["messages"]:
                return messages
            after = page["last_seq"]


class Agents:
    """A trio loop in a thread for the tests' agents (the real Python client and Worker):
    Playwright's sync API owns the test's thread. ``close()`` cancels every agent."""

    def __init__(self) -> None:
        started = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None

        async def main() -> None:
            async with trio.open_nursery() as nursery:
                self._token, self._nursery = trio.lowlevel.current_trio_token(), nursery
                started.set()
                await trio.sleep_forever()

        self._thread = threading.Thread(target=trio.run, args=(main,), name="agents", daemon=True)
        self._thread.start()
        assert started.wait(10), "the agents' loop did not start"

    def run(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        """Run ``await fn(*args)`` on the agents' loop; its result."""
        return trio.from_thread.run(fn, *args, trio_token=self._token)

    def start_worker(self, url: str, name: str, handlers: dict[str, Callable[[TaskContext], Awaitable[Any]]]) -> None:
        """A real Worker, connected before this returns; it runs until ``close()``."""
        worker = aivad.client.Worker(url, concurrency=2, name=name)
        for task_type, handler in handlers.items():
            worker.register(task_type, handler)
        assert self._nursery is not None
        self.run(self._nursery.start, worker.run)

    def close(self) -> None:
        assert self._nursery is not None
        with contextlib.suppress(trio.RunFinishedError):
            trio.from_thread.run_sync(self._nursery.cancel_scope.cancel, trio_token=self._token)
        self._thread.join(30)
        assert not self._thread.is_alive(), "the agents' loop did not end"


def wait_until(check: Callable[[], Any], what: str, timeout_s: float = WAIT_MS / 1000) -> Any:
    """Poll ``check`` until it returns something truthy (returned); fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        if value := check():
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


async def publish_many(url: str, topic: str, count: int, lanes: int = 10) -> None:
    """``count`` messages on one connection, ``lanes`` publishes in flight at once."""
    async with aivad.client.connect(url) as client:

        async def lane(start: int) -> None:
            for n in range(start, count, lanes):
                await client.publish(topic, {"n": n})

        async with trio.open_nursery() as nursery:
            for start in range(lanes):
                nursery.start_soon(lane, start)


# ---- fixtures ---------------------------------------------------------------------------------------


def chromium_or_skip() -> str:
    """Debian's chromium; without it the module skips, unless ``AIVAD_REQUIRE_BROWSER`` is set
    (``scripts/test`` sets it after installing chromium, so CI fails instead of skipping)."""
    if Path(CHROMIUM).exists():
        return CHROMIUM
    why = f"{CHROMIUM} not found: the browser tests need Debian's chromium (scripts/test installs it)"
    if os.environ.get("AIVAD_REQUIRE_BROWSER"):
        pytest.fail(f"{why}, and AIVAD_REQUIRE_BROWSER is set")
    pytest.skip(why)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """One headless Chromium for the whole module (each test gets its own context)."""
    executable = chromium_or_skip()
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A fresh tab in its own context (its own sessionStorage). Fails the test on an uncaught page
    error, and on any request to another host than the local daemon (the console needs no CDN)."""
    context = browser.new_context()
    tab = context.new_page()
    errors: list[str] = []
    elsewhere: list[str] = []
    tab.on("pageerror", lambda error: errors.append(str(error)))
    tab.on("request", lambda request: None if request.url.startswith("http://127.0.0.1:")
           else elsewhere.append(request.url))
    yield tab
    context.close()
    assert errors == [], f"the page raised: {errors}"
    assert elsewhere == [], f"the page fetched from elsewhere: {elsewhere}"


@pytest.fixture
def console(tmp_dir: Path) -> Iterator[ConsoleDaemon]:
    """A started ``aivad serve`` with HTTP; stopped at teardown."""
    daemon = ConsoleDaemon(tmp_dir)
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture
def agents() -> Iterator[Agents]:
    loop = Agents()
    try:
        yield loop
    finally:
        loop.close()


def open_console(page: Page, daemon: ConsoleDaemon, hash_: str = "") -> None:
    """Open the console and wait until the tail's subscriptions are confirmed."""
    page.goto(daemon.console_url + hash_)
    expect(page.locator("#tail-following")).to_have_attribute("data-state", "subscribed")


def shown_seqs(page: Page) -> list[int]:
    """The seqs of the tail's rows, oldest first (the table shows the newest first)."""
    return [int(s) for s in page.locator("#tail-rows tr").evaluate_all("rows => rows.map(r => r.dataset.seq)")][::-1]


def following_since(page: Page) -> int:
    """The seq the tail subscribed at (from its "Following # — subscribed at seq N" line)."""
    return int(page.locator("#tail-following").inner_text().rsplit("seq ", 1)[1])


# ---- live tail --------------------------------------------------------------------------------------


def test_live_tail_shows_what_is_published_in_order_once(console: ConsoleDaemon, page: Page) -> None:
    open_console(page, console)
    since = following_since(page)
    for n in range(25):
        console.api("publish", {"type": f"orders.{'paid' if n % 2 else 'created'}", "payload": {"n": n},
                                "metadata": {"source": "shop", "correlation_id": f"order-{n}"}})
    stored = [m["seq"] for m in console.history(after=since)]
    expect(page.locator("#tail-rows tr")).to_have_count(len(stored))
    assert shown_seqs(page) == stored
    expect(page.locator("#tail-counters")).to_contain_text(f"{len(stored)} received")
    newest = page.locator("#tail-rows tr").first
    expect(newest.locator("td.type")).to_have_text("orders.created")
    expect(newest.locator("td.payload")).to_have_text('{"n":24}')

    # the detail: the whole envelope and its metadata
    newest.click()
    dialog = page.locator("#message-dialog")
    expect(dialog).to_be_visible()
    expect(dialog.locator("[data-role=title]")).to_have_text(f"Message seq {stored[-1]}")
    expect(dialog.locator(".metadata")).to_contain_text("order-24")
    envelope = json.loads(dialog.locator("pre.envelope").inner_text())
    assert envelope == console.history(after=stored[-1] - 1)[0]
    dialog.get_by_role("button", name="Close").click()
    expect(dialog).to_be_hidden()


def test_payloads_are_shown_as_text_never_as_markup(console: ConsoleDaemon, page: Page) -> None:
    open_console(page, console)
    attack = '<img src=x onerror="window.__pwned = 1"><script>window.__pwned = 2</script>'
    console.api("publish", {"type": "evil.payload", "payload": {"html": attack}, "metadata": {"x": attack}})
    row = page.locator("#tail-rows tr").first
    expect(row.locator("td.payload")).to_contain_text("<img src=x")
    row.click()
    expect(page.locator("#message-dialog .metadata")).to_contain_text(attack)
    assert page.locator("main img, main script, dialog img, dialog script").count() == 0
    assert page.evaluate("window.__pwned") is None


def test_tail_filter_and_pause(console: ConsoleDaemon, page: Page) -> None:
    open_console(page, console)
    page.locator("#tail-pattern").fill("orders.*")
    page.get_by_role("button", name="Follow").click()
    expect(page.locator("#tail-following")).to_contain_text("Following orders.* — subscribed at seq")
    expect(page.locator("#tail-following")).to_have_attribute("data-state", "subscribed")
    for topic in ("orders.created", "users.joined", "orders.paid", "orders.a.b"):
        console.api("publish", {"type": topic, "payload": None})
    expect(page.locator("#tail-rows tr")).to_have_count(2)
    assert page.locator("#tail-rows td.type").all_inner_texts() == ["orders.paid", "orders.created"]

    page.get_by_role("button", name="Pause").click()
    for n in range(3):
        console.api("publish", {"type": "orders.created", "payload": {"while_paused": n}})
    expect(page.locator("#tail-counters")).to_contain_text("paused: 3 waiting")
    expect(page.locator("#tail-rows tr")).to_have_count(2)
    page.get_by_role("button", name="Resume").click()
    expect(page.locator("#tail-rows tr")).to_have_count(5)
    assert shown_seqs(page) == [m["seq"] for m in console.history("orders.*")]


def test_tail_resumes_after_a_daemon_restart_without_duplicate_or_gap(console: ConsoleDaemon, page: Page) -> None:
    open_console(page, console)
    since = following_since(page)
    for n in range(10):
        console.api("publish", {"type": "before.restart", "payload": n})
    expect(page.locator("#tail-rows tr")).to_have_count(10)

    console.restart()  # same ports, same store: the page's client reconnects and resumes
    for n in range(10):  # very likely before the page reconnected: they come in the resume's replay
        console.api("publish", {"type": "during.reconnect", "payload": n})
    expect(page.locator("#connection")).to_have_text("live")
    expect(page.locator("#tail-following")).to_contain_text("resumed after seq")
    for n in range(10):
        console.api("publish", {"type": "after.restart", "payload": n})

    stored = [m["seq"] for m in console.history(after=since)]
    expect(page.locator("#tail-rows tr")).to_have_count(len(stored))
    assert shown_seqs(page) == stored  # no duplicate, no gap, in order
    expect(page.locator("#tail-counters")).to_contain_text(f"{len(stored)} received")


def test_the_tail_keeps_up_with_a_burst_of_5000(console: ConsoleDaemon, page: Page, agents: Agents) -> None:
    open_console(page, console)
    page.locator("#tail-pattern").fill("burst.#")
    page.get_by_role("button", name="Follow").click()
    expect(page.locator("#tail-following")).to_contain_text("burst.# — subscribed")
    expect(page.locator("#tail-following")).to_have_attribute("data-state", "subscribed")

    agents.run(publish_many, console.ws_url, "burst.load", 5000)
    last = console.api("status")["status"]["store"]["last_seq"]
    # every message was received once (none lost, none twice), and the newest is on screen
    expect(page.locator("#tail-counters")).to_contain_text(f"5000 received · 500 shown (at most 500) · last seq {last}")
    expect(page.locator("#tail-rows tr").first).to_have_attribute("data-seq", str(last))
    assert page.locator("#tail-rows tr").count() == 500
    # the window is the newest 500 of what the daemon stored, in order, each once
    assert shown_seqs(page) == [m["seq"] for m in console.history("burst.#")][-500:]
    seqs = shown_seqs(page)
    # and the page still answers
    page.locator("#tail-rows tr").nth(10).click()
    expect(page.locator("#message-dialog [data-role=title]")).to_have_text(f"Message seq {seqs[-11]}")


# ---- forms ------------------------------------------------------------------------------------------


def test_publish_and_dispatch_forms(console: ConsoleDaemon, page: Page) -> None:
    open_console(page, console)
    page.locator("#publish-panel summary").click()
    form = page.locator("#publish-form")
    form.get_by_label("Type").fill("console.note")
    form.get_by_label("Payload (JSON)").fill('{"text": "hello from the console"}')
    form.get_by_label("Metadata (JSON object, optional)").fill('{"source": "operator"}')
    form.get_by_label("Message id (optional: the idempotency key)").fill("note-1")
    form.get_by_role("button", name="Publish").click()
    expect(page.locator("#publish-result")).to_have_text(re_stored := "Stored as seq " + str(
        wait_until(lambda: console.history("console.note"), "the published note")[0]["seq"]) + ".")
    (stored,) = console.history("console.note")
    assert (stored["payload"], stored["metadata"]["source"], stored["message_id"]) == (
        {"text": "hello from the console"}, "operator", "note-1")
    expect(page.locator("#tail-rows tr").first.locator("td.type")).to_have_text("console.note")
    form.get_by_role("button", name="Publish").click()  # the same message id again
    expect(page.locator("#publish-result")).to_have_text(f"Duplicate: already stored as seq {stored['seq']}.")
    assert re_stored
    form.get_by_label("Payload (JSON)").fill("{not json")
    form.get_by_role("button", name="Publish").click()
    expect(page.locator("#publish-result")).to_contain_text("Not published: the payload is not valid JSON")
    assert len(console.history("console.note")) == 1

    page.goto(console.console_url + "#/tasks")
    page.locator("#dispatch-panel summary").click()
    form = page.locator("#dispatch-form")
    form.get_by_label("Type").fill("report.build")
    form.get_by_label("Payload (JSON)").fill('{"template": "weekly"}')
    form.get_by_label("Priority").select_option("high")
    form.get_by_label("Attempts at most").fill("5")
    form.get_by_role("button", name="Dispatch").click()
    expect(page.locator("#dispatch-result")).to_contain_text("Queued as task ")
    task_id = page.locator("#dispatch-result a").inner_text()
    task = console.api("task", {"task_id": task_id})["task"]
    assert (task["type"], task["state"], task["spec"]["payload"], task["spec"]["max_attempts"]) == (
        "report.build", "queued", {"template": "weekly"}, 5)
    expect(page.locator(f"#tasks-rows tr[data-task-id='{task_id}'] td.state")).to_have_text("queued")


# ---- tasks, workers, dead letters -------------------------------------------------------------------


async def succeed(task: TaskContext) -> dict[str, Any]:
    return {"echo": task.payload}


async def fail_for_good(task: TaskContext) -> None:
    raise PermanentError(f"cannot handle {task.payload}")


async def fail_once(task: TaskContext) -> str:
    if task.attempt == 1:
        raise RuntimeError("flaky upstream")
    return "second time lucky"


def test_tasks_and_workers_views_show_what_the_daemon_holds(console: ConsoleDaemon, page: Page,
                                                           agents: Agents) -> None:
    agents.start_worker(console.ws_url, "console-worker",
                        {"job.ok": succeed, "job.bad": fail_for_good, "job.flaky": fail_once})
    for n in range(2):
        console.api("dispatch", {"type": "job.ok", "payload": n})
    console.api("dispatch", {"type": "job.bad", "payload": "x"})
    flaky = console.api("dispatch", {"type": "job.flaky", "payload": 1,
                                     "retry_policy": {"backoff_factor": 0.05}})["task_id"]
    console.api("dispatch", {"type": "job.nobody", "payload": None})  # no worker: stays queued
    wait_until(lambda: {t["state"] for t in console.api("tasks")["tasks"]} == {"completed", "dead", "queued"}
               and console.api("task", {"task_id": flaky})["task"]["state"] == "completed", "the tasks to settle")

    open_console(page, console, "#/tasks")
    held = console.api("tasks")["tasks"]
    rows = page.locator("#tasks-rows tr[data-task-id]")
    expect(rows).to_have_count(len(held))
    for task in held:
        row = page.locator(f"#tasks-rows tr[data-task-id='{task['task_id']}']")
        expect(row.locator("td.state")).to_have_text(task["state"])
        expect(row.locator("td").nth(1)).to_have_text(task["type"])
    expect(page.locator("#tasks-counts")).to_contain_text("completed 3")

    page.get_by_label("State").select_option("dead")
    expect(rows).to_have_count(1)
    expect(rows.first.locator("td.state")).to_have_text("dead")
    expect(rows.first).to_contain_text("cannot handle x")

    page.get_by_label("State").select_option("")
    page.get_by_role("link", name=flaky).click()
    expect(page).to_have_url(f"{console.console_url}#/tasks/{flaky}")
    attempts = page.locator("#task-attempts tr")
    expect(attempts).to_have_count(2)
    expect(attempts.nth(0)).to_contain_text("console-worker")
    expect(attempts.nth(0).locator("td.state")).to_have_text("failed")
    expect(attempts.nth(0)).to_contain_text("RuntimeError: flaky upstream")
    expect(attempts.nth(1).locator("td.state")).to_have_text("completed")
    expect(page.locator("#task-facts")).to_contain_text("2 of 3")
    expect(page.locator("#task-values")).to_contain_text("second time lucky")

    page.get_by_role("link", name="Workers").click()
    (worker,) = console.api("workers")["workers"]
    row = page.locator(f"#workers-rows tr[data-worker-id='{worker['worker_id']}']")
    cells = [worker["name"], ", ".join(worker["types"]), str(worker["concurrency"]), str(worker["in_flight"]),
             str(worker["done"]), str(worker["failed"])]
    expect(row.locator("td")).to_have_text([*cells, re_any(), "no"])
    assert (worker["done"], worker["failed"]) == (3, 2)


def re_any() -> Any:
    import re

    return re.compile(".+")


def test_dead_letters_show_replay_and_purge_with_confirmation(console: ConsoleDaemon, page: Page,
                                                              agents: Agents) -> None:
    healed = threading.Event()

    async def fragile(task: TaskContext) -> str:
        if not healed.is_set():
            raise PermanentError("the disk is full")
        return "stored"

    agents.start_worker(console.ws_url, "fragile-worker", {"archive.store": fragile})
    tasks = [console.api("dispatch", {"type": "archive.store", "payload": {"file": n}})["task_id"] for n in range(2)]
    letters = wait_until(lambda: len(found := console.api("dlq.list")["dead_letters"]) == 2 and found,
                         "two dead letters")

    open_console(page, console, "#/dlq")
    rows = page.locator("#dlq-rows tr[data-letter-id]")
    expect(rows).to_have_count(2)
    for letter in letters:
        row = page.locator(f"#dlq-rows tr[data-letter-id='{letter['id']}']")
        expect(row.locator("td.type")).to_have_text("archive.store")
        expect(row).to_contain_text(letter["reason"])

    first = letters[0]
    page.locator(f"#dlq-rows tr[data-letter-id='{first['id']}']").get_by_role("link", name="Show").click()
    expect(page.locator("#letter-facts")).to_contain_text(first["reason"])
    expect(page.locator("#letter-facts")).to_contain_text(tasks[0])
    expect(page.locator("#letter-attempts tr")).to_have_count(1)
    expect(page.locator("#letter-attempts tr")).to_contain_text("fragile-worker")
    expect(page.locator("#letter-attempts tr")).to_contain_text("the disk is full")

    healed.set()
    page.get_by_role("button", name="Replay").click()
    expect(page.locator("#view-letter [data-role=notice]")).to_contain_text(f"Dead letter {first['id']} replayed")
    replayed = page.locator("#view-letter [data-role=notice] a").inner_text()
    wait_until(lambda: console.api("task", {"task_id": replayed})["task"]["state"] == "completed",
               "the replayed task to complete")
    assert [d["id"] for d in console.api("dlq.list")["dead_letters"]] == [letters[1]["id"]]

    page.get_by_role("link", name="← Dead letters").click()
    expect(rows).to_have_count(1)
    page.get_by_role("button", name="Purge…").click()
    dialog = page.locator("#purge-dialog")
    expect(dialog).to_be_visible()
    assert len(console.api("dlq.list")["dead_letters"]) == 1  # nothing happens before the confirmation
    dialog.get_by_role("button", name="Cancel").click()
    expect(dialog).to_be_hidden()
    page.get_by_role("button", name="Refresh").click()
    expect(rows).to_have_count(1)
    assert len(console.api("dlq.list")["dead_letters"]) == 1

    page.get_by_role("button", name="Purge…").click()
    dialog.get_by_role("button", name="Purge every dead letter").click()
    expect(page.locator("#view-dlq [data-role=notice]")).to_have_text("Purged 1 dead letter.")
    expect(page.locator("#dlq-rows")).to_have_text("No dead letter.")
    assert console.api("dlq.list")["dead_letters"] == []


# ---- status -----------------------------------------------------------------------------------------


def test_status_shows_services_amqp_state_and_a_rates_chart(tmp_dir: Path, page: Page, agents: Agents) -> None:
    # AMQP enabled with no broker: the daemon serves, is not ready, and status says why
    daemon = ConsoleDaemon(tmp_dir, amqp={"enabled": True, "url": f"amqp://guest:guest@127.0.0.1:{free_port()}/"})
    daemon.start()
    try:
        open_console(page, daemon, "#/status")
        status = daemon.api("status")["status"]
        summary = page.locator("#status-summary")
        expect(summary).to_contain_text("ready")
        expect(summary).to_contain_text(f"version{status['version']}")
        expect(summary).to_contain_text("no: ")  # not ready: the broker is missing
        for service in ("websocket", "store", "router", "tasks", "amqp", "ingest"):
            expect(page.locator(f"[data-service={service}]")).to_be_visible()
        amqp = page.locator("[data-service=amqp]")
        for key, value in status["amqp"].items():
            if isinstance(value, bool):
                expect(amqp).to_contain_text(f"{key}{str(value).lower()}")
        expect(summary).to_contain_text("AMQPnot connected")
        expect(summary).to_contain_text("Redisoff")
        expect(page.locator("#status-cluster")).to_be_empty()  # no [redis]: no cluster

        agents.run(publish_many, daemon.ws_url, "rate.sample", 300)
        # the chart plots rates between the page's own samples (every 2 s)
        expect(page.locator("svg.rates")).to_have_attribute("data-points", re_at_least(2))
        last_seq = daemon.api("status")["status"]["store"]["last_seq"]
        expect(summary).to_contain_text(f"last seq{last_seq}")
        points = page.locator("svg.rates polyline.stored").get_attribute("points") or ""
        assert len(points.split()) >= 2
    finally:
        daemon.stop()


def test_status_shows_the_cluster_nodes(tmp_dir: Path, page: Page, redis_server: Redis) -> None:
    """Two nodes on one Redis (DESIGN §5): the status of either shows both, itself marked."""
    prefix = f"console-{secrets.token_hex(4)}:"
    nodes: list[ConsoleDaemon] = []
    try:
        for name in ("node-a", "node-b"):
            (tmp_dir / name).mkdir()
            nodes.append(ConsoleDaemon(tmp_dir / name,
                                       redis={"enabled": True, "url": redis_server.url, "prefix": prefix},
                                       cluster={"node_name": name, "heartbeat_interval_s": 0.5}))
            nodes[-1].start()
        a, b = nodes
        b.api("publish", {"type": "cluster.hello", "payload": 1})
        status = wait_until(lambda: len((s := a.api("status")["status"])["cluster"]["nodes"]) == 2 and s,
                            "both nodes in the status")
        open_console(page, a, "#/status")
        rows = page.locator("#status-cluster tr[data-node]")
        expect(rows).to_have_count(2)
        assert sorted(rows.evaluate_all("rows => rows.map(r => r.dataset.node)")) == ["node-a", "node-b"]
        expect(page.locator("#status-cluster tr.self")).to_have_attribute("data-node", "node-a")
        expect(page.locator("#status-cluster")).to_contain_text(f"epoch{status['cluster']['epoch']}")
        summary = page.locator("#status-summary")
        expect(summary).to_contain_text("Redisconnected")
        # the seq is the cluster's: node-b's message counts on node-a
        expect(summary).to_contain_text(f"last seq{a.api('status')['status']['cluster']['last_seq']}")
    finally:
        for node in nodes:
            node.stop()


def re_at_least(n: int) -> Any:
    import re

    return re.compile("|".join(str(i) for i in range(n, n + 200)))


# ---- tokens -----------------------------------------------------------------------------------------


def test_the_console_asks_for_a_token_and_keeps_it_for_the_tab(tmp_dir: Path, page: Page, browser: Browser) -> None:
    secret = tmp_dir / "jwt.secret"
    secret.write_text(SECRET)
    daemon = ConsoleDaemon(tmp_dir, auth={"required": True, "hmac_secret_file": str(secret)})
    daemon.start()
    admin = mint_token(SECRET.encode(), sub="ops", rights=Rights(admin=True), ttl_s=600)
    scanner = mint_token(SECRET.encode(), sub="analyst", rights=Rights(subscribe=("scan.#",)), ttl_s=600)
    try:
        page.goto(daemon.console_url)
        dialog = page.locator("#token-dialog")
        expect(dialog).to_be_visible()
        dialog.get_by_label("Token").fill("not-a-token")
        dialog.get_by_role("button", name="Use this token").click()
        expect(dialog.locator("[data-role=error]")).to_contain_text("refused the token")
        # the client's reconnect asks for a token meanwhile (backoff ~0.5 s): that must not wipe the reason
        page.wait_for_timeout(2000)
        expect(dialog.locator("[data-role=error]")).to_contain_text("refused the token", timeout=1000)
        expect(dialog).to_be_visible()

        dialog.get_by_label("Token").fill(admin)
        dialog.get_by_role("button", name="Use this token").click()
        expect(dialog).to_be_hidden()
        expect(page.locator("#identity")).to_have_text("token: ops (admin)")
        expect(page.locator("#tail-following")).to_have_attribute("data-state", "subscribed")
        daemon.api("publish", {"type": "scan.started", "payload": 1}, token=admin)
        expect(page.locator("#tail-rows tr")).to_have_count(1)
        assert page.evaluate("sessionStorage.getItem('aivad.console.token')") == admin

        page.reload()  # the same tab keeps it
        expect(page.locator("#tail-following")).to_have_attribute("data-state", "subscribed")
        expect(dialog).to_be_hidden()
        page.get_by_role("link", name="Status").click()
        expect(page.locator("#status-summary")).to_contain_text("last seq1")

        other_tab = page.context.new_page()  # another tab does not have it
        other_tab.goto(daemon.console_url)
        expect(other_tab.locator("#token-dialog")).to_be_visible()
        other_tab.close()

        # a token with narrower rights: the tail follows what it may see; admin views say what they need
        page.get_by_role("button", name="Forget token").click()
        expect(dialog).to_be_visible()
        dialog.get_by_label("Token").fill(scanner)
        dialog.get_by_role("button", name="Use this token").click()
        expect(page.locator("#tail-following")).to_contain_text("Following scan.# — subscribed at seq 1")
        daemon.api("publish", {"type": "other.thing", "payload": 2}, token=admin)
        daemon.api("publish", {"type": "scan.done", "payload": 3}, token=admin)
        expect(page.locator("#tail-rows tr")).to_have_count(1)
        expect(page.locator("#tail-rows td.type")).to_have_text("scan.done")
        page.get_by_role("link", name="Workers").click()
        expect(page.locator("#view-workers [data-role=error]")).to_have_text(
            "This view needs a token with the admin right.")
    finally:
        daemon.stop()


# ---- the browser client itself, in Chromium ---------------------------------------------------------


def test_client_js_in_chromium_resumes_across_a_daemon_restart(console: ConsoleDaemon, page: Page) -> None:
    """The same guarantee as tests/js/resume.test.mjs, in a browser's own WebSocket: a subscription
    from seq 0 across a restart hands out exactly the stored seqs, once each, in order; publishes
    made while the daemon is down wait in the client and are stored once."""
    page.goto(f"http://127.0.0.1:{console.http_port}/healthz")  # any page of the daemon's origin
    page.evaluate("""async (url) => {
        const { connect } = await import("/client.js");
        window.seen = [];
        window.client = connect(url, { reconnectMaxMs: 1000 });
        const sub = window.client.subscribe("#", { since: 0 }, (envelope) => window.seen.push(envelope.seq));
        window.sub = sub;
        await sub.ready;
    }""", console.ws_url)
    for n in range(20):
        console.api("publish", {"type": "resume.before", "payload": n})
    page.wait_for_function("() => window.seen.length === 20", timeout=WAIT_MS)

    console.stop()
    page.wait_for_function("() => window.client.state !== 'open'", timeout=WAIT_MS)
    page.evaluate("""() => { window.queued = Promise.all(
        [0, 1, 2, 3, 4].map((n) => window.client.publish("resume.queued", n, { messageId: `queued-${n}` }))); }""")
    console.start()
    for n in range(20):
        console.api("publish", {"type": "resume.after", "payload": n})
    queued = page.evaluate("async () => (await window.queued).map((p) => p.seq)")

    stored = [m["seq"] for m in console.history()]
    assert len(stored) == 45 and sorted(queued) == [m["seq"] for m in console.history("resume.queued")]
    page.wait_for_function(f"() => window.seen.length >= {len(stored)}", timeout=WAIT_MS)
    seen = page.evaluate("window.seen")
    assert seen == stored  # no duplicate, no gap, ascending
    assert page.evaluate("window.sub.statistics().subscribes") >= 2  # it did resume
    page.evaluate("window.client.close()")
