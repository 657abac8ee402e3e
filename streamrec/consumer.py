"""Consumer-group worker: reads the stream, runs a handler per entry, acks.

Delivery contract
=================
* **At least once.** An entry is read with XREADGROUP into this consumer's
  pending list (PEL) and stays there until its handler has returned, which for
  the recording pipeline means its result is committed in PostgreSQL. Only then
  is it XACKed and XDELed, both in one atomic call (acks of entries finishing
  together share it), so the stream keeps no handled entry and loses no
  un-acked one. A process killed at any instant leaves its entries pending;
  nothing is lost.
* **Idempotent side effects.** A handler may run more than once for one entry
  (after a crash, or when a claim was lost). The recording pipeline is keyed on
  RecordingSid: one row per recording, and a redelivered entry resumes at the
  first stage not yet committed.
* **Reclaim.** Every consumer runs XAUTOCLAIM over the group with min-idle
  ``STREAMREC_CLAIM_IDLE_MS``, so the entries of a dead consumer are finished by
  a live one that much after its last sign of life. A live consumer renews the
  claim on every entry it is working on (XCLAIM JUSTID, only while it still
  owns the entry) every third of that time, so a long job is never handed to a
  second consumer while the first is alive.
* **Retries.** A transient failure is retried in place with exponential
  backoff and jitter; each retry counts as a delivery in the PEL (``XPENDING``
  shows it). An outage of PostgreSQL is not the entry's fault: it is waited
  out with the same backoff, the entry held, and not counted.
* **Redelivery cap and dead letters.** A permanent failure, or a failure at
  delivery ``STREAMREC_MAX_DELIVERIES``, moves the entry to the dead-letter
  stream ``{ns}:dead`` with its original fields plus ``error``, ``attempts``,
  ``origin_id``, ``consumer`` and ``failed_at``, atomically with its XACK and
  XDEL. An entry reclaimed after more deliveries than the cap (it keeps
  killing its consumers) is dead-lettered without running again.
* **Per-business slots** (``streamrec.semaphore``, when configured). Before its
  handler runs, an entry takes a slot of its business (a lease renewed while it
  works, freed in the same call as its ack). An entry whose business is at its
  limit is parked off the stream atomically and woken, in order, when a slot
  frees; it holds no concurrency while it waits, and its delivery count
  travels with it.
* **Shutdown.** When ``stop`` is set the consumer stops reading, lets in-flight
  handlers finish within the grace period, cancels the rest and leaves their
  entries pending for reclaim; their slots are released.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field, replace
from typing import Literal

import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError, ResponseError

from streamrec import deadletters
from streamrec.aio import first, wait_set
from streamrec.batch import Batcher
from streamrec.delivery import DeadHook, Delivery, Handler, delivered
from streamrec.group import Group, ensure_group
from streamrec.keys import Keys
from streamrec.metrics import Metrics
from streamrec.retry import PermanentError, RetryPolicy, Unavailable, describe
from streamrec.semaphore import Held, Slots

log = structlog.get_logger("streamrec.consumer")

__all__ = ["Consumer", "ConsumerConfig", "Delivery", "Handler", "ensure_group"]


@dataclass(frozen=True, slots=True)
class GiveUp:
    """The entry failed for good: dead-letter it with this reason."""

    reason: str
    attempts: int


DONE: Literal["done"] = "done"  # handled: ack it
ABANDON: Literal["abandon"] = "abandon"  # stopping, or no longer ours: leave it pending
Outcome = GiveUp | Literal["done", "abandon"]


@dataclass(frozen=True, slots=True)
class ConsumerConfig:
    """The knobs of one consumer process."""

    name: str
    concurrency: int = 16
    claim_idle_ms: int = 60_000
    block_ms: int = 2_000
    shutdown_grace_s: float = 30.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    log_fields: tuple[str, ...] = ()
    """Entry fields bound to every log line about the entry (with ``entry_id``)."""


class Consumer:
    """Runs ``handler`` for the entries of the stream, as one consumer of the group."""

    def __init__(
        self,
        *,
        redis: aioredis.Redis,
        keys: Keys,
        handler: Handler,
        config: ConsumerConfig,
        on_dead: DeadHook | None = None,
        metrics: Metrics | None = None,
        slots: Slots | None = None,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._handler = handler
        self._config = config
        self._on_dead = on_dead
        self._metrics = metrics or Metrics()
        # Label children resolved once; in-flight is read when /metrics is scraped.
        self._completed = self._metrics.entries.labels("completed")
        self._left_pending = self._metrics.entries.labels("left_pending")
        self._metrics.in_flight.set_function(lambda: len(self._inflight))
        self._slots = slots
        self._group = Group(redis, keys, config.name)
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._held: dict[str, Held] = {}
        self._acks: Batcher[str, None] = Batcher(self._flush)
        # Refill in batches: read once a tenth of the concurrency is free, not per entry.
        self._low_water = max(1, min(config.concurrency // 10, 64))
        self._slot_freed = asyncio.Event()
        self._working = 0
        """Entries whose handler runs now: what the concurrency limit counts. An entry
        whose ack is on its way no longer counts, so reads overlap acks."""
        self._stop = asyncio.Event()
        self._next_reclaim = 0.0
        self.processed = 0
        self.dead_lettered = 0
        self.reclaim_passes = 0
        """Completed XAUTOCLAIM scans of the whole group's pending list."""

    @property
    def name(self) -> str:
        """This consumer's name in the group."""
        return self._config.name

    @property
    def in_flight(self) -> int:
        """Entries this consumer is working on now."""
        return len(self._inflight)

    async def run(self, stop: asyncio.Event, *, until_idle: bool = False) -> None:
        """Consume until ``stop`` is set (or, with ``until_idle``, until nothing is left).

        Redis being unreachable is logged and retried; it does not end the loop.
        """
        self._stop = stop
        await self._group.ensure()
        log.info("consumer_started", consumer=self.name, concurrency=self._config.concurrency)
        renewer = asyncio.create_task(self._renew_forever())
        failures = 0
        try:
            while not stop.is_set():
                try:
                    taken = await self._fill()
                    failures = 0
                    if until_idle and not taken and await self._idle():
                        break
                except RedisError as exc:
                    failures += 1
                    await self._recover(exc, failures)
        finally:
            await self._drain()
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer
            with contextlib.suppress(RedisError):
                await self._group.leave()
            log.info("consumer_stopped", consumer=self.name, processed=self.processed)

    async def _idle(self) -> bool:
        if self._inflight:
            return False
        return self._slots is None or await self._slots.parked_total() == 0

    async def _recover(self, error: RedisError, failures: int) -> None:
        """Back off after a Redis failure; recreate the group if it vanished."""
        if isinstance(error, ResponseError) and "NOGROUP" in str(error):
            # The stream or group is gone: a Redis restarted without persistence.
            log.warning("group_missing", error=describe(error))
            with contextlib.suppress(RedisError):
                await self._group.ensure()
                return
        log.warning("redis_unavailable", error=describe(error), failures=failures)
        await wait_set(self._stop, min(0.1 * 2**failures, 5.0))

    async def _fill(self) -> int:
        """Wait for free concurrency, take entries (reclaim first, else read), start them.

        Returns how many entries were taken, started or parked.
        """
        while self._config.concurrency - self._working < self._low_water:
            self._slot_freed.clear()
            await first(self._slot_freed.wait(), self._stop.wait())
            if self._stop.is_set():
                return 0
        free = self._config.concurrency - self._working
        batch = await self._reclaim(free) or await self._read(free)
        for delivery in await self._admit(batch):
            self._start(delivery)
        return len(batch)

    async def _read(self, count: int) -> list[Delivery]:
        # While entries flow a plain read answers at once; only an empty stream
        # is waited on, and that wait gives way to a stop.
        entries = await self._group.read(count, None)
        if not entries:
            entries = await first(self._group.read(count, self._config.block_ms), self._stop.wait())
        # None: stopped while blocked. Should the read have been served anyway,
        # its entries sit in our PEL and are reclaimed like a crash's.
        return [delivered(i, fields, 1) for i, fields in entries or []]

    async def _reclaim(self, count: int) -> list[Delivery]:
        """Take over entries idle longer than the claim time, at most every third of it."""
        now = time.monotonic()
        if now < self._next_reclaim:
            return []
        taken = await self._group.reclaim(self._config.claim_idle_ms, count)
        if taken.scan_done:
            self._next_reclaim = now + self._config.claim_idle_ms / 3000
            self.reclaim_passes += 1
        if taken.deleted:
            log.warning("reclaimed_entries_gone", entry_ids=taken.deleted)
        if not taken.entries:
            return []
        self._metrics.reclaimed.inc(len(taken.entries))
        log.info("entries_reclaimed", count=len(taken.entries), consumer=self.name)
        return [delivered(i, f, taken.counts.get(i, 1)) for i, f in taken.entries]

    async def _admit(self, batch: list[Delivery]) -> list[Delivery]:
        """The entries that may run now; the others were parked (or are gone)."""
        if self._slots is None or not batch:
            return batch
        admission = await self._slots.admit([(d.entry_id, d.fields, d.deliveries) for d in batch])
        self._held.update((h.entry_id, h) for h in admission.held)
        self._metrics.parked.inc(admission.parked)
        return [d for d in batch if d.entry_id not in admission.refused]

    def _start(self, delivery: Delivery) -> None:
        task = asyncio.create_task(self._process(delivery))
        self._inflight[delivery.entry_id] = task
        self._working += 1
        task.add_done_callback(lambda _: self._finished(delivery.entry_id))

    def _finished(self, entry_id: str) -> None:
        self._inflight.pop(entry_id, None)

    def _done_working(self) -> None:
        self._working -= 1
        self._slot_freed.set()

    async def _process(self, delivery: Delivery) -> None:
        """Run the handler with retries, then ack or dead-letter the entry."""
        fields = delivery.fields
        context = {f: fields[f] for f in self._config.log_fields if f in fields}
        # This task runs in its own copy of the context: what is bound here is
        # seen by every log line about the entry and gone with the task.
        structlog.contextvars.bind_contextvars(entry_id=delivery.entry_id, **context)
        working = True
        try:
            if delivery.deliveries > self._config.retry.max_deliveries:
                reason = f"delivered {delivery.deliveries - 1} times without finishing"
                outcome: Outcome = GiveUp(reason, delivery.deliveries - 1)
            else:
                outcome = await self._attempts(delivery)
            working = False
            self._done_working()
            if outcome == DONE:
                await self._ack(delivery.entry_id)
            elif isinstance(outcome, GiveUp):
                await self._dead_letter(delivery, outcome.reason, outcome.attempts)
            else:
                self._left_pending.inc()
        except Exception as exc:
            # Redis or the dead-letter hook failed: the entry stays pending
            # and is reclaimed once idle.
            self._left_pending.inc()
            log.error("entry_left_pending", error=describe(exc))
        finally:
            if working:
                self._done_working()
            await self._release(delivery.entry_id)

    async def _attempts(self, delivery: Delivery) -> Outcome:
        """Run the handler, retrying transient failures, until it is done or gives up."""
        policy = self._config.retry
        outage = 0
        while True:
            try:
                await self._handler(delivery)
            except PermanentError as exc:
                return GiveUp(describe(exc), delivery.deliveries)
            except Unavailable as exc:
                # Our own service is down: wait it out, holding the entry, uncounted.
                outage += 1
                delay = policy.delay(outage, exc)
                log.warning("dependency_unavailable", error=describe(exc), retry_in_s=delay)
                self._metrics.retries.inc()
                if await wait_set(self._stop, delay):
                    return ABANDON
            except Exception as exc:
                reason = describe(exc)
                if policy.exhausted(delivery.deliveries):
                    return GiveUp(reason, delivery.deliveries)
                delay = policy.delay(delivery.deliveries, exc)
                log.warning(
                    "attempt_failed", error=reason, attempt=delivery.deliveries, retry_in_s=delay
                )
                self._metrics.retries.inc()
                if await wait_set(self._stop, delay):
                    return ABANDON
                [count] = await self._group.renew([delivery.entry_id], bump=True)
                if count < 0:
                    log.warning("claim_lost", attempt=delivery.deliveries)
                    return ABANDON
                delivery = replace(delivery, deliveries=delivery.deliveries + 1)
            else:
                return DONE

    async def _ack(self, entry_id: str) -> None:
        """Ack and delete the entry, freeing its slot; returns once Redis has done it.

        Acks are flushed in batches: one round trip for every entry that finished
        while the previous flush was under way.
        """
        await self._acks.submit(entry_id)
        self.processed += 1
        self._completed.inc()

    async def _flush(self, ids: list[str]) -> list[None]:
        """XACK + XDEL ``ids``; those holding slots free them (and wake parked) in the same call."""
        held = [self._held[i] for i in ids if i in self._held]
        plain = [i for i in ids if i not in self._held]
        if held and self._slots is not None:
            await self._slots.release(held, ack=True)
            for h in held:
                self._held.pop(h.entry_id, None)
        if plain:
            await self._group.ack(plain)
        return [None] * len(ids)

    async def _release(self, entry_id: str) -> None:
        """Free the slot of an entry that was not acked (dead-lettered or left pending)."""
        held = self._held.pop(entry_id, None)
        if held is not None and self._slots is not None:
            try:
                await self._slots.release([held], ack=False)
            except RedisError as exc:  # the lease expires on its own
                log.warning("slot_release_failed", error=describe(exc))

    async def _dead_letter(self, delivery: Delivery, reason: str, attempts: int) -> None:
        """Record the failure with the handler's hook, then move the entry atomically."""
        if self._on_dead is not None:
            await self._on_dead(replace(delivery, deliveries=attempts), reason)
        async with self._redis.pipeline(transaction=True) as pipe:
            deadletters.add_move(
                pipe,
                self._keys,
                entry_id=delivery.entry_id,
                fields=delivery.fields,
                error=reason,
                attempts=attempts,
                consumer=self.name,
            )
            await pipe.execute()
        self.dead_lettered += 1
        self._metrics.entries.labels("dead_lettered").inc()
        log.error("entry_dead_lettered", error=reason, attempts=attempts)

    async def _renew_forever(self) -> None:
        """Keep claims and slot leases of in-flight entries alive; sweep parked entries."""
        period_ms = self._config.claim_idle_ms
        if self._slots is not None:
            period_ms = min(period_ms, self._slots.lease_ms)
        while True:
            await asyncio.sleep(period_ms / 3000)
            try:
                await self.renew()
            except RedisError as exc:
                log.warning("renewal_failed", error=describe(exc))

    async def renew(self) -> None:
        """One renewal: claims, then slot leases, then a sweep of parked entries."""
        ids = list(self._inflight)
        if ids:
            counts = await self._group.renew(ids)
            lost = [i for i, count in zip(ids, counts, strict=True) if count == -1]
            if lost:
                log.warning("claims_lost", entry_ids=lost)
        if self._slots is not None:
            held = [self._held[i] for i in ids if i in self._held]
            lost_slots = await self._slots.renew(held)
            if lost_slots:
                log.warning("slot_leases_lost", entry_ids=lost_slots)
            woken = await self._slots.sweep()
            if woken:
                log.info("parked_entries_woken", count=woken)

    async def _drain(self) -> None:
        """Let in-flight work finish within the grace period; cancel what is left."""
        if not self._inflight:
            return
        tasks = list(self._inflight.values())
        log.info("draining", in_flight=len(tasks), grace_s=self._config.shutdown_grace_s)
        _, left = await asyncio.wait(tasks, timeout=self._config.shutdown_grace_s)
        for task in left:
            task.cancel()
        if left:
            await asyncio.wait(left)
            log.warning("left_for_reclaim", count=len(left))
