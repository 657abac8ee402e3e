"""A read-only summary of the streams, their groups, consumers, dead letters and server.

Only reads (XINFO, XPENDING, XLEN, XRANGE of one entry, the consumer registry,
the outcome counts, the last reconcile run's result, INFO, CONFIG GET), so it
never disturbs a live system. The consumers' heartbeats come from the registry
the monitor keeps, in one round trip: no SCAN of a keyspace that holds a dedupe
marker per recording of the last days.

With several partitions (``streamrec.partitions``) each partition is read on
its own, all of them at once, never with a command that spans two; the
document's top-level figures are over every partition (summed; the oldest
pending entry and the entry waiting longest are the oldest of any), and its
``partitions`` list has each one's own figures. With one partition that list
has one element and every other field is what it always was.

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
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError, ResponseError

from streamrec import semaphore
from streamrec.aio import wait_set
from streamrec.connections import each_primary
from streamrec.keys import Keys
from streamrec.partitions import Layout, as_layout
from streamrec.retry import describe

PER_CONSUMER_SCAN = 1000  # pending entries read per consumer to find its oldest idle one
OUTCOMES = ("completed", "failed", "dead_lettered")
"""Outcomes counted: entries completed, attempts failed (and retried), entries dead-lettered."""
SLOT_MS = 10_000  # outcomes are counted per slot of this much Redis time
SLOTS_KEPT = 360  # an hour of slots
WINDOWS = {"last_minute": 6, "last_hour": SLOTS_KEPT}
"""Each window of the throughput and how many slots it sums (the newest one still filling)."""
MIN_VERSION = (7, 0)  # XAUTOCLAIM's reply with its third part (deleted ids)


def named(layout: Layout) -> Keys:
    """Keys whose names stand for every partition's: the partition's own with one, else
    a glob (``{ns:*}:recordings``) matching each partition's key and no other namespace's."""
    if not layout.partitioned:
        return layout.partitions[0]
    return Keys(layout.namespace, f"{layout.namespace}:*")


def entry_order(entry_id: str) -> tuple[int, int]:
    """A stream entry id as (ms, sequence), to compare ids of different streams by time."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


@dataclass(slots=True)
class Part:
    """One partition's figures, as read for the document."""

    keys: Keys
    length: int
    dead_letters: int
    group: dict[str, Any] | None
    """XINFO GROUPS's entry for the group (None: no stream or no group yet)."""
    oldest_pending_id: str | None = None
    oldest_pending_idle_ms: int | None = None
    parked: int | None = None
    """Entries parked in the partition (None: not read, as without ``detail``)."""

    @property
    def pending(self) -> int:
        return int(self.group["pending"]) if self.group else 0

    @property
    def lag(self) -> int | None:
        lag = self.group.get("lag") if self.group else None
        return None if lag is None else int(lag)

    @property
    def last_delivered_id(self) -> str | None:
        return str(self.group["last-delivered-id"]) if self.group else None

    def public(self) -> dict[str, Any]:
        """The partition's element of the document's ``partitions`` list."""
        return {
            "index": self.keys.partition,
            "tag": self.keys.tag or self.keys.namespace,
            "stream": self.keys.stream,
            "length": self.length,
            "lag": self.lag,
            "pending": self.pending,
            "dead_letters": self.dead_letters,
            "oldest_pending_id": self.oldest_pending_id,
            "oldest_pending_idle_ms": self.oldest_pending_idle_ms,
            "parked": self.parked,
        }


