"""bench/loopback_writes.py runs: the paced write's CPU is printed beside the back-to-back baseline.

Test policy: a smoke test of the bench as users run it (a subprocess); it checks that each
figure is there, never how fast anything was (conftest.py).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "loopback_writes.py"


def test_loopback_writes_prints_the_paced_write_beside_its_baseline() -> None:
    done = subprocess.run([sys.executable, str(BENCH), "--subscribers", "5", "--messages", "50", "--runs", "1"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert re.search(r"back to back: +[\d.]+ µs of CPU per write \(baseline\)", out), out
    assert re.search(r"paced, 0\.4 ms apart: +[\d.]+ µs per write \([\d.]+x\); \d+ µs per message to all 5", out), out
