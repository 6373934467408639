"""A blocking facade for synchronous agents: the async client on a portal thread.

Why a portal and not a second implementation: one protocol implementation,
one set of reconnect and de-duplication rules. ``start_blocking_portal`` runs
an event loop (trio by default) in a thread; every blocking call is a
``portal.call`` into it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, ExitStack
from types import TracebackType
from typing import Any, Self

from anyio.from_thread import BlockingPortal, start_blocking_portal

from aivad.client._client import Client, connect
from aivad.client._model import ClientOptions, CollectResult, Gap, Published, TaskStatus
from aivad.client._subscription import Subscription
from aivad.client._token import TokenProvider, check_token_provider
from aivad.envelope import Envelope

__all__ = ["BlockingClient", "BlockingSubscription"]


class BlockingSubscription:
    """A plain iterator over a :class:`~aivad.client.Subscription`.

    Use ``with client.subscribe(p) as sub: for env in sub: ...``; ``close()``
    (or leaving the ``with``) ends it, also from another thread.
    """

    def __init__(self, portal: BlockingPortal, sub: Subscription) -> None:
        self._portal = portal
        self._sub = sub
        self._entered = False

    @property
    def pattern(self) -> str:
        return self._sub.pattern

    @property
    def last_seq(self) -> int | None:
        return self._sub.last_seq

    @property
    def gap(self) -> Gap | None:
        return self._sub.gap

    def statistics(self) -> Any:
        return self._sub.statistics()

    def __enter__(self) -> Self:
        self._portal.call(self._sub.__aenter__)
        self._entered = True
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __iter__(self) -> Iterator[Envelope]:
        return self

    def __next__(self) -> Envelope:
        try:
            return self._portal.call(self._sub.__anext__)
        except StopAsyncIteration:
            raise StopIteration from None

    def close(self) -> None:
        self._portal.call(self._sub.aclose)


class BlockingClient:
    """``with BlockingClient(url, token=…) as client: client.publish("a.b", {...})``.

    The same operations as :class:`~aivad.client.Client`, blocking. Thread-safe:
    calls from several threads are pipelined on the one connection.

    Resource handling: ``__enter__`` starts the portal thread and connects;
    ``__exit__`` (or ``close()``) closes subscriptions, the connection and the
    thread. Error handling: the async client's exceptions, unchanged.
    ``on_gap`` callbacks run on the portal thread.

    ``token``: as for :func:`~aivad.client.connect` — a JWT, or a callable
    returning one, asked again before each expiry (a plain function runs in a
    worker thread of the portal's loop, so it may block, e.g. on an HTTP call).
    """

    def __init__(
        self,
        url: str = "ws://127.0.0.1:8765/",
        *,
        token: TokenProvider | None = None,
        options: ClientOptions | None = None,
        backend: str = "trio",
    ) -> None:
        check_token_provider(token)
        self.url = url
        self._token = token
        self._options = options
        self._backend = backend
        self._stack: ExitStack | None = None
        self._portal: BlockingPortal | None = None
        self._client: Client | None = None

    def __enter__(self) -> Self:
        stack = ExitStack()
        try:
            portal = stack.enter_context(start_blocking_portal(self._backend))
            cm: AbstractContextManager[Client] = portal.wrap_async_context_manager(
                connect(self.url, token=self._token, options=self._options)
            )
            self._client = stack.enter_context(cm)
        except BaseException:
            stack.close()
            raise
        self._stack, self._portal = stack, portal
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        stack, self._stack = self._stack, None
        self._client = self._portal = None
        if stack is not None:
            stack.close()

    def _run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self._portal is None or self._client is None:
            raise RuntimeError("BlockingClient is not open; use it as a context manager")
        return self._portal.call(functools.partial(fn, *args, **kwargs))

    @property
    def client(self) -> Client:
        """The underlying async client (for use on the portal only)."""
        if self._client is None:
            raise RuntimeError("BlockingClient is not open")
        return self._client

    def publish(
        self,
        topic: str,
        payload: Any = None,
        *,
        metadata: dict[str, Any] | None = None,
        message_id: str | None = None,
    ) -> Published:
        result: Published = self._run(self.client.publish, topic, payload, metadata=metadata, message_id=message_id)
        return result

    def history(self, pattern: str, after: int = 0, limit: int = 100) -> tuple[list[Envelope], int]:
        result: tuple[list[Envelope], int] = self._run(self.client.history, pattern, after, limit)
        return result

    def ping(self) -> float:
        result: float = self._run(self.client.ping)
        return result

    def subscribe(
        self,
        pattern: str,
        since: int | None = None,
        *,
        epoch: str | None = None,
        on_gap: Callable[[Gap], None] | None = None,
    ) -> BlockingSubscription:
        """A subscription; enter it (``with``) to be sure it is active before publishing."""
        sub: Subscription = self._run(self.client.subscribe, pattern, since, epoch=epoch, on_gap=on_gap)
        assert self._portal is not None
        return BlockingSubscription(self._portal, sub)

    def dispatch(self, type: str, payload: Any = None, **kwargs: Any) -> str:
        result: str = self._run(self.client.dispatch, type, payload, **kwargs)
        return result

    def get_task_status(self, task_id: str) -> TaskStatus:
        result: TaskStatus = self._run(self.client.get_task_status, task_id)
        return result

    def collect_all(
        self,
        task_ids: Iterable[str] | None = None,
        timeout: float = 30.0,
        *,
        group_id: str | None = None,
        min_results: int | None = None,
    ) -> CollectResult:
        result: CollectResult = self._run(
            self.client.collect_all, task_ids, timeout, group_id=group_id, min_results=min_results
        )
        return result

    def on_result(self, task_id: str, callback: Callable[[TaskStatus], Any]) -> None:
        """Call ``callback(TaskStatus)`` once when the task ends; it runs on the portal thread."""
        self._run(self.client.on_result, task_id, callback)

    def request_response(self, type: str, payload: Any = None, timeout: float = 30.0) -> Any:
        return self._run(self.client.request_response, type, payload, timeout)

    def statistics(self) -> Any:
        return self.client.statistics()
