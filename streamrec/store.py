"""PostgreSQL: the recordings table (the schema and its migrations: ``streamrec.schema``).

Every write is keyed on RecordingSid, so running a stage twice leaves one row.
A failed statement is sorted by cause, not by exception class: bad data (a value
asyncpg cannot encode, SQLSTATE class 22 or 23) raises ``PermanentError``; any
other failure is followed by a probe of the database, and raises ``Unavailable``
when the probe fails too (an outage, not the entry's fault) or the error itself
(transient) when the database answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import structlog

from streamrec.batch import Batcher
from streamrec.chunking import Piece, Segment, Span
from streamrec.events import RecordingEvent
from streamrec.retry import PermanentError, Unavailable, describe

log = structlog.get_logger("streamrec.store")

PROBE_TIMEOUT_S = 5.0
"""How long the database has to answer ``SELECT 1`` after a failed statement."""


def _bad_data(error: BaseException) -> bool:
    """True if ``error`` says a value cannot be stored: no later attempt can fix it.

    asyncpg reports a value it cannot encode (a lone surrogate in a str) as
    DataError with SQLSTATE 22000, so the class test covers it as well as the
    server's own data exceptions (22) and constraint violations (23).
    """
    if not isinstance(error, asyncpg.PostgresError):
        return False
    return str(getattr(error, "sqlstate", None) or "")[:2] in {"22", "23"}


@dataclass(frozen=True, slots=True)
class Progress:
    """How far a recording got: the stages already committed."""

    status: str
    audio_path: str | None
    audio_bytes: int | None
    transcript: str | None
    deleted_at: datetime | None = None
    """When the delete stage found the recording gone from Twilio (None: not yet)."""


def _piece(row: Any) -> Piece:
    """A transcript_chunks row as the piece it checkpoints."""
    span = Span(row["track"], row["start_ms"], row["end_ms"], row["audio_start_ms"])
    segments = None
    if row["segments"] is not None:
        segments = tuple(Segment(*item) for item in json.loads(row["segments"]))
    return Piece(span, row["text"], segments, row["model"], row["language"])


class PlainConnection(asyncpg.Connection):  # type: ignore[misc]
    """A pool connection that is not reset on release.

    streamrec's statements leave no session state behind (no SET, LISTEN,
    cursors or advisory locks outside ``migrate``), and the default reset is a
    second round trip for every query.
    """

    def get_reset_query(self) -> str:
        return ""


@dataclass(frozen=True, slots=True)
class Stage:
    """One row write: the recording and the stages it has reached."""

    event: RecordingEvent
    entry_id: str
    attempts: int
    status: str
    path: str
    size: int
    transcript: str | None = None
    model: str | None = None
    audio: AudioFacts | None = None
    segments: str | None = None
    """The conversation's segments as JSON text (stored as jsonb)."""
    language: str | None = None
    mode: str | None = None


@dataclass(frozen=True, slots=True)
class AudioFacts:
    """What the stored file itself says: its length, channels and sample rate."""

    duration_s: float | None
    channels: int
    sample_rate: int


