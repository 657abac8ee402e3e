"""The chaos run: signed callbacks through real processes while things get killed.

Sends signed RecordingStatusCallbacks (some twice, as Twilio retries do) to a
``serve`` process, through several ``consume`` processes, while it SIGKILLs a
random consumer every few seconds (starting a new one), SIGKILLs Redis once
(AOF on) and restarts it, and stops PostgreSQL for a while. Then it checks what
came out: nothing lost, no duplicate rows, nothing left pending, slot limits
held. ``bench/chaos.py`` runs the long form; the test suite runs a short one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp
import asyncpg
import redis.asyncio as aioredis

from streamrec import store
from streamrec.devservers import LocalPostgres, LocalRedis, free_port
from streamrec.keys import Keys
from streamrec.producer import WEBHOOK_PATH
from streamrec.service import redis_client
from streamrec.settings import Settings
from tests.processes import environment, spawn_consumer
from tests.standins import (
    ACCOUNT_SID,
    AUTH_TOKEN,
    MediaStandIn,
    OpenAIStandIn,
    callback_params,
    sign,
)


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
    claim_idle_ms: int = 2_000
    slot_lease_ms: int = 2_000
    send_rate: float = 100.0
    """Callbacks sent per second (0: as fast as possible), so the violence meets load."""
    media_delay_s: float = 0.01
    transcribe_delay_s: float = 0.05
    timeout_s: float = 600.0
    seed: int = 7


@dataclass
class ChaosReport:
    """What the run found; ``ok`` says whether every promise held."""

    sent: int = 0
    unique: int = 0
    completed: int = 0
    lost: int = 0
    duplicate_rows: int = 0
    dead_letters: int = 0
    extra_downloads: int = 0
    extra_transcriptions: int = 0
    consumer_kills: int = 0
    redis_kills: int = 0
    postgres_stops: int = 0
    longest_reclaim_s: float = 0.0
    pending: int = 0
    parked: int = 0
    slot_peak: int = 0
    slot_limit: int = 0
    seconds: float = 0.0
    webhook_retries: int = 0
    reclaim_times: list[float] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (
            self.lost == 0
            and self.duplicate_rows == 0
            and self.pending == 0
            and self.parked == 0
            and self.slot_peak <= self.slot_limit
        )

    def render(self) -> str:
        rows = {k: v for k, v in asdict(self).items() if k != "reclaim_times"}
        width = max(len(k) for k in rows)
        lines = [f"  {k:<{width}}  {v:.2f}" if isinstance(v, float) else f"  {k:<{width}}  {v}"
                 for k, v in rows.items()]  # fmt: skip
        lines.append(f"  {'verdict':<{width}}  {'OK' if self.ok else 'FAILED'}")
        return "\n".join(lines)


class Chaos:
    """One chaos run; use ``async with Chaos(config, directory) as chaos: await chaos.run()``."""

    def __init__(self, config: ChaosConfig, directory: Path) -> None:
        self.config = config
        self.directory = directory
        self.random = random.Random(config.seed)
        self.keys = Keys("chaos")
        self.report = ChaosReport(slot_limit=config.slot_limit)
        self.redis_server = LocalRedis(directory / "redis", appendonly=True)
        self.postgres = LocalPostgres(directory / "postgres", durable=True)
        self.media = MediaStandIn()
        self.openai = OpenAIStandIn()
        self.consumers: dict[str, subprocess.Popen[bytes]] = {}
        self.serve: subprocess.Popen[bytes] | None = None
        self.settings: Settings | None = None
        self.port = free_port()
        self._serial = 0

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
        await store.migrate(database)
        self.settings = Settings(
            redis_url=self.redis_server.url,
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
            _env_file=None,
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        for proc in [*self.consumers.values(), *([self.serve] if self.serve else [])]:
            if proc.poll() is None:
                proc.kill()
            await asyncio.to_thread(proc.wait)
        await self.media.close()
        await self.openai.close()
        await asyncio.to_thread(self.redis_server.stop)
        await asyncio.to_thread(self.postgres.stop)

    def _spawn(self) -> None:
        assert self.settings is not None
        name = f"c{self._serial}"
        self._serial += 1
        self.consumers[name] = spawn_consumer(self.settings, name, self.directory)

    def _launch_serve(self) -> None:
        assert self.settings is not None
        env = environment(
            self.settings,
            STREAMREC_HTTP_HOST="127.0.0.1",
            STREAMREC_HTTP_PORT=str(self.port),
            STREAMREC_PUBLIC_URL=self._base,
        )
        log = (self.directory / "serve.log").open("ab")
        self.serve = subprocess.Popen(
            [sys.executable, "-m", "streamrec", "serve"],
            env=env, cwd=self.directory, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip

    async def _start_serve(self) -> None:
        self._launch_serve()
        async with aiohttp.ClientSession() as session:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(self._base + "/healthz") as response:
                        if response.status == 200:
                            return
                await asyncio.sleep(0.05)
        raise RuntimeError("serve did not come up")

    @property
    def _base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def run(self) -> ChaosReport:
        """Run the whole scenario and return the report."""
        started = time.monotonic()
        await self._start_serve()
        for _ in range(self.config.consumers):
            self._spawn()
        redis = redis_client(self.redis_server.url)
        try:
            sender = asyncio.create_task(self._send_all())
            violence = asyncio.create_task(self._violence(redis, sender))
            await asyncio.wait_for(sender, self.config.timeout_s)
            await self._until_drained(redis, started)
            violence.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await violence
            await self._tally(redis)
        finally:
            await redis.aclose()
        self.report.seconds = time.monotonic() - started
        return self.report

    async def _send_all(self) -> None:
        """Post every callback until it is accepted, like Twilio retrying on errors."""
        sids = [callback_params()["RecordingSid"] for _ in range(self.config.recordings)]
        sends = list(sids) + self.random.sample(sids, int(len(sids) * self.config.duplicate_share))
        self.random.shuffle(sends)
        business = {sid: f"b{n % self.config.businesses}" for n, sid in enumerate(sids)}
        for sid, name in business.items():
            self.media.business_of[sid] = name
        params = {sid: callback_params(sid) for sid in sids}
        queue: asyncio.Queue[str | None] = asyncio.Queue()
        self.report.unique = len(sids)
        senders = 16
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            workers = [
                asyncio.create_task(self._sender(session, queue, params, business))
                for _ in range(senders)
            ]
            for sid in sends:
                queue.put_nowait(sid)
                if self.config.send_rate:
                    await asyncio.sleep(1 / self.config.send_rate)  # pacing the load
            for _ in range(senders):
                queue.put_nowait(None)
            await asyncio.gather(*workers)

    async def _sender(
        self,
        session: aiohttp.ClientSession,
        queue: asyncio.Queue[str | None],
        params: dict[str, dict[str, str]],
        business: dict[str, str],
    ) -> None:
        while (sid := await queue.get()) is not None:
            path = f"{WEBHOOK_PATH}?business_id={business[sid]}"
            headers = {"X-Twilio-Signature": sign(self._base + path, params[sid])}
            delay = 0.05
            while True:
                try:
                    async with session.post(
                        self._base + path, data=params[sid], headers=headers
                    ) as response:
                        if response.status == 200:
                            break
                except (aiohttp.ClientError, TimeoutError):
                    pass
                self.report.webhook_retries += 1
                await asyncio.sleep(delay)  # Twilio's retry interval, shortened
                delay = min(delay * 2, 1.0)
            self.report.sent += 1

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
                await asyncio.to_thread(self.redis_server.kill)
                await asyncio.to_thread(self.redis_server.start)
                self.report.redis_kills += 1
            if not postgres_done and now - begun >= config.postgres_stop_after_s:
                postgres_done = True
                await asyncio.to_thread(self.postgres.stop)
                self.report.postgres_stops += 1
                await asyncio.sleep(config.postgres_down_s)  # the outage being simulated
                await asyncio.to_thread(self.postgres.start)
            if now >= next_kill and self.report.consumer_kills < config.consumer_kills:
                next_kill = now + config.kill_every_s
                await self._kill_a_consumer(redis)
            await asyncio.sleep(0.05)

    async def _kill_a_consumer(self, redis: aioredis.Redis) -> None:
        name = self.random.choice(sorted(self.consumers))
        proc = self.consumers.pop(name)
        proc.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        await asyncio.to_thread(proc.wait)
        self.report.consumer_kills += 1
        self._spawn()
        asyncio.create_task(self._time_reclaim(redis, name, killed))  # noqa: RUF006 - bounded

    async def _time_reclaim(self, redis: aioredis.Redis, victim: str, killed: float) -> None:
        """How long until nothing is pending on the killed consumer any more."""
        deadline = killed + 120
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                pending = await redis.xpending_range(
                    self.keys.stream, self.keys.group, "-", "+", 1, consumername=victim
                )
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
                if (
                    await self._completed() == self.report.unique
                    and await redis.xlen(self.keys.stream) == 0
                    and not await redis.exists(self.keys.parked_set)
                ):
                    return
            await asyncio.sleep(0.2)

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
        assert self.settings is not None
        conn = await asyncpg.connect(self.settings.database_url)
        try:
            total, distinct, done = await conn.fetchrow(
                "SELECT count(*), count(DISTINCT recording_sid),"
                " count(*) FILTER (WHERE status = 'completed') FROM recordings"
            )
        finally:
            await conn.close()
        report = self.report
        report.completed = int(done)
        report.lost = report.unique - int(done)
        report.duplicate_rows = int(total) - int(distinct)
        report.dead_letters = int(await redis.xlen(self.keys.dead))
        report.pending = int((await redis.xpending(self.keys.stream, self.keys.group))["pending"])
        for n in range(self.config.businesses):
            report.parked += int(await redis.llen(self.keys.parked(f"b{n}")))
        report.extra_downloads = sum(self.media.served.values()) - report.unique
        report.extra_transcriptions = sum(self.openai.calls.values()) - report.unique
        report.slot_peak = max(self.media.peak.values(), default=0)


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


def as_json(report: ChaosReport) -> str:
    """The report as JSON, for machines."""
    return json.dumps({**asdict(report), "ok": report.ok}, indent=2)
