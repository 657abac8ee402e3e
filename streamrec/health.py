"""Health: ``streamrec check`` for containers, and what a Redis server must offer.

``check`` exits 0 when Redis answers and a consumer heartbeat is fresh. A
heartbeat expires three beats after the last one, so "fresh" means "its entry
in the consumer registry has not expired".

``require_redis`` runs at the start of ``consume``, ``serve`` and ``run``: a
Redis before 7.0 is refused (XAUTOCLAIM's reply has three parts only since),
and an eviction policy other than ``noeviction`` is warned about loudly. For
the webhook it also checks what its confirmations need: WAITAOF is tried
(refused if the server has no such command or no AOF), and fewer replicas
online than STREAMREC_MIN_REPLICA_ACKS is a warning, not a refusal: a replica
may be restarting, and a webhook that is up answers 503 until it is back and
2xx from then on, while one that refused to start stays down until restarted.
"""

from __future__ import annotations

import asyncio
import socket

import redis.asyncio as aioredis
import structlog
from redis.exceptions import ConnectionError, RedisError, ResponseError, TimeoutError

from streamrec import status
from streamrec.connections import each_primary
from streamrec.keys import Keys
from streamrec.partitions import Layout, as_layout

log = structlog.get_logger("streamrec.health")


class UnsupportedRedis(RedisError):
    """The Redis server is too old for streamrec (its message names server and version)."""


class TooFewReplicas(RedisError):
    """Fewer replicas are online than the webhook's confirmations ask for."""


async def require_redis(
    redis: aioredis.Redis,
    *,
    unreachable_ok: bool = False,
    replica_acks: int = 0,
    wait_aof: bool = False,
) -> None:
    """Check the server at start: raise UnsupportedRedis before 7.0, warn about eviction.

    With ``wait_aof``, UnsupportedRedis also when the server cannot do
    ``WAITAOF 1 0`` (before 7.2, AOF off, command denied); with
    ``replica_acks``, a warning when fewer replicas are online. An unreachable
    server raises RedisError, or with ``unreachable_ok`` (the webhook, which
    answers 503 until Redis is back) is logged and let pass. On a cluster each
    primary is checked; one that does not answer (a failover under way) is
    logged and let pass when another answered.
    """
    try:
        async with each_primary(redis) as primaries:  # on a cluster, every primary
            checked = await asyncio.gather(
                *(_check(primary, replica_acks, wait_aof) for primary in primaries),
                return_exceptions=True,
            )
        failed = [c for c in checked if isinstance(c, BaseException)]
        unreachable = [c for c in failed if isinstance(c, ConnectionError | TimeoutError)]
        if len(unreachable) < len(failed):
            raise next(c for c in failed if c not in unreachable)
        if unreachable and len(unreachable) == len(checked):
            raise unreachable[0]
    except (ConnectionError, TimeoutError) as error:
        if not unreachable_ok:
            raise
        log.warning("redis_not_checked", error=f"{type(error).__name__}: {error}")
        return
    for lost in unreachable:
        log.warning("redis_primary_not_checked", error=f"{type(lost).__name__}: {lost}")
    answers = [c for c in checked if not isinstance(c, BaseException)]
    refusal = next((refused for refused, _ in answers if refused), None)
    if refusal:
        raise UnsupportedRedis(refusal)
    for _, warnings in answers:
        for warning in warnings:
            log.warning("redis_warning", warning=warning)


async def _check(
    primary: aioredis.Redis, replica_acks: int, wait_aof: bool
) -> tuple[str | None, list[str]]:
    """One server's refusal (None: fine) and warnings."""
    server = await status.server(primary)
    refusal = server.refusal or (await _waitaof_refusal(primary, server) if wait_aof else None)
    return refusal, [*server.warnings, *await _replica_warnings(primary, server, replica_acks)]


async def _waitaof_refusal(redis: aioredis.Redis, server: status.Server) -> str | None:
    """Why this server cannot confirm an AOF fsync (WAITAOF 1 0), or None.

    The command itself is tried (on a connection that wrote nothing, it
    answers at once): that finds an old server, AOF turned off and an ACL that
    denies it alike.
    """
    try:
        await redis.waitaof(1, 0, 1)
    except ResponseError as exc:
        return (
            f"STREAMREC_WAIT_AOF=1 needs WAITAOF (Redis 7.2 or later, appendonly yes);"
            f" Redis at {server.address} (version {server.version}) refused it: {exc}"
        )
    return None


async def _replica_warnings(
    redis: aioredis.Redis, server: status.Server, replica_acks: int
) -> list[str]:
    try:
        await require_replicas(redis, replica_acks)
    except TooFewReplicas as exc:
        return [
            f"STREAMREC_MIN_REPLICA_ACKS is {replica_acks} but Redis at {server.address} has"
            f" {exc}: callbacks are answered 503 until enough replicas are back"
        ]
    return []


async def require_replicas(redis: aioredis.Redis, wanted: int) -> None:
    """Raise TooFewReplicas unless ``wanted`` replicas of the server are online (in sync)."""
    if not wanted:
        return
    async with each_primary(redis) as primaries:  # on a cluster, each primary's own
        for primary in primaries:
            info = await primary.info("replication")
            replicas = [v for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)]
            online = sum(1 for replica in replicas if replica.get("state") == "online")
            if online < wanted:
                raise TooFewReplicas(f"{online} of {wanted} replicas online")


async def check(
    redis: aioredis.Redis,
    keys: Keys | Layout,
    *,
    consumer: str | None = None,
    this_host: bool = False,
) -> tuple[bool, str]:
    """(healthy, one line saying why).

    With ``consumer``, that consumer's heartbeat must be fresh; with
    ``this_host``, one of a consumer on this host; otherwise any consumer's.
    The registry is deployment-wide (the layout's ``home``): one read, whatever
    the partitions.
    """
    try:
        await redis.ping()
        beats = await status.heartbeats(redis, as_layout(keys).home)
    except (RedisError, OSError) as exc:
        return False, f"redis unreachable: {type(exc).__name__}: {exc}"
    host = socket.gethostname()
    if consumer is not None:
        beats = [b for b in beats if b.get("name") == consumer]
        scope = f"consumer {consumer}"
    elif this_host:
        beats = [b for b in beats if b.get("host") == host]
        scope = f"a consumer on {host}"
    else:
        scope = "any consumer"
    if not beats:
        return False, f"no fresh heartbeat from {scope}"
    names = ", ".join(sorted(str(b.get("name")) for b in beats))
    return True, f"ok: fresh heartbeat from {names}"
