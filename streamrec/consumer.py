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
  (after a crash, or when this process gave the entry up). The recording
  pipeline is keyed on RecordingSid: one row per recording, and a redelivered
  entry resumes at the first stage not yet committed; within the transcription
  stage, at the first chunk of each channel not yet committed, so a recording's
  audio is transcribed once per chunk however often its consumers die.
* **Reclaim.** Every consumer runs XAUTOCLAIM over the group with min-idle
  ``STREAMREC_CLAIM_IDLE_MS`` at most every third of it, so the entries of a
  dead consumer are finished by a live one that much after its last sign of
  life.
* **One run per entry per process.** Each entry in work is one object
  (``streamrec.work.Work``: its task, claim, slot lease and deadline), at most
  one per entry id. An entry that XAUTOCLAIM hands back to the consumer still
  working on it (its renewals failed for a while) is renewed with its true
  delivery count, not started a second time.
* **A live consumer keeps its entries, and only while it surely owns them.**
  Every third of the shorter of the claim time and the slot lease, the
  consumer renews the claim on each entry whose handler runs (XCLAIM with the
  entry's known delivery count, only while it still owns it) and its slot
  lease, so a long job is not handed to a second consumer. A renewal sent at
  time t keeps the entry until t plus the claim time (and the lease). The work
  stops, its task cancelled and, should it still run, the handler's
  ``Delivery.ensure_owned()`` raising ``Lost`` before its next stage, as soon
  as a renewal finds the entry owned by another consumer or its slot given to
  another entry, or that deadline passes with no renewal: Redis unreachable, or
  this process paused (SIGSTOP, a frozen VM) for longer. The entry is left
  pending, its slot to lapse or to the entry's next owner, who resumes at the
  first uncommitted stage. A pause longer than the lease or claim time thus
  costs at most the stage it interrupted; a shorter one costs nothing.
* **Retries.** A transient failure is retried in place with exponential
  backoff and jitter; each retry counts as a delivery in the PEL (``XPENDING``
  shows it), written as an absolute count so that a command repeated after a
  lost reply counts once. An outage of our own services (PostgreSQL) is not the
  entry's fault: it is waited out with the same backoff, the entry held, and
  not counted.
* **Redelivery cap and dead letters.** A permanent failure, or a failure at
  delivery ``STREAMREC_MAX_DELIVERIES``, moves the entry to the dead-letter
  stream ``{ns}:dead`` with its original fields plus ``error``, ``attempts``,
  ``origin_id``, ``consumer`` and ``failed_at``, atomically with its XACK and
  XDEL, in one script that moves it only while it is still in the stream (a
  repeat writes no second letter). An entry reclaimed after more deliveries
  than the cap (it keeps killing its consumers) is dead-lettered without
  running again.
* **Per-business slots** (``streamrec.semaphore``, when configured). Before its
  handler runs, an entry takes a slot of its business (a lease renewed while it
  works, freed in the same call as its ack). An entry whose business is at its
  limit is parked off the stream atomically and woken, in order, when a slot
  frees; it holds no concurrency while it waits, and its delivery count
  travels with it. A woken entry is marked so (``woken``) and keeps its place:
  its reserved slot is held for it until it is read, however long the backlog.
  Slots freed without a release (a crashed holder) are found by a sweep that
  one consumer of the group runs per period, over the businesses due only.
* **Shutdown.** When ``stop`` is set the consumer stops reading, lets in-flight
  handlers finish within the grace period, cancels the rest and leaves their
  entries pending for reclaim; their slots are released.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError, ResponseError

from streamrec.aio import first, wait_set
from streamrec.delivery import DeadHook, Delivery, Handler, delivered
from streamrec.group import Group, ensure_group
from streamrec.keys import Keys
from streamrec.metrics import Metrics
from streamrec.retry import RetryPolicy, describe
from streamrec.runner import Runner
from streamrec.semaphore import Held, Slots
from streamrec.work import Work

log = structlog.get_logger("streamrec.consumer")

LEAVE_S = 5.0
"""How long a stopping consumer waits for its renewals to stop, and again to leave the group."""

__all__ = ["Consumer", "ConsumerConfig", "Delivery", "Handler", "ensure_group"]


class Taken(NamedTuple):
    """An entry just read or reclaimed, with its delivery count in the PEL."""

    delivery: Delivery
    claimed: int


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
        self._config = config
        self._metrics = metrics or Metrics()
        # In-flight is read when /metrics is scraped.
        self._metrics.in_flight.set_function(lambda: len(self._work))
        self._slots = slots
        self._group = Group(redis, keys, config.name)
        self._work: dict[str, Work] = {}
        """The entries in work, one per entry id: never two tasks for one entry."""
        # Refill in batches: read once a tenth of the concurrency is free, not per entry.
        self._low_water = max(1, min(config.concurrency // 10, 64))
        self._slot_freed = asyncio.Event()
        self._running = 0
        """Entries whose handler runs now: what the concurrency limit counts. An entry
        whose ack is on its way no longer counts, so reads overlap acks."""
        self._claim_s = config.claim_idle_ms / 1000
        # A blocking read's entries are delivered at some moment while it waits; their
        # claim is dated from the moment it was sent, so the wait must stay short of it.
        self._block_ms = max(1, min(config.block_ms, config.claim_idle_ms // 4))
        self._stop = asyncio.Event()
        self._next_reclaim = 0.0
        self._runner = Runner(
            redis=redis,
            keys=keys,
            group=self._group,
            handler=handler,
            policy=config.retry,
            claim_s=self._claim_s,
            free=self._done_running,
            on_dead=on_dead,
            metrics=self._metrics,
            slots=slots,
            log_fields=config.log_fields,
        )
        self.reclaim_passes = 0
        """Completed XAUTOCLAIM scans of the whole group's pending list."""

    @property
    def name(self) -> str:
        """This consumer's name in the group."""
        return self._config.name

    @property
    def processed(self) -> int:
        """Entries this consumer completed and acked."""
        return self._runner.processed

    @property
    def dead_lettered(self) -> int:
        """Entries this consumer moved to the dead letters."""
        return self._runner.dead_lettered

    @property
    def in_flight(self) -> int:
        """Entries this consumer is working on now."""
        return len(self._work)

    async def run(self, stop: asyncio.Event, *, until_idle: bool = False) -> None:
        """Consume until ``stop`` is set (or, with ``until_idle``, until nothing is left).

        Redis being unreachable is logged and retried; it does not end the loop.
        """
        self._stop = stop
        self._runner.stopping(stop)
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
            await self._leave(renewer)
            log.info("consumer_stopped", consumer=self.name, processed=self.processed)

    async def _leave(self, renewer: asyncio.Task[None]) -> None:
        """Stop renewing and leave the group, each within LEAVE_S: an exit is never held up.

        Both are courtesies (claims lapse and an empty consumer is pruned anyway),
        so a Redis that does not answer in time is given up on, and said so.
        """
        renewer.cancel()
        if (await asyncio.wait({renewer}, timeout=LEAVE_S))[1]:
            log.warning("renewer_not_stopped", waited_s=LEAVE_S)
        try:
            async with asyncio.timeout(LEAVE_S):
                await self._group.leave()
        except (RedisError, TimeoutError) as exc:
            log.warning("group_not_left", error=describe(exc))

    async def _idle(self) -> bool:
        if self._work:
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
        while self._config.concurrency - self._running < self._low_water:
            self._slot_freed.clear()
            await first(self._slot_freed.wait(), self._stop.wait())
            if self._stop.is_set():
                return 0
        free = self._config.concurrency - self._running
        claimed_at = time.monotonic()
        batch = await self._reclaim(free)
        if not batch:
            claimed_at = time.monotonic()
            batch = await self._read(free)
        slot_at = time.monotonic()
        for taken, held in await self._admit(batch):
            self._start(taken, held, claimed_at, slot_at)
        return len(batch)

    async def _read(self, count: int) -> list[Taken]:
        # While entries flow a plain read answers at once; only an empty stream
        # is waited on, and that wait gives way to a stop.
        entries = await self._group.read(count, None)
        if not entries:
            entries = await first(self._group.read(count, self._block_ms), self._stop.wait())
        # None: stopped while blocked. Should the read have been served anyway,
        # its entries sit in our PEL and are reclaimed like a crash's.
        return [Taken(delivered(i, fields, 1), 1) for i, fields in entries or []]

    async def _reclaim(self, count: int) -> list[Taken]:
        """Take over entries idle longer than the claim time, at most every third of it.

        An entry this process is still working on (its renewals failed for a
        while) is not started again: its claim is renewed with its true count.
        """
        now = time.monotonic()
        if now < self._next_reclaim:
            return []
        taken = await self._group.reclaim(self._config.claim_idle_ms, count)
        if taken.scan_done:
            self._next_reclaim = now + self._claim_s / 3
            self.reclaim_passes += 1
        if taken.deleted:
            log.warning("reclaimed_entries_gone", entry_ids=taken.deleted)
        ours = [self._work[i] for i, _ in taken.entries if i in self._work]
        if ours:
            log.warning("own_entries_reclaimed", entry_ids=[w.entry_id for w in ours])
            await self._renew_claims(ours)
        fresh = [(i, f) for i, f in taken.entries if i not in self._work]
        if not fresh:
            return []
        self._metrics.reclaimed.inc(len(fresh))
        log.info("entries_reclaimed", count=len(fresh), consumer=self.name)
        counts = taken.counts
        return [
            Taken(delivered(i, f, counts.get(i, 1), reclaimed=True), counts.get(i, 1))
            for i, f in fresh
        ]

    async def _admit(self, batch: list[Taken]) -> list[tuple[Taken, Held | None]]:
        """The entries that may run now, with their slots; the others were parked (or are gone)."""
        if self._slots is None or not batch:
            return [(taken, None) for taken in batch]
        admission = await self._slots.admit([taken.delivery for taken in batch])
        self._metrics.parked.inc(admission.parked)
        held = {h.entry_id: h for h in admission.held}
        return [
            (taken, held.get(taken.delivery.entry_id))
            for taken in batch
            if taken.delivery.entry_id not in admission.refused
        ]

    def _start(self, taken: Taken, held: Held | None, claimed_at: float, slot_at: float) -> None:
        entry_id = taken.delivery.entry_id
        assert entry_id not in self._work, f"entry {entry_id} is already in work"  # noqa: S101
        work = Work(taken.delivery, taken.claimed, claimed_at + self._claim_s, held)
        if held is not None and self._slots is not None:
            work.slot_until = slot_at + self._slots.lease_ms / 1000
        self._work[entry_id] = work
        self._running += 1
        work.arm()
        work.task = asyncio.create_task(self._runner.process(work))
        work.task.add_done_callback(lambda _: self._finished(work))

    def _finished(self, work: Work) -> None:
        if self._work.get(work.entry_id) is work:
            del self._work[work.entry_id]

    def _done_running(self, work: Work) -> None:
        if work.finish_running():
            self._running -= 1
            self._slot_freed.set()

    async def _renew_forever(self) -> None:
        """Keep claims and slot leases of running entries alive; sweep parked entries."""
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
        """One renewal: claims, then slot leases, then a sweep of parked entries.

        An entry whose claim or lease turns out lost is stopped at once.
        """
        await self._renew_claims([w for w in self._work.values() if w.running])
        if self._slots is None:
            return
        await self._renew_slots([w for w in self._work.values() if w.running and w.held])
        woken = await self._slots.sweep()
        if woken:
            log.info("parked_entries_woken", count=woken)

    async def _renew_claims(self, works: list[Work]) -> None:
        if not works:
            return
        sent = time.monotonic()
        counts = await self._group.renew([(w.entry_id, w.claimed) for w in works])
        lost = []
        for work, count in zip(works, counts, strict=True):
            if count >= 0:
                work.renewed(claim_until=sent + self._claim_s)
            elif count == -1:
                lost.append(work.entry_id)
                work.stop("claim lost: another consumer owns the entry")
        if lost:
            log.warning("claims_lost", entry_ids=lost)

    async def _renew_slots(self, works: list[Work]) -> None:
        assert self._slots is not None  # noqa: S101 - called only with slots on
        sent = time.monotonic()
        lost = set(await self._slots.renew([w.held for w in works if w.held is not None]))
        for work in works:
            if work.entry_id in lost:
                work.stop("slot lease lost: the slot went to another entry")
            else:
                work.renewed(slot_until=sent + self._slots.lease_ms / 1000)
        if lost:
            log.warning("slot_leases_lost", entry_ids=sorted(lost))

    async def _drain(self) -> None:
        """Let in-flight work finish within the grace period; cancel what is left."""
        tasks = [w.task for w in self._work.values() if w.task is not None]
        if not tasks:
            return
        log.info("draining", in_flight=len(tasks), grace_s=self._config.shutdown_grace_s)
        _, left = await asyncio.wait(tasks, timeout=self._config.shutdown_grace_s)
        for task in left:
            task.cancel()
        if left:
            await asyncio.wait(left)
            log.warning("left_for_reclaim", count=len(left))
