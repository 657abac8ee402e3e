"""The local Redis Cluster, and what redis-py's asyncio RedisCluster does on it.

Scripts, streams and pipelines on keys of one hash tag; a blocking read while
its primary is killed; WAIT on the connection that wrote; scripts on a
promoted replica that never loaded them; a killed primary rejoining.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import (
    ConnectionError,
    CrossSlotTransactionError,
    MovedError,
    NoScriptError,
    RedisClusterException,
    RedisError,
    TimeoutError,
)

from tests.cluster import LocalCluster, Node
from tests.conftest import wait_for

THREE_KEYS = """
redis.call('set', KEYS[1], ARGV[1])
redis.call('rpush', KEYS[2], ARGV[1])
redis.call('hset', KEYS[3], 'f', ARGV[1])
return {redis.call('get', KEYS[1]), redis.call('llen', KEYS[2]), redis.call('hget', KEYS[3], 'f')}
"""

INCR = "return redis.call('incr', KEYS[1])"


@pytest_asyncio.fixture(loop_scope="session")
async def client(redis_cluster: LocalCluster) -> AsyncIterator[RedisCluster]:
    """A cluster client of the session's cluster."""
    cluster_client = RedisCluster.from_url(redis_cluster.seed_url, decode_responses=True)
    await cluster_client.initialize()
    yield cluster_client
    await cluster_client.aclose()


@pytest.fixture
def namespace() -> str:
    """A namespace of this test's own, so that its hash tags are too."""
    return f"t{uuid.uuid4().hex[:12]}"


def tag_on(cluster: LocalCluster, node: Node, namespace: str) -> str:
    """A hash tag (braces included) of ``namespace`` whose slot ``node`` serves."""
    for n in range(10_000):
        tag = f"{{{namespace}:{n}}}"
        if cluster.primary_for(tag) is node:
            return tag
    raise AssertionError(f"no tag of {namespace} falls on node {node.port}")


def wait_calls(node: Node) -> int:
    """How many WAIT commands ``node`` has run."""
    with node.client() as direct:
        stats: dict[str, Any] = direct.info("commandstats").get("cmdstat_wait") or {}
    return int(stats.get("calls", 0))


async def eval_and_wait(
    cluster: RedisCluster, script: str, keys: list[str], args: list[str], timeout_ms: int
) -> tuple[Any, int]:
    """Run ``script`` on the primary of ``keys``, then WAIT 1 on that same connection.

    A plain client of the node that the cluster client's slot map names sends
    both in one pipeline on one connection, so WAIT counts the replicas that
    have the script's writes. A stale slot map fails the script, with
    MovedError (the node no longer serves the keys) or ConnectionError (it is
    down), and the pipeline raises it rather than WAIT's reply.
    """
    node = cluster.get_node_from_key(keys[0])
    assert node is not None
    # No retries here: after an error the caller refreshes the slot map and runs both again.
    direct = aioredis.Redis(
        host=node.host, port=int(node.port), decode_responses=True, retry=Retry(NoBackoff(), 0)
    )
    async with direct, direct.pipeline(transaction=False) as pipe:
        pipe.eval(script, len(keys), *keys, *args)
        pipe.wait(1, timeout_ms)
        result, acked = await pipe.execute()
    return result, int(acked)


def test_the_cluster_has_three_primaries_each_with_a_replica(redis_cluster: LocalCluster) -> None:
    """Six live nodes: three serve all slots, three replicate one primary each."""
    primaries, replicas = redis_cluster.primaries(), redis_cluster.replicas()
    assert len(primaries) == 3
    assert len(replicas) == 3
    assert not set(primaries) & set(replicas)
    assert redis_cluster.seed_url == primaries[0].url
    for replica in replicas:
        with replica.client() as direct:
            info = direct.info("replication")
        assert info["master_link_status"] == "up"
        assert int(info["master_port"]) in {p.port for p in primaries}


async def test_a_script_runs_on_three_keys_of_one_tag_on_every_primary(
    redis_cluster: LocalCluster, client: RedisCluster, namespace: str
) -> None:
    """A registered script with three keys of one tag runs, whichever primary serves the tag."""
    script = client.register_script(THREE_KEYS)
    for node in redis_cluster.primaries():
        tag = tag_on(redis_cluster, node, namespace)
        keys = [f"{tag}:a", f"{tag}:b", f"{tag}:c"]
        assert client.get_node_from_key(keys[0]) == client.get_node(node.host, node.port)
        assert await script(keys=keys, args=[node.port]) == [str(node.port), 1, str(node.port)]

    # Keys of two tags are refused by the client before anything is sent.
    with pytest.raises(RedisClusterException, match="same key slot"):
        await script(keys=[f"{{{namespace}:x}}:a", f"{{{namespace}:y}}:a", f"{{{namespace}:x}}:c"])


