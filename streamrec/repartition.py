"""Changing the partition count: ``python -m streamrec partitions [show | set N]``.

The count is recorded in Redis (``{<namespace>}:partitions``) and every process
checks it at start (``streamrec.partitions.claim``): a business's partition, and
with it where its entries, slots, parked entries and dead letters live, depends
on it. Changing it is an offline step, in this order:

1. **Only when drained.** Over every partition of the current layout: no live
   consumer in the registry (heartbeat expiry after Redis time), every stream
   empty and nothing pending in its group, no parked entry and no slot lease
   still running (an expired lease is a crashed holder's and holds nothing).
   Otherwise the command says what is left, partition by partition, and changes
   nothing. Webhook processes do not register, so they cannot be seen: they
   must be stopped too (one started later with the old count refuses to start).
2. **What follows a business moves to its new partition**: its own slot limit
   (HSET there, then HDEL here) and its dead letters (XADD there with the fields
   unchanged, then XDEL here; a letter without ``business_id`` goes to partition
   0). Nothing moves where a business's partition keeps its hash tag.
3. **The drain is checked again**, then the old partitions' leftovers are
   deleted: a moved business's registry entry and expired leases, and where the
   new layout no longer has a partition's hash tag, its empty stream with its
   group and the rest of its keys. Only then is the new count recorded.

Every step is safe to repeat, so a run stopped half way (a crash, a lost
connection) is finished by running the same command again: until the count is
recorded, a run starts over from the old layout. A limit written twice is the
same limit. A dead letter copied but not yet deleted at its source is recognised
by its copy: before the first copy into a partition, a run reads the letters
there, and a letter equal in every field to one of them is only deleted at the
source (each of those letters is taken for one copy). Every letter carries its
origin entry id, consumer and failure time, so two distinct letters are never
equal. Until a rerun ends, moved limits and letters may already sit where the
new count puts them, out of sight of processes with the old count.

Every Redis call touches the keys of one partition (Redis Cluster): no
transaction or multi-key command spans two.

Dedupe markers (``seen:<RecordingSid>``) stay where they are: they do not record
the business, so they cannot be moved. A Twilio retry of a recording from before
the change may then be enqueued again, in its business's new partition, and is
absorbed by the pipeline's idempotence (one row per RecordingSid; a completed
recording is not downloaded or transcribed again). The markers left behind
expire after STREAMREC_DEDUPE_TTL_S.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Any, Literal

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from streamrec.connections import open_redis
from streamrec.keys import Keys
from streamrec.partitions import MAX_PARTITIONS, Layout, recorded
from streamrec.settings import Settings

Fields = tuple[tuple[str, str], ...]
BATCH = 500
"""Dead letters read per XRANGE."""


@dataclass(frozen=True, slots=True)
class Left:
    """What one partition still holds that stops a change (all zero: drained)."""

    keys: Keys
    length: int
    pending: int
    parked: int
    """Parked entries, over every business of the partition."""
    held: int
    """Slot leases not yet expired."""

    @property
    def drained(self) -> bool:
        """Whether nothing is left."""
        return not (self.length or self.pending or self.parked or self.held)

    def line(self) -> str:
        """What is left, in words: ``partition 0 {tag}: 3 in the stream, 1 pending``."""
        counts = {
            "in the stream": self.length,
            "pending": self.pending,
            "parked": self.parked,
            "slots held": self.held,
        }
        left = ", ".join(f"{n} {what}" for what, n in counts.items() if n) or "nothing"
        return f"partition {self.keys.partition} {{{tag_of(self.keys)}}}: {left}"


@dataclass(frozen=True, slots=True)
class Survey:
    """What is left over a whole layout: live consumers, and each partition's work."""

    alive: tuple[str, ...]
    partitions: tuple[Left, ...]

    @property
    def drained(self) -> bool:
        """Whether the count may change: no live consumer, no partition holding work."""
        return not self.alive and all(part.drained for part in self.partitions)

    def lines(self) -> list[str]:
        """What is left, a line for the live consumers and one per partition not drained."""
        lines = [f"consumers alive: {', '.join(self.alive)}"] if self.alive else []
        return lines + [part.line() for part in self.partitions if not part.drained]


