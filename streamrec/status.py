"""A read-only summary of the stream, its group, consumers, dead letters and server.

Only reads (XINFO, XPENDING, XLEN, XRANGE of one entry, the consumer registry,
the outcome counts, the last reconcile run's result, INFO, CONFIG GET), so it
never disturbs a live system. The consumers' heartbeats come from the registry
the monitor keeps, in one round trip: no SCAN of a keyspace that holds a dedupe
marker per recording of the last days.

Throughput comes from counts in Redis, not from PostgreSQL rows: the
consumers' heartbeats add their outcomes to per-slot counts (see
``monitor_beat.lua``), so ``status`` needs only Redis, answers the same while
the database is down (when an on-call engineer most needs it), costs one
HGETALL however large the table, and counts what the group did, failed
attempts and dead letters included, which rows do not record.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, TextIO

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from streamrec import semaphore
from streamrec.aio import wait_set
from streamrec.keys import Keys
from streamrec.retry import describe

PER_CONSUMER_SCAN = 1000  # pending entries read per consumer to find its oldest idle one
OUTCOMES = ("completed", "failed", "dead_lettered")
"""Outcomes counted: entries completed, attempts failed (and retried), entries dead-lettered."""
SLOT_MS = 10_000  # outcomes are counted per slot of this much Redis time
SLOTS_KEPT = 360  # an hour of slots
WINDOWS = {"last_minute": 6, "last_hour": SLOTS_KEPT}
"""Each window of the throughput and how many slots it sums (the newest one still filling)."""
MIN_VERSION = (7, 0)  # XAUTOCLAIM's reply with its third part (deleted ids)


async def collect(
    redis: aioredis.Redis, keys: Keys, *, detail: bool = True, default_slots: int = 0
) -> dict[str, Any]:
    """The status document: stream length, lag, pending, consumers, dead letters, slots,
    the last reconcile run (None before the first), the entry waiting longest and
    the group's outcomes in the last minute and hour.

    ``detail=False`` skips the per-consumer, per-business, throughput and
    oldest-waiting parts (what the consumer's own monitor samples every few
    seconds). ``default_slots`` is the limit of a business without an override
    (0: slots are off). Raises RedisError when Redis does not answer.
    """
    now_ms = int(time.time() * 1000)
    async with redis.pipeline(transaction=False) as pipe:
        pipe.xlen(keys.stream)
        pipe.xlen(keys.dead)
        pipe.get(keys.reconcile_last)
        pipe.time()
        length, dead, reconciled, server_time = await pipe.execute()
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
        "oldest_waiting": None,
        "throughput": None,
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
        server_ms = int(server_time[0]) * 1000 + int(server_time[1]) // 1000
        report["oldest_waiting"] = await _oldest_waiting(redis, keys, report, server_ms)
        report["throughput"] = await throughput(redis, keys)
    return report


async def _oldest_waiting(
    redis: aioredis.Redis, keys: Keys, report: dict[str, Any], now_ms: int
) -> dict[str, Any] | None:
    """The entry waiting longest: the oldest pending one, else the oldest not yet delivered.

    Its age is since it was added (its id is Redis time then); None: nothing waits.
    """
    entry_id, delivered = report["oldest_pending_id"], True
    if entry_id is None:
        after = report["last_delivered_id"]
        first = await redis.xrange(keys.stream, "-" if after is None else f"({after}", "+", 1)
        if not first:
            return None
        entry_id, delivered = first[0][0], False
    added_ms = int(str(entry_id).partition("-")[0])
    return {"id": entry_id, "age_ms": max(now_ms - added_ms, 0), "delivered": delivered}


async def throughput(redis: aioredis.Redis, keys: Keys) -> dict[str, dict[str, int]]:
    """The group's outcomes (OUTCOMES) per window (WINDOWS), from the counts the
    consumers' heartbeats add; Redis time says which slots a window holds."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.time()
        pipe.hgetall(keys.outcomes)
        (seconds, micros), counts = await pipe.execute()
    now_slot = (int(seconds) * 1000 + int(micros) // 1000) // SLOT_MS
    sums = {window: dict.fromkeys(OUTCOMES, 0) for window in WINDOWS}
    for field, count in counts.items():
        outcome, _, slot = str(field).rpartition(":")
        if outcome not in OUTCOMES or not slot.isdigit():
            continue
        for window, slots in WINDOWS.items():
            if 0 <= now_slot - int(slot) < slots:
                sums[window][outcome] += int(count)
    return sums


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


CLEAR = "\x1b[H\x1b[2J"
"""Cursor home, then erase the screen: what ``watch`` writes before each frame."""


async def watch(
    redis: aioredis.Redis,
    keys: Keys,
    *,
    default_slots: int,
    every_s: float,
    as_json: bool,
    stop: asyncio.Event,
    frames: int | None = None,
    out: TextIO = sys.stdout,
) -> None:
    """Redraw the status in place every ``every_s`` until ``stop`` (or ``frames`` drawn).

    Each frame clears the screen and draws ``render``'s lines under a header, as
    ``top`` does; ``as_json`` writes one document per line instead. A Redis that
    does not answer makes a frame saying so, and the next frame tries again.
    """
    drawn = 0
    while not stop.is_set():
        try:
            report = await collect(redis, keys, default_slots=default_slots)
            text = json.dumps(report) if as_json else render(report)
        except RedisError as exc:
            text = f"Redis did not answer: {describe(exc)}"
        if not as_json:
            now = time.strftime("%H:%M:%S")
            text = f"{CLEAR}streamrec status at {now}, every {every_s:g}s (Ctrl-C: stop)\n{text}"
        print(text, file=out, flush=True)
        drawn += 1
        if drawn == frames or await wait_set(stop, every_s):
            return


def render(report: dict[str, Any]) -> str:
    """The status document as a few readable lines."""
    lines = [f"WARNING: {warning}" for warning in report.get("warnings", [])]
    lines += [
        f"stream {report['stream']}  group {report['group']}",
        f"  length {report['length']}  lag {report['lag']}  pending {report['pending']}"
        f"  oldest pending idle {_age(report['oldest_pending_idle_ms'])}"
        f"  dead letters {report['dead_letters']}",
        *_flow_lines(report),
    ]
    if report["consumers"]:
        lines.append("  consumers:")
        lines += [_consumer_line(c) for c in report["consumers"]]
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


def _flow_lines(report: dict[str, Any]) -> list[str]:
    """The entry waiting longest and the outcomes per window (when collected)."""
    lines = []
    if "oldest_waiting" in report:
        waiting = report["oldest_waiting"]
        state = "pending" if waiting and waiting["delivered"] else "not yet delivered"
        lines.append(
            f"  oldest waiting {waiting['id']}, added {_age(waiting['age_ms'])} ago ({state})"
            if waiting
            else "  oldest waiting: none"
        )
    for window, counts in (report.get("throughput") or {}).items():
        lines.append(
            f"  {window.replace('_', ' ') + ':':<12} completed {counts['completed']}"
            f"  failed attempts {counts['failed']}  dead-lettered {counts['dead_lettered']}"
        )
    return lines


def _consumer_line(c: dict[str, Any]) -> str:
    """One consumer: what it holds, what it did (from its heartbeat) and when it was seen."""
    beat = c.get("heartbeat")
    did = ""
    if beat:
        port = beat.get("metrics_port")
        did = f" processed {beat.get('processed', 0):<7} {beat.get('rate_per_s', 0.0):>7.2f}/s"
        did += f"  metrics {beat.get('host')}:{port}" if port else ""
    alive = "alive" if beat else "no heartbeat"
    return (
        f"    {c['name']:<36} pending {c['pending']:<6}"
        f" oldest idle {_age(c['oldest_pending_idle_ms']):<8}{did}"
        f"  last seen {_age(c['last_seen_ms_ago'])} ago ({alive})"
    )


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
