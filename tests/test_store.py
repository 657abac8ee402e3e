"""PostgreSQL: migrations and the recordings table keyed on RecordingSid."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

from streamrec import schema
from streamrec.devservers import LocalPostgres, free_port
from streamrec.events import RecordingEvent
from streamrec.retry import PermanentError, Unavailable
from streamrec.store import Progress, Store
from tests.conftest import database_url_for, wait_for
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
    versions = [version for version, _, _ in schema.migrations()]
    assert versions, "no packaged migrations found"

    assert await schema.migrate(missing_database) == versions
    assert await schema.migrate(missing_database) == []

    conn = await asyncpg.connect(missing_database)
    try:
        recorded = [r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")]
        assert sorted(recorded) == versions
        assert await conn.fetchval("SELECT to_regclass('recordings') IS NOT NULL")
    finally:
        await conn.close()


async def migrate_process(
    database_url: str, wait_s: float, cwd: Path, stderr: Any
) -> asyncio.subprocess.Process:
    """``python -m streamrec migrate --wait wait_s`` against ``database_url``, JSON logs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STREAMREC_", "TWILIO_"))}
    env |= {"DATABASE_URL": database_url, "STREAMREC_LOG_FORMAT": "json"}
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "streamrec", "migrate", "--wait", str(wait_s),
        env=env, cwd=cwd, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=stderr,
    )  # fmt: skip


async def test_migrate_waits_for_a_database_that_starts_later(
    server_dir: Path, tmp_path: Path
) -> None:
    """``migrate --wait`` started before PostgreSQL waits for it, then applies every migration."""
    server = LocalPostgres(server_dir / f"late-{uuid.uuid4().hex[:8]}", durable=False)
    log = tmp_path / "migrate.log"
    with log.open("wb") as stderr:
        process = await migrate_process(server.url("streamrec"), 60, tmp_path, stderr)
    try:
        await wait_for(
            lambda: "database_waiting" in log.read_text() or process.returncode is not None,
            what="migrate to wait for PostgreSQL",
        )
        assert process.returncode is None, log.read_text()
        await asyncio.to_thread(server.start)
        async with asyncio.timeout(60):
            out, _ = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await asyncio.to_thread(server.stop)
        shutil.rmtree(server.directory, ignore_errors=True)
    assert process.returncode == 0, log.read_text()
    versions = [version for version, _, _ in schema.migrations()]
    assert out.decode().strip() == f"migrations applied: {versions}"


