"""The pattern index: which subscriptions does a topic reach? Sync, no I/O.

A trie over words. Matching walks only the branches a topic can take (its
literal word, ``*`` and ``#``), so the cost grows with the topic's length and
the number of wildcard branches, not with the number of subscriptions.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from typing import Generic, TypeVar

__all__ = ["PatternIndex"]

S = TypeVar("S", bound=Hashable)


class _Node(Generic[S]):
    __slots__ = ("children", "pattern", "subscribers")

    def __init__(self) -> None:
        self.children: dict[str, _Node[S]] = {}
        #: made at the first subscriber: the nodes along a pattern's path hold none (a set is 216 bytes)
        self.subscribers: set[S] | None = None
        self.pattern = ""


class PatternIndex(Generic[S]):
    """Maps patterns to sets of subscribers; ``match(topic)`` yields ``(pattern, subscribers)``."""

    def __init__(self) -> None:
        self._root: _Node[S] = _Node()
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(self, pattern: str, subscriber: S) -> None:
        node = self._root
        for word in pattern.split("."):
            node = node.children.setdefault(word, _Node())
        node.pattern = pattern
        if node.subscribers is None:
            node.subscribers = set()
        if subscriber not in node.subscribers:
            node.subscribers.add(subscriber)
            self._count += 1

    def discard(self, pattern: str, subscriber: S) -> None:
        path = [self._root]
        words = pattern.split(".")
        for word in words:
            child = path[-1].children.get(word)
            if child is None:
                return
            path.append(child)
        node = path[-1]
        if node.subscribers is None or subscriber not in node.subscribers:
            return
        node.subscribers.discard(subscriber)
        self._count -= 1
        if not node.subscribers:
            node.subscribers = None
        # prune empty branches so a churn of patterns does not grow the trie forever
        for depth in range(len(words), 0, -1):
            child = path[depth]
            if child.subscribers or child.children:
                break
            del path[depth - 1].children[words[depth - 1]]

    def subscribers(self) -> list[S]:
        """Every subscriber of every pattern (a walk of the trie: for rare, all-at-once uses)."""
        found: list[S] = []
        stack = [self._root]
        while stack:
            node = stack.pop()
            if node.subscribers:
                found.extend(node.subscribers)
            stack.extend(node.children.values())
        return found

    def match(self, topic: str) -> Iterator[tuple[str, set[S]]]:
        """Every pattern that matches ``topic`` and has subscribers, each once, with its subscribers.

        The set is the index's own (a set per pattern, not a pair per subscriber: the router walks
        it once per message, and a delivery costs no generator step); it must not change while the
        caller walks it."""
        words = topic.split(".")
        n = len(words)
        seen: set[tuple[int, int]] = set()
        stack: list[tuple[_Node[S], int]] = [(self._root, 0)]
        while stack:
            node, i = stack.pop()
            key = (id(node), i)
            if key in seen:
                continue
            seen.add(key)
            if i == n:
                if node.subscribers:
                    yield node.pattern, node.subscribers
                hash_child = node.children.get("#")
                if hash_child is not None:  # '#' may match zero words at the end
                    stack.append((hash_child, i))
                continue
            children = node.children
            child = children.get(words[i])
            if child is not None:
                stack.append((child, i + 1))
            child = children.get("*")
            if child is not None:
                stack.append((child, i + 1))
            child = children.get("#")
            if child is not None:
                # '#' takes zero or more words: continue below it from every later position
                for j in range(i, n + 1):
                    stack.append((child, j))
