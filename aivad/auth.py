"""Tokens and rights (DESIGN §4.8) — sync; the only I/O is reading the key files, once, at construction.

Who may do what is decided here and nowhere else: an edge (WebSocket, HTTP,
AMQP, Redis) turns a bearer token into an :class:`Identity` with
:meth:`TokenVerifier.verify`, and asks its :class:`Rights` before it acts.

- A token is a JWT. The algorithm is taken from ``[auth] algorithms`` only:
  the token's header names one, and a name that is not configured (``none``
  included) is refused before any key is touched. HS* tokens are checked
  with the HMAC secret and only with it, the others with the PEM public keys
  and only with those, so a token "signed" with the public key as an HMAC
  secret (algorithm confusion) cannot verify.
- Rights are patterns (claim ``aivad``). A subscription is allowed when its
  pattern is *contained* in one granted pattern (aivad/containment.py); a
  publish, dispatch or work when the topic or task type is matched by one.
  What is not granted is denied; ``admin`` grants everything.
- A refusal is :class:`Unauthorized` with a short ``reason`` that can label
  a metric; neither the reason nor the message ever carries the token or
  anything read from it.
"""

from __future__ import annotations

import binascii
import fnmatch
import ipaddress
import logging
import math
import re
import stat
import time
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import attrs
import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from .config import HMAC_ALGORITHMS, PUBLIC_KEY_ALGORITHMS, AuthConfig, ConfigError
from .containment import contains
from .envelope import BadMessage, check_pattern, compile_pattern

__all__ = [
    "ANONYMOUS",
    "EVERYTHING",
    "MAX_TOKEN_BYTES",
    "NOTHING",
    "REASONS",
    "UNAUTHENTICATED",
    "Identity",
    "Rights",
    "TokenVerifier",
    "Unauthorized",
    "console_origins",
    "contains",
    "mint_token",
    "origin_allowed",
    "read_hmac_secret",
]

log = logging.getLogger(__name__)

#: a longer Authorization header or ``auth`` token is refused before it is parsed
MAX_TOKEN_BYTES = 8192
#: at most this many patterns per right, each a valid pattern (≤ 255 characters)
MAX_PATTERNS = 256
MAX_SUB_LENGTH = 255
#: RFC 7518 §3.2: an HMAC key at least as long as the hash
MIN_HMAC_SECRET_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}
MIN_RSA_BITS = 2048
#: at most this many keys in one public_key_file (a bundle, for rotation)
MAX_PUBLIC_KEYS = 16
_EC_CURVES = {"ES256": "secp256r1", "ES384": "secp384r1", "ES512": "secp521r1"}

#: every ``Unauthorized.reason``: bounded, so it can be a metric label
REASONS = frozenset(
    {
        "too_large",  # longer than MAX_TOKEN_BYTES
        "malformed",  # not a compact JWS, or its header or payload is not a JSON object
        "algorithm",  # the header names an algorithm that is not configured (``none`` included)
        "bad_signature",  # no configured key verifies it
        "expired",  # exp + leeway_s is past
        "not_yet_valid",  # nbf or iat is in the future (beyond leeway_s)
        "bad_audience",  # aud does not name [auth] audience
        "bad_issuer",  # iss is not [auth] issuer (when one is configured)
        "missing_claim",  # sub, exp or aud (or iss, when configured) is absent
        "bad_claims",  # a claim of the wrong shape: sub, exp, nbf, iat or the aivad rights
    }
)

_COMPACT_JWS = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_RIGHTS = ("subscribe", "publish", "dispatch", "work")


class Unauthorized(Exception):
    """A token that gives no identity. ``reason`` is one of REASONS; ``str()`` says why, without the token."""

    def __init__(self, reason: str, message: str) -> None:
        assert reason in REASONS, reason
        super().__init__(message)
        self.reason = reason
        self.message = message


# ---- rights ---------------------------------------------------------------------------


@lru_cache(maxsize=4096)
def _matcher(pattern: str) -> Callable[[str], bool]:
    return compile_pattern(pattern)


def _granted(grants: tuple[str, ...], requested: str) -> bool:
    """Is ``requested`` (a topic, or a pattern) covered by one of ``grants``?"""
    if "*" in requested or "#" in requested:
        return any(contains(grant, requested) for grant in grants)
    return any(_matcher(grant)(requested) for grant in grants)


