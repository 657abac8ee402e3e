"""The reconciler against the Twilio stand-in, real Redis and real PostgreSQL.

Runs here are in-process; ``tests/test_reconcile_processes.py`` has the ones
with real ``serve``, ``consume`` and ``reconcile`` processes.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, date, datetime
from functools import partial
from typing import Any

import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from streamrec import numbers, status, store, twilio_api
from streamrec.events import RecordingEvent
from streamrec.keys import Keys
from streamrec.metrics import Metrics
from streamrec.producer import Enqueuer
from streamrec.reconcile import Outcome, Reconciler, Schedule, Window, parse_hours
from streamrec.retry import RetryPolicy
from tests.conftest import entries, wait_for
from tests.standins import ACCOUNT_SID, AUTH_TOKEN, MediaStandIn, call_sid, recording_sid
from tests.twilio_rest import days_ago

SHOP = "+15550100000"  # the stand-in's calls go to this number unless told otherwise
CUSTOMER = "+15550199999"  # ... and come from this one
QUICK = RetryPolicy(max_deliveries=5, base_s=0.01, max_s=0.05)

Reconcile = Callable[..., Awaitable[Outcome]]


class CountingPool:
    """A real asyncpg pool that counts the queries sent through it."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.queries = 0

    async def fetch(self, *args: Any) -> Any:
        self.queries += 1
        return await self.pool.fetch(*args)

    async def fetchval(self, *args: Any) -> Any:
        self.queries += 1
        return await self.pool.fetchval(*args)


@pytest_asyncio.fixture(loop_scope="session")
async def reconcile(
    media: MediaStandIn, redis: aioredis.Redis, keys: Keys, db: Any
) -> AsyncIterator[Reconcile]:
    """Runs a reconcile over the last 48 hours: ``await reconcile(page_size=, default=, ...)``."""
    async with twilio_api.open_client(
        api_base=media.url, account_sid=ACCOUNT_SID, auth_token=AUTH_TOKEN
    ) as client:

        async def run(
            *,
            page_size: int = 1000,
            default: str | None = None,
            pool: Any = db,
            dry_run: bool = False,
            metrics: Metrics | None = None,
        ) -> Outcome:
            reconciler = Reconciler(
                api=twilio_api.TwilioApi(client, timeout_s=10, patience=QUICK),
                pool=pool,
                redis=redis,
                keys=keys,
                enqueuer=Enqueuer(redis, keys, dedupe_ttl_s=3600),
                default_business=default,
                metrics=metrics,
                page_size=page_size,
            )
            return await reconciler.run(Window.since(48), dry_run=dry_run)

        yield run


def listed(media: MediaStandIn, count: int, **call: Any) -> list[str]:
    """``count`` new recordings in the stand-in's list, each of its own call."""
    sids = [recording_sid() for _ in range(count)]
    for sid in sids:
        media.rest.add(sid, call_sid(), **call)
    return sids


async def enqueued(redis: aioredis.Redis, keys: Keys) -> dict[str, dict[str, str]]:
    """The stream's entries by RecordingSid."""
    return {fields["recording_sid"]: fields for _, fields in await entries(redis, keys.stream)}


async def test_unknown_recordings_are_enqueued_once_as_the_webhook_would(
    reconcile: Reconcile, media: MediaStandIn, redis: aioredis.Redis, keys: Keys, db: Any
) -> None:
    """Only final recordings with no row and no marker are enqueued; a second run adds none."""
    await numbers.add(db, SHOP, "shop-1")
    lost = listed(media, 2) + listed(media, 1, status="absent")
    by_webhook, by_row = listed(media, 2)
    listed(media, 1, status="in-progress")
    webhook = Enqueuer(redis, keys, dedupe_ttl_s=3600)
    await webhook.enqueue(event_of(by_webhook))
    await store.Store(db).terminal(event_of(by_row, status="failed"), entry_id="1-0")

    outcome = await reconcile()

    assert (outcome.listed, outcome.known, outcome.enqueued, outcome.not_final) == (6, 2, 3, 1)
    assert (outcome.unassigned, outcome.pages, outcome.error) == (0, 1, None)
    stream = await enqueued(redis, keys)
    assert set(stream) == {*lost, by_webhook}
    for sid in lost:
        event = RecordingEvent.from_fields(stream[sid])
        assert (event.origin, event.business_id) == ("reconcile", "shop-1")
        assert event.call_sid == media.rest.recordings[sid]["call_sid"]
    assert RecordingEvent.from_fields(stream[lost[2]]).status == "absent"
    again = await reconcile()
    assert (again.enqueued, again.known) == (0, 5)
    # A callback that comes after all is a duplicate, as any repeat of the webhook's.
    first_id = await redis.get(keys.seen(lost[0]))
    assert await webhook.enqueue(event_of(lost[0])) == (False, first_id)


