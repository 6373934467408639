"""pytest plugin: session-scoped real brokers, started only when a test asks.

Enable with ``pytest_plugins = ["tests.broker_fixtures"]`` in the top-level
``conftest.py``. ``rabbitmq`` (a :class:`tests.brokers.RabbitMQ`: ``url``,
``port``, ``restart()``, ``ctl()``, ``queue_counts()``) takes ~7 s to start, so
it is started once per session, lazily, and stopped by PID at the end; the same
for ``redis_server`` (a :class:`tests.brokers.Redis`). Tests that share the node
keep out of each other's way by naming their own exchanges and queues.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.brokers import RabbitMQ, Redis, start_rabbitmq, start_redis


@pytest.fixture(scope="session")
def rabbitmq() -> Iterator[RabbitMQ]:
    node = start_rabbitmq()
    try:
        yield node
    finally:
        node.stop()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[Redis]:
    server = start_redis()
    try:
        yield server
    finally:
        server.stop()