async def test_stream_commands_work_through_the_cluster_client(
    client: RedisCluster, namespace: str
) -> None:
    """XGROUP CREATE MKSTREAM, XADD, a blocking XREADGROUP, XAUTOCLAIM and XACK."""
    stream = f"{{{namespace}}}:recordings"
    await client.xgroup_create(stream, "workers", id="0", mkstream=True)

    async def read_blocking() -> Any:
        return await client.xreadgroup("workers", "c1", {stream: ">"}, count=10, block=500)

    reading = asyncio.create_task(read_blocking())
    added = await client.xadd(stream, {"n": "1"})
    read = await reading
    assert read == [[stream, [(added, {"n": "1"})]]]

    _, claimed, deleted = await client.xautoclaim(stream, "workers", "c2", 0, "0-0")
    assert claimed == [(added, {"n": "1"})]
    assert deleted == []
    assert await client.xack(stream, "workers", added) == 1
    assert (await client.xpending(stream, "workers"))["pending"] == 0


async def test_pipelines_on_one_tag_and_on_several(client: RedisCluster, namespace: str) -> None:
    """A plain pipeline spans tags; a transaction runs on one tag and is refused across two."""
    tags = [f"{{{namespace}:{n}}}" for n in range(6)]
    async with client.pipeline(transaction=False) as pipe:
        for tag in tags:
            pipe.set(f"{tag}:k", tag)
        for tag in tags:
            pipe.get(f"{tag}:k")
        assert await pipe.execute() == [True] * 6 + tags

    tag = tags[0]
    async with client.pipeline(transaction=True) as pipe:
        pipe.set(f"{tag}:n", 1)
        pipe.incr(f"{tag}:n")
        pipe.get(f"{tag}:n")
        assert await pipe.execute() == [True, 2, "2"]

    async with client.pipeline(transaction=True) as pipe:
        pipe.set(f"{tags[0]}:n", 1)
        pipe.set(f"{tags[1]}:n", 1)
        with pytest.raises(CrossSlotTransactionError):
            await pipe.execute()


async def test_wait_in_a_cluster_pipeline_goes_to_the_default_node(
    redis_cluster: LocalCluster, client: RedisCluster, namespace: str
) -> None:
    """WAIT has no key: a cluster pipeline sends it to the default node, not the script's."""
    default = client.get_default_node()
    assert default is not None
    elsewhere = next(p for p in redis_cluster.primaries() if p.port != int(default.port))
    tag = tag_on(redis_cluster, elsewhere, namespace)
    default_node = next(p for p in redis_cluster.primaries() if p.port == int(default.port))
    before = wait_calls(elsewhere), wait_calls(default_node)

    async with client.pipeline(transaction=False) as pipe:
        pipe.eval(INCR, 1, f"{tag}:n")
        pipe.wait(1, 500)
        # WAIT still says 1: it counted the default node's replica, for another connection.
        assert await pipe.execute() == [1, 1]

    assert (wait_calls(elsewhere), wait_calls(default_node)) == (before[0], before[1] + 1)


async def test_eval_then_wait_on_one_connection_of_the_keys_primary(
    redis_cluster: LocalCluster, client: RedisCluster, namespace: str
) -> None:
    """A plain client of the key's primary runs EVAL and WAIT on one connection: WAIT says 1."""
    for node in redis_cluster.primaries():
        tag = tag_on(redis_cluster, node, namespace)
        before = wait_calls(node)
        assert await eval_and_wait(client, INCR, [f"{tag}:n"], [], 1_000) == (1, 1)
        assert wait_calls(node) == before + 1

    # On a node that does not serve the key the script is refused with MOVED, while WAIT
    # still answers 1 (its connection wrote nothing): the script's reply must be checked.
    serving, other = redis_cluster.primaries()[:2]
    tag = tag_on(redis_cluster, serving, namespace)
    wrong = aioredis.Redis(host=other.host, port=other.port, decode_responses=True)
    async with wrong, wrong.pipeline(transaction=False) as pipe:
        pipe.eval(INCR, 1, f"{tag}:n")
        pipe.wait(1, 100)
        moved, acked = await pipe.execute(raise_on_error=False)
    assert isinstance(moved, MovedError)
    assert acked == 1


@dataclass
class Reader:
    """A cluster client with a blocking XREADGROUP in progress, and what became of it."""

    name: str
    client: RedisCluster
    task: asyncio.Task[Any] | None = None
    outcome: str = ""
    ended_after_s: float = 0.0
    first_success_after_s: float = 0.0


async def _ride_out(reader: Reader, stream: str, killed_at: list[float]) -> None:
    """The blocking read, then XADDs on the same client until one succeeds."""
    try:
        result = await reader.client.xreadgroup("workers", reader.name, {stream: ">"}, block=2_000)
        reader.outcome = f"returned {result!r}"
    except (ConnectionError, TimeoutError) as error:
        reader.outcome = f"raised {type(error).__name__}: {error}"
    reader.ended_after_s = time.monotonic() - killed_at[0]

    async def added() -> bool:
        try:
            await reader.client.xadd(stream, {"by": reader.name})
        except RedisError:
            return False
        return True

    await wait_for(added, timeout=30, what=f"{reader.name} to add to the stream")
    reader.first_success_after_s = time.monotonic() - killed_at[0]


