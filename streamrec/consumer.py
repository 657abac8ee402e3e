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
* **Partitions** (``streamrec.partitions``, ``STREAMREC_PARTITIONS`` above 1).
  Each partition is a stream and group of its own, and everything above holds
  per partition: a consumer serves them all, one read loop each
  (``streamrec.lane``), sharing its concurrency; an entry's claim, slot, retries
  and dead letter stay in its own partition, which its business fixes. On a
  Redis Cluster a partition whose server fails stops only its own loop, which
  retries until the cluster has promoted a replica.
* **Shutdown.** When ``stop`` is set the consumer stops reading, lets in-flight
  handlers finish within the grace period, cancels the rest and leaves their
  entries pending for reclaim; their slots are released.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError, ResponseError

from streamrec.aio import wait_set
from streamrec.confirm import Confirmer
from streamrec.delivery import DeadHook, Delivery, Handler
from streamrec.group import ensure_group
from streamrec.keys import Keys
from streamrec.lane import Budget, Lane
from streamrec.metrics import Metrics
from streamrec.partitions import Layout
from streamrec.retry import RetryPolicy, describe
from streamrec.semaphore import Slots

log = structlog.get_logger("streamrec.consumer")

LEAVE_S = 5.0
"""How long a stopping consumer waits for its renewals to stop, and again to leave the group."""

__all__ = ["Consumer", "ConsumerConfig", "Delivery", "Handler", "ensure_group"]


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
    replica_acks: int = 0
    """Replicas that must have a partition's reads, slots and renewals before they are
    acted on (``streamrec.confirm``); 0: none asked."""
    confirm_ms: int = 1_000
    """How long one confirmation may wait for them."""


