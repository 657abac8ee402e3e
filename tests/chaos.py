"""The chaos run: signed callbacks through real processes while things get killed.

Sends signed RecordingStatusCallbacks (some twice, as Twilio's duplicates) to a
``serve`` process, through several ``consume`` processes, the way Twilio sends
them: one retry when the connection fails, none after an answer, so a callback
that meets an outage is lost at the edge (``tests/edge.py``). Each recording
joins the Twilio stand-in's Recordings list as its callback is sent, and the
consumers' scheduled reconciler brings in those whose callbacks were lost. Once
every consumer is at work it SIGKILLs a random consumer every few seconds
(starting a new one), SIGKILLs Redis once (AOF on) and restarts it, stops
PostgreSQL for a while, and stops ``serve`` for a while (a webhook outage); a
consumer that exits on its own is replaced, as compose's restart policy would.
Then it checks what came out: each recording enqueued once and completed,
downloaded and transcribed once plus once per consumer kill that caught it in
work, nothing left pending or parked, and no business ever with more recordings
in work than its slot limit. ``bench/chaos.py`` runs the long form; the test
suite runs a short one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import shutil
import signal
import subprocess
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from streamrec import numbers, schema
from streamrec.devservers import LocalPostgres, LocalRedis
from streamrec.keys import Keys
from streamrec.partitions import Layout
from streamrec.service import redis_client
from streamrec.settings import Settings
from tests.chaos_report import ChaosReport, most_ahead, order_inversions, starts_in_stream_order
from tests.cluster import LocalCluster
from tests.edge import Callbacks, Webhook, number_of
from tests.processes import spawn_consumer
from tests.standins import ACCOUNT_SID, AUTH_TOKEN, MediaStandIn, OpenAIStandIn, callback_params


@dataclass
class ChaosConfig:
    """How much load and how much violence."""

    recordings: int = 2_000
    duplicate_share: float = 0.25
    consumers: int = 3
    businesses: int = 5
    slot_limit: int = 3
    kill_every_s: float = 3.0
    consumer_kills: int = 1_000
    redis_kill_after_s: float = 4.0
    postgres_stop_after_s: float = 8.0
    postgres_down_s: float = 10.0
    webhook_outage_after_s: float = 12.0
    webhook_outage_s: float = 5.0
    webhook_outages: int = 1
    postgres_stops: int = 1
    give_up_s: float = 15.0
    """How long Twilio tries one callback (its ``tt``)."""
    retry_pause_s: float = 0.5
    """Twilio's pause before its one retry of a callback whose connection failed."""
    reconcile_interval_s: float = 2.0
    claim_idle_ms: int = 2_000
    slot_lease_ms: int = 2_000
    send_rate: float = 100.0
    """Callbacks sent per second (0: as fast as possible), so the violence meets load."""
    media_delay_s: float = 0.01
    transcribe_delay_s: float = 0.05
    timeout_s: float = 600.0
    seed: int = 7
    partitions: int = 1
    cluster: bool = False
    """Redis is a local cluster of 3 primaries and 3 replicas (``tests.cluster``); the Redis
    kill then kills the primary serving the most partitions, which its replica replaces,
    and restarts it (it rejoins as a replica)."""
    replica_acks: int = 0
    """STREAMREC_MIN_REPLICA_ACKS: callbacks are answered 2xx once on this many replicas."""


