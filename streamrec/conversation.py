"""A recording's audio to a conversation: tracks, chunks, one API call each, checkpoints.

The stored file is decoded once into tracks at the upload rate (one per
channel when the business's channels are ``split``, one mixed track
otherwise). Each track is cut into chunks (``streamrec.chunking``) no longer
than ``STREAMREC_TRANSCRIBE_CHUNK_S`` and small enough for OpenAI's 25 MB
limit, each chunk is encoded mono (``streamrec.audio``) and transcribed, at most
``STREAMREC_TRANSCRIBE_CHUNK_CONCURRENCY`` at once within the entry's own work,
and each finished chunk is committed to ``transcript_chunks`` before anything
else depends on it. A redelivery plans only what the committed chunks leave, so
a consumer killed in minute 50 of a 60-minute call pays for minutes 1-49 once.
A chunk whose commit met a database outage is kept in this process for the
entry's next attempt. A chunk the API refuses as too long is cut in two and
both halves are sent.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from streamrec import audio
from streamrec.businesses import Profile
from streamrec.chunking import (
    SEARCH_MS,
    Conversation,
    Piece,
    Segment,
    Span,
    halves,
    plan,
    stitch,
)
from streamrec.delivery import Delivery
from streamrec.events import RecordingEvent
from streamrec.retry import PermanentError, Unavailable
from streamrec.store import Store
from streamrec.transcribe import UPLOAD_BUDGET_BYTES, Heard, TooLong, Transcriber

log = structlog.get_logger("streamrec.conversation")

MIN_CHUNK_MS = 10_000
"""The shortest chunk worth cutting in two when the API refuses one as too long."""
KEEP_UNCOMMITTED = 256
"""Recordings whose uncommitted chunks are kept for a later attempt, oldest dropped first."""

# Who is on which channel of a two-channel recording, by Twilio's RecordingSource.
# <Dial> and calls made with record=true put the parent call leg on the first
# channel and the child leg on the second; a dual-channel conference recording
# puts its first participant on the first channel and all other audio on the second.
SPEAKERS_BY_SOURCE: dict[str, tuple[str, str]] = {
    "DialVerb": ("caller", "callee"),
    "OutboundAPI": ("caller", "callee"),
    "Trunking": ("caller", "callee"),
    "Conference": ("first participant", "others"),
    "StartConferenceRecordingAPI": ("first participant", "others"),
}


@dataclass(frozen=True, slots=True)
class Transcript:
    """A recording's conversation with what the file itself says about the audio."""

    conversation: Conversation
    duration_s: float
    channels: int
    sample_rate: int
    model: str
    language: str | None
    chunks: int


@dataclass(frozen=True, slots=True)
class Track:
    """One decoded track as chunks see it: times in ms, the audio at the upload rate."""

    number: int
    """0: the mono or mixed track; n: the file's channel n."""
    samples: audio.Int16Samples
    rate: int

    @classmethod
    def of(cls, tracks: audio.Tracks, number: int) -> Track:
        return cls(number, tracks.samples(max(number - 1, 0)), tracks.rate)

    def _at(self, ms: int) -> int:
        return ms * self.rate // 1000

    def quiet(self, lo_ms: int, hi_ms: int) -> int:
        """The quietest moment in [lo_ms, hi_ms], in ms."""
        found = audio.quiet_point(self.samples, self._at(lo_ms), self._at(hi_ms), self.rate)
        return found * 1000 // self.rate

    def sounds(self, lo_ms: int, hi_ms: int) -> bool:
        """True when [lo_ms, hi_ms) holds sound, not only the line's noise."""
        return audio.has_sound(self.samples, self._at(lo_ms), self._at(hi_ms), self.rate)

    def encode(self, span: Span) -> tuple[bytes, str]:
        """The upload of ``span`` (from its ``audio_start_ms``): data and file extension."""
        return audio.encode(self.samples[self._at(span.audio_start_ms) : self._at(span.end_ms)],
                            self.rate)  # fmt: skip

    def plan(self, duration_ms: int, done: list[tuple[int, int]], *, target_ms: int,
             overlap_ms: int) -> list[Span]:  # fmt: skip
        """The chunks of this track that ``done`` leaves (``streamrec.chunking.plan``)."""
        return plan(self.number, duration_ms, done, target_ms=target_ms, overlap_ms=overlap_ms,
                    quiet=self.quiet)  # fmt: skip