@dataclass(frozen=True, slots=True)
class Outcome:
    """How ``change`` ended: changed, nothing to change, or refused (``survey`` says why)."""

    status: Literal["changed", "unchanged", "refused"]
    before: int
    after: int
    survey: Survey
    limits: int = 0
    letters: int = 0


def tag_of(keys: Keys) -> str:
    """The hash tag's text of a partition's keys."""
    return keys.tag or keys.namespace


def same(a: Keys, b: Keys) -> bool:
    """Whether two partitions' keys are the same keys (one hash tag)."""
    return tag_of(a) == tag_of(b)


async def now_ms(redis: aioredis.Redis) -> int:
    """Redis server time, ms: the clock heartbeats and slot leases are scored in."""
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def pending(redis: aioredis.Redis, keys: Keys) -> int:
    """How many entries the partition's group has delivered and not acked (0: no group)."""
    try:
        summary = await redis.xpending(keys.stream, keys.group)
    except ResponseError as exc:
        if "NOGROUP" in str(exc):
            return 0
        raise
    return int(summary["pending"])


async def businesses(redis: aioredis.Redis, keys: Keys) -> set[str]:
    """The businesses a partition keeps slot state for: registered, or in a parked index."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.smembers(keys.slot_businesses)
        pipe.zrange(keys.parked_set, 0, -1)
        pipe.smembers(keys.legacy_parked_set)
        registered, due, legacy = await pipe.execute()
    return {str(b) for b in (*registered, *due, *legacy)}


async def survey(redis: aioredis.Redis, layout: Layout) -> Survey:
    """What is left in ``layout``: live consumers (by Redis time) and each partition's work."""
    now = await now_ms(redis)
    alive = await redis.zrangebyscore(layout.home.consumers, f"({now}", "+inf")
    parts = await asyncio.gather(*(_left(redis, keys, now) for keys in layout))
    return Survey(tuple(str(name) for name in alive), tuple(parts))


async def _left(redis: aioredis.Redis, keys: Keys, now: int) -> Left:
    names = sorted(await businesses(redis, keys))
    async with redis.pipeline(transaction=False) as pipe:
        pipe.xlen(keys.stream)
        for business in names:
            pipe.zcount(keys.slots(business), f"({now}", "+inf")
            pipe.llen(keys.parked(business))
        length, *counts = await pipe.execute()
    held, parked = sum(counts[0::2]), sum(counts[1::2])
    return Left(keys, int(length), await pending(redis, keys), int(parked), int(held))


async def move_limits(redis: aioredis.Redis, source: Keys, layout: Layout) -> int:
    """Move the per-business slot limits of partition ``source`` to each business's
    partition under ``layout`` (registered there too); returns how many moved.

    Each is written there before it is deleted here, so repeating the call after
    a failure half way only finishes it.
    """
    moved = 0
    for name, limit in (await redis.hgetall(source.slot_limits)).items():
        business = str(name)
        target = layout.of(business)
        if same(target, source):
            continue
        await redis.hset(target.slot_limits, business, limit)
        await redis.sadd(target.slot_businesses, business)
        await redis.hdel(source.slot_limits, business)
        moved += 1
    return moved


async def letters(
    redis: aioredis.Redis, keys: Keys, after: str
) -> list[tuple[str, dict[str, str]]]:
    """The next BATCH dead letters of a partition from ``after`` (an id, ``(`` before one
    to exclude it), each its id and its fields."""
    found = await redis.xrange(keys.dead, min=after, count=BATCH)
    return [(str(i), {str(k): str(v) for k, v in (f or {}).items()}) for i, f in found or []]


