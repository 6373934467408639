"""Configuration: a TOML file parsed into a frozen attrs tree.

Types are checked by cattrs (``forbid_extra_keys``: a typo is an error, not a
silent default); values by the ``check`` metadata of each field. Every problem
becomes one line naming the key path, e.g. ``websocket.port: must be 1..65535,
got 0``, so an operator sees at once what to fix.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import attrs
import cattrs

__all__ = ["AuthConfig", "Config", "ConfigError", "load_config", "parse_config"]


class ConfigError(Exception):
    """A configuration that cannot be used; ``str()`` is one line per problem."""


def _field(default: Any, check: Callable[[Any], bool] | None = None, problem: str = "") -> Any:
    return attrs.field(default=default, metadata={"check": (check, problem)} if check else {})


def _port(default: int) -> Any:
    return _field(default, lambda v: 0 <= v <= 65535, "must be 0..65535 (0 = any free port)")


def _positive(default: float) -> Any:
    return _field(default, lambda v: v > 0, "must be > 0")


def _at_least(default: int, low: int) -> Any:
    return _field(default, lambda v: v >= low, f"must be >= {low}")


def default_control_socket() -> str:
    """DESIGN §4.1: ``$XDG_RUNTIME_DIR/aivad/control.sock``, else ``./var/run/control.sock``."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return str(Path(runtime) / "aivad" / "control.sock")
    return "./var/run/control.sock"


@attrs.frozen
class WebSocketConfig:
    host: str = "127.0.0.1"
    port: int = _port(8765)
    max_frame_bytes: int = _at_least(1_048_576, 256)
    send_buffer_frames: int = _at_least(1024, 16)
    send_buffer_bytes: int = _at_least(8_388_608, 65536)
    receive_buffer_frames: int = _at_least(64, 1)
    max_subscriptions: int = _at_least(4096, 1)
    max_inflight_publishes: int = _at_least(256, 1)
    max_connections: int = _at_least(10_000, 1)
    max_connections_per_address: int = _at_least(1000, 1)
    max_handshakes: int = _at_least(256, 1)
    replay_batch: int = _at_least(500, 1)
    handshake_timeout_s: float = _positive(10.0)
    close_timeout_s: float = _positive(5.0)
    message_timeout_s: float = _positive(30.0)
    write_timeout_s: float = _positive(30.0)
    allowed_origins: list[str] = attrs.field(factory=list)
    tls_cert_file: str = ""
    tls_key_file: str = ""

    def problems(self) -> list[str]:
        return _tls_problems(self.tls_cert_file, self.tls_key_file)


@attrs.frozen
class ControlConfig:
    socket: str = attrs.field(factory=default_control_socket)
    mode: int = _field(0o600, lambda v: 0 <= v <= 0o777, "must be a file mode 0o000..0o777")
    group: str = ""
    max_line_bytes: int = _at_least(1_048_576, 256)
    tail_buffer_lines: int = _at_least(1024, 16)


@attrs.frozen
class StoreConfig:
    path: str = "./var/aivad.db"
    synchronous: Literal["NORMAL", "FULL"] = "NORMAL"
    write_queue: int = _at_least(10_000, 1)
    max_batch: int = _at_least(1000, 1)
    read_connections: int = _at_least(4, 1)
    history_concurrency: int = _at_least(2, 1)
    history_scan_rows: int = _at_least(100_000, 100)
    wal_max_bytes: int = _at_least(1_073_741_824, 1_048_576)
    #: SQLite's page size for a database this start creates (an existing file keeps its own)
    page_size: int = _field(1024, lambda v: v in (512, 1024, 2048, 4096, 8192, 16384, 32768, 65536),
                            "must be a power of two from 512 to 65536")
    #: how long a write nobody waits for (a task's dispatch record) may wait for others to share its
    #: commit; 0 = commit it at once
    lazy_write_delay_s: float = _field(0.01, lambda v: 0 <= v <= 1, "must be 0..1 (0 = commit at once)")
    retention_max_messages: int = _at_least(1_000_000, 0)
    retention_max_age_s: float = _field(7 * 86400.0, lambda v: v >= 0, "must be >= 0 (0 = keep forever)")
    retention_interval_s: float = _positive(60.0)
    #: dead letters kept at most: past it each new one deletes the oldest (and the dead task it held)
    dead_letters_kept: int = _at_least(100_000, 1)


def _rate(default: float) -> Any:
    return _field(default, lambda v: v >= 0, "must be >= 0 (0 = no limit)")


