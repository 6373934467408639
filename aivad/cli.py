"""The ``aivad`` command line: ``serve``, and the subcommands that talk to a running daemon.

Client subcommands speak the control protocol (DESIGN §4.4) over the unix
socket with plain blocking sockets — no event loop is needed to ask a question.
Exit status (DESIGN §4.1, fixed): 0 done, 1 the daemon reported an error,
2 bad usage or config, 3 daemon unreachable.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import socket
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

from . import __version__
from .config import HMAC_ALGORITHMS, ConfigError, default_control_socket, load_config

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
        (
            "aivad",
            f"{status['version']}, up {uptime // 3600}h{uptime % 3600 // 60:02d}m{uptime % 60:02d}s"
            + ("  (draining)" if status.get("draining") else ""),
        ),
        (
            "websocket",
            f"port {ws['port']}, {ws['connections']} connections, {ws['subscriptions']} subscriptions, "
            f"{ws['slow_consumer_closes']} slow-consumer closes",
        ),
        (
            "store",
            f"last seq {store['last_seq']}, {store['stored_messages']} messages kept, "
            f"write queue {store['write_queue_depth']}/{store['write_queue_size']}, {store['path']}",
        ),
        (
            "rates",
            f"{ingest['rate_10s']:.1f} msgs/s (10 s), {ingest['rate_60s']:.1f} msgs/s (1 min), "
            f"{router['deliveries']} deliveries",
        ),
        ("ingested", ", ".join(f"{k} {v}" for k, v in sorted(ingest["by_ingress"].items())) or "nothing yet"),
    ]
    tasks = status.get("tasks")
    if tasks:
        states = ", ".join(f"{state} {n}" for state, n in tasks["tasks_by_state"].items())
        rows.append(("tasks", f"{states}; {tasks['workers']} workers, {tasks['retries']} retries"))
    for section in ("amqp", "http"):
        if section in status:
            rows.append((section, ", ".join(f"{k} {v}" for k, v in status[section].items())))
    rows += _cluster_rows(status.get("cluster"))
    for name, text in rows:
        print(f"{name:>10}  {text}")


def _cluster_rows(cluster: dict[str, Any] | None) -> list[tuple[str, str]]:
    """The cluster's log, this node's journal, and a row per live node (``[redis] enabled``)."""
    if cluster is None:
        return []
    redis = "Redis ok" if cluster["failure"] is None else f"Redis FAILING: {cluster['failure']}"
    journal = cluster.get("journal") or {}
    rows = [("cluster", f"node {cluster['node_name']}, log epoch {cluster['epoch']}, last seq {cluster['last_seq']}, "
                        f"{redis}, journal behind {journal.get('behind', 0)}")]
    now = time.time()
    for node in cluster["nodes"]:
        seen = now - float(node.get("last_seen", now))
        rows.append(("node", f"{node['name']}: {node.get('connections', 0)} connections, "
                             f"{node.get('subscriptions', 0)} subscriptions, {node.get('workers', 0)} workers, "
                             f"seen {max(0.0, seen):.1f}s ago"))
    return rows


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


def _dispatch(client: ControlClient, args: argparse.Namespace) -> None:
    request: dict[str, Any] = {"cmd": "dispatch", "type": args.type, "payload": _json_arg(args.payload, "PAYLOAD_JSON")}
    priority = args.priority
    if priority is not None:
        request["priority"] = int(priority) if priority.isdigit() else priority
    if args.max_attempts is not None:
        request["retry_policy"] = {"max_attempts": args.max_attempts}
    for name in ("timeout", "heartbeat", "affinity_key", "group_id"):
        if getattr(args, name) is not None:
            request[name] = getattr(args, name)
    reply = client.call(request)
    print(json.dumps({"task_id": reply["task_id"]}) if args.json else reply["task_id"])


def _task(client: ControlClient, args: argparse.Namespace) -> None:
    task = client.call({"cmd": "task", "task_id": args.task_id})["task"]
    if args.json:
        print(json.dumps(task, indent=2))
        return
    print(f"{task['task_id']}  {task['type']}  {task['state']}  attempt {task['attempts']}")
    if task["state"] == "completed":
        print(f"result: {json.dumps(task['result'])}")
    elif task["error"] is not None:
        print(f"error: {json.dumps(task['error'])}")
    for attempt in task["history"]:
        print(
            f"  attempt {attempt.get('attempt', '?')}: {attempt.get('outcome', '?')} on "
            f"{attempt.get('worker', '-')} {attempt.get('started', '')} → {attempt.get('ended', '')}"
            + (f"  {json.dumps(attempt['error'])}" if attempt.get("error") is not None else "")
        )


def _tasks(client: ControlClient, args: argparse.Namespace) -> None:
    request: dict[str, Any] = {"cmd": "tasks", "limit": args.limit}
    if args.state:
        request["state"] = args.state
    tasks = client.call(request)["tasks"]
    if args.json:
        print(json.dumps(tasks))
        return
    for task in tasks:
        print(f"{task['task_id']}  {task['state']:<10}  attempts {task['attempts']}  {task['type']}")
    if not tasks:
        print("no tasks" + (f" in state {args.state}" if args.state else ""), file=sys.stderr)


def _workers(client: ControlClient, args: argparse.Namespace) -> None:
    workers = client.call({"cmd": "workers"})["workers"]
    if args.json:
        print(json.dumps(workers))
        return
    print(f"{'name':<20} {'in flight':>9} {'done':>7} {'failed':>7}  connected since        types")
    for w in workers:
        print(
            f"{w['name'][:20]:<20} {w['in_flight']:>4}/{w['concurrency']:<4} {w['done']:>7} {w['failed']:>7}  "
            f"{w['connected_since']:<21}  {', '.join(w['types'])}"
        )


def _dlq(client: ControlClient, args: argparse.Namespace) -> None:
    action = args.action
    request: dict[str, Any] = {"cmd": f"dlq.{action}"}
    if action == "list":
        if args.kind is not None:
            request["kind"] = args.kind
        reply = client.call({**request, "limit": args.limit, "after": args.after})
        letters, next_after = reply["dead_letters"], reply["next_after"]
        if args.json:
            print(json.dumps({"dead_letters": letters, "next_after": next_after}))
            return
        for d in letters:
            when = dt.datetime.fromtimestamp(d["created_at"], dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            print(f"{d['id']:>6}  {d['kind']:<8}  {when}  {d['reason']}  {d['body'][:80]}")
        if next_after is not None:
            kind = f" --kind {args.kind}" if args.kind is not None else ""
            print(f"more: aivad dlq list{kind} --after {next_after} --limit {args.limit}", file=sys.stderr)
        elif not letters:
            print("no dead letters" + (f" of kind {args.kind}" if args.kind else "")
                  + (f" after id {args.after}" if args.after else ""), file=sys.stderr)
        return
    if action == "purge":
        if not args.yes:
            raise UsageError("dlq purge deletes every dead letter: add --yes")
        reply = client.call({**request, "yes": True})
        print(json.dumps({"purged": reply["purged"]}) if args.json else f"purged {reply['purged']} dead letters")
        return
    if action == "replay" and args.all:
        request["all"] = True
    elif args.id is None:
        raise UsageError(f"dlq {action} needs an ID" + (" (or --all)" if action == "replay" else ""))
    else:
        request["id"] = args.id
    reply = client.call(request)
    if action == "show":
        letter = reply["dead_letter"]
        print(
            json.dumps(letter, indent=2)
            if args.json
            else f"dead letter {letter['id']} ({letter['kind']}): {letter['reason']}\n"
            f"body: {letter['body']}\ndetail: {json.dumps(letter['detail'], indent=2)}"
        )
    else:
        print(
            json.dumps(reply["replayed"])
            if args.json
            else "\n".join(f"queued again: {t}" for t in reply["replayed"]) or "nothing to replay"
        )


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
    "serve": "aivad serve\n  aivad serve --config /etc/aivad/config.toml\n"
    "  aivad serve --config /etc/aivad/config.toml --check-config",
    "status": "aivad status\n  aivad status --json | jq .store.last_seq",
    "publish": 'aivad publish scan.completed \'{"scan_id": "123"}\'\n'
    "  echo '{\"n\": 1}' | aivad publish notifications.frontend.evt-42.chat - --message-id m-1",
    "tail": "aivad tail 'scan.*'\n  aivad tail 'notifications.frontend.evt-42.#' --since 1000",
    "history": "aivad history '#' --limit 20\n  aivad history 'scan.*' --after 1000 --json",
    "drain": "aivad drain    # the daemon closes clients with 1001 and exits 0",
    "dispatch": 'aivad dispatch scan.run \'{"target": "10.0.0.1"}\' --priority high --max-attempts 5 --timeout 60',
    "task": "aivad task 8c1d2e…\n  aivad task 8c1d2e… --json",
    "tasks": "aivad tasks --state dead\n  aivad tasks --state queued --limit 20",
    "workers": "aivad workers",
    "dlq": "aivad dlq list\n  aivad dlq show 12\n  aivad dlq replay 12\n"
    "  aivad dlq replay --all\n  aivad dlq purge --yes",
    "reload": "aivad reload   # same as systemctl reload aivad (SIGHUP)",
    "token": "aivad token --sub soc-frontend --subscribe 'incident.42.#' --ttl 8h --config /etc/aivad/config.toml\n"
    "  aivad token --sub scanner-1 --publish 'scan.*' --work scan.run --secret-file ./hmac.secret\n"
    "  aivad token --sub console --admin --ttl 30m --secret-file ./hmac.secret",
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
            name,
            help=help,
            description=help,
            epilog="examples:\n  " + _EXAMPLES[name],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        if name not in ("serve", "token"):
            sub.add_argument(
                "--socket",
                metavar="PATH",
                help="control socket (default: from --config, else $AIVAD_SOCKET, else the daemon's default)",
            )
        if name != "serve":
            sub.add_argument("--json", action="store_true", help="print JSON instead of text")
        sub.add_argument("--config", metavar="PATH", help="config file (TOML)")
        return sub

    serve = command("serve", "run the daemon in the foreground")
    serve.add_argument("--log-format", choices=["text", "json"], help="override [log] format")
    serve.add_argument("--check-config", action="store_true", help="validate the config and exit (0 ok, 2 not)")
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
    dispatch = command("dispatch", "submit a task to the workers of its type")
    dispatch.add_argument("type", metavar="TYPE", help="task type, e.g. scan.run")
    dispatch.add_argument("payload", metavar="PAYLOAD_JSON", nargs="?", help="JSON payload ('-' reads stdin)")
    dispatch.add_argument("--priority", metavar="P", help="low, normal, high, critical or 0..9")
    dispatch.add_argument("--max-attempts", metavar="N", type=int)
    dispatch.add_argument("--timeout", metavar="S", type=float, help="seconds per attempt")
    dispatch.add_argument("--heartbeat", metavar="S", type=float, help="longest silence between progress reports")
    dispatch.add_argument("--affinity-key", metavar="KEY")
    dispatch.add_argument("--group-id", metavar="ID")
    task = command("task", "show one task: state, attempts, result or error, attempt history")
    task.add_argument("task_id", metavar="TASK_ID")
    tasks = command("tasks", "list tasks, newest first")
    tasks.add_argument(
        "--state", metavar="S", choices=["queued", "dispatched", "running", "retrying", "completed", "dead"]
    )
    tasks.add_argument("--limit", metavar="N", type=int, default=100)
    command("workers", "list connected workers")
    dlq = command("dlq", "the dead-letter queue: list, show, replay, purge")
    dlq.add_argument("action", choices=["list", "show", "replay", "purge"])
    dlq.add_argument("id", metavar="ID", type=int, nargs="?")
    dlq.add_argument("--all", action="store_true", help="replay: every dead task")
    dlq.add_argument("--yes", action="store_true", help="purge: really delete every dead letter")
    dlq.add_argument("--limit", metavar="N", type=int, default=100, help="list: at most N letters")
    dlq.add_argument("--after", metavar="ID", type=int, default=0, help="list: the letters after this id")
    dlq.add_argument("--kind", metavar="KIND", help="list: only this kind (task, amqp.poison, redis)")
    command("drain", "stop intake, close clients, exit 0")
    command("reload", "re-read the config file and apply what can change live")
    token = command("token", "print a JWT for a client, signed with the HMAC secret (no daemon needed)")
    token.add_argument("--sub", metavar="NAME", required=True, help="who the token is for (its sub claim)")
    for right, what in (("subscribe", "subscribe to / read history of"), ("publish", "publish topics matching"),
                        ("dispatch", "dispatch tasks of types matching"), ("work", "work on tasks of types matching")):
        token.add_argument(f"--{right}", metavar="P", action="append", default=[], help=f"may {what} P (repeatable)")
    token.add_argument("--admin", action="store_true", help="every right, and the admin commands")
    token.add_argument("--ttl", default="1h", help="lifetime: 3600, 90s, 30m, 8h or 7d (default 1h)")
    token.add_argument("--secret-file", metavar="F", help="HMAC secret (default: [auth] hmac_secret_file)")
    token.add_argument("--algorithm", choices=list(HMAC_ALGORITHMS),
                       help="default: the first HS* in [auth] algorithms, else HS256")
    token.add_argument("--audience", metavar="A", help="aud claim (default: [auth] audience)")
    token.add_argument("--issuer", metavar="I", help="iss claim (default: [auth] issuer, if set)")
    return parser


_RUNNERS: dict[str, Callable[[ControlClient, argparse.Namespace], None]] = {
    "status": _status,
    "publish": _publish,
    "history": _history,
    "tail": _tail,
    "dispatch": _dispatch,
    "task": _task,
    "tasks": _tasks,
    "workers": _workers,
    "dlq": _dlq,
    "drain": _simple("drain", lambda r: "draining"),
    "reload": _simple("reload", _reload_text),
}


_TTL = re.compile(r"([0-9]+)([smhd]?)")
_TTL_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_TTL_S = 366 * 86400


def parse_ttl(text: str) -> int:
    """Seconds from ``3600``, ``90s``, ``30m``, ``8h`` or ``7d``. Raises UsageError."""
    found = _TTL.fullmatch(text.strip())
    seconds = int(found.group(1)) * _TTL_UNITS[found.group(2)] if found else 0
    if not 0 < seconds <= MAX_TTL_S:
        raise UsageError(f"--ttl {text!r}: give 1s..366d, e.g. 3600, 90s, 30m, 8h or 7d")
    return seconds


def _token(args: argparse.Namespace) -> None:
    """Mint a token from the HMAC secret: the operator's way to give a client its rights."""
    from .auth import Rights, mint_token, read_hmac_secret
    from .envelope import BadMessage, check_pattern

    auth = load_config(args.config).auth
    algorithm = args.algorithm or next((a for a in auth.algorithms if a in HMAC_ALGORITHMS), "HS256")
    if args.config and algorithm not in auth.algorithms:
        raise UsageError(f"{algorithm} is not in [auth] algorithms of {args.config}: the daemon would refuse the token")
    secret_file = args.secret_file or auth.hmac_secret_file
    if not secret_file:
        raise UsageError("no HMAC secret: give --secret-file, or --config with [auth] hmac_secret_file")
    grants = {}
    for right in ("subscribe", "publish", "dispatch", "work"):
        try:
            grants[right] = tuple(check_pattern(p) for p in getattr(args, right))
        except BadMessage as exc:
            raise UsageError(f"--{right}: {exc}") from None
    ttl_s = parse_ttl(args.ttl)
    secret = read_hmac_secret(secret_file, "--secret-file" if args.secret_file else "auth.hmac_secret_file")
    issued = time.time()
    try:
        token = mint_token(
            secret,
            sub=args.sub,
            rights=Rights(**grants, admin=args.admin),
            ttl_s=ttl_s,
            audience=args.audience or auth.audience,
            issuer=auth.issuer if args.issuer is None else args.issuer,
            algorithm=algorithm,
            now=issued,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.json:
        expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(issued) + ttl_s))
        print(json.dumps({"token": token, "sub": args.sub, "expires_at": expires}))
    else:
        print(token)


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

        if args.check_config:
            try:
                load_config(args.config)
            except ConfigError as exc:
                _fail(EXIT_USAGE, f"config: {exc}")
            print("config ok")
            sys.exit(EXIT_OK)
        sys.exit(serve(args.config, args.log_format))
    if args.command == "token":
        try:
            _token(args)
        except (UsageError, ConfigError) as exc:
            _fail(EXIT_USAGE, f"token: {exc}")
        sys.exit(EXIT_OK)
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
