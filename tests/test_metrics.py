"""Prometheus metrics of the consumer (in process and as a process) and of the webhook."""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest_asyncio
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from streamrec import service, status
from streamrec.devservers import free_port
from streamrec.events import RecordingEvent
from streamrec.keys import Keys
from streamrec.metrics import PORTS_TRIED, Metrics
from streamrec.producer import WEBHOOK_PATH, Enqueuer, WebhookConfig, create_app
from streamrec.settings import Settings
from tests.conftest import wait_for
from tests.processes import spawn_consumer
from tests.standins import (
    ACCOUNT_SID,
    AUTH_TOKEN,
    MediaStandIn,
    call_sid,
    callback_params,
    recording_sid,
    sign,
)

PUBLIC_URL = "https://hooks.example.com"

Client = TestClient[web.Request, web.Application]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
Scraper = Callable[[], Awaitable["Samples | None"]]


def parse(text: str) -> Samples:
    """Every sample of a Prometheus text exposition, by name and labels."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; 0 when it is absent (a labelled counter not yet counted)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def completed(samples: Samples) -> float:
    return value(samples, "streamrec_entries_total", outcome="completed")


async def enqueue(redis: aioredis.Redis, keys: Keys, count: int) -> list[str]:
    """Add ``count`` completed-recording events as the webhook does; returns their sids."""
    enqueuer = Enqueuer(redis, keys, dedupe_ttl_s=600)
    sids = []
    for _ in range(count):
        event = RecordingEvent.create(
            recording_sid=recording_sid(),
            call_sid=call_sid(),
            account_sid=ACCOUNT_SID,
            business_id="7",
            status="completed",
        )
        assert (await enqueuer.enqueue(event))[0]
        sids.append(event.recording_sid)
    return sids


async def consume_all(settings: Settings, metrics: Metrics) -> None:
    await asyncio.wait_for(
        service.consume(settings, asyncio.Event(), until_idle=True, metrics=metrics), 60
    )


async def test_consumer_counts_entries_stages_and_retries(
    redis: aioredis.Redis, keys: Keys, settings: Settings, media: MediaStandIn
) -> None:
    """Entries by outcome, stage timings and retries count up; in_flight returns to 0."""
    metrics = Metrics()
    before = parse(metrics.render().decode())
    assert completed(before) == 0
    assert value(before, "streamrec_retries_total") == 0

    await enqueue(redis, keys, 2)
    await consume_all(settings, metrics)
    first = parse(metrics.render().decode())
    assert completed(first) == 2
    # The media stand-in answers each recording's first request with Twilio's early 404.
    assert value(first, "streamrec_retries_total") == 2

    [refused] = await enqueue(redis, keys, 1)
    media.status_for[refused] = 403
    await enqueue(redis, keys, 3)
    await consume_all(settings, metrics)
    after = parse(metrics.render().decode())
    assert completed(after) == 5
    assert value(after, "streamrec_entries_total", outcome="dead_lettered") == 1
    assert value(after, "streamrec_retries_total") == 5
    for stage in ("download", "transcribe", "store"):
        count = value(after, "streamrec_stage_seconds_count", stage=stage)
        assert count > value(first, "streamrec_stage_seconds_count", stage=stage) > 0, stage
    assert value(after, "streamrec_stage_seconds_count", stage="transcribe") == 5
    assert value(after, "streamrec_in_flight") == 0


async def scrape(session: aiohttp.ClientSession, url: str) -> Samples | None:
    """The parsed metrics at ``url``, or None while nothing answers there."""
    try:
        async with session.get(url) as response:
            if response.status != 200:
                return None
            assert response.headers["Content-Type"].startswith("text/plain")
            return parse(await response.text())
    except aiohttp.ClientConnectionError:
        return None


async def test_consumer_process_serves_metrics_that_move(
    redis: aioredis.Redis,
    keys: Keys,
    settings: Settings,
    media: MediaStandIn,
    tmp_path: Path,
) -> None:
    """``streamrec consume`` serves /metrics whose counters move as it works; SIGTERM exits 0."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    process = spawn_consumer(
        settings,
        "metered",
        tmp_path,
        STREAMREC_METRICS_PORT=str(port),
        STREAMREC_HTTP_HOST="127.0.0.1",
    )
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:

            async def now() -> Samples | None:
                return await scrape(session, url)

            idle = await wait_for(now, what="the consumer's /metrics")
            assert completed(idle) == 0

            await enqueue(redis, keys, 1)
            await wait_for(
                lambda: _completed_at_least(now, 1), what="one entry counted as completed"
            )
            await enqueue(redis, keys, 2)
            [refused] = await enqueue(redis, keys, 1)
            media.status_for[refused] = 403
            await wait_for(
                lambda: _completed_at_least(now, 3), what="three entries counted as completed"
            )
            # The monitor samples the dead-letter stream into a gauge every heartbeat.
            await wait_for(
                lambda: _gauge_is(now, "streamrec_dead_letters", 1), what="dead-letter gauge 1"
            )
            final = await now()
            assert final is not None
            assert completed(final) == 3
            assert value(final, "streamrec_entries_total", outcome="dead_lettered") == 1
        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 30) == 0
    finally:
        if process.poll() is None:
            process.kill()
        await asyncio.to_thread(process.wait, 30)


