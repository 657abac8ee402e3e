"""Recording audio with PyAV: probe the header, decode to tracks, find quiet points, encode chunks.

PyAV's wheels carry FFmpeg's decoders and encoders, so the service needs no
system package and decodes in-process with no subprocess to manage. Work here
is synchronous and CPU-bound: callers run it in ``asyncio.to_thread``.

A recording is decoded once, at ``min(source rate, MAX_UPLOAD_RATE)``, into
16-bit tracks (one per channel, or one downmix) held in anonymous scratch files
and read back as memory maps, so an hour-long call costs disk, not memory.
Chunks cut from a track are encoded mono for upload: G.711 mu-law WAV at
telephone rates (1 byte a sample), FLAC above them (lossless).
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Literal, Self

import av
import numpy as np
import numpy.typing as npt
import structlog

from streamrec.retry import PermanentError

log = structlog.get_logger("streamrec.audio")

MAX_UPLOAD_RATE = 16_000
"""Whisper-family models resample to 16 kHz: a higher upload rate only adds bytes."""
MULAW_MAX_RATE = 8_000
"""Up to this rate chunks are mu-law WAV, the telephone codec; above it, FLAC."""
QUIET_WINDOW_S = 0.05
SOUND_OVER_QUIET = 10.0
"""How much louder (in amplitude: 20 dB) than the quietest window a window with sound is."""
SOUND_FLOOR = 32.0
"""The least amplitude (of 32767: about -60 dBFS) that can count as sound."""
ENCODE_FRAME_S = 1.0
"""Samples handed to the encoder at once: smaller frames cost markedly more CPU."""
FLAC_OVERHEAD = 1.05
"""FLAC's worst case: verbatim subframes (2 bytes a sample) plus frame headers."""
DAMAGE_SHARE = 10
"""Damaged frames are skipped (as FFmpeg does) while under one in this many; above, unreadable."""
_SCRATCH_BUFFER = 1 << 20
_LEAN_HEADERS = {"fflags": "+bitexact", "metadata_header_padding": "0"}
"""No encoder tag (WAV's LIST chunk) and no 8 KiB FLAC padding block: headers stay tiny."""

Int16Samples = npt.NDArray[np.int16]


class UnreadableAudio(PermanentError):
    """The file cannot be decoded as audio (names the reason)."""


@dataclass(frozen=True, slots=True)
class AudioInfo:
    """What a recording's header says about its audio stream."""

    duration_s: float | None
    """From stream or container metadata (no full decode); None when neither says."""
    channels: int
    sample_rate: int
    codec: str
    """FFmpeg's codec name, e.g. ``mp3``, ``pcm_s16le``."""


def probe(path: Path, data: bytes | None = None) -> AudioInfo:
    """The duration, channels, sample rate and codec of the first audio stream at ``path``.

    Reads the header and the first packets only: from ``data`` when given (the
    file's bytes, already in memory: no disk work, cheap enough for the event
    loop), else from the file. Raises UnreadableAudio when the file is not audio
    FFmpeg can read; OSError (FileNotFoundError ...) when the file itself cannot
    be opened.
    """
    with _open(path, data) as container:
        stream = _audio_stream(container, path)
        context = stream.codec_context
        return AudioInfo(
            duration_s=_duration(container, stream),
            channels=context.channels,
            sample_rate=context.sample_rate,
            codec=context.codec.canonical_name,
        )


def _open(path: Path, data: bytes | None = None) -> av.container.InputContainer:
    try:
        if data is not None:
            return av.open(io.BytesIO(data), "r", format=_format_of_head(data[:4]))
        return av.open(str(path), "r", format=_format_of(path))
    except av.FFmpegError as exc:
        if isinstance(exc, OSError) and data is None:
            raise  # the file is missing or unreadable: not a fault of its content
        raise UnreadableAudio(f"{path.name} is not audio FFmpeg can read: {exc}") from exc


_MAGIC = ((b"RIFF", "wav"), (b"fLaC", "flac"), (b"OggS", "ogg"), (b"ID3", "mp3"))


def _format_of(path: Path) -> str | None:
    """The container its first bytes name (None: let FFmpeg probe them all).

    Naming it spares FFmpeg trying every demuxer, most of the cost of a probe
    (about 110 against 290 µs of CPU for an mp3 here). An mp3 without an ID3
    tag starts with a frame sync, which other formats can share: it is probed.
    """
    with path.open("rb") as file:
        return _format_of_head(file.read(4))


def _format_of_head(head: bytes) -> str | None:
    return next((name for magic, name in _MAGIC if head.startswith(magic)), None)


def _audio_stream(container: av.container.InputContainer, path: Path) -> av.AudioStream:
    if not container.streams.audio:
        raise UnreadableAudio(f"{path.name} has no audio stream")
    stream = container.streams.audio[0]
    if stream.codec_context.channels < 1 or stream.codec_context.sample_rate < 1:
        raise UnreadableAudio(f"{path.name}: audio stream without channels or sample rate")
    return stream


def _duration(container: av.container.InputContainer, stream: av.AudioStream) -> float | None:
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / av.time_base
    return None


