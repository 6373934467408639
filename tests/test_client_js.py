"""Run the browser client's Node test suite (tests/js/*.test.mjs) against real daemons.

Test policy: the JS tests start their own ``aivad serve`` processes (with this
Python, on free ports, in a temp dir given to them) and never mock the daemon;
this wrapper only runs Node with a real timeout and shows Node's output when
anything fails. Without ``node`` on PATH it skips, saying so; any other problem
(an old Node, a failing test, a hang) fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from aivad.web import ASSETS, read_asset
from tests.conftest import REPO, short_tmp_dir

JS_TESTS = REPO / "tests" / "js"
#: the whole Node suite; each test's own waits are bounded far below this
TIMEOUT_S = 600


def node_or_skip() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not on PATH: the browser client's tests (tests/js) need Node 20+")
    return node


def test_node_suite() -> None:
    node = node_or_skip()
    version = subprocess.run([node, "--version"], capture_output=True, text=True, check=True).stdout.strip()
    assert int(version.lstrip("v").split(".")[0]) >= 20, f"tests/js need Node 20+, found {version}"
    files = sorted(str(p) for p in JS_TESTS.glob("*.test.mjs"))
    assert files, "no tests/js/*.test.mjs"
    tmp = short_tmp_dir()
    env = {**os.environ, "AIVAD_PYTHON": sys.executable, "AIVAD_TMP": str(tmp)}
    try:
        done = subprocess.run(
            [node, "--experimental-websocket", "--test", "--test-reporter=spec", *files],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as exc:
        output = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        pytest.fail(f"node --test did not finish within {TIMEOUT_S} s:\n{output}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if done.returncode != 0:
        pytest.fail(f"node --test exited with {done.returncode}:\n{done.stdout}\n{done.stderr}")


def test_client_js_is_package_data() -> None:
    source = read_asset("client.js")
    assert source == (REPO / "aivad" / "web" / "client.js").read_bytes()
    assert b"export function connect(" in source
    assert "client.js" in ASSETS and "console.html" in ASSETS
    with pytest.raises(KeyError):
        read_asset("../__init__.py")


def test_client_js_parses() -> None:
    node = node_or_skip()
    done = subprocess.run([node, "--check", str(REPO / "aivad" / "web" / "client.js")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