class LetterMove:
    """Moves dead letters to their business's partition under ``layout`` (one run's worth).

    A letter is copied (XADD, fields unchanged) and then deleted at its source
    (XDEL). What a target partition held before its first copy is read once, so
    that a copy left by an earlier run, stopped between the two steps, is
    recognised instead of copied again (see the module docstring).
    """

    def __init__(self, redis: aioredis.Redis, layout: Layout) -> None:
        self._redis = redis
        self.layout = layout
        self._present: dict[str, Counter[Fields]] = {}

    async def run(self, source: Keys, *, limit: int | None = None) -> int:
        """Move the letters of partition ``source`` that belong elsewhere, oldest first
        (at most ``limit``); returns how many moved."""
        moved, after = 0, "-"
        while found := await letters(self._redis, source, after):
            for entry_id, fields in found:
                if moved == limit:
                    return moved
                target = self.layout.of(fields.get("business_id"))
                if same(target, source):
                    continue
                await self.copy(target, fields)
                await self._redis.xdel(source.dead, entry_id)
                moved += 1
            after = "(" + found[-1][0]
        return moved

    async def copy(self, target: Keys, fields: dict[str, str]) -> bool:
        """Add the letter to ``target``'s dead letters unless a copy is there already;
        True if added."""
        present = await self._held_by(target)
        key = tuple(fields.items())
        if present[key] > 0:
            present[key] -= 1
            return False
        await self._redis.xadd(target.dead, fields)  # type: ignore[arg-type]
        return True

    async def _held_by(self, target: Keys) -> Counter[Fields]:
        if target.dead not in self._present:
            present: Counter[Fields] = Counter()
            after = "-"
            while found := await letters(self._redis, target, after):
                present.update(tuple(fields.items()) for _, fields in found)
                after = "(" + found[-1][0]
            self._present[target.dead] = present
        return self._present[target.dead]


async def clear(redis: aioredis.Redis, source: Keys, layout: Layout) -> None:
    """Delete what partition ``source`` keeps that ``layout`` has no use for: the registry
    entries and expired leases of businesses now elsewhere and, when no partition of
    ``layout`` has its hash tag, its (drained) stream with its group and its other keys.

    Run after the moves, once drained: the stream, dead letters and limits are
    deleted only when empty, and nothing else deleted holds work.
    """
    gone = [b for b in sorted(await businesses(redis, source)) if not same(layout.of(b), source)]
    async with redis.pipeline(transaction=False) as pipe:
        for business in gone:
            pipe.delete(source.slots(business))
        if gone:
            pipe.srem(source.slot_businesses, *gone)
            pipe.zrem(source.parked_set, *gone)
            pipe.srem(source.legacy_parked_set, *gone)
        await pipe.execute()
    if any(same(keys, source) for keys in layout):
        return
    await redis.delete(
        source.slot_businesses, source.parked_set, source.legacy_parked_set, source.slot_sweep
    )
    for key, size in ((source.stream, redis.xlen), (source.dead, redis.xlen),
                      (source.slot_limits, redis.hlen)):  # fmt: skip
        if not await size(key):
            await redis.delete(key)


async def change(redis: aioredis.Redis, namespace: str, *, current: int, target: int) -> Outcome:
    """Change ``namespace`` from ``current`` to ``target`` partitions, as the module
    docstring says. Refused (nothing changed) unless drained; safe to run again after a
    failure half way. Raises RedisError when Redis fails, ValueError for a bad count.
    """
    old, new = Layout(namespace, current), Layout(namespace, target)
    if current == target:
        return Outcome("unchanged", current, target, Survey((), ()))
    before = await survey(redis, old)
    if not before.drained:
        return Outcome("refused", current, target, before)
    limits = sum([await move_limits(redis, keys, new) for keys in old])
    mover = LetterMove(redis, new)
    letters = sum([await mover.run(keys) for keys in old])
    after = await survey(redis, old)
    if not after.drained:
        return Outcome("refused", current, target, after, limits, letters)
    for keys in old:
        await clear(redis, keys, new)
    await redis.set(old.home.partitions, target)
    return Outcome("changed", current, target, after, limits, letters)


async def show(redis: aioredis.Redis, namespace: str, *, configured: int) -> dict[str, Any]:
    """The recorded and configured counts and, per partition of the recorded layout (the
    configured one when none is recorded): index, hash tag, stream, slot, length, pending."""
    count = await recorded(redis, namespace)
    layout = Layout(namespace, count or configured)

    async def row(keys: Keys) -> dict[str, Any]:
        return {
            "index": keys.partition,
            "tag": tag_of(keys),
            "stream": keys.stream,
            "slot": layout.slot(keys),
            "length": int(await redis.xlen(keys.stream)),
            "pending": await pending(redis, keys),
        }

    rows = await asyncio.gather(*(row(keys) for keys in layout))
    return {"namespace": namespace, "recorded": count, "configured": configured, "partitions": rows}


