"""bench/sqlite_writer.py runs: each of its comparisons prints a figure beside its baseline and the ratio.

Test policy: a smoke test of the bench as users run it (a subprocess); it checks
that each figure is there, never how fast anything was (conftest.py).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "sqlite_writer.py"


def test_sqlite_writer_prints_each_figure_beside_its_baseline() -> None:
    done = subprocess.run([sys.executable, str(BENCH), "--tasks", "300"], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert len(re.findall(r"[\d.]+ µs/task \(baseline\)", out)) == 2, out
    assert re.search(r"own thread beside a busy one: +[\d.]+ µs/task of the writer's CPU \([\d.]+x the baseline\)",
                     out), out
    assert re.search(r"new_id ids: +[\d.]+ µs/task \([\d.]+x the baseline\)", out), out
    # part 3 counts pages, it does not time them: the daemon's indexes write fewer than the baseline's
    wal = re.findall(r"3\. WAL per task, (\d+) write\(s\) per commit: .* ([\d.]+) KB \(baseline\); "
                     r"the daemon's indexes +([\d.]+) KB \(([\d.]+)x\)", out)
    assert [per_commit for per_commit, *_ in wal] == ["5", "1"], out
    assert all(float(after) < float(before) for _, before, after, _ in wal), out
    # part 4 times the store's multi-row INSERTs beside executemany, alone and beside a busy thread
    rows = re.findall(r"4\. 500 messages per commit, (alone|beside a busy thread): executemany +[\d.]+ µs/row "
                      r"\(baseline\); the store's multi-row INSERTs +[\d.]+ µs/row \([\d.]+x\)", out)
    assert rows == ["alone", "beside a busy thread"], out
