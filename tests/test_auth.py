"""Security core (DESIGN §4.8): pattern containment, rights, token verification, `aivad token`, [auth] config.

Test policy for this module:
- Containment is checked against a brute-force reference over every topic up
  to a length that makes the reference sound (argued at ``reference_contains``),
  on patterns drawn by hypothesis, plus the DESIGN examples and hostile
  patterns at the 255-character limit (they must finish; no time assertions).
- Every refusal of ``TokenVerifier.verify`` is checked for its ``reason``
  (the metric label) and for never echoing the token or its claims.
- Keys are real: an HMAC secret file, and RSA, EC and Ed25519 keys generated
  here with ``cryptography``; tokens are signed with PyJWT or by hand where
  PyJWT refuses to forge them (``alg: none``, algorithm confusion).
- ``aivad token`` runs as a real subprocess; its token must verify under
  the same config file.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from aivad.auth import (
    ANONYMOUS,
    EVERYTHING,
    MAX_TOKEN_BYTES,
    NOTHING,
    REASONS,
    Identity,
    Rights,
    TokenVerifier,
    Unauthorized,
    anonymous_exposure,
    is_loopback,
    mint_token,
)
from aivad.cli import UsageError, parse_ttl
from aivad.config import AuthConfig, ConfigError, parse_config
from aivad.containment import contains
from aivad.envelope import check_pattern, pattern_matches

NOW = 1_900_000_000.0
SECRET = b"s3cr3t-" + b"x" * 40  # 47 bytes: enough for HS256 (32), not for HS384 (48)


# ---- containment: the reference ------------------------------------------------------------


def _start(tokens: list[str]) -> frozenset[int]:
    return _close(tokens, {0})


def _close(tokens: list[str], states: set[int]) -> frozenset[int]:
    todo = list(states)
    while todo:
        i = todo.pop()
        if i < len(tokens) and tokens[i] == "#" and i + 1 not in states:
            states.add(i + 1)
            todo.append(i + 1)
    return frozenset(states)


def _step(tokens: list[str], states: frozenset[int], word: str) -> frozenset[int]:
    following: set[int] = set()
    for i in states:
        if i < len(tokens):
            if tokens[i] == "#":
                following.add(i)
            elif tokens[i] in ("*", word):
                following.add(i + 1)
    return _close(tokens, following)


def reference_contains(grant: str, pattern: str) -> bool:
    """Brute force: does ``grant`` match every topic ``pattern`` matches, of up to ``bound`` words?

    The words are those the two patterns name plus one fresh word (``c`` for
    the strategies below, which draw words from {a, b}). Why this finite check
    decides the question over all topics:

    - One fresh word is enough. The grant cannot tell apart two words it does
      not name, so replacing every word of a counterexample that neither
      pattern names by the fresh word leaves a counterexample.
    - Short is enough. Take a counterexample and a ``#`` of the request filled
      with more than s + 1 words, s the number of ``*`` in the grant. If the
      grant matched the topic with one word less in that run (still > s
      words), some ``#`` of the grant would cover a word of the run, since its
      ``*`` cover at most s of them; stretching that ``#`` by one word would
      match the original topic — a contradiction. So the run can shrink to
      s + 1 words and stay a counterexample; every ``#`` of the request (runs
      of ``#`` merged) needs at most s + 1 words and every other token one.

    The walk is over every topic up to that bound, as a tree of words; a
    subtree is skipped when no extension can match the request, and subtrees
    reached with the same positions in both patterns at the same depth are
    identical, so each is walked once.
    """
    g, p = grant.split("."), pattern.split(".")
    named = sorted({*g, *p} - {"*", "#"})
    fresh = next(w for w in ("c", "fresh", "fresh-word") if w not in named)
    merged = [t for i, t in enumerate(p) if t != "#" or i == 0 or p[i - 1] != "#"]
    bound = sum(t != "#" for t in merged) + merged.count("#") * (g.count("*") + 1) + 1
    seen: set[tuple[int, frozenset[int], frozenset[int]]] = set()
    todo = [(0, _start(p), _start(g))]
    while todo:
        depth, ps, gs = todo.pop()
        if (depth, ps, gs) in seen:
            continue
        seen.add((depth, ps, gs))
        if depth > 0 and len(p) in ps and len(g) not in gs:
            return False
        if depth < bound:
            for word in (*named, fresh):
                following = _step(p, ps, word)
                if following:
                    todo.append((depth + 1, following, _step(g, gs, word)))
    return True


patterns = st.lists(st.sampled_from(["a", "b", "*", "#"]), min_size=1, max_size=6).map(".".join)


@settings(max_examples=500, deadline=None)
@given(patterns, patterns)
def test_containment_agrees_with_brute_force(grant: str, pattern: str) -> None:
    assert contains(grant, pattern) == reference_contains(grant, pattern), (grant, pattern)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from(["a", "*", "*", "#"]), min_size=1, max_size=9).map(".".join),
    st.lists(st.sampled_from(["a", "a", "*", "#"]), min_size=1, max_size=9).map(".".join),
)
def test_containment_agrees_with_brute_force_on_longer_patterns(grant: str, pattern: str) -> None:
    """One named word and more wildcards: long star runs and several ``#`` meet here."""
    assert contains(grant, pattern) == reference_contains(grant, pattern), (grant, pattern)


