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

When the search ends within its budget (below), the answer is exact over all
topics of any length. (Topics are capped at 255 characters; the cap is not
used, which can only make a contrived request be refused that the cap would
have let through — the safe direction. The empty topic does not exist, so
``#`` ≡ ``*.#``.) Plain cases take microseconds: ``a.b.#`` ⊆ ``a.#`` visits a
handful of states.

Cost: I know of no polynomial-time exact algorithm for this question (it is
inclusion between two restricted regular expressions, and the subset
construction above can be exponential in the worst case). The search visits
at most (request tokens + 1) × (distinct position sets) states; with the
pruning the sets stay few for grants of the usual shape (short stretches
between the grant's ``#``, or a ``#`` at its end), and random and
hill-climbed hostile pairs at the 255-character limit stayed under 2,000
steps (about 13 µs each). ``SEARCH_BUDGET`` caps the steps: a search that
would need more answers False — the request is refused, never allowed by
mistake — so a hostile request costs bounded work (a tenth of a second at
most, per granted pattern it is compared with).
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
        dom = [1 << q for q in range(m + 1)]
        hashes = [q for q in range(m) if tokens[q] == "#"]
        for q in range(m + 1):
            for h in hashes:
                if q < h:
                    dom[q] |= 1 << h  # a later # covers everything before it
        for start, end in zip([0, *(h + 1 for h in hashes)], hashes, strict=False):
            self._segment_rules(dom, start, end)  # segments followed by a # (the last one has an exact length)
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

    def _segment_rules(self, dom: list[int], start: int, end: int) -> None:
        """Offsets in ``tokens[start:end]``, a segment followed by the ``#`` at ``end``.

        q is covered by q2 = q + d when ``tokens[q2:end]`` is, position by
        position, at least as general as ``tokens[q:q + end - q2]`` (the rest is
        absorbed by the ``#``): one backward scan per shift d, O(segment²).
        The ``#`` before the segment (if any) is covered by an offset whose
        remainder is stars only: whatever reaches that ``#`` completes the
        segment later than the offset does.
        """
        t = self.tokens
        for d in range(1, end - start):
            general = True
            for q2 in range(end - 1, start + d - 1, -1):
                general = general and t[q2] in ("*", t[q2 - d])
                if general:
                    dom[q2 - d] |= 1 << q2
        if start > 0:
            q2 = end
            while q2 > start and t[q2 - 1] == "*":
                q2 -= 1
                dom[start - 1] |= 1 << q2

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
