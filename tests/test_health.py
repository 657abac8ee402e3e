"""Readiness (/readyz) with real dependencies going away, and ``streamrec check``."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from streamrec import service
from streamrec.consumer import Consumer, ConsumerConfig, Delivery
from streamrec.devservers import LocalRedis, free_port
from streamrec.keys import Keys
from streamrec.metrics import Metrics
from streamrec.monitor import Monitor
from streamrec.producer import ReadinessCheck, WebhookConfig, create_app
from streamrec.settings import Settings
from tests.conftest import wait_for
from tests.processes import environment, streamrec
from tests.standins import ACCOUNT_SID, AUTH_TOKEN

Client = TestClient[web.Request, web.Application]


def postgres_check(dsn: str) -> ReadinessCheck:
    """A readiness check that opens a connection to ``dsn`` and runs SELECT 1."""

    async def check() -> None:
        conn = await asyncpg.connect(dsn, timeout=2)
        try:
            await conn.fetchval("SELECT 1")
        finally:
            await conn.close()

    return check


def config(keys: Keys) -> WebhookConfig:
    return WebhookConfig(
        account_sid=ACCOUNT_SID, auth_token=AUTH_TOKEN, public_url="http://x.test", keys=keys
    )


async def readyz(client: Client) -> tuple[int, dict[str, Any]]:
    response = await client.get("/readyz")
    body: dict[str, Any] = await response.json()
    return response.status, body


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[LocalRedis]:
    """A redis-server of this test's own, to stop and start again."""
    server = LocalRedis(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.stop()


@pytest_asyncio.fixture(loop_scope="session")
async def own_redis_client(own_redis: LocalRedis) -> AsyncIterator[aioredis.Redis]:
    """The service's reconnecting client of ``own_redis``."""
    client = service.redis_client(own_redis.url)
    yield client
    await client.aclose()


async def test_readyz_follows_redis_going_away_and_back(
    own_redis: LocalRedis, own_redis_client: aioredis.Redis, keys: Keys, database_url: str
) -> None:
    """/readyz is 503 naming redis while its server is stopped, 200 again once it is back."""
    app = create_app(
        own_redis_client, config(keys), checks={"postgres": postgres_check(database_url)}
    )
    async with TestClient(TestServer(app)) as client:
        assert await readyz(client) == (
            200,
            {"status": "ready", "checks": {"redis": "ok", "postgres": "ok"}},
        )

        await asyncio.to_thread(own_redis.stop)
        status, body = await readyz(client)
        assert status == 503
        assert body["status"] == "not ready"
        assert body["checks"]["redis"] != "ok"
        assert "Error" in body["checks"]["redis"]
        assert body["checks"]["postgres"] == "ok"

        await asyncio.to_thread(own_redis.start)

        async def ready() -> bool:
            return (await readyz(client))[0] == 200

        await wait_for(ready, what="/readyz to answer 200 after Redis restarted")
        assert (await readyz(client))[1]["checks"] == {"redis": "ok", "postgres": "ok"}


async def test_readyz_names_postgres_when_it_is_unreachable(
    redis: aioredis.Redis, keys: Keys
) -> None:
    """/readyz is 503 with postgres failing and redis ok when PostgreSQL does not answer."""
    closed = f"postgresql://nobody@127.0.0.1:{free_port()}/nothing"
    app = create_app(redis, config(keys), checks={"postgres": postgres_check(closed)})
    async with TestClient(TestServer(app)) as client:
        status, body = await readyz(client)
    assert status == 503
    assert body["status"] == "not ready"
    assert body["checks"]["redis"] == "ok"
    assert body["checks"]["postgres"] != "ok"
    assert "Error" in body["checks"]["postgres"]


async def test_healthz_answers_while_redis_is_down(
    own_redis: LocalRedis, own_redis_client: aioredis.Redis, keys: Keys
) -> None:
    """/healthz is about the process only: 200 with its Redis stopped."""
    async with TestClient(TestServer(create_app(own_redis_client, config(keys)))) as client:
        await asyncio.to_thread(own_redis.stop)
        response = await client.get("/healthz")
        assert response.status == 200
        assert (await readyz(client))[0] == 503


async def nothing(delivery: Delivery) -> None:
    """A handler for consumers that are never run."""


def monitor_of(redis: aioredis.Redis, keys: Keys, name: str, interval_s: float) -> Monitor:
    """A Monitor beside a (never run) Consumer ``name``: beats live 3 intervals, >= 1 s."""
    consumer = Consumer(redis=redis, keys=keys, handler=nothing, config=ConsumerConfig(name=name))
    return Monitor(
        redis=redis, keys=keys, consumer=consumer, metrics=Metrics(), interval_s=interval_s
    )


async def test_check_follows_the_heartbeat(
    redis: aioredis.Redis, keys: Keys, settings: Settings, tmp_path: Path
) -> None:
    """``check`` is 1 with no heartbeat, 0 while one is fresh, 1 again once it expired."""
    env = environment(settings)

    async def check(*args: str) -> subprocess.CompletedProcess[str]:
        return await streamrec("check", *args, env=env, cwd=tmp_path)

    before = await check()
    assert before.returncode == 1
    assert "no fresh heartbeat from any consumer" in before.stderr

    # A beat that lives 60 s: long enough for the checks below however slow they start.
    await monitor_of(redis, keys, "c1", interval_s=20.0).tick()
    fresh = await check()
    assert fresh.returncode == 0, fresh.stderr
    assert "fresh heartbeat from c1" in fresh.stdout
    assert (await check("--consumer", "c1")).returncode == 0
    other = await check("--consumer", "c2")
    assert other.returncode == 1
    assert "no fresh heartbeat from consumer c2" in other.stderr
    assert (await check("--this-host")).returncode == 0

    # The configured beat (heartbeat_s 0.2) lives the minimum 1 s; not renewed, it expires.
    await monitor_of(redis, keys, "c1", interval_s=settings.heartbeat_s).tick()
    assert 0 < await redis.pttl(keys.heartbeat("c1")) <= 1000

    async def expired() -> bool:
        return (await check()).returncode == 1

    await wait_for(expired, what="check to fail once the heartbeat expired")


async def test_a_stopped_monitor_removes_its_heartbeat(redis: aioredis.Redis, keys: Keys) -> None:
    """Monitor.run beats while running and deletes its heartbeat when stopped."""
    monitor = monitor_of(redis, keys, "c1", interval_s=0.2)
    stop = asyncio.Event()
    task = asyncio.create_task(monitor.run(stop))
    try:
        await wait_for(lambda: redis.exists(keys.heartbeat("c1")), what="the first heartbeat")
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    assert await redis.exists(keys.heartbeat("c1")) == 0


async def test_check_exits_1_when_redis_is_unreachable(settings: Settings, tmp_path: Path) -> None:
    """``check`` against a closed Redis port exits 1 with a one-line reason, no traceback."""
    env = environment(settings, REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    finished = await streamrec("check", env=env, cwd=tmp_path)
    assert finished.returncode == 1
    assert "redis unreachable" in finished.stderr
    assert "Traceback" not in finished.stderr
