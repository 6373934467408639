"""bench/cluster.py and bench/cluster_tasks.py run: their ``--quick`` modes start Redis and real nodes and
print every figure.

Test policy: a smoke test of the bench as users run it (a subprocess, ``--json``);
it checks that each figure and each goal is there, never how fast anything was
(tests never assert on speed: conftest.py).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "cluster.py"


def run_quick(bench: Path, timeout_s: float) -> dict[str, Any]:
    """``bench --quick --json``'s result. A bench that overruns is stopped with everything it started
    (Redis, the nodes: its process group) and the test fails with the bench's last progress lines."""
    with subprocess.Popen([sys.executable, str(bench), "--quick", "--json"], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            pytest.fail(f"{bench.name} --quick overran {timeout_s:.0f} s; its last lines:\n{err[-3000:]}")
    assert proc.returncode == 0, err[-3000:]
    result = dict(json.loads(out))
    for row in _rows(result):
        assert row["error"] == "", f"{row['error']}\n{err[-3000:]}"
    return result


def _rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Every measured row of a result (those that may carry an ``error``)."""
    return [row for case in result.values() if isinstance(case, dict)
            for row in case.values() if isinstance(row, dict) and "error" in row]


@pytest.mark.slow
def test_quick_mode_prints_every_figure_beside_its_baseline() -> None:
    result = run_quick(BENCH, 180)
    assert result["redis_xadd"]["per_s"] > 0 and result["redis_xadd"]["stored"] == result["redis_xadd"]["entries"]
    for case in ("saturated", "paced"):
        single, cluster = result[case]["single"], result[case]["cluster"]
        assert set(single["groups"]) == {"single"} and set(cluster["groups"]) == {"a", "b"}
        for row in (single, cluster):
            assert row["error"] == "" and row["messages_per_s"] > 0
            for group in row["groups"].values():
                assert group["deliveries"] == group["expected"] > 0
                assert math.isfinite(group["p50_ms"]) and math.isfinite(group["p99_ms"])
    assert set(result["paced_rate"]) == {"single", "cluster"}
    ratios = result["ratios"]
    for key in ("cluster_vs_single", "cross_node_p99_ms", "cluster_vs_redis_xadd"):
        assert ratios[key] > 0
    assert set(ratios["goals_met"]) == {"cluster_vs_single", "cross_node_p99_ms"}


@pytest.mark.slow
def test_cluster_tasks_quick_mode_prints_both_setups_and_their_ratios() -> None:
    result = run_quick(BENCH.parent / "cluster_tasks.py", 240)
    for setup in ("single", "cluster"):
        row = result[setup]
        assert row["rate"] > 0 and math.isfinite(row["p99"]) and math.isfinite(row["seq_p50"])
    assert set(result["single"]["cpu_servers_ms"]) == {"single"}
    assert set(result["cluster"]["cpu_servers_ms"]) == {"a", "b", "redis"}
    assert set(result["ratios"]) == {"peak", "p99_at_half_peak", "sequential_request_p50", "server_cpu_per_trip"}
