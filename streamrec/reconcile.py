"""The reconciler: recordings Twilio holds whose callbacks never reached streamrec.

Twilio retries a status callback at most once, within about 15 s; a webhook or
Redis outage longer than that loses it. The reconciler lists the account's
recordings through Twilio's REST API (``twilio_api``) and enqueues each one in a
final status (completed, absent, failed) that streamrec does not know: no row
in PostgreSQL and no dedupe marker in Redis. It enqueues through the webhook's
own path (``producer.Enqueuer``, one atomic check-and-add per RecordingSid), so
a callback arriving later is a duplicate, and a reconciled recording is
processed like any other: its media URL built from AccountSid and RecordingSid,
``origin = reconcile`` on its row.

Cost per page of up to 1000 recordings: one query to PostgreSQL and one MGET
to Redis, whatever the page holds. The Calls resource is asked only about the
recordings neither knows, in parallel; the numbers table is read once per run.

Business: the callback URL named it; a listed recording does not, so its
call's numbers do (``streamrec.numbers``). A recording whose numbers map to no
business goes to ``STREAMREC_RECONCILE_DEFAULT_BUSINESS`` if set; otherwise it
is not enqueued, but counted and listed as unassigned.

Scheduled runs (``Schedule``): every consumer looks every tenth of the interval;
one script call lets exactly one of them claim each interval's run, holding a
lease (``SET NX PX``, one interval long) that it renews while the run lasts. A
holder that dies loses the lease within one interval; the next due run is
another consumer's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

from streamrec import lua, numbers
from streamrec.aio import wait_set
from streamrec.events import CALL_SID, TERMINAL_STATUSES, InvalidEvent, RecordingEvent
from streamrec.keys import Keys
from streamrec.metrics import Metrics
from streamrec.partitions import Layout, as_layout
from streamrec.producer import Enqueuer
from streamrec.retry import describe
from streamrec.store import Store
from streamrec.twilio_api import PAGE_SIZE, Call, Listed, TwilioApi

log = structlog.get_logger("streamrec.reconcile")

KEEP_UNASSIGNED = 100
"""Unassigned recordings kept with the last run's result in Redis (all are in ``--json``)."""


@dataclass(frozen=True, slots=True)
class Window:
    """GMT days to reconcile, from ``first`` to ``last`` inclusive (None: up to today)."""

    first: date
    last: date | None = None

    @classmethod
    def since(cls, hours: float, *, now: datetime | None = None) -> Window:
        """The window covering the last ``hours``: from the GMT day they began, to now."""
        return cls(((now or datetime.now(UTC)) - timedelta(hours=hours)).date())

    def __str__(self) -> str:
        return f"{self.first}..{self.last or 'now'}"