async def read_part(redis: aioredis.Redis, keys: Keys) -> Part:
    """One partition's length, dead letters, group and oldest pending entry (two round
    trips at most, every key under the partition's hash tag)."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.xlen(keys.stream)
        pipe.xlen(keys.dead)
        pipe.xinfo_groups(keys.stream)
        length, dead, groups = await pipe.execute(raise_on_error=False)
    for answer in (length, dead):
        if isinstance(answer, Exception):
            raise answer
    if isinstance(groups, ResponseError):
        groups = []  # no stream yet
    elif isinstance(groups, Exception):
        raise groups
    group = next((g for g in groups if g["name"] == keys.group), None)
    part = Part(keys=keys, length=int(length), dead_letters=int(dead), group=group)
    if part.pending:
        oldest = await redis.xpending_range(keys.stream, keys.group, "-", "+", 1)
        if oldest:
            part.oldest_pending_id = str(oldest[0]["message_id"])
            part.oldest_pending_idle_ms = int(oldest[0]["time_since_delivered"])
    return part


def _lag(parts: list[Part]) -> int | None:
    """The lag over partitions: None when no partition has the group yet, or when one
    holding entries cannot say its own (Redis answers no lag after some deletions)."""
    if all(p.group is None for p in parts):
        return None
    if any(p.lag is None and p.length for p in parts):
        return None
    return sum(p.lag or 0 for p in parts)


def _idlest(part: Part) -> tuple[int, int, int]:
    """Order of partitions by their oldest pending entry: most idle, then earliest added."""
    ms, seq = entry_order(str(part.oldest_pending_id))
    return int(part.oldest_pending_idle_ms or 0), -ms, -seq


def _totals(parts: list[Part]) -> dict[str, Any]:
    """The document's figures over every partition."""
    delivered = [p.last_delivered_id for p in parts if p.last_delivered_id is not None]
    pending = [p for p in parts if p.oldest_pending_idle_ms is not None]
    # The oldest pending entry's id and idle time come from one partition, as with one.
    oldest = max(pending, key=_idlest, default=None)
    return {
        "length": sum(p.length for p in parts),
        "dead_letters": sum(p.dead_letters for p in parts),
        "lag": _lag(parts),
        "pending": sum(p.pending for p in parts),
        "last_delivered_id": max(delivered, key=entry_order, default=None),
        "oldest_pending_id": oldest.oldest_pending_id if oldest else None,
        "oldest_pending_idle_ms": oldest.oldest_pending_idle_ms if oldest else None,
    }


async def collect(
    redis: aioredis.Redis, keys: Keys | Layout, *, detail: bool = True, default_slots: int = 0
) -> dict[str, Any]:
    """The status document: stream length, lag, pending, consumers, dead letters, slots,
    the last reconcile run (None before the first), the entry waiting longest, the
    group's outcomes in the last minute and hour, and each partition's figures.

    ``detail=False`` skips the per-consumer, per-business, throughput and
    oldest-waiting parts (what the consumer's own monitor samples every few
    seconds). ``default_slots`` is the limit of a business without an override
    (0: slots are off). ``keys`` is the layout, or a namespace's Keys for its
    one partition. Raises RedisError when Redis does not answer.
    """
    layout = as_layout(keys)
    now_ms = int(time.time() * 1000)
    each = asyncio.gather(*(read_part(redis, part) for part in layout))
    reconciled, server_time, parts = await asyncio.gather(
        redis.get(layout.home.reconcile_last), redis.time(), each
    )
    names = named(layout)
    report: dict[str, Any] = {
        "stream": names.stream,
        "group": names.group,
        **_totals(parts),
        "parked": None,
        "consumers": [],
        "businesses": [],
        "redis": None,
        "warnings": [],
        "reconcile": _last_run(reconciled),
        "oldest_waiting": None,
        "throughput": None,
        "collected_at_ms": now_ms,
    }
    if detail:
        server_ms = int(server_time[0]) * 1000 + int(server_time[1]) // 1000
        servers, consumers, businesses_, waiting, flow = await asyncio.gather(
            _servers(redis),
            _consumers(redis, layout, parts, now_ms),
            _businesses(redis, parts, default_slots),
            _oldest_waiting(redis, parts, server_ms),
            throughput(redis, layout.home),
        )
        report |= {
            "redis": asdict(servers[0]),
            "warnings": list(dict.fromkeys(w for facts in servers for w in facts.warnings)),
            "consumers": consumers,
            "businesses": businesses_,
            "parked": sum(p.parked or 0 for p in parts),
            "oldest_waiting": waiting,
            "throughput": flow,
        }
    report["partitions"] = [p.public() for p in parts]
    return report


async def businesses(
    redis: aioredis.Redis, keys: Keys | Layout, *, default_limit: int
) -> list[dict[str, Any]]:
    """Per business: slots in use, limit and parked count (``semaphore.picture`` of each
    partition, read at once), sorted by name."""
    parts = [Part(keys=part, length=0, dead_letters=0, group=None) for part in as_layout(keys)]
    return await _businesses(redis, parts, default_limit)


async def _businesses(
    redis: aioredis.Redis, parts: list[Part], default_limit: int
) -> list[dict[str, Any]]:
    """The merged slots picture; sets each part's ``parked``."""
    pictures = await asyncio.gather(
        *(semaphore.picture(redis, p.keys, default_limit=default_limit) for p in parts)
    )
    for part, picture in zip(parts, pictures, strict=True):
        part.parked = sum(int(b["parked"]) for b in picture)
    return sorted((b for picture in pictures for b in picture), key=lambda b: b["business_id"])


