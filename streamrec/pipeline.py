"""The recording pipeline: the handler the consumer runs for each recording event.

Stages, each committed in PostgreSQL before the next starts: download the media,
transcribe it (when a transcriber is configured), mark the row completed. A
redelivered entry resumes at the first stage not yet committed, so a recording is
downloaded and transcribed once, not once per delivery.
"""

from __future__ import annotations

import structlog

from streamrec.delivery import Delivery
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
            log.info("recording_already_done")
            return
        path = self._media.path_for(event)
        if progress is not None and progress.audio_path is not None and path.exists():
            size = progress.audio_bytes or path.stat().st_size
        else:
            with stage("download"):
                path, size = await self._media.download(event)
            if self._transcriber is not None:
                # Worth a commit only when a slow stage follows that could fail.
                with stage("store"):
                    await record.downloaded(
                        event, entry_id=entry_id, attempts=attempts, path=str(path), size=size
                    )
        transcript = model = None
        if self._transcriber is not None:
            transcript = progress.transcript if progress is not None else None
            if transcript is None:
                with stage("transcribe"):
                    transcript = await self._transcriber.transcribe(path)
            model = self._transcriber.model
        with stage("store"):
            await record.completed(
                event, entry_id=entry_id, attempts=attempts, path=str(path), size=size,
                transcript=transcript, model=model,
            )  # fmt: skip
        log.info("recording_completed", attempt=delivery.deliveries)

    async def dead(self, delivery: Delivery, reason: str) -> None:
        """Mark the recording failed with ``reason`` as its entry goes to the dead letters."""
        try:
            event = RecordingEvent.from_fields(delivery.fields)
        except InvalidEvent:
            return  # nothing identifies a row; the dead-letter entry keeps the fields
        await self._store.failed(
            event, entry_id=delivery.entry_id, error=reason, attempts=delivery.deliveries
        )


def _decode(delivery: Delivery) -> RecordingEvent:
    try:
        return RecordingEvent.from_fields(delivery.fields)
    except InvalidEvent as exc:
        raise PermanentError(f"invalid entry: {exc}") from exc
