"""The daemon's own events (DESIGN §2): system.health_check and system.alert, seen by a subscriber.

Test policy: real daemons, real faults (a real slow consumer, a real dead task, a
broker address nobody listens on, a real "disk full" through RLIMIT_FSIZE); the
operator's view is a plain WebSocket subscriber of ``system.#``.
"""

from __future__ import annotations

import resource
from pathlib import Path
from typing import Any

import trio

from tests.conftest import DaemonProcess, control_async, free_port, start_daemon
from tests.wsclient import TestClient, connect


async def _alerts(watcher: TestClient, code: str, n: int = 1) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    while len(found) < n:
        frame = await watcher.next_message()
        if frame["msg"]["type"] == "system.alert" and frame["msg"]["payload"]["code"] == code:
            found.append(frame["msg"]["payload"])
    return found


async def test_health_checks_carry_the_status_summary(nursery: trio.Nursery, tmp_dir: Path) -> None:
    d = await start_daemon(nursery, tmp_dir, system={"health_interval_s": 0.2})
    with trio.fail_after(10):
        async with connect(d.ws_url) as watcher:
            await watcher.ok({"op": "subscribe", "pattern": "system.health_check"})
            first, second = await watcher.messages(2)
    payload = first["msg"]["payload"]
    assert payload["ready"] is True and payload["connections"] == 1 and payload["subscriptions"] == 1
    assert {"uptime_s", "rate_10s", "rate_60s", "last_seq", "store_write_queue", "tasks_queued", "workers"} <= set(
        payload
    )
    assert second["msg"]["seq"] > first["msg"]["seq"]


async def test_slow_consumers_and_dead_letters_raise_alerts_rate_limited_per_code(
    nursery: trio.Nursery, tmp_dir: Path
) -> None:
    d = await start_daemon(nursery, tmp_dir, system={"alert_interval_s": 0.5},
                           websocket={"send_buffer_frames": 16, "send_buffer_bytes": 65536})
    with trio.fail_after(30):
        async with connect(d.ws_url) as watcher, connect(d.ws_url) as pub:
            await watcher.ok({"op": "subscribe", "pattern": "system.alert"})
            # a task nobody runs, abandoned by its request: dead
            await pub.request({"op": "request", "type": "nobody.runs", "payload": 1, "timeout": 0.05})
            (dead,) = await _alerts(watcher, "dead_letter")
            assert dead["level"] == "warning" and "nobody.runs" in dead["message"]
            # three slow consumers in a row: one alert, then (after the interval) one that says
            # two were held back
            for closes in range(1, 4):
                await _one_slow_consumer(d.ws_url, d.control_path, pub, closes)
            await trio.sleep(0.6)
            await _one_slow_consumer(d.ws_url, d.control_path, pub, 4)
            first, second = await _alerts(watcher, "slow_consumer", 2)
            assert "suppressed" not in first and second["suppressed"] == 2


async def _one_slow_consumer(url: str, control_path: str, pub: TestClient, closes: int) -> None:
    """A subscriber that never reads, fed until the daemon has closed ``closes`` slow consumers in all."""
    async with connect(url) as stalled:
        await stalled.ok({"op": "subscribe", "pattern": "flood.#"})
        while await _count_slow(control_path) < closes:
            await pub.publish("flood.x", "y" * 10_000)


async def _count_slow(control_path: str) -> int:
    status = await control_async(control_path, {"cmd": "status"})
    return int(status["status"]["websocket"]["slow_consumer_closes"])


async def test_a_broker_nobody_answers_raises_amqp_lost_and_readyz_says_why(
    nursery: trio.Nursery, tmp_dir: Path
) -> None:
    port = free_port()
    d = await start_daemon(nursery, tmp_dir, amqp={"enabled": True, "url": f"amqp://guest:guest@127.0.0.1:{port}/",
                                                   "reconnect_initial_s": 0.05, "reconnect_max_s": 0.1})
    with trio.fail_after(10):
        async with connect(d.ws_url) as watcher:
            await watcher.ok({"op": "subscribe", "pattern": "system.alert", "since": 0})
            (lost,) = await _alerts(watcher, "amqp_lost")
            assert lost["level"] == "warning" and "RabbitMQ" in lost["message"]


async def test_a_failing_store_is_announced_once_it_can_be_and_its_recovery_too(tmp_dir: Path) -> None:
    proc = DaemonProcess(tmp_dir)
    proc.start(rlimits={resource.RLIMIT_FSIZE: 2_000_000})
    try:
        assert proc.proc is not None
        with trio.fail_after(60):
            async with connect(proc.ws_url) as watcher, connect(proc.ws_url) as pub:
                await watcher.ok({"op": "subscribe", "pattern": "system.alert"})
                fill = {"op": "publish", "type": "fill.up", "payload": "x" * 200_000}
                while (await pub.request(dict(fill)))["op"] == "ok":
                    pass
                hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
                resource.prlimit(proc.proc.pid, resource.RLIMIT_FSIZE, (hard, hard))
                while (await pub.request({"op": "publish", "type": "fill.more", "payload": 1}))["op"] != "ok":
                    await trio.sleep(0.1)
                (failed,) = await _alerts(watcher, "store_failed")
                assert failed["level"] == "error" and "commit" in failed["message"]
                (back,) = await _alerts(watcher, "store_recovered")
                assert back["level"] == "info"
    finally:
        proc.stop()
