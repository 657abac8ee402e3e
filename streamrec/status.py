"""A read-only summary of the stream, its group, consumers and dead letters.

Uses only XINFO, XPENDING and XLEN, so it never disturbs a live system.
"""

from __future__ import annotations

import time
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from streamrec.keys import Keys


async def collect(redis: aioredis.Redis, keys: Keys) -> dict[str, Any]:
    """The status document: stream length, lag, pending per consumer, dead letters."""
    now_ms = int(time.time() * 1000)
    report: dict[str, Any] = {
        "stream": keys.stream,
        "group": keys.group,
        "length": await redis.xlen(keys.stream),
        "dead_letters": await redis.xlen(keys.dead),
        "lag": None,
        "pending": 0,
        "last_delivered_id": None,
        "oldest_pending_id": None,
        "oldest_pending_idle_ms": None,
        "consumers": [],
        "collected_at_ms": now_ms,
    }
    try:
        groups = await redis.xinfo_groups(keys.stream)
    except ResponseError:
        return report  # no stream yet
    group = next((g for g in groups if g["name"] == keys.group), None)
    if group is None:
        return report
    report["lag"] = group.get("lag")
    report["pending"] = group["pending"]
    report["last_delivered_id"] = group["last-delivered-id"]
    if group["pending"]:
        oldest = await redis.xpending_range(keys.stream, keys.group, min="-", max="+", count=1)
        if oldest:
            report["oldest_pending_id"] = oldest[0]["message_id"]
            report["oldest_pending_idle_ms"] = oldest[0]["time_since_delivered"]
    for consumer in await redis.xinfo_consumers(keys.stream, keys.group):
        report["consumers"].append(
            {
                "name": consumer["name"],
                "pending": consumer["pending"],
                "idle_ms": consumer["idle"],
                "last_seen_ms_ago": consumer.get("inactive", consumer["idle"]),
            }
        )
    return report


def render(report: dict[str, Any]) -> str:
    """The status document as a few readable lines."""
    lines = [
        f"stream {report['stream']}  group {report['group']}",
        f"  length {report['length']}  lag {report['lag']}  pending {report['pending']}"
        f"  oldest pending idle {_age(report['oldest_pending_idle_ms'])}"
        f"  dead letters {report['dead_letters']}",
    ]
    if report["consumers"]:
        lines.append("  consumers:")
        for c in report["consumers"]:
            seen = _age(c["last_seen_ms_ago"])
            lines.append(f"    {c['name']:<40} pending {c['pending']:<6} last seen {seen} ago")
    else:
        lines.append("  no consumers have joined the group")
    return "\n".join(lines)


def _age(ms: int | None) -> str:
    if ms is None:
        return "-"
    if ms < 1000:
        return f"{ms}ms"
    if ms < 120_000:
        return f"{ms / 1000:.1f}s"
    return f"{ms / 60_000:.1f}m"
