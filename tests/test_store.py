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
    """Two writes of one recording leave one row, with the highest attempts and latest entry id."""
    recording = event()
    records = Store(db)
    assert await records.progress(recording.recording_sid) is None
    await records.downloaded(recording, entry_id="1-0", attempts=1, path="/m/x.mp3", size=10)
    await records.downloaded(recording, entry_id="2-0", attempts=2, path="/m/x.mp3", size=10)
    assert await db.fetchval("SELECT count(*) FROM recordings") == 1
    stored = await row(db, recording.recording_sid)
    assert stored["attempts"] == 2
    assert stored["entry_id"] == "2-0"
    assert stored["call_sid"] == recording.call_sid
    assert stored["duration_s"] == 42
    progress = await records.progress(recording.recording_sid)
    assert progress == Progress("downloaded", "/m/x.mp3", 10, None)


async def test_recording_sid_is_the_primary_key(db: Any) -> None:
    """The table itself refuses a second row of one RecordingSid."""
    recording = event()
    await Store(db).downloaded(recording, entry_id="1-0", attempts=1, path="/m/x.mp3", size=1)
    with pytest.raises(asyncpg.UniqueViolationError):
        await db.execute(
            "INSERT INTO recordings (recording_sid, call_sid, account_sid, business_id, status)"
            " VALUES ($1, $2, $3, '42', 'received')",
            recording.recording_sid,
            recording.call_sid,
            ACCOUNT_SID,
        )


async def test_a_failed_recording_is_reopened_by_its_next_stage(db: Any) -> None:
    """A failed recording that is replayed and downloads again is reopened, its error cleared."""
    recording = event()
    records = Store(db)
    await records.failed(recording, entry_id="1-0", error="download failed: 500", attempts=3)
    stored = await row(db, recording.recording_sid)
    assert (stored["status"], stored["error"], stored["attempts"]) == (
        "failed", "download failed: 500", 3
    )  # fmt: skip
    await records.downloaded(recording, entry_id="3-0", attempts=1, path="/m/x.mp3", size=9)
    stored = await row(db, recording.recording_sid)
    assert (stored["status"], stored["error"], stored["attempts"]) == ("downloaded", None, 3)


async def test_a_failure_after_the_download_keeps_it(db: Any) -> None:
    """A recording that failed after its download still shows the download, then completes."""
    recording = event()
    records = Store(db)
    await records.downloaded(recording, entry_id="1-0", attempts=1, path="/m/x.mp3", size=2014)
    await records.failed(recording, entry_id="1-0", error="transcription failed")
    progress = await records.progress(recording.recording_sid)
    assert progress == Progress("failed", "/m/x.mp3", 2014, None)
    await records.completed(
        recording, entry_id="2-0", attempts=1, path="/m/x.mp3", size=2014,
        transcript="hello", model="m",
    )  # fmt: skip
    stored = await row(db, recording.recording_sid)
    assert (stored["status"], stored["error"], stored["transcript"]) == ("completed", None, "hello")


async def test_failed_never_downgrades_a_completed_recording(db: Any) -> None:
    """failed on a completed recording keeps it completed, with no error."""
    recording = event()
    records = Store(db)
    await records.completed(
        recording, entry_id="1-0", attempts=1, path="/m/x.mp3", size=2014,
        transcript="hello", model="m",
    )  # fmt: skip
    await records.failed(recording, entry_id="1-0", error="late failure")
    stored = await row(db, recording.recording_sid)
    assert (stored["status"], stored["error"]) == ("completed", None)
