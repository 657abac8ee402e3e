"""Readiness (/readyz) with real dependencies going away, ``streamrec check``, the consumer
registry it reads, and what streamrec requires of the Redis server."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
import structlog.testing
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from redis.exceptions import ConnectionError as RedisConnectionError

from streamrec import health, service, status
from streamrec.consumer import Consumer, ConsumerConfig, Delivery
from streamrec.devservers import LocalRedis, free_port
from streamrec.keys import Keys
from streamrec.metrics import Metrics
from streamrec.monitor import Monitor
from streamrec.partitions import Layout
from streamrec.producer import ReadinessCheck, WebhookConfig, create_app
from streamrec.settings import Settings
from tests.conftest import wait_for
from tests.processes import environment, streamrec
from tests.standins import ACCOUNT_SID, AUTH_TOKEN
from tests.test_status import PARTS, partitioned

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
        assert body == {"status": "not ready", "checks": {"redis": "failed", "postgres": "ok"}}

        await asyncio.to_thread(own_redis.start)

        async def ready() -> bool:
            return (await readyz(client))[0] == 200

        await wait_for(ready, what="/readyz to answer 200 after Redis restarted")
        assert (await readyz(client))[1]["checks"] == {"redis": "ok", "postgres": "ok"}


async def test_readyz_names_the_failed_check_and_keeps_the_detail_in_the_log(
    redis: aioredis.Redis, keys: Keys, postgres: str
) -> None:
    """/readyz says which check failed, with no user name or address; the log has the error."""
    port = urlsplit(postgres).port
    checks = {
        "postgres": postgres_check(f"postgresql://intruder:hunter2@127.0.0.1:{port}/nothing"),
        "closed": postgres_check(f"postgresql://nobody@127.0.0.1:{free_port()}/nothing"),
    }
    app = create_app(redis, config(keys), checks=checks)
    with structlog.testing.capture_logs() as logs:
        async with TestClient(TestServer(app)) as client:
            status, body = await readyz(client)
    assert status == 503
    assert body == {
        "status": "not ready",
        "checks": {"redis": "ok", "postgres": "failed", "closed": "failed"},
    }
    errors = {e["check"]: e["error"] for e in logs if e["event"] == "readiness_check_failed"}
    assert 'role "intruder" does not exist' in errors["postgres"]
    assert "127.0.0.1" in errors["closed"]


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


def monitor_of(redis: aioredis.Redis, keys: Keys | Layout, name: str, interval_s: float) -> Monitor:
    """A Monitor beside a (never run) Consumer ``name``: beats live 3 intervals, >= 1 s."""
    consumer = Consumer(redis=redis, keys=keys, handler=nothing, config=ConsumerConfig(name=name))
    return Monitor(
        redis=redis, layout=keys, consumer=consumer, metrics=Metrics(), interval_s=interval_s
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
    seconds, micros = await redis.time()
    expiry = await redis.zscore(keys.consumers, "c1")
    assert expiry is not None
    assert 0 < expiry - (seconds * 1000 + micros // 1000) <= 1000

    async def expired() -> bool:
        return (await check()).returncode == 1

    await wait_for(expired, what="check to fail once the heartbeat expired")


async def test_a_stopped_monitor_removes_its_heartbeat(redis: aioredis.Redis, keys: Keys) -> None:
    """Monitor.run beats while running and deletes its heartbeat when stopped."""
    monitor = monitor_of(redis, keys, "c1", interval_s=0.2)
    stop = asyncio.Event()
    task = asyncio.create_task(monitor.run(stop))
    try:
        await wait_for(lambda: redis.hexists(keys.heartbeats, "c1"), what="the first heartbeat")
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    assert await redis.zscore(keys.consumers, "c1") is None
    assert not await redis.hexists(keys.heartbeats, "c1")


async def test_check_reads_the_one_registry_whatever_the_partitions(
    redis: aioredis.Redis, keys: Keys, settings: Settings, tmp_path: Path
) -> None:
    """A consumer of four partitions beats into the namespace's own registry, where
    ``check`` finds it; configured for another count than Redis records, ``check`` is 1
    and says so."""
    async with partitioned(redis, keys) as layout:
        await monitor_of(redis, layout, "c1", interval_s=20.0).tick()
        assert await redis.hexists(keys.heartbeats, "c1")
        assert await health.check(redis, layout) == (True, "ok: fresh heartbeat from c1")
        env = environment(settings, STREAMREC_PARTITIONS=str(PARTS))
        fresh = await streamrec("check", env=env, cwd=tmp_path)
        assert fresh.returncode == 0, fresh.stderr

        await redis.set(layout.home.partitions, PARTS)
        other = await streamrec("check", env=environment(settings), cwd=tmp_path)
        assert other.returncode == 1
        assert f"STREAMREC_PARTITIONS is 1, but namespace {keys.namespace!r} has 4" in (
            other.stderr
        )


async def test_check_exits_1_when_redis_is_unreachable(settings: Settings, tmp_path: Path) -> None:
    """``check`` against a closed Redis port exits 1 with a one-line reason, no traceback."""
    env = environment(settings, REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    finished = await streamrec("check", env=env, cwd=tmp_path)
    assert finished.returncode == 1
    assert "redis unreachable" in finished.stderr
    assert "Traceback" not in finished.stderr


SEEN_MARKERS = """
for i = 1, tonumber(ARGV[2]) do
  redis.call('SET', ARGV[1] .. i, '1')
