"""Pattern containment: does a granted pattern cover every topic a requested one can match? Sync, no I/O.

Rights (aivad/auth.py) are patterns, and a client may subscribe to a pattern
only when it is *contained* in one it was granted (DESIGN §4.8): every topic
the request can match must be matched by the grant. Matching one topic is
easy; containment of two patterns is a question about two languages, so it
gets its own module.

How it decides (``contains(grant, pattern)``):

1. Both patterns are normalised without changing what they match: runs of
   ``#`` merge, and in a run of ``*`` and ``#`` the stars move first
   (``#.*.#.*`` → ``*.*.#``), so hostile runs of wildcards collapse.
2. Easy shapes are decided directly: a grant without ``#`` matches one
   length only; a request without ``#`` is contained iff the grant matches it
   with each ``*`` replaced by a *fresh* word (a word the grant does not
   name) — the grant cannot tell a fresh word from any other unnamed word, so
   that one topic stands for all of them. For a literal topic this is plain
   matching.
3. Otherwise a search for a counterexample: a topic of the request that the
   grant does not match. The request's ``*`` and ``#`` are filled with the
   fresh word only (if the grant fails on a topic, it fails on the topic with
   every wildcard-filled word made fresh), so the search walks the request's
   tokens, choosing at each ``#`` to read one more fresh word or to move on,
   while it follows the *set* of grant positions that could have matched so
   far (a subset construction of the grant's automaton, built on the fly).
   Sets are kept small by dropping positions whose remaining language is
   contained in another's in the set (a later ``#`` covers everything before
   it; of two offsets in one ``#``-delimited segment the more general one
   covers the other), and a state is skipped when one already visited at the
   same request position is harder (its language is contained in this one's).

The answer is exact over all topics, of any length. (Topics are capped at 255
characters; the cap is not used, which can only make a contrived request be
refused that the cap would have let through — the safe direction. The empty
topic does not exist, so ``#`` ≡ ``*.#``.) Plain cases take microseconds:
``a.b.#`` ⊆ ``a.#`` visits a handful of states.

Cost: the exact question is hard in general (it generalises inclusion of
regular expressions); the search is bounded by the size of the two patterns
times the number of distinct position sets, which stays small for grants of
the usual shape — the segments between the grant's ``#`` are short, or a
``#`` sits at its end. A search that needs more than ``SEARCH_BUDGET`` steps
answers False: the request is refused, never allowed by mistake, and a
hostile request costs a bounded amount of work.
"""

from __future__ import annotations

import heapq
from functools import lru_cache

__all__ = ["SEARCH_BUDGET", "contains"]

#: steps of the counterexample search before it gives up and refuses (fails closed)
SEARCH_BUDGET = 10_000

#: a word the grant does not name: stands for every such word at once
_FRESH = None


def _normalize(tokens: list[str]) -> tuple[str, ...]:
    """The same language, with ``#`` runs merged and stars moved before the ``#`` of a wildcard run."""
    out: list[str] = []
    i, n = 0, len(tokens)
    while i < n:
        if tokens[i] not in ("*", "#"):
            out.append(tokens[i])
            i += 1
            continue
        stars = hashes = 0
        while i < n and tokens[i] in ("*", "#"):
            if tokens[i] == "*":
                stars += 1
            else:
                hashes += 1
            i += 1
        out += ["*"] * stars + (["#"] if hashes else [])
    return tuple(out)


def _bits(mask: int) -> list[int]:
    out = []
    while mask:
        low = mask & -mask
        out.append(low.bit_length() - 1)
        mask ^= low
    return out


