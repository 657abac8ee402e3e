"""Shared fixtures: private Redis and PostgreSQL servers, Twilio and OpenAI stand-ins.

The session starts its own redis-server and PostgreSQL cluster on free ports
(unless TEST_REDIS_URL / TEST_DATABASE_URL name servers to use), so tests can
never disturb, or be disturbed by, servers the machine already runs. Each test
gets its own key namespace and its own database cloned from a migrated template.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from streamrec import schema
from streamrec.devservers import LocalPostgres, LocalRedis
from streamrec.keys import Keys
from streamrec.settings import Settings
from tests.cluster import fresh_cluster, redis_cluster  # noqa: F401 - fixtures
from tests.standins import ACCOUNT_SID, AUTH_TOKEN, MediaStandIn, OpenAIStandIn

TEMPLATE_DB = "streamrec_template"


@pytest.fixture(scope="session")
def server_dir() -> Iterator[Path]:
    """A scratch directory the postgres system user can enter too."""
    directory = Path(tempfile.mkdtemp(prefix="streamrec-test-"))
    directory.chmod(0o755)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_url(server_dir: Path) -> Iterator[str]:
    """URL of the session's Redis server."""
    if os.environ.get("TEST_REDIS_URL"):
        yield os.environ["TEST_REDIS_URL"]
        return
    server = LocalRedis(server_dir / "redis").start()
    yield server.url
    server.stop()


@pytest.fixture(scope="session")
def postgres(server_dir: Path) -> Iterator[str]:
    """Admin DSN of the session's PostgreSQL server."""
    if os.environ.get("TEST_DATABASE_URL"):
        yield os.environ["TEST_DATABASE_URL"]
        return
    server = LocalPostgres(server_dir / "postgres", durable=False).start()
    yield server.url()
    server.stop()


def database_url_for(admin_url: str, name: str) -> str:
    """The DSN of database ``name`` on the server of ``admin_url``."""
    base, _, _ = admin_url.rpartition("/")
    return f"{base}/{name}"


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def template_db(postgres: str) -> str:
    """A migrated database that each test's database is cloned from."""
    admin = await asyncpg.connect(postgres)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {TEMPLATE_DB}")
        await admin.execute(f"CREATE DATABASE {TEMPLATE_DB}")
    finally:
        await admin.close()
    await schema.migrate(database_url_for(postgres, TEMPLATE_DB))
    return TEMPLATE_DB


@pytest_asyncio.fixture(loop_scope="session")
async def database_url(postgres: str, template_db: str) -> AsyncIterator[str]:
    """A fresh, migrated database for this test."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(postgres)
    try:
        await admin.execute(f"CREATE DATABASE {name} TEMPLATE {template_db}")
    finally:
        await admin.close()
    yield database_url_for(postgres, name)
    admin = await asyncpg.connect(postgres)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await admin.close()


@pytest_asyncio.fixture(loop_scope="session")
async def db(database_url: str) -> AsyncIterator[Any]:
    """An asyncpg pool on this test's database."""
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=5)
    yield pool
    await pool.close()


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts; any still running at its end are killed."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


@pytest.fixture
def keys() -> Keys:
    """A key namespace of this test's own."""
    return Keys(f"t{uuid.uuid4().hex[:12]}")


@pytest_asyncio.fixture(loop_scope="session")
async def redis(redis_url: str, keys: Keys) -> AsyncIterator[aioredis.Redis]:
    """A client of the session's Redis; this test's keys (its partitions' too) are deleted
    afterwards."""
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    for pattern in (f"{{{keys.namespace}}}:*", f"{{{keys.namespace}:*"):
        async for key in client.scan_iter(match=pattern, count=1000):
            await client.delete(key)
    await client.aclose()


@pytest_asyncio.fixture(loop_scope="session")
async def media() -> AsyncIterator[MediaStandIn]:
    """Twilio's recording media endpoint, stood in for on a local port."""
    server = MediaStandIn()
    await server.start()
    yield server
    await server.close()


@pytest_asyncio.fixture(loop_scope="session")
async def openai_api() -> AsyncIterator[OpenAIStandIn]:
    """OpenAI's /v1/audio/transcriptions, stood in for on a local port."""
    server = OpenAIStandIn()
    await server.start()
    yield server
    await server.close()


@pytest.fixture
def settings(
    redis_url: str,
    database_url: str,
    keys: Keys,
    media: MediaStandIn,
    openai_api: OpenAIStandIn,
    tmp_path: Path,
) -> Settings:
    """Settings wired to this test's servers and stand-ins, with small timings."""
    return Settings(
        redis_url=redis_url,
        database_url=database_url,
        twilio_account_sid=ACCOUNT_SID,
        twilio_auth_token=AUTH_TOKEN,
        twilio_api_base=media.url,
        openai_api_key="sk-test",
        openai_base_url=openai_api.url + "/v1",
        media_dir=tmp_path / "media",
        namespace=keys.namespace,
        consumer_name="test-consumer",
        concurrency=8,
        claim_idle_ms=1_000,
        block_ms=100,
        retry_base_ms=10,
        retry_max_ms=50,
        shutdown_grace_s=5,
        metrics_port=0,
        business_slots=0,
        heartbeat_s=0.2,
        _env_file=None,
    )


async def entries(redis: aioredis.Redis, key: str) -> list[tuple[str, dict[str, str]]]:
    """XRANGE of a whole stream, typed for a decode_responses client."""
    return [
        (str(i), {str(k): str(v) for k, v in (f or {}).items()})
        for i, f in await redis.xrange(key) or []
    ]


async def wait_for(condition: Any, *, timeout: float = 20.0, what: str = "condition") -> Any:
    """Poll ``condition`` (sync or async, returning a truthy value) until it holds.

    Fails the test with ``what`` when ``timeout`` seconds pass first.
    """
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = condition()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)