end
"""


async def test_heartbeats_are_read_without_a_scan(
    own_redis_client: aioredis.Redis, keys: Keys
) -> None:
    """check, status and the monitor find beats among 50,000 seen: markers, and never SCAN."""
    redis = own_redis_client
    await redis.eval(SEEN_MARKERS, 0, keys.seen(""), "50000")
    for name in ("c1", "c2"):
        await monitor_of(redis, keys, name, interval_s=20.0).tick()
    await redis.config_resetstat()

    assert sorted(b["name"] for b in await status.heartbeats(redis, keys)) == ["c1", "c2"]
    assert await health.check(redis, keys, consumer="c2") == (True, "ok: fresh heartbeat from c2")
    report = await status.collect(redis, keys)
    assert [c["heartbeat"]["name"] for c in report["consumers"]] == ["c1", "c2"]
    await monitor_of(redis, keys, "c1", interval_s=20.0).tick()
    assert "cmdstat_scan" not in await redis.info("commandstats")


async def test_an_expired_beat_is_not_listed_and_the_next_beat_prunes_it(
    redis: aioredis.Redis, keys: Keys
) -> None:
    """A beat not renewed in time is not listed; another consumer's next beat removes it."""
    await monitor_of(redis, keys, "gone", interval_s=0.2).tick()  # lives the minimum 1 s
    await monitor_of(redis, keys, "live", interval_s=20.0).tick()

    async def listed() -> list[str]:
        return sorted(str(b["name"]) for b in await status.heartbeats(redis, keys))

    assert await listed() == ["gone", "live"]

    async def only_live() -> bool:
        return await listed() == ["live"]

    await wait_for(only_live, what="the unrenewed beat to expire")
    assert await redis.hexists(keys.heartbeats, "gone")  # still there: readers skip it
    await monitor_of(redis, keys, "live", interval_s=20.0).tick()
    assert await redis.zscore(keys.consumers, "gone") is None
    assert not await redis.hexists(keys.heartbeats, "gone")
    assert await listed() == ["live"]


@pytest.mark.parametrize(
    ("version", "refused"),
    [
        ("5.0.7", True),
        ("6.0.16", True),
        ("6.2.14", True),
        ("7.0.0", False),
        ("7.0.15", False),
        ("7.2.4", False),
        ("8.0.2", False),
        ("10.1.0", False),
    ],
)
def test_a_redis_before_7_is_refused(version: str, refused: bool) -> None:
    """A server before 7.0 is refused in one line naming the server and the version found."""
    server = status.Server(address="redis.internal:6380", version=version, maxmemory_policy=None)
    if refused:
        assert server.refusal == (
            f"Redis at redis.internal:6380 is version {version}; streamrec needs Redis 7.0 or later"
        )
        assert server.warnings[0] == server.refusal
    else:
        assert server.refusal is None
        assert not any(version in warning for warning in server.warnings)


def logged(stderr: str, event: str) -> list[dict[str, Any]]:
    """The JSON log lines of ``event`` in a process's stderr."""
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("event") == event]


async def test_an_evicting_redis_is_warned_at_start_and_in_status(
    own_redis: LocalRedis,
    own_redis_client: aioredis.Redis,
    settings: Settings,
    tmp_path: Path,
) -> None:
    """maxmemory-policy allkeys-lru: consume warns at start, status and status --json show it."""
    await own_redis_client.config_set("maxmemory-policy", "allkeys-lru")
    env = environment(settings, REDIS_URL=own_redis.url)
    address = f"127.0.0.1:{own_redis.port}"

    consumed = await streamrec("consume", "--until-idle", env=env, cwd=tmp_path)
    assert consumed.returncode == 0, consumed.stderr
    [start] = logged(consumed.stderr, "redis_warning")
    assert start["level"] == "warning"
    assert "maxmemory-policy" in start["warning"]
    assert f"{address} is allkeys-lru" in start["warning"]

    as_json = await streamrec("status", "--json", env=env, cwd=tmp_path)
    assert as_json.returncode == 0, as_json.stderr
    report = json.loads(as_json.stdout)
    assert report["warnings"] == [start["warning"]]
    assert report["redis"]["maxmemory_policy"] == "allkeys-lru"
    plain = await streamrec("status", env=env, cwd=tmp_path)
    assert plain.stdout.splitlines()[0] == f"WARNING: {start['warning']}"