@attrs.frozen
class LimitsConfig:
    """What one connection may ask for per second (token buckets; ``overloaded`` beyond), and per history page."""

    publish_rate_per_s: float = _rate(5000.0)
    publish_burst: int = _at_least(10_000, 1)
    dispatch_rate_per_s: float = _rate(2000.0)
    dispatch_burst: int = _at_least(5000, 1)
    history_page_bytes: int = _at_least(8_388_608, 65536)


@attrs.frozen
class SystemConfig:
    """The daemon's own events: system.health_check and system.alert (DESIGN §2)."""

    health_interval_s: float = _positive(30.0)
    alert_interval_s: float = _field(10.0, lambda v: v >= 0, "must be >= 0 (0 = no rate limit)")
    alert_queue: int = _at_least(100, 1)


@attrs.frozen
class ShutdownConfig:
    grace_s: float = _positive(10.0)


@attrs.frozen
class LogConfig:
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"


@attrs.frozen
class HttpConfig:
    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = _port(8766)
    tls_cert_file: str = ""
    tls_key_file: str = ""
    max_body_bytes: int = _at_least(1_048_576, 1024)
    read_timeout_s: float = _positive(30.0)
    max_connections: int = _at_least(1000, 1)
    max_connections_per_address: int = _at_least(100, 1)

    def problems(self) -> list[str]:
        return _tls_problems(self.tls_cert_file, self.tls_key_file)


def _tls_problems(cert: str, key: str) -> list[str]:
    """TLS needs both files, readable (checked at load, so ``--check-config`` and reload see it)."""
    if bool(cert) != bool(key):
        return ["tls_cert_file: tls_cert_file and tls_key_file go together (both, or neither)"]
    return [f"{name}: cannot read {path}" for name, path in (("tls_cert_file", cert), ("tls_key_file", key))
            if path and not os.access(path, os.R_OK)]


def _name(default: str) -> Any:
    return _field(default, lambda v: 0 < len(v) <= 255, "must be 1..255 characters")


@attrs.frozen
class AmqpConfig:
    """DESIGN §4.5: the RabbitMQ bridge (off by default); names of the topology are configurable."""

    enabled: bool = False
    url: str = _field(
        "amqp://guest:guest@127.0.0.1:5672/",
        lambda v: v.startswith(("amqp://", "amqps://")),
        "must be an amqp:// or amqps:// URL",
    )
    events_exchange: str = _name("aiva.events")
    events_queue: str = _name("aivad.events")
    events_binding_key: str = _name("#")
    tasks_exchange: str = _name("aiva.tasks")
    tasks_queue: str = _name("aivad.tasks")
    tasks_binding_key: str = _name("#")
    tasks_max_priority: int = _field(10, lambda v: 1 <= v <= 255, "must be 1..255")
    dead_letter_exchange: str = _name("aiva.dlx")
    dead_letter_queue: str = _name("aivad.dead")
    prefetch: int = _field(500, lambda v: 1 <= v <= 65535, "must be 1..65535")
    batch_max: int = _at_least(500, 1)
    max_body_bytes: int = _at_least(1_048_576, 1024)
    reconnect_initial_s: float = _positive(0.5)
    reconnect_max_s: float = _positive(30.0)
    connect_timeout_s: float = _positive(10.0)
    outbox_max: int = _at_least(10_000, 1)
    publish_window: int = _at_least(256, 1)
    grace_s: float = _positive(5.0)
    node_id: str = ""


@attrs.frozen
class RedisConfig:
    """DESIGN §5: with ``enabled``, the history is a Redis log shared by every node of the same ``prefix``."""

    enabled: bool = False
    url: str = _field("redis://127.0.0.1:6379/0", lambda v: v.startswith(("redis://", "rediss://", "unix://")),
                      "must be a redis://, rediss:// or unix:// URL")
    prefix: str = _field("aivad:", lambda v: 0 < len(v) <= 100, "must be 1..100 characters")
    ingest_stream: str = _field("aiva:events", lambda v: len(v) <= 255, "must be at most 255 characters")
    ingest_channels: list[str] = attrs.field(factory=list)
    ingest_batch: int = _field(100, lambda v: 1 <= v <= 10_000, "must be 1..10000")
    ingest_claim_idle_s: float = _positive(60.0)
    ingest_channel_buffer: int = _at_least(1000, 1)
    ingest_max_entry_bytes: int = _at_least(1_048_576, 1024)
    op_timeout_s: float = _positive(5.0)
    max_pending: int = _at_least(50_000, 1)
    max_connections: int = _at_least(16, 4)
    reconnect_max_s: float = _positive(10.0)


