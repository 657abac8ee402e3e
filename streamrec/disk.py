"""File work off the event loop, many callers' calls sharing one hop to a worker thread.

The media directory may be a network share, so its file calls never run on the
event loop. A hop to a worker thread costs far more than the calls a download
makes there (a stat, or an open, a write and a rename): most of it is the
handover of the GIL between a busy loop and the thread, in system calls. Calls
submitted while ``FLIGHTS`` hops are under way wait for the first to end and go
together in the next, so under load many recordings' file work costs one hop,
while a lone call goes at once. Several hops at a time keep a slow share from
making every caller wait on one thread.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

from streamrec.batch import Batcher

P = ParamSpec("P")
R = TypeVar("R")

FLIGHTS = 2
"""Hops to worker threads under way at once."""

Call = Callable[[], Any]


class Disk:
    """Runs blocking file calls in worker threads, batched."""

    def __init__(self, *, flights: int = FLIGHTS) -> None:
        self._calls: Batcher[Call, Any] = Batcher(self._hop, flights=flights)

    async def run(self, function: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """``function(*args, **kwargs)`` in a worker thread: its result, or what it raised."""
        result: R = await self._calls.submit(functools.partial(function, *args, **kwargs))
        return result

    @staticmethod
    async def _hop(calls: list[Call]) -> list[Any]:
        return await asyncio.to_thread(_each, calls)


def _each(calls: list[Call]) -> list[Any]:
    """Each call's result, or the exception it raised (failing that call alone)."""
    results: list[Any] = []
    for call in calls:
        try:
            results.append(call())
        except Exception as exc:  # handed to its caller
            results.append(exc)
    return results