@settings(max_examples=200, deadline=None)
@given(patterns, st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=8).map(".".join))
def test_containment_of_a_topic_is_matching(grant: str, topic: str) -> None:
    assert contains(grant, topic) == pattern_matches(grant, topic)


@settings(max_examples=200, deadline=None)
@given(patterns, patterns, patterns)
def test_containment_is_a_preorder(x: str, y: str, z: str) -> None:
    assert contains(x, x)
    if contains(x, y) and contains(y, z):
        assert contains(x, z)


@pytest.mark.parametrize(
    ("grant", "pattern", "expected"),
    [
        # DESIGN §4.8
        ("a.#", "a.b.#", True),
        ("a.#", "a.*", True),
        ("a.#", "#", False),
        # the brief's examples, and neighbours
        ("#", "#.#", True),
        ("#.#", "#", True),
        ("#", "*.#", True),
        # a topic has at least one word, so `#` and `*.#` match the same topics
        ("*.#", "#", True),
        ("#.*", "#", True),
        ("a.#", "a.#.b", True),
        ("a.#.b", "a.#", False),
        ("a.#.b", "a.b", True),
        ("a.#.b", "a.*.b", True),
        ("a.*.#.b", "a.#.b", False),  # a.b is not matched by the grant
        ("#.a.*.#", "a.#.a", True),  # needs a case split: a.a vs a.x…a
        ("a.*", "a.#", False),
        ("a.*", "a.b", True),
        ("a.*", "a.*", True),
        ("*.*", "#", False),
        ("#.b", "a.#.b", True),
        ("#.b", "a.#", False),
        ("scan.*", "scan.completed", True),
        ("scan.*", "scan.a.b", False),
        ("incident.42.#", "incident.42", True),
        ("incident.42.#", "incident.43.#", False),
        ("incident.42.#", "incident.*.#", False),
        ("notifications.frontend.evt-42.#", "notifications.frontend.evt-42.chat", True),
        ("notifications.frontend.evt-42.#", "notifications.frontend.#", False),
    ],
)
def test_containment_examples(grant: str, pattern: str, expected: bool) -> None:
    assert contains(grant, pattern) is expected
    assert reference_contains(grant, pattern) is expected


def _longest(unit: str, tail: str = "") -> str:
    """``unit`` repeated up to the 255-character pattern limit, then ``tail``."""
    words = []
    while len(".".join([*words, unit, tail] if tail else [*words, unit])) <= 255:
        words.append(unit)
    pattern = ".".join([*words, tail] if tail else words)
    return check_pattern(pattern)


HOSTILE = [
    _longest("#.*"),
    _longest("#.*", "z"),
    _longest("*.#"),
    _longest("#.a"),
    _longest("a.#"),
    _longest("#.a.#.b"),
    _longest("#.*.a"),
    "#.a." + ".".join(["*"] * 40) + ".b.#",
    ".".join(["#.a"] * 40) + "." + ".".join(["*"] * 40) + ".b",
    ".".join(["a"] * 128),
]


@pytest.mark.parametrize("grant", HOSTILE)
@pytest.mark.parametrize("pattern", HOSTILE)
def test_hostile_patterns_finish(grant: str, pattern: str) -> None:
    """Every pair of patterns at the length limit is decided (sanity below; speed is bench material)."""
    result = contains(grant, pattern)
    if grant == pattern:
        assert result
    assert contains("#", pattern)


def test_hostile_examples_have_the_right_answers() -> None:
    stars = ".".join(["*"] * 40)
    # a grant needing "a, 40 words, b" somewhere; the request ends with exactly that after 40 free gaps
    assert contains(f"#.a.{stars}.b.#", ".".join(["#.a"] * 40) + f".{stars}.b")
    assert not contains(f"#.a.{stars}.b.#", ".".join(["#.a"] * 40) + f".{stars}.a")
    assert contains(_longest("*.#"), _longest("#.*"))  # same language: at least 85 words
    assert not contains(_longest("#.*", "z"), _longest("#.*"))


def test_a_search_over_budget_refuses() -> None:
    """The counterexample search is bounded; running out answers False (deny), never True."""
    grant, pattern = "#.a.*.#", "a.#.a"
    assert contains(grant, pattern)
    assert not contains(grant, pattern, budget=1)


# ---- rights ---------------------------------------------------------------------------------


