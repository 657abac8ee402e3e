"""The Redis client of a process: one server, or a Redis Cluster.

``REDIS_URL`` names one server, or with ``STREAMREC_REDIS_CLUSTER=true`` any
node of a cluster (the client finds the others, follows MOVED and ASK
redirections, and finds the new primary after a failover). Either way the
client retries a command once its connection drops: every command streamrec
sends is safe to repeat (the enqueue script dedupes, acks are idempotent, a
repeated read only leaves entries to reclaim).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar, cast

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import (
    AskError,
    ClusterDownError,
    ConnectionError,
    MovedError,
    TimeoutError,
    TryAgainError,
)

from streamrec.settings import Settings

REDIS_CONNECTIONS = 64
"""Connections to one server; past this many commands in flight, callers wait for one."""

CLUSTER_NODE_CONNECTIONS = 256
"""Connections to each node of a cluster. The cluster client does not wait for a free
connection but fails, so the bound sits far above what a process uses (its blocking
reads, one per partition, and its concurrency's commands)."""


def redis_client(url: str, *, block_ms: int = 2_000, cluster: bool = False) -> aioredis.Redis:
    """A client that reconnects and retries a command on a dropped connection.

    The socket timeout outlasts the consumer's blocking read. With ``cluster``,
    a ``RedisCluster`` seeded from ``url``: it speaks every command streamrec
    uses with the same signatures, so it is typed as the one-server client and
    every module has one client type.
    """
    options = {
        "decode_responses": True,
        "socket_connect_timeout": 5,
        "socket_timeout": block_ms / 1000 + 10,
        "health_check_interval": 30,
        "retry": Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=3),
        "retry_on_error": [ConnectionError, TimeoutError],
    }
    if cluster:
        client = RedisCluster.from_url(url, max_connections=CLUSTER_NODE_CONNECTIONS, **options)
        return cast(aioredis.Redis, client)
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=REDIS_CONNECTIONS, timeout=10, **options
    )
    return aioredis.Redis.from_pool(pool)


def is_cluster(redis: aioredis.Redis) -> bool:
    """Whether ``redis`` is a cluster client."""
    return isinstance(redis, RedisCluster)


@contextlib.asynccontextmanager
async def open_redis(settings: Settings) -> AsyncIterator[aioredis.Redis]:
    """The process's Redis client, closed on exit."""
    client = redis_client(
        settings.redis_url, block_ms=settings.block_ms, cluster=settings.redis_cluster
    )
    try:
        yield client
    finally:
        nodes = direct(client)
        if nodes is not None:
            await nodes.aclose()
        await client.aclose()


@contextlib.asynccontextmanager
async def each_primary(redis: aioredis.Redis) -> AsyncIterator[list[aioredis.Redis]]:
    """A client of each server that takes writes: ``redis`` itself, or on a cluster one
    client per primary (kept with the cluster client's ``direct`` clients), for what is
    asked of every server (its version, its replicas)."""
    nodes = direct(redis)
    if nodes is None:
        yield [redis]
        return
    yield await nodes.primaries()


class Direct:
    """Plain clients of a cluster's primaries, for a write and its confirmation (WAIT,
    WAITAOF), which must share one connection to the primary holding the key: the cluster
    client would send a keyless WAIT to a node of its own choosing."""

    def __init__(self, cluster: RedisCluster) -> None:
        self._cluster = cluster
        self._clients: dict[str, aioredis.Redis] = {}

    async def for_key(self, key: str) -> aioredis.Redis:
        """A client of the primary serving ``key``, as far as the cluster client knows."""
        await self._cluster.initialize()  # once: it learns the map at its first command
        node = self._cluster.get_node_from_key(key)
        if node is None:  # only asked of replicas
            raise ClusterDownError(f"no primary serves {key}")
        return self._client(node)

    def _client(self, node: ClusterNode) -> aioredis.Redis:
        client = self._clients.get(node.name)
        if client is None:
            client = aioredis.Redis(
                host=node.host,
                port=int(node.port),
                decode_responses=True,
                socket_connect_timeout=5,
                socket_timeout=30,
            )
            self._clients[node.name] = client
        return client

    async def primaries(self) -> list[aioredis.Redis]:
        """A client of each primary."""
        await self._cluster.initialize()
        return [self._client(node) for node in self._cluster.get_primaries()]

    async def refresh(self, key: str) -> None:
        """Let the cluster client find ``key``'s primary anew (it follows MOVED, and after
        a failed node, asks the cluster for its map)."""
        await self._cluster.exists(key)

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()
        self._clients.clear()


MOVED = (
    MovedError, AskError, TryAgainError, ClusterDownError, ConnectionError, TimeoutError
)  # fmt: skip
"""What a direct connection to a cluster primary meets when that primary no longer serves
the key (a failover, a slot migration) or is gone."""

T = TypeVar("T")


async def on_primary(
    redis: aioredis.Redis, key: str, work: Callable[[aioredis.Redis], Awaitable[T]]
) -> T:
    """``work`` on one connection that reaches the primary holding ``key``: ``redis``
    itself, or on a cluster a direct client of that primary, found anew once if it moved.
    For a write and the WAIT that confirms it, which must share a connection."""
    nodes = direct(redis)
    if nodes is None:
        return await work(redis)
    try:
        return await work(await nodes.for_key(key))
    except MOVED:
        await nodes.refresh(key)
        return await work(await nodes.for_key(key))


_DIRECT: weakref.WeakKeyDictionary[RedisCluster, Direct] = weakref.WeakKeyDictionary()


def direct(redis: aioredis.Redis) -> Direct | None:
    """The direct clients of ``redis``'s primaries if it is a cluster client (None: it is
    one server, and any of its connections will do); closed with ``open_redis``."""
    if not isinstance(redis, RedisCluster):
        return None
    found = _DIRECT.get(redis)
    if found is None:
        found = _DIRECT[redis] = Direct(redis)
    return found