class Consumer:
    """Runs ``handler`` for the entries of the stream, as one consumer of the group.

    ``keys`` is one partition's keys, or a ``Layout``: then the consumer serves
    every partition, one ``Lane`` each, and ``slots`` (given for any one
    partition) is used on each partition's keys.
    """

    def __init__(
        self,
        *,
        redis: aioredis.Redis,
        keys: Keys | Layout,
        handler: Handler,
        config: ConsumerConfig,
        on_dead: DeadHook | None = None,
        metrics: Metrics | None = None,
        slots: Slots | None = None,
    ) -> None:
        self._config = config
        self._metrics = metrics or Metrics()
        partitions = list(keys) if isinstance(keys, Layout) else [keys]
        tagged = isinstance(keys, Layout) and keys.partitioned
        self._budget = Budget(config.concurrency, len(partitions))
        confirm = None
        if config.replica_acks:
            confirm = Confirmer(
                redis, replicas=config.replica_acks, wait_ms=config.confirm_ms, name=config.name
            )
        self.lanes = [
            Lane(
                redis=redis,
                keys=part,
                name=config.name,
                handler=handler,
                budget=self._budget,
                policy=config.retry,
                claim_idle_ms=config.claim_idle_ms,
                block_ms=config.block_ms,
                on_dead=on_dead,
                metrics=self._metrics,
                slots=None if slots is None else slots.on(part),
                log_fields=config.log_fields,
                tagged=tagged,
                confirm=confirm,
            )
            for part in partitions
        ]
        # In-flight is read when /metrics is scraped.
        self._metrics.in_flight.set_function(lambda: self.in_flight)
        self._claim_s = config.claim_idle_ms / 1000
        self._stop = asyncio.Event()

    @property
    def name(self) -> str:
        """This consumer's name in the group."""
        return self._config.name

    @property
    def processed(self) -> int:
        """Entries this consumer completed and acked."""
        return sum(lane.runner.processed for lane in self.lanes)

    @property
    def dead_lettered(self) -> int:
        """Entries this consumer moved to the dead letters."""
        return sum(lane.runner.dead_lettered for lane in self.lanes)

    @property
    def in_flight(self) -> int:
        """Entries this consumer is working on now."""
        return sum(len(lane.work) for lane in self.lanes)

    @property
    def reclaim_passes(self) -> int:
        """Completed XAUTOCLAIM scans of the pending list of every partition."""
        return min(lane.reclaim_passes for lane in self.lanes)

    async def run(self, stop: asyncio.Event, *, until_idle: bool = False) -> None:
        """Consume until ``stop`` is set (or, with ``until_idle``, until nothing is left).

        Redis being unreachable is logged and retried; it does not end the loop.
        With partitions, each is read by its own loop, so one partition's
        server failing holds up none of the others.
        """
        self._stop = stop
        for lane in self.lanes:
            lane.stopping(stop)
        log.info(
            "consumer_started",
            consumer=self.name,
            concurrency=self._config.concurrency,
            partitions=len(self.lanes),
            event_loop=type(asyncio.get_running_loop()).__module__.split(".")[0],
        )
        renewer = asyncio.create_task(self._renew_forever())
        try:
            await asyncio.gather(*(self._serve(lane, until_idle) for lane in self.lanes))
        finally:
            await self._drain()
            await self._leave(renewer)
            log.info("consumer_stopped", consumer=self.name, processed=self.processed)

    async def _serve(self, lane: Lane, until_idle: bool) -> None:
        """Fill ``lane`` until stopped (or idle), riding out Redis failures; its group is
        made first (a partition whose server fails over as the consumer starts waits)."""
        failures = 0
        ready = False
        while not self._stop.is_set():
            try:
                if not ready:
                    await lane.group.ensure()
                    ready = True
                taken = await lane.fill()
                failures = 0
                if until_idle and not taken and await lane.idle():
                    return
            except RedisError as exc:
                failures += 1
                await self._recover(lane, exc, failures)

    async def _leave(self, renewer: asyncio.Task[None]) -> None:
        """Stop renewing and leave the groups, each within LEAVE_S: an exit is never held up.

        Both are courtesies (claims lapse and an empty consumer is pruned anyway),
        so a Redis that does not answer in time is given up on, and said so.
        """
        renewer.cancel()
        if (await asyncio.wait({renewer}, timeout=LEAVE_S))[1]:
            log.warning("renewer_not_stopped", waited_s=LEAVE_S)
        try:
            async with asyncio.timeout(LEAVE_S):
                await asyncio.gather(*(lane.group.leave() for lane in self.lanes))
        except (RedisError, TimeoutError) as exc:
            log.warning("group_not_left", error=describe(exc))

    async def _recover(self, lane: Lane, error: RedisError, failures: int) -> None:
        """Back off after a Redis failure; recreate the group if it vanished."""
        if isinstance(error, ResponseError) and "NOGROUP" in str(error):
            # The stream or group is gone: a Redis restarted without persistence.
            log.warning("group_missing", error=describe(error), partition=lane.keys.partition)
            with contextlib.suppress(RedisError):
                await lane.group.ensure()
                return
        log.warning(
            "redis_unavailable",
            error=describe(error),
            failures=failures,
            partition=lane.keys.partition,
        )
        await wait_set(self._stop, min(0.1 * 2**failures, 5.0))

    async def _renew_forever(self) -> None:
        """Keep claims and slot leases of running entries alive; sweep parked entries."""
        period_ms = self._config.claim_idle_ms
        leases = [lane.slots.lease_ms for lane in self.lanes if lane.slots is not None]
        period_ms = min([period_ms, *leases])
        while True:
            await asyncio.sleep(period_ms / 3000)
            await self.renew()

    async def renew(self) -> None:
        """One renewal of every partition: claims, then slot leases, then a sweep of parked
        entries. An entry whose claim or lease turns out lost is stopped at once; a
        partition whose server fails is logged and left to the next renewal."""
        results = await asyncio.gather(
            *(lane.renew() for lane in self.lanes), return_exceptions=True
        )
        for lane, result in zip(self.lanes, results, strict=True):
            if isinstance(result, RedisError):
                log.warning("renewal_failed", error=describe(result), partition=lane.keys.partition)
            elif isinstance(result, BaseException):
                raise result

    async def _drain(self) -> None:
        """Let in-flight work finish within the grace period; cancel what is left."""
        tasks = [w.task for lane in self.lanes for w in lane.work.values() if w.task is not None]
        if not tasks:
            return
        log.info("draining", in_flight=len(tasks), grace_s=self._config.shutdown_grace_s)
        _, left = await asyncio.wait(tasks, timeout=self._config.shutdown_grace_s)
        for task in left:
            task.cancel()
        if left:
            await asyncio.wait(left)
            log.warning("left_for_reclaim", count=len(left))
