"""The soak and leak test's short run (tests/soak.py has the peers, the checks and the long run).

1,000 peers that subscribe, publish and vanish — resets, peers that never read,
slow readers, half-closes, clean closes — against a real ``aivad serve`` whose
``RLIMIT_NOFILE`` leaves it 24 descriptors of headroom, so ``accept`` keeps
failing with ``EMFILE``. Afterwards its descriptors and RSS are back at the
baseline, every acknowledged publish is in history, and SIGTERM still drains it
to exit 0.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import trio

from tests.conftest import DaemonProcess
from tests.soak import SOAK_CONFIG, run_soak

pytestmark = pytest.mark.slow


async def test_1000_peers_under_descriptor_pressure_leave_no_leak_and_lose_nothing(tmp_dir: Path) -> None:
    daemon = DaemonProcess(tmp_dir, **{name: dict(values) for name, values in SOAK_CONFIG.items()})
    daemon.start()
    try:
        with trio.fail_after(600):  # a hang fails; the run itself takes about a minute
            report = await run_soak(daemon, connections=1000, duration_s=25, warmup=100, fd_headroom=24)
        assert not report.problems, report.summary()
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(30) == 0, daemon.log()[-3000:]
    finally:
        daemon.stop()
