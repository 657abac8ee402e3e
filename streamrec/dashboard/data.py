"""What the dashboard shows: the JSON document behind its pages, and its lookups.

The document (``GET /ui/api/status``) is ``status --json``'s, from Redis only,
plus the health of the webhook's dependencies, the flow per minute of the last
hour and each business's completed and failed recordings of the last hour from
PostgreSQL. A dependency that does not answer within a second or two is shown
as down and its parts as null; the rest of the document is still served (the
moment someone opens the dashboard is often the moment something is down).

With several partitions every Redis part is read per partition, all at once,
and summed or merged as ``status`` does; the document's ``partitions`` list
has each one's figures, and dead letters are named ``<partition>/<id>``.

The lookups (recordings, dead letters, the audio file) take ids from the
request only after they match their formats; the audio file is served only
from inside the media directory.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import redis.asyncio as aioredis
from aiohttp import web

from streamrec import deadletters, status
from streamrec.events import RECORDING_SID
from streamrec.keys import Keys
from streamrec.partitions import Layout
from streamrec.retry import describe
from streamrec.tally import WEBHOOK_OUTCOMES

PROBE_S = 1.0
"""How long a health probe waits for Redis or PostgreSQL."""
READ_S = 5.0
"""How long one part of the document may take before it is left out."""
MINUTES = 60
SERIES = (*status.OUTCOMES, *WEBHOOK_OUTCOMES)
"""The flow chart's series: the consumers' outcomes, then the webhook's answers."""
SEARCH_LIMIT = 50
T = TypeVar("T")

RECENT = """
SELECT business_id,
       count(*) FILTER (WHERE status = 'completed') AS completed,
       count(*) FILTER (WHERE status = 'failed') AS failed
FROM recordings
WHERE updated_at > now() - interval '1 hour'
GROUP BY business_id
"""
LISTED = "recording_sid, call_sid, business_id, status, attempts, error, created_at, updated_at"
SEARCH = f"""
(SELECT {LISTED} FROM recordings WHERE recording_sid = $1)
UNION
(SELECT {LISTED} FROM recordings WHERE call_sid = $1 ORDER BY created_at DESC LIMIT $2)
UNION
(SELECT {LISTED} FROM recordings WHERE business_id = $1 ORDER BY created_at DESC LIMIT $2)
ORDER BY created_at DESC
LIMIT $2
"""  # noqa: S608 - the interpolated text is the column list above, not input


@dataclass(frozen=True, slots=True)
class Backend:
    """Where the dashboard reads from and writes to, and the knobs it shows."""

    redis: aioredis.Redis
    layout: Layout
    pool: Any
    """An asyncpg pool (the webhook's)."""
    media_dir: Path
    default_slots: int
    """STREAMREC_BUSINESS_SLOTS: a business's limit unless it has its own (0: off)."""
    lease_ms: int


BACKEND_KEY: web.AppKey[Backend] = web.AppKey("backend", Backend)


async def _answers(check: Callable[[], Awaitable[Any]]) -> bool:
    try:
        async with asyncio.timeout(PROBE_S):
            await check()
    except Exception:  # whatever the reason, it is down for the person looking
        return False
    return True


async def _select_one(pool: Any) -> None:
    async with pool.acquire(timeout=PROBE_S) as conn:
        await conn.fetchval("SELECT 1", timeout=PROBE_S)


async def health(backend: Backend) -> dict[str, bool]:
    """Whether each dependency answers within PROBE_S (the webhook does: it is answering)."""
    redis, postgres = await asyncio.gather(
        _answers(backend.redis.ping), _answers(lambda: _select_one(backend.pool))
    )
    return {"webhook": True, "redis": redis, "postgres": postgres}


async def document(backend: Backend) -> dict[str, Any]:
    """The JSON document: ``status --json``'s plus ``health``, ``series`` and
    ``recent_businesses``, the latter merged into ``businesses``.

    Parts that could not be read are null (the status part's keys are absent
    when Redis is down) and ``errors`` says why.
    """
    doc: dict[str, Any] = {"health": await health(backend), "errors": []}
    report, recent = await asyncio.gather(
        _part(doc, "redis", _redis_part(backend), skip=not doc["health"]["redis"]),
        _part(doc, "postgres", recent_businesses(backend.pool), skip=not doc["health"]["postgres"]),
    )
    if report is not None:
        report, series_ = report
        doc = {**report, **doc, "series": series_}
        doc["businesses"] = merge(report["businesses"], recent, backend.default_slots)
    else:
        doc["series"] = None
    doc["recent_businesses"] = recent
    return doc


async def _redis_part(backend: Backend) -> tuple[dict[str, Any], dict[str, list[int]]]:
    report = await status.collect(
        backend.redis, backend.layout, default_slots=backend.default_slots
    )
    return report, await series(backend.redis, backend.layout.home)


async def _part(doc: dict[str, Any], name: str, work: Awaitable[T], *, skip: bool) -> T | None:
    """``work``'s result, or None (its reason added to ``doc["errors"]``)."""
    if skip:
        if asyncio.iscoroutine(work):
            work.close()
        doc["errors"].append(f"{name} did not answer within {PROBE_S:g} s")
        return None
    try:
        async with asyncio.timeout(READ_S):
            return await work
    except Exception as exc:  # a part left out says why; the rest is still shown
        doc["errors"].append(f"{name}: {describe(exc)}")
        return None


