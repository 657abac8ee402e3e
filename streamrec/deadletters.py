"""The dead-letter stream: entries that failed for good, and the way back.

A dead letter is the entry's original fields followed by ``error``,
``attempts``, ``origin_id``, ``consumer`` and ``failed_at`` (ms since the epoch);
handlers must not use those names for fields of their own. Moving an entry in
and replaying it out are each one atomic step, so an entry is never in both
streams and never in neither. Both are safe to repeat (the Redis client retries
a command whose reply was lost): a move only moves an entry still in the
stream, and a short-lived marker lets a repeated move or replay recognise its
own earlier success and answer as it did.

Each partition (``streamrec.partitions``) has its own dead letters, beside its
stream: a letter is replayed onto the stream it came from, its business's.
The operations commands go over every partition, one call each. A dead
letter's id is its own stream's, so two partitions may hold the same one:
``<partition>/<id>`` names one for sure; a bare id is looked up in every
partition, and refused (``Ambiguous``) when more than one holds it.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

import redis.asyncio as aioredis

from streamrec import lua
from streamrec.keys import Keys
from streamrec.partitions import Layout, as_layout

META_FIELDS = ("error", "attempts", "origin_id", "consumer", "failed_at")
MARKER_TTL_S = 600
"""How long a move or replay remembers its result, for a repeat of the same call."""
ENTRY_ID = re.compile(r"\d{1,20}-\d{1,20}")
"""A dead letter's id: a stream entry id, ``<ms>-<sequence>``."""
REF = re.compile(r"(?:(\d{1,4})/)?(\d{1,20}-\d{1,20})")
"""A dead letter named on the command line or in a form: ``[<partition>/]<id>``."""


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
    partition: int = 0
    """The partition whose dead letters hold it (0 of 1 without partitions)."""

    @classmethod
    def parse(cls, entry_id: str, raw: Mapping[str, str], partition: int = 0) -> DeadLetter:
        """Split a dead-letter entry into its original fields and its failure."""
        return cls(
            id=entry_id,
            fields={k: v for k, v in raw.items() if k not in META_FIELDS},
            error=raw.get("error", ""),
            attempts=int(raw.get("attempts") or 0),
            origin_id=raw.get("origin_id", ""),
            consumer=raw.get("consumer", ""),
            failed_at_ms=int(raw.get("failed_at") or 0),
            partition=partition,
        )

    @property
    def ref(self) -> str:
        """Its qualified name, ``<partition>/<id>``: unambiguous whatever the partitions."""
        return qualified(self.partition, self.id)


def qualified(partition: int, entry_id: str) -> str:
    """A dead letter's qualified name: ``<partition>/<id>``."""
    return f"{partition}/{entry_id}"


class Ambiguous(ValueError):
    """Bare dead-letter ids that more than one partition holds; ``choices`` maps each to
    its qualified forms."""

    def __init__(self, choices: dict[str, list[str]]) -> None:
        self.choices = choices
        named = "; ".join(f"{ref}: {' or '.join(forms)}" for ref, forms in choices.items())
        super().__init__(f"ids held by more than one partition, name one: {named}")


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


async def listing(
    redis: aioredis.Redis, layout: Keys | Layout, *, count: int = 100, newest: bool = False
) -> list[DeadLetter]:
    """The oldest ``count`` dead letters over every partition (``newest``: the newest,
    newest first), each partition read at once.

    Ordered by entry id, the Redis time each letter was written (its consumer's
    clock, ``failed_at``, may differ between hosts), then by partition.
    """
    layout = as_layout(layout)
    found = await asyncio.gather(*(_letters(redis, keys, count, newest) for keys in layout))
    merged = sorted((letter for part in found for letter in part), key=_written, reverse=newest)
    return merged[:count]