def parse_hours(text: str) -> float:
    """Hours in ``90m``, ``48h`` or ``2d``; ValueError for anything else."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([mhd])", text.strip())
    if not match:
        raise ValueError(f"{text!r} is not a span such as 90m, 48h or 2d")
    return float(match[1]) * {"m": 1 / 60, "h": 1.0, "d": 24.0}[match[2]]


@dataclass
class Outcome:
    """What one run found and did; ``error`` says why it stopped early (None: it finished)."""

    window: str
    by: str
    dry_run: bool = False
    started_ms: int = field(default_factory=lambda: int(time.time() * 1000))
    listed: int = 0
    known: int = 0
    """In a final status and known: a row, a dedupe marker, or a callback that won the race."""
    enqueued: int = 0
    """Added to the stream (with ``dry_run``: would have been)."""
    defaulted: int = 0
    """Of those enqueued, how many under the default business."""
    unassigned: int = 0
    not_final: int = 0
    """Still in progress or processing: their callback is yet to come."""
    pages: int = 0
    seconds: float = 0.0
    error: str | None = None
    unassigned_recordings: list[dict[str, str | None]] = field(default_factory=list)

    def summary(self, *, keep: int | None = None) -> dict[str, Any]:
        """The outcome as JSON-ready data, with at most ``keep`` unassigned recordings."""
        data = asdict(self)
        data["unassigned_recordings"] = self.unassigned_recordings[:keep]
        return data

    def line(self) -> str:
        """The figures in one line."""
        figures = (
            f"listed {self.listed}  known {self.known}  enqueued {self.enqueued}"
            f"  unassigned {self.unassigned}  pages {self.pages}  {self.seconds:.1f}s"
        )
        return figures + (f"  FAILED: {self.error}" if self.error else "")


class Reconciler:
    """Lists the account's recordings and enqueues those streamrec does not know."""

    def __init__(
        self,
        *,
        api: TwilioApi,
        pool: Any,
        redis: aioredis.Redis,
        keys: Keys | Layout,
        enqueuer: Enqueuer,
        default_business: str | None = None,
        metrics: Metrics | None = None,
        page_size: int = PAGE_SIZE,
    ) -> None:
        self._api = api
        self._pool = pool
        self._store = Store(pool)
        self._redis = redis
        self._layout = as_layout(keys)
        self._keys = self._layout.home
        self._enqueuer = enqueuer
        self._default = default_business
        self._metrics = metrics or Metrics()
        self._page_size = page_size

    async def run(self, window: Window, *, dry_run: bool = False, by: str = "cli") -> Outcome:
        """Reconcile ``window``; with ``dry_run``, count what would be enqueued, enqueue nothing.

        Never raises for a failure of Twilio, Redis or PostgreSQL: the outcome
        says how far it got and why it stopped. A real run's outcome is kept
        in Redis for ``status``.
        """
        outcome = Outcome(window=str(window), by=by, dry_run=dry_run)
        began = time.monotonic()
        try:
            mapped = await numbers.mapping(self._pool)
            pages = self._api.recordings(
                first=window.first, last=window.last, page_size=self._page_size
            )
            async with contextlib.aclosing(pages):  # a failed run stops the next page's fetch
                async for page in pages:
                    await self._page(page, mapped, outcome)
        except Exception as exc:  # any failure ends the run; the next one starts over
            outcome.error = describe(exc)
        outcome.seconds = time.monotonic() - began
        self._report(outcome)
        if not dry_run:
            try:
                await self._redis.set(
                    self._keys.reconcile_last, json.dumps(outcome.summary(keep=KEEP_UNASSIGNED))
                )
            except RedisError as exc:
                log.warning("reconcile_result_not_kept", error=describe(exc))
        return outcome

    async def _page(self, page: list[Listed], mapped: dict[str, str], outcome: Outcome) -> None:
        outcome.pages += 1
        outcome.listed += len(page)
        final = [r for r in page if r.status in TERMINAL_STATUSES]
        outcome.not_final += len(page) - len(final)
        fresh = await self._unknown(final)
        outcome.known += len(final) - len(fresh)
        calls = await self._api.calls(r.call_sid for r in fresh if CALL_SID.fullmatch(r.call_sid))
        events = []
        for recording in fresh:
            event = self._event(recording, calls.get(recording.call_sid), mapped, outcome)
            if event is not None:
                events.append(event)
        if outcome.dry_run:
            outcome.enqueued += len(events)
            return
        added = sum(
            1
            for new, _ in await asyncio.gather(*(self._enqueuer.enqueue(e) for e in events))
            if new
        )
        outcome.enqueued += added
        outcome.known += len(events) - added  # their callbacks came in the meantime

    async def _unknown(self, listed: list[Listed]) -> list[Listed]:
        """Those of ``listed`` with neither a row nor a dedupe marker: one lookup in each
        (the markers in every partition: a recording's business is not known yet)."""
        if not listed:
            return []
        sids = [r.sid for r in listed]
        rows, *markers = await asyncio.gather(
            self._store.known(sids),
            *(self._redis.mget([part.seen(sid) for sid in sids]) for part in self._layout),
        )
        marked = {sid for found in markers for sid, m in zip(sids, found, strict=True) if m}
        return [r for r in listed if r.sid not in marked and r.sid not in rows]

    def _event(
        self, recording: Listed, call: Call | None, mapped: dict[str, str], outcome: Outcome
    ) -> RecordingEvent | None:
        """The event to enqueue for ``recording``, or None (then counted as unassigned)."""
        business = None
        if call is not None:
            business = numbers.business_of(
                mapped, to=call.to, from_=call.from_, direction=call.direction
            )
        if business is None and self._default is None:
            why = "number not mapped" if call is not None else "call not found"
            _unassigned(outcome, recording, call, why)
            return None
        try:
            event = RecordingEvent.create(
                recording_sid=recording.sid, call_sid=recording.call_sid,
                account_sid=recording.account_sid, business_id=business or self._default or "",
                status=recording.status, duration_s=recording.duration,
                channels=recording.channels, source=recording.source, origin="reconcile",
            )  # fmt: skip
        except InvalidEvent as exc:
            _unassigned(outcome, recording, call, str(exc))
            return None
        outcome.defaulted += business is None
        return event

    def _report(self, outcome: Outcome) -> None:
        """One log line and the metrics of a finished run."""
        m = self._metrics
        m.reconcile_runs.labels("failed" if outcome.error else "ok").inc()
        for kind in ("listed", "known", "enqueued", "unassigned"):
            m.reconcile_recordings.labels(kind).inc(getattr(outcome, kind))
        m.reconcile_pages.inc(outcome.pages)
        m.reconcile_seconds.observe(outcome.seconds)
        if not outcome.error:
            m.reconcile_last_success.set(time.time())
        figures = {k: v for k, v in outcome.summary().items() if k != "unassigned_recordings"}
        figures["seconds"] = round(outcome.seconds, 3)
        if outcome.error:
            log.error("reconcile_failed", **figures)
        else:
            log.info("reconcile_finished", **figures)


