"""Consumer-group worker: reads the stream, runs a handler per entry, acks.

Delivery contract
=================
* **At least once.** An entry is read with XREADGROUP into this consumer's
  pending list (PEL) and stays there until its handler has returned, which for
  the recording pipeline means its result is committed in PostgreSQL. Only then
  is it XACKed and XDELed (in one MULTI, so the stream never keeps handled
  entries and never loses un-acked ones). A process killed at any instant
  leaves its entries pending; nothing is lost.
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
  backoff and jitter; each retry is counted as a delivery in the PEL
  (``XPENDING`` shows it). A permanent failure, or a failure at delivery
  ``STREAMREC_MAX_DELIVERIES``, moves the entry to the dead-letter stream
  ``{ns}:dead`` with its original fields plus ``error``, ``attempts``,
  ``origin_id``, ``consumer`` and ``failed_at``, atomically with its XACK and
  XDEL. An entry reclaimed after more deliveries than the cap (it keeps
  killing its consumers) is dead-lettered without running again.
* **Shutdown.** When ``stop`` is set the consumer stops reading, lets in-flight
  handlers finish within the grace period, cancels the rest and leaves their
  entries pending for reclaim.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Literal

import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError, ResponseError

from streamrec import deadletters
from streamrec.aio import first, wait_set
from streamrec.keys import Keys
from streamrec.metrics import Metrics
from streamrec.retry import PermanentError, RetryPolicy, describe

log = structlog.get_logger("streamrec.consumer")

# Per id: its delivery count after the call, or -1 when this consumer no longer
# owns it. With ARGV[3] == "1" the count is raised by one (a retry is a delivery).
CLAIM_OWN = """
local out = {}
for i = 4, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)[1]
  if p and p[2] == ARGV[2] then
    local count = p[4]
    if ARGV[3] == '1' then count = count + 1 end
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'RETRYCOUNT', count, 'JUSTID')
    out[#out + 1] = count
  else
    out[#out + 1] = -1
  end
end
return out
"""


# Deletes the consumer from the group only if it has no pending entries, so a
# graceful exit leaves no trace in XINFO CONSUMERS and can never drop work.
LEAVE = """
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) == 0 then
  return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
end
return -1
"""


@dataclass(frozen=True, slots=True)
class Delivery:
    """One delivery of a stream entry to a handler."""

    entry_id: str
    fields: dict[str, str]
    deliveries: int
    """How often the entry has been delivered, this delivery included."""


Handler = Callable[[Delivery], Awaitable[None]]
"""Does the work of one entry. Returning means its result is committed."""


DeadHook = Callable[[Delivery, str], Awaitable[None]]


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


async def ensure_group(redis: aioredis.Redis, keys: Keys) -> None:
    """Create the stream and its group if missing (from the start of the stream)."""
    try:
        await redis.xgroup_create(keys.stream, keys.group, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


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
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._handler = handler
        self._config = config
        self._on_dead = on_dead
        self._metrics = metrics or Metrics()
        self._claim_own = redis.register_script(CLAIM_OWN)
        self._leave_script = redis.register_script(LEAVE)
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._slot_freed = asyncio.Event()
        self._stop = asyncio.Event()
        self._reclaim_cursor = "0-0"
        self._next_reclaim = 0.0
        self.processed = 0
        self.dead_lettered = 0
        self.reclaim_passes = 0
        """Completed XAUTOCLAIM scans of the whole group's pending list."""

    @property
    def name(self) -> str:
        """This consumer's name in the group."""
        return self._config.name

    async def run(self, stop: asyncio.Event, *, until_idle: bool = False) -> None:
        """Consume until ``stop`` is set (or, with ``until_idle``, until nothing is left).

        Redis being unreachable is logged and retried; it does not end the loop.
        """
        self._stop = stop
        await ensure_group(self._redis, self._keys)
        log.info("consumer_started", consumer=self.name, concurrency=self._config.concurrency)
        renewer = asyncio.create_task(self._renew_forever())
        failures = 0
        try:
            while not stop.is_set():
                try:
                    started = await self._fill()
                    failures = 0
                except RedisError as exc:
                    failures += 1
                    await self._recover(exc, failures)
                    continue
                if until_idle and not started and not self._inflight:
                    break
        finally:
            await self._drain()
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer
            await self._leave()
            log.info("consumer_stopped", consumer=self.name, processed=self.processed)

    async def _leave(self) -> None:
        """Remove this consumer from the group if it holds no pending entries."""
        with contextlib.suppress(RedisError):
            await self._leave_script(keys=[self._keys.stream], args=[self._keys.group, self.name])

    async def _recover(self, error: RedisError, failures: int) -> None:
        """Back off after a Redis failure; recreate the group if it vanished."""
        if isinstance(error, ResponseError) and "NOGROUP" in str(error):
            # The stream or group is gone: a Redis restarted without persistence.
            log.warning("group_missing", error=describe(error))
            with contextlib.suppress(RedisError):
                await ensure_group(self._redis, self._keys)
                return
        log.warning("redis_unavailable", error=describe(error), failures=failures)
        await wait_set(self._stop, min(0.1 * 2**failures, 5.0))

    async def _fill(self) -> int:
        """Wait for free slots, then start entries from reclaim or a new read."""
        while len(self._inflight) >= self._config.concurrency:
            self._slot_freed.clear()
            await first(self._slot_freed.wait(), self._stop.wait())
            if self._stop.is_set():
                return 0
        free = self._config.concurrency - len(self._inflight)
        batch = await self._reclaim(free)
        if not batch:
            batch = await self._read(free)
        for delivery in batch:
            self._start(delivery)
        return len(batch)

    async def _read(self, count: int) -> list[Delivery]:
        reply = await first(
            self._redis.xreadgroup(
                self._keys.group,
                self.name,
                {self._keys.stream: ">"},
                count=count,
                block=self._config.block_ms,
            ),
            self._stop.wait(),
        )
        if not isinstance(reply, list):
            # Stopped while blocked. Should the read have been served anyway,
            # its entries sit in our PEL and are reclaimed like a crash's.
            return []
        return [
            Delivery(entry_id, fields, 1) for _, entries in reply for entry_id, fields in entries
        ]

    async def _reclaim(self, count: int) -> list[Delivery]:
        """Take over entries idle longer than the claim time, continuing the cursor."""
        now = time.monotonic()
        if now < self._next_reclaim:
            return []
        cursor, claimed, deleted = await self._redis.xautoclaim(
            self._keys.stream,
            self._keys.group,
            self.name,
            min_idle_time=self._config.claim_idle_ms,
            start_id=self._reclaim_cursor,
            count=count,
        )
        self._reclaim_cursor = cursor
        if cursor == "0-0":
            self._next_reclaim = now + self._config.claim_idle_ms / 3000
            self.reclaim_passes += 1
        if deleted:
            log.warning("reclaimed_entries_gone", entry_ids=deleted)
        claimed = [(entry_id, fields) for entry_id, fields in claimed if fields is not None]
        if not claimed:
            return []
        counts = await self._delivery_counts([entry_id for entry_id, _ in claimed])
        self._metrics.reclaimed.inc(len(claimed))
        log.info("entries_reclaimed", count=len(claimed), consumer=self.name)
        return [Delivery(entry_id, fields, counts.get(entry_id, 1)) for entry_id, fields in claimed]

    async def _delivery_counts(self, entry_ids: list[str]) -> dict[str, int]:
        pending = await self._redis.xpending_range(
            self._keys.stream,
            self._keys.group,
            min=min(entry_ids, key=_id_key),
            max=max(entry_ids, key=_id_key),
            count=len(entry_ids) + len(self._inflight),
            consumername=self.name,
        )
        return {str(p["message_id"]): int(p["times_delivered"]) for p in pending}

    @property
    def in_flight(self) -> int:
        """Entries this consumer is working on now."""
        return len(self._inflight)

    def _start(self, delivery: Delivery) -> None:
        task = asyncio.create_task(self._process(delivery))
        self._inflight[delivery.entry_id] = task
        self._metrics.in_flight.inc()
        task.add_done_callback(lambda _: self._finished(delivery.entry_id))

    def _finished(self, entry_id: str) -> None:
        self._inflight.pop(entry_id, None)
        self._metrics.in_flight.dec()
        self._slot_freed.set()

    async def _process(self, delivery: Delivery) -> None:
        """Run the handler with retries, then ack or dead-letter the entry."""
        context = {f: delivery.fields[f] for f in self._config.log_fields if f in delivery.fields}
        with structlog.contextvars.bound_contextvars(entry_id=delivery.entry_id, **context):
            if delivery.deliveries > self._config.retry.max_deliveries:
                reason = f"delivered {delivery.deliveries - 1} times without finishing"
                await self._dead_letter(delivery, reason)
                return
            try:
                outcome = await self._attempts(delivery)
                if outcome == DONE:
                    await self._ack(delivery.entry_id)
                elif isinstance(outcome, GiveUp):
                    await self._dead_letter(delivery, outcome.reason, outcome.attempts)
                else:
                    self._metrics.entries.labels("left_pending").inc()
            except Exception as exc:
                # Redis or the dead-letter hook failed: the entry stays pending
                # and is reclaimed once idle.
                self._metrics.entries.labels("left_pending").inc()
                log.error("entry_left_pending", error=describe(exc))

    async def _attempts(self, delivery: Delivery) -> Outcome:
        """Run the handler, retrying transient failures, until it is done or gives up."""
        policy = self._config.retry
        while True:
            try:
                await self._handler(delivery)
            except PermanentError as exc:
                return GiveUp(describe(exc), delivery.deliveries)
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
                count = await self._claim_own(
                    keys=[self._keys.stream],
                    args=[self._keys.group, self.name, "1", delivery.entry_id],
                )
                if count[0] < 0:
                    log.warning("claim_lost", attempt=delivery.deliveries)
                    return ABANDON
                delivery = replace(delivery, deliveries=int(count[0]))
            else:
                return DONE

    async def _ack(self, entry_id: str) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.xack(self._keys.stream, self._keys.group, entry_id)
            pipe.xdel(self._keys.stream, entry_id)
            await pipe.execute()
        self.processed += 1
        self._metrics.entries.labels("completed").inc()

    async def _dead_letter(self, delivery: Delivery, reason: str, attempts: int = 0) -> None:
        """Record the failure with the handler's hook, then move the entry atomically."""
        attempts = attempts or delivery.deliveries
        if self._on_dead is not None:
            await self._on_dead(delivery, reason)
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
        interval = self._config.claim_idle_ms / 3000
        while True:
            await asyncio.sleep(interval)
            if not self._inflight:
                continue
            try:
                await self.renew(list(self._inflight))
            except RedisError as exc:
                log.warning("claim_renewal_failed", error=describe(exc))

    async def renew(self, entry_ids: Iterable[str]) -> list[str]:
        """Reset the idle time of entries this consumer still owns; returns those it lost."""
        ids = list(entry_ids)
        counts = await self._claim_own(
            keys=[self._keys.stream], args=[self._keys.group, self.name, "0", *ids]
        )
        lost = [entry_id for entry_id, count in zip(ids, counts, strict=True) if count < 0]
        if lost:
            log.warning("claims_lost", entry_ids=lost)
        return lost

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


def _id_key(entry_id: str) -> tuple[int, int]:
    millis, _, seq = entry_id.partition("-")
    return int(millis), int(seq or 0)
