"""The recording pipeline end to end: signed webhook, stream, media, OpenAI, PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest_asyncio
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from streamrec import service
from streamrec.devservers import LocalPostgres
from streamrec.events import RecordingEvent
from streamrec.keys import Keys
from streamrec.metrics import Metrics
from streamrec.producer import WEBHOOK_PATH, Enqueuer, WebhookConfig, create_app
from streamrec.settings import Settings
from streamrec.store import Store
from tests.conftest import entries, wait_for
from tests.standins import (
    ACCOUNT_SID,
    AUDIO,
    AUTH_TOKEN,
    MediaStandIn,
    OpenAIStandIn,
    callback_params,
    quota_error,
    sign,
)

PUBLIC_URL = "https://hooks.example.com"

Client = TestClient[web.Request, web.Application]


@pytest_asyncio.fixture(loop_scope="session")
async def webhook(redis: aioredis.Redis, keys: Keys) -> AsyncIterator[Client]:
    config = WebhookConfig(
        account_sid=ACCOUNT_SID, auth_token=AUTH_TOKEN, public_url=PUBLIC_URL, keys=keys
    )
    async with TestClient(TestServer(create_app(redis, config))) as client:
        yield client


async def callback(client: Client, *, business: str = "7", **kwargs: Any) -> dict[str, str]:
    """Post one signed RecordingStatusCallback; returns its params."""
    params = callback_params(**kwargs)
    path = f"{WEBHOOK_PATH}?business_id={business}"
    response = await client.post(
        path, data=params, headers={"X-Twilio-Signature": sign(PUBLIC_URL + path, params)}
    )
    assert response.status == 200, await response.text()
    return params


async def consume_all(settings: Settings) -> None:
    await asyncio.wait_for(service.consume(settings, asyncio.Event(), until_idle=True), 60)


async def rows(db: Any) -> dict[str, Any]:
    return {r["recording_sid"]: r for r in await db.fetch("SELECT * FROM recordings")}


async def test_recordings_end_completed_with_transcripts(
    webhook: Client,
    settings: Settings,
    media: MediaStandIn,
    openai_api: OpenAIStandIn,
    redis: aioredis.Redis,
    keys: Keys,
    db: Any,
) -> None:
    """Signed callbacks become completed rows with transcripts; media fetched with Basic auth."""
    sent = [await callback(webhook) for _ in range(6)]
    await consume_all(settings)
    found = await rows(db)
    assert set(found) == {p["RecordingSid"] for p in sent}
    for params in sent:
        sid = params["RecordingSid"]
        row = found[sid]
        assert row["status"] == "completed"
        assert row["transcript"] == f"transcript of {sid}"
        assert row["transcript_model"] == "gpt-4o-mini-transcribe"
        assert row["call_sid"] == params["CallSid"]
        assert row["business_id"] == "7"
        assert row["duration_s"] == 42
        assert row["audio_bytes"] == len(AUDIO)
        assert (settings.media_dir / "7" / f"{sid}.mp3").read_bytes() == AUDIO
        assert media.requests[sid] == 2  # Twilio's early 404, then the audio
        assert media.served[sid] == 1
        assert openai_api.calls[sid] == 1
    assert media.unauthorized == 0
    assert await redis.xlen(keys.stream) == 0
    assert (await redis.xpending(keys.stream, keys.group))["pending"] == 0


async def test_without_an_openai_key_the_pipeline_is_download_only(
    webhook: Client, settings: Settings, openai_api: OpenAIStandIn, db: Any
) -> None:
    """With no OPENAI_API_KEY recordings complete with audio and no transcript."""
    params = await callback(webhook)
    await consume_all(settings.model_copy(update={"openai_api_key": None}))
    row = (await rows(db))[params["RecordingSid"]]
    assert row["status"] == "completed"
    assert row["audio_path"] is not None
    assert row["transcript"] is None
    assert sum(openai_api.calls.values()) == 0


async def test_absent_and_failed_recordings_are_recorded_without_download(
    webhook: Client, settings: Settings, media: MediaStandIn, db: Any
) -> None:
    """Callbacks for absent and failed recordings leave a row with that status, no download."""
    absent = await callback(webhook, status="absent")
    failed = await callback(webhook, status="failed")
    await consume_all(settings)
    found = await rows(db)
    assert found[absent["RecordingSid"]]["status"] == "absent"
    assert found[failed["RecordingSid"]]["status"] == "failed"
    assert sum(media.requests.values()) == 0


async def test_duplicate_callbacks_make_one_row(
    webhook: Client, settings: Settings, media: MediaStandIn, openai_api: OpenAIStandIn, db: Any
) -> None:
    """Three deliveries of one callback: one entry, one row, one download, one transcription."""
    params = callback_params()
    path = f"{WEBHOOK_PATH}?business_id=7"
    headers = {"X-Twilio-Signature": sign(PUBLIC_URL + path, params)}
    for _ in range(3):
        assert (await webhook.post(path, data=params, headers=headers)).status == 200
    await consume_all(settings)
    assert await db.fetchval("SELECT count(*) FROM recordings") == 1
    assert media.served[params["RecordingSid"]] == 1
    assert openai_api.calls[params["RecordingSid"]] == 1


async def test_exhausted_openai_quota_is_not_retried(
    webhook: Client,
    settings: Settings,
    openai_api: OpenAIStandIn,
    redis: aioredis.Redis,
    keys: Keys,
    db: Any,
) -> None:
    """insufficient_quota dead-letters at once and the row says failed with the reason."""
    sid = callback_params()["RecordingSid"]
    openai_api.error_for[sid] = quota_error()
    await callback(webhook, sid=sid)
    await consume_all(settings)
    assert openai_api.calls[sid] == 1
    row = (await rows(db))[sid]
    assert row["status"] == "failed"
    assert "quota" in row["error"]
    [(_, dead)] = await entries(redis, keys.dead)
    assert dead["recording_sid"] == sid
    assert "quota" in dead["error"]
    assert row["audio_path"] is not None  # the download stays committed for a replay


async def test_twilio_4xx_is_permanent(
    webhook: Client,
    settings: Settings,
    media: MediaStandIn,
    redis: aioredis.Redis,
    keys: Keys,
    db: Any,
) -> None:
    """A 403 from Twilio's media endpoint dead-letters the entry after one request."""
    sid = callback_params()["RecordingSid"]
    media.status_for[sid] = 403
    await callback(webhook, sid=sid)
    await consume_all(settings)
    assert media.requests[sid] == 1
    assert (await rows(db))[sid]["status"] == "failed"
    assert await redis.xlen(keys.dead) == 1


