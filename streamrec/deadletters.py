"""The dead-letter stream: entries that failed for good, and the way back.

A dead letter is the entry's original fields followed by ``error``,
``attempts``, ``origin_id``, ``consumer`` and ``failed_at`` (ms since the epoch);
handlers must not use those names for fields of their own. Moving an entry in
and replaying it out are each one atomic step, so an entry is never in both
streams and never in neither. Both are safe to repeat (the Redis client retries
a command whose reply was lost): a move only moves an entry still in the
stream, and a short-lived marker lets a repeated move or replay recognise its
own earlier success and answer as it did.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

import redis.asyncio as aioredis

from streamrec import lua
from streamrec.keys import Keys

META_FIELDS = ("error", "attempts", "origin_id", "consumer", "failed_at")
MARKER_TTL_S = 600
"""How long a move or replay remembers its result, for a repeat of the same call."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One entry of the dead-letter stream."""

    id: str
    fields: dict[str, str]
    error: str
    attempts: int
    origin_id: str
    consumer: str
    failed_at_ms: int

    @classmethod
    def parse(cls, entry_id: str, raw: Mapping[str, str]) -> DeadLetter:
        """Split a dead-letter entry into its original fields and its failure."""
        return cls(
            id=entry_id,
            fields={k: v for k, v in raw.items() if k not in META_FIELDS},
            error=raw.get("error", ""),
            attempts=int(raw.get("attempts") or 0),
            origin_id=raw.get("origin_id", ""),
            consumer=raw.get("consumer", ""),
            failed_at_ms=int(raw.get("failed_at") or 0),
        )


async def move(
    redis: aioredis.Redis,
    keys: Keys,
    *,
    entry_id: str,
    fields: Mapping[str, str],
    error: str,
    attempts: int,
    consumer: str,
) -> bool:
    """Move the entry to the dead letters with its failure, XACK and XDEL it, in one call.

    True if this call moved it (a repeat after a lost reply is recognised);
    False if the entry had already left the stream, when it is only XACKed.
    Raises RedisError when Redis does not answer.
    """
    letter = {
        **fields,
        "error": error,
        "attempts": str(attempts),
        "origin_id": entry_id,
        "consumer": consumer,
        "failed_at": str(int(time.time() * 1000)),
    }
    script = lua.register(redis, "deadletters_move")
    return bool(await script(*_move_input(keys, entry_id, consumer, letter)))


def _move_input(
    keys: Keys, entry_id: str, consumer: str, letter: Mapping[str, str]
) -> tuple[list[str], list[str]]:
    """KEYS and ARGV of deadletters_move.lua (see its header) for one dead letter."""
    flat = [part for pair in letter.items() for part in pair]
    return (
        [keys.stream, keys.dead, keys.dead_moved(entry_id)],
        [keys.group, entry_id, consumer, str(MARKER_TTL_S), json.dumps(flat)],
    )


async def listing(redis: aioredis.Redis, keys: Keys, *, count: int = 100) -> list[DeadLetter]:
    """The oldest ``count`` dead letters."""
    raw = await redis.xrange(keys.dead, count=count) or []
    return [
        DeadLetter.parse(str(i), {str(k): str(v) for k, v in (f or {}).items()}) for i, f in raw
    ]


async def replay(redis: aioredis.Redis, keys: Keys, ids: list[str]) -> dict[str, str | None]:
    """Put dead letters back on the stream; returns old id → new id (None if unknown).

    Repeating a replay (within MARKER_TTL_S) answers the same new ids and adds
    nothing. Raises RedisError when Redis does not answer.
    """
    if not ids:
        return {}
    moved = await lua.register(redis, "deadletters_replay")(*_replay_input(keys, ids))
    return {old: (str(new) if new else None) for old, new in zip(ids, moved, strict=True)}


def _replay_input(keys: Keys, ids: list[str]) -> tuple[list[str], list[str]]:
    """KEYS and ARGV of deadletters_replay.lua (see its header) for these dead-letter ids."""
    return (
        [keys.dead, keys.stream, *(keys.replayed(i) for i in ids)],
        [str(MARKER_TTL_S), *ids],
    )


async def replay_all(redis: aioredis.Redis, keys: Keys, *, batch: int = 500) -> int:
    """Replay the dead letters there are now, oldest first, in batches; returns how many.

    Letters that arrive meanwhile (a replayed entry failing again, say) are
    left for later, so the call ends even while replays keep failing.
    """
    newest = await redis.xrevrange(keys.dead, count=1)
    if not newest:
        return 0
    last, after, total = str(newest[0][0]), "-", 0
    while True:
        found = await redis.xrange(keys.dead, min=after, max=last, count=batch)
        if not found:
            return total
        ids = [str(entry_id) for entry_id, _ in found]
        moved = await replay(redis, keys, ids)
        total += sum(1 for new in moved.values() if new)
        after = "(" + ids[-1]


async def purge(redis: aioredis.Redis, keys: Keys, ids: list[str] | None = None) -> int:
    """Delete the given dead letters, or all of them; returns how many were deleted."""
    if ids:
        return int(await redis.xdel(keys.dead, *ids))
    count = int(await redis.xlen(keys.dead))
    await redis.delete(keys.dead)
    return count


def render(letters: list[DeadLetter], *, as_json: bool = False) -> str:
    """Dead letters for a person (one block each) or as one JSON document."""
    if as_json:
        return json.dumps([asdict(letter) for letter in letters], indent=2)
    if not letters:
        return "no dead letters"
    blocks = []
    for letter in letters:
        when = datetime.fromtimestamp(letter.failed_at_ms / 1000, UTC).isoformat(timespec="seconds")
        fields = " ".join(f"{k}={v}" for k, v in letter.fields.items())
        blocks.append(
            f"{letter.id}  failed {when}  attempts {letter.attempts}  consumer {letter.consumer}\n"
            f"  error: {letter.error}\n  fields: {fields}"
        )
    return "\n".join(blocks)
