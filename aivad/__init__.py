"""aivad: the messaging backbone of a multi-agent system.

One trio daemon stores every message with a monotonically increasing ``seq``,
fans it out to WebSocket subscribers by AMQP-style topic pattern, and lets front
ends resume after a reconnect without a gap or a duplicate.
"""

__version__ = "0.1.0"