def render(report: dict[str, Any]) -> str:
    """``show``'s report for a person: the counts, then a line per partition."""
    count, configured = report["recorded"], report["configured"]
    lines = [
        f"namespace {report['namespace']}: "
        f"{'none recorded yet' if count is None else f'{count} partitions recorded'}, "
        f"{configured} configured (STREAMREC_PARTITIONS)"
    ]
    if count is not None and count != configured:
        lines.append(
            f"  processes configured with {configured} refuse to start: set "
            f"STREAMREC_PARTITIONS={count}, or change the count (partitions set {configured})"
        )
    lines.append(f"  {'#':>4}  {'slot':>5}  {'length':>7}  {'pending':>7}  tag / stream")
    for p in report["partitions"]:
        lines.append(
            f"  {p['index']:>4}  {p['slot']:>5}  {p['length']:>7}  {p['pending']:>7}  "
            f"{p['tag']} / {p['stream']}"
        )
    return "\n".join(lines)


# The command line: ``python -m streamrec partitions [show | set N]``.


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``partitions`` command's actions and options (no action: ``show``)."""
    parser.add_argument("--json", action="store_true", help="one JSON document")
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    summary = "the recorded and configured counts, and each partition's keys and work"
    shown = actions.add_parser("show", help=summary, description=summary)
    shown.add_argument("--json", action="store_true", help="one JSON document")
    summary = "change the partition count, once every partition is drained"
    changed = actions.add_parser("set", help=summary, description=summary)
    changed.add_argument("count", type=_count, metavar="N", help="the new partition count")
    changed.add_argument("--yes", action="store_true", help="do not ask for confirmation")


def _count(value: str) -> int:
    """A partition count argument (else exit 2 saying the range)."""
    if not value.isdigit() or not 1 <= int(value) <= MAX_PARTITIONS:
        raise argparse.ArgumentTypeError(f"{value!r} is not between 1 and {MAX_PARTITIONS}")
    return int(value)


async def command(args: argparse.Namespace, settings: Settings) -> int:
    """Run ``partitions [show | set N]``: 0 shown, changed or nothing to change; 1 not
    drained (nothing changed) or not confirmed; 2 no confirmation possible."""
    if args.action == "set":
        if not args.yes and not sys.stdin.isatty():
            print("streamrec: partitions set moves keys; confirm with --yes", file=sys.stderr)
            return 2
        async with open_redis(settings) as redis:
            return await _set(redis, settings, args.count, confirmed=args.yes)
    async with open_redis(settings) as redis:
        report = await show(redis, settings.namespace, configured=settings.partitions)
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0


async def _set(redis: aioredis.Redis, settings: Settings, target: int, *, confirmed: bool) -> int:
    namespace = settings.namespace
    current = await recorded(redis, namespace) or settings.partitions
    if current == target:
        print(f"namespace {namespace} has {current} partitions already: nothing to change")
        return 0
    if not confirmed:
        left = await survey(redis, Layout(namespace, current))
        if not left.drained:
            return _refused(Outcome("refused", current, target, left), namespace)
        question = f"Change namespace {namespace} from {current} to {target} partitions? [y/N] "
        if (await asyncio.to_thread(input, question)).strip().lower() not in {"y", "yes"}:
            print("nothing changed")
            return 1
    outcome = await change(redis, namespace, current=current, target=target)
    if outcome.status == "refused":
        return _refused(outcome, namespace)
    print(
        f"namespace {namespace}: {current} -> {target} partitions; moved {outcome.limits} "
        f"slot limits and {outcome.letters} dead letters. "
        f"Start every process with STREAMREC_PARTITIONS={target}."
    )
    return 0


def _refused(outcome: Outcome, namespace: str) -> int:
    """Say what is left (stderr) and return 1."""
    print(
        f"streamrec: cannot change namespace {namespace} from {outcome.before} to "
        f"{outcome.after} partitions; still left:",
        file=sys.stderr,
    )
    for line in outcome.survey.lines():
        print(f"  {line}", file=sys.stderr)
    if outcome.limits or outcome.letters:
        done = "limits and dead letters moved so far stay moved, the count is unchanged"
    else:
        done = "nothing changed"
    print(
        f"{done}: stop the webhook, let the consumers finish (status shows nothing waiting,"
        " pending or parked), stop them, and run this again",
        file=sys.stderr,
    )
    return 1