async def test_migrate_gives_up_after_its_wait_with_one_line(tmp_path: Path) -> None:
    """With no server, ``migrate --wait 1`` exits 1 after 1 s: one line naming host:port."""
    port = free_port()
    started = time.monotonic()
    process = await migrate_process(
        f"postgresql://streamrec:s3cret@127.0.0.1:{port}/streamrec",
        1,
        tmp_path,
        asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        _, err = await process.communicate()
    elapsed = time.monotonic() - started
    assert process.returncode == 1
    lines = err.decode().splitlines()
    logs = [line for line in lines if line.startswith("{")]  # JSON log lines
    said = [line for line in lines if not line.startswith("{")]
    assert any("database_waiting" in line for line in logs), logs
    assert len(said) == 1, said
    assert f"PostgreSQL at 127.0.0.1:{port} did not accept a connection within 1 s" in said[0]
    assert "s3cret" not in err.decode()
    assert elapsed >= 1.0


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


def completed(records: Store, recording: RecordingEvent, transcript: str) -> Any:
    """The completed write of ``recording`` with ``transcript`` (a coroutine)."""
    return records.completed(
        recording, entry_id="1-0", attempts=1, path="/m/x.mp3", size=2014,
        transcript=transcript, model="m",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("bad", "reason"),
    [("lone \udcff surrogate", "surrogates not allowed"), ("nul \x00 byte", "0x00")],
    ids=["encoded-by-asyncpg", "refused-by-server"],
)
@pytest.mark.parametrize("mates", [0, 2])
async def test_bad_data_fails_alone_and_permanently(
    db: Any, bad: str, reason: str, mates: int
) -> None:
    """A row PostgreSQL cannot take raises PermanentError; rows batched with it are committed."""
    records = Store(db)
    good = [event() for _ in range(mates)]
    poisoned = event()
    results = await asyncio.gather(
        *(completed(records, e, f"fine {i}") for i, e in enumerate(good)),
        completed(records, poisoned, bad),
        return_exceptions=True,
    )
    *fine, failure = results
    assert fine == [None] * mates
    assert isinstance(failure, PermanentError), failure
    assert "PostgreSQL refused the row" in str(failure)
    assert reason in str(failure)
    for i, e in enumerate(good):
        assert (await row(db, e.recording_sid))["transcript"] == f"fine {i}"
    assert await records.progress(poisoned.recording_sid) is None


async def test_a_failure_while_the_database_answers_is_the_rows_own(database_url: str) -> None:
    """A row write that fails with PostgreSQL up raises its own error; its batch-mate commits."""
    pool = await asyncpg.create_pool(
        database_url, min_size=1, max_size=4, server_settings={"lock_timeout": "100"}
    )
    locker = await asyncpg.connect(database_url)
    try:
        records = Store(pool)
        locked, free = event(), event()
        await completed(records, locked, "first")
        async with locker.transaction():
            await locker.execute(
                "SELECT 1 FROM recordings WHERE recording_sid = $1 FOR UPDATE",
                locked.recording_sid,
            )
            results = await asyncio.gather(
                completed(records, locked, "second"),
                completed(records, free, "free"),
                return_exceptions=True,
            )
        assert isinstance(results[0], asyncpg.LockNotAvailableError), results[0]
        assert results[1] is None
        assert (await row(pool, free.recording_sid))["transcript"] == "free"
    finally:
        await locker.close()
        await pool.close()


async def test_an_unreachable_database_is_unavailable() -> None:
    """Every method raises Unavailable when nothing answers at the database's address."""
    pool = await asyncpg.create_pool(
        f"postgresql://nobody@127.0.0.1:{free_port()}/none", min_size=0, max_size=2
    )
    try:
        records, recording = Store(pool), event()
        with pytest.raises(Unavailable, match="PostgreSQL unavailable"):
            await records.progress(recording.recording_sid)
        batched = await asyncio.gather(
            completed(records, recording, "text"),
            completed(records, event(), "text"),
            return_exceptions=True,
        )
        assert [type(result) for result in batched] == [Unavailable, Unavailable]
        with pytest.raises(Unavailable, match="PostgreSQL unavailable"):
            await records.terminal(event("absent"), entry_id="1-0")
        with pytest.raises(Unavailable, match="PostgreSQL unavailable"):
            await records.failed(recording, entry_id="1-0", error="x")
    finally:
        await pool.close()


@pytest.mark.parametrize("stage", ["downloaded", "completed", "terminal", "failed"])
async def test_a_row_says_where_its_entry_came_from(db: Any, stage: str) -> None:
    """Whichever stage creates the row, it records the event's origin (webhook by default)."""
    records = Store(db)
    for origin in ("webhook", "reconcile"):
        e = dataclasses.replace(event("absent" if stage == "terminal" else "completed"),
                                origin=origin)  # fmt: skip
        if stage == "terminal":
            await records.terminal(e, entry_id="1-0")
        elif stage == "failed":
            await records.failed(e, entry_id="1-0", error="boom")
        else:
            await getattr(records, stage)(
                e, entry_id="1-0", attempts=1, path="/a.mp3", size=1,
                **({"transcript": None, "model": None} if stage == "completed" else {}),
            )  # fmt: skip
        assert (await row(db, e.recording_sid))["origin"] == origin


async def test_known_tells_which_recordings_have_rows_in_one_query(db: Any) -> None:
    """known() answers, for a batch of RecordingSids, those with a row."""
    written = event()
    await Store(db).terminal(written, entry_id="1-0")
    assert await Store(db).known([written.recording_sid, recording_sid()]) == {
        written.recording_sid
    }
