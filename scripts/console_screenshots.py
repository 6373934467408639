#!/usr/bin/env python3
"""Take the screenshots of docs/console.md from a real run: ``docs/console/*.png``.

    .venv/bin/python scripts/console_screenshots.py [--out docs/console] [--chromium /usr/bin/chromium]
        [--chart-seconds 60] [--no-cluster]

What it does, so the pictures show a daemon at work and can be taken again after
any change to the console:

1. starts a real ``aivad serve`` (a temp directory, free ports, ``[http] enabled``)
   — with ``redis-server`` on PATH, two of them as the nodes of a cluster on a
   throwaway Redis, so the status shows the cluster (``--no-cluster``: one, alone);
2. runs real agents against it with the Python client: a worker (``scan.run``
   succeeds, ``enrich.lookup`` fails once then succeeds, ``report.build`` fails
   for good), and a publisher of findings at a rate that changes over time;
3. dispatches tasks over the HTTP API, one of them ending in the dead-letter queue;
4. opens the console in Debian's headless Chromium (Playwright, never a
   downloaded browser), waits until the status chart has a minute of samples,
   and saves one PNG per view. A second daemon with ``[auth] required`` gives
   the token prompt.

It takes about a minute and a half (the rates chart needs real samples).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import trio

import aivad.client
from aivad.client import PermanentError, TaskContext

REPO = Path(__file__).resolve().parent.parent
CHROMIUM_FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Daemon:
    """A real ``aivad serve`` in a temp directory, with the HTTP API on."""

    def __init__(self, directory: Path, auth_secret: str | None = None, extra: list[str] | None = None) -> None:
        self.directory = directory
        self.ws_port, self.http_port = free_port(), free_port()
        lines = [
            "[websocket]", f"port = {self.ws_port}",
            "[control]", f'socket = "{directory / "control.sock"}"',
            "[store]", f'path = "{directory / "aivad.db"}"',
            "[http]", "enabled = true", f"port = {self.http_port}",
        ]
        if auth_secret is not None:
            (directory / "jwt.secret").write_text(auth_secret)
            lines += ["[auth]", "required = true", f'hmac_secret_file = "{directory / "jwt.secret"}"']
        (directory / "config.toml").write_text("\n".join(lines + (extra or [])) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.ws_port}/"

    @property
    def console_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/console"

    def start(self) -> None:
        log = open(self.directory / "daemon.log", "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen([sys.executable, "-m", "aivad", "serve", "--config", "config.toml"],
                                     cwd=self.directory, stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), urllib.request.urlopen(
                    f"http://127.0.0.1:{self.http_port}/readyz", timeout=1):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"aivad serve did not start: {(self.directory / 'daemon.log').read_text()}")

    def api(self, command: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}/api/{command}",
                                         data=json.dumps(body or {}).encode(), method="POST",
                                         headers={"content-type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return dict(json.loads(response.read()))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(15)


def cluster_config(redis_url: str, node_name: str) -> list[str]:
    """Config lines of one node of a cluster on ``redis_url`` (DESIGN §5)."""
    return ["[redis]", "enabled = true", f'url = "{redis_url}"', 'prefix = "aivad-shots:"',
            "[cluster]", f'node_name = "{node_name}"', "heartbeat_interval_s = 1.0"]


@contextlib.contextmanager
def redis_server(directory: Path) -> Iterator[str]:
    """A throwaway redis-server on loopback (no persistence); its URL."""
    port = free_port()
    log = open(directory / "redis.log", "ab")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                             "--appendonly", "no", "--dir", str(directory)], stdout=log, stderr=log)
    log.close()
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"redis-server did not start: {(directory / 'redis.log').read_text()}")
            time.sleep(0.1)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


# ---- agents: a worker and a publisher, on one trio loop in a thread ----------------------


async def scan(task: TaskContext) -> dict[str, Any]:
    await task.progress(0.5, note="ports scanned")
    await trio.sleep(0.2)
    return {"target": task.payload.get("target"), "open_ports": [22, 443]}


async def enrich(task: TaskContext) -> dict[str, Any]:
    if task.attempt == 1:
        raise RuntimeError("upstream lookup timed out")  # retried with backoff
    return {"reputation": "clean"}


async def report(task: TaskContext) -> None:
    raise PermanentError(f"template {task.payload.get('template')!r} does not exist")


async def publish_findings(url: str, stop: trio.Event) -> None:
    """Findings of two events at a rate that rises and falls, so the rates chart has a shape."""
    async with aivad.client.connect(url) as client:
        n = 0
        while not stop.is_set():
            n += 1
            event = "evt-42" if n % 3 else "evt-43"
            finding = {"finding": n, "severity": ["low", "medium", "high"][n % 3], "host": f"10.0.0.{n % 250}"}
            await client.publish(f"notifications.frontend.{event}.finding", finding,
                                 metadata={"source": "scanner-1", "correlation_id": f"scan-{n // 10}"})
            phase = (n // 200) % 3  # about 20 → 60 → 10 messages per second
            await trio.sleep([0.05, 0.016, 0.1][phase])


def run_agents(url: str, ready: threading.Event, stopping: threading.Event) -> None:
    async def main() -> None:
        worker = aivad.client.Worker(url, concurrency=4, name="scanner-1")
        worker.register("scan.run", scan)
        worker.register("enrich.lookup", enrich)
        worker.register("report.build", report)
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            await nursery.start(worker.run)
            nursery.start_soon(publish_findings, url, stop)
            ready.set()
            await trio.to_thread.run_sync(stopping.wait)
            stop.set()
            nursery.cancel_scope.cancel()

    trio.run(main)


def seed_tasks(daemon: Daemon) -> None:
    for target in ("10.0.0.1", "10.0.0.2", "10.0.0.3"):
        daemon.api("dispatch", {"type": "scan.run", "payload": {"target": target}})
    daemon.api("dispatch", {"type": "enrich.lookup", "payload": {"ip": "192.0.2.7"},
                            "retry_policy": {"backoff_factor": 0.5}})
    daemon.api("dispatch", {"type": "report.build", "payload": {"template": "weekly-v9"}})
    # no worker runs this type: it waits in the queue
    daemon.api("dispatch", {"type": "archive.upload", "payload": {"bucket": "evidence"}, "priority": "low"})


# ---- the browser --------------------------------------------------------------------------


@contextlib.contextmanager
def chromium(executable: str) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        try:
            yield browser
        finally:
            browser.close()


def wait_until(check: Any, what: str, timeout_s: float = 30) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.2)
    raise RuntimeError(f"timed out waiting for {what}")


def shoot(browser: Any, daemon: Daemon, auth_daemon: Daemon, out: Path, chart_s: float) -> None:
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    page.goto(daemon.console_url)
    page.wait_for_selector("#tail-rows tr")
    # tasks settle (the retry of enrich.lookup, the dead report) while the status page samples
    wait_until(lambda: daemon.api("dlq.list")["dead_letters"], "the dead letter")
    wait_until(lambda: any(t["state"] == "completed" and t["type"] == "enrich.lookup"
                           for t in daemon.api("tasks")["tasks"]), "enrich.lookup to complete")
    page.goto(f"{daemon.console_url}#/status")
    time.sleep(chart_s)
    page.screenshot(path=out / "status.png", full_page=True)

    page.goto(f"{daemon.console_url}#/")
    page.wait_for_selector("#tail-rows tr")
    time.sleep(2)  # a screenful of rows
    page.screenshot(path=out / "tail.png")
    page.locator("#tail-rows tr").first.click()
    page.wait_for_selector("#message-dialog[open]")
    page.screenshot(path=out / "message.png")
    page.keyboard.press("Escape")

    page.goto(f"{daemon.console_url}#/tasks")
    page.wait_for_selector("#tasks-rows tr[data-task-id]")
    page.locator("#dispatch-panel summary").click()
    page.screenshot(path=out / "tasks.png", full_page=True)

    enrich_id = next(t["task_id"] for t in daemon.api("tasks")["tasks"] if t["type"] == "enrich.lookup")
    page.goto(f"{daemon.console_url}#/tasks/{enrich_id}")
    page.wait_for_selector("#task-attempts tr td")
    page.screenshot(path=out / "task.png", full_page=True)

    page.goto(f"{daemon.console_url}#/workers")
    page.wait_for_selector("#workers-rows tr[data-worker-id]")
    page.screenshot(path=out / "workers.png")

    page.goto(f"{daemon.console_url}#/dlq")
    page.wait_for_selector("#dlq-rows tr[data-letter-id]")
    page.screenshot(path=out / "dlq.png")
    letter = daemon.api("dlq.list")["dead_letters"][0]["id"]
    page.goto(f"{daemon.console_url}#/dlq/{letter}")
    page.wait_for_selector("#letter-attempts tr td")
    page.screenshot(path=out / "dead-letter.png", full_page=True)
    page.goto(f"{daemon.console_url}#/dlq")
    page.locator("#dlq-purge").click()
    page.wait_for_selector("#purge-dialog[open]")
    page.screenshot(path=out / "purge.png")
    page.close()

    token_page = browser.new_page(viewport={"width": 1280, "height": 600})
    token_page.goto(auth_daemon.console_url)
    token_page.wait_for_selector("#token-dialog[open]")
    token_page.screenshot(path=out / "token.png")
    token_page.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "console")
    parser.add_argument("--chromium", default=os.environ.get("AIVAD_CHROMIUM", "/usr/bin/chromium"))
    parser.add_argument("--chart-seconds", type=float, default=60,
                        help="how long the status page samples before its screenshot (default: 60)")
    parser.add_argument("--no-cluster", action="store_true",
                        help="one daemon without Redis (by default, with redis-server on PATH, two cluster nodes)")
    args = parser.parse_args()
    if not Path(args.chromium).exists():
        print(f"{args.chromium} not found: install Debian's chromium (apt-get install chromium)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    directory = Path(tempfile.mkdtemp(prefix="aivad-shots-"))
    for name in ("main", "peer", "auth", "redis"):
        (directory / name).mkdir()
    clustered = not args.no_cluster and shutil.which("redis-server") is not None
    if not clustered:
        print("no cluster in the status screenshot (redis-server not found, or --no-cluster)", file=sys.stderr)
    try:
        with contextlib.ExitStack() as stack:
            redis_url = stack.enter_context(redis_server(directory / "redis")) if clustered else None
            daemon = Daemon(directory / "main", extra=cluster_config(redis_url, "node-1") if redis_url else None)
            peers = [Daemon(directory / "peer", extra=cluster_config(redis_url, "node-2"))] if redis_url else []
            auth_daemon = Daemon(directory / "auth", auth_secret=secrets.token_hex(32))
            for started in (daemon, *peers, auth_daemon):
                started.start()
                stack.callback(started.stop)
            ready, stopping = threading.Event(), threading.Event()
            agents = threading.Thread(target=run_agents, args=(daemon.ws_url, ready, stopping), daemon=True)
            agents.start()
            stack.callback(agents.join, 10)
            stack.callback(stopping.set)
            if not ready.wait(20):
                raise RuntimeError("the worker did not connect")
            seed_tasks(daemon)
            with chromium(args.chromium) as browser:
                shoot(browser, daemon, auth_daemon, args.out, args.chart_seconds)
    except (RuntimeError, urllib.error.URLError) as exc:
        print(f"screenshots failed: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    for png in sorted(args.out.glob("*.png")):
        print(f"{png.relative_to(REPO) if png.is_relative_to(REPO) else png}  {png.stat().st_size // 1024} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
