"""The Python client of aivad (DESIGN §4.6): anyio-based, so it runs under trio
and asyncio, plus a blocking facade for synchronous agents.

    async with aivad.client.connect("ws://127.0.0.1:8765/", token=fetch_token) as client:
        await client.publish("scan.completed", {"scan_id": "123"})
        async with client.subscribe("scan.#", since=0) as sub:
            async for env in sub:          # resumes by itself, never a duplicate
                ...

    with aivad.client.BlockingClient("ws://127.0.0.1:8765/", token=os.environ["AIVAD_TOKEN"]) as client:
        client.publish("scan.completed", {"scan_id": "123"})

    worker = aivad.client.Worker("ws://127.0.0.1:8765/", concurrency=4, name="scanner-1", token=fetch_token)

    @worker.handler("scan.run")
    async def scan(task: aivad.client.TaskContext) -> dict:
        await task.progress(0.5)
        return {"open_ports": [22]}

    worker.run_forever()   # or: await worker.run() / async with worker.running(): ...

``token=`` (DESIGN §4.8) is a JWT, or a callable (sync or async) returning one:
a callable is asked again before each token expires and the new one is sent on
every open connection; a string ends in ``AivadError("unauthorized")`` once it
has expired. Without ``token=`` nothing is presented (a daemon with ``[auth]
required = false``).
"""

from aivad.client._blocking import BlockingClient, BlockingSubscription
from aivad.client._client import Client, connect
from aivad.client._model import (
    AivadConnectionError,
    AivadError,
    ClientOptions,
    ClientStatistics,
    CollectResult,
    Gap,
    Published,
    RetryPolicy,
    SubscriptionStatistics,
    TaskStatus,
)
from aivad.client._subscription import Subscription
from aivad.client._token import TokenProvider
from aivad.client._worker import PermanentError, TaskAbandoned, TaskContext, Worker, WorkerStatistics
from aivad.client._ws import HandshakeRejected, WebSocketClosed
from aivad.envelope import Envelope

__all__ = [
    "AivadConnectionError",
    "AivadError",
    "BlockingClient",
    "BlockingSubscription",
    "Client",
    "ClientOptions",
    "ClientStatistics",
    "CollectResult",
    "Envelope",
    "Gap",
    "HandshakeRejected",
    "PermanentError",
    "Published",
    "RetryPolicy",
    "Subscription",
    "SubscriptionStatistics",
    "TaskAbandoned",
    "TaskContext",
    "TaskStatus",
    "TokenProvider",
    "WebSocketClosed",
    "Worker",
    "WorkerStatistics",
    "connect",
]