def test_soc_frontend_limited_to_one_incident() -> None:
    rights = Rights.from_claim({"subscribe": ["incident.42.#", "notifications.frontend.evt-42.#"]})
    assert rights.may_subscribe("incident.42.#")
    assert rights.may_subscribe("incident.42.alerts.*")
    assert rights.may_subscribe("notifications.frontend.evt-42.chat")
    assert not rights.may_subscribe("incident.*.#")
    assert not rights.may_subscribe("#")
    assert not rights.may_subscribe("notifications.frontend.#")
    assert not rights.may_publish("incident.42.note")
    assert not rights.may_dispatch("scan.run") and not rights.may_work("scan.run")


def test_scanner_agent_publishes_and_works() -> None:
    rights = Rights.from_claim({"publish": ["scan.*"], "work": ["scan.run"], "subscribe": ["task.*"]})
    assert rights.may_publish("scan.completed")
    assert not rights.may_publish("scan.a.b") and not rights.may_publish("alerts.scan")
    assert rights.may_work("scan.run") and not rights.may_work("scan.delete")
    assert not rights.may_dispatch("scan.run")
    assert rights.may_subscribe("task.completed") and not rights.may_subscribe("task.#")


def test_admin_and_everything_and_nothing() -> None:
    admin = Rights.from_claim({"admin": True})
    for rights in (admin, EVERYTHING):
        assert rights.may_subscribe("#") and rights.may_publish("a") and rights.may_dispatch("x.y")
        assert rights.may_work("z")
    assert not any((NOTHING.may_subscribe("a"), NOTHING.may_publish("a"), NOTHING.may_dispatch("a"),
                    NOTHING.may_work("a")))
    assert ANONYMOUS.rights == EVERYTHING and ANONYMOUS.sub is None and not ANONYMOUS.expired(NOW)


def test_rights_accept_patterns_for_every_right() -> None:
    rights = Rights(dispatch=("scan.#",), work=("scan.*",))
    assert rights.may_dispatch("scan.*") and not rights.may_dispatch("*.run")
    assert rights.may_work("scan.*") and not rights.may_work("scan.#")


def test_claim_round_trip() -> None:
    claim = {"subscribe": ["a.#"], "publish": ["b.*"], "dispatch": ["c"], "work": ["d.#"], "admin": True}
    assert Rights.from_claim(claim).to_claim() == claim
    assert Rights.from_claim({}) == NOTHING
    assert NOTHING.to_claim() == {}
    assert Rights.from_claim({"subscribe": ["a", "a"]}).subscribe == ("a",)


@pytest.mark.parametrize(
    "claim",
    [
        None,
        [],
        "admin",
        {"subscribe": "#"},
        {"subscribe": [5]},
        {"subscribe": ["a..b"]},
        {"subscribe": [""]},
        {"publish": ["#." + "a" * 254]},
        {"publish": [["#"]]},
        {"work": None},
        {"admin": "yes"},
        {"admin": 1},
        {"subscribe": ["#"], "superuser": True},
        {"subscribe": ["a"] * 257},
    ],
)
def test_bad_claims(claim: object) -> None:
    with pytest.raises(Unauthorized) as caught:
        Rights.from_claim(claim)
    assert caught.value.reason == "bad_claims"


def test_claims_at_their_limits() -> None:
    many = [f"t{i}.#" for i in range(256)]
    assert len(Rights.from_claim({"subscribe": many}).subscribe) == 256
    longest = "#." + "a" * 253
    assert Rights.from_claim({"publish": [longest]}).may_publish("x." + "a" * 253)


def test_identity_expiry() -> None:
    identity = Identity(sub="alice", rights=NOTHING, expires_at=NOW)
    assert not identity.expired(NOW - 1) and identity.expired(NOW)


# ---- keys and verifiers -------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict[str, Any], payload: object, sign: Callable[[bytes], bytes] | None = None) -> str:
    """A token assembled by hand, for what PyJWT will not produce."""
    head = _b64(json.dumps(header).encode())
    body = _b64(payload if isinstance(payload, bytes) else json.dumps(payload).encode())
    signature = _b64(sign(f"{head}.{body}".encode())) if sign else ""
    return f"{head}.{body}.{signature}"


def claims(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"sub": "alice", "aud": "aivad", "iat": int(NOW), "exp": int(NOW) + 600,
                            "aivad": {"subscribe": ["incident.42.#"]}}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not ...}


def _pem(key: Any) -> bytes:
    return bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo))


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    path.chmod(0o600)
    return str(path)


class Keys:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ec = ec.generate_private_key(ec.SECP256R1())
        self.ed = ed25519.Ed25519PrivateKey.generate()
        self.secret_file = _write(directory / "hmac.secret", b"\n  " + SECRET + b"  \n")
        self.rsa_file = _write(directory / "rsa.pem", _pem(self.rsa))
        self.bundle_file = _write(directory / "bundle.pem", _pem(self.rsa) + _pem(self.ec) + _pem(self.ed))

    def verifier(self, **cfg: Any) -> TokenVerifier:
        return TokenVerifier(AuthConfig(**cfg))


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return Keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def both(keys: Keys) -> TokenVerifier:
    """HS256 and RS256 accepted together: the configuration algorithm confusion preys on."""
    return keys.verifier(required=True, algorithms=["HS256", "RS256"], hmac_secret_file=keys.secret_file,
                         public_key_file=keys.rsa_file)