async def test_business_is_the_number_called_inbound_and_the_number_calling_outbound(
    reconcile: Reconcile, media: MediaStandIn, redis: aioredis.Redis, keys: Keys, db: Any
) -> None:
    """Inbound calls belong to the business of ``to``, outbound ones to that of ``from``."""
    await numbers.add(db, "+15550100001", "called")
    await numbers.add(db, "+15550100002", "calling")
    [inbound] = listed(media, 1, to="+15550100001", from_="+15550100002", direction="inbound")
    [outbound] = listed(media, 1, to="+15550100001", from_="+15550100002", direction="outbound-api")
    assert (await reconcile()).enqueued == 2
    stream = await enqueued(redis, keys)
    assert stream[inbound]["business_id"] == "called"
    assert stream[outbound]["business_id"] == "calling"


async def test_unassigned_recordings_are_listed_not_enqueued_without_a_default_business(
    reconcile: Reconcile, media: MediaStandIn, redis: aioredis.Redis, keys: Keys, db: Any
) -> None:
    """No mapped number, no default: counted and listed with its call's numbers, not enqueued."""
    [unmapped] = listed(media, 1, to="+15557770000")
    [callless] = listed(media, 1)
    del media.rest.calls[media.rest.recordings[callless]["call_sid"]]
    outcome = await reconcile()
    assert (outcome.unassigned, outcome.enqueued) == (2, 0)
    assert await redis.xlen(keys.stream) == 0
    reasons = {r["recording_sid"]: r for r in outcome.unassigned_recordings}
    assert reasons[unmapped]["to"] == "+15557770000"
    assert reasons[unmapped]["reason"] == "number not mapped"
    assert reasons[callless]["reason"] == "call not found"
    # With a default business they go there.
    assert (await reconcile(default="catch-all")).enqueued == 2
    assert {f["business_id"] for f in (await enqueued(redis, keys)).values()} == {"catch-all"}


async def test_listing_pages_through_a_429_and_a_503_retrying_only_the_failed_pages(
    reconcile: Reconcile, media: MediaStandIn, redis: aioredis.Redis, keys: Keys, db: Any
) -> None:
    """Five pages, a 429 and a 503 between them: every recording once, each page fetched again."""
    await numbers.add(db, SHOP, "shop-1")
    sids = listed(media, 45)
    media.rest.list_failures = {1: [429], 3: [503]}
    outcome = await reconcile(page_size=10)
    assert (outcome.pages, outcome.listed, outcome.enqueued, outcome.error) == (5, 45, 45, None)
    assert set(await enqueued(redis, keys)) == set(sids)
    pages = [query.get("Page", "0") for _, query in media.rest.list_requests]
    assert pages == ["0", "1", "1", "2", "3", "3", "4"]


async def test_a_page_failing_for_good_ends_the_run_with_the_reason(
    reconcile: Reconcile, media: MediaStandIn
) -> None:
    """A 401 is not retried: the run stops, says why, and raises nothing."""
    listed(media, 3)
    media.rest.list_failures = {0: [401]}
    outcome = await reconcile()
    assert outcome.error is not None and "401" in outcome.error
    assert len(media.rest.list_requests) == 1


async def test_each_page_costs_one_query_and_one_redis_command_to_look_up(
    reconcile: Reconcile, media: MediaStandIn, redis: aioredis.Redis, keys: Keys, db: Any
) -> None:
    """Per page one PostgreSQL query and one MGET, however many recordings; calls only if new."""
    await numbers.add(db, SHOP, "shop-1")
    listed(media, 250)
    counting = CountingPool(db)
    first = await reconcile(page_size=100, pool=counting)
    assert (first.pages, first.enqueued) == (3, 250)
    assert counting.queries == 1 + 3  # the numbers once, then one lookup per page
    assert sum(media.rest.call_requests.values()) == 250
    counting.queries = 0
    await redis.config_resetstat()
    second = await reconcile(page_size=100, pool=counting)
    assert (second.known, second.enqueued) == (250, 0)
    assert counting.queries == 1 + 3
    assert sum(media.rest.call_requests.values()) == 250  # no call looked up again
    calls = await redis.info("commandstats")
    assert calls["cmdstat_mget"]["calls"] == 3
    assert not {"cmdstat_get", "cmdstat_exists", "cmdstat_evalsha"} & set(calls)


