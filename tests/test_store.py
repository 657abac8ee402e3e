"""PostgreSQL: migrations and the recordings table keyed on RecordingSid."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

from streamrec import store
from streamrec.events import RecordingEvent
from streamrec.store import Progress, Store
from tests.conftest import database_url_for
from tests.standins import ACCOUNT_SID, call_sid, recording_sid


@pytest_asyncio.fixture(loop_scope="session")
async def missing_database(postgres: str) -> AsyncIterator[str]:
    """The DSN of a database that does not exist yet; dropped afterwards if it came to."""
    name = f"m_{uuid.uuid4().hex[:12]}"
    yield database_url_for(postgres, name)
    admin = await asyncpg.connect(postgres)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await admin.close()


def event(status: str = "completed") -> RecordingEvent:
    """A fresh recording event."""
    return RecordingEvent.create(
        recording_sid=recording_sid(),
        call_sid=call_sid(),
        account_sid=ACCOUNT_SID,
        business_id="42",
        status=status,
        duration_s="42",
    )


async def row(db: Any, sid: str) -> dict[str, Any]:
    """The recordings row of ``sid``."""
    found = await db.fetchrow("SELECT * FROM recordings WHERE recording_sid = $1", sid)
    assert found is not None
    return dict(found)


async def test_migrate_creates_missing_database_and_is_idempotent(missing_database: str) -> None:
    """migrate creates a missing database and applies every migration; a rerun applies none."""
    with pytest.raises(asyncpg.InvalidCatalogNameError):
        await asyncpg.connect(missing_database)
    versions = [version for version, _, _ in store.migrations()]
    assert versions, "no packaged migrations found"

    assert await store.migrate(missing_database) == versions
    assert await store.migrate(missing_database) == []

    conn = await asyncpg.connect(missing_database)
    try:
        recorded = [r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")]
        assert sorted(recorded) == versions
        assert await conn.fetchval("SELECT to_regclass('recordings') IS NOT NULL")
    finally:
        await conn.close()


async def test_recording_sid_is_unique(db: Any) -> None:
    """Two begins of one recording leave one row, with attempts == 2 and the latest entry id."""
    recording = event()
    first = await Store(db).begin(recording, entry_id="1-0")
    second = await Store(db).begin(recording, entry_id="2-0")
    assert first == second == Progress("received", None, None, None)
    assert await db.fetchval("SELECT count(*) FROM recordings") == 1
    stored = await row(db, recording.recording_sid)
    assert stored["attempts"] == 2
    assert stored["entry_id"] == "2-0"
    assert stored["call_sid"] == recording.call_sid
    assert stored["duration_s"] == 42


async def test_recording_sid_is_the_primary_key(db: Any) -> None:
    """The table itself refuses a second row of one RecordingSid."""
    recording = event()
    await Store(db).begin(recording, entry_id="1-0")
    with pytest.raises(asyncpg.UniqueViolationError):
        await db.execute(
            "INSERT INTO recordings (recording_sid, call_sid, account_sid, business_id, status)"
            " VALUES ($1, $2, $3, '42', 'received')",
            recording.recording_sid,
            recording.call_sid,
            ACCOUNT_SID,
        )


async def test_failed_then_begin_reopens_the_row(db: Any) -> None:
    """A failed recording that is begun again is reopened as received, its error cleared."""
    recording = event()
    records = Store(db)
    await records.begin(recording, entry_id="1-0")
    await records.failed(recording, entry_id="1-0", error="download failed: 500")
    stored = await row(db, recording.recording_sid)
    assert (stored["status"], stored["error"]) == ("failed", "download failed: 500")

    progress = await records.begin(recording, entry_id="3-0")
    assert progress == Progress("received", None, None, None)
    stored = await row(db, recording.recording_sid)
    assert (stored["status"], stored["error"], stored["attempts"]) == ("received", None, 2)


async def test_failed_after_download_reopens_at_downloaded(db: Any) -> None:
    """A recording that failed after its download is reopened with the download kept."""
    recording = event()
    records = Store(db)
    await records.begin(recording, entry_id="1-0")
    await records.downloaded(recording.recording_sid, path="/media/x.mp3", size=2014)
    await records.failed(recording, entry_id="1-0", error="transcription failed")

    progress = await records.begin(recording, entry_id="3-0")
    assert progress == Progress("downloaded", "/media/x.mp3", 2014, None)
    stored = await row(db, recording.recording_sid)
    assert (stored["status"], stored["error"]) == ("downloaded", None)


async def test_failed_never_downgrades_a_completed_recording(db: Any) -> None:
    """failed on a completed recording keeps it completed."""
    recording = event()
    records = Store(db)
    await records.begin(recording, entry_id="1-0")
    await records.downloaded(recording.recording_sid, path="/media/x.mp3", size=2014)
    await records.completed(recording.recording_sid, transcript="hello", model="m")
    await records.failed(recording, entry_id="1-0", error="late failure")
    assert (await row(db, recording.recording_sid))["status"] == "completed"
