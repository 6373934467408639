"""The protocol fuzzer's short run (tests/fuzz.py has the machine and the long run).

A real ``aivad serve`` subprocess, raw sockets, hypothesis choosing the program;
it must find nothing. Each failure prints the shortest program hypothesis found,
the last actions, and the daemon's log.
"""

from __future__ import annotations

import pytest
from hypothesis import Phase

from tests.fuzz import harness_for_tests, run_fuzz

pytestmark = pytest.mark.slow


def test_protocol_fuzz_short_run() -> None:
    with harness_for_tests() as harness:
        # no shrinking here: it can take minutes against a real daemon; the failure shows the
        # program's last actions and the daemon's log, and `python -m tests.fuzz` shrinks
        run_fuzz(harness, examples=40, steps=40, phases=(Phase.explicit, Phase.reuse, Phase.generate))
        assert not harness.crashes
        assert harness.stats.counts["frames sent"] > 100