class _Grant:
    """The grant's automaton: position q = "about to match token q"; sets of positions are bit masks.

    ``dom[q]`` holds every q2 whose remaining language contains q's (L(q) ⊆ L(q2)),
    from three rules proven in the module docstring's terms, closed transitively:
    a ``#`` at q2 > q covers q; in one segment followed by ``#``, a shorter
    remainder that is position by position at least as general covers a longer
    one; a remainder of stars only (a segment about to complete) covers the
    ``#`` that starts its segment.
    """

    def __init__(self, tokens: tuple[str, ...]) -> None:
        self.tokens = tokens
        m = self.m = len(tokens)
        self.final = 1 << m
        self.closure = []
        for q in range(m + 1):
            mask, p = 1 << q, q
            while p < m and tokens[p] == "#":
                p += 1
                mask |= 1 << p
            self.closure.append(mask)
        next_hash = [m] * (m + 2)
        for q in range(m - 1, -1, -1):
            next_hash[q] = q if tokens[q] == "#" else next_hash[q + 1]
        dom = [1 << q for q in range(m + 1)]
        for q in range(m + 1):
            for q2 in range(m + 1):
                if q2 != q and self._covers(q, q2, next_hash):
                    dom[q] |= 1 << q2
        changed = True
        while changed:
            changed = False
            for q in range(m + 1):
                wider = dom[q]
                for q2 in _bits(dom[q]):
                    wider |= dom[q2]
                if wider != dom[q]:
                    dom[q], changed = wider, True
        self.dom = dom
        self.down = [0] * (m + 1)  # down[q2]: every q that q2 covers
        for q in range(m + 1):
            for q2 in _bits(dom[q]):
                self.down[q2] |= 1 << q

    def _covers(self, q: int, q2: int, next_hash: list[int]) -> bool:
        t, m = self.tokens, self.m
        if q2 < m and t[q2] == "#":
            return q < q2
        if q2 == m:
            return False
        end = next_hash[q2]
        if end == m:
            return False  # the last segment has an exact length: no offset covers another
        if q < m and t[q] != "#" and next_hash[q] == end:
            length = end - q2
            return length <= end - q and all(t[q2 + x] in ("*", t[q + x]) for x in range(length))
        if q < m and t[q] == "#" and next_hash[q + 1] == end and q2 > q:
            return all(t[x] == "*" for x in range(q2, end))
        return False

    def canon(self, states: int) -> int:
        """Drop every position another one in the set covers (the larger index wins a tie)."""
        keep = states
        for q in _bits(states):
            for q2 in _bits(self.dom[q] & keep & ~(1 << q)):
                if not self.dom[q2] >> q & 1 or q2 > q:
                    keep &= ~(1 << q)
                    break
        return keep

    def step(self, states: int, word: str | None) -> int:
        t, m = self.tokens, self.m
        following = 0
        for q in _bits(states):
            if q < m:
                if t[q] == "#":
                    following |= self.closure[q]
                elif t[q] == "*" or t[q] == word:
                    following |= self.closure[q + 1]
        return self.canon(following)

    def covered(self, states: int) -> int:
        """Every position whose language one in ``states`` contains."""
        out = 0
        for q in _bits(states):
            out |= self.down[q]
        return out


@lru_cache(maxsize=256)
def _grant(tokens: tuple[str, ...]) -> _Grant:
    return _Grant(tokens)


@lru_cache(maxsize=8192)
def contains(grant: str, pattern: str, budget: int = SEARCH_BUDGET) -> bool:
    """True iff every topic ``pattern`` can match is matched by ``grant`` (both valid patterns).

    ``a.b.#`` ⊆ ``a.#``, ``a.*`` ⊆ ``a.#``, ``#`` ⊄ ``a.#``, ``#.#`` ≡ ``#``.
    For a literal topic it is ``pattern_matches(grant, topic)``. A search
    longer than ``budget`` steps answers False (see the module docstring).
    """
    g = _normalize(grant.split("."))
    p = _normalize(pattern.split("."))
    if p == ("#",):
        p = ("*", "#")  # a topic has at least one word
    if g == ("#",):
        return True
    if "#" not in g:
        # one length only: the request must have that length and agree wherever the grant names a word
        return "#" not in p and len(p) == len(g) and all(x in ("*", y) for x, y in zip(g, p, strict=True))
    auto = _grant(g)
    start = auto.canon(auto.closure[0])
    if "#" not in p:
        states = start
        for token in p:
            states = auto.step(states, _FRESH if token == "*" else token)
            if not states:
                return False
        return bool(states & auto.final)
    named = {t for t in p if t not in ("*", "#")}
    if any(t not in ("*", "#") and t not in named for t in g):
        return False  # the grant needs a word the request's fresh-filled topics never contain
    return _search(auto, p, start, budget)


def _search(auto: _Grant, p: tuple[str, ...], start: int, budget: int) -> bool:
    """No counterexample reachable: True. Smaller sets first, so harder states are met before easier ones."""
    n = len(p)
    visited: list[list[tuple[int, int]]] = [[] for _ in range(n + 1)]
    heap = [(0, start.bit_count(), start)]
    steps = 0
    while heap:
        i, _, states = heapq.heappop(heap)
        if not states:
            return False  # the grant is out of options; any completion of the request is a counterexample
        if i == n:
            if not states & auto.final:
                return False
            continue
        covered = auto.covered(states)
        if any(not seen & ~covered for seen, _ in visited[i]):
            continue  # a visited state here is at least as hard: its language is contained in this one's
        visited[i] = [(seen, c) for seen, c in visited[i] if states & ~c] + [(states, covered)]
        steps += 1
        if steps > budget:
            return False
        token = p[i]
        if token == "#":
            heapq.heappush(heap, (i + 1, states.bit_count(), states))
            following = auto.step(states, _FRESH)
            heapq.heappush(heap, (i, following.bit_count(), following))
        else:
            following = auto.step(states, _FRESH if token == "*" else token)
            heapq.heappush(heap, (i + 1, following.bit_count(), following))
    return True
