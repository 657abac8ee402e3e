"""A consumer's housekeeping beside its read loop: heartbeat, gauges, progress line.

The heartbeat is an entry of the consumer registry: its expiry (Redis server
time) in the sorted set ``{ns}:consumers`` and JSON about the process in the
hash ``{ns}:heartbeats``, written together by one script that also prunes
expired members. ``streamrec check`` and ``status`` read the registry in one
round trip; they never SCAN the keyspace, which holds a marker per recording
of the last days. A consumer that stops removes its entry; a crashed one
expires three beats after its last. The heartbeat carries the process's
counts, its rate over the last minute and its /metrics port.

The same script adds the outcomes of the consumer's entries since its last
beat (completed, failed attempts, dead-lettered) to counts per 10 s slot of
Redis time, kept for an hour, from which ``status`` shows the last minute and
hour of the whole group. A consumer that leaves counts its last ones on the
way out; one that is killed loses at most its last beat's worth.

The registry and the counts are deployment-wide (``layout.home``), whatever
the partitions. Every few seconds the monitor also samples the group (pending,
oldest pending age, lag, dead letters) into the metrics, over every partition
and per partition (the ``streamrec_partition_*`` gauges, labelled with its
index), and now and then logs a ``consumer_progress`` line so a person
watching the terminal sees the work move.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from collections import deque

import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

from streamrec import lua, status
from streamrec.aio import wait_set
from streamrec.consumer import Consumer
from streamrec.keys import Keys
from streamrec.metrics import Metrics
from streamrec.partitions import Layout, as_layout
from streamrec.retry import describe

log = structlog.get_logger("streamrec.monitor")


class Monitor:
    """Runs beside one Consumer until stopped; removes its heartbeat on the way out."""

    def __init__(
        self,
        *,
        redis: aioredis.Redis,
        layout: Keys | Layout,
        consumer: Consumer,
        metrics: Metrics,
        interval_s: float = 5.0,
        progress_s: float = 30.0,
        metrics_port: int | None = None,
    ) -> None:
        self._redis = redis
        self._layout = as_layout(layout)
        self._consumer = consumer
        self._metrics = metrics
        self._interval = interval_s
        self._progress_s = progress_s
        self._metrics_port = metrics_port
        self._rate = Rate()
        self._confirmed = dict.fromkeys(status.OUTCOMES, 0)
        """The running totals as of the last beat Redis confirmed."""
        self._started_ms = int(time.time() * 1000)
        self._last_progress = (time.monotonic(), 0)
        self._beat = lua.register(redis, "monitor_beat", "outcomes_prune")

    @property
    def ttl_ms(self) -> int:
        """How long a heartbeat lives without renewal: three beats, at least a second."""
        return max(int(self._interval * 3000), 1000)

    async def run(self, stop: asyncio.Event) -> None:
        """Beat and sample every interval until ``stop``."""
        try:
            while not stop.is_set():
                try:
                    await self.tick()
                except RedisError as exc:
                    log.warning("monitor_failed", error=describe(exc))
                await wait_set(stop, self._interval)
        finally:
            try:
                await self._send(None)
            except RedisError as exc:
                log.warning("heartbeat_not_removed", error=describe(exc))

    async def tick(self) -> None:
        """One heartbeat and one sample of the group."""
        beat = {
            "name": self._consumer.name,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started_ms": self._started_ms,
            "at_ms": int(time.time() * 1000),
            "processed": self._consumer.processed,
            "rate_per_s": self._rate.sample(self._consumer.processed, time.monotonic()),
            "failed": self._failed(),
            "dead_lettered": self._consumer.dead_lettered,
            "in_flight": self._consumer.in_flight,
            "metrics_port": self._metrics_port,
        }
        await self._send(beat)
        report = await status.collect(self._redis, self._layout, detail=False)
        self._metrics.sample(report)
        self._maybe_progress(report)

    def _failed(self) -> int:
        """Attempts of this process that failed and were retried (its metrics count them)."""
        return int(self._metrics.registry.get_sample_value("streamrec_retries_total") or 0)

    async def _send(self, beat: dict[str, object] | None) -> None:
        """Run monitor_beat.lua (see its header) with ``beat``, None to leave; it adds
        the outcomes since the last beat Redis confirmed."""
        totals = {
            "completed": self._consumer.processed,
            "failed": self._failed(),
            "dead_lettered": self._consumer.dead_lettered,
        }
        k = self._layout.home
        keys = [k.consumers, k.heartbeats, k.outcomes, k.outcome_slots, k.outcome_totals]
        args = [self._consumer.name, str(self.ttl_ms), json.dumps(beat) if beat else ""]
        args += [str(status.SLOT_MS), str(status.SLOTS_KEPT)]
        for outcome in status.OUTCOMES:
            args += [outcome, str(totals[outcome]), str(self._confirmed[outcome])]
        await self._beat(keys, args)
        self._confirmed = totals

    def _maybe_progress(self, report: dict[str, object]) -> None:
        now = time.monotonic()
        since, processed_then = self._last_progress
        if self._progress_s <= 0 or now - since < self._progress_s:
            return
        processed = self._consumer.processed
        self._last_progress = (now, processed)
        log.info(
            "consumer_progress",
            processed=processed,
            per_s=round((processed - processed_then) / (now - since), 1),
            in_flight=self._consumer.in_flight,
            pending=report["pending"],
            lag=report["lag"],
            dead_letters=report["dead_letters"],
        )


class Rate:
    """Events per second over the last minute, from samples of a running count."""

    def __init__(self, window_s: float = 60.0) -> None:
        self._window_s = window_s
        self._samples: deque[tuple[float, int]] = deque()

    def sample(self, count: int, now: float) -> float:
        """Add ``count`` as of ``now`` (monotonic seconds); the rate since the newest sample
        at least a window old, or the first one (0.0 from a single sample)."""
        self._samples.append((now, count))
        while len(self._samples) > 1 and now - self._samples[1][0] >= self._window_s:
            self._samples.popleft()
        since, before = self._samples[0]
        return round((count - before) / (now - since), 2) if now > since else 0.0