def refused(verifier: TokenVerifier, token: object, reason: str, now: float = NOW) -> Unauthorized:
    with pytest.raises(Unauthorized) as caught:
        verifier.verify(token, now=now)
    error = caught.value
    assert error.reason == reason, str(error)
    assert error.reason in REASONS
    if isinstance(token, str) and token:
        assert token not in str(error) and "alice" not in str(error) and "incident" not in str(error)
        for part in token.split("."):
            assert len(part) < 8 or part not in str(error)
    return error


def test_hs256_token_verifies(both: TokenVerifier) -> None:
    token = jwt.encode(claims(), SECRET, algorithm="HS256")
    identity = both.verify(token, now=NOW)
    assert identity.sub == "alice"
    assert identity.expires_at == NOW + 600
    assert identity.rights == Rights(subscribe=("incident.42.#",))
    assert both.algorithms == ("HS256", "RS256")


def test_minted_token_verifies_and_secret_whitespace_is_stripped(keys: Keys) -> None:
    verifier = keys.verifier(hmac_secret_file=keys.secret_file, issuer="https://idp.example")
    rights = Rights(publish=("scan.*",), work=("scan.run",))
    token = mint_token(SECRET, sub="scanner-1", rights=rights, ttl_s=60, issuer="https://idp.example", now=NOW)
    assert verifier.verify(token, now=NOW + 30) == Identity("scanner-1", rights, NOW + 60)


@pytest.mark.parametrize("algorithm", ["RS256", "PS256", "ES256", "EdDSA"])
def test_public_key_algorithms(keys: Keys, algorithm: str) -> None:
    verifier = keys.verifier(required=True, algorithms=[algorithm], public_key_file=keys.bundle_file)
    private = {"RS256": keys.rsa, "PS256": keys.rsa, "ES256": keys.ec, "EdDSA": keys.ed}[algorithm]
    token = jwt.encode(claims(), private, algorithm=algorithm)
    assert verifier.verify(token, now=NOW).sub == "alice"
    stranger = {"RS256": rsa.generate_private_key(public_exponent=65537, key_size=2048),
                "ES256": ec.generate_private_key(ec.SECP256R1()),
                "EdDSA": ed25519.Ed25519PrivateKey.generate()}.get(algorithm)
    if stranger is not None:
        refused(verifier, jwt.encode(claims(), stranger, algorithm=algorithm), "bad_signature")


def test_key_bundle_serves_rotation(keys: Keys, tmp_path: Path) -> None:
    """During a rotation the file holds the old and the new key; tokens of both verify."""
    new = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    bundle = _write(tmp_path / "rotating.pem", _pem(keys.rsa) + _pem(new))
    verifier = keys.verifier(algorithms=["RS256"], public_key_file=bundle)
    for private in (keys.rsa, new):
        assert verifier.verify(jwt.encode(claims(), private, algorithm="RS256"), now=NOW).sub == "alice"


def test_token_without_the_aivad_claim_grants_nothing(both: TokenVerifier) -> None:
    identity = both.verify(jwt.encode(claims(aivad=...), SECRET, algorithm="HS256"), now=NOW)
    assert identity.rights == NOTHING and identity.sub == "alice"


def test_audience_list_naming_aivad_verifies(both: TokenVerifier) -> None:
    assert both.verify(jwt.encode(claims(aud=["other", "aivad"]), SECRET, algorithm="HS256"), now=NOW)


def test_leeway_applies_to_exp(both: TokenVerifier) -> None:
    token = jwt.encode(claims(exp=int(NOW)), SECRET, algorithm="HS256")
    assert both.verify(token, now=NOW + 4.9).sub == "alice"  # leeway_s = 5
    refused(both, token, "expired", now=NOW + 5)
    refused(both, token, "expired", now=NOW + 3600)
    refused(both, jwt.encode(claims(nbf=int(NOW) + 60), SECRET, algorithm="HS256"), "not_yet_valid")
    refused(both, jwt.encode(claims(iat=int(NOW) + 60), SECRET, algorithm="HS256"), "not_yet_valid")
    assert both.verify(jwt.encode(claims(nbf=int(NOW) + 4), SECRET, algorithm="HS256"), now=NOW)


def test_garbage_is_malformed(both: TokenVerifier) -> None:
    for token in ("", "garbage", "a.b", "a.b.c.d", "é.é.é", "Bearer x.y.z", "....", " " * 10,
                  forge({"alg": "HS256"}, b"not json", lambda m: hmac.new(SECRET, m, hashlib.sha256).digest())):
        refused(both, token, "malformed")
    for token in (None, 5, b"x.y.z", ["x.y.z"], {"token": "x"}):
        refused(both, token, "malformed")
    refused(both, "x.y.z", "malformed")  # base64 that is no JSON header
    refused(both, forge(["HS256"], claims()), "malformed")  # header that is not an object
    deep = _b64(b"[" * 2000 + b"]" * 2000)
    refused(both, f"{deep}.e30.{deep[:100]}", "malformed")