async def test_media_that_never_appears_ends_in_dead_letters(
    webhook: Client,
    settings: Settings,
    media: MediaStandIn,
    redis: aioredis.Redis,
    keys: Keys,
    db: Any,
) -> None:
    """A 404 that persists is retried up to STREAMREC_MAX_DELIVERIES, then dead-lettered."""
    sid = callback_params()["RecordingSid"]
    media.status_for[sid] = 404
    await callback(webhook, sid=sid)
    await consume_all(settings.model_copy(update={"max_deliveries": 3}))
    assert media.requests[sid] == 3
    [(_, dead)] = await entries(redis, keys.dead)
    assert dead["attempts"] == "3"
    assert "404" in dead["error"]
    assert (await rows(db))[sid]["attempts"] == 3


async def test_non_audio_media_is_permanent(
    webhook: Client, settings: Settings, media: MediaStandIn, db: Any
) -> None:
    """A body that is not audio is not retried and not transcribed."""
    sid = callback_params()["RecordingSid"]
    media.body_for[sid] = b"<html>oops</html>"
    await callback(webhook, sid=sid)
    await consume_all(settings)
    row = (await rows(db))[sid]
    assert row["status"] == "failed"
    assert "not audio" in row["error"]
    assert media.served[sid] == 1


async def test_a_redelivery_resumes_after_committed_stages(
    settings: Settings,
    media: MediaStandIn,
    openai_api: OpenAIStandIn,
    redis: aioredis.Redis,
    keys: Keys,
    db: Any,
) -> None:
    """An entry whose download is committed is transcribed without a second download."""
    params = callback_params()
    sid = params["RecordingSid"]
    event = RecordingEvent.create(
        recording_sid=sid,
        call_sid=params["CallSid"],
        account_sid=ACCOUNT_SID,
        business_id="7",
        status="completed",
    )
    path = settings.media_dir / "7" / f"{sid}.mp3"
    path.parent.mkdir(parents=True)
    path.write_bytes(AUDIO)
    await Store(db).downloaded(event, entry_id="0-1", attempts=1, path=str(path), size=len(AUDIO))
    await redis.xadd(keys.stream, event.to_fields())  # type: ignore[arg-type]
    await consume_all(settings)
    row = (await rows(db))[sid]
    assert row["status"] == "completed"
    assert row["transcript"] == f"transcript of {sid}"
    assert media.requests[sid] == 0
    assert openai_api.calls[sid] == 1


async def test_a_database_outage_dead_letters_nothing(
    settings: Settings,
    media: MediaStandIn,
    redis: aioredis.Redis,
    keys: Keys,
    server_dir: Path,
) -> None:
    """PostgreSQL down for longer than the delivery budget: held entries finish once it is back."""
    server = LocalPostgres(server_dir / f"pg-{keys.namespace}", durable=False).start()
    database = server.url("streamrec")
    own = settings.model_copy(update={"database_url": database, "max_deliveries": 2})
    metrics = Metrics()
    stop = asyncio.Event()
    enqueuer = Enqueuer(redis, keys, dedupe_ttl_s=60)
    consumer = asyncio.create_task(service.consume(own, stop, metrics=metrics))
    try:
        first = await _enqueue_one(enqueuer)
        await wait_for(lambda: media.served[first] == 1, what="the first recording")
        server.stop()
        during = [await _enqueue_one(enqueuer) for _ in range(3)]
        # Well past the two deliveries allowed to a failing entry:
        await wait_for(lambda: _retries(metrics) >= 10, what="outage retries")
        server.start()
        await wait_for(lambda: _completed(database, [first, *during]), what="all completed")
        assert await redis.xlen(keys.dead) == 0
    finally:
        stop.set()
        await asyncio.wait_for(consumer, 30)
        server.stop()


def _retries(metrics: Metrics) -> float:
    return metrics.registry.get_sample_value("streamrec_retries_total") or 0.0


async def _enqueue_one(enqueuer: Enqueuer) -> str:
    params = callback_params()
    event = RecordingEvent.create(
        recording_sid=params["RecordingSid"],
        call_sid=params["CallSid"],
        account_sid=ACCOUNT_SID,
        business_id="7",
        status="completed",
    )
    await enqueuer.enqueue(event)
    return params["RecordingSid"]


async def _completed(database: str, sids: list[str]) -> bool:
    conn = await asyncpg.connect(database)
    try:
        done = await conn.fetchval(
            "SELECT count(*) FROM recordings"
            " WHERE status = 'completed' AND recording_sid = ANY($1)",
            sids,
        )
    finally:
        await conn.close()
    return int(done) == len(sids)
