"""Per-business slots: leases in Redis that cap recordings in work per tenant.

A business may have at most its limit of entries in work at once, counted over
every consumer on every host. Slots are leases: a sorted set per business
(``{ns}:slots:<business>``) whose members are the entry ids holding a slot,
scored with their lease expiry (Redis server time, ms). A holder renews its
lease while it works; a crashed holder's slot expires within one lease period.

An entry read while its business is at its limit is *parked*: in one Lua call
its fields move from the stream (XACK + XDEL) onto the business's list
``{ns}:parked:<business>`` (oldest first), so it holds no consumer concurrency
and is not re-read. When a slot frees, the release script moves the oldest
parked entry back onto the stream, with the slot already reserved for its new
id, in the same atomic call. An entry is therefore never both parked and in
the stream, and never in neither. A reservation lasts while the woken entry
waits in the stream undelivered, however long the backlog ahead of it.

Housekeeping scales with what is due, not with the businesses: the index
``{ns}:parked-due`` scores each business with parked entries by the earliest
time one could be woken (its first lease expiry), kept current as leases are
taken, renewed and freed. A sweep, run from every consumer's renew loop but at
most once per third of the lease over the whole group, wakes only the
businesses due: those whose holder crashed, or whose limit was raised.

Order within a business is kept: while a business has parked entries, a new
entry parks behind them even if a slot is free, and an entry that was in line
before them (woken, or reclaimed from a consumer that died) parks at the front.
Delivery counts survive parking in the ``prior_deliveries`` field, and a woken
entry carries ``woken=1`` (see ``streamrec.delivery``).

Limits: ``STREAMREC_BUSINESS_SLOTS`` for every business, overridden per business
in the hash ``{ns}:slot-limits`` (``streamrec slots set BUSINESS N``).

The scripts are ``streamrec/lua/slots_*.lua``; ``encode`` builds the call
layout they share (``slots_prelude.lua``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript

from streamrec import lua
from streamrec.delivery import Delivery
from streamrec.keys import Keys

PRELUDE = "slots_prelude"


def encode(
    keys: Keys,
    rows: Sequence[tuple[str, ...]] = (),
    *extra: str,
    lease_ms: int = 0,
    default_limit: int = 0,
) -> tuple[list[str], list[str]]:
    """KEYS and ARGV of one slots script call, in the layout of ``slots_prelude.lua``.

    ``rows`` are the call's entries, each its business then the values the
    script reads for it. Each business is declared once, with its keys, and
    numbered; the entries travel as one space-separated string of
    ``"number value ..."`` (a third of the encoding work of one argument per
    value). ``extra`` is what the script takes after the entries.
    """
    numbers: dict[str, str] = {}
    names = [
        keys.stream,
        keys.slot_limits,
        keys.parked_set,
        keys.slot_businesses,
        keys.legacy_parked_set,
        keys.slot_sweep,
    ]
    packed = []
    for business, *values in rows:
        number = numbers.get(business)
        if number is None:
            number = numbers[business] = str(len(numbers) + 1)
            names += (keys.slots(business), keys.parked(business))
        packed.append(" ".join((number, *values)))
    head = [keys.group, str(lease_ms), str(default_limit), keys.slots(""), keys.parked("")]
    return names, [*head, str(len(numbers)), *numbers, " ".join(packed), *extra]


@dataclass(frozen=True, slots=True)
class Held:
    """An entry that holds a slot of its business."""

    entry_id: str
    business: str


@dataclass(frozen=True, slots=True)
class Admission:
    """What one acquire call decided for a batch of entries."""

    held: list[Held]
    refused: set[str]
    """Entries that must not run now: parked, or gone from the stream."""
    parked: int


class Slots:
    """The slots of every business of one namespace, for one consumer.

    Each method is one script call. A Redis failure raises ``RedisError``; every
    call is safe to repeat (a repeated acquire finds the entries it parked gone
    from the stream, a repeated release or renewal changes nothing more).
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        *,
        default_limit: int,
        lease_ms: int = 30_000,
        field: str = "business_id",
    ) -> None:
        self._redis = redis
        self._keys = keys
        self.default_limit = default_limit
        self.lease_ms = lease_ms
        self.field = field
        self.sweep_period_ms = max(1, lease_ms // 3)
        """At most one sweep per period over the group: a consumer's renewal cadence."""
        self._acquire = lua.register(redis, "slots_acquire", PRELUDE)
        self._release = lua.register(redis, "slots_release", PRELUDE)
        self._renew = lua.register(redis, "slots_renew", PRELUDE)
        self._sweep = lua.register(redis, "slots_sweep", PRELUDE)
        self._limit = lua.register(redis, "slots_limit", PRELUDE)
        self._parked = lua.register(redis, "slots_parked", PRELUDE)

    def on(self, keys: Keys) -> Slots:
        """The same slots (default limit, lease, field) on another partition's keys."""
        return Slots(
            self._redis,
            keys,
            default_limit=self.default_limit,
            lease_ms=self.lease_ms,
            field=self.field,
        )

    def business(self, fields: dict[str, str]) -> str | None:
        """The business an entry counts against (None: not limited)."""
        return fields.get(self.field) or None

    async def _call(self, script: AsyncScript, rows: Sequence[tuple[str, ...]], *extra: str) -> Any:
        """Run a slots script on ``rows`` (and ``extra``), encoded by ``encode``."""
        keys, args = encode(
            self._keys, rows, *extra, lease_ms=self.lease_ms, default_limit=self.default_limit
        )
        return await script(keys=keys, args=args)

    async def admit(self, deliveries: Sequence[Delivery]) -> Admission:
        """Take slots for the deliveries of a batch read, in one call.

        Entries of no business (no ``field``) are not limited and run. An entry
        that parks carries the deliveries that went before this one; an entry
        that was woken or reclaimed was in its business's line before the ones
        parked now, so it parks at the front.
        """
        limited = [
            (d.entry_id, b, d.before, d.woken or d.reclaimed)
            for d in deliveries
            if (b := self.business(d.fields)) is not None
        ]
        verdicts = await self.acquire(limited)
        held: list[Held] = []
        refused: set[str] = set()
        for (entry_id, business, _, _), verdict in zip(limited, verdicts, strict=True):
            if verdict == 1:
                held.append(Held(entry_id, business))
            else:
                refused.add(entry_id)
        parked = sum(1 for verdict in verdicts if verdict == 0)
        return Admission(held, refused, parked)

    async def acquire(self, entries: Sequence[tuple[str, str, int, bool]]) -> list[int]:
        """For (entry id, business, deliveries before, front) each: 1 run, 0 parked, -1 gone.

        One call. ``deliveries before`` is what a parked entry carries (this
        delivery did not run); ``front`` parks it ahead of its business's line.
        """
        if not entries:
            return []
        rows = [(b, i, str(before), "1" if front else "0") for i, b, before, front in entries]
        return [int(x) for x in await self._call(self._acquire, rows)]

    async def release(self, held: Sequence[Held], *, ack: bool) -> int:
        """Free the slots (acking the entries too with ``ack``); wake parked ones. One call.

        Returns how many parked entries were woken.
        """
        if not held:
            return 0
        rows = [(h.business, h.entry_id) for h in held]
        return int(await self._call(self._release, rows, "1" if ack else "0"))

    async def renew(self, held: Sequence[Held]) -> list[str]:
        """Extend the leases of held slots; returns ids whose slot was lost. One call."""
        if not held:
            return []
        rows = [(h.business, h.entry_id) for h in held]
        return [str(x) for x in await self._call(self._renew, rows)]

    async def sweep(self) -> int:
        """Wake parked entries of the businesses due: a holder's lease ran out, a limit rose.

        Reads only those businesses, and does nothing (returns 0) when another
        consumer of the group swept less than ``sweep_period_ms`` ago. Returns
        how many entries were woken.
        """
        return int(await self._call(self._sweep, (), str(self.sweep_period_ms)))

    async def set_limit(self, business: str, limit: int | None) -> int:
        """Give ``business`` a limit of its own (None: back to the default), for every
        consumer at once; parked entries a raised limit lets run are woken now.

        Returns how many were woken.
        """
        value = "" if limit is None else str(limit)
        return int(await self._call(self._limit, [(business,)], value))

    async def parked_total(self) -> int:
        """How many entries are parked, over all businesses. One call."""
        return int(await self._call(self._parked, ()))


async def picture(redis: aioredis.Redis, keys: Keys, *, default_limit: int) -> list[dict[str, Any]]:
    """Per business: slots in use (live leases), limit and parked count. One read-only call.

    Lists the businesses that hold slots, have parked entries or a limit of
    their own, sorted by name.
    """
    names, args = encode(keys)
    rows = await lua.register(redis, "slots_picture", PRELUDE)(keys=names, args=args)
    return [
        {
            "business_id": str(business),
            "in_use": int(in_use),
            "limit": int(own) if own else default_limit,
            "parked": int(parked),
        }
        for business, in_use, own, parked in sorted(rows)
    ]
