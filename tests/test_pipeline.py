"""The recording pipeline end to end: signed webhook, stream, media, OpenAI, PostgreSQL."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import openai
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from streamrec import deadletters, service
from streamrec.conversation import Transcripts
from streamrec.delivery import Delivery, Lost
from streamrec.devservers import LocalPostgres
from streamrec.events import RecordingEvent
from streamrec.keys import Keys
from streamrec.metrics import Metrics
from streamrec.pipeline import RecordingPipeline
from streamrec.producer import WEBHOOK_PATH, Enqueuer, WebhookConfig, create_app
from streamrec.retry import TransientError
from streamrec.settings import Settings
from streamrec.store import Store
from streamrec.twilio import MediaClient
from tests.conftest import entries, wait_for
from tests.standins import (
    ACCOUNT_SID,
    AUDIO,
    AUTH_TOKEN,
    OPENAI_KEY,
    MediaStandIn,
    OpenAIStandIn,
    call_sid,
    callback_params,
    quota_error,
    recording_sid,
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


@pytest_asyncio.fixture(loop_scope="session")
async def clients(
    settings: Settings, media: MediaStandIn, db: Any
) -> AsyncIterator[tuple[MediaClient, Transcripts]]:
    """The media client and transcriber of the stand-ins, for a pipeline run by hand."""
    media.not_ready = 0
    async with (
        aiohttp.ClientSession() as session,
        openai.AsyncOpenAI(
            api_key=OPENAI_KEY, base_url=settings.openai_base_url, max_retries=0
        ) as client,
    ):
        downloads = MediaClient(
            session=session,
            api_base=media.url,
            account_sid=ACCOUNT_SID,
            auth_token=AUTH_TOKEN,
            media_dir=settings.media_dir,
            max_bytes=settings.media_max_bytes,
        )
        yield downloads, service.transcripts_of(settings, client, Store(db))


def new_event() -> RecordingEvent:
    """A fresh completed recording of business 7."""
    return RecordingEvent.create(
        recording_sid=recording_sid(),
        call_sid=call_sid(),
        account_sid=ACCOUNT_SID,
        business_id="7",
        status="completed",
    )


def delivery_of(event: RecordingEvent, lost_when: Callable[[], bool] | None = None) -> Delivery:
    """A first delivery of ``event``, no longer owned once ``lost_when()`` holds."""

    def guard() -> None:
        if lost_when is not None and lost_when():
            raise Lost("claim taken over")

    return Delivery("1-0", event.to_fields(), 1, guard=guard)


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
    event = new_event()
    await enqueuer.enqueue(event)
    return event.recording_sid


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


@pytest.mark.parametrize(
    ("lost_once", "done"),
    [("begun", (0, 0, None)), ("downloaded", (1, 0, None)), ("transcribed", (1, 1, "downloaded"))],
    ids=["begun", "downloaded", "transcribed"],
)
async def test_a_lost_entry_stops_before_its_next_stage(
    clients: tuple[MediaClient, Transcripts],
    media: MediaStandIn,
    openai_api: OpenAIStandIn,
    db: Any,
    lost_once: str,
    done: tuple[int, int, str | None],
) -> None:
    """Ownership lost after a stage: no download, transcription or row write follows it."""
    downloads, transcripts = clients
    pipeline = RecordingPipeline(store=Store(db), media=downloads, transcripts=transcripts)
    recording = new_event()
    sid = recording.recording_sid
    lost_when = {
        "begun": lambda: True,
        "downloaded": lambda: media.served[sid] > 0,
        "transcribed": lambda: openai_api.calls[sid] > 0,
    }[lost_once]
    with pytest.raises(Lost):
        await pipeline(delivery_of(recording, lost_when))
    progress = await Store(db).progress(sid)
    assert (media.served[sid], openai_api.calls[sid], progress and progress.status) == done


async def test_a_redelivery_lost_before_its_transcription_makes_no_call(
    clients: tuple[MediaClient, Transcripts],
    media: MediaStandIn,
    openai_api: OpenAIStandIn,
    db: Any,
) -> None:
    """A redelivered committed download, lost after the download stage, is not transcribed."""
    downloads, transcripts = clients
    pipeline = RecordingPipeline(store=Store(db), media=downloads, transcripts=transcripts)
    recording = new_event()
    path = downloads.path_for(recording)
    path.parent.mkdir(parents=True)
    path.write_bytes(AUDIO)
    await Store(db).downloaded(recording, entry_id="0-1", attempts=1, path=str(path), size=9)
    checks = itertools.count(1)
    with pytest.raises(Lost):
        await pipeline(delivery_of(recording, lambda: next(checks) > 1))  # owned for one stage
    assert media.requests[recording.recording_sid] == 0
    assert openai_api.calls[recording.recording_sid] == 0


async def test_a_lost_entry_is_not_marked_failed(
    clients: tuple[MediaClient, Transcripts], db: Any
) -> None:
    """The dead-letter hook writes no failure for an entry this process no longer owns."""
    downloads, transcripts = clients
    pipeline = RecordingPipeline(store=Store(db), media=downloads, transcripts=transcripts)
    recording = new_event()
    with pytest.raises(Lost):
        await pipeline.dead(delivery_of(recording, lambda: True), "PermanentError: late")
    assert await Store(db).progress(recording.recording_sid) is None


async def test_a_redelivery_after_the_file_is_saved_downloads_nothing(
    clients: tuple[MediaClient, Transcripts], media: MediaStandIn, db: Any
) -> None:
    """Transcription off: an entry lost after its file was saved is not fetched again."""
    downloads, _ = clients
    pipeline = RecordingPipeline(store=Store(db), media=downloads, transcripts=None)
    recording = new_event()
    sid = recording.recording_sid
    with pytest.raises(Lost):
        await pipeline(delivery_of(recording, lambda: media.served[sid] > 0))
    assert await Store(db).progress(sid) is None  # no stage recorded, only the file saved
    await pipeline(delivery_of(recording))
    progress = await Store(db).progress(sid)
    assert progress is not None
    assert progress.status == "completed"
    assert media.requests[sid] == 1


@pytest.mark.parametrize("bad", ["lone \udcff surrogate", "nul \x00 byte"], ids=["dcff", "nul"])
async def test_a_transcript_postgresql_refuses_is_dead_lettered_at_once(
    settings: Settings,
    openai_api: OpenAIStandIn,
    redis: aioredis.Redis,
    keys: Keys,
    db: Any,
    bad: str,
) -> None:
    """A transcript PostgreSQL refuses dead-letters its entry at once; the others complete."""
    enqueuer = Enqueuer(redis, keys, dedupe_ttl_s=60)
    sids = [await _enqueue_one(enqueuer) for _ in range(4)]
    poisoned = sids[0]
    openai_api.text_for[poisoned] = bad  # sent JSON-escaped; the SDK decodes it back
    await consume_all(settings)
    found = await rows(db)
    assert [found[sid]["status"] for sid in sids[1:]] == ["completed"] * 3
    assert found[poisoned]["status"] == "failed"
    assert "PostgreSQL refused the row" in found[poisoned]["error"]
    assert openai_api.calls[poisoned] == 1
    [(_, dead)] = await entries(redis, keys.dead)
    assert dead["recording_sid"] == poisoned
    assert "PostgreSQL refused the row" in dead["error"]


async def test_an_outage_during_the_commit_costs_no_second_transcription(
    settings: Settings,
    openai_api: OpenAIStandIn,
    redis: aioredis.Redis,
    keys: Keys,
    server_dir: Path,
) -> None:
    """PostgreSQL down as a transcript is committed: once back, it completes, transcribed once."""
    server = LocalPostgres(server_dir / f"pg-{keys.namespace}", durable=False).start()
    database = server.url("streamrec")
    metrics = Metrics()
    stop = asyncio.Event()
    openai_api.gate = asyncio.Event()
    own = settings.model_copy(update={"database_url": database})
    consumer = asyncio.create_task(service.consume(own, stop, metrics=metrics))
    try:
        sid = await _enqueue_one(Enqueuer(redis, keys, dedupe_ttl_s=60))
        await wait_for(lambda: openai_api.waiting[sid] == 1, what="the transcription")
        server.stop()
        before = _retries(metrics)
        openai_api.gate.set()
        await wait_for(lambda: _retries(metrics) >= before + 3, what="outage retries")
        server.start()
        await wait_for(lambda: _completed(database, [sid]), what="the recording completed")
        assert openai_api.calls[sid] == 1
        assert await redis.xlen(keys.dead) == 0
    finally:
        stop.set()
        await asyncio.wait_for(consumer, 30)
        server.stop()


def deleting(settings: Settings) -> Settings:
    """``settings`` with STREAMREC_DELETE_FROM_TWILIO on."""
    return settings.model_copy(update={"delete_from_twilio": True})


async def test_a_recording_is_deleted_from_twilio_only_once_its_row_is_completed(
    webhook: Client,
    settings: Settings,
    media: MediaStandIn,
    redis: aioredis.Redis,
    keys: Keys,
    db: Any,
) -> None:
    """Delete on: each recording is deleted once, when its row already says completed."""
    status_then: dict[str, str | None] = {}

    async def look(sid: str) -> None:
        query = "SELECT status FROM recordings WHERE recording_sid = $1"
        status_then[sid] = await db.fetchval(query, sid)

    media.on_delete = look
    sent = [(await callback(webhook))["RecordingSid"] for _ in range(4)]
    await consume_all(deleting(settings))
    found = await rows(db)
    assert status_then == dict.fromkeys(sent, "completed")
    for sid in sent:
        assert media.deletes[sid] == 1
        row = found[sid]
        assert row["status"] == "completed"
        assert row["deleted_at"] >= row["completed_at"]
        assert row["error"] is None
        assert (settings.media_dir / "7" / f"{sid}.mp3").read_bytes() == AUDIO
    assert await redis.xlen(keys.stream) == 0
    assert await redis.xlen(keys.dead) == 0


async def test_with_the_setting_off_nothing_is_deleted(
    webhook: Client, settings: Settings, media: MediaStandIn, db: Any
) -> None:
    """STREAMREC_DELETE_FROM_TWILIO is off by default: no DELETE reaches Twilio."""
    params = await callback(webhook)
    await consume_all(settings)
    row = (await rows(db))[params["RecordingSid"]]
    assert row["status"] == "completed"
    assert row["deleted_at"] is None
    assert sum(media.delete_requests.values()) == 0


async def test_absent_failed_and_dead_lettered_recordings_are_never_deleted(
    webhook: Client, settings: Settings, media: MediaStandIn, db: Any
) -> None:
    """Delete on: recordings Twilio reported absent or failed, or that we failed, stay on Twilio."""
    await callback(webhook, status="absent")
    await callback(webhook, status="failed")
    refused = callback_params()["RecordingSid"]
    media.status_for[refused] = 403
    await callback(webhook, sid=refused)
    await consume_all(deleting(settings))
    assert sorted(r["status"] for r in (await rows(db)).values()) == ["absent", "failed", "failed"]
    assert sum(media.delete_requests.values()) == 0


async def test_a_404_on_delete_counts_as_done(
    webhook: Client,
    settings: Settings,
    media: MediaStandIn,
    redis: aioredis.Redis,
    keys: Keys,
    db: Any,
) -> None:
    """A recording Twilio no longer has is recorded deleted; its entry is acked."""
    sid = callback_params()["RecordingSid"]
    media.delete_status_for[sid] = 404
    await callback(webhook, sid=sid)
    await consume_all(deleting(settings))
    row = (await rows(db))[sid]
    assert (row["status"], row["error"]) == ("completed", None)
    assert row["deleted_at"] is not None
    assert media.delete_requests[sid] == 1
    assert await redis.xlen(keys.stream) == 0
    assert await redis.xlen(keys.dead) == 0


async def test_a_delete_refused_for_good_leaves_the_recording_completed(
    webhook: Client,
    settings: Settings,
    media: MediaStandIn,
    redis: aioredis.Redis,
    keys: Keys,
    db: Any,
) -> None:
    """A 403 on delete: asked once, the row stays completed with the reason, nothing dead."""
    sid = callback_params()["RecordingSid"]
    media.delete_status_for[sid] = 403
    await callback(webhook, sid=sid)
    await consume_all(deleting(settings))
    row = (await rows(db))[sid]
    assert row["status"] == "completed"
    assert row["deleted_at"] is None
    assert "not deleted from Twilio" in row["error"]
    assert "403" in row["error"]
    assert media.delete_requests[sid] == 1
    assert await redis.xlen(keys.stream) == 0
    assert await redis.xlen(keys.dead) == 0


async def test_a_delete_that_keeps_failing_is_dead_lettered_with_its_row_completed(
    webhook: Client,
    settings: Settings,
    media: MediaStandIn,
    redis: aioredis.Redis,
    keys: Keys,
    db: Any,
) -> None:
    """503 on every delete: dead-lettered at the cap, the row still completed; a replay deletes."""
    media.not_ready = 0
    sid = callback_params()["RecordingSid"]
    media.delete_status_for[sid] = 503
    await callback(webhook, sid=sid)
    await consume_all(deleting(settings).model_copy(update={"max_deliveries": 3}))
    assert media.delete_requests[sid] == 3
    row = (await rows(db))[sid]
    assert (row["status"], row["deleted_at"]) == ("completed", None)
    [(dead_id, dead)] = await entries(redis, keys.dead)
    assert "delete request got 503" in dead["error"]
    del media.delete_status_for[sid]
    await deadletters.replay(redis, keys, [dead_id])
    await consume_all(deleting(settings))
    assert (await rows(db))[sid]["deleted_at"] is not None
    assert (media.served[sid], media.deletes[sid]) == (1, 1)


async def test_a_redelivery_resumes_at_the_delete_stage(
    clients: tuple[MediaClient, Transcripts], media: MediaStandIn, db: Any
) -> None:
    """Completed, not deleted: a redelivery deletes without a download; once deleted, no more."""
    downloads, _ = clients
    pipeline = RecordingPipeline(
        store=Store(db), media=downloads, transcripts=None, delete_from_twilio=True
    )
    recording = new_event()
    sid = recording.recording_sid
    media.delete_status_for[sid] = 503
    with pytest.raises(TransientError):
        await pipeline(delivery_of(recording))
    progress = await Store(db).progress(sid)
    assert progress is not None
    assert (progress.status, progress.deleted_at) == ("completed", None)
    del media.delete_status_for[sid]
    await pipeline(delivery_of(recording))
    await pipeline(delivery_of(recording))
    progress = await Store(db).progress(sid)
    assert progress is not None
    assert progress.deleted_at is not None
    assert (media.requests[sid], media.delete_requests[sid], media.deletes[sid]) == (1, 2, 1)


async def test_an_entry_lost_before_its_delete_deletes_nothing(
    clients: tuple[MediaClient, Transcripts], media: MediaStandIn, db: Any
) -> None:
    """Ownership lost after the row is completed: no DELETE is sent."""
    downloads, _ = clients
    pipeline = RecordingPipeline(
        store=Store(db), media=downloads, transcripts=None, delete_from_twilio=True
    )
    recording = new_event()
    checks = itertools.count(1)
    with pytest.raises(Lost):  # owned for the download and the row, not the delete
        await pipeline(delivery_of(recording, lambda: next(checks) > 2))
    progress = await Store(db).progress(recording.recording_sid)
    assert progress is not None
    assert progress.status == "completed"
    assert media.delete_requests[recording.recording_sid] == 0