async def _oldest_waiting(
    redis: aioredis.Redis, parts: list[Part], now_ms: int
) -> dict[str, Any] | None:
    """The entry waiting longest: per partition its oldest pending one, else its oldest
    not yet delivered; of those, the one added first.

    Its age is since it was added (its id is Redis time then); None: nothing waits.
    """
    found = await asyncio.gather(*(_waiting_in(redis, p) for p in parts))
    waiting = [w for w in found if w is not None]
    if not waiting:
        return None
    first = min(waiting, key=lambda w: entry_order(w["id"]))
    added_ms = entry_order(first["id"])[0]
    return {**first, "age_ms": max(now_ms - added_ms, 0)}


async def _waiting_in(redis: aioredis.Redis, part: Part) -> dict[str, Any] | None:
    """The entry waiting longest in one partition (without its age), or None."""
    if part.oldest_pending_id is not None:
        entry_id, delivered = part.oldest_pending_id, True
    else:
        after = part.last_delivered_id
        stream = part.keys.stream
        first = await redis.xrange(stream, "-" if after is None else f"({after}", "+", 1)
        if not first:
            return None
        entry_id, delivered = str(first[0][0]), False
    return {"id": entry_id, "delivered": delivered, "partition": part.keys.partition}


async def throughput(redis: aioredis.Redis, home: Keys) -> dict[str, dict[str, int]]:
    """The group's outcomes (OUTCOMES) per window (WINDOWS), from the counts the
    consumers' heartbeats add to ``home`` (the deployment-wide keys); Redis time says
    which slots a window holds."""
    # TIME on its own: a Redis Cluster client sends no keyless command in a pipeline.
    (seconds, micros), counts = await asyncio.gather(redis.time(), redis.hgetall(home.outcomes))
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


def _last_run(raw: str | bytes | None) -> dict[str, Any] | None:
    """The last reconcile run's result as the reconciler kept it (None: none, or unreadable)."""
    try:
        return dict(json.loads(raw)) if raw else None
    except (ValueError, TypeError):
        return None


async def _consumers(
    redis: aioredis.Redis, layout: Layout, parts: list[Part], now_ms: int
) -> list[dict[str, Any]]:
    """Group members of every partition merged with live heartbeats, by consumer name."""
    members = await asyncio.gather(*(_members(redis, p) for p in parts if p.group is not None))
    found: dict[str, dict[str, Any]] = {}
    for member in (m for of_part in members for m in of_part):
        entry = found.get(member["name"])
        found[member["name"]] = member if entry is None else _merged(entry, member)
    for beat in await heartbeats(redis, layout.home):
        entry = found.setdefault(
            beat["name"],
            {"name": beat["name"], "pending": 0, "idle_ms": None, "oldest_pending_idle_ms": None},
        )
        entry["heartbeat"] = beat
        entry["last_seen_ms_ago"] = max(now_ms - int(beat.get("at_ms", now_ms)), 0)
    return sorted(found.values(), key=lambda c: str(c["name"]))


async def _members(redis: aioredis.Redis, part: Part) -> list[dict[str, Any]]:
    """One partition's group members: what each holds there and when it was last active."""
    keys = part.keys
    raw = await redis.xinfo_consumers(keys.stream, keys.group)
    oldest = await asyncio.gather(*(_oldest_idle(redis, keys, m) for m in raw))
    return [
        {
            "name": m["name"],
            "pending": m["pending"],
            "idle_ms": m["idle"],
            "oldest_pending_idle_ms": idle,
            "heartbeat": None,
            "last_seen_ms_ago": m.get("inactive", m["idle"]),
        }
        for m, idle in zip(raw, oldest, strict=True)
    ]


