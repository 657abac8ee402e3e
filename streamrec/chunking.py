"""Cutting a long track into chunks, and stitching their transcripts into a conversation.

Pure functions over milliseconds: the audio itself is ``streamrec.audio``'s, the
API calls ``streamrec.conversation``'s. A chunk stands for the span
``[start_ms, end_ms)`` of one track; its upload begins up to ``overlap``
earlier (``audio_start_ms``, at a quiet moment) so the model hears the words
leading into it, and what the overlap repeats is dropped when stitching.
Chunks already transcribed (the checkpoints) are never planned again: planning
covers only the gaps they leave,
so a changed chunk length, or a chunk split because the API refused it as too
long, never costs a finished chunk a second call.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

SEARCH_MS = 30_000
"""The window around a chunk's even end in which to look for a quiet point to cut at."""
SPEECH_WORDS_PER_S = 4
"""A fast talker's rate: bounds how many words an overlap can repeat."""

Quiet = Callable[[int, int], int]
"""The quietest moment in ``[lo_ms, hi_ms]`` of the track being cut (returns ms)."""
Sounds = Callable[[int, int, int], bool]
"""Whether ``(track, lo_ms, hi_ms)`` holds sound (not only the line's noise)."""


def always(track: int, lo_ms: int, hi_ms: int) -> bool:
    """A ``Sounds`` for when the audio is not at hand: every overlap may hold words."""
    return True


@dataclass(frozen=True, slots=True)
class Span:
    """A chunk to transcribe: the span it stands for and where its upload begins."""

    track: int
    start_ms: int
    end_ms: int
    audio_start_ms: int


@dataclass(frozen=True, slots=True)
class Segment:
    """Words with their time in the recording (seconds); speaker as the model named it."""

    start_s: float
    end_s: float
    text: str
    speaker: str | None = None


@dataclass(frozen=True, slots=True)
class Piece:
    """A transcribed chunk: its span, its text, and its segments (None: no timestamps)."""

    span: Span
    text: str
    segments: tuple[Segment, ...] | None
    model: str
    language: str | None = None


@dataclass(frozen=True, slots=True)
class Conversation:
    """A recording's transcript: plain text (speaker-prefixed lines) and its segments."""

    text: str
    segments: list[dict[str, object]] = field(default_factory=list)
    timestamps: bool = False
    """True when segments are time-ordered words; False: one block per chunk and track."""