def _patterns(claim: Mapping[str, Any], right: str) -> tuple[str, ...]:
    value = claim.get(right, [])
    if not isinstance(value, list):
        raise Unauthorized("bad_claims", f"claim aivad.{right} must be a list of patterns")
    if len(value) > MAX_PATTERNS:
        raise Unauthorized("bad_claims", f"claim aivad.{right} has more than {MAX_PATTERNS} patterns")
    for i, pattern in enumerate(value):
        try:
            check_pattern(pattern)
        except BadMessage:
            raise Unauthorized("bad_claims", f"claim aivad.{right}[{i}] is not a valid pattern") from None
    return tuple(dict.fromkeys(value))


@attrs.frozen
class Rights:
    """What an identity may do: patterns per right, and ``admin`` (everything, and the admin commands).

    ``subscribe`` covers ``subscribe`` and ``history``; ``publish`` the topics
    published; ``dispatch`` the task types dispatched, requested, and looked
    at with ``task.status`` / ``collect``; ``work`` the task types a worker
    takes (``worker.hello`` needs every one of its types).
    """

    subscribe: tuple[str, ...] = ()
    publish: tuple[str, ...] = ()
    dispatch: tuple[str, ...] = ()
    work: tuple[str, ...] = ()
    admin: bool = False

    @classmethod
    def from_claim(cls, claim: object) -> Rights:
        """Validate the ``aivad`` claim. Raises Unauthorized("bad_claims") for any other shape.

        ``{"subscribe": [...], "publish": [...], "dispatch": [...], "work": [...], "admin": bool}``,
        every key optional (absent = nothing), no other key: a right this daemon
        does not know is refused rather than ignored.
        """
        if not isinstance(claim, dict):
            raise Unauthorized("bad_claims", "claim aivad must be an object")
        unknown = set(claim) - {*_RIGHTS, "admin"}
        if unknown:
            raise Unauthorized("bad_claims", f"claim aivad has {len(unknown)} unknown key(s)")
        admin = claim.get("admin", False)
        if not isinstance(admin, bool):
            raise Unauthorized("bad_claims", "claim aivad.admin must be true or false")
        return cls(
            subscribe=_patterns(claim, "subscribe"),
            publish=_patterns(claim, "publish"),
            dispatch=_patterns(claim, "dispatch"),
            work=_patterns(claim, "work"),
            admin=admin,
        )

    def to_claim(self) -> dict[str, Any]:
        """The ``aivad`` claim that gives these rights (rights left empty are left out)."""
        claim: dict[str, Any] = {right: list(getattr(self, right)) for right in _RIGHTS if getattr(self, right)}
        if self.admin:
            claim["admin"] = True
        return claim

    def may_subscribe(self, pattern: str) -> bool:
        """``subscribe`` and ``history``: ``pattern`` must be contained in one granted pattern."""
        return self.admin or _granted(self.subscribe, pattern)

    def may_publish(self, topic: str) -> bool:
        return self.admin or _granted(self.publish, topic)

    def may_dispatch(self, task_type: str) -> bool:
        """``dispatch``, ``request``, and ``task.status`` / ``collect`` of tasks of that type."""
        return self.admin or _granted(self.dispatch, task_type)

    def may_work(self, task_type: str) -> bool:
        """One of a worker's types (``worker.hello`` needs every one)."""
        return self.admin or _granted(self.work, task_type)


#: every right: a client when ``[auth] required = false`` and it sent no token
EVERYTHING = Rights(subscribe=("#",), publish=("#",), dispatch=("#",), work=("#",), admin=True)
#: no right: a token without the ``aivad`` claim, or nobody yet when auth is required
NOTHING = Rights()


@attrs.frozen
class Identity:
    """Who a connection or request is: the token's ``sub``, its rights, when it expires (unix seconds)."""

    sub: str | None
    rights: Rights
    expires_at: float | None

    def expired(self, now: float) -> bool:
        """Has ``expires_at`` passed (wall clock, ``time.time()``)? The edge then closes with 4001."""
        return self.expires_at is not None and now >= self.expires_at


#: no token, auth not required: everything (DESIGN §4.8)
ANONYMOUS = Identity(sub=None, rights=EVERYTHING, expires_at=None)
#: no token yet, auth required: only ``auth`` and ``ping``
UNAUTHENTICATED = Identity(sub=None, rights=NOTHING, expires_at=None)


# ---- keys ------------------------------------------------------------------------------


