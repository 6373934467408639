"""bench/cluster.py and bench/cluster_tasks.py run: their ``--quick`` modes start Redis and real nodes and
print every figure.

Test policy: a smoke test of the bench as users run it (a subprocess, ``--json``);
it checks that each figure and each goal is there, never how fast anything was
(tests never assert on speed: conftest.py).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "cluster.py"


@pytest.mark.slow
def test_quick_mode_prints_every_figure_beside_its_baseline() -> None:
    done = subprocess.run([sys.executable, str(BENCH), "--quick", "--json"], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
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
    bench = BENCH.parent / "cluster_tasks.py"
    done = subprocess.run([sys.executable, str(bench), "--quick", "--json"], capture_output=True, text=True,
                          timeout=180, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    for setup in ("single", "cluster"):
        row = result[setup]
        assert row["rate"] > 0 and math.isfinite(row["p99"]) and math.isfinite(row["seq_p50"])
    assert set(result["single"]["cpu_servers_ms"]) == {"single"}
    assert set(result["cluster"]["cpu_servers_ms"]) == {"a", "b", "redis"}
    assert set(result["ratios"]) == {"peak", "p99_at_half_peak", "sequential_request_p50", "server_cpu_per_trip"}