class Tracks:
    """Decoded PCM of one recording at the upload rate, one int16 track per channel.

    The tracks live in anonymous scratch files (``tempfile``, so ``TMPDIR``
    chooses the disk) read back as numpy memory maps, so a long call does not
    sit in memory. A context manager; ``close()`` releases the scratch (arrays
    already handed out stay readable until dropped).
    """

    def __init__(
        self,
        files: list[IO[bytes]],
        *,
        rate: int,
        frames: int,
        source_channels: int,
        source_rate: int,
    ) -> None:
        self.rate = rate
        """``min(source rate, MAX_UPLOAD_RATE)``."""
        self.frames = frames
        """Exact samples in each track, counted as decoded."""
        self.count = len(files)
        self.source_channels = source_channels
        self.source_rate = source_rate
        self._files = files
        self._maps: list[Int16Samples] | None = [_mapped(file, frames) for file in files]

    @property
    def duration_s(self) -> float:
        return self.frames / self.rate

    def samples(self, track: int) -> Int16Samples:
        """Track ``track`` (in ``range(count)``) as a read-only 1-D int16 array.

        Raises IndexError for a track out of range, ValueError once closed.
        """
        if self._maps is None:
            raise ValueError("tracks are closed")
        if not 0 <= track < self.count:
            raise IndexError(f"track {track} of {self.count}")
        return self._maps[track]

    def close(self) -> None:
        """Drop the maps and close the scratch files (their space is freed with the last view)."""
        self._maps = None
        for file in self._files:
            file.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def _mapped(file: IO[bytes], frames: int) -> Int16Samples:
    if frames == 0:
        return np.zeros(0, dtype=np.int16)  # a zero-length file cannot be mapped
    return np.memmap(file, dtype=np.int16, mode="r", shape=(frames,))


def decode(path: Path, *, split: bool) -> Tracks:
    """Decode the first audio stream at ``path`` in one pass into Tracks.

    ``split``: one track per source channel (a mono file gives one);
    otherwise one mono downmix. Resampled to ``min(source rate,
    MAX_UPLOAD_RATE)``. A packet the decoder rejects, or a frame in another
    format than the first (a damaged header), is skipped as FFmpeg does: a
    few milliseconds lost. Raises UnreadableAudio when the file is not audio,
    has no audio stream, yields no samples or has more than one damaged
    frame in ``DAMAGE_SHARE``; OSError when the file or the scratch space
    cannot be used.
    """
    with _open(path) as container:
        stream = _audio_stream(container, path)
        context = stream.codec_context
        rate = min(context.sample_rate, MAX_UPLOAD_RATE)
        layout = context.layout if split else av.AudioLayout("mono")
        with contextlib.ExitStack() as scratch:
            files = [
                scratch.enter_context(tempfile.TemporaryFile(buffering=_SCRATCH_BUFFER))
                for _ in range(layout.nb_channels)
            ]
            sink = _Sink(files, resampler=av.AudioResampler("s16p", layout, rate))
            frames = _decode_into(container, stream, sink, path)
            scratch.pop_all()
    return Tracks(
        files,
        rate=rate,
        frames=frames,
        source_channels=context.channels,
        source_rate=context.sample_rate,
    )


def _decode_into(
    container: av.container.InputContainer, stream: av.AudioStream, sink: _Sink, path: Path
) -> int:
    """Demux and decode every packet into ``sink``; the samples per track."""
    rejected = 0
    try:
        for packet in container.demux(stream):
            try:
                decoded = packet.decode()
            except av.InvalidDataError:
                rejected += 1
                continue
            for frame in decoded:
                sink.add(frame)
        frames = sink.finish()
    except av.InvalidDataError as exc:
        raise UnreadableAudio(f"{path.name} cannot be demuxed: {exc}") from exc
    damaged = rejected + sink.stray
    if damaged:
        log.warning("audio_damage_skipped", file=path.name, packets=rejected, frames=sink.stray)
    if frames == 0:
        raise UnreadableAudio(f"{path.name} holds no decodable audio")
    if damaged * DAMAGE_SHARE > sink.kept:
        raise UnreadableAudio(f"{path.name}: {damaged} of {damaged + sink.kept} frames damaged")
    return frames


