"""Replica acks: the webhook's 2xx waits for WAIT (and WAITAOF) on a real primary + replica."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from aiohttp import ClientResponse

from streamrec import health, service
from streamrec.devservers import LocalRedis
from streamrec.keys import Keys
from streamrec.producer import Enqueuer
from tests.conftest import wait_for
from tests.standins import callback_params
from tests.test_producer import Client, _event_of, post, serving, webhook_config

DEADLINE_MS = 1_000
BOUND_S = DEADLINE_MS / 1000 + 1.0  # the claim: answered within the deadline (+ 1 s of slack)

NEWER_REDIS = os.environ.get("TEST_REDIS_7_2_SERVER")
"""A redis-server of version 7.2 or later (WAITAOF), where this machine has one."""

SERVERS = [
    pytest.param(None, id="redis-on-path"),
    pytest.param(
        NEWER_REDIS,
        id="redis-7.2",
        marks=pytest.mark.skipif(not NEWER_REDIS, reason="TEST_REDIS_7_2_SERVER is not set"),
    ),
]


@dataclass
class Pair:
    """A primary and its replica, with a service client of each."""

    primary: LocalRedis
    replica: LocalRedis
    client: aioredis.Redis
    replica_client: aioredis.Redis

    async def linked(self) -> bool:
        """The replica's link is up and it acknowledges the primary's writes.

        The primary lists a replica online as soon as its first sync is sent,
        but streams writes to it only after its next acknowledgement (up to a
        second later): a write confirmed by WAIT is the sure sign.
        """
        info = await self.replica_client.info("replication")
        if info.get("master_link_status") != "up":
            return False
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.set("replication-probe", "1")
            pipe.wait(1, 100)
            _, acked = await pipe.execute()
        return bool(acked)


@contextmanager
def servers(tmp_path: Path, binary: str | None, *, appendonly: bool = False) -> Iterator[Pair]:
    """Start a primary and a replica of it (``binary``: the redis-server to run)."""
    primary = LocalRedis(tmp_path / "primary", binary=binary, appendonly=appendonly).start()
    replica = LocalRedis(tmp_path / "replica", binary=binary, replica_of=primary)
    try:
        replica.start()
        yield Pair(
            primary, replica, service.redis_client(primary.url), service.redis_client(replica.url)
        )
    finally:
        replica.stop()
        primary.stop()


@pytest.fixture(params=SERVERS)
def started(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Pair]:
    """A primary and a replica of the parametrized redis-server."""
    with servers(tmp_path, request.param) as both:
        yield both


@pytest_asyncio.fixture(loop_scope="session")
async def pair(started: Pair) -> AsyncIterator[Pair]:
    """``started``, once the replica is in sync; its clients closed afterwards."""
    try:
        await wait_for(started.linked, what="the replica's link to come up")
        yield started
    finally:
        await started.client.aclose()
        await started.replica_client.aclose()


async def replica_has(pair: Pair, keys: Keys, entry_id: str) -> bool:
    """The replica's stream holds ``entry_id``."""
    return bool(await pair.replica_client.xrange(keys.stream, entry_id, entry_id))


async def timed_post(client: Client, params: dict[str, str]) -> tuple[ClientResponse, float]:
    """POST a callback; its answer and the seconds it took (failing past BOUND_S)."""
    started = asyncio.get_running_loop().time()
    async with asyncio.timeout(BOUND_S):
        response = await post(client, params)
    return response, asyncio.get_running_loop().time() - started


async def test_a_2xx_comes_once_the_replica_has_the_entry(pair: Pair, keys: Keys) -> None:
    """MIN_REPLICA_ACKS=1: no answer while the replica lags, a 200 once it holds the entry."""
    config = webhook_config(keys, replica_acks=1)  # a 5 s deadline: time to resume it
    async with serving(pair.client, config) as client:
        pair.replica.pause()
        try:
            answer = asyncio.create_task(post(client, callback_params()))
            await wait_for(lambda: pair.client.xlen(keys.stream), what="the entry on the primary")
            assert not answer.done()
        finally:
            pair.replica.resume()
        response = await answer
        assert response.status == 200
        assert await replica_has(pair, keys, (await response.json())["entry_id"])


