"""The recording pipeline: the handler the consumer runs for each recording event.

Stages, each committed in PostgreSQL before the next starts: download the media,
transcribe it (when a transcriber is configured and the business's mode is
``transcribe``: ``streamrec.conversation``, which commits each chunk as it is
transcribed), mark the row completed with what the file says of its audio
(duration, channels, sample rate) and, when asked to, delete the recording from
Twilio (checkpoint ``deleted_at``). A redelivered entry resumes at the first
stage not yet done: the media client skips a file already in place (it is
renamed there only when whole), committed chunks are not transcribed again, a
committed row is not written again, and a completed row not yet deleted is
deleted. An outage of our own database costs no second transcription: chunks
are committed one by one, and one whose commit failed is kept in this process
for the entry's next attempt. Before each side-effecting stage the delivery
must still be ours (``Delivery.ensure_owned`` raises ``Lost`` otherwise).

Twilio's copy is deleted only once ours is safe: the row is committed
``completed``, and the file at its ``audio_path`` has its ``audio_bytes`` and
has been fsynced with its directories. Recordings Twilio reported absent or
failed are never deleted (there is no audio of ours to stand for them).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog

from streamrec import audio
from streamrec.businesses import Profile
from streamrec.conversation import Transcript, Transcripts
from streamrec.delivery import Delivery
from streamrec.events import InvalidEvent, RecordingEvent
from streamrec.metrics import Metrics
from streamrec.retry import PermanentError, describe
from streamrec.store import AudioFacts, Progress, Store
from streamrec.twilio import Downloaded, MediaClient

log = structlog.get_logger("streamrec.pipeline")

Profiles = Callable[[str], Awaitable[Profile]]
"""A business's transcription profile, read for each recording."""


class RecordingPipeline:
    """Handler for recording events; also the consumer's dead-letter hook."""

    def __init__(
        self,
        *,
        store: Store,
        media: MediaClient,
        transcripts: Transcripts | None,
        profiles: Profiles | None = None,
        metrics: Metrics | None = None,
        delete_from_twilio: bool = False,
    ) -> None:
        self._store = store
        self._media = media
        self._transcripts = transcripts
        self._profiles = profiles
        self._delete_from_twilio = delete_from_twilio
        self._metrics = metrics or Metrics()

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
        with stage("store"):
            progress = await record.progress(event.recording_sid)
        if progress is not None and progress.status == "completed":
            await self._after_completed(event, delivery, progress)
            return
        delivery.ensure_owned()
        with stage("download"):
            media = await self._media.download(event)
        path, size = media.path, media.size
        plan = await self._transcription(event)
        transcribing = plan is not None
        facts = await _facts(media, required=transcribing)
        del media  # its bytes (up to 1 MiB) are not held through a transcription
        if transcribing and (progress is None or progress.audio_path is None):
            # Worth a commit only when a slow stage follows that could fail.
            delivery.ensure_owned()
            with stage("store"):
                await record.downloaded(
                    event, entry_id=delivery.entry_id, attempts=delivery.deliveries,
                    path=str(path), size=size, audio=facts,
                )  # fmt: skip
        outcome: dict[str, Any] = {"audio": facts}
        if plan is not None:
            outcome = _outcome(await self._transcript(event, delivery, path, *plan))
        mode = "transcribe" if transcribing else "download-only"
        delivery.ensure_owned()
        with stage("store"):
            await record.completed(
                event, entry_id=delivery.entry_id, attempts=delivery.deliveries,
                path=str(path), size=size, mode=mode, **outcome,
            )  # fmt: skip
        log.info("recording_completed", attempt=delivery.deliveries, mode=mode)
        if self._delete_from_twilio:
            await self._delete(event, delivery, path, size)

    async def _transcription(self, event: RecordingEvent) -> tuple[Transcripts, Profile] | None:
        """How to transcribe the recording, or None: no transcriber here, or download-only."""
        if self._transcripts is None:
            return None
        profile = self._transcripts.defaults
        if self._profiles is not None:
            with self._metrics.stage("store"):
                profile = await self._profiles(event.business_id)
        return (self._transcripts, profile) if profile.mode == "transcribe" else None

    async def _transcript(
        self,
        event: RecordingEvent,
        delivery: Delivery,
        path: Path,
        transcripts: Transcripts,
        profile: Profile,
    ) -> Transcript:
        delivery.ensure_owned()
        with self._metrics.stage("transcribe"):
            return await transcripts.transcribe(event, delivery, str(path), profile)

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


def _decode(delivery: Delivery) -> RecordingEvent:
    try:
        return RecordingEvent.from_fields(delivery.fields)
    except InvalidEvent as exc:
        raise PermanentError(f"invalid entry: {exc}") from exc


async def _facts(media: Downloaded, *, required: bool) -> AudioFacts | None:
    """What the file's header says of its audio; None (logged) for a file no decoder reads.

    Raises UnreadableAudio instead when ``required``: a transcription needs it decoded.
    A file the download held whole is probed in memory, on the loop (about 110 µs of
    CPU, where a thread hop costs several times that); one on disk, in a thread.
    """
    try:
        if media.body is not None:
            info = audio.probe(media.path, media.body)
        else:
            info = await asyncio.to_thread(audio.probe, media.path)
    except audio.UnreadableAudio as exc:
        if required:
            raise
        log.warning("audio_unreadable", error=describe(exc))
        return None
    return AudioFacts(info.duration_s, info.channels, info.sample_rate)


def _outcome(transcript: Transcript) -> dict[str, Any]:
    """The completed row's fields from ``transcript``: text, segments, the decoded audio's facts."""
    conversation = transcript.conversation
    return {
        "transcript": conversation.text,
        "model": transcript.model,
        "audio": AudioFacts(transcript.duration_s, transcript.channels, transcript.sample_rate),
        "segments": json.dumps(conversation.segments),
        "language": transcript.language,
    }