@dataclass(frozen=True, slots=True)
class _Job:
    """One recording's transcription in progress: its tracks and how to send them."""

    event: RecordingEvent
    delivery: Delivery
    profile: Profile
    tracks: audio.Tracks

    def track(self, number: int) -> Track:
        return Track.of(self.tracks, number)

    def sounds(self, number: int, lo_ms: int, hi_ms: int) -> bool:
        return self.track(number).sounds(lo_ms, hi_ms)


class Transcripts:
    """Turns a stored recording into a conversation, one checkpointed chunk at a time."""

    def __init__(
        self,
        *,
        transcriber: Transcriber,
        store: Store,
        chunk_s: float,
        overlap_s: float,
        concurrency: int,
        defaults: Profile,
    ) -> None:
        self._transcriber = transcriber
        self.defaults = defaults
        """The profile of a business with no settings of its own."""
        self._store = store
        self._chunk_ms = int(chunk_s * 1000)
        self._overlap_ms = int(overlap_s * 1000)
        self._concurrency = concurrency
        self._kept: OrderedDict[str, dict[tuple[int, int], Piece]] = OrderedDict()
        """RecordingSid to its chunks transcribed but not committed (a database outage)."""

    async def transcribe(
        self, event: RecordingEvent, delivery: Delivery, path: str, profile: Profile
    ) -> Transcript:
        """The conversation in the audio at ``path``, transcribing only chunks not yet committed.

        Raises UnreadableAudio (permanent) for a file that does not decode,
        ``Lost`` when the entry stops being ours before a chunk, Unavailable when
        a checkpoint cannot be committed, and the transcriber's errors.
        """
        split = profile.channels == "split"
        tracks = await asyncio.to_thread(audio.decode, Path(path), split=split)
        try:
            job = _Job(event, delivery, profile, tracks)
            pieces = await self._pieces(job)
            conversation = await asyncio.to_thread(stitch, pieces, self._speakers(job), job.sounds)
        finally:
            await asyncio.to_thread(tracks.close)
        self._kept.pop(event.recording_sid, None)
        models = sorted({piece.model for piece in pieces}) or [profile.model]
        return Transcript(
            conversation, tracks.duration_s, tracks.source_channels, tracks.source_rate,
            ",".join(models), profile.language, len(pieces),
        )  # fmt: skip

    async def _pieces(self, job: _Job) -> list[Piece]:
        """Every chunk of every track: committed ones read back, the others transcribed."""
        numbers = _track_numbers(job.tracks.count)
        done = [p for p in await self._done(job.event.recording_sid) if p.span.track in numbers]
        todo = await asyncio.to_thread(self._plan, job, numbers, done)
        if todo:
            log.info("transcription_planned", chunks=len(todo), done=len(done),
                     tracks=len(numbers), duration_s=round(job.tracks.duration_s, 1))  # fmt: skip
        gate = asyncio.Semaphore(self._concurrency)
        outcomes = await asyncio.gather(
            *(self._chunk(job, span, gate) for span in todo), return_exceptions=True
        )
        pieces = list(done)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome  # the others finished and were committed: their spend is kept
            pieces.extend(outcome)
        return pieces

    async def _done(self, sid: str) -> list[Piece]:
        committed = {(p.span.track, p.span.start_ms): p for p in await self._store.chunks(sid)}
        kept = self._kept.get(sid, {})
        for key, piece in list(kept.items()):
            if key not in committed:
                await self._commit(sid, piece)  # Unavailable: still down, try next attempt
            committed[key] = piece
        return list(committed.values())

    def _plan(self, job: _Job, numbers: Sequence[int], done: list[Piece]) -> list[Span]:
        duration_ms = job.tracks.frames * 1000 // job.tracks.rate
        bound = UPLOAD_BUDGET_BYTES / audio.upload_bytes_per_second(job.tracks.rate)
        # A chunk may end up to SEARCH_MS past its target, its upload overlap_ms before it.
        target_ms = min(self._chunk_ms, int(bound * 1000) - self._overlap_ms - SEARCH_MS)
        todo: list[Span] = []
        for number in numbers:
            spans = [(p.span.start_ms, p.span.end_ms) for p in done if p.span.track == number]
            todo += job.track(number).plan(
                duration_ms, spans, target_ms=target_ms, overlap_ms=self._overlap_ms
            )
        return todo

    async def _chunk(self, job: _Job, span: Span, gate: asyncio.Semaphore) -> list[Piece]:
        """The pieces of ``span``: itself, or its halves' if the API found it too long."""
        async with gate:
            job.delivery.ensure_owned()
            heard = await self._send(job, span)
        if isinstance(heard, Heard):
            piece = _piece(span, heard, job.profile)
            await self._commit(job.event.recording_sid, piece)
            return [piece]
        if span.end_ms - span.start_ms < 2 * MIN_CHUNK_MS:
            raise PermanentError(f"OpenAI refuses even {span.end_ms - span.start_ms} ms: {heard}")
        log.warning("chunk_split", track=span.track, start_ms=span.start_ms, error=str(heard))
        quiet = job.track(span.track).quiet
        first, second = await asyncio.to_thread(
            halves, span, overlap_ms=self._overlap_ms, quiet=quiet
        )
        return await self._chunk(job, first, gate) + await self._chunk(job, second, gate)

    async def _send(self, job: _Job, span: Span) -> Heard | TooLong:
        data, extension = await asyncio.to_thread(job.track(span.track).encode, span)
        name = f"{job.event.recording_sid}.t{span.track}.{span.start_ms}.{extension}"
        try:
            return await self._transcriber.transcribe(
                name, data, model=job.profile.model, language=job.profile.language
            )
        except TooLong as exc:
            return exc

    async def _commit(self, sid: str, piece: Piece) -> None:
        """Commit ``piece``'s checkpoint, or keep it here while the database is down.

        Written even if the entry was lost meanwhile: the text is true, and it
        spares the new owner the call.
        """
        key = (piece.span.track, piece.span.start_ms)
        try:
            await self._store.chunk(sid, piece)
        except Unavailable:
            self._kept.setdefault(sid, {})[key] = piece
            self._kept.move_to_end(sid)
            while len(self._kept) > KEEP_UNCOMMITTED:
                self._kept.popitem(last=False)
            raise
        self._kept.get(sid, {}).pop(key, None)

    def _speakers(self, job: _Job) -> dict[int, str | None]:
        numbers = _track_numbers(job.tracks.count)
        if numbers == [0]:
            return {0: None}
        names = job.profile.speakers or SPEAKERS_BY_SOURCE.get(job.event.source)
        if names is None or len(numbers) != len(names):
            return {n: f"channel {n}" for n in numbers}
        return dict(zip(numbers, names, strict=True))


def _track_numbers(count: int) -> list[int]:
    """Track numbers as stored: 0 for a single (mono or mixed) track, else 1..count."""
    return [0] if count == 1 else list(range(1, count + 1))


def _piece(span: Span, heard: Heard, profile: Profile) -> Piece:
    """``heard`` as a piece of the recording: segment times moved to the recording's clock."""
    offset = span.audio_start_ms / 1000
    segments = None
    if heard.segments is not None:
        segments = tuple(
            Segment(s.start_s + offset, s.end_s + offset, s.text, s.speaker) for s in heard.segments
        )
    return Piece(span, heard.text, segments, profile.model, profile.language)
