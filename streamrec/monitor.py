"""A consumer's housekeeping beside its read loop: heartbeat, gauges, progress line.

The heartbeat is an entry of the consumer registry: its expiry (Redis server
time) in the sorted set ``{ns}:consumers`` and JSON about the process in the
hash ``{ns}:heartbeats``, written together by one script that also prunes
expired members. ``streamrec check`` and ``status`` read the registry in one
round trip; they never SCAN the keyspace, which holds a marker per recording
of the last days. A consumer that stops removes its entry; a crashed one
expires three beats after its last. Every few
seconds the monitor also samples the group (pending, oldest pending age, lag,
dead letters) into the metrics, and now and then logs a ``consumer_progress``
line so a person watching the terminal sees the work move.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time

import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

from streamrec import lua, status
from streamrec.aio import wait_set
from streamrec.consumer import Consumer
from streamrec.keys import Keys
from streamrec.metrics import Metrics
from streamrec.retry import describe

log = structlog.get_logger("streamrec.monitor")


class Monitor:
    """Runs beside one Consumer until stopped; removes its heartbeat on the way out."""

    def __init__(
        self,
        *,
        redis: aioredis.Redis,
        keys: Keys,
        consumer: Consumer,
        metrics: Metrics,
        interval_s: float = 5.0,
        progress_s: float = 30.0,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._consumer = consumer
        self._metrics = metrics
        self._interval = interval_s
        self._progress_s = progress_s
        self._started_ms = int(time.time() * 1000)
        self._last_progress = (time.monotonic(), 0)
        self._beat = lua.register(redis, "monitor_beat")

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
                await self._beat(*self._beat_input(None))
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
            "dead_lettered": self._consumer.dead_lettered,
            "in_flight": self._consumer.in_flight,
        }
        await self._beat(*self._beat_input(beat))
        report = await status.collect(self._redis, self._keys, detail=False)
        self._metrics.pending.set(report["pending"])
        self._metrics.lag.set(report["lag"] or 0)
        self._metrics.dead_letters.set(report["dead_letters"])
        self._metrics.oldest_pending_age.set((report["oldest_pending_idle_ms"] or 0) / 1000)
        self._maybe_progress(report)

    def _beat_input(self, beat: dict[str, object] | None) -> tuple[list[str], list[str]]:
        """KEYS and ARGV of monitor_beat.lua (see its header); a beat of None leaves."""
        keys = [self._keys.consumers, self._keys.heartbeats]
        return keys, [self._consumer.name, str(self.ttl_ms), json.dumps(beat) if beat else ""]

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