async def test_a_blocking_read_survives_its_primary_being_killed(
    fresh_cluster: LocalCluster,
) -> None:
    """When the primary under a blocking XREADGROUP is killed, the read ends (by returning,
    or with a ConnectionError/TimeoutError), and once a replica took over the same client
    object serves the stream again, with no new client."""
    # Given: the stream on the seed primary, the client's default node (the harder case:
    # its keyless commands and COMMAND GETKEYS lookups go there too), and two clients
    # blocked on it: redis-py's defaults (10 retries), and 3 quick retries.
    primary = fresh_cluster.primaries()[0]
    stream = f"{tag_on(fresh_cluster, primary, 'kill')}:recordings"
    few = Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=3)
    readers = [
        Reader("defaults", RedisCluster.from_url(fresh_cluster.seed_url, decode_responses=True)),
        Reader(
            "few-retries",
            RedisCluster.from_url(fresh_cluster.seed_url, decode_responses=True, retry=few),
        ),
    ]
    await readers[0].client.xgroup_create(stream, "workers", id="0", mkstream=True)
    killed_at = [0.0]
    for reader in readers:
        reader.task = asyncio.create_task(_ride_out(reader, stream, killed_at))

    def blocked() -> bool:
        with primary.client() as direct:
            return int(direct.info("clients")["blocked_clients"]) == len(readers)

    await wait_for(blocked, what="both reads to block on the primary")

    # When: the primary is killed.
    killed_at[0] = time.monotonic()
    fresh_cluster.kill(primary)

    # Then: each read ends without hanging, and each client adds to the stream again.
    promoted = await asyncio.to_thread(fresh_cluster.wait_promoted, primary)
    promoted_after_s = time.monotonic() - killed_at[0]
    await asyncio.wait_for(asyncio.gather(*(r.task for r in readers if r.task)), timeout=60)
    assert readers[0].client.get_node_from_key(stream) == readers[0].client.get_node(
        promoted.host, promoted.port
    )
    added = await readers[1].client.xrange(stream) or []
    assert sorted(str((fields or {})["by"]) for _, fields in added) == ["defaults", "few-retries"]
    print(f"\nthe cluster settled with a replica promoted {promoted_after_s:.2f}s after the kill")
    for reader in readers:
        print(
            f"{reader.name}: read {reader.outcome} {reader.ended_after_s:.2f}s after the kill;"
            f" first XADD succeeded {reader.first_success_after_s:.2f}s after the kill"
        )
        await reader.client.aclose()


async def test_scripts_and_wait_after_failover_and_the_killed_primary_rejoining(
    fresh_cluster: LocalCluster,
) -> None:
    """After a failover: a cluster pipeline's EVALSHA fails with NoScriptError on the promoted
    replica, a registered script called on the client loads it again; EVAL+WAIT needs the
    client's slot map refreshed first and confirms again once the killed primary, restarted,
    rejoins as a replica of the node that took over."""
    client = RedisCluster.from_url(fresh_cluster.seed_url, decode_responses=True)
    primary = fresh_cluster.primaries()[1]  # not the seed: the default node stays up
    key = f"{tag_on(fresh_cluster, primary, 'scripts')}:n"
    script = client.register_script(INCR)
    assert await script(keys=[key]) == 1
    # The replica has the write before the kill, so the count goes on from it.
    assert await eval_and_wait(client, INCR, [key], [], 2_000) == (2, 1)

    fresh_cluster.kill(primary)
    promoted = await asyncio.to_thread(fresh_cluster.wait_promoted, primary)
    with promoted.client() as direct:
        assert direct.script_exists(script.sha) == [False]

    # The client has sent nothing since the kill: its slot map still names the dead node.
    with pytest.raises(ConnectionError):
        await eval_and_wait(client, INCR, [key], [], 100)

    async with client.pipeline(transaction=False) as pipe:
        # redis-py's annotation leaves out ClusterPipeline, which __call__ handles.
        await script(keys=[key], client=pipe)  # type: ignore[arg-type]
        with pytest.raises(NoScriptError):
            await pipe.execute()
    assert await script(keys=[key]) == 3
    with promoted.client() as direct:
        assert direct.script_exists(script.sha) == [True]
    # The promoted node has no replica yet: WAIT times out with none.
    assert await eval_and_wait(client, INCR, [key], [], 100) == (4, 0)

    await asyncio.to_thread(fresh_cluster.restart, primary)
    assert primary in fresh_cluster.replicas()
    with primary.client() as direct:
        info = direct.info("replication")
    assert (info["role"], int(info["master_port"])) == ("slave", promoted.port)
    assert await eval_and_wait(client, INCR, [key], [], 2_000) == (5, 1)
    await client.aclose()