def _merged(one: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """A consumer's figures of two partitions as one: what it holds summed, its oldest
    pending entry the idlest, its last activity the latest."""
    idle = [
        v for v in (one["oldest_pending_idle_ms"], other["oldest_pending_idle_ms"]) if v is not None
    ]
    return {
        **one,
        "pending": one["pending"] + other["pending"],
        "idle_ms": _latest(one["idle_ms"], other["idle_ms"]),
        "oldest_pending_idle_ms": max(idle, default=None),
        "last_seen_ms_ago": _latest(one["last_seen_ms_ago"], other["last_seen_ms_ago"]),
    }


def _latest(one: int, other: int) -> int:
    """The shorter of two times since (Redis says -1 for a consumer that never read)."""
    known = [v for v in (one, other) if v >= 0]
    return min(known, default=one)


async def _oldest_idle(redis: aioredis.Redis, keys: Keys, member: dict[str, Any]) -> int | None:
    if not member["pending"]:
        return None
    entries = await redis.xpending_range(
        keys.stream, keys.group, "-", "+", PER_CONSUMER_SCAN, consumername=member["name"]
    )
    return max((int(e["time_since_delivered"]) for e in entries), default=None)


async def heartbeats(redis: aioredis.Redis, home: Keys) -> list[dict[str, Any]]:
    """The live consumers' heartbeats, read from the consumer registry (``home``, the
    deployment-wide keys) in one round trip.

    A consumer is live until the expiry its last beat set (Redis server time);
    expired members are left out here and pruned by the next beat.
    """
    # The time is asked first, on its own (a Redis Cluster client sends no keyless
    # command in a pipeline): a beat renewed meanwhile only lives longer.
    seconds, micros = await redis.time()
    async with redis.pipeline(transaction=True) as pipe:
        pipe.zrange(home.consumers, 0, -1, withscores=True)
        pipe.hgetall(home.heartbeats)
        members, raw = await pipe.execute()
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


async def _servers(redis: aioredis.Redis) -> list[Server]:
    """The facts of the server, or on a Redis Cluster of each primary: the document's
    ``redis`` is the first's, its ``warnings`` every one's."""
    async with each_primary(redis) as primaries:
        return list(await asyncio.gather(*(server(primary) for primary in primaries)))


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
    return Server(address=_address(redis), version=version, maxmemory_policy=policy)


def _address(redis: aioredis.Redis) -> str:
    """host:port (or socket path) of the server ``redis`` asks INFO: of a cluster, the
    node the client sends keyless commands to."""
    if isinstance(redis, RedisCluster):
        node = redis.get_default_node()
        return f"{node.host}:{node.port}"
    kwargs = redis.connection_pool.connection_kwargs
    return str(
        kwargs.get("path") or f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"
    )


CLEAR = "\x1b[H\x1b[2J"
"""Cursor home, then erase the screen: what ``watch`` writes before each frame."""


async def watch(
    redis: aioredis.Redis,
    keys: Keys | Layout,
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
    """The status document as a few readable lines; with more than one partition, the
    figures are over all of them and a table gives each one's."""
    parts = report.get("partitions") or []
    several = len(parts) > 1
    lines = [f"WARNING: {warning}" for warning in report.get("warnings", [])]
    lines += [
        f"stream {report['stream']}{f' ({len(parts)} partitions)' if several else ''}"
        f"  group {report['group']}",
        f"  length {report['length']}  lag {report['lag']}  pending {report['pending']}"
        f"  oldest pending idle {_age(report['oldest_pending_idle_ms'])}"
        f"  dead letters {report['dead_letters']}",
        *(_partition_lines(parts) if several else []),
        *_flow_lines(report, several),
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


def _partition_lines(parts: list[dict[str, Any]]) -> list[str]:
    """One line per partition: its stream and its own figures."""
    width = max(len(p["stream"]) for p in parts)
    lines = [
        f"  {'partition':>9}  {'stream':<{width}}  {'length':>8} {'lag':>8} {'pending':>8}"
        f"  {'oldest idle':<11} {'dead':>6} {'parked':>6}"
    ]
    for p in parts:
        parked = "-" if p["parked"] is None else p["parked"]
        lines.append(
            f"  {p['index']:>9}  {p['stream']:<{width}}  {p['length']:>8} {_shown(p['lag']):>8}"
            f" {p['pending']:>8}  {_age(p['oldest_pending_idle_ms']):<11}"
            f" {p['dead_letters']:>6} {parked:>6}"
        )
    return lines


def _shown(value: object) -> str:
    return "-" if value is None else str(value)


def _flow_lines(report: dict[str, Any], several: bool = False) -> list[str]:
    """The entry waiting longest and the outcomes per window (when collected)."""
    lines = []
    if "oldest_waiting" in report:
        waiting = report["oldest_waiting"]
        state = "pending" if waiting and waiting["delivered"] else "not yet delivered"
        where = f" in partition {waiting.get('partition')}" if waiting and several else ""
        lines.append(
            f"  oldest waiting {waiting['id']}{where}, added {_age(waiting['age_ms'])} ago"
            f" ({state})"
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
