"""Coalescing concurrent calls into one: whatever arrives during a call forms the next.

Used where many in-flight entries each need one round trip of the same kind
(acks, row reads, row writes): under load they share a round trip (and, for
PostgreSQL, a commit), and when idle a lone call goes out at once, adding no
latency.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Batcher(Generic[T, R]):
    """Runs ``run(items)`` for batches of submitted items; ``run`` returns one result per item.

    A result may be an exception instead: that item alone fails with it, while
    an exception raised by ``run`` fails the whole batch. Up to ``flights`` runs
    go on at once: an item submitted while fewer are under way starts a run at
    once (with whatever else is waiting when it starts); items submitted while
    all are under way wait for the first to end and go out together.
    """

    def __init__(
        self,
        run: Callable[[list[T]], Awaitable[Sequence[R | Exception]]],
        *,
        max_size: int = 500,
        flights: int = 1,
    ):
        self._run = run
        self._max = max_size
        self._flights = flights
        self._waiting: list[tuple[T, asyncio.Future[R]]] = []
        self._flushers: set[asyncio.Task[None]] = set()

    async def submit(self, item: T) -> R:
        """The result of ``item``, once the batch it went out with is done.

        Raises the item's own exception, or the one that failed its batch.
        """
        done: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, done))
        # A flusher done but not yet discarded has left its loop: it takes nothing more.
        if sum(not f.done() for f in self._flushers) < self._flights:
            flusher = asyncio.create_task(self._flush())
            self._flushers.add(flusher)
            flusher.add_done_callback(self._flushers.discard)
        return await done

    async def _flush(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting[: self._max], self._waiting[self._max :]
            try:
                results = list(await self._run([item for item, _ in batch]))
                if len(results) != len(batch):
                    raise RuntimeError(f"{len(results)} results for {len(batch)} items")
            except BaseException as exc:  # a cancelled flush must not strand its callers
                for _, done in batch:
                    if not done.done():
                        done.set_exception(exc)
                if not isinstance(exc, Exception):
                    raise
            else:
                for (_, done), result in zip(batch, results, strict=True):
                    _settle(done, result)


def _settle(done: asyncio.Future[R], result: R | Exception) -> None:
    """Give a waiting submit its result, or raise its exception there."""
    if done.done():
        return
    if isinstance(result, Exception):
        done.set_exception(result)
    else:
        done.set_result(result)