class _Sink:
    """Decoded frames to track files, through a FIFO and the resampler a block at a time.

    A decoder gives a frame every few milliseconds of audio; resampling and
    writing each one costs more CPU than decoding it. The FIFO (in C) joins
    them into blocks of ``block_s``, so the per-call costs are paid per block.
    """

    def __init__(
        self, files: list[IO[bytes]], *, resampler: av.AudioResampler, block_s: float = 1.0
    ) -> None:
        self._files = files
        self._resampler = resampler
        self._fifo = av.AudioFifo()
        self._shape: tuple[str, int, int] | None = None
        self._block = 0
        self._block_s = block_s
        self.frames = 0
        """Samples written to each track."""
        self.kept = 0
        self.stray = 0
        """Decoded frames dropped for another format, rate or channel count than the first."""

    def add(self, frame: av.AudioFrame) -> None:
        shape = (frame.format.name, frame.sample_rate, frame.layout.nb_channels)
        if self._shape is None:
            self._shape = shape
            self._block = max(round(self._block_s * frame.sample_rate), 1)
        elif shape != self._shape:
            self.stray += 1  # a damaged frame header decodes as another format
            return
        self.kept += 1
        frame.pts = None  # a skipped packet leaves a gap in time: the samples are joined
        self._fifo.write(frame)
        if self._fifo.samples >= self._block:
            self._write(self._fifo.read(self._block))

    def finish(self) -> int:
        """Flush the FIFO and the resampler and the files; the samples per track."""
        self._write(self._fifo.read() if self._fifo.samples else None)
        self._write(None)
        for file in self._files:
            file.flush()
        return self.frames

    def _write(self, block: av.AudioFrame | None) -> None:
        for frame in self._resampler.resample(block):
            for plane, file in zip(frame.to_ndarray(), self._files, strict=True):
                file.write(plane.tobytes())
            self.frames += frame.samples


def quiet_point(samples: Int16Samples, lo: int, hi: int, rate: int) -> int:
    """The sample index in ``[lo, hi]`` at the centre of the quietest ~50 ms window.

    Quietest is the lowest mean square (windows clipped at the array's ends
    average what they hold); of equally quiet centres the one nearest ``hi``
    wins, which keeps chunks long. ``lo == hi`` returns ``lo``. Raises
    ValueError unless ``0 <= lo <= hi <= len(samples)``. Uses about 24 bytes
    per sample of ``hi - lo``: search near a boundary, not a whole track.
    """
    if not 0 <= lo <= hi <= len(samples):
        raise ValueError(f"need 0 <= lo <= hi <= {len(samples)}, got lo={lo} hi={hi}")
    if lo == hi:
        return lo
    width = max(round(QUIET_WINDOW_S * rate), 1)
    half = width // 2
    first, last = max(lo - half, 0), min(hi - half + width, len(samples))
    power = np.asarray(samples[first:last], dtype=np.int64) ** 2
    total = np.concatenate(([0], np.cumsum(power)))  # exact in int64: no float ties broken wrong
    centres = np.arange(lo, hi + 1)
    starts = np.clip(centres - half, first, last) - first
    ends = np.clip(centres - half + width, first, last) - first
    held = ends - starts
    mean = np.where(held > 0, (total[ends] - total[starts]) / np.maximum(held, 1), np.inf)
    return hi - int(np.argmin(mean[::-1]))


def has_sound(samples: Int16Samples, lo: int, hi: int, rate: int) -> bool:
    """True when some ~50 ms window of ``[lo, hi)`` is 20 dB over the quietest one.

    Telling speech from a line's noise without knowing the line: the loudest
    window against the quietest of the same stretch (a stretch that begins at
    a quiet point has one), and above -60 dBFS so that digital near-silence
    never counts. A stretch shorter than two windows has no sound.
    """
    width = max(round(QUIET_WINDOW_S * rate), 1)
    count = (hi - lo) // width
    if count < 2:
        return False
    windows = np.asarray(samples[lo : lo + count * width], dtype=np.float64).reshape(count, width)
    power = np.mean(windows**2, axis=1)
    loudest, quietest = float(power.max()), float(power.min())
    return loudest > SOUND_FLOOR**2 and loudest > SOUND_OVER_QUIET**2 * max(quietest, 1.0)


def encode(samples: Int16Samples, rate: int) -> tuple[bytes, str]:
    """One mono chunk for upload: ``(data, extension)``.

    At ``rate <= 8000``, WAV with G.711 mu-law (1 byte a sample, the codec
    telephone audio was carried in, nearly free to encode); above, FLAC
    (lossless 16-bit). Raises ValueError for a rate the encoder refuses.
    """
    container_format = "wav" if rate <= MULAW_MAX_RATE else "flac"
    codec: Literal["pcm_mulaw", "flac"] = "pcm_mulaw" if rate <= MULAW_MAX_RATE else "flac"
    buffer = io.BytesIO()
    step = max(round(ENCODE_FRAME_S * rate), 1)
    with av.open(
        buffer, "w", format=container_format, container_options=_LEAN_HEADERS
    ) as container:
        stream = container.add_stream(codec, rate=rate, layout="mono")
        container.start_encoding()  # the header, even for an empty chunk
        for start in range(0, len(samples), step):
            block = np.ascontiguousarray(samples[start : start + step], dtype=np.int16)
            frame = av.AudioFrame.from_ndarray(block.reshape(1, -1), format="s16", layout="mono")
            frame.rate = rate
            frame.pts = start
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buffer.getvalue(), container_format


def upload_bytes_per_second(rate: int) -> float:
    """Worst-case bytes per second of audio in ``encode``'s output at ``rate``.

    Headers (under 100 bytes per file) are extra: bound a chunk's length by
    the upload limit less a small margin.
    """
    if rate <= MULAW_MAX_RATE:
        return float(rate)
    return 2 * rate * FLAC_OVERHEAD