async def test_a_refused_config_get_is_a_warning_not_a_failure(
    own_redis: LocalRedis,
    own_redis_client: aioredis.Redis,
    settings: Settings,
    tmp_path: Path,
) -> None:
    """Without CONFIG (as on managed Redis) start-up and status say the policy went unchecked."""
    await own_redis_client.acl_setuser(
        "app",
        enabled=True,
        passwords=["+s3cret"],
        keys=["*"],
        channels=["*"],
        categories=["+@all"],
        commands=["-config"],
    )
    url = f"redis://app:s3cret@127.0.0.1:{own_redis.port}/0"
    client = service.redis_client(url)
    try:
        with structlog.testing.capture_logs() as logs:
            await health.require_redis(client)
    finally:
        await client.aclose()
    [warning] = [entry for entry in logs if entry["event"] == "redis_warning"]
    assert warning["log_level"] == "warning"
    assert warning["warning"].startswith(
        f"maxmemory-policy of Redis at 127.0.0.1:{own_redis.port} could not be checked"
    )

    finished = await streamrec(
        "status", "--json", env=environment(settings, REDIS_URL=url), cwd=tmp_path
    )
    assert finished.returncode == 0, finished.stderr
    report = json.loads(finished.stdout)
    assert report["warnings"] == [warning["warning"]]
    assert report["redis"]["maxmemory_policy"] is None
    assert "s3cret" not in finished.stdout


async def test_an_unreachable_redis_stops_a_consumer_start_but_not_the_webhook() -> None:
    """require_redis raises on a closed port; with unreachable_ok (serve) it logs and lets pass."""
    client = aioredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0")
    try:
        with pytest.raises(RedisConnectionError):
            await health.require_redis(client)
        with structlog.testing.capture_logs() as logs:
            await health.require_redis(client, unreachable_ok=True)
    finally:
        await client.aclose()
    assert [entry["event"] for entry in logs] == ["redis_not_checked"]


NEWER_REDIS = os.environ.get("TEST_REDIS_7_2_SERVER")
"""A redis-server of version 7.2 or later (WAITAOF), where this machine has one."""


async def test_wait_aof_is_refused_at_start_by_a_redis_without_waitaof(
    own_redis: LocalRedis, own_redis_client: aioredis.Redis, settings: Settings, tmp_path: Path
) -> None:
    """STREAMREC_WAIT_AOF=1 against Redis 7.0: serve exits 1 in one line naming WAITAOF."""
    version = str((await own_redis_client.info("server"))["redis_version"])
    if tuple(int(part) for part in version.split(".")[:2]) >= (7, 2):
        pytest.skip(f"the redis-server on PATH is {version}: it has WAITAOF")
    env = environment(
        settings, REDIS_URL=own_redis.url, STREAMREC_WAIT_AOF="1", STREAMREC_HTTP_PORT="0"
    )
    finished = await streamrec("serve", env=env, cwd=tmp_path)
    assert finished.returncode == 1
    [line] = [line for line in finished.stderr.splitlines() if not line.startswith("{")]
    assert line.startswith("streamrec: serve failed: UnsupportedRedis: STREAMREC_WAIT_AOF=1 needs")
    assert f"Redis at 127.0.0.1:{own_redis.port} (version {version})" in line
    assert "unknown command" in line


@pytest.mark.skipif(not NEWER_REDIS, reason="TEST_REDIS_7_2_SERVER is not set")
async def test_wait_aof_is_refused_at_start_by_a_redis_without_aof(tmp_path: Path) -> None:
    """Redis >= 7.2 with appendonly no: require_redis(wait_aof=True) refuses, naming AOF."""
    server = LocalRedis(tmp_path / "redis", binary=NEWER_REDIS).start()
    client = service.redis_client(server.url)
    try:
        with pytest.raises(health.UnsupportedRedis, match="appendonly is disabled"):
            await health.require_redis(client, wait_aof=True)
    finally:
        await client.aclose()
        server.stop()


async def test_too_few_replicas_is_a_warning_at_start_and_named_by_readyz(
    own_redis: LocalRedis, own_redis_client: aioredis.Redis, keys: Keys, tmp_path: Path
) -> None:
    """MIN_REPLICA_ACKS=1 and no replica: start-up warns, /readyz is 503 until one is online."""
    with structlog.testing.capture_logs() as logs:
        await health.require_redis(own_redis_client, replica_acks=1)
    [warning] = [entry["warning"] for entry in logs if entry["event"] == "redis_warning"]
    assert warning.startswith(
        f"STREAMREC_MIN_REPLICA_ACKS is 1 but Redis at 127.0.0.1:{own_redis.port}"
        " has 0 of 1 replicas online"
    )
    app = create_app(own_redis_client, replace(config(keys), replica_acks=1))
    replica = LocalRedis(tmp_path / "replica", replica_of=own_redis)
    async with TestClient(TestServer(app)) as client:
        status, body = await readyz(client)
        assert (status, body["checks"]["replicas"]) == (503, "failed")
        assert body["checks"]["redis"] == "ok"
        try:
            await asyncio.to_thread(replica.start)

            async def ready() -> bool:
                return (await readyz(client))[0] == 200

            await wait_for(ready, what="/readyz to answer 200 once the replica is online")
        finally:
            await asyncio.to_thread(replica.stop)
