"""The recording pipeline: the handler the consumer runs for each recording event.

Stages, each committed in PostgreSQL before the next starts: download the media,
transcribe it (when a transcriber is configured), mark the row completed. A
redelivered entry resumes at the first stage not yet committed, so a recording is
downloaded and transcribed once, not once per delivery.
"""

from __future__ import annotations

import structlog

from streamrec.consumer import Delivery
from streamrec.events import InvalidEvent, RecordingEvent
from streamrec.metrics import Metrics
from streamrec.retry import PermanentError
from streamrec.store import Store
from streamrec.transcribe import Transcriber
from streamrec.twilio import MediaClient

log = structlog.get_logger("streamrec.pipeline")


class RecordingPipeline:
    """Handler for recording events; also the consumer's dead-letter hook."""

    def __init__(
        self,
        *,
        store: Store,
        media: MediaClient,
        transcriber: Transcriber | None,
        metrics: Metrics | None = None,
    ) -> None:
        self._store = store
        self._media = media
        self._transcriber = transcriber
        self._metrics = metrics or Metrics()

    async def __call__(self, delivery: Delivery) -> None:
        """Take one recording as far as it goes; returns once the row is final."""
        event = _decode(delivery)
        if event.status != "completed":
            await self._store.terminal(event, entry_id=delivery.entry_id)
            log.info("recording_marked", status=event.status)
            return
        await self._run(event, delivery)

    async def _run(self, event: RecordingEvent, delivery: Delivery) -> None:
        stage = self._metrics.stage
        with stage("store"):
            progress = await self._store.begin(event, entry_id=delivery.entry_id)
        if progress.status == "completed":
            log.info("recording_already_done")
            return
        path = self._media.path_for(event)
        if progress.audio_path is None or not path.exists():
            with stage("download"):
                path, size = await self._media.download(event)
            with stage("store"):
                await self._store.downloaded(event.recording_sid, path=str(path), size=size)
        transcript = model = None
        if self._transcriber is not None and progress.transcript is None:
            with stage("transcribe"):
                transcript = await self._transcriber.transcribe(path)
            model = self._transcriber.model
        with stage("store"):
            await self._store.completed(event.recording_sid, transcript=transcript, model=model)
        log.info("recording_completed", attempt=delivery.deliveries)

    async def dead(self, delivery: Delivery, reason: str) -> None:
        """Mark the recording failed with ``reason`` as its entry goes to the dead letters."""
        try:
            event = RecordingEvent.from_fields(delivery.fields)
        except InvalidEvent:
            return  # nothing identifies a row; the dead-letter entry keeps the fields
        await self._store.failed(event, entry_id=delivery.entry_id, error=reason)


def _decode(delivery: Delivery) -> RecordingEvent:
    try:
        return RecordingEvent.from_fields(delivery.fields)
    except InvalidEvent as exc:
        raise PermanentError(f"invalid entry: {exc}") from exc