def plan(
    track: int,
    duration_ms: int,
    done: Iterable[tuple[int, int]],
    *,
    target_ms: int,
    overlap_ms: int,
    quiet: Quiet,
) -> list[Span]:
    """The chunks that cover what ``done`` (finished spans of this track) leaves of it.

    A gap is cut into as few chunks as ``target_ms`` allows, of even length,
    each cut at the quietest moment within SEARCH_MS (or a quarter chunk) around
    its even place, so a word is rarely split: a chunk is at most ``target_ms``
    plus that search window.
    """
    spans: list[Span] = []
    for gap_start, gap_end in _gaps(duration_ms, done):
        count = -(-(gap_end - gap_start) // target_ms)
        step = (gap_end - gap_start) / count
        reach = min(SEARCH_MS, int(step) // 4) // 2
        cut = gap_start
        for number in range(1, count):
            even = gap_start + round(number * step)
            end = quiet(even - reach, even + reach)
            spans.append(_span(track, cut, end, overlap_ms, quiet))
            cut = end
        spans.append(_span(track, cut, gap_end, overlap_ms, quiet))
    return spans


def halves(span: Span, *, overlap_ms: int, quiet: Quiet) -> tuple[Span, Span]:
    """``span`` cut in two at a quiet point near its middle (for an upload refused as too long)."""
    length = span.end_ms - span.start_ms
    middle = span.start_ms + length // 2
    cut = quiet(middle - length // 8, middle + length // 8)
    first = Span(span.track, span.start_ms, cut, span.audio_start_ms)
    return first, _span(span.track, cut, span.end_ms, overlap_ms, quiet)


def _span(track: int, start_ms: int, end_ms: int, overlap_ms: int, quiet: Quiet) -> Span:
    """A chunk whose upload begins at a quiet moment half to one overlap before it."""
    if start_ms == 0 or overlap_ms == 0:
        return Span(track, start_ms, end_ms, start_ms)
    earliest = max(0, start_ms - overlap_ms)
    return Span(track, start_ms, end_ms, quiet(earliest, max(earliest, start_ms - overlap_ms // 2)))


def _gaps(duration_ms: int, done: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    gaps, covered = [], 0
    for start, end in sorted(done):
        if start > covered:
            gaps.append((covered, start))
        covered = max(covered, end)
    if covered < duration_ms:
        gaps.append((covered, duration_ms))
    return gaps


def stitch(
    pieces: Sequence[Piece], speakers: dict[int, str | None], sounds: Sounds = always
) -> Conversation:
    """One conversation from the pieces of every track, overlaps dropped.

    ``speakers`` names each track (None: one unnamed voice). With timestamps in
    every piece the segments are time-ordered across tracks, and a segment
    belongs to the chunk its middle falls in. Otherwise each piece is one
    block, ordered by its start and then its track, and the words its overlap
    repeats of the chunk before are dropped when ``sounds`` says the overlap
    held sound (a silent overlap repeats nothing, so words that merely match
    stay).
    """
    by_track: dict[int, list[Piece]] = {}
    for piece in sorted(pieces, key=lambda p: (p.span.track, p.span.start_ms)):
        by_track.setdefault(piece.span.track, []).append(piece)
    timestamps = all(piece.segments is not None for piece in pieces)
    turns: list[tuple[float, int, Segment]] = []
    for track, track_pieces in by_track.items():
        name = speakers.get(track)
        for segment in _deduplicated(track_pieces, timestamps=timestamps, sounds=sounds):
            speaker = _speaker(name, segment.speaker)
            turns.append((segment.start_s, track, _named(segment, speaker)))
    turns.sort(key=lambda turn: (turn[0], turn[1]))
    segments = [turn[2] for turn in turns]
    return Conversation(_lines(segments), [_as_json(s) for s in segments], timestamps)


def _deduplicated(pieces: list[Piece], *, timestamps: bool, sounds: Sounds) -> list[Segment]:
    """The segments of one track's pieces, with what each overlap repeated left out."""
    kept: list[Segment] = []
    previous_words: list[str] = []
    for piece in pieces:
        span = piece.span
        if timestamps:
            boundary = span.start_ms / 1000
            kept.extend(s for s in piece.segments or () if (s.start_s + s.end_s) / 2 >= boundary)
            continue
        words, text = piece.text.split(), piece.text.strip()
        if span.audio_start_ms < span.start_ms and sounds(
            span.track, span.audio_start_ms, span.start_ms
        ):
            limit = (span.start_ms - span.audio_start_ms) * SPEECH_WORDS_PER_S // 1000 + 1
            repeated = _repeated(previous_words, words, limit)
            if repeated:
                words = words[repeated:]
                text = " ".join(words)
        previous_words = words or previous_words
        if text:
            kept.append(Segment(span.start_ms / 1000, span.end_ms / 1000, text))
    return kept


def _repeated(before: list[str], after: list[str], limit: int) -> int:
    """How many of ``after``'s first words repeat ``before``'s last (at most ``limit``)."""
    tail, head = [_norm(w) for w in before[-limit:]], [_norm(w) for w in after[:limit]]
    for count in range(min(len(tail), len(head)), 0, -1):
        if tail[-count:] == head[:count]:
            return count
    return 0


def _norm(word: str) -> str:
    return re.sub(r"\W+", "", word.casefold())


def _speaker(track_name: str | None, model_name: str | None) -> str | None:
    """A track's name wins (the channel says who spoke); else the model's diarized label."""
    if track_name is not None:
        return track_name
    return None if model_name is None else f"speaker {model_name}"


def _named(segment: Segment, speaker: str | None) -> Segment:
    return Segment(segment.start_s, segment.end_s, segment.text.strip(), speaker)


def _lines(segments: list[Segment]) -> str:
    """Plain text: one line per turn (consecutive segments of one speaker), speaker first."""
    lines: list[tuple[str | None, list[str]]] = []
    for segment in segments:
        if lines and lines[-1][0] == segment.speaker:
            lines[-1][1].append(segment.text)
        else:
            lines.append((segment.speaker, [segment.text]))
    return "\n".join(
        " ".join(texts) if speaker is None else f"{speaker}: {' '.join(texts)}"
        for speaker, texts in lines
    )


def _as_json(segment: Segment) -> dict[str, object]:
    return {
        "speaker": segment.speaker,
        "start_s": round(segment.start_s, 3),
        "end_s": round(segment.end_s, 3),
        "text": segment.text,
    }
