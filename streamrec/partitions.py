"""Partitions: P streams, one per hash tag, so that one logical queue spans a Redis Cluster.

With ``STREAMREC_PARTITIONS=1`` (the default) there is one partition and its
keys are the namespace's, ``{streamrec}:recordings`` and so on, as they always
were. With P > 1, partition i has its own hash tag, and with it its own stream,
consumer group, dead letters, slots, parked lists and dedupe markers; what
belongs to the whole deployment stays under ``{<namespace>}`` (``home``).

* **A business belongs to one partition**: CRC-32 of its id, modulo P. Its
  slot keys, parked list and order stay beside its stream, so every script
  still touches one cluster slot; a RecordingSid's dedupe marker lives in its
  business's partition (the callback URL fixes the business, so a retry lands
  where its first attempt did).
* **Tags spread evenly over the cluster's slots.** Partition i's tag is
  ``<namespace>:<i>`` when that hashes into the i-th of P equal ranges of the
  16,384 cluster slots, else ``<namespace>:<i>:<n>`` with the smallest n that
  does. A cluster made with ``redis-cli --cluster create`` gives its primaries
  equal ranges, so P partitions fall on its primaries as evenly as P allows.
* **The count is recorded** in Redis (``{<namespace>}:partitions``) by the
  first process to start; a process configured with another count refuses to
  start (``PartitionsChanged``). ``python -m streamrec partitions set`` changes
  it once everything is drained (see ``streamrec.repartition``).
"""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache

import redis.asyncio as aioredis
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot
from redis.exceptions import ClusterDownError, ConnectionError, TimeoutError

from streamrec.keys import Keys

MAX_PARTITIONS = 1024


class PartitionsChanged(RuntimeError):
    """This process is configured with another partition count than Redis records."""


def tag(namespace: str, index: int, count: int) -> str:
    """The hash tag's text of partition ``index`` of ``count`` (empty for one partition:
    the namespace's own tag, as before partitions)."""
    if count == 1:
        return ""
    return _spread(namespace, index, count)


@cache
def _spread(namespace: str, index: int, count: int) -> str:
    low = index * REDIS_CLUSTER_HASH_SLOTS // count
    high = (index + 1) * REDIS_CLUSTER_HASH_SLOTS // count
    candidate = f"{namespace}:{index}"
    n = 0
    while not low <= key_slot(candidate.encode()) < high:
        candidate = f"{namespace}:{index}:{n}"
        n += 1
    return candidate


def index_of(business_id: str | None, count: int) -> int:
    """The partition of ``business_id`` (a stable hash: every process agrees)."""
    if count == 1 or not business_id:
        return 0
    return zlib.crc32(business_id.encode()) % count


@dataclass(frozen=True, slots=True)
class Layout:
    """The key layout of one namespace: its partitions and its deployment-wide keys."""

    namespace: str = "streamrec"
    count: int = 1
    partitions: tuple[Keys, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 1 <= self.count <= MAX_PARTITIONS:
            raise ValueError(f"partitions: {self.count} is not between 1 and {MAX_PARTITIONS}")
        parts = tuple(
            Keys(self.namespace, tag(self.namespace, i, self.count), i) for i in range(self.count)
        )
        object.__setattr__(self, "partitions", parts)

    @property
    def home(self) -> Keys:
        """The deployment-wide keys (registry, heartbeats, outcomes, reconcile, the count)."""
        return Keys(self.namespace)

    @property
    def partitioned(self) -> bool:
        """Whether there is more than one partition."""
        return self.count > 1

    def __iter__(self) -> Iterator[Keys]:
        return iter(self.partitions)

    def __len__(self) -> int:
        return self.count

    def of(self, business_id: str | None) -> Keys:
        """The keys of the partition ``business_id`` belongs to."""
        return self.partitions[index_of(business_id, self.count)]

    def slot(self, keys: Keys) -> int:
        """The cluster hash slot of a partition's keys."""
        return key_slot(keys.stream.encode())


def as_layout(keys: Keys | Layout) -> Layout:
    """``keys`` as a layout: a Layout as it is, a namespace's Keys as its one partition."""
    return keys if isinstance(keys, Layout) else Layout(keys.namespace, 1)


async def claim(redis: aioredis.Redis, layout: Layout, *, patience_s: float = 0.0) -> None:
    """Record the partition count if none is, else check it; raise PartitionsChanged if it
    differs. Every process that reads or writes the streams calls this at start.

    ``patience_s``: how long to keep trying while the server does not answer (on a
    cluster, a failover of the node holding the count takes seconds); RedisError after.
    """
    key = layout.home.partitions
    deadline = time.monotonic() + patience_s
    while True:
        try:
            await redis.set(key, layout.count, nx=True)
            recorded = await redis.get(key)
            break
        except (ConnectionError, TimeoutError, ClusterDownError):
            if time.monotonic() >= deadline:
                raise
            await asyncio.sleep(0.5)  # the failover being waited out
    if recorded is not None and int(recorded) != layout.count:
        raise PartitionsChanged(
            f"STREAMREC_PARTITIONS is {layout.count}, but namespace {layout.namespace!r} "
            f"has {int(recorded)} partitions (recorded in {key}). Start with "
            f"STREAMREC_PARTITIONS={int(recorded)}, or change the count as the README's "
            "'Changing the partition count' says (python -m streamrec partitions set)."
        )


async def recorded(redis: aioredis.Redis, namespace: str) -> int | None:
    """The partition count Redis records for ``namespace`` (None: no process started yet)."""
    value = await redis.get(Keys(namespace).partitions)
    return None if value is None else int(value)