async def _letters(redis: aioredis.Redis, keys: Keys, count: int, newest: bool) -> list[DeadLetter]:
    read = redis.xrevrange if newest else redis.xrange
    raw = await read(keys.dead, count=count) or []
    return [
        DeadLetter.parse(str(i), {str(k): str(v) for k, v in (f or {}).items()}, keys.partition)
        for i, f in raw
    ]


def _written(letter: DeadLetter) -> tuple[int, int, int]:
    ms, _, seq = letter.id.partition("-")
    return int(ms), int(seq), letter.partition


async def total(redis: aioredis.Redis, layout: Keys | Layout) -> int:
    """How many dead letters there are over every partition."""
    layout = as_layout(layout)
    return sum(await asyncio.gather(*(redis.xlen(keys.dead) for keys in layout)))


async def find(redis: aioredis.Redis, layout: Keys | Layout, ref: str) -> DeadLetter | None:
    """The dead letter ``ref`` names (``[<partition>/]<id>``), or None: no such letter, or
    not a dead letter's name. Raises Ambiguous for a bare id more than one partition holds."""
    layout = as_layout(layout)
    partition = (await locate(redis, layout, [ref]))[ref]
    if partition is None:
        return None
    keys, entry_id = layout.partitions[partition], _entry_id(ref)
    raw = await redis.xrange(keys.dead, entry_id, entry_id)
    if not raw or str(raw[0][0]) != entry_id:
        return None
    fields = {str(k): str(v) for k, v in (raw[0][1] or {}).items()}
    return DeadLetter.parse(entry_id, fields, partition)


async def locate(
    redis: aioredis.Redis, layout: Keys | Layout, refs: list[str]
) -> dict[str, int | None]:
    """The partition of each dead letter ``refs`` name (None: not a dead letter's name,
    no such partition, or, for a bare id, no partition holds it).

    ``<partition>/<id>`` is taken at its word; a bare id is partition 0's when
    there is one partition, else looked up in every partition (all at once).
    Raises Ambiguous, naming the qualified forms, when more than one holds a bare id.
    """
    layout = as_layout(layout)
    where: dict[str, int | None] = {}
    bare: list[str] = []
    for ref in dict.fromkeys(refs):
        match = REF.fullmatch(ref)
        if match is None:
            where[ref] = None
        elif match[1] is not None:
            where[ref] = int(match[1]) if int(match[1]) < layout.count else None
        elif layout.partitioned:
            bare.append(ref)
        else:
            where[ref] = 0
    holders = await asyncio.gather(*(_holders(redis, layout, ref) for ref in bare))
    choices = {ref: found for ref, found in zip(bare, holders, strict=True) if len(found) > 1}
    if choices:
        raise Ambiguous(
            {ref: [qualified(p, ref) for p in partitions] for ref, partitions in choices.items()}
        )
    where |= {ref: found[0] if found else None for ref, found in zip(bare, holders, strict=True)}
    return where


async def _holders(redis: aioredis.Redis, layout: Layout, entry_id: str) -> list[int]:
    """The partitions whose dead letters hold exactly ``entry_id``."""
    found = await asyncio.gather(*(redis.xrange(k.dead, entry_id, entry_id) for k in layout))
    return [
        keys.partition
        for keys, raw in zip(layout, found, strict=True)
        if raw and str(raw[0][0]) == entry_id
    ]


def _entry_id(ref: str) -> str:
    """The entry id part of ``[<partition>/]<id>``."""
    return ref.rpartition("/")[2]


def _by_partition(where: dict[str, int | None]) -> dict[int, list[str]]:
    """The entry ids of the located refs, per partition (the unknown ones left out)."""
    ids: dict[int, list[str]] = {}
    for ref, partition in where.items():
        if partition is not None:
            ids.setdefault(partition, []).append(_entry_id(ref))
    return ids


