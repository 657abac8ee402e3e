"""Running one entry in work: its handler with retries, then its ack or dead letter.

Retry, backoff, ownership checks and log context are composed here around the
handler, apart from the consumer's read loop; the contract they keep is the
docstring of ``streamrec.consumer``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

from streamrec import deadletters
from streamrec.aio import wait_set
from streamrec.batch import Batcher
from streamrec.delivery import DeadHook, Delivery, Handler, Lost
from streamrec.group import Group
from streamrec.keys import Keys
from streamrec.metrics import Metrics
from streamrec.retry import PermanentError, RetryPolicy, Unavailable, describe
from streamrec.semaphore import Slots
from streamrec.work import Work

log = structlog.get_logger("streamrec.consumer")


@dataclass(frozen=True, slots=True)
class GiveUp:
    """The entry failed for good: dead-letter it with this reason."""

    reason: str
    attempts: int


DONE: Literal["done"] = "done"  # handled: ack it
ABANDON: Literal["abandon"] = "abandon"  # stopping, or no longer ours: leave it pending
Outcome = GiveUp | Literal["done", "abandon"]


class Runner:
    """Runs the entries a consumer starts; counts what became of them."""

    def __init__(
        self,
        *,
        redis: aioredis.Redis,
        keys: Keys,
        group: Group,
        handler: Handler,
        policy: RetryPolicy,
        claim_s: float,
        free: Callable[[Work], None],
        on_dead: DeadHook | None,
        metrics: Metrics,
        slots: Slots | None,
        log_fields: tuple[str, ...],
        partition: int | None = None,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._group = group
        self._handler = handler
        self._policy = policy
        self._claim_s = claim_s
        self._free = free
        """Called once the handler of an entry is over: its concurrency is free."""
        self._on_dead = on_dead
        self._metrics = metrics
        self._slots = slots
        self._log_fields = log_fields
        self._partition = {} if partition is None else {"partition": partition}
        """Bound to every log line about an entry when there are several partitions."""
        self._completed = metrics.entries.labels("completed")
        self._left_pending = metrics.entries.labels("left_pending")
        self._acks: Batcher[Work, None] = Batcher(self._flush)
        self._stop = asyncio.Event()
        self.processed = 0
        self.dead_lettered = 0

    def stopping(self, stop: asyncio.Event) -> None:
        """Wait for ``stop`` instead of backing off once it is set."""
        self._stop = stop

    async def process(self, work: Work) -> None:
        """Run the handler with retries, then ack or dead-letter the entry."""
        delivery = work.delivery
        fields = delivery.fields
        context = {f: fields[f] for f in self._log_fields if f in fields}
        # This task runs in its own copy of the context: what is bound here is
        # seen by every log line about the entry and gone with the task.
        structlog.contextvars.bind_contextvars(
            entry_id=delivery.entry_id, **self._partition, **context
        )
        try:
            outcome = await self._outcome(work)
            self._free(work)
            if outcome == DONE:
                await self._ack(work)
            elif isinstance(outcome, GiveUp):
                await self._dead_letter(work.delivery, outcome.reason, outcome.attempts)
            else:
                self._left_pending.inc()
        except Lost as exc:  # the dead-letter hook found the entry no longer ours
            self._left_pending.inc()
            log.warning("work_stopped", reason=str(exc))
        except Exception as exc:
            # Redis or the dead-letter hook failed: the entry stays pending
            # and is reclaimed once idle.
            self._left_pending.inc()
            log.error("entry_left_pending", error=describe(exc))
        finally:
            self._free(work)
            await self._release(work)

    async def _outcome(self, work: Work) -> Outcome:
        """The handler's outcome; ABANDON when this process gave the entry up meanwhile."""
        delivery = work.delivery
        if delivery.deliveries > self._policy.max_deliveries:
            reason = f"delivered {delivery.before} times without finishing"
            return GiveUp(reason, delivery.before)
        try:
            outcome = await self._attempts(work)
            if isinstance(outcome, GiveUp):
                work.guard()  # the dead letter is for the entry's owner to write
            return outcome
        except asyncio.CancelledError:
            if work.stopped is None:
                raise  # shutting down: the drain cancelled it
            # Stopped by its own ownership check; the task itself goes on.
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
        except Lost:
            pass
        log.warning("work_stopped", reason=work.stopped, attempt=work.delivery.deliveries)
        return ABANDON

    async def _attempts(self, work: Work) -> Outcome:
        """Run the handler, retrying transient failures, until it is done or gives up."""
        outages = 0
        while True:
            delivery = work.delivery
            try:
                await self._handler(delivery)
            except Lost:
                raise
            except PermanentError as exc:
                return GiveUp(describe(exc), delivery.deliveries)
            except Exception as exc:
                outage = isinstance(exc, Unavailable)
                if not outage and self._policy.exhausted(delivery.deliveries):
                    return GiveUp(describe(exc), delivery.deliveries)
                outages += outage
                if not await self._before_retry(work, exc, outages if outage else None):
                    return ABANDON
            else:
                return DONE

    async def _before_retry(self, work: Work, error: Exception, outages: int | None) -> bool:
        """Back off before the next attempt; False when stopping.

        An outage of our own services (``outages``: how many in a row) is waited
        out uncounted; any other failure counts the next attempt as a delivery.
        Raises Lost if the entry stopped being ours while waiting.
        """
        attempt = work.delivery.deliveries
        delay = self._policy.delay(attempt if outages is None else outages, error)
        if outages is None:
            log.warning("attempt_failed", error=describe(error), attempt=attempt, retry_in_s=delay)
        else:
            log.warning("dependency_unavailable", error=describe(error), retry_in_s=delay)
        self._metrics.retries.inc()
        if await wait_set(self._stop, delay):
            return False
        work.guard()
        if outages is None:
            await self._count_retry(work)
        return True

    async def _count_retry(self, work: Work) -> None:
        """Record the next attempt as a delivery in the PEL, while the entry is still ours."""
        sent = time.monotonic()
        [count] = await self._group.renew([(work.entry_id, work.claimed + 1)])
        if count < 0:
            work.stop("claim lost: another consumer owns the entry")
            raise Lost(str(work.stopped))
        work.claimed = count
        work.delivery = replace(work.delivery, deliveries=work.delivery.deliveries + 1)
        work.renewed(claim_until=sent + self._claim_s)

    async def _ack(self, work: Work) -> None:
        """Ack and delete the entry, freeing its slot; returns once Redis has done it.

        Acks are flushed in batches: one round trip for every entry that finished
        while the previous flush was under way.
        """
        await self._acks.submit(work)
        self.processed += 1
        self._completed.inc()

    async def _flush(self, works: list[Work]) -> list[None]:
        """XACK + XDEL the entries; those holding slots free them (and wake parked) in one call."""
        held = [w.held for w in works if w.held is not None]
        plain = [w.entry_id for w in works if w.held is None]
        if held and self._slots is not None:
            await self._slots.release(held, ack=True)
            for w in works:
                w.held = None
        if plain:
            await self._group.ack(plain)
        return [None] * len(works)

    async def _release(self, work: Work) -> None:
        """Free the slot of an entry that was not acked (dead-lettered or left pending).

        A slot whose entry this process gave up is not ours to free: it lapses,
        or the entry's new owner carries it on.
        """
        held, work.held = work.held, None
        if held is None or self._slots is None or work.stopped is not None:
            return
        try:
            await self._slots.release([held], ack=False)
        except RedisError as exc:  # the lease expires on its own
            log.warning("slot_release_failed", error=describe(exc))

    async def _dead_letter(self, delivery: Delivery, reason: str, attempts: int) -> None:
        """Record the failure with the handler's hook, then move the entry atomically.

        The move is one script that acts only while the entry is still in the
        stream, so a repeat (or a consumer that lost the entry) writes no second letter.
        """
        if self._on_dead is not None:
            await self._on_dead(replace(delivery, deliveries=attempts), reason)
        moved = await deadletters.move(
            self._redis,
            self._keys,
            entry_id=delivery.entry_id,
            fields=delivery.fields,
            error=reason,
            attempts=attempts,
            consumer=self._group.name,
        )
        if not moved:  # handled or moved by another consumer meanwhile
            log.warning("entry_already_gone", error=reason)
            return
        self.dead_lettered += 1
        self._metrics.entries.labels("dead_lettered").inc()
        log.error("entry_dead_lettered", error=reason, attempts=attempts)
