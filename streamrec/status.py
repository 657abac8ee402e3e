"""A read-only summary of the stream, its group, consumers, dead letters and server.

Only reads (XINFO, XPENDING, XLEN, the consumer registry, the last reconcile
run's result, INFO, CONFIG GET), so it never disturbs a live system. The
consumers' heartbeats come from the registry the monitor keeps, in one round
trip: no SCAN of a keyspace that holds a dedupe marker per recording of the
last days.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from streamrec import semaphore
from streamrec.keys import Keys

PER_CONSUMER_SCAN = 1000  # pending entries read per consumer to find its oldest idle one
MIN_VERSION = (7, 0)  # XAUTOCLAIM's reply with its third part (deleted ids)


async def collect(
    redis: aioredis.Redis, keys: Keys, *, detail: bool = True, default_slots: int = 0
) -> dict[str, Any]:
    """The status document: stream length, lag, pending, consumers, dead letters, slots,
    and the last reconcile run (None before the first).

    ``detail=False`` skips the per-consumer and per-business parts (what the
    consumer's own monitor samples every few seconds). ``default_slots`` is the
    limit of a business without an override (0: slots are off).
    """
    now_ms = int(time.time() * 1000)
    async with redis.pipeline(transaction=False) as pipe:
        pipe.xlen(keys.stream)
        pipe.xlen(keys.dead)
        pipe.get(keys.reconcile_last)
        length, dead, reconciled = await pipe.execute()
    report: dict[str, Any] = {
        "stream": keys.stream,
        "group": keys.group,
        "length": length,
        "dead_letters": dead,
        "lag": None,
        "pending": 0,
        "last_delivered_id": None,
        "oldest_pending_id": None,
        "oldest_pending_idle_ms": None,
        "consumers": [],
        "businesses": [],
        "redis": None,
        "warnings": [],
        "reconcile": _last_run(reconciled),
        "collected_at_ms": now_ms,
    }
    group = await _group(redis, keys)
    if group is not None:
        report["lag"] = group.get("lag")
        report["pending"] = group["pending"]
        report["last_delivered_id"] = group["last-delivered-id"]
        if group["pending"]:
            oldest = await redis.xpending_range(keys.stream, keys.group, "-", "+", 1)
            if oldest:
                report["oldest_pending_id"] = oldest[0]["message_id"]
                report["oldest_pending_idle_ms"] = oldest[0]["time_since_delivered"]
    if detail:
        facts = await server(redis)
        report["redis"] = asdict(facts)
        report["warnings"] = facts.warnings
        report["consumers"] = await _consumers(redis, keys, group is not None, now_ms)
        report["businesses"] = await semaphore.picture(redis, keys, default_limit=default_slots)
    return report


def _last_run(raw: str | None) -> dict[str, Any] | None:
    """The last reconcile run's result as the reconciler kept it (None: none, or unreadable)."""
    try:
        return dict(json.loads(raw)) if raw else None
    except (ValueError, TypeError):
        return None


async def _group(redis: aioredis.Redis, keys: Keys) -> dict[str, Any] | None:
    try:
        groups = await redis.xinfo_groups(keys.stream)
    except ResponseError:
        return None  # no stream yet
    return next((g for g in groups if g["name"] == keys.group), None)


async def _consumers(
    redis: aioredis.Redis, keys: Keys, has_group: bool, now_ms: int
) -> list[dict[str, Any]]:
    """Group members merged with live heartbeats, by consumer name."""
    found: dict[str, dict[str, Any]] = {}
    if has_group:
        for member in await redis.xinfo_consumers(keys.stream, keys.group):
            found[member["name"]] = {
                "name": member["name"],
                "pending": member["pending"],
                "idle_ms": member["idle"],
                "oldest_pending_idle_ms": await _oldest_idle(redis, keys, member),
                "heartbeat": None,
                "last_seen_ms_ago": member.get("inactive", member["idle"]),
            }
    for beat in await heartbeats(redis, keys):
        entry = found.setdefault(
            beat["name"],
            {"name": beat["name"], "pending": 0, "idle_ms": None, "oldest_pending_idle_ms": None},
        )
        entry["heartbeat"] = beat
        entry["last_seen_ms_ago"] = max(now_ms - int(beat.get("at_ms", now_ms)), 0)
    return sorted(found.values(), key=lambda c: str(c["name"]))


async def _oldest_idle(redis: aioredis.Redis, keys: Keys, member: dict[str, Any]) -> int | None:
    if not member["pending"]:
        return None
    entries = await redis.xpending_range(
        keys.stream, keys.group, "-", "+", PER_CONSUMER_SCAN, consumername=member["name"]
    )
    return max((int(e["time_since_delivered"]) for e in entries), default=None)


async def heartbeats(redis: aioredis.Redis, keys: Keys) -> list[dict[str, Any]]:
    """The live consumers' heartbeats, read from the consumer registry in one round trip.

    A consumer is live until the expiry its last beat set (Redis server time);
    expired members are left out here and pruned by the next beat.
    """
    async with redis.pipeline(transaction=True) as pipe:
        pipe.time()
        pipe.zrange(keys.consumers, 0, -1, withscores=True)
        pipe.hgetall(keys.heartbeats)
        (seconds, micros), members, raw = await pipe.execute()
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    beats = []
    for name, expiry in members:
        if expiry > now_ms and raw.get(name):
            try:
                beats.append(json.loads(raw[name]))
            except ValueError:
                continue
    return beats


@dataclass(frozen=True, slots=True)
class Server:
    """The Redis server streamrec talks to, as far as streamrec depends on it."""

    address: str
    """host:port (or socket path); never the password."""
    version: str
    maxmemory_policy: str | None
    """None when CONFIG GET is refused (managed Redis often disables it)."""

    @property
    def refusal(self) -> str | None:
        """Why streamrec cannot run against this server (a Redis before 7.0), or None."""
        parts = [int(p) if p.isdigit() else 0 for p in [*self.version.split("."), "0"][:2]]
        if tuple(parts) >= MIN_VERSION:
            return None
        return (
            f"Redis at {self.address} is version {self.version}; "
            f"streamrec needs Redis {'.'.join(map(str, MIN_VERSION))} or later"
        )

    @property
    def warnings(self) -> list[str]:
        """What is wrong with this server but does not stop streamrec (eviction, mostly)."""
        found = [self.refusal] if self.refusal else []
        lost = "Redis may evict the stream, dead letters or parked entries under memory pressure"
        if self.maxmemory_policy is None:
            found.append(
                f"maxmemory-policy of Redis at {self.address} could not be checked "
                f"(CONFIG GET refused): it must be noeviction, or {lost}"
            )
        elif self.maxmemory_policy != "noeviction":
            found.append(
                f"maxmemory-policy of Redis at {self.address} is {self.maxmemory_policy}: "
                f"{lost}; set it to noeviction"
            )
        return found


async def server(redis: aioredis.Redis) -> Server:
    """Address, version and eviction policy of ``redis``'s server.

    Raises RedisError when the server does not answer; a refused CONFIG GET
    gives a policy of None.
    """
    version = str((await redis.info("server"))["redis_version"])
    try:
        policy = (await redis.config_get("maxmemory-policy")).get("maxmemory-policy")
    except ResponseError:  # CONFIG disabled, renamed or denied by an ACL
        policy = None
    kwargs = redis.connection_pool.connection_kwargs
    address = kwargs.get("path") or f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"
    return Server(address=str(address), version=version, maxmemory_policy=policy)


def render(report: dict[str, Any]) -> str:
    """The status document as a few readable lines."""
    lines = [f"WARNING: {warning}" for warning in report.get("warnings", [])]
    lines += [
        f"stream {report['stream']}  group {report['group']}",
        f"  length {report['length']}  lag {report['lag']}  pending {report['pending']}"
        f"  oldest pending idle {_age(report['oldest_pending_idle_ms'])}"
        f"  dead letters {report['dead_letters']}",
    ]
    if report["consumers"]:
        lines.append("  consumers:")
        for c in report["consumers"]:
            alive = "alive" if c.get("heartbeat") else "no heartbeat"
            lines.append(
                f"    {c['name']:<36} pending {c['pending']:<6}"
                f" oldest idle {_age(c['oldest_pending_idle_ms']):<8}"
                f" last seen {_age(c['last_seen_ms_ago'])} ago ({alive})"
            )
    else:
        lines.append("  no consumers")
    now_ms = report.get("collected_at_ms") or int(time.time() * 1000)
    lines.append(_reconcile_line(report.get("reconcile"), now_ms))
    if report.get("businesses"):
        lines.append("  businesses (slots in use / limit, parked):")
        for b in report["businesses"]:
            lines.append(
                f"    {b['business_id']:<36} {b['in_use']}/{b['limit']}  parked {b['parked']}"
            )
    return "\n".join(lines)


def _reconcile_line(last: dict[str, Any] | None, now_ms: int) -> str:
    if last is None:
        return "  reconcile: no run yet"
    figures = (
        f"listed {last['listed']}  known {last['known']}  enqueued {last['enqueued']}"
        f"  unassigned {last['unassigned']}  pages {last['pages']}  {last['seconds']:.1f}s"
    )
    ago = _age(max(now_ms - int(last["started_ms"]), 0))
    result = f"FAILED: {last['error']}" if last.get("error") else figures
    return f"  reconcile: last run {ago} ago by {last['by']} over {last['window']}: {result}"


def _age(ms: int | None) -> str:
    if ms is None:
        return "-"
    if ms < 1000:
        return f"{ms}ms"
    if ms < 120_000:
        return f"{ms / 1000:.1f}s"
    return f"{ms / 60_000:.1f}m"