# One statement for a whole batch of stage writes (one round trip, one commit).
WRITE_STAGES = """
INSERT INTO recordings AS r
    (recording_sid, call_sid, account_sid, business_id, status, duration_s,
     attempts, entry_id, audio_path, audio_bytes, downloaded_at,
     transcript, transcript_model, transcribed_at, completed_at, origin,
     audio_duration_s, audio_channels, audio_sample_rate, segments, transcript_language,
     transcript_mode)
SELECT sid, call, account, business, status, duration, attempts, entry, path, size, now(),
       transcript, model,
       CASE WHEN transcript IS NULL THEN NULL ELSE now() END,
       CASE WHEN status = 'completed' THEN now() END,
       origin, seconds, channels, rate, segments::jsonb, language, mode
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::int[],
            $7::int[], $8::text[], $9::text[], $10::bigint[], $11::text[], $12::text[],
            $13::text[], $14::float8[], $15::int[], $16::int[], $17::text[], $18::text[],
            $19::text[])
     AS t(sid, call, account, business, status, duration, attempts, entry, path, size,
          transcript, model, origin, seconds, channels, rate, segments, language, mode)
ON CONFLICT (recording_sid) DO UPDATE SET
    status = CASE WHEN r.status = 'completed' THEN r.status ELSE EXCLUDED.status END,
    attempts = GREATEST(r.attempts, EXCLUDED.attempts),
    entry_id = EXCLUDED.entry_id,
    audio_path = EXCLUDED.audio_path,
    audio_bytes = EXCLUDED.audio_bytes,
    downloaded_at = COALESCE(r.downloaded_at, EXCLUDED.downloaded_at),
    transcript = COALESCE(EXCLUDED.transcript, r.transcript),
    transcript_model = COALESCE(EXCLUDED.transcript_model, r.transcript_model),
    transcribed_at = COALESCE(EXCLUDED.transcribed_at, r.transcribed_at),
    completed_at = COALESCE(r.completed_at, EXCLUDED.completed_at),
    audio_duration_s = COALESCE(EXCLUDED.audio_duration_s, r.audio_duration_s),
    audio_channels = COALESCE(EXCLUDED.audio_channels, r.audio_channels),
    audio_sample_rate = COALESCE(EXCLUDED.audio_sample_rate, r.audio_sample_rate),
    segments = COALESCE(EXCLUDED.segments, r.segments),
    transcript_language = CASE WHEN EXCLUDED.transcript IS NULL THEN r.transcript_language
                               ELSE EXCLUDED.transcript_language END,
    transcript_mode = COALESCE(EXCLUDED.transcript_mode, r.transcript_mode),
    error = NULL,
    updated_at = now()
"""


def _columns(stages: Iterable[Stage]) -> list[list[Any]]:
    """The nineteen array arguments of WRITE_STAGES for ``stages`` (one row each)."""
    columns: list[list[Any]] = [[] for _ in range(19)]
    for st in stages:
        e, a = st.event, st.audio
        values = (e.recording_sid, e.call_sid, e.account_sid, e.business_id, st.status,
                  e.duration_s, st.attempts, st.entry_id, st.path, st.size, st.transcript,
                  st.model, e.origin, a and a.duration_s, a and a.channels,
                  a and a.sample_rate, st.segments, st.language, st.mode)  # fmt: skip
        for column, value in zip(columns, values, strict=True):
            column.append(value)
    return columns


