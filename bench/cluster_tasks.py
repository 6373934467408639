"""Tasks across a cluster: dispatched on node a, run by workers on node b, beside one node, in one run.

Usage::

    python bench/cluster_tasks.py            # full run, ~2 minutes on 2 vCPU
    python bench/cluster_tasks.py --quick    # smoke test
    python bench/cluster_tasks.py --json     # the same figures as one JSON object on stdout

Started here, each a child process on 127.0.0.1 and free ports, in a temporary
directory removed at the end: a private ``redis-server`` (tests/brokers.py, no
persistence), ``single`` (``aivad serve`` with the embedded store: the
baseline) and ``a``/``b`` (two nodes of one cluster on that Redis: the task
book, aivad/cluster_tasks.py). The same W worker processes
(bench/dispatch.py's ``aivad.client.Worker``, concurrency 1, a no-op handler)
connect to ``single``, then to ``b``; the same driver (bench/dispatch.py's:
aivad.client under trio) connects to ``single``, then to ``a``, and measures:

* peak: N dispatches from 32 concurrent callers, each counted when its
  ``task.completed`` reaches the driver (for the cluster: ended on b, read by
  a's tail); round trips/s;
* latency of one round trip at half of that peak (open loop), p50/p99;
* sequential ``request`` (``request_response``) p50/p99;
* CPU per round trip of the whole run, by server process (the aivad nodes, Redis).

Printed as ratios of the same run (cluster / single): what the task book in
Redis costs a round trip — one claim and one end per task, each a CAS script
call, plus every node reading the changed records — against SQLite commits on
one node. The machine is shared and noisy: compare within one run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import cpu_seconds, machine
from cluster import aivad_node, cluster_toml
from dispatch import run_aivad_driver, start_workers, stop_procs, wait_workers

from tests.brokers import Redis, ensure_installed


def measure(driver_url: str, workers_url: str, workers_sock: Path, server_pids: dict[str, int],
            args: argparse.Namespace, log: Path) -> dict[str, Any]:
    """Workers on ``workers_url``, the driver on ``driver_url``: the driver's figures, and the CPU of each
    server process (``server_pids``: name → pid; the first is the driver's node) per round trip of the whole run."""
    procs = start_workers(workers_url, args.workers, "client", log)
    try:
        wait_workers(workers_sock, args.workers)
        before = {name: cpu_seconds(pid) for name, pid in server_pids.items()}
        row = run_aivad_driver(driver_url, args.tasks, args.latency_tasks, args.sequential,
                               next(iter(server_pids.values())), [p.pid for p in procs])
        total = args.tasks + args.latency_tasks + args.sequential
        row["cpu_servers_ms"] = {name: (cpu_seconds(pid) - before[name]) / total * 1000
                                 for name, pid in server_pids.items()}
        return row
    finally:
        stop_procs(procs)


def run(args: argparse.Namespace) -> dict[str, Any]:
    ensure_installed()
    redis = Redis().start()
    try:
        with tempfile.TemporaryDirectory(prefix="aivad-bench-") as name:
            tmp = Path(name)
            single = aivad_node(tmp, "single")
            single.child.start()
            try:
                one = measure(f"ws://127.0.0.1:{single.port}/", f"ws://127.0.0.1:{single.port}/",
                              tmp / "single" / "control.sock", {"single": single.pid}, args,
                              tmp / "workers-single.log")
            finally:
                single.child.stop()
            prefix = f"bench{uuid.uuid4().hex[:8]}:"
            a = aivad_node(tmp, "a", cluster_toml(redis.url, prefix, "a"))
            b = aivad_node(tmp, "b", cluster_toml(redis.url, prefix, "b"))
            a.child.start()
            b.child.start()
            try:
                two = measure(f"ws://127.0.0.1:{a.port}/", f"ws://127.0.0.1:{b.port}/", tmp / "b" / "control.sock",
                              {"a": a.pid, "b": b.pid, "redis": redis.pid or 0}, args, tmp / "workers-cluster.log")
            finally:
                a.child.stop()
                b.child.stop()
    finally:
        redis.stop()
    servers = {name: sum(row["cpu_servers_ms"].values()) for name, row in (("single", one), ("cluster", two))}
    return {"machine": machine(), "workers": args.workers, "tasks": args.tasks, "single": one, "cluster": two,
            "ratios": {"peak": two["rate"] / one["rate"], "p99_at_half_peak": two["p99"] / one["p99"],
                       "sequential_request_p50": two["seq_p50"] / one["seq_p50"],
                       "server_cpu_per_trip": servers["cluster"] / servers["single"]}}


def table(result: dict[str, Any]) -> str:
    lines = [f"machine: {result['machine']}",
             f"{result['workers']} worker processes; {result['tasks']} tasks per peak run",
             f"{'':28}{'peak /s':>9}{'half-peak p50':>15}{'p99 ms':>8}{'seq req p50':>13}{'p99 ms':>8}"
             "  server CPU ms per round trip"]
    for name, label in (("single", "one node (SQLite)"), ("cluster", "2 nodes: a → Redis → b")):
        row = result[name]
        cpu = ", ".join(f"{k} {v:.2f}" for k, v in row["cpu_servers_ms"].items())
        lines.append(f"{label:28}{row['rate']:9.0f}{row['p50']:15.1f}{row['p99']:8.1f}{row['seq_p50']:13.1f}"
                     f"{row['seq_p99']:8.1f}  {cpu}")
    r = result["ratios"]
    lines.append(f"cluster / single: peak {r['peak']:.2f}x, p99 at half peak {r['p99_at_half_peak']:.2f}x, "
                 f"sequential request p50 {r['sequential_request_p50']:.2f}x, server CPU per round trip "
                 f"{r['server_cpu_per_trip']:.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", type=int, default=3000, help="tasks per peak run")
    p.add_argument("--latency-tasks", type=int, default=2000, help="tasks in the half-peak latency run")
    p.add_argument("--sequential", type=int, default=200, help="sequential requests")
    p.add_argument("--workers", type=int, default=4, help="worker processes")
    p.add_argument("--quick", action="store_true", help="a smoke run: few tasks")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = p.parse_args(argv)
    if args.quick:
        args.tasks, args.latency_tasks, args.sequential, args.workers = 300, 200, 30, 2
    result = run(args)
    print(json.dumps(result) if args.json else table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
