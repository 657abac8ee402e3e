"""The event loop a process runs on: uvloop's (the default) or the standard library's.

uvloop (libuv under asyncio's API) runs the same code with less CPU per socket
operation; ``STREAMREC_EVENT_LOOP=asyncio`` chooses the standard loop, for a
platform without uvloop or to compare. The README's Performance section has
the figures of both.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


def loop_factory(use_uvloop: bool) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """What ``asyncio.Runner`` makes its loop with: uvloop's, or None for the standard one."""
    if not use_uvloop:
        return None
    import uvloop  # noqa: PLC0415 - only for the processes that run on it

    return uvloop.new_event_loop
