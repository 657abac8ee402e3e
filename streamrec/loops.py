"""How a process runs: its event loop (uvloop's by default) and its garbage collector.

uvloop (libuv under asyncio's API) runs the same code with less CPU per socket
operation; ``STREAMREC_EVENT_LOOP=asyncio`` chooses the standard loop, for a
platform without uvloop or to compare. The cyclic garbage collector's first
generation is collected every GC_THRESHOLD allocations instead of Python's 700:
each entry in work allocates a task, its context and a few small objects, and
at the default a no-op entry spent a fifth of its CPU in collections. The
README's Performance section has the figures.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable

GC_THRESHOLD = (10_000, 20, 20)
"""Allocations between first-generation collections, then collections between older
ones' (Python's default: 700, 10, 10)."""


def tune_gc() -> None:
    """Collect less often, and leave what was loaded at start out of every collection."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)


def loop_factory(use_uvloop: bool) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """What ``asyncio.Runner`` makes its loop with: uvloop's, or None for the standard one."""
    if not use_uvloop:
        return None
    import uvloop  # noqa: PLC0415 - only for the processes that run on it

    return uvloop.new_event_loop