class Chaos:
    """One chaos run; use ``async with Chaos(config, directory) as chaos: await chaos.run()``."""

    def __init__(self, config: ChaosConfig, directory: Path) -> None:
        self.config = config
        self.directory = directory
        self.random = random.Random(config.seed)
        self.layout = Layout("chaos", config.partitions)
        self.keys = self.layout.home
        self.report = ChaosReport(slot_limit=config.slot_limit)
        self.redis_server: LocalRedis | LocalCluster = (
            LocalCluster(directory / "cluster")
            if config.cluster
            else LocalRedis(directory / "redis", appendonly=True)
        )
        self.postgres = LocalPostgres(directory / "postgres", durable=True)
        self.media = MediaStandIn()
        self.openai = OpenAIStandIn()
        self.consumers: dict[str, subprocess.Popen[bytes]] = {}
        self.webhook: Webhook | None = None
        self.callbacks: Callbacks | None = None
        self.settings: Settings | None = None
        self._serial = 0
        self.failed_over: list[Keys] = []
        """The partitions whose primary the run killed (a cluster run)."""
        self.killed_at = 0.0
        self.sids: list[str] = []
        self.sent_at: dict[str, float] = {}
        """When each recording's first callback was sent."""
        self.cuts: defaultdict[str, list[float]] = defaultdict(list)
        """Per RecordingSid, when each consumer kill that caught it in work was noted."""

    async def __aenter__(self) -> Chaos:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.directory.chmod(0o755)
        await asyncio.to_thread(self.redis_server.start)
        await asyncio.to_thread(self.postgres.start)
        await self.media.start()
        await self.openai.start()
        self.media.delay_s = self.config.media_delay_s
        self.openai.delay_s = self.config.transcribe_delay_s
        database = self.postgres.url("streamrec")
        await schema.migrate(database)
        self.settings = Settings(
            redis_url=self.redis_url,
            redis_cluster=self.config.cluster,
            partitions=self.config.partitions,
            min_replica_acks=self.config.replica_acks,
            database_url=database,
            twilio_account_sid=ACCOUNT_SID,
            twilio_auth_token=AUTH_TOKEN,
            twilio_api_base=self.media.url,
            openai_api_key="sk-test",
            openai_base_url=self.openai.url + "/v1",
            media_dir=self.directory / "media",
            namespace=self.keys.namespace,
            concurrency=16,
            claim_idle_ms=self.config.claim_idle_ms,
            slot_lease_ms=self.config.slot_lease_ms,
            business_slots=self.config.slot_limit,
            block_ms=500,
            retry_base_ms=50,
            retry_max_ms=1_000,
            shutdown_grace_s=5,
            metrics_port=0,
            heartbeat_s=1,
            reconcile_interval_s=self.config.reconcile_interval_s,
            _env_file=None,
        )
        conn = await asyncpg.connect(database)
        try:
            for n in range(self.config.businesses):
                await numbers.add(conn, number_of(f"b{n}"), f"b{n}")
        finally:
            await conn.close()
        self.webhook = Webhook(self.settings, self.directory)
        self.callbacks = Callbacks(
            self.webhook, self.media,
            give_up_s=self.config.give_up_s, pause_s=self.config.retry_pause_s,
        )  # fmt: skip
        return self

    async def __aexit__(self, *exc: object) -> None:
        for proc in self.consumers.values():
            if proc.poll() is None:
                proc.kill()
            await asyncio.to_thread(proc.wait)
        if self.webhook is not None:
            await asyncio.to_thread(self.webhook.kill)
        await self.media.close()
        await self.openai.close()
        await asyncio.to_thread(self.redis_server.stop)
        await asyncio.to_thread(self.postgres.stop)

    @property
    def redis_url(self) -> str:
        server = self.redis_server
        return server.seed_url if isinstance(server, LocalCluster) else server.url

    def _spawn(self) -> None:
        assert self.settings is not None
        name = f"c{self._serial}"
        self._serial += 1
        self.consumers[name] = spawn_consumer(self.settings, name, self.directory)

    async def run(self) -> ChaosReport:
        """Run the whole scenario and return the report."""
        started = time.monotonic()
        assert self.webhook is not None
        await self.webhook.start()
        for _ in range(self.config.consumers):
            self._spawn()
        redis = redis_client(self.redis_url, cluster=self.config.cluster)
        try:
            sender = asyncio.create_task(self._send_all())
            await self._until_at_work(redis, started)
            violence = asyncio.create_task(self._violence(redis, sender))
            outage = asyncio.create_task(self._webhook_outage())
            await asyncio.wait_for(sender, self.config.timeout_s)
            await outage
            await self._until_drained(redis, started)
            violence.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await violence
            await self._tally(redis)
        finally:
            await redis.aclose()
        self.report.seconds = time.monotonic() - started
        return self.report

    async def _until_at_work(self, redis: aioredis.Redis, started: float) -> None:
        """Wait until every consumer has entries pending, so the violence meets them at work."""
        names = set(self.consumers)
        while time.monotonic() < started + self.config.timeout_s:
            at_work = set()
            for part in self.layout:
                with contextlib.suppress(ResponseError):  # NOGROUP: no consumer started yet
                    summary = await redis.xpending(part.stream, part.group)
                    at_work |= {c["name"] for c in summary["consumers"] if int(c["pending"])}
            if names <= at_work:
                return
            await asyncio.sleep(0.05)
        raise RuntimeError("the consumers never got to work")

    async def _send_all(self) -> None:
        """Send every callback (a share twice) at the configured rate, each as Twilio would."""
        assert self.callbacks is not None
        sids = self.sids = [
            callback_params()["RecordingSid"] for _ in range(self.config.recordings)
        ]
        sends = list(sids) + self.random.sample(sids, int(len(sids) * self.config.duplicate_share))
        self.random.shuffle(sends)
        business = {sid: f"b{n % self.config.businesses}" for n, sid in enumerate(sids)}
        self.media.business_of.update(business)
        params = {sid: callback_params(sid) for sid in sids}
        self.report.unique = len(sids)
        connector = aiohttp.TCPConnector(limit=256)
        async with aiohttp.ClientSession(connector=connector) as session, asyncio.TaskGroup() as tg:
            for sid in sends:
                self.sent_at.setdefault(sid, time.monotonic())
                tg.create_task(self.callbacks.send(session, params[sid], business[sid]))
                self.report.sent += 1
                if self.config.send_rate:
                    await asyncio.sleep(1 / self.config.send_rate)  # pacing the load

    async def _violence(self, redis: aioredis.Redis, sender: asyncio.Task[None]) -> None:
        """Kill consumers on a schedule; kill Redis once; stop PostgreSQL once."""
        config = self.config
        begun = time.monotonic()
        redis_done = postgres_done = False
        next_kill = begun + config.kill_every_s
        while True:
            now = time.monotonic()
            if not redis_done and now - begun >= config.redis_kill_after_s:
                redis_done = True
                if isinstance(self.redis_server, LocalCluster):
                    await self._fail_over(self.redis_server)
                else:
                    await asyncio.to_thread(self.redis_server.kill)
                    await asyncio.to_thread(self.redis_server.start)
                self.report.redis_kills += 1
            if (
                not postgres_done
                and config.postgres_stops
                and now - begun >= config.postgres_stop_after_s
            ):
                postgres_done = True
                await asyncio.to_thread(self.postgres.stop)
                self.report.postgres_stops += 1
                await asyncio.sleep(config.postgres_down_s)  # the outage being simulated
                await asyncio.to_thread(self.postgres.start)
            if now >= next_kill and self.report.consumer_kills < config.consumer_kills:
                next_kill = now + config.kill_every_s
                await self._kill_a_consumer(redis)
            self._restart_exited()
            await asyncio.sleep(0.05)

    async def _fail_over(self, cluster: LocalCluster) -> None:
        """SIGKILL the primary serving the most partitions; its replica takes over. Once it
        has, start the killed node again: it rejoins as the new primary's replica."""
        served = Counter(cluster.primary_for(part.stream).port for part in self.layout)
        victim = next(n for n in cluster.primaries() if n.port == served.most_common(1)[0][0])
        self.failed_over = [p for p in self.layout if cluster.primary_for(p.stream) is victim]
        self.killed_at = time.monotonic()
        await asyncio.to_thread(cluster.kill, victim)
        await asyncio.to_thread(cluster.wait_promoted, victim)
        await asyncio.to_thread(cluster.restart, victim)

    async def _webhook_outage(self) -> None:
        """Stop serve for a while, once: the callbacks that meet the outage are lost at the edge."""
        assert self.webhook is not None
        if not self.config.webhook_outages:
            return
        await asyncio.sleep(self.config.webhook_outage_after_s)  # the violence's schedule
        await self.webhook.stop()
        self.report.webhook_outages += 1
        await asyncio.sleep(self.config.webhook_outage_s)  # the outage being simulated
        await self.webhook.start()

    def _restart_exited(self) -> None:
        """Replace consumers that exited on their own, as compose's restart policy would."""
        for name, proc in list(self.consumers.items()):
            if proc.poll() is not None:
                del self.consumers[name]
                self.report.consumer_exits += 1
                self._spawn()

    async def _kill_a_consumer(self, redis: aioredis.Redis) -> None:
        name = self.random.choice(sorted(self.consumers))
        proc = self.consumers.pop(name)
        proc.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        await asyncio.to_thread(proc.wait)
        self.report.consumer_kills += 1
        await self._note_interrupted(redis, name)
        self._spawn()
        asyncio.create_task(self._time_reclaim(redis, name, killed))  # noqa: RUF006 - bounded

    async def _note_interrupted(self, redis: aioredis.Redis, victim: str) -> None:
        """Note the recordings a killed consumer had in work: its pending entries.

        The cut is dated once the process is reaped and its pending list read, so
        the requests it sent before dying have reached the stand-ins; no other
        consumer can take its entries, or their slots, before two thirds of the
        claim idle time and lease have passed.
        """
        found: list[Any] = []
        for part in self.layout:
            stream, group = part.stream, part.group
            pending = await redis.xpending_range(stream, group, "-", "+", 10_000, victim)
            for entry in pending:
                found.append(await redis.xrange(stream, entry["message_id"], entry["message_id"]))
        cut = time.monotonic()
        for entries in found:
            for _, fields in entries:
                self.cuts[fields["recording_sid"]].append(cut)

    async def _time_reclaim(self, redis: aioredis.Redis, victim: str, killed: float) -> None:
        """How long until nothing is pending on the killed consumer any more."""
        deadline = killed + 120
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                pending = [
                    entry
                    for part in self.layout
                    for entry in await redis.xpending_range(
                        part.stream, part.group, "-", "+", 1, consumername=victim
                    )
                ]
                if not pending:
                    elapsed = time.monotonic() - killed
                    self.report.reclaim_times.append(elapsed)
                    self.report.longest_reclaim_s = max(self.report.longest_reclaim_s, elapsed)
                    return
            await asyncio.sleep(0.05)

    async def _until_drained(self, redis: aioredis.Redis, started: float) -> None:
        """Wait (with the run's deadline) until every recording is final and nothing waits."""
        deadline = started + self.config.timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                if await self._completed() == self.report.unique and not any(
                    [await redis.xlen(part.stream) for part in self.layout]
                    + [await redis.exists(part.parked_set) for part in self.layout]
                ):
                    return
            await asyncio.sleep(0.2)

    async def _origins(self) -> dict[str, str]:
        """Each row's origin: webhook, or reconcile (its callback was lost)."""
        assert self.settings is not None
        conn = await asyncpg.connect(self.settings.database_url)
        try:
            rows = await conn.fetch("SELECT recording_sid, origin FROM recordings")
        finally:
            await conn.close()
        return {r["recording_sid"]: r["origin"] for r in rows}

    async def _completed(self) -> int:
        assert self.settings is not None
        conn = await asyncpg.connect(self.settings.database_url)
        try:
            return int(
                await conn.fetchval("SELECT count(*) FROM recordings WHERE status = 'completed'")
            )
        finally:
            await conn.close()

    async def _tally(self, redis: aioredis.Redis) -> None:
        report = self.report
        report.completed = await self._completed()
        report.lost = report.unique - report.completed
        assert self.callbacks is not None
        origins = await self._origins()
        reconciled = {sid for sid, origin in origins.items() if origin == "reconcile"}
        report.reconciled = len(reconciled)
        report.lost_at_edge = self.callbacks.lost_at_edge(self.sids)
        report.callbacks_given_up = self.callbacks.given_up
        # Enqueued twice: answered "queued" twice, or answered "queued" and reconciled too.
        queued = self.callbacks.queued
        report.queued_not_once = sum(
            1 for sid in self.sids if queued[sid] + (sid in reconciled) > 1
        )
        for part in self.layout:
            report.dead_letters += int(await redis.xlen(part.dead))
            report.pending += int((await redis.xpending(part.stream, part.group))["pending"])
        for n in range(self.config.businesses):
            report.parked += int(await redis.llen(self.layout.of(f"b{n}").parked(f"b{n}")))
        report.work_stopped = self._stopped_cuts()
        report.count_work(self.sids, self.media, self.openai, self.cuts)
        starts = starts_in_stream_order(
            await self._entry_ids(), self.media.business_of, self.media.spans, self.cuts
        )
        report.order_inversions = order_inversions(starts)
        report.order_most_ahead = most_ahead(starts)
        if self.failed_over:
            report.failover_recovery_s = self._recovery_s()

    def _stopped_cuts(self) -> int:
        """Note the recordings whose work a live consumer gave up, dated when its log says
        so: ``work_stopped`` (its claim or slot lease could not be renewed in time, as
        through a failover) and ``entry_left_pending`` (Redis failed it between
        attempts); returns how many. The next owner repeats at most the stage it was in."""
        offset = time.time() - time.monotonic()
        stopped = 0
        for log in self.directory.glob("c*.log"):
            for line in log.read_text(errors="replace").splitlines():
                if '"work_stopped"' not in line and '"entry_left_pending"' not in line:
                    continue
                with contextlib.suppress(ValueError, KeyError):
                    event = json.loads(line)
                    at = datetime.fromisoformat(event["timestamp"]).timestamp() - offset
                    self.cuts[event["recording_sid"]].append(at)
                    stopped += 1
        return stopped

    def _recovery_s(self) -> float:
        """From the primary's kill to the first download of a recording sent after it whose
        business's partition the killed primary served (webhook, Redis and consumer all
        working again there)."""
        moved = {part.partition for part in self.failed_over}
        firsts = [
            min(begun for begun, _ in spans)
            for sid, spans in self.media.spans.items()
            if spans
            and self.sent_at.get(sid, 0.0) > self.killed_at
            and self.layout.of(self.media.business_of[sid]).partition in moved
        ]
        return min(firsts, default=float("nan")) - self.killed_at

    async def _entry_ids(self) -> dict[str, str]:
        """Each row's stream entry id: the order its business's partition gave it."""
        assert self.settings is not None
        conn = await asyncpg.connect(self.settings.database_url)
        try:
            rows = await conn.fetch("SELECT recording_sid, entry_id FROM recordings")
        finally:
            await conn.close()
        return {r["recording_sid"]: r["entry_id"] for r in rows if r["entry_id"]}


@contextlib.contextmanager
def scratch() -> Iterator[Path]:
    """A directory the postgres system user can enter, removed afterwards."""
    directory = Path(tempfile.mkdtemp(prefix="streamrec-chaos-"))
    directory.chmod(0o755)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


async def run(config: ChaosConfig) -> ChaosReport:
    """One chaos run in a scratch directory."""
    with scratch() as directory:
        async with Chaos(config, directory) as chaos:
            return await chaos.run()
