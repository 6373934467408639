"""Socket activation: a real ``aivad serve`` handed its WebSocket socket as fd 3 (sd_listen_fds(3))."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from websockets.sync.client import connect as ws_connect

from tests.conftest import DaemonProcess

REPO = Path(__file__).resolve().parent.parent

# exec aivad with the socket on fd 3 and LISTEN_PID = its own pid, as systemd does
_EXEC_WITH_FD3 = (
    "import os, sys; os.dup2(int(sys.argv[1]), 3); "
    "os.environ.update(LISTEN_FDS='1', LISTEN_PID=str(os.getpid())); "
    "os.execv(sys.executable, [sys.executable, '-m', 'aivad', 'serve', '--config', sys.argv[2]])"
)


def test_serves_on_the_socket_systemd_passes(tmp_dir: Path) -> None:
    activated = socket.socket()
    activated.bind(("127.0.0.1", 0))
    activated.listen(16)
    port = activated.getsockname()[1]
    proc = DaemonProcess(tmp_dir)  # its config names another free port: the passed socket must win
    assert proc.ws_port != port
    with open(proc.log_path, "ab") as log:
        proc.proc = subprocess.Popen(
            [sys.executable, "-c", _EXEC_WITH_FD3, str(activated.fileno()), str(proc.config_path)],
            pass_fds=(activated.fileno(),), stdout=log, stderr=log, cwd=tmp_dir,
        )
    activated.close()  # the daemon holds its own copy now
    try:
        with ws_connect(f"ws://127.0.0.1:{port}/", open_timeout=20) as ws:
            ws.send(json.dumps({"op": "publish", "type": "activated", "payload": 1, "ref": 1}))
            assert json.loads(ws.recv(10))["seq"] == 1
        with pytest.raises(ConnectionRefusedError):  # nothing bound the configured port
            socket.create_connection(("127.0.0.1", proc.ws_port), timeout=2).close()
        assert "socket activation: 1 listening sockets" in proc.log()
    finally:
        proc.stop()


def test_socket_unit_verifies(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    unit = tmp_path / "aivad.socket"
    unit.write_text((REPO / "systemd" / "aivad.socket").read_text())
    service = tmp_path / "aivad.service"
    service.write_text("[Service]\nType=notify\nExecStart=/bin/true\n")
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True,
                            timeout=60, env={**os.environ, "SYSTEMD_LOG_LEVEL": "err"})
    assert result.returncode == 0, result.stderr
