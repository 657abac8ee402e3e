"""The dead-letter stream: entries that failed for good, and the way back.

A dead letter is the entry's original fields followed by ``error``,
``attempts``, ``origin_id``, ``consumer`` and ``failed_at`` (ms since the epoch);
handlers must not use those names for fields of their own. Moving an entry in
and replaying it out are each one atomic step, so an entry is never in both
streams and never in neither.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline

from streamrec.keys import Keys

META_FIELDS = ("error", "attempts", "origin_id", "consumer", "failed_at")

# KEYS: dead, stream. ARGV: dead-letter ids. Moves each one's original fields
# back to the stream; returns the new ids (false where the id was not there).
# Only a dead letter's exact id counts: XRANGE reads "5" as the range 5-0..5-max
# and a malformed id as an error, and either would move a wrong entry or only
# part of the batch.
REPLAY = """
local moved = {}
for i = 1, #ARGV do
  local found = redis.pcall('XRANGE', KEYS[1], ARGV[i], ARGV[i])
  local entry = nil
  if type(found) == 'table' and not found.err and found[1] and found[1][1] == ARGV[i] then
    entry = found[1]
  end
  if entry then
    local fields, original = entry[2], {}
    for j = 1, #fields, 2 do
      local name = fields[j]
      if name ~= 'error' and name ~= 'attempts' and name ~= 'origin_id'
         and name ~= 'consumer' and name ~= 'failed_at' then
        original[#original + 1] = name
        original[#original + 1] = fields[j + 1]
      end
    end
    moved[i] = redis.call('XADD', KEYS[2], '*', unpack(original))
    redis.call('XDEL', KEYS[1], ARGV[i])
  else
    moved[i] = false
  end
end
return moved
"""


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


def add_move(
    pipe: Pipeline,
    keys: Keys,
    *,
    entry_id: str,
    fields: Mapping[str, str],
    error: str,
    attempts: int,
    consumer: str,
) -> None:
    """Queue on a MULTI pipeline: XADD the dead letter, XACK and XDEL the entry."""
    dead = {
        **fields,
        "error": error,
        "attempts": str(attempts),
        "origin_id": entry_id,
        "consumer": consumer,
        "failed_at": str(int(time.time() * 1000)),
    }
    pipe.xadd(keys.dead, dead)  # type: ignore[arg-type]
    pipe.xack(keys.stream, keys.group, entry_id)
    pipe.xdel(keys.stream, entry_id)


async def listing(redis: aioredis.Redis, keys: Keys, *, count: int = 100) -> list[DeadLetter]:
    """The oldest ``count`` dead letters."""
    raw = await redis.xrange(keys.dead, count=count) or []
    return [
        DeadLetter.parse(str(i), {str(k): str(v) for k, v in (f or {}).items()}) for i, f in raw
    ]


async def replay(redis: aioredis.Redis, keys: Keys, ids: list[str]) -> dict[str, str | None]:
    """Put dead letters back on the stream; returns old id → new id (None if unknown)."""
    if not ids:
        return {}
    moved = await redis.register_script(REPLAY)(keys=[keys.dead, keys.stream], args=ids)
    return {old: (str(new) if new else None) for old, new in zip(ids, moved, strict=True)}


async def replay_all(redis: aioredis.Redis, keys: Keys, *, batch: int = 500) -> int:
    """Replay every dead letter, oldest first, in batches; returns how many."""
    total = 0
    while True:
        letters = await listing(redis, keys, count=batch)
        if not letters:
            return total
        moved = await replay(redis, keys, [letter.id for letter in letters])
        total += sum(1 for new in moved.values() if new)


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
