"""Reconcile benchmark: one run over a day of 100,000 recordings in the Twilio stand-in.

    .venv/bin/python bench/reconcile.py [--recordings 100000] [--lost 0.05] [--latency-ms 0]

The stand-in lists ``--recordings`` completed recordings created over the last
24 hours; all but the ``--lost`` share are known to streamrec already (a row in
PostgreSQL and a dedupe marker in Redis, as the webhook and a consumer leave
them). A first run enqueues the lost ones (looking up their calls); a second
finds everything known, which is what a scheduled run costs on a quiet day.
``--latency-ms`` makes the stand-in take that long per list page and per call,
as Twilio's API does (a few hundred ms). Redis and PostgreSQL are started for
the run on free ports; the figures are wall time, PostgreSQL queries and Redis
commands (``INFO commandstats``) per page.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import asyncpg
import redis.asyncio as aioredis

from streamrec import logging as logs
from streamrec import numbers, schema, twilio_api
from streamrec.devservers import LocalPostgres, LocalRedis
from streamrec.keys import Keys
from streamrec.producer import Enqueuer
from streamrec.reconcile import Outcome, Reconciler, Window
from tests.standins import ACCOUNT_SID, AUTH_TOKEN, MediaStandIn, call_sid, recording_sid

SHOP = "+15550100000"  # every call of the stand-in goes to it
BATCH = 10_000


class CountingPool:
    """An asyncpg pool that counts the queries sent through it."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.queries = 0

    async def fetch(self, *args: Any) -> Any:
        self.queries += 1
        return await self.pool.fetch(*args)


def fill(media: MediaStandIn, count: int) -> list[str]:
    """``count`` completed recordings created over the last 24 hours, newest last."""
    now = datetime.now(UTC)
    sids = [recording_sid() for _ in range(count)]
    for n, sid in enumerate(sids):
        media.rest.add(sid, call_sid(), created=now - timedelta(days=1) * (1 - n / count))
    return sids


async def know(redis: aioredis.Redis, pool: Any, keys: Keys, sids: list[str]) -> None:
    """Leave ``sids`` as processed recordings leave them: a marker and a completed row."""
    for start in range(0, len(sids), BATCH):
        part = sids[start : start + BATCH]
        async with redis.pipeline(transaction=False) as pipe:
            for sid in part:
                pipe.set(keys.seen(sid), "1700000000000-0", ex=3600)
            await pipe.execute()
        await pool.execute(
            "INSERT INTO recordings (recording_sid, call_sid, account_sid, business_id, status)"
            " SELECT sid, 'CA' || md5(sid), $2, 'shop', 'completed' FROM unnest($1::text[]) sid",
            part,
            ACCOUNT_SID,
        )


async def run_once(
    media: MediaStandIn, redis: aioredis.Redis, pool: CountingPool, keys: Keys, client: Any
) -> tuple[Outcome, dict[str, int]]:
    """One reconcile over the last day; its outcome and the Redis commands it sent."""
    await redis.config_resetstat()
    reconciler = Reconciler(
        api=twilio_api.TwilioApi(client),
        pool=pool,
        redis=redis,
        keys=keys,
        enqueuer=Enqueuer(redis, keys, dedupe_ttl_s=3600),
    )
    outcome = await reconciler.run(Window.since(24))
    stats = await redis.info("commandstats")
    commands = {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}
    commands.pop("config|resetstat", None)
    return outcome, commands


def show(label: str, outcome: Outcome, queries: int, commands: dict[str, int]) -> None:
    pages = max(outcome.pages, 1)
    print(
        f"{label}: {outcome.seconds:.1f} s for {outcome.listed:,} recordings in {outcome.pages}"
        f" pages ({outcome.listed / max(outcome.seconds, 1e-9):,.0f}/s); known {outcome.known:,},"
        f" enqueued {outcome.enqueued:,}, error {outcome.error}"
    )
    print(
        f"  per page: {queries / pages:.2f} PostgreSQL queries,"
        f" {commands.get('mget', 0) / pages:.2f} MGET,"
        f" {commands.get('evalsha', 0) / pages:.2f} enqueue calls;"
        f" Redis commands in all: {commands}"
    )


async def measure(args: argparse.Namespace, directory: Path) -> None:
    redis_server = LocalRedis(directory / "redis").start()
    postgres = LocalPostgres(directory / "postgres", durable=False).start()
    media = MediaStandIn()
    await media.start()
    redis = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    database = postgres.url("streamrec")
    await schema.migrate(database)
    pool = await asyncpg.create_pool(database, min_size=1, max_size=4)
    try:
        keys = Keys("bench-reconcile")
        await numbers.add(pool, SHOP, "shop")
        started = time.perf_counter()
        sids = fill(media, args.recordings)
        lost = int(len(sids) * args.lost)
        await know(redis, pool, keys, sids[lost:])
        built_s = time.perf_counter() - started
        print(f"built {len(sids):,} recordings, {lost:,} lost, in {built_s:.1f} s")
        media.rest.delay_s = args.latency_ms / 1000
        async with twilio_api.open_client(
            api_base=media.url, account_sid=ACCOUNT_SID, auth_token=AUTH_TOKEN
        ) as client:
            for label in ("first run (enqueues the lost)", "second run (all known)"):
                counting = CountingPool(pool)
                calls_before = sum(media.rest.call_requests.values())
                outcome, commands = await run_once(media, redis, counting, keys, client)
                show(label, outcome, counting.queries, commands)
                looked_up = sum(media.rest.call_requests.values()) - calls_before
                print(f"  call lookups: {looked_up:,}")
    finally:
        await pool.close()
        await redis.aclose()
        await media.close()
        postgres.stop()
        redis_server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recordings", type=int, default=100_000)
    parser.add_argument("--lost", type=float, default=0.05, help="share never called back")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="Twilio's time per answer")
    args = parser.parse_args()
    logs.configure(fmt="json", level="warning")
    directory = Path(tempfile.mkdtemp(prefix="streamrec-bench-reconcile-"))
    directory.chmod(0o755)  # PostgreSQL runs as its own user when this runs as root
    try:
        asyncio.run(measure(args, directory))
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
