"""Real test audio made with PyAV: words as tones, written as mp3 or wav, and heard back.

A word is a tone at its own frequency (``WORDS``), a burst of it is a spoken
word, and a conversation is bursts on one channel per speaker with silence
(very low noise, never digital zero) between. ``write_audio`` encodes such a
recording; ``hear`` decodes bytes (an upload, a chunk) and names the words on
their first channel by energy and FFT, so a test can tell what reached where.
"""

from __future__ import annotations

import io
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO, Literal

import av
import numpy as np
import numpy.typing as npt

Samples = npt.NDArray[np.float32]
Word = tuple[float, float, str]
"""A word heard: ``(start_s, end_s, word)``."""

_NAMES = (
    *("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"),
    *("india", "juliett", "kilo", "lima", "mike", "november", "oscar", "papa"),
)
WORDS: dict[str, float] = {word: 150.0 + 40.0 * i for i, word in enumerate(_NAMES)}
"""Each word's tone in Hz: 150 to 750, 40 apart, below 0.4 x 2000 Hz."""
SPEAKER_WORDS: tuple[tuple[str, ...], tuple[str, ...]] = (tuple(_NAMES[:8]), tuple(_NAMES[8:]))
"""Two disjoint vocabularies: the words of speaker 0 (channel 0) and of speaker 1."""

AMPLITUDE = 0.3
FADE_S = 0.01
NOISE = 0.0005
"""Silence is noise this loud (RMS, full scale 1), so no stretch is digital zero."""
BLOCK_S = 10.0
LOUD = 0.05
"""A sample louder than this (full scale 1) belongs to a burst."""
FRAME_S = 0.02
MIDDLE_S = 0.2
"""The length of a burst's middle whose spectrum names the word."""


@dataclass(frozen=True, slots=True)
class Burst:
    """One word: its tone from ``start_s`` for ``length_s`` seconds."""

    start_s: float
    length_s: float
    word: str

    @property
    def end_s(self) -> float:
        return self.start_s + self.length_s


@dataclass(frozen=True, slots=True)
class Heard:
    """What a listener finds in an audio file."""

    duration_s: float
    """Decoded samples over the rate: exact, not the header's claim."""
    channels: int
    rate: int
    codec: str
    words: list[Word]
    """``(start_s, end_s, word)`` of each burst on the first channel, in order."""