def read_hmac_secret(path: str, what: str = "auth.hmac_secret_file") -> bytes:
    """The HMAC secret in ``path``, surrounding whitespace stripped. Raises ConfigError naming ``what``.

    A PEM or OpenSSH key is refused: an HMAC secret that is a public key is
    exactly what an algorithm-confusion attacker would sign with.
    """
    try:
        data = Path(path).read_bytes().strip()
        mode = Path(path).stat().st_mode
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {path}: {exc.strerror or exc}") from None
    if not data:
        raise ConfigError(f"{what}: {path} is empty")
    if data.startswith((b"-----BEGIN", b"ssh-", b"ecdsa-")):
        raise ConfigError(f"{what}: {path} holds a PEM or SSH key, not an HMAC secret")
    if mode & stat.S_IROTH:
        log.warning("%s: %s is readable by every user; chmod 0600 (or 0640 with a group)", what, path)
    return data


def _check_secret_length(secret: bytes, algorithm: str, where: str) -> None:
    need = MIN_HMAC_SECRET_BYTES[algorithm]
    if len(secret) < need:
        raise ConfigError(f"{where}: the secret has {len(secret)} bytes; {algorithm} needs at least {need}")


_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----.*?-----END \1-----", re.S)
PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey


def _read_public_keys(path: str) -> list[PublicKey]:
    """Every public key in a PEM file (one, or a bundle while a key is rotated)."""
    what = "auth.public_key_file"
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {path}: {exc.strerror or exc}") from None
    blocks = list(_PEM_BLOCK.finditer(data))
    if not blocks:
        raise ConfigError(f"{what}: {path} holds no PEM block (-----BEGIN PUBLIC KEY-----)")
    if len(blocks) > MAX_PUBLIC_KEYS:
        raise ConfigError(f"{what}: {path} holds {len(blocks)} PEM blocks; at most {MAX_PUBLIC_KEYS}")
    keys: list[PublicKey] = []
    for n, block in enumerate(blocks, 1):
        label = block.group(1).decode()
        if "PRIVATE" in label:
            raise ConfigError(f"{what}: {path} block {n} is a private key; give aivad the public key only")
        if label not in ("PUBLIC KEY", "RSA PUBLIC KEY"):
            raise ConfigError(f"{what}: {path} block {n} is a {label}, not a PUBLIC KEY")
        try:
            key = load_pem_public_key(block.group(0))
        except (ValueError, TypeError, binascii.Error) as exc:
            raise ConfigError(f"{what}: {path} block {n} is not a valid public key: {exc}") from None
        if not isinstance(key, PublicKey):
            raise ConfigError(f"{what}: {path} block {n}: {type(key).__name__} keys are not supported")
        if isinstance(key, rsa.RSAPublicKey) and key.key_size < MIN_RSA_BITS:
            raise ConfigError(f"{what}: {path} block {n}: RSA key of {key.key_size} bits; at least {MIN_RSA_BITS}")
        keys.append(key)
    return keys


def _serves(key: PublicKey, algorithm: str) -> bool:
    if algorithm.startswith(("RS", "PS")):
        return isinstance(key, rsa.RSAPublicKey)
    if algorithm in _EC_CURVES:
        return isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == _EC_CURVES[algorithm]
    return isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey)


# ---- verification -----------------------------------------------------------------------


def _number(payload: Mapping[str, Any], claim: str) -> float | None:
    value = payload.get(claim)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise Unauthorized("bad_claims", f"claim {claim} must be a number of seconds")
    return float(value)


def _refusal(exc: Exception) -> Unauthorized:
    """PyJWT's error, as a reason and a message of our own (PyJWT's may quote the token)."""
    for kind, reason in (
        (jwt.InvalidSignatureError, "bad_signature"),
        (jwt.InvalidKeyError, "bad_signature"),
        (jwt.InvalidAlgorithmError, "algorithm"),
        (jwt.MissingRequiredClaimError, "missing_claim"),
        (jwt.InvalidAudienceError, "bad_audience"),
        (jwt.InvalidIssuerError, "bad_issuer"),
        (jwt.ExpiredSignatureError, "expired"),
        (jwt.ImmatureSignatureError, "not_yet_valid"),
    ):
        if isinstance(exc, kind):
            if isinstance(exc, jwt.MissingRequiredClaimError):
                return Unauthorized(reason, f"token has no {exc.claim} claim")
            return Unauthorized(reason, _MESSAGES[reason])
    if type(exc).__name__ == "InvalidSubjectError":  # PyJWT ≥ 2.10: sub that is not a string
        return Unauthorized("bad_claims", _MESSAGES["bad_claims"])
    return Unauthorized("malformed", _MESSAGES["malformed"])


