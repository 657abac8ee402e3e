"""The recording pipeline: the handler the consumer runs for each recording event.

Stages, each committed in PostgreSQL before the next starts: download the media,
transcribe it (when a transcriber is configured), mark the row completed and,
when asked to, delete the recording from Twilio (checkpoint ``deleted_at``). A
redelivered entry resumes at the first stage not yet done: the media client
skips a file already in place (it is renamed there only when whole), a
committed row is not written again, and a completed row not yet deleted is
deleted. A transcript obtained but not yet committed (PostgreSQL failed the
write) is kept in this process for the entry's next attempt, so an outage of
our own database costs no second transcription. Before each side-effecting
stage the delivery must still be ours (``Delivery.ensure_owned`` raises
``Lost`` otherwise).

Twilio's copy is deleted only once ours is safe: the row is committed
``completed``, and the file at its ``audio_path`` has its ``audio_bytes`` and
has been fsynced with its directories. Recordings Twilio reported absent or
failed are never deleted (there is no audio of ours to stand for them).
"""

from __future__ import annotations

from pathlib import Path

import structlog

from streamrec.delivery import Delivery
from streamrec.events import InvalidEvent, RecordingEvent
from streamrec.metrics import Metrics
from streamrec.retry import PermanentError, describe
from streamrec.store import Progress, Store
from streamrec.transcribe import Transcriber
from streamrec.twilio import MediaClient

log = structlog.get_logger("streamrec.pipeline")

KEEP_UNCOMMITTED = 256
"""Transcripts kept for a later commit, oldest dropped first. More than a process
retries at once in practice (an outage holds its in-flight entries), and small
in memory (a transcript of OpenAI's largest upload is ~100 kB)."""


class RecordingPipeline:
    """Handler for recording events; also the consumer's dead-letter hook."""

    def __init__(
        self,
        *,
        store: Store,
        media: MediaClient,
        transcriber: Transcriber | None,
        metrics: Metrics | None = None,
        delete_from_twilio: bool = False,
    ) -> None:
        self._store = store
        self._media = media
        self._transcriber = transcriber
        self._delete_from_twilio = delete_from_twilio
        self._metrics = metrics or Metrics()
        self._uncommitted: dict[str, str] = {}
        """RecordingSid to a transcript not yet committed, oldest first."""

    async def __call__(self, delivery: Delivery) -> None:
        """Take one recording as far as it goes; returns once the row is final.

        Raises ``Lost`` when the entry stopped being ours before a stage.
        """
        event = _decode(delivery)
        if event.status != "completed":
            delivery.ensure_owned()
            await self._store.terminal(
                event, entry_id=delivery.entry_id, attempts=delivery.deliveries
            )
            log.info("recording_marked", status=event.status)
            return
        await self._run(event, delivery)

    async def _run(self, event: RecordingEvent, delivery: Delivery) -> None:
        stage, record = self._metrics.stage, self._store
        entry_id, attempts = delivery.entry_id, delivery.deliveries
        with stage("store"):
            progress = await record.progress(event.recording_sid)
        if progress is not None and progress.status == "completed":
            await self._after_completed(event, delivery, progress)
            return
        delivery.ensure_owned()
        with stage("download"):
            path, size = await self._media.download(event)
        if self._transcriber is not None and (progress is None or progress.audio_path is None):
            # Worth a commit only when a slow stage follows that could fail.
            delivery.ensure_owned()
            with stage("store"):
                await record.downloaded(
                    event, entry_id=entry_id, attempts=attempts, path=str(path), size=size
                )
        transcript = await self._transcript(event, delivery, path)
        model = self._transcriber.model if self._transcriber is not None else None
        delivery.ensure_owned()
        with stage("store"):
            await record.completed(
                event, entry_id=entry_id, attempts=attempts, path=str(path), size=size,
                transcript=transcript, model=model,
            )  # fmt: skip
        self._uncommitted.pop(event.recording_sid, None)
        log.info("recording_completed", attempt=delivery.deliveries)
        if self._delete_from_twilio:
            await self._delete(event, delivery, path, size)

    async def _after_completed(
        self, event: RecordingEvent, delivery: Delivery, progress: Progress
    ) -> None:
        """A redelivery of a completed recording: only its delete may be left to do."""
        path, size = progress.audio_path, progress.audio_bytes
        if self._delete_from_twilio and progress.deleted_at is None and path and size:
            await self._delete(event, delivery, Path(path), size)
        else:
            log.info("recording_already_done")

    async def _delete(
        self, event: RecordingEvent, delivery: Delivery, path: Path, size: int
    ) -> None:
        """The delete stage: Twilio's copy goes once ours is on disk and its row committed.

        A refusal that no retry can change (401/403, or our file not where the
        row says) is recorded on the row, which stays completed, and the entry
        is done: the recording is safe here and only Twilio's copy remains.
        Dead-lettering it would call a stored recording failed, and a replay
        would meet the same refusal. Transient failures raise and are retried.
        """
        sid = event.recording_sid
        try:
            await self._media.sync_stored(path, size)
            delivery.ensure_owned()
            with self._metrics.stage("delete"):
                deleted_now = await self._media.delete(event)
        except PermanentError as exc:
            log.error("recording_not_deleted", error=describe(exc))
            with self._metrics.stage("store"):
                await self._store.not_deleted(
                    sid, error=f"not deleted from Twilio: {describe(exc)}"
                )
            return
        # Written even if the entry was lost meanwhile: it is true, and it spares
        # the new owner a DELETE that could only be answered 404.
        with self._metrics.stage("store"):
            await self._store.deleted(sid)
        log.info("recording_deleted", already_gone=not deleted_now)

    async def _transcript(
        self, event: RecordingEvent, delivery: Delivery, path: Path
    ) -> str | None:
        """The transcript: kept from an attempt whose commit failed, or a new one."""
        if self._transcriber is None:
            return None
        sid = event.recording_sid
        if sid in self._uncommitted:
            return self._uncommitted[sid]
        delivery.ensure_owned()
        with self._metrics.stage("transcribe"):
            transcript = await self._transcriber.transcribe(path)
        self._uncommitted[sid] = transcript
        if len(self._uncommitted) > KEEP_UNCOMMITTED:
            del self._uncommitted[next(iter(self._uncommitted))]
        return transcript

    async def dead(self, delivery: Delivery, reason: str) -> None:
        """Mark the recording failed with ``reason`` as its entry goes to the dead letters.

        Raises ``Lost`` if the entry is no longer ours (its new owner decides).
        """
        try:
            event = RecordingEvent.from_fields(delivery.fields)
        except InvalidEvent:
            return  # nothing identifies a row; the dead-letter entry keeps the fields
        delivery.ensure_owned()
        await self._store.failed(
            event, entry_id=delivery.entry_id, error=reason, attempts=delivery.deliveries
        )
        self._uncommitted.pop(event.recording_sid, None)


def _decode(delivery: Delivery) -> RecordingEvent:
    try:
        return RecordingEvent.from_fields(delivery.fields)
    except InvalidEvent as exc:
        raise PermanentError(f"invalid entry: {exc}") from exc
