"""PostgreSQL: the schema migrations and the recordings table.

Every write is keyed on RecordingSid, so running a stage twice leaves one row.
asyncpg's connection errors propagate; the consumer treats them as transient.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import structlog

from streamrec.events import RecordingEvent
from streamrec.retry import Unavailable, describe

log = structlog.get_logger("streamrec.store")

MIGRATION_LOCK = 0x5EC0_0001  # advisory lock id: one migrator at a time across replicas

# Errors that say the database is unreachable or going away, not that a query is
# wrong. asyncpg's interface errors ("connection is closed", "cannot switch to
# state ...; another operation is in progress") are what a query in flight gets
# when its server shuts down.
OUTAGE = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.TooManyConnectionsError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
)


@contextlib.contextmanager
def _outage_is_unavailable() -> Iterator[None]:
    try:
        yield
    except OUTAGE as exc:
        raise Unavailable(f"PostgreSQL unavailable: {describe(exc)}") from exc


@dataclass(frozen=True, slots=True)
class Progress:
    """How far a recording got: the stages already committed."""

    status: str
    audio_path: str | None
    audio_bytes: int | None
    transcript: str | None


def migrations() -> list[tuple[int, str, str]]:
    """The packaged migrations as (version, name, sql), in order."""
    found = []
    for entry in resources.files("streamrec.migrations").iterdir():
        match = re.fullmatch(r"(\d+)_(\w+)\.sql", entry.name)
        if match:
            found.append((int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    return sorted(found)


async def migrate(dsn: str) -> list[int]:
    """Create the database if missing, then apply pending migrations; returns those applied.

    Safe to run from many replicas at once: an advisory lock serialises them.
    """
    await _create_database_if_missing(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        applied = []
        for version, name, sql in migrations():
            if version in done:
                continue
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, name
                )
            applied.append(version)
            log.info("migration_applied", version=version, name=name)
        return applied
    finally:
        await conn.close()


async def _create_database_if_missing(dsn: str) -> None:
    try:
        conn = await asyncpg.connect(dsn)
    except asyncpg.InvalidCatalogNameError:
        pass
    else:
        await conn.close()
        return
    parts = urlsplit(dsn)
    name = parts.path.lstrip("/")
    admin = await asyncpg.connect(urlunsplit(parts._replace(path="/postgres")))
    try:
        await admin.execute(f'CREATE DATABASE "{name.replace(chr(34), "")}"')
        log.info("database_created", database=name)
    except asyncpg.DuplicateDatabaseError:
        pass
    finally:
        await admin.close()


class Store:
    """The recordings table, over an asyncpg pool owned by the caller.

    Every method raises ``Unavailable`` when the database cannot be reached.
    """

    def __init__(self, pool: Any) -> None:
        self._pool = pool

    async def begin(self, event: RecordingEvent, *, entry_id: str) -> Progress:
        """Create the row if missing, count the attempt, and return how far it got.

        A row that had failed (and is being replayed) is reopened with its
        committed stages kept.
        """
        with _outage_is_unavailable():
            row = await self._pool.fetchrow(
                """
            INSERT INTO recordings AS r
                (recording_sid, call_sid, account_sid, business_id, status, duration_s,
                 attempts, entry_id)
            VALUES ($1, $2, $3, $4, 'received', $5, 1, $6)
            ON CONFLICT (recording_sid) DO UPDATE SET
                attempts = r.attempts + 1,
                entry_id = EXCLUDED.entry_id,
                status = CASE
                    WHEN r.status <> 'failed' THEN r.status
                    WHEN r.audio_path IS NULL THEN 'received'
                    ELSE 'downloaded' END,
                error = CASE WHEN r.status = 'failed' THEN NULL ELSE r.error END,
                updated_at = now()
            RETURNING status, audio_path, audio_bytes, transcript
            """,
                event.recording_sid,
                event.call_sid,
                event.account_sid,
                event.business_id,
                event.duration_s,
                entry_id,
            )
        return Progress(row["status"], row["audio_path"], row["audio_bytes"], row["transcript"])

    async def downloaded(self, recording_sid: str, *, path: str, size: int) -> None:
        """Commit the download stage."""
        with _outage_is_unavailable():
            await self._pool.execute(
                """
            UPDATE recordings SET audio_path = $2, audio_bytes = $3, downloaded_at = now(),
                status = CASE WHEN status = 'received' THEN 'downloaded' ELSE status END,
                updated_at = now()
            WHERE recording_sid = $1
            """,
                recording_sid,
                path,
                size,
            )

    async def completed(
        self, recording_sid: str, *, transcript: str | None, model: str | None
    ) -> None:
        """Commit the transcript (if any) and mark the recording completed."""
        with _outage_is_unavailable():
            await self._pool.execute(
                """
            UPDATE recordings SET status = 'completed', error = NULL,
                transcript = COALESCE($2, transcript),
                transcript_model = COALESCE($3, transcript_model),
                transcribed_at = CASE WHEN $2::text IS NULL THEN transcribed_at ELSE now() END,
                completed_at = now(), updated_at = now()
            WHERE recording_sid = $1
            """,
                recording_sid,
                transcript,
                model,
            )

    async def terminal(self, event: RecordingEvent, *, entry_id: str) -> None:
        """Record a recording Twilio reported as absent or failed (nothing to download)."""
        with _outage_is_unavailable():
            await self._pool.execute(
                """
            INSERT INTO recordings AS r
                (recording_sid, call_sid, account_sid, business_id, status, duration_s,
                 attempts, entry_id, error, completed_at)
            VALUES ($1, $2, $3, $4, $5, $6, 1, $7, $8, now())
            ON CONFLICT (recording_sid) DO UPDATE SET
                attempts = r.attempts + 1, updated_at = now()
            """,
                event.recording_sid,
                event.call_sid,
                event.account_sid,
                event.business_id,
                event.status,
                event.duration_s,
                entry_id,
                f"Twilio reported the recording {event.status}",
            )

    async def failed(self, event: RecordingEvent, *, entry_id: str, error: str) -> None:
        """Mark a recording failed with its reason (its entry is being dead-lettered)."""
        with _outage_is_unavailable():
            await self._pool.execute(
                """
            INSERT INTO recordings AS r
                (recording_sid, call_sid, account_sid, business_id, status, duration_s,
                 attempts, entry_id, error)
            VALUES ($1, $2, $3, $4, 'failed', $5, 1, $6, $7)
            ON CONFLICT (recording_sid) DO UPDATE SET
                status = CASE WHEN r.status = 'completed' THEN r.status ELSE 'failed' END,
                error = CASE WHEN r.status = 'completed' THEN r.error ELSE EXCLUDED.error END,
                updated_at = now()
            """,
                event.recording_sid,
                event.call_sid,
                event.account_sid,
                event.business_id,
                event.duration_s,
                entry_id,
                error,
            )
