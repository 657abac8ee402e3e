"""One partition's share of a consumer: its group, reads, reclaims, entries in work.

A consumer process serves every partition of its namespace with one ``Lane``
each (one lane without partitions). A lane reads and reclaims its own stream,
admits through its own partition's slots, and runs and acks its own entries;
the lanes share the process's concurrency through a ``Budget``. The delivery
contract they keep is the docstring of ``streamrec.consumer``.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import NamedTuple

import redis.asyncio as aioredis
import structlog

from streamrec.aio import first
from streamrec.confirm import Confirmer
from streamrec.delivery import DeadHook, Delivery, Handler, delivered
from streamrec.group import Group
from streamrec.keys import Keys
from streamrec.metrics import Metrics
from streamrec.retry import RetryPolicy
from streamrec.runner import Runner
from streamrec.semaphore import Held, Slots
from streamrec.work import Work

log = structlog.get_logger("streamrec.consumer")


class Taken(NamedTuple):
    """An entry just read or reclaimed, with its delivery count in the PEL."""

    delivery: Delivery
    claimed: int


class Budget:
    """How many handlers may run at once in this process, shared by its lanes.

    Entries being read count from the moment their read is sent (the read's
    count is reserved), so lanes reading at the same time never take more than
    is free. A lane takes ``share()`` at a time: all that is free when it is the
    only lane reading, at most an even part of the limit when several are, so a
    partition with a backlog cannot starve the others. A lane whose stream was empty waits in a
    blocking read for one entry, reserving nothing: with several partitions the
    count can pass the limit by at most one per other lane, when idle partitions
    receive at once, and no read is sent until it is back under.
    """

    def __init__(self, limit: int, lanes: int) -> None:
        self.limit = limit
        self.lanes = lanes
        self.running = 0
        self.blocked = 0
        """Lanes waiting in a blocking read now."""
        self.freed = asyncio.Event()
        # Refill in batches: read once a tenth of the concurrency is free, not per entry.
        self.low_water = max(1, min(limit // 10, 64))

    @property
    def free(self) -> int:
        return self.limit - self.running

    def share(self) -> int:
        """What one lane may read now: what is free, up to an even part of the limit among
        the lanes reading (all of it for the only one), so each read stays as large as
        fairness allows."""
        readers = max(1, self.lanes - self.blocked)
        return max(1, min(self.free, math.ceil(self.limit / readers)))

    def take(self, count: int) -> None:
        self.running += count

    def give(self, count: int) -> None:
        self.running -= count
        self.freed.set()


class Lane:
    """The entries of one partition, for one consumer."""

    def __init__(
        self,
        *,
        redis: aioredis.Redis,
        keys: Keys,
        name: str,
        handler: Handler,
        budget: Budget,
        policy: RetryPolicy,
        claim_idle_ms: int,
        block_ms: int,
        on_dead: DeadHook | None,
        metrics: Metrics,
        slots: Slots | None,
        log_fields: tuple[str, ...],
        tagged: bool,
        confirm: Confirmer | None = None,
    ) -> None:
        self.keys = keys
        self.name = name
        self.slots = slots
        self.group = Group(redis, keys, name)
        self.work: dict[str, Work] = {}
        """The entries in work, one per entry id: never two tasks for one entry."""
        self._budget = budget
        self._confirm = confirm
        """With replica acks: what the lane acts on is on the replicas first."""
        self._metrics = metrics
        self._claim_idle_ms = claim_idle_ms
        self._claim_s = claim_idle_ms / 1000
        # A blocking read's entries are delivered at some moment while it waits; their
        # claim is dated from the moment it was sent, so the wait must stay short of it.
        self._block_ms = max(1, min(block_ms, claim_idle_ms // 4))
        self._stop = asyncio.Event()
        self._next_reclaim = 0.0
        self.runner = Runner(
            redis=redis,
            keys=keys,
            group=self.group,
            handler=handler,
            policy=policy,
            claim_s=self._claim_s,
            free=self._done_running,
            on_dead=on_dead,
            metrics=metrics,
            slots=slots,
            log_fields=log_fields,
            partition=keys.partition if tagged else None,
        )
        self.reclaim_passes = 0
        """Completed XAUTOCLAIM scans of this partition's pending list."""

    def stopping(self, stop: asyncio.Event) -> None:
        self._stop = stop
        self.runner.stopping(stop)

    async def idle(self) -> bool:
        """Nothing in work and nothing parked in this partition."""
        if self.work:
            return False
        return self.slots is None or await self.slots.parked_total() == 0

    async def fill(self) -> int:
        """Wait for free concurrency, take entries (reclaim first, else read), start them.

        Returns how many entries were taken, started or parked.
        """
        budget = self._budget
        while budget.free < budget.low_water:
            budget.freed.clear()
            await first(budget.freed.wait(), self._stop.wait())
            if self._stop.is_set():
                return 0
        count = budget.share()
        budget.take(count)
        try:
            claimed_at = time.monotonic()
            batch = await self._reclaim(count)
            if not batch:
                claimed_at = time.monotonic()
                batch = await self._read(count)
            slot_at = time.monotonic()
            admitted = await self._admit(batch)
            if batch and self._confirm is not None:
                # Unconfirmed: nothing starts; the entries and slots lapse to a reclaim.
                await self._confirm(self.keys)
            for taken, held in admitted:
                self._start(taken, held, claimed_at, slot_at)
        finally:
            budget.give(count)
        return len(batch)

    async def _read(self, count: int) -> list[Taken]:
        # While entries flow a plain read answers at once; only an empty stream
        # is waited on, and that wait gives way to a stop.
        entries: list[tuple[str, dict[str, str]]] | None = await self.group.read(count, None)
        if not entries:
            entries = await self._wait(count)
        # None: stopped while blocked. Should the read have been served anyway,
        # its entries sit in our PEL and are reclaimed like a crash's.
        return [Taken(delivered(i, fields, 1), 1) for i, fields in entries or []]

    async def _wait(self, count: int) -> list[tuple[str, dict[str, str]]] | None:
        """A blocking read; beside other lanes, for one entry and reserving none."""
        budget = self._budget
        entries: list[tuple[str, dict[str, str]]] | None
        if budget.lanes == 1:
            entries = await first(self.group.read(count, self._block_ms), self._stop.wait())
            return entries
        budget.give(count)
        budget.blocked += 1
        try:
            entries = await first(self.group.read(1, self._block_ms), self._stop.wait())
            return entries
        finally:
            budget.blocked -= 1
            budget.take(count)

    async def _reclaim(self, count: int) -> list[Taken]:
        """Take over entries idle longer than the claim time, at most every third of it.

        An entry this process is still working on (its renewals failed for a
        while) is not started again: its claim is renewed with its true count.
        """
        now = time.monotonic()
        if now < self._next_reclaim:
            return []
        taken = await self.group.reclaim(self._claim_idle_ms, count)
        if taken.scan_done:
            self._next_reclaim = now + self._claim_s / 3
            self.reclaim_passes += 1
        if taken.deleted:
            log.warning("reclaimed_entries_gone", entry_ids=taken.deleted)
        ours = [self.work[i] for i, _ in taken.entries if i in self.work]
        if ours:
            log.warning("own_entries_reclaimed", entry_ids=[w.entry_id for w in ours])
            await self.renew_claims(ours)
        fresh = [(i, f) for i, f in taken.entries if i not in self.work]
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
        if self.slots is None or not batch:
            return [(taken, None) for taken in batch]
        admission = await self.slots.admit([taken.delivery for taken in batch])
        self._metrics.parked.inc(admission.parked)
        held = {h.entry_id: h for h in admission.held}
        return [
            (taken, held.get(taken.delivery.entry_id))
            for taken in batch
            if taken.delivery.entry_id not in admission.refused
        ]

    def _start(self, taken: Taken, held: Held | None, claimed_at: float, slot_at: float) -> None:
        entry_id = taken.delivery.entry_id
        assert entry_id not in self.work, f"entry {entry_id} is already in work"  # noqa: S101
        work = Work(taken.delivery, taken.claimed, claimed_at + self._claim_s, held)
        if held is not None and self.slots is not None:
            work.slot_until = slot_at + self.slots.lease_ms / 1000
        self.work[entry_id] = work
        self._budget.take(1)
        work.arm()
        work.task = asyncio.create_task(self.runner.process(work))
        work.task.add_done_callback(lambda _: self._finished(work))

    def _finished(self, work: Work) -> None:
        if self.work.get(work.entry_id) is work:
            del self.work[work.entry_id]

    def _done_running(self, work: Work) -> None:
        if work.finish_running():
            self._budget.give(1)

    async def renew(self) -> None:
        """One renewal: claims, then slot leases, then a sweep of parked entries.

        An entry whose claim or lease turns out lost is stopped at once.
        """
        await self.renew_claims([w for w in self.work.values() if w.running])
        if self.slots is None:
            return
        await self._renew_slots([w for w in self.work.values() if w.running and w.held])
        woken = await self.slots.sweep()
        if woken:
            log.info("parked_entries_woken", count=woken, partition=self.keys.partition)

    async def renew_claims(self, works: list[Work]) -> None:
        if not works:
            return
        sent = time.monotonic()
        counts = await self.group.renew([(w.entry_id, w.claimed) for w in works])
        if self._confirm is not None:
            await self._confirm(self.keys)  # a renewal counts once the replicas have it
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
        assert self.slots is not None  # noqa: S101 - called only with slots on
        sent = time.monotonic()
        lost = set(await self.slots.renew([w.held for w in works if w.held is not None]))
        if self._confirm is not None:
            await self._confirm(self.keys)
        for work in works:
            if work.entry_id in lost:
                work.stop("slot lease lost: the slot went to another entry")
            else:
                work.renewed(slot_until=sent + self.slots.lease_ms / 1000)
        if lost:
            log.warning("slot_leases_lost", entry_ids=sorted(lost))