@attrs.frozen
class ClusterConfig:
    """The node's place in a cluster (only with ``[redis] enabled``)."""

    node_name: str = attrs.field(factory=lambda: socket.gethostname()[:200] or "aivad",
                                 metadata={"check": (lambda v: 0 < len(v) <= 200, "must be 1..200 characters")})
    heartbeat_interval_s: float = _positive(2.0)


Strategy = Literal["round_robin", "least_connections", "affinity"]


@attrs.frozen
class TasksConfig:
    default_strategy: Strategy = "least_connections"
    strategies: dict[str, Strategy] = attrs.field(factory=dict)
    default_timeout_s: float = _positive(300.0)
    default_max_attempts: int = _field(3, lambda v: 1 <= v <= 100, "must be 1..100")
    default_backoff_factor_s: float = _field(1.0, lambda v: v >= 0, "must be >= 0")
    default_max_backoff_s: float = _field(60.0, lambda v: v >= 0, "must be >= 0")
    aging_s: float = _field(60.0, lambda v: v >= 0, "must be >= 0 (0 = no aging)")
    max_queued: int = _at_least(100_000, 1)
    max_workers: int = _at_least(1000, 1)
    request_timeout_s: float = _positive(30.0)
    max_collect_ids: int = _at_least(10_000, 1)
    #: in a cluster: how many ended tasks' records the task book in Redis keeps (the oldest go first)
    ended_kept: int = _at_least(100_000, 1)


#: DESIGN §4.8: what ``[auth] algorithms`` may list (never ``none``); HS* use the HMAC secret, the rest the public key
HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
PUBLIC_KEY_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")


def _algorithm_list(v: list[str]) -> bool:
    allowed = HMAC_ALGORITHMS + PUBLIC_KEY_ALGORITHMS
    return 0 < len(v) == len(set(v)) and all(a in allowed for a in v)


@attrs.frozen
class AuthConfig:
    """DESIGN §4.8: JWT authentication. aivad/auth.py reads the key files; docs/security.md explains."""

    required: bool = False
    algorithms: list[str] = attrs.field(
        factory=lambda: ["HS256"],
        metadata={"check": (_algorithm_list, "must be a non-empty list of distinct names from "
                            + ", ".join(HMAC_ALGORITHMS + PUBLIC_KEY_ALGORITHMS))},
    )
    hmac_secret_file: str = ""
    public_key_file: str = ""
    audience: str = _name("aivad")
    issuer: str = _field("", lambda v: len(v) <= 255, "must be at most 255 characters")
    leeway_s: float = _field(5.0, lambda v: 0 <= v <= 300, "must be 0..300")
    auth_timeout_s: float = _positive(10.0)
    allow_anonymous_remote: bool = False

    def problems(self) -> list[str]:
        """Problems that involve several keys: a key file for the algorithms listed, and no key file unused."""
        hmac = [a for a in self.algorithms if a in HMAC_ALGORITHMS]
        public = [a for a in self.algorithms if a in PUBLIC_KEY_ALGORITHMS]
        found = []
        files = (("hmac_secret_file", hmac, "HS*"), ("public_key_file", public, "RS*/PS*/ES*/EdDSA"))
        for key, needed_by, family in files:
            if getattr(self, key) and not needed_by:
                found.append(f"{key}: set, but algorithms lists no {family} algorithm")
            elif self.required and needed_by and not getattr(self, key):
                found.append(f"{key}: must be set when required = true and algorithms lists {needed_by[0]}")
        return found