async def series(redis: aioredis.Redis, home: Keys) -> dict[str, list[int]]:
    """Per minute of the last MINUTES (oldest first, the current one last): the unix
    minutes, then each of SERIES summed over the minute's six slots (from ``home``'s
    deployment-wide counts)."""
    # TIME on its own: a Redis Cluster client sends no keyless command in a pipeline.
    (seconds, _), counts = await asyncio.gather(redis.time(), redis.hgetall(home.outcomes))
    now = int(seconds) // 60
    first = now - MINUTES + 1
    flow = {name: [0] * MINUTES for name in SERIES}
    for field, count in counts.items():
        outcome, _, slot = str(field).rpartition(":")
        if outcome not in flow or not slot.isdigit():
            continue
        minute = int(slot) * status.SLOT_MS // 60_000
        if first <= minute <= now:
            flow[outcome][minute - first] += int(count)
    return {"minutes": list(range(first, now + 1)), **flow}


async def recent_businesses(pool: Any) -> list[dict[str, Any]]:
    """Per business, its recordings completed and failed in the last hour (by updated_at)."""
    rows = await pool.fetch(RECENT, timeout=READ_S)
    return [
        {"business_id": r["business_id"], "completed": r["completed"], "failed": r["failed"]}
        for r in rows
    ]


def merge(
    picture: list[dict[str, Any]], recent: list[dict[str, Any]] | None, default_limit: int
) -> list[dict[str, Any]]:
    """The slots picture with each business's last hour added (``completed_hour``,
    ``failed_hour``; None when PostgreSQL did not answer), the busiest first: most
    in work and parked, then most completed."""
    known = None if recent is None else 0
    rows = {b["business_id"]: {**b, "completed_hour": known, "failed_hour": known} for b in picture}
    for r in recent or []:
        row = rows.setdefault(
            r["business_id"],
            {"business_id": r["business_id"], "in_use": 0, "limit": default_limit, "parked": 0},
        )
        row["completed_hour"], row["failed_hour"] = r["completed"], r["failed"]
    return sorted(
        rows.values(),
        key=lambda b: (
            -(b["in_use"] + b["parked"]),
            -(b["completed_hour"] or 0),
            -(b["failed_hour"] or 0),
            b["business_id"],
        ),
    )


async def businesses(backend: Backend) -> tuple[list[dict[str, Any]], list[str]]:
    """The businesses page's rows (``merge``) and what could not be read."""
    doc: dict[str, Any] = {"errors": []}
    picture = await _part(
        doc,
        "redis",
        status.businesses(backend.redis, backend.layout, default_limit=backend.default_slots),
        skip=False,
    )
    recent = await _part(doc, "postgres", recent_businesses(backend.pool), skip=False)
    return merge(picture or [], recent, backend.default_slots), doc["errors"]


async def search(pool: Any, query: str) -> list[dict[str, Any]]:
    """Recordings whose RecordingSid, CallSid or business_id is ``query``, newest first."""
    rows = await pool.fetch(SEARCH, query, SEARCH_LIMIT, timeout=READ_S)
    return [dict(r) for r in rows]


async def recording(pool: Any, sid: str) -> dict[str, Any] | None:
    """The recording's row (``segments`` decoded), or None: no such row or not a RecordingSid."""
    if not RECORDING_SID.fullmatch(sid):
        return None
    row = await pool.fetchrow("SELECT * FROM recordings WHERE recording_sid = $1", sid)
    if row is None:
        return None
    found = dict(row)
    if isinstance(found.get("segments"), str):
        found["segments"] = json.loads(found["segments"])
    return found


def lines(row: dict[str, Any]) -> list[tuple[str | None, str]]:
    """The transcript as (speaker, text) turns: consecutive segments of one speaker
    joined; without segments, the transcript's lines with no speaker."""
    turns: list[tuple[str | None, list[str]]] = []
    for segment in row.get("segments") or []:
        speaker, text = segment.get("speaker"), str(segment.get("text", ""))
        if turns and turns[-1][0] == speaker:
            turns[-1][1].append(text)
        else:
            turns.append((speaker, [text]))
    if turns:
        return [(speaker, " ".join(texts)) for speaker, texts in turns]
    return [(None, line) for line in (row.get("transcript") or "").splitlines() if line]


def _inside(root: Path, stored: str) -> Path | None:
    """``stored`` resolved, if it is a file inside ``root`` (resolved), else None."""
    try:
        path, base = Path(stored).resolve(), root.resolve()
    except (OSError, ValueError, RuntimeError):
        return None
    return path if path.is_relative_to(base) and path.is_file() else None


async def audio_file(backend: Backend, sid: str) -> Path | None:
    """The stored audio of recording ``sid``, or None: not a RecordingSid, no row, no
    file, or a path outside the media directory."""
    if not RECORDING_SID.fullmatch(sid):
        return None
    stored = await backend.pool.fetchval(
        "SELECT audio_path FROM recordings WHERE recording_sid = $1", sid, timeout=READ_S
    )
    return _inside(backend.media_dir, stored) if stored else None


async def dead_letters(
    redis: aioredis.Redis, layout: Layout, *, count: int
) -> list[deadletters.DeadLetter]:
    """The newest ``count`` dead letters over every partition, newest first."""
    return await deadletters.listing(redis, layout, count=count, newest=True)


async def dead_letter(
    redis: aioredis.Redis, layout: Layout, ref: str
) -> deadletters.DeadLetter | None:
    """The dead letter ``ref`` names (``[<partition>/]<id>``), or None: no such entry, not
    a dead letter's name, or a bare id more than one partition holds."""
    if not deadletters.REF.fullmatch(ref):
        return None
    try:
        return await deadletters.find(redis, layout, ref)
    except deadletters.Ambiguous:
        return None
