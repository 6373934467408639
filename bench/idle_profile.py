"""What one idle subscribed WebSocket connection holds in aivad: tracemalloc and trio tasks.

Usage::

    python bench/idle_profile.py                  # 2000 connections, top 25 entries
    python bench/idle_profile.py --connections 5000 --top 40 --group lineno

The daemon runs in this process (``run_daemon`` with a temporary store) under
``tracemalloc``; the clients run in a child process (bench/fanout.py's asyncio
client), so only the server's allocations are traced. After 100 warm-up
connections (opened and dropped, so lazily made module-level things exist), a
snapshot is taken, ``--connections`` connections each subscribe to their own
pattern, and a second snapshot is compared with the first: bytes per connection
by allocation site (the innermost frame inside aivad, trio, trio_websocket,
wsproto or h11, or the plain line with ``--group lineno``), and the trio tasks
each connection keeps, by coroutine name.

tracemalloc counts Python allocations only: RSS (bench/fanout.py --idle) adds
the allocator's overhead and free lists and the kernel's socket objects are not
in it either way.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import linecache
import subprocess
import sys
import tempfile
import tracemalloc
from functools import partial
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import raise_nofile

_PACKAGES = ("aivad", "trio_websocket", "wsproto", "h11", "trio")


def _clients(port: int, connections: int) -> None:
    """The child: warm up, then open ``connections`` subscribed connections on a line of stdin."""
    import fanout

    async def main() -> None:
        async def one(i: int) -> fanout.Conn:
            conn = await fanout.connect(port, fanout.Dialect(), timeout_s=60)
            await fanout.subscribe(conn, f"idle.c{i}.#")
            return conn

        warm = await asyncio.gather(*(one(i) for i in range(100)))
        for c in warm:
            c.abort()
        await asyncio.sleep(0.5)
        loop = asyncio.get_running_loop()
        print("warm", flush=True)
        await loop.run_in_executor(None, sys.stdin.readline)
        conns = []
        for lo in range(0, connections, 200):
            conns += await asyncio.gather(*(one(i) for i in range(lo, min(connections, lo + 200))))
        print("open", flush=True)
        await loop.run_in_executor(None, sys.stdin.readline)
        for c in conns:
            c.abort()

    asyncio.run(main())


def _where(frame: tracemalloc.Frame) -> str:
    code = linecache.getline(frame.filename, frame.lineno).strip()
    return f"{'/'.join(Path(frame.filename).parts[-2:])}:{frame.lineno} {code[:60]}"


def _site(tb: tracemalloc.Traceback) -> str:
    """The innermost frame in one of the interesting packages and, if that is trio's,
    the innermost aivad / trio-websocket frame that called it."""
    inner = None
    for frame in reversed(tb):  # most recent call first
        parts = Path(frame.filename).parts
        if not any(p in _PACKAGES for p in parts):
            continue
        if inner is None:
            inner = frame
        if "aivad" in parts or "trio_websocket" in parts:
            return _where(frame) if frame is inner else f"{_where(inner)}  <- {_where(frame)}"
    return _where(inner if inner is not None else tb[-1])


def _caller(tb: tracemalloc.Traceback) -> str:
    """The innermost aivad frame: which line of aivad the bytes are owed to."""
    for frame in reversed(tb):
        if "aivad" in Path(frame.filename).parts:
            return _where(frame)
    return "(outside aivad) " + _site(tb)


def tasks_by_name() -> collections.Counter[str]:
    """Every live trio task, counted by its coroutine's qualified name."""
    counts: collections.Counter[str] = collections.Counter()

    def walk(task: trio.lowlevel.Task) -> None:
        counts[task.coro.cr_code.co_qualname if hasattr(task.coro, "cr_code") else task.name] += 1
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                walk(child)

    walk(trio.lowlevel.current_root_task())
    return counts


async def profile(args: argparse.Namespace) -> None:
    from aivad.config import parse_config
    from aivad.daemon import run_daemon  # (imported before tracemalloc started: see main)

    tmp = Path(tempfile.mkdtemp(prefix="aivad-idle-"))
    doc: dict[str, Any] = {
        "websocket": {"host": "127.0.0.1", "port": 0, "max_connections": args.connections + 1000,
                      "max_connections_per_address": args.connections + 1000},
        "control": {"socket": str(tmp / "control.sock")},
        "store": {"path": str(tmp / "aivad.db"), "synchronous": "NORMAL"},
        "log": {"level": "WARNING"},
    }
    cfg = parse_config(doc)
    async with trio.open_nursery() as nursery:
        endpoints = await nursery.start(partial(run_daemon, cfg, handle_signals=False))
        port = endpoints.ws_port
        child = await trio.lowlevel.open_process(
            [sys.executable, __file__, "--clients", str(port), "--connections", str(args.connections)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )
        assert child.stdin is not None and child.stdout is not None

        async def line() -> str:
            data = b""
            while not data.endswith(b"\n"):
                chunk = await child.stdout.receive_some(100)  # type: ignore[union-attr]
                if not chunk:
                    raise RuntimeError("the client process ended")
                data += chunk
            return data.decode().strip()

        assert await line() == "warm"
        await trio.sleep(0.5)
        gc.collect()
        tasks_before = tasks_by_name()
        before = tracemalloc.take_snapshot()
        await child.stdin.send_all(b"go\n")
        assert await line() == "open"
        await trio.sleep(1.0)
        gc.collect()
        after = tracemalloc.take_snapshot()
        tasks_after = tasks_by_name()
        n = args.connections
        filters = [tracemalloc.Filter(False, tracemalloc.__file__)]
        before, after = before.filter_traces(filters), after.filter_traces(filters)
        stats = after.compare_to(before, "lineno" if args.group == "lineno" else "traceback")
        by_site: collections.Counter[str] = collections.Counter()
        by_count: collections.Counter[str] = collections.Counter()
        for stat in stats:
            key = {"site": _site, "aivad": _caller}.get(args.group, lambda tb: _where(tb[-1]))(stat.traceback)
            by_site[key] += stat.size_diff
            by_count[key] += stat.count_diff
        total = sum(by_site.values())
        print(f"{n} idle subscribed connections: {total / n:,.0f} B per connection traced by tracemalloc")
        print(f"{'B/conn':>8} {'blocks/conn':>11}  allocation site")
        for key, size in by_site.most_common(args.top):
            print(f"{size / n:>8,.0f} {by_count[key] / n:>11.2f}  {key}")
        print("trio tasks per connection:")
        for name, count in (tasks_after - tasks_before).most_common():
            print(f"  {count / n:>5.2f}  {name}")
        await child.stdin.send_all(b"done\n")
        await child.wait()
        nursery.cancel_scope.cancel()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--connections", type=int, default=2000)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--group", choices=["site", "aivad", "lineno"], default="site",
                   help="site: innermost frame in aivad/trio/trio-websocket/wsproto/h11; aivad: the innermost aivad "
                   "line; lineno: the allocating line")
    p.add_argument("--frames", type=int, default=30, help="traceback depth kept by tracemalloc")
    p.add_argument("--clients", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    raise_nofile(2 * args.connections + 1024)
    if args.clients:
        _clients(args.clients, args.connections)
        return 0
    import aivad.daemon  # noqa: F401 - imports are slow under tracemalloc, and not per connection

    tracemalloc.start(args.frames)
    trio.run(profile, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