def test_truncated_tokens_are_refused(both: TokenVerifier) -> None:
    token = jwt.encode(claims(), SECRET, algorithm="HS256")
    head, body, signature = token.split(".")
    refused(both, f"{head}.{body}.", "bad_signature")
    swapped = jwt.encode(claims(aivad={"admin": True}), b"attacker-" + b"k" * 40, algorithm="HS256").split(".")[1]
    refused(both, f"{head}.{swapped}.{signature}", "bad_signature")
    # a shorter signature is either wrong or, depending on its last bits, no longer base64
    for cut in range(1, len(token)):
        with pytest.raises(Unauthorized) as caught:
            both.verify(token[:cut], now=NOW)
        assert caught.value.reason in {"malformed", "algorithm", "bad_signature"}


def test_wrong_secret(both: TokenVerifier) -> None:
    refused(both, jwt.encode(claims(), b"another-secret-" + b"y" * 40, algorithm="HS256"), "bad_signature")


def test_alg_none_is_refused(both: TokenVerifier) -> None:
    for alg in ("none", "None", "NONE", ""):
        refused(both, forge({"alg": alg, "typ": "JWT"}, claims(aivad={"admin": True})), "algorithm")
    refused(both, forge({"typ": "JWT"}, claims()), "algorithm")
    refused(both, forge({"alg": None}, claims()), "algorithm")


def test_algorithm_confusion_is_refused(keys: Keys, both: TokenVerifier) -> None:
    """An HS256 token whose HMAC key is the daemon's own RSA public key (PEM) — it must not verify."""
    pem = Path(keys.rsa_file).read_bytes()
    for key in (pem, pem.strip()):
        token = forge({"alg": "HS256", "typ": "JWT"}, claims(aivad={"admin": True}),
                      lambda m, k=key: hmac.new(k, m, hashlib.sha256).digest())
        refused(both, token, "bad_signature")


def test_algorithms_not_configured_are_refused(keys: Keys, both: TokenVerifier) -> None:
    hs_only = keys.verifier(hmac_secret_file=keys.secret_file)
    refused(hs_only, jwt.encode(claims(), keys.rsa, algorithm="RS256"), "algorithm")
    refused(hs_only, jwt.encode(claims(), SECRET + b"z" * 20, algorithm="HS512"), "algorithm")
    refused(both, jwt.encode(claims(), keys.ec, algorithm="ES256"), "algorithm")
    # listed, but no key file (possible with required = false): refused as well
    keyless = keys.verifier(algorithms=["HS256"])
    assert keyless.algorithms == ()
    refused(keyless, jwt.encode(claims(), SECRET, algorithm="HS256"), "algorithm")


def test_a_token_signed_by_one_key_type_is_not_checked_with_another(keys: Keys) -> None:
    """ES256 and RS256 in one bundle: an ES256 header makes only the EC key try."""
    verifier = keys.verifier(algorithms=["RS256", "ES256"], public_key_file=keys.bundle_file)
    rs_as_es = jwt.encode(claims(), keys.rsa, algorithm="RS256").split(".")
    es_header = _b64(json.dumps({"alg": "ES256", "typ": "JWT"}).encode())
    refused(verifier, f"{es_header}.{rs_as_es[1]}.{rs_as_es[2]}", "bad_signature")


def test_audience_and_issuer(keys: Keys, both: TokenVerifier) -> None:
    refused(both, jwt.encode(claims(aud="other"), SECRET, algorithm="HS256"), "bad_audience")
    refused(both, jwt.encode(claims(aud=["x", "y"]), SECRET, algorithm="HS256"), "bad_audience")
    refused(both, jwt.encode(claims(aud=5), SECRET, algorithm="HS256"), "bad_audience")
    issuing = keys.verifier(hmac_secret_file=keys.secret_file, issuer="https://idp.example")
    assert issuing.verify(jwt.encode(claims(iss="https://idp.example"), SECRET, algorithm="HS256"), now=NOW)
    refused(issuing, jwt.encode(claims(iss="https://evil.example"), SECRET, algorithm="HS256"), "bad_issuer")
    refused(issuing, jwt.encode(claims(), SECRET, algorithm="HS256"), "missing_claim")


@pytest.mark.parametrize("claim", ["sub", "exp", "aud"])
def test_required_claims(both: TokenVerifier, claim: str) -> None:
    error = refused(both, jwt.encode(claims(**{claim: ...}), SECRET, algorithm="HS256"), "missing_claim")
    assert claim in str(error)
    refused(both, jwt.encode(claims(**{claim: None}), SECRET, algorithm="HS256"), "missing_claim")