def _unassigned(outcome: Outcome, recording: Listed, call: Call | None, why: str) -> None:
    """Count ``recording`` as unassigned, and list it with what its call said."""
    outcome.unassigned += 1
    outcome.unassigned_recordings.append({
        "recording_sid": recording.sid, "call_sid": recording.call_sid,
        "status": recording.status, "to": call.to if call else None,
        "from": call.from_ if call else None, "direction": call.direction if call else None,
        "reason": why,
    })  # fmt: skip


class Schedule:
    """Runs a reconcile every interval, in exactly one of all the consumers at a time."""

    def __init__(
        self,
        *,
        redis: aioredis.Redis,
        keys: Keys,
        name: str,
        interval_s: float,
        lookback_h: float,
        reconcile: Callable[[Window], Coroutine[Any, Any, Outcome]],
    ) -> None:
        self._keys = keys
        self._name = name
        self._interval_ms = max(int(interval_s * 1000), 1)
        self._lookback_h = lookback_h
        self._reconcile = reconcile
        # Polls cost one script call; a tenth of the interval hands a dead
        # holder's run on soon after its lease lapses.
        self._poll_s = min(max(interval_s / 10, 0.05), 10.0)
        self._claim = lua.register(redis, "reconcile_claim")
        self._keep = lua.register(redis, "reconcile_keep")

    async def run(self, stop: asyncio.Event) -> None:
        """Claim and run the due reconciles until ``stop``; a run in progress is then cancelled."""
        while not stop.is_set():
            try:
                if await self._claimed():
                    await self._hold(stop)
            except RedisError as exc:
                log.warning("reconcile_schedule_failed", error=describe(exc))
            await wait_set(stop, self._poll_s)

    async def _claimed(self) -> bool:
        """True if the due run is ours (reconcile_claim.lua: lease and interval both one long)."""
        keys = [self._keys.reconcile_lease, self._keys.reconcile_next]
        lease = str(self._interval_ms)
        return int(await self._claim(keys, [self._name, lease, lease])) == 1

    async def _held(self, lease_ms: int) -> bool:
        """Renew the lease (0: release it) with reconcile_keep.lua; False if it is not ours."""
        return int(await self._keep([self._keys.reconcile_lease], [self._name, lease_ms])) == 1

    async def _hold(self, stop: asyncio.Event) -> None:
        """One run, renewing the lease every third of it; stopped when the lease is lost."""
        run = asyncio.create_task(self._reconcile(Window.since(self._lookback_h)))
        stopping = asyncio.create_task(stop.wait())
        try:
            while True:
                await asyncio.wait(
                    {run, stopping}, timeout=self._interval_ms / 3000,
                    return_when=asyncio.FIRST_COMPLETED,
                )  # fmt: skip
                if run.done() or stopping.done():
                    return
                if not await self._held(self._interval_ms):
                    log.warning("reconcile_lease_lost", consumer=self._name)
                    return
        finally:
            stopping.cancel()
            run.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await run
            with contextlib.suppress(RedisError):
                await self._held(0)