async def beats(redis: aioredis.Redis, keys: Keys, count: int) -> list[dict[str, Any]] | None:
    """The live heartbeats by consumer name, once there are ``count`` of them."""
    found = sorted(await status.heartbeats(redis, keys), key=lambda beat: str(beat["name"]))
    return found if len(found) == count else None


async def test_three_consumers_on_one_host_share_the_default_port_setting(
    redis: aioredis.Redis,
    keys: Keys,
    settings: Settings,
    media: MediaStandIn,
    tmp_path: Path,
    children: list[subprocess.Popen[bytes]],
) -> None:
    """Three ``consume`` with one STREAMREC_METRICS_PORT all start, each works on an entry,
    and each serves its own /metrics on the port its heartbeat publishes."""
    base = free_port()
    for n in range(3):
        children.append(
            spawn_consumer(
                settings, f"c{n}", tmp_path,
                STREAMREC_METRICS_PORT=str(base), STREAMREC_HTTP_HOST="127.0.0.1",
                STREAMREC_CONCURRENCY="1",
            )
        )  # fmt: skip

    async def all_beating() -> list[dict[str, Any]] | None:
        exited = [
            (n, proc.returncode) for n, proc in enumerate(children) if proc.poll() is not None
        ]
        assert not exited, f"consumers exited (number, code): {exited}"
        return await beats(redis, keys, 3)

    started = await wait_for(all_beating, what="three consumers beating")
    ports = [beat["metrics_port"] for beat in started]
    assert len(set(ports)) == 3
    assert base in ports
    assert all(base <= port < base + PORTS_TRIED for port in ports)

    # One entry at a time each: three downloads held at once are one per consumer.
    media.gate = asyncio.Event()
    await enqueue(redis, keys, 3)
    await wait_for(lambda: sum(media.in_flight.values()) == 3, what="three downloads at once")
    media.gate.set()
    done = await wait_for(
        lambda: _all_processed(redis, keys), what="each consumer's heartbeat counting one entry"
    )
    assert [beat["processed"] for beat in done] == [1, 1, 1]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        for port in ports:
            samples = await scrape(session, f"http://127.0.0.1:{port}/metrics")
            assert samples is not None, port
            assert completed(samples) == 1, port


async def _all_processed(redis: aioredis.Redis, keys: Keys) -> list[dict[str, Any]] | None:
    found = await beats(redis, keys, 3)
    return found if found and all(beat["processed"] == 1 for beat in found) else None


async def _completed_at_least(now: Scraper, count: int) -> bool:
    samples = await now()
    return samples is not None and completed(samples) >= count


async def _gauge_is(now: Scraper, name: str, expected: float) -> bool:
    samples = await now()
    return samples is not None and value(samples, name) == expected


@pytest_asyncio.fixture(loop_scope="session")
async def webhook(redis: aioredis.Redis, keys: Keys) -> AsyncIterator[Client]:
    """The webhook app, its own Metrics, on a test server."""
    config = WebhookConfig(
        account_sid=ACCOUNT_SID, auth_token=AUTH_TOKEN, public_url=PUBLIC_URL, keys=keys
    )
    async with TestClient(TestServer(create_app(redis, config, metrics=Metrics()))) as client:
        yield client


async def post(
    client: Client, params: dict[str, str], *, business: str = "7", token: str = AUTH_TOKEN
) -> int:
    """POST a callback signed with ``token``; returns the status."""
    path = f"{WEBHOOK_PATH}?business_id={business}"
    headers = {"X-Twilio-Signature": sign(PUBLIC_URL + path, params, token)}
    response = await client.post(path, data=params, headers=headers)
    return response.status


async def test_webhook_metrics_count_by_outcome(webhook: Client) -> None:
    """/metrics of the webhook counts queued, duplicate, ignored, forbidden and invalid."""
    params = callback_params()
    assert await post(webhook, params) == 200
    assert await post(webhook, params) == 200
    assert await post(webhook, callback_params()) == 200
    assert await post(webhook, callback_params(status="in-progress")) == 200
    assert await post(webhook, callback_params(), token="not-the-token") == 403
    assert await post(webhook, callback_params(), business="x" * 65) == 400
    bad_sid = callback_params() | {"RecordingSid": "RE-not-a-sid"}
    assert await post(webhook, bad_sid) == 400

    response = await webhook.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    samples = parse(await response.text())
    counts = {
        outcome: value(samples, "streamrec_webhooks_total", outcome=outcome)
        for outcome in ("queued", "duplicate", "ignored", "forbidden", "invalid")
    }
    assert counts == {"queued": 2, "duplicate": 1, "ignored": 1, "forbidden": 1, "invalid": 2}


def test_metrics_of_one_process_are_its_own() -> None:
    """Two Metrics objects do not share counts (no global registry)."""
    one, two = Metrics(), Metrics()
    one.retries.inc()
    assert value(parse(one.render().decode()), "streamrec_retries_total") == 1
    assert value(parse(two.render().decode()), "streamrec_retries_total") == 0
