"""pytest plugin: a cluster of real ``aivad serve`` nodes on the session's Redis (``cluster``), and a
redis-server of a test's own to restart (``own_redis``).

Each test gets its own key prefix, so tests share the Redis server without sharing a cluster;
each node its own ports and temp dir, and a heartbeat every 0.5 s (a killed node is noticed fast).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.brokers import Redis
from tests.conftest import DaemonProcess, short_tmp_dir


class Cluster:
    """Nodes of one cluster: the same Redis, the same prefix, each its own ports and directory."""

    def __init__(self, server: Redis, /, **sections: dict[str, Any]) -> None:
        self.redis = server
        self.prefix = f"t{uuid.uuid4().hex[:8]}:"
        self.sections = sections
        self.nodes: list[DaemonProcess] = []

    def node(self, name: str, **extra: dict[str, Any]) -> DaemonProcess:
        sections = {**self.sections, **extra}
        sections["redis"] = {"enabled": True, "url": self.redis.url, "prefix": self.prefix,
                             **sections.get("redis", {})}
        sections["cluster"] = {"node_name": name, "heartbeat_interval_s": 0.5, **sections.get("cluster", {})}
        node = DaemonProcess(short_tmp_dir(), **sections)
        node.start()
        self.nodes.append(node)
        return node

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@pytest.fixture
def cluster(redis_server: Redis) -> Iterator[Cluster]:
    made = Cluster(redis_server)
    try:
        yield made
    finally:
        made.stop()


@pytest.fixture
def own_redis() -> Iterator[Redis]:
    """A redis-server of this test's own (it gets restarted or flushed), with an AOF."""
    server = Redis(appendonly=True, appendfsync="always").start()
    try:
        yield server
    finally:
        server.stop()
