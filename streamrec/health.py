"""Health: ``streamrec check`` for containers, and what a Redis server must offer.

``check`` exits 0 when Redis answers and a consumer heartbeat is fresh. A
heartbeat expires three beats after the last one, so "fresh" means "its entry
in the consumer registry has not expired".

``require_redis`` runs at the start of ``consume``, ``serve`` and ``run``: a
Redis before 7.0 is refused (XAUTOCLAIM's reply has three parts only since),
and an eviction policy other than ``noeviction`` is warned about loudly.
"""

from __future__ import annotations

import socket

import redis.asyncio as aioredis
import structlog
from redis.exceptions import ConnectionError, RedisError, TimeoutError

from streamrec import status
from streamrec.keys import Keys

log = structlog.get_logger("streamrec.health")


class UnsupportedRedis(RedisError):
    """The Redis server is too old for streamrec (its message names server and version)."""


async def require_redis(redis: aioredis.Redis, *, unreachable_ok: bool = False) -> None:
    """Check the server at start: raise UnsupportedRedis before 7.0, warn about eviction.

    An unreachable server raises RedisError, or with ``unreachable_ok`` (the
    webhook, which answers 503 until Redis is back) is logged and let pass.
    """
    try:
        server = await status.server(redis)
    except (ConnectionError, TimeoutError) as exc:
        if not unreachable_ok:
            raise
        log.warning("redis_not_checked", error=f"{type(exc).__name__}: {exc}")
        return
    if server.refusal:
        raise UnsupportedRedis(server.refusal)
    for warning in server.warnings:
        log.warning("redis_warning", warning=warning)


async def check(
    redis: aioredis.Redis, keys: Keys, *, consumer: str | None = None, this_host: bool = False
) -> tuple[bool, str]:
    """(healthy, one line saying why).

    With ``consumer``, that consumer's heartbeat must be fresh; with
    ``this_host``, one of a consumer on this host; otherwise any consumer's.
    """
    try:
        await redis.ping()
        beats = await status.heartbeats(redis, keys)
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