class Store:
    """The recordings table, over an asyncpg pool owned by the caller.

    A recording costs one read and one write when transcription is off (one
    more write, the download, when it is on; one more, the delete checkpoint,
    when recordings are deleted from Twilio). Reads and writes of recordings
    in flight together share round trips and commits; a batched write that
    fails while the database answers is retried row by row, so a bad row fails
    alone. Every method raises ``Unavailable`` when the database cannot be
    reached, ``PermanentError`` for a row it refuses as bad data, and the
    driver's error for any other failure.
    """

    def __init__(self, pool: Any) -> None:
        self._pool = pool
        self._reads: Batcher[str, Progress | None] = Batcher(self._read)
        self._writes: Batcher[Stage, None] = Batcher(self._write)
        self._deletes: Batcher[str, None] = Batcher(self._mark_deleted)

    @contextlib.asynccontextmanager
    async def _sorted_errors(self) -> AsyncIterator[None]:
        """Raise a failure of the statements within as PermanentError, Unavailable or itself."""
        try:
            yield
        except Exception as exc:
            if _bad_data(exc):
                raise PermanentError(f"PostgreSQL refused the row: {describe(exc)}") from exc
            if not await self._answers():
                raise Unavailable(f"PostgreSQL unavailable: {describe(exc)}") from exc
            raise

    async def _answers(self) -> bool:
        """True if the database runs ``SELECT 1`` within PROBE_TIMEOUT_S."""
        try:
            async with asyncio.timeout(PROBE_TIMEOUT_S):
                await self._pool.fetchval("SELECT 1")
        except Exception:  # whatever stops SELECT 1 stops every statement
            return False
        return True

    async def progress(self, recording_sid: str) -> Progress | None:
        """How far a recording got, or None if it has no row yet."""
        return await self._reads.submit(recording_sid)

    async def _read(self, sids: list[str]) -> list[Progress | None]:
        # One error for the whole batch: RecordingSids are validated, so a read
        # fails for the database's sake, never for one sid's.
        async with self._sorted_errors():
            rows = await self._pool.fetch(
                "SELECT recording_sid, status, audio_path, audio_bytes, transcript, deleted_at"
                " FROM recordings WHERE recording_sid = ANY($1::text[])",
                sids,
            )
        found = {
            r["recording_sid"]: Progress(r["status"], r["audio_path"], r["audio_bytes"],
                                         r["transcript"], r["deleted_at"])
            for r in rows
        }  # fmt: skip
        return [found.get(sid) for sid in sids]

    async def known(self, sids: list[str]) -> set[str]:
        """Which of ``sids`` have a row, in one query (the reconciler asks once per page)."""
        async with self._sorted_errors():
            rows = await self._pool.fetch(
                "SELECT recording_sid FROM recordings WHERE recording_sid = ANY($1::text[])", sids
            )
        return {r["recording_sid"] for r in rows}

    async def downloaded(
        self,
        event: RecordingEvent,
        *,
        entry_id: str,
        attempts: int,
        path: str,
        size: int,
        audio: AudioFacts | None = None,
    ) -> None:
        """Commit the download stage (creating the row, or reopening a failed one)."""
        stage = Stage(event, entry_id, attempts, "downloaded", path, size, audio=audio)
        await self._writes.submit(stage)

    async def completed(
        self,
        event: RecordingEvent,
        *,
        entry_id: str,
        attempts: int,
        path: str,
        size: int,
        transcript: str | None = None,
        model: str | None = None,
        audio: AudioFacts | None = None,
        segments: str | None = None,
        language: str | None = None,
        mode: str | None = None,
    ) -> None:
        """Commit the recording as completed, with its audio and transcript (if any).

        ``segments`` is the conversation as JSON text; ``mode`` says whether it
        was transcribed or kept download-only.
        """
        stage = Stage(event, entry_id, attempts, "completed", path, size, transcript, model,
                      audio, segments, language, mode)  # fmt: skip
        await self._writes.submit(stage)

    async def chunks(self, recording_sid: str) -> list[Piece]:
        """The transcribed chunks committed for a recording (its checkpoints)."""
        async with self._sorted_errors():
            rows = await self._pool.fetch(
                "SELECT track, start_ms, end_ms, audio_start_ms, text, segments, model, language"
                " FROM transcript_chunks WHERE recording_sid = $1 ORDER BY track, start_ms",
                recording_sid,
            )
        return [_piece(row) for row in rows]

    async def chunk(self, recording_sid: str, piece: Piece) -> None:
        """Commit one transcribed chunk; a chunk already committed is kept as it was."""
        span = piece.span
        segments = (
            None
            if piece.segments is None
            else json.dumps([[s.start_s, s.end_s, s.text, s.speaker] for s in piece.segments])
        )
        async with self._sorted_errors():
            await self._pool.execute(
                "INSERT INTO transcript_chunks (recording_sid, track, start_ms, end_ms,"
                " audio_start_ms, text, segments, model, language)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, $8, $9) ON CONFLICT DO NOTHING",
                recording_sid, span.track, span.start_ms, span.end_ms, span.audio_start_ms,
                piece.text, segments, piece.model, piece.language,
            )  # fmt: skip

    async def _write(self, stages: list[Stage]) -> list[Exception | None]:
        # One statement may not touch a row twice: the last write of a recording wins.
        latest = {stage.event.recording_sid: stage for stage in stages}
        try:
            async with self._sorted_errors():
                await self._pool.execute(WRITE_STAGES, *_columns(latest.values()))
        except Unavailable:
            raise
        except Exception:
            if len(latest) == 1:
                raise
            # The database answers, so a row is to blame: find it by writing each alone.
            outcome = await self._write_each(list(latest.values()))
        else:
            outcome = {}
        return [outcome.get(stage.event.recording_sid) for stage in stages]

    async def _write_each(self, stages: list[Stage]) -> dict[str, Exception]:
        """Write ``stages`` one statement each; returns the errors by RecordingSid."""
        errors: dict[str, Exception] = {}
        for number, stage in enumerate(stages):
            try:
                async with self._sorted_errors():
                    await self._pool.execute(WRITE_STAGES, *_columns([stage]))
            except Unavailable as exc:  # the rest would only wait for the probe to fail
                errors.update((s.event.recording_sid, exc) for s in stages[number:])
                break
            except Exception as exc:
                errors[stage.event.recording_sid] = exc
        return errors

    async def terminal(self, event: RecordingEvent, *, entry_id: str, attempts: int = 1) -> None:
        """Record a recording Twilio reported as absent or failed (nothing to download)."""
        async with self._sorted_errors():
            await self._pool.execute(
                """
                INSERT INTO recordings AS r
                    (recording_sid, call_sid, account_sid, business_id, status, duration_s,
                     attempts, entry_id, error, completed_at, origin)
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, now(), $10)
                ON CONFLICT (recording_sid) DO UPDATE SET
                    attempts = GREATEST(r.attempts, EXCLUDED.attempts), updated_at = now()
                """,
                event.recording_sid,
                event.call_sid,
                event.account_sid,
                event.business_id,
                event.status,
                event.duration_s,
                attempts,
                entry_id,
                f"Twilio reported the recording {event.status}",
                event.origin,
            )

    async def failed(
        self, event: RecordingEvent, *, entry_id: str, error: str, attempts: int = 1
    ) -> None:
        """Mark a recording failed with its reason (its entry is being dead-lettered)."""
        async with self._sorted_errors():
            await self._pool.execute(
                """
                INSERT INTO recordings AS r
                    (recording_sid, call_sid, account_sid, business_id, status, duration_s,
                     attempts, entry_id, error, origin)
                VALUES ($1, $2, $3, $4, 'failed', $5, $6, $7, $8, $9)
                ON CONFLICT (recording_sid) DO UPDATE SET
                    status = CASE WHEN r.status = 'completed' THEN r.status ELSE 'failed' END,
                    error = CASE WHEN r.status = 'completed' THEN r.error ELSE EXCLUDED.error END,
                    attempts = GREATEST(r.attempts, EXCLUDED.attempts),
                    updated_at = now()
                """,
                event.recording_sid,
                event.call_sid,
                event.account_sid,
                event.business_id,
                event.duration_s,
                attempts,
                entry_id,
                error,
                event.origin,
            )

    async def deleted(self, recording_sid: str) -> None:
        """Commit the delete stage: the recording is gone from Twilio (``deleted_at``).

        Clears the error of an earlier delete that was refused: on a completed
        row it can only be that one.
        """
        await self._deletes.submit(recording_sid)

    async def _mark_deleted(self, sids: list[str]) -> list[None]:
        # One error for the whole batch, as in _read: the statement takes no data to refuse.
        async with self._sorted_errors():
            await self._pool.execute(
                "UPDATE recordings SET deleted_at = COALESCE(deleted_at, now()), error = NULL,"
                " updated_at = now() WHERE recording_sid = ANY($1::text[])",
                sids,
            )
        return [None] * len(sids)

    async def not_deleted(self, recording_sid: str, *, error: str) -> None:
        """Record why a completed recording stays on Twilio (its delete was refused for good)."""
        async with self._sorted_errors():
            await self._pool.execute(
                "UPDATE recordings SET error = $2, updated_at = now()"
                " WHERE recording_sid = $1 AND deleted_at IS NULL",
                recording_sid,
                error,
            )