@pytest.mark.parametrize(
    "overrides",
    [
        {"sub": 5},
        {"sub": ["alice"]},
        {"sub": ""},
        {"sub": "a" * 256},
        {"sub": "alice\nroot"},
        {"exp": "9999999999"},
        {"exp": True},
        {"exp": [1]},
        {"nbf": "soon"},
        {"iat": {}},
        {"aivad": "admin"},
        {"aivad": {"admin": "true"}},
        {"aivad": {"subscribe": ["#", "a..b"]}},
        {"aivad": {"subscribe": ["#"], "root": True}},
        {"aivad": None},
    ],
)
def test_claims_of_the_wrong_shape(both: TokenVerifier, overrides: dict[str, Any]) -> None:
    refused(both, jwt.encode(claims(**overrides), SECRET, algorithm="HS256"), "bad_claims")


def test_longest_sub_is_accepted(both: TokenVerifier) -> None:
    assert both.verify(jwt.encode(claims(sub="a" * 255), SECRET, algorithm="HS256"), now=NOW).sub == "a" * 255


def test_oversize_token_is_refused_before_parsing(both: TokenVerifier) -> None:
    padding = {"subscribe": [f"t{i}.{'x' * 40}.#" for i in range(160)]}
    token = jwt.encode(claims(aivad=padding), SECRET, algorithm="HS256")  # validly signed
    assert len(token) > MAX_TOKEN_BYTES
    refused(both, token, "too_large")
    refused(both, "x" * (MAX_TOKEN_BYTES + 1), "too_large")
    refused(both, "é" * 10_000, "too_large")
    fits = jwt.encode(claims(aivad={"subscribe": padding["subscribe"][:80]}), SECRET, algorithm="HS256")
    assert len(fits) <= MAX_TOKEN_BYTES and both.verify(fits, now=NOW)


# ---- key files at construction ------------------------------------------------------------


def _bad_key(tmp_path: Path, keys: Keys, case: str) -> dict[str, Any]:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    private_pem = keys.rsa.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption())
    cases: dict[str, tuple[dict[str, Any], str, bytes | None]] = {
        "missing secret": ({"hmac_secret_file": str(tmp_path / "nope")}, "cannot read", None),
        "empty secret": ({"hmac_secret_file": "f"}, "is empty", b" \n\t\n"),
        "short secret": ({"hmac_secret_file": "f"}, "HS256 needs at least 32", b"x" * 31),
        "secret short for HS384": ({"hmac_secret_file": "f", "algorithms": ["HS256", "HS384"]},
                                   "HS384 needs at least 48", SECRET),
        "public key as secret": ({"hmac_secret_file": "f"}, "PEM or SSH key", _pem(keys.rsa)),
        "missing public key": ({"public_key_file": str(tmp_path / "nope"), "algorithms": ["RS256"]},
                               "cannot read", None),
        "no PEM": ({"public_key_file": "f", "algorithms": ["RS256"]}, "no PEM block", b"hello"),
        "private key": ({"public_key_file": "f", "algorithms": ["RS256"]}, "private key", private_pem),
        "broken PEM": ({"public_key_file": "f", "algorithms": ["RS256"]}, "not a valid public key",
                       b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"),
        "weak RSA": ({"public_key_file": "f", "algorithms": ["RS256"]}, "1024 bits", _pem(weak)),
        "no key for ES256": ({"public_key_file": "f", "algorithms": ["RS256", "ES256"]}, "no key for ES256",
                             _pem(keys.rsa)),
        "wrong curve": ({"public_key_file": "f", "algorithms": ["ES256"]}, "no key for ES256",
                        _pem(ec.generate_private_key(ec.SECP384R1()))),
    }
    cfg, message, content = cases[case]
    for key in ("hmac_secret_file", "public_key_file"):
        if cfg.get(key) == "f":
            cfg[key] = _write(tmp_path / "f", content or b"")
    return {"cfg": cfg, "message": message}


@pytest.mark.parametrize(
    "case",
    ["missing secret", "empty secret", "short secret", "secret short for HS384", "public key as secret",
     "missing public key", "no PEM", "private key", "broken PEM", "weak RSA", "no key for ES256", "wrong curve"],
)
def test_bad_key_files_fail_at_construction(tmp_path: Path, keys: Keys, case: str) -> None:
    bad = _bad_key(tmp_path, keys, case)
    with pytest.raises(ConfigError) as caught:
        TokenVerifier(AuthConfig(**bad["cfg"]))
    assert bad["message"] in str(caught.value)
    assert str(caught.value).startswith("auth.")
    assert "\n" not in str(caught.value)


# ---- minting --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"algorithm": "RS256"}, "HS256"),
        ({"algorithm": "none"}, "HS256"),
        ({"algorithm": "HS512"}, "needs at least 64"),
        ({"sub": ""}, "sub"),
        ({"sub": "a\x00b"}, "sub"),
        ({"ttl_s": 0}, "ttl_s"),
    ],
)
def test_mint_token_refuses(kwargs: dict[str, Any], message: str) -> None:
    arguments: dict[str, Any] = {"sub": "alice", "rights": NOTHING, "ttl_s": 60, **kwargs}
    with pytest.raises(ValueError, match=message):
        mint_token(SECRET, **arguments)


