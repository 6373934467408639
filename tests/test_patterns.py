"""Topics, patterns and the pattern index (DESIGN §2) — plain functions, no I/O.

``PatternIndex.match`` (the trie the router uses) is checked against the
reference matcher ``aivad.envelope.pattern_matches`` on random topics and
patterns drawn from a small alphabet, so that matches actually happen.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aivad.envelope import (
    MAX_TOPIC_LENGTH,
    BadMessage,
    check_pattern,
    check_topic,
    literal_prefix,
    pattern_matches,
)
from aivad.patterns import PatternIndex

WORDS = ["a", "b", "c"]
#: patterns and topics stay short: the reference matcher is a backtracking regex
topics = st.lists(st.sampled_from(WORDS), min_size=1, max_size=6).map(".".join)
patterns = st.lists(st.sampled_from([*WORDS, "*", "#"]), min_size=1, max_size=6).map(".".join)
subscribers = st.integers(min_value=0, max_value=3)


def expected(subs: set[tuple[str, int]], topic: str) -> Counter[tuple[str, int]]:
    return Counter((p, s) for p, s in subs if pattern_matches(p, topic))


# ---- the index against the reference --------------------------------------------


def _pairs(index: PatternIndex[Any], topic: str) -> list[tuple[str, Any]]:
    """What ``match`` found, as (pattern, subscriber) pairs."""
    return [(pattern, sub) for pattern, subs in index.match(topic) for sub in subs]


@given(st.sets(st.tuples(patterns, subscribers), max_size=25), st.lists(topics, min_size=1, max_size=10))
def test_match_agrees_with_the_reference(subs: set[tuple[str, int]], probe: list[str]) -> None:
    index: PatternIndex[int] = PatternIndex()
    for pattern, sub in subs:
        index.add(pattern, sub)
    assert len(index) == len(subs)
    for topic in probe:
        # a Counter, not a set: every (pattern, subscriber) must come exactly once
        assert Counter(_pairs(index, topic)) == expected(subs, topic), topic


@given(
    st.lists(st.tuples(st.booleans(), patterns, subscribers), max_size=60),
    st.lists(topics, min_size=1, max_size=6),
)
def test_add_discard_churn_agrees_with_the_reference(
    ops: list[tuple[bool, str, int]], probe: list[str]
) -> None:
    index: PatternIndex[int] = PatternIndex()
    live: set[tuple[str, int]] = set()
    for step, (add, pattern, sub) in enumerate(ops):
        if add:
            index.add(pattern, sub)
            live.add((pattern, sub))
        else:
            index.discard(pattern, sub)  # also patterns never added, or added for another subscriber
            live.discard((pattern, sub))
        assert len(index) == len(live)
        if step % 7 == 0:
            for topic in probe:
                assert Counter(_pairs(index, topic)) == expected(live, topic)
    for topic in probe:
        assert Counter(_pairs(index, topic)) == expected(live, topic)
    for pattern, sub in list(live):
        index.discard(pattern, sub)
    assert len(index) == 0
    assert all(not _pairs(index, t) for t in probe)
    assert not index._root.children, "discarding everything must prune the trie"


@given(st.lists(st.sampled_from(["#", "*", "a", "b"]), min_size=1, max_size=8), topics)
def test_several_hashes(words: list[str], topic: str) -> None:
    pattern = ".".join(words)
    index: PatternIndex[str] = PatternIndex()
    index.add(pattern, "s")
    assert _pairs(index, topic) == ([(pattern, "s")] if pattern_matches(pattern, topic) else [])


@pytest.mark.parametrize(
    ("pattern", "topic", "matches"),
    [
        ("scan.*", "scan.completed", True),
        ("scan.*", "scan.a.b", False),
        ("scan.*", "scan", False),
        ("notifications.frontend.evt-42.#", "notifications.frontend.evt-42.chat", True),
        ("notifications.frontend.evt-42.#", "notifications.frontend.evt-42", True),
        ("notifications.frontend.evt-42.#", "notifications.frontend.evt-43.chat", False),
        ("#", "a", True),
        ("#", "a.b.c.d", True),
        ("#.#", "a", True),
        ("#.a", "a", True),
        ("#.a", "b.a", True),
        ("#.a", "a.b", False),
        ("a.#.b", "a.b", True),
        ("a.#.b", "a.x.y.b", True),
        ("a.#.b", "a.x.y", False),
        ("*.#", "a", True),
        ("*.#.*", "a", False),
        ("*.#.*", "a.b", True),
        ("#.*.#", "a.b.c", True),
        ("a.*.c", "a.b.c", True),
        ("a.*.c", "a.c", False),
        ("a", "a", True),
        ("a", "a.a", False),
        ("a", "A", False),
        ("a-b", "a.b", False),
    ],
)
def test_documented_examples(pattern: str, topic: str, matches: bool) -> None:
    assert pattern_matches(pattern, topic) is matches
    index: PatternIndex[int] = PatternIndex()
    index.add(pattern, 1)
    assert bool(_pairs(index, topic)) is matches


def test_one_subscriber_on_many_patterns_and_many_on_one() -> None:
    index: PatternIndex[str] = PatternIndex()
    for p in ("#", "a.#", "a.*", "a.b", "*.b", "#.b", "x.#"):
        index.add(p, "one")
    index.add("a.b", "two")
    index.add("a.b", "two")  # adding twice is a no-op
    assert len(index) == 8
    assert sorted(_pairs(index, "a.b")) == sorted(
        [("#", "one"), ("a.#", "one"), ("a.*", "one"), ("a.b", "one"), ("a.b", "two"), ("*.b", "one"), ("#.b", "one")]
    )
    index.discard("a.b", "one")
    index.discard("a.b", "one")  # discarding twice is a no-op
    index.discard("nowhere.at.all", "one")
    assert len(index) == 7
    assert ("a.b", "two") in set(_pairs(index, "a.b")) and ("a.b", "one") not in set(_pairs(index, "a.b"))


def test_match_on_a_long_topic_and_many_hashes_is_fast() -> None:
    """The trie stays polynomial where a backtracking regex would explode."""
    pattern = ".".join(["#"] * 60 + ["z"])
    topic = ".".join(["a"] * 120)
    check_pattern(pattern)
    check_topic(topic[:MAX_TOPIC_LENGTH])
    index: PatternIndex[int] = PatternIndex()
    index.add(pattern, 1)
    index.add("#", 2)
    assert _pairs(index, topic) == [("#", 2)]
    assert _pairs(index, topic + ".z") != []


# ---- validation -----------------------------------------------------------------

_TOPIC_RE = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*")
_PATTERN_RE = re.compile(r"(?:[A-Za-z0-9_-]+|\*|#)(?:\.(?:[A-Za-z0-9_-]+|\*|#))*")
#: characters that make the rules interesting: valid ones, dots, wildcards and a few bad ones
_CHARS = st.sampled_from(list("aZ09_-.*# /\n\té+"))


@given(st.text(_CHARS, max_size=12))
def test_check_topic_against_a_regex(text: str) -> None:
    valid = bool(_TOPIC_RE.fullmatch(text))
    if valid:
        assert check_topic(text) == text
    else:
        with pytest.raises(BadMessage):
            check_topic(text)


@given(st.text(_CHARS, max_size=12))
def test_check_pattern_against_a_regex(text: str) -> None:
    valid = bool(_PATTERN_RE.fullmatch(text))
    if valid:
        assert check_pattern(text) == text
    else:
        with pytest.raises(BadMessage):
            check_pattern(text)


def test_topic_length_limit_is_255() -> None:
    assert check_topic("a" * 255) == "a" * 255
    assert check_topic(".".join(["a"] * 128)) == ".".join(["a"] * 128)  # 255 characters
    for bad in ("a" * 256, ".".join(["a"] * 128) + "b"):
        with pytest.raises(BadMessage, match="255"):
            check_topic(bad)
    assert check_pattern("#." + "a" * 253) == "#." + "a" * 253
    with pytest.raises(BadMessage, match="255"):
        check_pattern("#." + "a" * 254)


@pytest.mark.parametrize(
    "bad", ["", ".", "a.", ".a", "a..b", "a b", "a/b", "é", "a.é", "*", "#", "a.*", "a\n", "\na", None, 5, b"a", ["a"]]
)
def test_bad_topics(bad: object) -> None:
    with pytest.raises(BadMessage):
        check_topic(bad)


@pytest.mark.parametrize("bad", ["", ".", "a.", ".#", "a..b", "**", "a.**", "a#", "#a", "*a", "a.b#", "a b", None, 1])
def test_bad_patterns(bad: object) -> None:
    with pytest.raises(BadMessage):
        check_pattern(bad)


@pytest.mark.parametrize("good", ["#", "*", "#.#", "*.*.*", "a.#.b", "A-z_0.*", "#.*.#"])
def test_good_patterns(good: str) -> None:
    assert check_pattern(good) == good


# ---- literal_prefix ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "prefix"),
    [
        ("scan.*", ("scan", False)),
        ("a.b", ("a.b", True)),
        ("a", ("a", True)),
        ("#", ("", False)),
        ("*.a", ("", False)),
        ("a.b.#.c", ("a.b", False)),
        ("a.*.c.#", ("a", False)),
    ],
)
def test_literal_prefix_examples(pattern: str, prefix: tuple[str, bool]) -> None:
    assert literal_prefix(pattern) == prefix


@settings(max_examples=300)
@given(patterns, topics)
def test_literal_prefix_bounds_what_a_pattern_can_match(pattern: str, topic: str) -> None:
    """What the store relies on to read history through its (type, seq) index."""
    prefix, exact = literal_prefix(pattern)
    assert exact == ("*" not in pattern.split(".") and "#" not in pattern.split("."))
    assert pattern.startswith(prefix)
    if exact:
        assert prefix == pattern
        assert pattern_matches(pattern, topic) == (topic == pattern)
    elif pattern_matches(pattern, topic) and prefix:
        assert topic == prefix or topic.startswith(prefix + ".")


# ---- the reference matcher on hostile patterns -----------------------------------------

_HOSTILE = r"""
import sys, time
from aivad.envelope import check_pattern, check_topic, pattern_matches
pattern = ".".join(["#.*"] * 10 + ["z"])
topic = ".".join(["a"] * 60)
check_pattern(pattern); check_topic(topic)
assert not pattern_matches(pattern, topic)
"""


def test_reference_matcher_is_not_exponential_on_many_wildcards() -> None:
    # in a subprocess: the regex holds the GIL, a hang must not freeze the test run
    try:
        subprocess.run([sys.executable, "-c", _HOSTILE], check=True, timeout=2)
    except subprocess.TimeoutExpired:
        pytest.fail("pattern_matches took more than 2 s")


def test_subscribers_lists_every_subscriber_of_every_pattern_once() -> None:
    index: PatternIndex[str] = PatternIndex()
    for pattern, sub in [("a.#", "s1"), ("a.b", "s2"), ("a.b", "s3"), ("*.c", "s1"), ("#", "s4")]:
        index.add(pattern, sub)
    index.discard("a.b", "s3")
    assert sorted(index.subscribers()) == ["s1", "s1", "s2", "s4"]  # s1 holds two patterns
    for pattern, sub in [("a.#", "s1"), ("a.b", "s2"), ("*.c", "s1"), ("#", "s4")]:
        index.discard(pattern, sub)
    assert index.subscribers() == [] and len(index) == 0