async def replay_refs(
    redis: aioredis.Redis, layout: Keys | Layout, refs: list[str]
) -> dict[str, tuple[int, str] | None]:
    """Put the dead letters ``refs`` name back on their partitions' streams (``replay``,
    one call per partition, at once); returns ref → (partition, new id), None if unknown.

    Raises Ambiguous, replaying nothing, when a bare id is in more than one
    partition. Raises RedisError when Redis does not answer.
    """
    layout = as_layout(layout)
    where = await locate(redis, layout, refs)
    ids = _by_partition(where)
    moved = await asyncio.gather(
        *(replay(redis, layout.partitions[p], batch) for p, batch in ids.items())
    )
    new_ids = dict(zip(ids, moved, strict=True))
    replayed: dict[str, tuple[int, str] | None] = {}
    for ref in refs:
        partition = where[ref]
        new = None if partition is None else new_ids[partition][_entry_id(ref)]
        replayed[ref] = None if partition is None or new is None else (partition, new)
    return replayed


async def replay(redis: aioredis.Redis, keys: Keys, ids: list[str]) -> dict[str, str | None]:
    """Put dead letters of one partition back on its stream; returns old id → new id
    (None if unknown).

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


async def replay_all(redis: aioredis.Redis, layout: Keys | Layout, *, batch: int = 500) -> int:
    """Replay the dead letters there are now in every partition (all at once), each
    partition's oldest first, in batches; returns how many.

    Letters that arrive meanwhile (a replayed entry failing again, say) are
    left for later, so the call ends even while replays keep failing.
    """
    layout = as_layout(layout)
    return sum(await asyncio.gather(*(_replay_all_of(redis, keys, batch) for keys in layout)))


async def _replay_all_of(redis: aioredis.Redis, keys: Keys, batch: int) -> int:
    newest = await redis.xrevrange(keys.dead, count=1)
    if not newest:
        return 0
    last, after, replayed = str(newest[0][0]), "-", 0
    while True:
        found = await redis.xrange(keys.dead, min=after, max=last, count=batch)
        if not found:
            return replayed
        ids = [str(entry_id) for entry_id, _ in found]
        moved = await replay(redis, keys, ids)
        replayed += sum(1 for new in moved.values() if new)
        after = "(" + ids[-1]


async def purge(redis: aioredis.Redis, layout: Keys | Layout, refs: list[str] | None = None) -> int:
    """Delete the dead letters ``refs`` name, or all of every partition; returns how many
    were deleted. Raises Ambiguous, deleting nothing, as ``replay_refs`` does."""
    layout = as_layout(layout)
    if not refs:
        return sum(await asyncio.gather(*(_purge_all_of(redis, keys) for keys in layout)))
    ids = _by_partition(await locate(redis, layout, refs))
    deleted = await asyncio.gather(
        *(redis.xdel(layout.partitions[p].dead, *batch) for p, batch in ids.items())
    )
    return sum(int(n) for n in deleted)


async def _purge_all_of(redis: aioredis.Redis, keys: Keys) -> int:
    async with redis.pipeline(transaction=True) as pipe:
        pipe.xlen(keys.dead)
        pipe.delete(keys.dead)
        count, _ = await pipe.execute()
    return int(count)


def render(letters: list[DeadLetter], *, as_json: bool = False, partitioned: bool = False) -> str:
    """Dead letters for a person (one block each) or as one JSON document (each with its
    ``partition``). ``partitioned``: name each by ``<partition>/<id>``, as replay takes it."""
    if as_json:
        return json.dumps([asdict(letter) for letter in letters], indent=2)
    if not letters:
        return "no dead letters"
    blocks = []
    for letter in letters:
        when = datetime.fromtimestamp(letter.failed_at_ms / 1000, UTC).isoformat(timespec="seconds")
        fields = " ".join(f"{k}={v}" for k, v in letter.fields.items())
        name = letter.ref if partitioned else letter.id
        blocks.append(
            f"{name}  failed {when}  attempts {letter.attempts}  consumer {letter.consumer}\n"
            f"  error: {letter.error}\n  fields: {fields}"
        )
    return "\n".join(blocks)
