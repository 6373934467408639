"""The ``aivad`` command line: ``serve``, and the subcommands that talk to a running daemon.

Client subcommands speak the control protocol (DESIGN §4.4) over the unix
socket with plain blocking sockets — no event loop is needed to ask a question.
Exit status (DESIGN §4.1, fixed): 0 done, 1 the daemon reported an error,
2 bad usage or config, 3 daemon unreachable.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

from . import __version__
from .config import ConfigError, default_control_socket, load_config

__all__ = ["main"]

EXIT_OK, EXIT_DAEMON_ERROR, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3


class Unreachable(Exception):
    """The control socket could not be reached."""


class DaemonError(Exception):
    """The daemon answered ``ok: false``."""

    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(f"{error.get('code')}: {error.get('message')}")
        self.error = error


class ControlClient:
    """A blocking control-socket client: one JSON line out, JSON lines back."""

    def __init__(self, path: str, timeout_s: float | None = 30.0) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout_s)
        try:
            self._sock.connect(path)
        except OSError as exc:
            self._sock.close()
            raise Unreachable(f"cannot reach aivad at {path}: {exc.strerror or exc}") from None
        self._reader = self._sock.makefile("rb")

    def close(self) -> None:
        self._reader.close()
        self._sock.close()

    def send(self, request: dict[str, Any]) -> None:
        self._sock.sendall(json.dumps(request).encode() + b"\n")

    def lines(self) -> Iterator[dict[str, Any]]:
        for line in self._reader:
            yield json.loads(line)

    def call(self, request: dict[str, Any]) -> dict[str, Any]:
        self.send(request)
        for reply in self.lines():
            if not reply.get("ok"):
                raise DaemonError(reply.get("error", {}))
            return reply
        raise Unreachable(f"aivad at {self.path} closed the connection")


# ---- output -------------------------------------------------------------------


def _message_line(msg: dict[str, Any]) -> str:
    payload = json.dumps(msg.get("payload"), ensure_ascii=False)
    if len(payload) > 200:
        payload = payload[:197] + "..."
    return f"{msg.get('seq', ''):>8}  {msg.get('timestamp', '')}  {msg.get('type', '')}  {payload}"


def _print_status(status: dict[str, Any]) -> None:
    ws, store, ingest, router = status["websocket"], status["store"], status["ingest"], status["router"]
    uptime = int(status["uptime_s"])
    rows = [
        ("aivad", f"{status['version']}, up {uptime // 3600}h{uptime % 3600 // 60:02d}m{uptime % 60:02d}s"
                  + ("  (draining)" if status.get("draining") else "")),
        ("websocket", f"port {ws['port']}, {ws['connections']} connections, {ws['subscriptions']} subscriptions, "
                      f"{ws['slow_consumer_closes']} slow-consumer closes"),
        ("store", f"last seq {store['last_seq']}, {store['stored_messages']} messages kept, "
                  f"write queue {store['write_queue_depth']}/{store['write_queue_size']}, {store['path']}"),
        ("rates", f"{ingest['rate_10s']:.1f} msgs/s (10 s), {ingest['rate_60s']:.1f} msgs/s (1 min), "
                  f"{router['deliveries']} deliveries"),
        ("ingested", ", ".join(f"{k} {v}" for k, v in sorted(ingest["by_ingress"].items())) or "nothing yet"),
    ]
    for section in ("amqp", "tasks", "http"):
        if section in status:
            rows.append((section, ", ".join(f"{k} {v}" for k, v in status[section].items())))
    for name, text in rows:
        print(f"{name:>10}  {text}")


# ---- subcommands --------------------------------------------------------------


def _json_arg(text: str | None, what: str) -> Any:
    if text is None:
        return None
    if text == "-":
        text = sys.stdin.read()
    try:
        return json.loads(text)
    except ValueError as exc:
        raise UsageError(f"{what} is not valid JSON: {exc}") from None


class UsageError(Exception):
    pass


def _status(client: ControlClient, args: argparse.Namespace) -> None:
    reply = client.call({"cmd": "status"})
    if args.json:
        print(json.dumps(reply["status"], indent=2))
    else:
        _print_status(reply["status"])


def _publish(client: ControlClient, args: argparse.Namespace) -> None:
    request: dict[str, Any] = {"cmd": "publish", "type": args.type, "payload": _json_arg(args.payload, "PAYLOAD_JSON")}
    if args.message_id:
        request["message_id"] = args.message_id
    if args.metadata:
        request["metadata"] = _json_arg(args.metadata, "--metadata")
    reply = client.call(request)
    if args.json:
        print(json.dumps({"seq": reply["seq"], "duplicate": reply["duplicate"]}))
    else:
        print(f"duplicate of seq {reply['seq']}" if reply["duplicate"] else f"stored as seq {reply['seq']}")


def _history(client: ControlClient, args: argparse.Namespace) -> None:
    reply = client.call({"cmd": "history", "pattern": args.pattern, "after": args.after, "limit": args.limit})
    if args.json:
        print(json.dumps({"messages": reply["messages"], "last_seq": reply["last_seq"]}))
        return
    for msg in reply["messages"]:
        print(_message_line(msg))
    if not reply["messages"]:
        print(f"no messages matching {args.pattern} after seq {args.after}", file=sys.stderr)


def _tail(client: ControlClient, args: argparse.Namespace) -> None:
    request: dict[str, Any] = {"cmd": "tail", "pattern": args.pattern}
    if args.since is not None:
        request["since"] = args.since
    client._sock.settimeout(None)
    first = client.call(request)
    if not first.get("recovered", True):
        print(f"warning: seq {first['gap'][0]}..{first['gap'][1]} is no longer kept", file=sys.stderr)
    for line in client.lines():
        if "ok" in line and not line["ok"]:
            raise DaemonError(line.get("error", {}))
        msg = line["msg"]
        print(json.dumps(msg) if args.json else _message_line(msg), flush=True)


def _simple(cmd: str, human: Callable[[dict[str, Any]], str]) -> Callable[[ControlClient, argparse.Namespace], None]:
    def run(client: ControlClient, args: argparse.Namespace) -> None:
        reply = client.call({"cmd": cmd})
        reply.pop("ok", None)
        print(json.dumps(reply) if args.json else human(reply))

    return run


def _reload_text(reply: dict[str, Any]) -> str:
    text = "reloaded: " + (", ".join(reply["applied"]) or "nothing changed")
    if reply["needs_restart"]:
        text += "\nneeds a restart: " + ", ".join(reply["needs_restart"])
    return text


# ---- argument parsing -----------------------------------------------------------

_EXAMPLES = {
    "serve": "aivad serve\n  aivad serve --config /etc/aivad/config.toml",
    "status": "aivad status\n  aivad status --json | jq .store.last_seq",
    "publish": "aivad publish scan.completed '{\"scan_id\": \"123\"}'\n"
               "  echo '{\"n\": 1}' | aivad publish notifications.frontend.evt-42.chat - --message-id m-1",
    "tail": "aivad tail 'scan.*'\n  aivad tail 'notifications.frontend.evt-42.#' --since 1000",
    "history": "aivad history '#' --limit 20\n  aivad history 'scan.*' --after 1000 --json",
    "drain": "aivad drain    # the daemon closes clients with 1001 and exits 0",
    "reload": "aivad reload   # same as systemctl reload aivad (SIGHUP)",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aivad",
        description="aivad: the messaging backbone of a multi-agent system.",
        epilog="Exit status: 0 done, 1 the daemon reported an error, 2 bad usage or config, 3 daemon unreachable.",
    )
    parser.add_argument("--version", action="version", version=f"aivad {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name, help=help, description=help, epilog="examples:\n  " + _EXAMPLES[name],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        if name != "serve":
            sub.add_argument("--socket", metavar="PATH", help="control socket (default: from --config, "
                             "else $AIVAD_SOCKET, else the daemon's default)")
            sub.add_argument("--json", action="store_true", help="print JSON instead of text")
        sub.add_argument("--config", metavar="PATH", help="config file (TOML)")
        return sub

    serve = command("serve", "run the daemon in the foreground")
    serve.add_argument("--log-format", choices=["text", "json"], help="override [log] format")
    command("status", "show what the daemon is doing")
    publish = command("publish", "publish one message")
    publish.add_argument("type", metavar="TYPE", help="topic, e.g. scan.completed")
    publish.add_argument("payload", metavar="PAYLOAD_JSON", nargs="?", help="JSON payload ('-' reads stdin)")
    publish.add_argument("--message-id", help="idempotency key (a repeat is stored once)")
    publish.add_argument("--metadata", metavar="JSON", help="metadata object")
    tail = command("tail", "print messages matching PATTERN as they arrive")
    tail.add_argument("pattern", metavar="PATTERN")
    tail.add_argument("--since", metavar="SEQ", type=int, help="first replay what came after SEQ")
    history = command("history", "print stored messages matching PATTERN")
    history.add_argument("pattern", metavar="PATTERN")
    history.add_argument("--after", metavar="SEQ", type=int, default=0)
    history.add_argument("--limit", metavar="N", type=int, default=100)
    command("drain", "stop intake, close clients, exit 0")
    command("reload", "re-read the config file and apply what can change live")
    return parser


_RUNNERS: dict[str, Callable[[ControlClient, argparse.Namespace], None]] = {
    "status": _status,
    "publish": _publish,
    "history": _history,
    "tail": _tail,
    "drain": _simple("drain", lambda r: "draining"),
    "reload": _simple("reload", _reload_text),
}


def _socket_path(args: argparse.Namespace) -> str:
    if args.socket:
        return str(args.socket)
    if args.config:
        return load_config(args.config).control.socket
    return os.environ.get("AIVAD_SOCKET") or default_control_socket()


def _fail(code: int, message: str) -> NoReturn:
    print(f"aivad: {message}", file=sys.stderr)
    sys.exit(code)


def main(argv: list[str] | None = None) -> NoReturn:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        from .__main__ import serve

        sys.exit(serve(args.config, args.log_format))
    try:
        client = ControlClient(_socket_path(args))
    except ConfigError as exc:
        _fail(EXIT_USAGE, str(exc))
    except Unreachable as exc:
        _fail(EXIT_UNREACHABLE, str(exc))
    try:
        _RUNNERS[args.command](client, args)
    except UsageError as exc:
        _fail(EXIT_USAGE, str(exc))
    except DaemonError as exc:
        _fail(EXIT_DAEMON_ERROR, str(exc))
    except (Unreachable, OSError) as exc:
        _fail(EXIT_UNREACHABLE, str(exc))
    except KeyboardInterrupt:
        sys.exit(EXIT_OK)
    except BrokenPipeError:
        sys.exit(EXIT_OK)
    finally:
        client.close()
    sys.exit(EXIT_OK)