@attrs.frozen
class Config:
    websocket: WebSocketConfig = attrs.field(factory=WebSocketConfig)
    control: ControlConfig = attrs.field(factory=ControlConfig)
    store: StoreConfig = attrs.field(factory=StoreConfig)
    shutdown: ShutdownConfig = attrs.field(factory=ShutdownConfig)
    log: LogConfig = attrs.field(factory=LogConfig)
    http: HttpConfig = attrs.field(factory=HttpConfig)
    amqp: AmqpConfig = attrs.field(factory=AmqpConfig)
    redis: RedisConfig = attrs.field(factory=RedisConfig)
    tasks: TasksConfig = attrs.field(factory=TasksConfig)
    limits: LimitsConfig = attrs.field(factory=LimitsConfig)
    system: SystemConfig = attrs.field(factory=SystemConfig)
    auth: AuthConfig = attrs.field(factory=AuthConfig)
    cluster: ClusterConfig = attrs.field(factory=ClusterConfig)

    def problems(self) -> list[str]:
        """Safe by default (DESIGN §4.8): no listener beyond loopback serves anonymous clients every right."""
        return anonymous_exposure(self)


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ``::1`` or ``localhost`` (DESIGN §4.8); anything else, ``0.0.0.0`` and ``""`` included, is not."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def anonymous_exposure(cfg: Config) -> list[str]:
    """Why ``aivad serve`` must exit 2: a non-loopback listener serving anonymous clients with every right.

    One line per listener (``websocket.host``, ``http.host`` when enabled),
    empty when ``[auth] required = true`` or ``allow_anonymous_remote = true``.
    """
    if cfg.auth.required or cfg.auth.allow_anonymous_remote:
        return []
    listeners = [("websocket.host", cfg.websocket.host)]
    if cfg.http.enabled:
        listeners.append(("http.host", cfg.http.host))
    return [
        f"{key}: {host!r} is not loopback and auth.required = false: every client would have every right "
        "(set auth.required = true, or auth.allow_anonymous_remote = true)"
        for key, host in listeners
        if not is_loopback(host)
    ]


def _strict(kind: type, accepts: tuple[type, ...]) -> Callable[[Any, type], Any]:
    def structure(value: Any, _: type) -> Any:
        if isinstance(value, bool) and kind is not bool:
            raise TypeError(f"expected {kind.__name__}, got bool")
        if not isinstance(value, accepts):
            raise TypeError(f"expected {kind.__name__}, got {type(value).__name__}")
        return kind(value)

    return structure


_converter = cattrs.Converter(forbid_extra_keys=True)
_converter.register_structure_hook(int, _strict(int, (int,)))
_converter.register_structure_hook(float, _strict(float, (int, float)))
_converter.register_structure_hook(str, _strict(str, (str,)))
_converter.register_structure_hook(bool, _strict(bool, (bool,)))


def _str_list(value: Any, _: type) -> list[str]:
    """A list of strings, never a string taken apart into characters."""
    if not isinstance(value, list):
        raise TypeError(f"expected list, got {type(value).__name__}")
    return [_converter.structure(item, str) for item in value]


_converter.register_structure_hook_func(lambda t: t == list[str], _str_list)


def _format(exc: BaseException, type_: Any) -> str:
    if isinstance(exc, TypeError) and str(exc).startswith("expected"):
        return str(exc)
    choices = getattr(type_, "__args__", None)
    if choices and "Literal" in repr(type_):
        return f"must be one of {', '.join(repr(c) for c in choices)}"
    return cattrs.v.format_exception(exc, type_)


def _value_problems(node: Any, path: str) -> list[str]:
    problems = []
    for field in attrs.fields(type(node)):
        value = getattr(node, field.name)
        here = f"{path}.{field.name}" if path else field.name
        if attrs.has(type(value)):
            problems += _value_problems(value, here)
            continue
        check, problem = field.metadata.get("check", (None, ""))
        if check is not None and not check(value):
            problems.append(f"{here}: {problem}, got {value!r}")
    if not problems and hasattr(node, "problems"):  # checks across keys, once each key is valid
        problems += [f"{path}.{line}" if path else line for line in node.problems()]
    return problems


def parse_config(data: dict[str, Any]) -> Config:
    """Structure and validate a parsed TOML document. Raises ConfigError."""
    try:
        cfg = _converter.structure(data, Config)
    except Exception as exc:  # noqa: BLE001 - cattrs groups every problem it found, whatever its type
        lines = []
        for line in cattrs.transform_error(exc, format_exception=_format):
            message, _, where = line.rpartition(" @ ")
            key = where.removeprefix("$").lstrip(".")
            lines.append(f"{key or '(top level)'}: {message}")
        raise ConfigError("; ".join(lines)) from None
    problems = _value_problems(cfg, "")
    if problems:
        raise ConfigError("; ".join(problems))
    return cfg


def load_config(path: str | os.PathLike[str] | None) -> Config:
    """Read a TOML file (None: the embedded defaults). Raises ConfigError."""
    if path is None:
        return Config()
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except RecursionError:  # tomllib recurses into nested arrays and tables
        raise ConfigError(f"{path}: not valid TOML: nested too deeply") from None
    return parse_config(data)
