"""The webhook's answers counted into the outcome slots, for the dashboard's flow chart.

Each answer the webhook gives a callback is counted in process by outcome:
``queued`` (added to the stream), ``duplicate`` (its recording was seen before)
and ``rejected`` (any 4xx: a bad signature, a malformed or too large body).
Every few seconds the counts go to Redis in one script call
(``tally_add.lua``), into the hash of per-10 s-slot counts the consumers'
heartbeats add their outcomes to (``keys.outcomes``), so one HGETALL gives the
whole flow of the last hour. The call prunes slots past the hour as a
heartbeat does.

A batch keeps its number until Redis confirms it, so a call repeated after a
lost reply (the client retries) or sent again after a failure adds it once.
A process killed between two sends loses the answers since the last: at most
one interval's worth, in a chart.
"""

from __future__ import annotations

import asyncio
import secrets
from collections import Counter
from collections.abc import AsyncIterator

import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

from streamrec import lua
from streamrec.aio import wait_set
from streamrec.keys import Keys
from streamrec.retry import describe
from streamrec.status import SLOT_MS, SLOTS_KEPT

log = structlog.get_logger("streamrec.tally")

WEBHOOK_OUTCOMES = ("queued", "duplicate", "rejected")
"""The webhook's answers that are charted: added, seen before, refused with a 4xx."""
MARKER_MS = SLOT_MS * SLOTS_KEPT
"""How long a process's last batch number is kept: past that its counts are out of the chart."""
LAST_SEND_S = 1.0
"""How long the send on the way out may take: a stopping process does not wait on a dead Redis."""


class Tally:
    """Counts one webhook process's answers and sends them every ``every_s``."""

    def __init__(self, redis: aioredis.Redis, keys: Keys, *, every_s: float = 5.0) -> None:
        self._keys = keys
        self.every_s = every_s
        self._marker = keys.tally(secrets.token_hex(8))
        self._counts: Counter[str] = Counter()
        self._batch: tuple[int, dict[str, int]] | None = None
        """The batch sent but not confirmed: its number and counts, sent again as they were."""
        self._number = 0
        self._script = lua.register(redis, "tally_add", "outcomes_prune")

    def count(self, outcome: str) -> None:
        """Count one answer; outcomes other than WEBHOOK_OUTCOMES are not charted."""
        if outcome in WEBHOOK_OUTCOMES:
            self._counts[outcome] += 1

    async def send(self) -> bool:
        """Send the unconfirmed batch, else the counts so far as a new one; True if Redis
        added one (False: nothing to send, or the batch had been added already).

        Raises RedisError when Redis does not answer; the batch is kept for the next call.
        """
        if self._batch is None:
            if not self._counts:
                return False
            self._number += 1
            self._batch = (self._number, dict(self._counts))
            self._counts.clear()
        number, counts = self._batch
        args = [str(SLOT_MS), str(SLOTS_KEPT), str(number), str(MARKER_MS)]
        for outcome, count in counts.items():
            args += [outcome, str(count)]
        keys = [self._keys.outcomes, self._keys.outcome_slots, self._marker]
        added = await self._script(keys=keys, args=args)
        self._batch = None
        return bool(added)

    async def run(self, stop: asyncio.Event) -> None:
        """Send every ``every_s`` until ``stop``, then once more (within LAST_SEND_S).

        A send that fails is logged (``tally_not_sent``) and tried again next time.
        """
        while True:
            stopped = await wait_set(stop, self.every_s)
            try:
                async with asyncio.timeout(LAST_SEND_S if stopped else None):
                    await self.send()
            except (RedisError, TimeoutError) as exc:
                log.warning("tally_not_sent", error=describe(exc))
            if stopped:
                return


async def sending(tally: Tally) -> AsyncIterator[None]:
    """Run ``tally`` for the duration of the generator (an aiohttp cleanup context)."""
    stop = asyncio.Event()
    sender = asyncio.create_task(tally.run(stop))
    yield
    stop.set()
    await sender