@pytest.mark.parametrize(("text", "seconds"), [("3600", 3600), ("90s", 90), ("30m", 1800), ("8h", 28800),
                                                ("7d", 604800), ("366d", 366 * 86400)])
def test_parse_ttl(text: str, seconds: int) -> None:
    assert parse_ttl(text) == seconds


@pytest.mark.parametrize("text", ["0", "0s", "-5", "1.5h", "1w", "h", "", "367d", "1 h"])
def test_parse_ttl_refuses(text: str) -> None:
    with pytest.raises(UsageError):
        parse_ttl(text)


# ---- aivad token, end to end --------------------------------------------------------------------


def aivad(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "aivad", *args], capture_output=True, text=True, timeout=60,
                          cwd=cwd)


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    _write(tmp_path / "hmac.secret", os.urandom(20).hex().encode() + b"\n")  # 40 bytes: HS256, not HS384
    _write(tmp_path / "short.secret", b"0123456789")
    path = tmp_path / "aivad.toml"
    path.write_text('[auth]\nrequired = true\nalgorithms = ["HS256"]\nhmac_secret_file = "hmac.secret"\n'
                    'issuer = "ops"\n')
    return path


def test_aivad_token_verifies_with_the_same_config(tmp_path: Path, config_file: Path) -> None:
    result = aivad("token", "--config", str(config_file), "--sub", "soc-frontend", "--subscribe", "incident.42.#",
                   "--subscribe", "notifications.frontend.evt-42.#", "--ttl", "8h", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    assert result.stdout == token + "\n" and result.stderr == ""
    cfg = parse_config({"auth": {"required": True, "hmac_secret_file": str(tmp_path / "hmac.secret"),
                                 "issuer": "ops"}})
    identity = TokenVerifier(cfg.auth).verify(token)
    assert identity.sub == "soc-frontend"
    assert identity.rights == Rights(subscribe=("incident.42.#", "notifications.frontend.evt-42.#"))
    assert identity.expires_at is not None and abs(identity.expires_at - (time.time() + 8 * 3600)) < 60


def test_aivad_token_json_and_secret_file(tmp_path: Path, config_file: Path) -> None:
    result = aivad("token", "--secret-file", "hmac.secret", "--sub", "scanner-1", "--publish", "scan.*", "--work",
                   "scan.run", "--admin", "--ttl", "90s", "--json", "--algorithm", "HS256", "--audience", "aivad",
                   cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["sub"] == "scanner-1" and out["expires_at"].endswith("Z")
    identity = TokenVerifier(AuthConfig(hmac_secret_file=str(tmp_path / "hmac.secret"))).verify(out["token"])
    assert identity.rights == Rights(publish=("scan.*",), work=("scan.run",), admin=True)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--sub", "x"], "no HMAC secret"),
        (["--sub", "x", "--secret-file", "nope"], "cannot read"),
        (["--sub", "x", "--config", "missing.toml"], "no such config file"),
        (["--sub", "x", "--secret-file", "hmac.secret", "--ttl", "forever"], "--ttl"),
        (["--sub", "x", "--secret-file", "hmac.secret", "--subscribe", "a..b"], "--subscribe"),
        (["--sub", "", "--secret-file", "hmac.secret"], "sub must be"),
        (["--sub", "x", "--secret-file", "hmac.secret", "--algorithm", "HS384"], "HS384 needs at least 48"),
        (["--sub", "x", "--config", "aivad.toml", "--algorithm", "HS384"], "not in [auth] algorithms"),
        (["--sub", "x", "--secret-file", "short.secret"], "HS256 needs at least 32"),
        (["--sub", "x", "--algorithm", "RS256"], "invalid choice"),
        (["--subscribe", "#"], "--sub"),
        (["--sub", "x", "--socket", "/tmp/s"], "unrecognized arguments"),
    ],
)
def test_aivad_token_bad_usage_exits_2(tmp_path: Path, config_file: Path, args: list[str], expected: str) -> None:
    result = aivad("token", *args, cwd=tmp_path)
    assert result.returncode == 2, result.stdout
    assert result.stdout == ""
    assert expected in result.stderr
    if "invalid choice" not in expected and expected != "--sub" and "unrecognized" not in expected:
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


# ---- [auth] configuration ------------------------------------------------------------------------


def test_auth_defaults() -> None:
    auth = parse_config({}).auth
    assert auth == AuthConfig()
    assert (auth.required, auth.algorithms, auth.audience, auth.issuer) == (False, ["HS256"], "aivad", "")
    assert (auth.leeway_s, auth.auth_timeout_s, auth.allow_anonymous_remote) == (5.0, 10.0, False)


