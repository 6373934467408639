"""Smoke tests of tests/brokers.py: the real brokers start, answer, and restart."""

from __future__ import annotations

import socket
import uuid

import pika  # type: ignore[import-untyped]

from tests.brokers import RabbitMQ, Redis


def _pika(rabbitmq: RabbitMQ) -> pika.BlockingConnection:
    return pika.BlockingConnection(pika.URLParameters(rabbitmq.url))


def test_rabbitmq_publish_consume(rabbitmq: RabbitMQ) -> None:
    queue = f"smoke-{uuid.uuid4().hex[:8]}"
    conn = _pika(rabbitmq)
    try:
        ch = conn.channel()
        ch.queue_declare(queue, auto_delete=True)
        ch.confirm_delivery()
        ch.basic_publish("", queue, b"hello", pika.BasicProperties(message_id="m1", delivery_mode=2))
        method, props, body = ch.basic_get(queue, auto_ack=False)
        assert method is not None
        assert body == b"hello"
        assert props.message_id == "m1"
        ch.basic_ack(method.delivery_tag)
    finally:
        conn.close()


def test_rabbitmq_listens_on_loopback_only(rabbitmq: RabbitMQ) -> None:
    assert rabbitmq.url.startswith("amqp://guest:guest@127.0.0.1:")
    with socket.create_connection(("127.0.0.1", rabbitmq.port), timeout=2):
        pass
    assert f"{rabbitmq.nodename}" in rabbitmq.ctl("status")


def test_redis_ping(redis_server: Redis) -> None:
    with socket.create_connection(("127.0.0.1", redis_server.port), timeout=2) as s:
        s.sendall(b"PING\r\n")
        assert s.recv(64) == b"+PONG\r\n"