def write_audio(
    target: Path | BinaryIO,
    *,
    fmt: Literal["mp3", "wav"],
    rate: int,
    duration_s: float,
    channels: Sequence[Sequence[Burst]],
    seed: int = 0,
) -> None:
    """Write a recording of ``duration_s`` with each channel's bursts over low noise.

    One or two channels; mp3 (libmp3lame, rate >= 8000) or 16-bit wav (any
    rate) to a path or a seekable binary file. Made and encoded in 10 s
    blocks, so an hour costs little memory. The same arguments give the same
    bytes (no encoder tag is written).
    """
    if len(channels) not in (1, 2):
        raise ValueError("one or two channels")
    layout = "mono" if len(channels) == 1 else "stereo"
    total = round(duration_s * rate)
    block = round(BLOCK_S * rate)
    rng = np.random.default_rng(seed)
    placed = [_by_block(bursts, rate, block) for bursts in channels]
    file = str(target) if isinstance(target, Path) else target
    with av.open(file, "w", format=fmt, container_options=_BITEXACT) as container:
        stream = container.add_stream(_ENCODERS[fmt], rate=rate, layout=layout)
        if fmt == "mp3":
            stream.bit_rate = 32_000 * len(channels)
        for start in range(0, total, block):
            count = min(block, total - start)
            planes = [
                _render(placed_bursts.get(start // block, ()), start, count, rate, rng)
                for placed_bursts in placed
            ]
            pcm = (np.clip(np.stack(planes), -1, 1) * 32767).astype(np.int16)
            frame = av.AudioFrame.from_ndarray(pcm, format="s16p", layout=layout)
            frame.rate = rate
            frame.pts = start
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


_ENCODERS: dict[str, Literal["libmp3lame", "pcm_s16le"]] = {
    "mp3": "libmp3lame",
    "wav": "pcm_s16le",
}
_BITEXACT = {"fflags": "+bitexact"}


def audio_bytes(
    *,
    fmt: Literal["mp3", "wav"],
    rate: int,
    duration_s: float,
    channels: Sequence[Sequence[Burst]],
    seed: int = 0,
) -> bytes:
    """``write_audio``'s file as bytes."""
    buffer = io.BytesIO()
    write_audio(buffer, fmt=fmt, rate=rate, duration_s=duration_s, channels=channels, seed=seed)
    return buffer.getvalue()


def _by_block(bursts: Sequence[Burst], rate: int, block: int) -> dict[int, list[Burst]]:
    """Each block's index to the bursts that sound in it."""
    found: dict[int, list[Burst]] = {}
    for burst in bursts:
        first = round(burst.start_s * rate) // block
        last = max(round(burst.end_s * rate) - 1, 0) // block
        for index in range(first, last + 1):
            found.setdefault(index, []).append(burst)
    return found


def _render(
    bursts: Sequence[Burst], start: int, count: int, rate: int, rng: np.random.Generator
) -> Samples:
    """Samples ``start`` to ``start + count`` of one channel: noise plus the bursts."""
    out = (rng.standard_normal(count) * NOISE).astype(np.float32)
    for burst in bursts:
        lo = max(round(burst.start_s * rate), start)
        hi = min(round(burst.end_s * rate), start + count)
        if hi <= lo:
            continue
        t = np.arange(lo, hi, dtype=np.float64) / rate - burst.start_s
        fade = min(FADE_S, burst.length_s / 4)
        envelope = np.clip(np.minimum(t, burst.length_s - t) / fade, 0.0, 1.0)
        tone = AMPLITUDE * envelope * np.sin(2 * np.pi * WORDS[burst.word] * t)
        out[lo - start : hi - start] += tone.astype(np.float32)
    return out


def hear(data: bytes | IO[bytes]) -> Heard:
    """Decode an audio file (bytes or a binary file) and find the words on its first channel.

    Raises av.FFmpegError (av.InvalidDataError for most garbage) when the data is
    not audio PyAV can decode, or ValueError when it has no audio stream.
    """
    source = io.BytesIO(data) if isinstance(data, bytes) else data
    with av.open(source, "r") as container:
        if not container.streams.audio:
            raise ValueError("no audio stream")
        stream = container.streams.audio[0]
        codec = stream.codec_context.codec.canonical_name
        first, rate, channels = _first_channel(container, stream)
    return Heard(
        duration_s=len(first) / rate if rate else 0.0,
        channels=channels,
        rate=rate,
        codec=codec,
        words=_words(first, rate),
    )


def _first_channel(
    container: av.container.InputContainer, stream: av.AudioStream
) -> tuple[Samples, int, int]:
    """The first channel's samples (full scale 1), the rate and the channel count.

    Packets the decoder rejects are skipped, as FFmpeg's command line does;
    raises av.InvalidDataError when none decodes.
    """
    resampler: av.AudioResampler | None = None
    parts: list[Samples] = []
    rate, channels = stream.codec_context.sample_rate, stream.codec_context.channels
    rejected: av.InvalidDataError | None = None
    for packet in container.demux(stream):
        try:
            frames = packet.decode()
        except av.InvalidDataError as exc:
            rejected = exc
            continue
        for frame in frames:
            if resampler is None:
                rate, channels = frame.rate, frame.layout.nb_channels
                resampler = av.AudioResampler(format="fltp", layout=frame.layout, rate=rate)
            parts.extend(out.to_ndarray()[0] for out in resampler.resample(frame))
    if resampler is None:
        if rejected is not None:
            raise rejected
        return np.zeros(0, np.float32), rate, channels
    parts.extend(out.to_ndarray()[0] for out in resampler.resample(None))
    return np.concatenate(parts).astype(np.float32), rate, channels


def _words(samples: Samples, rate: int) -> list[Word]:
    """Each burst's true span (to the sample) and the word its tone is nearest."""
    return [
        (lo / rate, hi / rate, _word(samples[lo:hi], rate)) for lo, hi in _bursts(samples, rate)
    ]


def _bursts(samples: Samples, rate: int) -> Iterator[tuple[int, int]]:
    """Sample spans of loud stretches: runs of ~20 ms frames holding a loud sample."""
    loud = np.abs(samples) > LOUD
    size = max(round(FRAME_S * rate), 1)
    frames = -(-len(loud) // size)
    padded = np.zeros(frames * size, dtype=bool)
    padded[: len(loud)] = loud
    active = padded.reshape(frames, size).any(axis=1)
    edges = np.flatnonzero(np.diff(np.concatenate(([0], active.view(np.int8), [0]))))
    for first, after in zip(edges[::2], edges[1::2], strict=True):
        inside = np.flatnonzero(loud[first * size : after * size])
        # The first and last loud samples: a tone crosses LOUD within a
        # millisecond or two of its fade's start, so the span is the burst's.
        yield first * size + int(inside[0]), first * size + int(inside[-1]) + 1


def _word(burst: Samples, rate: int) -> str:
    """The word whose tone is nearest the spectral peak of the burst's middle."""
    keep = min(len(burst), round(MIDDLE_S * rate))
    middle = burst[(len(burst) - keep) // 2 :][:keep].astype(np.float64)
    size = 1 << max(int(np.ceil(np.log2(max(8 * keep, 4 * rate)))), 1)
    spectrum = np.abs(np.fft.rfft(middle * np.hanning(keep), n=size))
    peak = float(np.argmax(spectrum)) * rate / size
    return min(WORDS, key=lambda word: abs(WORDS[word] - peak))


def conversation(
    duration_s: float,
    *,
    seed: int = 0,
    words_per_turn: tuple[int, int] = (2, 5),
    word_s: tuple[float, float] = (0.3, 0.6),
    gap_s: tuple[float, float] = (0.1, 0.3),
    pause_s: tuple[float, float] = (0.8, 2.0),
) -> tuple[list[Burst], list[Burst]]:
    """Two speakers taking turns until ``duration_s``: (channel 0 bursts, channel 1 bursts).

    Speaker 0 opens; each turn is a few words of that speaker's vocabulary
    (``SPEAKER_WORDS``) with short gaps, and turns are apart by a longer pause,
    so quiet points exist all along. The same arguments give the same bursts.
    """
    rng = random.Random(seed)
    tracks: tuple[list[Burst], list[Burst]] = ([], [])
    at, speaker = rng.uniform(*pause_s), 0
    while True:
        turn: list[Burst] = []
        for _ in range(rng.randint(*words_per_turn)):
            length = rng.uniform(*word_s)
            turn.append(Burst(round(at, 3), round(length, 3), rng.choice(SPEAKER_WORDS[speaker])))
            at += length + rng.uniform(*gap_s)
        if turn[-1].end_s + 0.1 > duration_s:
            return tracks
        tracks[speaker].extend(turn)
        at += rng.uniform(*pause_s)
        speaker = 1 - speaker


def spoken(bursts: Sequence[Burst]) -> list[str]:
    """The words of ``bursts`` in time order."""
    return [burst.word for burst in sorted(bursts, key=lambda burst: burst.start_s)]