_MESSAGES = {
    "too_large": f"token is longer than {MAX_TOKEN_BYTES} bytes",
    "malformed": "token is not a well-formed JWT",
    "algorithm": "token is signed with an algorithm this daemon does not accept",
    "bad_signature": "token signature does not verify",
    "expired": "token has expired",
    "not_yet_valid": "token is not valid yet",
    "bad_audience": "token is for another audience",
    "bad_issuer": "token is from another issuer",
    "bad_claims": "token claims have the wrong shape",
}


class TokenVerifier:
    """Turns a bearer token into an Identity, or refuses it. Reads the key files once, here.

    Raises ConfigError at construction (the daemon exits 2) when a configured
    key file is missing, unreadable, of the wrong type, too short or too small,
    or has no key for a listed public-key algorithm. Algorithms listed whose
    key file is not configured (possible only with ``required = false``)
    refuse every token with reason ``algorithm``.
    """

    def __init__(self, cfg: AuthConfig) -> None:
        self.cfg = cfg
        self._keys: dict[str, list[Any]] = {}
        hmac = [a for a in cfg.algorithms if a in HMAC_ALGORITHMS]
        if hmac and cfg.hmac_secret_file:
            secret = read_hmac_secret(cfg.hmac_secret_file)
            for algorithm in hmac:
                _check_secret_length(secret, algorithm, "auth.hmac_secret_file")
                self._keys[algorithm] = [secret]
        public = [a for a in cfg.algorithms if a in PUBLIC_KEY_ALGORITHMS]
        if public and cfg.public_key_file:
            keys = _read_public_keys(cfg.public_key_file)
            for algorithm in public:
                serving = [key for key in keys if _serves(key, algorithm)]
                if not serving:
                    raise ConfigError(
                        f"auth.public_key_file: {cfg.public_key_file} has no key for {algorithm} "
                        "(listed in auth.algorithms)"
                    )
                self._keys[algorithm] = serving
        self._options: dict[str, Any] = {
            "require": ["sub", "exp", "aud", *(["iss"] if cfg.issuer else [])],
            # time claims are checked below, on our clock and with our types
            "verify_exp": False,
            "verify_nbf": False,
            "verify_iat": False,
        }

    @property
    def algorithms(self) -> tuple[str, ...]:
        """The algorithms a token may use here: listed in config and served by a key."""
        return tuple(self._keys)

    def verify(self, token: object, *, now: float | None = None) -> Identity:
        """The identity ``token`` proves at ``now`` (default: ``time.time()``). Raises Unauthorized.

        The order of the checks is the cheap-and-safe one: size, shape, the
        header's algorithm against config, the signature with the keys of that
        algorithm only, then the claims.
        """
        if not isinstance(token, str):
            raise Unauthorized("malformed", "token must be a string")
        if len(token) > MAX_TOKEN_BYTES:
            raise Unauthorized("too_large", _MESSAGES["too_large"])
        if not _COMPACT_JWS.fullmatch(token):
            raise Unauthorized("malformed", _MESSAGES["malformed"])
        try:
            header = jwt.get_unverified_header(token)
        except (jwt.PyJWTError, ValueError, TypeError, RecursionError):
            raise Unauthorized("malformed", _MESSAGES["malformed"]) from None
        algorithm = header.get("alg")
        if not isinstance(algorithm, str) or algorithm not in self._keys:
            raise Unauthorized("algorithm", _MESSAGES["algorithm"])
        payload = self._decode(token, algorithm)
        return self._identity(payload, time.time() if now is None else now)

    def _decode(self, token: str, algorithm: str) -> dict[str, Any]:
        refusal = Unauthorized("bad_signature", _MESSAGES["bad_signature"])
        for key in self._keys[algorithm]:  # several only while a public key is being rotated
            try:
                payload: dict[str, Any] = jwt.decode(
                    token,
                    key,
                    algorithms=[algorithm],
                    audience=self.cfg.audience,
                    issuer=self.cfg.issuer or None,
                    options=self._options,  # type: ignore[arg-type]
                )
            except jwt.InvalidSignatureError:
                continue
            except (jwt.PyJWTError, ValueError, TypeError, RecursionError) as exc:
                refusal = _refusal(exc)
                break
            return payload
        raise refusal

    def _identity(self, payload: dict[str, Any], now: float) -> Identity:
        leeway = self.cfg.leeway_s
        sub = payload["sub"]
        if not isinstance(sub, str) or not 0 < len(sub) <= MAX_SUB_LENGTH or not sub.isprintable():
            raise Unauthorized("bad_claims", f"claim sub must be 1..{MAX_SUB_LENGTH} printable characters")
        exp = _number(payload, "exp")
        assert exp is not None  # required above
        if exp + leeway <= now:
            raise Unauthorized("expired", _MESSAGES["expired"])
        for claim in ("nbf", "iat"):
            start = _number(payload, claim)
            if start is not None and start - leeway > now:
                raise Unauthorized("not_yet_valid", _MESSAGES["not_yet_valid"])
        rights = Rights.from_claim(payload["aivad"]) if "aivad" in payload else NOTHING
        return Identity(sub=sub, rights=rights, expires_at=exp)


