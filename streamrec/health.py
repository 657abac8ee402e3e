"""``streamrec check``: exit 0 when Redis answers and a consumer heartbeat is fresh.

For container health checks. A heartbeat key expires three beats after the
last one, so "fresh" means "its key still exists".
"""

from __future__ import annotations

import socket

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from streamrec import status
from streamrec.keys import Keys


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