@pytest.mark.parametrize(
    ("auth", "message"),
    [
        ({"algorithms": ["none"]}, "auth.algorithms: must be a non-empty list of distinct names from HS256"),
        ({"algorithms": ["HS256", "none"]}, "auth.algorithms: must be"),
        ({"algorithms": []}, "auth.algorithms: must be"),
        ({"algorithms": ["HS256", "HS256"]}, "auth.algorithms: must be"),
        ({"algorithms": ["hs256"]}, "auth.algorithms: must be"),
        ({"algorithms": "HS256"}, "auth.algorithms: expected list, got str"),
        ({"algorithms": ["HS256", 256]}, "auth.algorithms: expected str, got int"),
        ({"required": True}, "auth.hmac_secret_file: must be set when required = true and algorithms lists HS256"),
        ({"required": True, "algorithms": ["ES256"]},
         "auth.public_key_file: must be set when required = true and algorithms lists ES256"),
        ({"required": True, "algorithms": ["HS256", "RS256"], "hmac_secret_file": "s"},
         "auth.public_key_file: must be set"),
        ({"hmac_secret_file": "s", "algorithms": ["RS256"], "public_key_file": "k"},
         "auth.hmac_secret_file: set, but algorithms lists no HS* algorithm"),
        ({"public_key_file": "k"}, "auth.public_key_file: set, but algorithms lists no RS*/PS*/ES*/EdDSA"),
        ({"audience": ""}, "auth.audience: must be 1..255 characters"),
        ({"issuer": "i" * 256}, "auth.issuer: must be at most 255 characters"),
        ({"leeway_s": -1}, "auth.leeway_s: must be 0..300"),
        ({"auth_timeout_s": 0}, "auth.auth_timeout_s: must be > 0"),
        ({"required": "yes"}, "auth.required: expected bool, got str"),
        ({"secret": "x"}, "auth: extra fields found (secret)"),
    ],
)
def test_bad_auth_config(auth: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"auth": auth})
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "auth",
    [
        {"required": True, "hmac_secret_file": "s"},
        {"required": True, "algorithms": ["RS256", "ES256", "EdDSA"], "public_key_file": "k"},
        {"required": True, "algorithms": ["HS512", "PS384"], "hmac_secret_file": "s", "public_key_file": "k"},
        {"required": False, "algorithms": ["RS256"]},
    ],
)
def test_good_auth_config(auth: dict[str, Any]) -> None:
    assert parse_config({"auth": auth}).auth == AuthConfig(**auth)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.1.2.3", True), ("::1", True), ("[::1]", True), ("localhost", True),
     ("LOCALHOST", True), ("0.0.0.0", False), ("", False), ("::", False), ("10.0.0.1", False),
     ("example.com", False), ("localhost.example.com", False)],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_anonymous_exposure() -> None:
    assert anonymous_exposure(parse_config({})) == []
    exposed = anonymous_exposure(parse_config({"websocket": {"host": "0.0.0.0"},
                                               "http": {"enabled": True, "host": "::"}}))
    assert [line.split(":")[0] for line in exposed] == ["websocket.host", "http.host"]
    assert "auth.allow_anonymous_remote = true" in exposed[0]
    assert anonymous_exposure(parse_config({"http": {"host": "0.0.0.0"}})) == []  # http off
    for auth in ({"allow_anonymous_remote": True}, {"required": True, "hmac_secret_file": "s"}):
        assert anonymous_exposure(parse_config({"websocket": {"host": "0.0.0.0"}, "auth": auth})) == []


# ---- docs/security.md ------------------------------------------------------------------------------

SECURITY_MD = Path(__file__).resolve().parent.parent / "docs" / "security.md"


def _blocks(language: str) -> list[str]:
    text = SECURITY_MD.read_text(encoding="utf-8")
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.S | re.M)


@pytest.mark.parametrize("index", range(2))
def test_python_examples_in_security_md_run(tmp_path: Path, index: int) -> None:
    blocks = _blocks("python")
    assert len(blocks) == 2
    result = subprocess.run([sys.executable, "-c", blocks[index]], capture_output=True, text=True, timeout=60,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr


def test_json_examples_in_security_md_are_valid_claims() -> None:
    examples = [json.loads(body) for body in _blocks("json")]
    assert len(examples) >= 4
    for example in examples:
        Rights.from_claim(example.get("aivad", example))


def test_aivad_commands_in_security_md_parse() -> None:
    from aivad.cli import _parser

    lines = [line for body in _blocks("sh") + _blocks("text") for line in body.splitlines()]
    commands = [shlex.split(line.removeprefix("$ ").split("$(", 1)[-1].rstrip(")"), comments=True)
                for line in lines if re.search(r"(^|\$ |\$\()aivad ", line)]
    assert len(commands) >= 4
    for tokens in commands:
        _parser().parse_args(tokens[1:])