async def test_dry_run_counts_and_enqueues_nothing(
    reconcile: Reconcile, media: MediaStandIn, redis: aioredis.Redis, keys: Keys, db: Any
) -> None:
    """``dry_run`` says what would be enqueued, enqueues nothing and keeps no result."""
    await numbers.add(db, SHOP, "shop-1")
    listed(media, 3)
    outcome = await reconcile(dry_run=True)
    assert (outcome.enqueued, outcome.dry_run) == (3, True)
    assert await redis.xlen(keys.stream) == 0
    assert await redis.get(keys.reconcile_last) is None


async def test_status_and_metrics_show_the_last_run(
    reconcile: Reconcile, media: MediaStandIn, redis: aioredis.Redis, keys: Keys
) -> None:
    """After a run, ``status`` carries its figures (one line rendered), and so do the metrics."""
    listed(media, 2)
    metrics = Metrics()
    await reconcile(metrics=metrics)
    exported = metrics.render().decode()
    assert 'streamrec_reconcile_runs_total{outcome="ok"} 1.0' in exported
    assert 'streamrec_reconcile_recordings_total{result="unassigned"} 2.0' in exported
    assert "streamrec_reconcile_pages_total 1.0" in exported
    report = await status.collect(redis, keys)
    last = report["reconcile"]
    assert (last["listed"], last["unassigned"], last["by"]) == (2, 2, "cli")
    assert len(last["unassigned_recordings"]) == 2
    json.dumps(report)
    assert "reconcile: last run" in status.render(report)
    assert "listed 2" in status.render(report)


def test_windows_and_spans() -> None:
    """``--since`` spans read as hours; a window starts at the GMT day the span began."""
    assert (parse_hours("48h"), parse_hours("2d"), parse_hours("90m")) == (48, 48, 1.5)
    with pytest.raises(ValueError, match="span"):
        parse_hours("48")
    now = datetime(2026, 11, 3, 1, 0, tzinfo=UTC)
    assert Window.since(48, now=now) == Window(date(2026, 11, 1))
    assert str(Window(date(2026, 11, 1), date(2026, 11, 3))) == "2026-11-01..2026-11-03"


async def test_only_recordings_of_the_window_days_are_listed(
    reconcile: Reconcile, media: MediaStandIn, db: Any
) -> None:
    """A recording created before the window's first GMT day is not listed."""
    await numbers.add(db, SHOP, "shop-1")
    listed(media, 1, created=days_ago(4))
    listed(media, 1, created=days_ago(0.01))
    outcome = await reconcile()
    assert (outcome.listed, outcome.enqueued) == (1, 1)


def event_of(sid: str, *, status: str = "completed") -> RecordingEvent:
    """The event the webhook would make of ``sid``'s callback."""
    return RecordingEvent.create(
        recording_sid=sid, call_sid=call_sid(), account_sid=ACCOUNT_SID, business_id="9",
        status=status,
    )  # fmt: skip


async def test_a_run_outlasting_its_interval_keeps_its_lease_and_the_others_out(
    redis: aioredis.Redis, keys: Keys
) -> None:
    """A run longer than the interval renews its lease: no second run starts before it ends."""
    started: list[str] = []
    finish = asyncio.Event()
    running = most = 0

    def schedule(name: str) -> Schedule:
        async def slow(window: Window) -> Outcome:
            nonlocal running, most
            started.append(name)
            running += 1
            most = max(most, running)
            await finish.wait()
            running -= 1
            return Outcome(window=str(window), by=name)

        return Schedule(
            redis=redis, keys=keys, name=name, interval_s=0.3, lookback_h=1, reconcile=slow
        )

    stop = asyncio.Event()
    tasks = [asyncio.create_task(schedule(f"s{n}").run(stop)) for n in range(3)]
    await wait_for(lambda: started, what="a first run")
    # The interval passes (its marker expires) and the lease is renewed twice meanwhile.
    await wait_for(lambda: _gone(redis, keys.reconcile_next), what="the interval to pass")
    for _ in range(2):
        expiry = await redis.pexpiretime(keys.reconcile_lease)
        await wait_for(partial(_renewed, redis, keys, expiry), what="a renewal")
    assert len(started) == 1
    finish.set()
    await wait_for(lambda: len(started) >= 3, what="the next runs")
    stop.set()
    await asyncio.gather(*tasks)
    assert most == 1
    assert await redis.get(keys.reconcile_lease) is None  # released on the way out


async def _gone(redis: aioredis.Redis, key: str) -> bool:
    return not await redis.exists(key)


async def _renewed(redis: aioredis.Redis, keys: Keys, expiry: int) -> bool:
    return bool(await redis.pexpiretime(keys.reconcile_lease) > expiry)