# ---- minting ----------------------------------------------------------------------------


def mint_token(
    secret: bytes,
    *,
    sub: str,
    rights: Rights,
    ttl_s: float,
    audience: str = "aivad",
    issuer: str = "",
    algorithm: str = "HS256",
    now: float | None = None,
) -> str:
    """An HS* token for ``sub`` with ``rights``, valid for ``ttl_s`` seconds — for operators and tests.

    Raises ValueError for an algorithm that is not HS*, a secret shorter than
    its hash, an empty or over-long ``sub`` or a ``ttl_s`` that is not > 0.
    Tokens for production agents usually come from an identity provider
    with a private key (RS*/ES*/EdDSA); docs/security.md shows both.
    """
    if algorithm not in HMAC_ALGORITHMS:
        raise ValueError(f"mint_token signs HS256, HS384 or HS512, not {algorithm}")
    if len(secret) < MIN_HMAC_SECRET_BYTES[algorithm]:
        raise ValueError(f"the secret has {len(secret)} bytes; {algorithm} needs at least "
                         f"{MIN_HMAC_SECRET_BYTES[algorithm]}")
    if not 0 < len(sub) <= MAX_SUB_LENGTH or not sub.isprintable():
        raise ValueError(f"sub must be 1..{MAX_SUB_LENGTH} printable characters")
    if not ttl_s > 0:
        raise ValueError("ttl_s must be > 0")
    issued = int(time.time() if now is None else now)
    payload: dict[str, Any] = {
        "sub": sub,
        "aud": audience,
        "iat": issued,
        "exp": issued + math.ceil(ttl_s),
        "aivad": rights.to_claim(),
    }
    if issuer:
        payload["iss"] = issuer
    return jwt.encode(payload, secret, algorithm=algorithm)


# ---- browser origins ----------------------------------------------------------------------

#: a longer Origin header cannot be a real one: refused before matching
MAX_ORIGIN_LENGTH = 1024


def console_origins(host: str, scheme: str, port: int) -> list[str]:
    """The origins of the daemon's own ``[http]`` server (its console) for a browser that reached the
    WebSocket by ``host`` (the handshake's ``Host``): ``scheme://name:port``, or ``[]``.

    Only for a name nobody else can point at the daemon: an IP address or ``localhost``. Any other
    name may be an attacker's, re-pointed at 127.0.0.1 after the victim's browser loaded the
    attacker's page from it (DNS rebinding): that page's origin would look like the console's. A
    console reached by such a name is listed in ``[websocket] allowed_origins``.
    """
    if host.startswith("["):  # [v6]:port or [v6]
        name, _, rest = host[1:].partition("]")
        if rest and not rest.startswith(":"):
            return []
        bracketed = True
    else:
        name, bracketed = host.rpartition(":")[0] if host.count(":") == 1 else host, False
    if name.lower() != "localhost":
        try:
            address = ipaddress.ip_address(name)
        except ValueError:
            return []
        if bracketed != (address.version == 6):
            return []
    authority = f"[{name}]" if bracketed else name
    own = [f"{scheme}://{authority}:{port}".lower()]
    if (scheme, port) in (("http", 80), ("https", 443)):
        own.append(f"{scheme}://{authority}".lower())
    return own


def origin_allowed(origin: str, globs: Sequence[str], own: Sequence[str]) -> bool:
    """DESIGN §4.8: a handshake's ``Origin`` must match one of ``[websocket] allowed_origins``
    (shell-style globs over the whole ``scheme://host[:port]``) or be one of ``own`` (the
    origins of the daemon's own ``[http]`` server, which serves the console)."""
    if len(origin) > MAX_ORIGIN_LENGTH:
        return False
    origin = origin.lower()
    return origin in own or any(fnmatch.fnmatchcase(origin, glob.lower()) for glob in globs)