async def test_callbacks_arriving_together_share_one_wait(pair: Pair, keys: Keys) -> None:
    """Twenty enqueues at once: one WAIT per script call, fewer calls than callbacks."""
    enqueuer = Enqueuer(pair.client, keys, dedupe_ttl_s=60, replica_acks=1)
    events = [_event_of(callback_params()) for _ in range(20)]
    await pair.client.config_resetstat()
    results = await asyncio.gather(*(enqueuer.enqueue(e) for e in events))
    stats = await pair.client.info("commandstats")
    assert all(added for added, _ in results)
    for _, entry_id in results:
        assert await replica_has(pair, keys, entry_id)
    waits, scripts = stats["cmdstat_wait"]["calls"], stats["cmdstat_eval"]["calls"]
    assert waits == scripts < len(events)


async def test_a_primary_that_never_ran_the_script_confirms(pair: Pair, keys: Keys) -> None:
    """After SCRIPT FLUSH (as on a new primary after a failover) an enqueue is confirmed."""
    enqueuer = Enqueuer(pair.client, keys, dedupe_ttl_s=60, replica_acks=1)
    assert (await enqueuer.enqueue(_event_of(callback_params())))[0]
    await pair.client.script_flush()
    added, entry_id = await enqueuer.enqueue(_event_of(callback_params()))
    assert added
    assert await replica_has(pair, keys, entry_id)


async def test_with_the_replica_stopped_the_webhook_answers_503_in_time(
    pair: Pair, keys: Keys
) -> None:
    """Replica stopped: 503 within the deadline; once it is back, the repeat is a duplicate."""
    config = webhook_config(keys, deadline_ms=DEADLINE_MS, replica_acks=1)
    params = callback_params()
    async with serving(pair.client, config) as client:
        await asyncio.to_thread(pair.replica.stop)
        response, elapsed = await timed_post(client, params)
        assert (response.status, elapsed < BOUND_S) == (503, True)
        assert int(response.headers["Retry-After"]) > 0
        assert "replicas" in (await response.json())["error"]
        assert await pair.client.xlen(keys.stream) == 1  # written, not confirmed

        await asyncio.to_thread(pair.replica.start)
        await wait_for(pair.linked, what="the replica's link to come back")
        response = await post(client, params)
        body = await response.json()
        assert (response.status, body["status"]) == (200, "duplicate")
        assert await replica_has(pair, keys, body["entry_id"])
        assert await pair.client.xlen(keys.stream) == 1


async def test_a_duplicate_is_answered_2xx_only_once_its_first_add_is_confirmed(
    pair: Pair, keys: Keys
) -> None:
    """A repeat reaching another webhook process, whose connection never wrote, is 503 too."""
    config = webhook_config(keys, deadline_ms=DEADLINE_MS, replica_acks=1)
    params = callback_params()
    other_client = service.redis_client(pair.primary.url)
    try:
        async with serving(pair.client, config) as first, serving(other_client, config) as other:
            pair.replica.pause()  # still counted online by the primary, acknowledging nothing
            try:
                assert (await timed_post(first, params))[0].status == 503
                response, _ = await timed_post(other, params)
                assert response.status == 503
            finally:
                pair.replica.resume()
            response = await post(other, params)
            body = await response.json()
            assert (response.status, body["status"]) == (200, "duplicate")
            assert await replica_has(pair, keys, body["entry_id"])
    finally:
        await other_client.aclose()


@pytest.mark.skipif(not NEWER_REDIS, reason="TEST_REDIS_7_2_SERVER is not set")
async def test_wait_aof_confirms_on_a_server_that_has_it(tmp_path: Path, keys: Keys) -> None:
    """Redis >= 7.2 with AOF: WAIT_AOF passes the start-up check and callbacks get 200."""
    with servers(tmp_path, NEWER_REDIS, appendonly=True) as pair:
        try:
            await wait_for(pair.linked, what="the replica's link to come up")
            await health.require_redis(pair.client, replica_acks=1, wait_aof=True)
            await pair.client.config_resetstat()
            # appendfsync everysec: WAITAOF waits up to a second for the next fsync.
            config = webhook_config(keys, replica_acks=1, wait_aof=True)
            async with serving(pair.client, config) as client:
                response = await post(client, callback_params())
                assert response.status == 200
                assert await replica_has(pair, keys, (await response.json())["entry_id"])
            stats = await pair.client.info("commandstats")
            assert stats["cmdstat_waitaof"]["calls"] == stats["cmdstat_wait"]["calls"] == 1
        finally:
            await pair.client.aclose()
            await pair.replica_client.aclose()
