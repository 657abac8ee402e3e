"""Waiting for replicas before a write is acted on: WAIT on the connection that wrote.

``WAIT n ms`` counts the replicas that have every write its own connection
sent, and the replication stream is one sequence per primary, so a small write
followed by WAIT on one connection confirms everything the primary took before
that write too, whichever connection sent it. The webhook confirms its enqueue
this way (``streamrec.producer``); with ``STREAMREC_MIN_REPLICA_ACKS`` a
consumer confirms, per partition, what it read, reclaimed and acquired before
it starts the work, and each renewal of claims and slot leases before it
counts on it. A replica promoted in a failover then holds every read, slot and
lease a consumer acts on, so the failover cannot hand an entry or a slot to a
second consumer while the first still works under it.

On a Redis Cluster the marker write and WAIT go to the partition's primary on
a direct connection (``streamrec.connections.Direct``): the cluster client
would send a keyless WAIT to a node of its own choosing.
"""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from streamrec.connections import on_primary
from streamrec.keys import Keys

MARKER_TTL_MS = 60_000


class Unconfirmed(RedisError):
    """Redis took the writes but confirmed them on fewer replicas (or AOFs) than asked."""


class Confirmer:
    """Confirms a partition's writes so far on ``replicas`` replicas, waiting up to ``wait_ms``."""

    def __init__(self, redis: aioredis.Redis, *, replicas: int, wait_ms: int, name: str) -> None:
        self._redis = redis
        self.replicas = replicas
        self._wait_ms = max(wait_ms, 1)  # 0 would make WAIT block for ever
        self._name = name

    async def __call__(self, keys: Keys) -> None:
        """Return once the replicas have every write the partition's primary took before
        now; raise Unconfirmed when fewer confirm in time, RedisError when it fails."""
        acked = await on_primary(self._redis, keys.confirmed, lambda r: self._wait(r, keys))
        if acked < self.replicas:
            raise Unconfirmed(
                f"{acked} of {self.replicas} replicas acknowledged within {self._wait_ms} ms"
                f" (partition {keys.partition})"
            )

    async def _wait(self, redis: aioredis.Redis, keys: Keys) -> int:
        async with redis.pipeline(transaction=False) as pipe:
            pipe.set(keys.confirmed, self._name, px=MARKER_TTL_MS)
            pipe.wait(self.replicas, self._wait_ms)
            _, acked = await pipe.execute()
        return int(acked)
