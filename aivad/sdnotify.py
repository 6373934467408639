"""sd_notify: tell systemd when the daemon is ready, reloading, stopping, alive.

The protocol is a few lines over an AF_UNIX datagram socket, so it lives here
instead of in a dependency (the ``sdnotify`` package is unmaintained). Every
message goes out from this process, never from a helper thread's subprocess:
the unit runs with ``NotifyAccess=main`` and systemd drops datagrams whose
sender PID is not the main PID.

Sending is best effort and never raises into the caller: a daemon must not die
because systemd is gone or its socket is full. The first failure of a run of
failures is logged as a warning, the rest are not (the watchdog would otherwise
log every 15 s).

Without ``NOTIFY_SOCKET`` (not started by systemd, or ``Type=simple``) every
call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

import trio

__all__ = ["Notifier", "listen_fds", "serve_watchdog"]

log = logging.getLogger(__name__)


def _address(raw: str) -> str | None:
    """systemd's NOTIFY_SOCKET: a filesystem path, or ``@name`` for an abstract socket."""
    if raw.startswith("@"):
        return "\0" + raw[1:]
    if raw.startswith("/"):
        return raw
    return None  # e.g. "vsock:…" (systemd >= 254): not something this daemon is run under


def _one_line(text: str) -> str:
    """sd_notify fields are newline-separated: a STATUS must not smuggle in a second field."""
    return " ".join(text.split())


class Notifier:
    """Sends sd_notify messages to the service manager.

    Create it with :meth:`from_environ` in the daemon's main process. Methods are
    synchronous (one non-blocking ``sendto``), so they can be called from any
    trio task without awaiting; they return whether the datagram was sent.

    Resource handling: the socket is opened on the first send and kept; call
    :meth:`close` at exit (optional: the OS closes it anyway).
    Error handling: nothing raises; failures are logged once per run of failures.
    """

    def __init__(
        self,
        address: str | None,
        *,
        watchdog_usec: int | None = None,
        watchdog_pid: int | None = None,
    ) -> None:
        self._address = address
        self._watchdog_usec = watchdog_usec
        self._watchdog_pid = watchdog_pid
        self._sock: socket.socket | None = None
        self._failing = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """Read ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID``.

        An unusable value is logged and treated as absent: a typo in a unit file
        must not stop the daemon, only the notification it asked for.
        """
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET", "")
        address = _address(raw) if raw else None
        if raw and address is None:
            log.warning("NOTIFY_SOCKET=%r is not a path or @abstract name; not notifying", raw)
        usec = _positive_int(env, "WATCHDOG_USEC")
        pid = _positive_int(env, "WATCHDOG_PID")
        return cls(address, watchdog_usec=usec, watchdog_pid=pid)

    @property
    def enabled(self) -> bool:
        """True when there is a service manager to notify."""
        return self._address is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """Seconds between ``WATCHDOG=1`` pings (half of WATCHDOG_USEC), or None.

        None when no watchdog is asked for, when there is no socket to ping, or
        when ``WATCHDOG_PID`` names another process (then the watchdog is that
        process's job, e.g. a wrapper that exec'd us without updating it).
        """
        if self._address is None or self._watchdog_usec is None:
            return None
        if self._watchdog_pid is not None and self._watchdog_pid != os.getpid():
            return None
        return self._watchdog_usec / 2 / 1_000_000

    def notify(self, *fields: str) -> bool:
        """Send ``fields`` (``KEY=value`` each) as one datagram. Returns True if sent."""
        if self._address is None:
            return False
        data = "\n".join(fields).encode("utf-8", "replace")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(data, self._address)
        except OSError as exc:
            # BlockingIOError (the manager's queue is full) included: dropping a
            # notification beats blocking the trio loop on it.
            if not self._failing:
                log.warning(
                    "sd_notify to %r failed, notifications are dropped until it works again: %s",
                    self._printable_address(),
                    exc,
                )
            self._failing = True
            return False
        if self._failing:
            log.info("sd_notify to %r works again", self._printable_address())
            self._failing = False
        return True

    def ready(self, status: str | None = None) -> bool:
        """``READY=1``: startup or a reload is complete; systemd stops waiting."""
        fields = ["READY=1"]
        if status is not None:
            fields.append(f"STATUS={_one_line(status)}")
        return self.notify(*fields)

    def reloading(self) -> bool:
        """``RELOADING=1`` with ``MONOTONIC_USEC`` (systemd pairs it with the next READY=1)."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self, status: str | None = None) -> bool:
        """``STOPPING=1``: a drain has begun; systemd shows the unit as deactivating."""
        fields = ["STOPPING=1"]
        if status is not None:
            fields.append(f"STATUS={_one_line(status)}")
        return self.notify(*fields)

    def status(self, text: str) -> bool:
        """``STATUS=``: the one-line summary ``systemctl status`` shows."""
        return self.notify(f"STATUS={_one_line(text)}")

    def watchdog(self) -> bool:
        """``WATCHDOG=1``: proof of life; :func:`serve_watchdog` sends it on schedule."""
        return self.notify("WATCHDOG=1")

    def close(self) -> None:
        """Close the socket; a later send reopens it."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _printable_address(self) -> str | None:
        if self._address is not None and self._address.startswith("\0"):
            return "@" + self._address[1:]
        return self._address


def _positive_int(env: Mapping[str, str], name: str) -> int | None:
    raw = env.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        log.warning("%s=%r is not a positive integer; ignored", name, raw)
        return None
    return value


async def serve_watchdog(notifier: Notifier, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Send ``WATCHDOG=1`` every WATCHDOG_USEC/2 from the trio loop, until cancelled.

    The pings come from a trio task on purpose: if the loop is blocked (a
    synchronous call that hangs, a CPU-bound bug), the pings stop and systemd
    restarts the daemon after ``WatchdogSec``. A thread would keep pinging a
    dead loop.

    Returns: at once (after ``started()``) when no watchdog is asked for for
    this process; otherwise never. Error handling: a failed ping is logged by
    the notifier and the schedule continues.
    """
    interval = notifier.watchdog_interval_s
    task_status.started()
    if interval is None:
        return
    log.debug("watchdog: pinging every %.3f s", interval)
    while True:
        notifier.watchdog()
        await trio.sleep(interval)


#: sd_listen_fds(3): passed sockets start at this descriptor
SD_LISTEN_FDS_START = 3


def listen_fds(environ: dict[str, str] | None = None) -> list[socket.socket]:
    """Sockets systemd passed to this process (socket activation), or [] when none.

    Follows sd_listen_fds(3): only when ``LISTEN_PID`` is our PID; the variables
    are removed afterwards so a child process does not take the sockets for its own.
    """
    env = os.environ if environ is None else environ
    if _positive_int(env, "LISTEN_PID") != os.getpid():
        return []
    count = _positive_int(env, "LISTEN_FDS") or 0
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(name, None)
    sockets = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count):
        os.set_inheritable(fd, False)
        sockets.append(socket.socket(fileno=fd))
    log.info("socket activation: %d listening sockets from systemd", len(sockets))
    return sockets
