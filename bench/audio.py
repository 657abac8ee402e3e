"""Audio handling's cost: CPU seconds per hour of audio, and the wall time it adds.

    .venv/bin/python bench/audio.py             # one hour of each source
    .venv/bin/python bench/audio.py --minutes 20

Part one runs the production steps one after another in this process and
counts their CPU time (``time.process_time``): decode the stored file into
tracks, plan the chunks (quiet points), and encode every chunk for upload.
The target is under 2 CPU seconds per hour of mono call audio; a two-channel
file is two hours of tracks. Part two transcribes a two-channel call end to end
(``Transcripts`` with checkpoints in a PostgreSQL of its own, the OpenAI
stand-in answering from what it hears) and puts the wall time of that beside
the stand-in's own busy time.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import asyncpg
import openai

from streamrec import audio, schema
from streamrec.businesses import Profile
from streamrec.conversation import Track, Transcripts
from streamrec.delivery import Delivery
from streamrec.devservers import LocalPostgres
from streamrec.events import RecordingEvent
from streamrec.store import Store
from streamrec.transcribe import Transcriber
from tests.audio import conversation, write_audio
from tests.standins import ACCOUNT_SID, OPENAI_KEY, OpenAIStandIn, call_sid, recording_sid

CHUNK_MS = 1_200_000
OVERLAP_MS = 1_000
TARGET_CPU_S_PER_HOUR = 2.0
SOURCES: list[tuple[str, Literal["mp3", "wav"], int, int]] = [
    ("mono mp3, 8 kHz", "mp3", 8000, 1),
    ("two-channel mp3, 8 kHz", "mp3", 8000, 2),
    ("two-channel wav, 8 kHz", "wav", 8000, 2),
    ("mono wav, 16 kHz (FLAC uploads)", "wav", 16000, 1),
]


def cpu(step: Callable[[], Any]) -> tuple[Any, float]:
    """``step()``'s result and the CPU seconds it took."""
    begun = time.process_time()
    result = step()
    return result, time.process_time() - begun


def handle(path: Path, hours: float) -> None:
    """Decode, plan and encode ``path`` as a transcription does; print CPU per hour of audio."""
    tracks, decode_s = cpu(lambda: audio.decode(path, split=True))
    with tracks:
        duration_ms = tracks.frames * 1000 // tracks.rate
        numbers = [0] if tracks.count == 1 else list(range(1, tracks.count + 1))
        each = [Track.of(tracks, n) for n in numbers]
        plans, plan_s = cpu(lambda: [t.plan(duration_ms, [], target_ms=CHUNK_MS,
                                            overlap_ms=OVERLAP_MS) for t in each])  # fmt: skip
        uploads, encode_s = cpu(
            lambda: [t.encode(span) for t, spans in zip(each, plans, strict=True) for span in spans]
        )
    total = decode_s + plan_s + encode_s
    per_track_hour = total / hours / len(numbers)
    size = sum(len(data) for data, _ in uploads) / 1e6
    print(
        f"  decode {decode_s / hours:5.2f}  plan {plan_s / hours:5.2f}"
        f"  encode {encode_s / hours:5.2f}"
        f"  = {total / hours:5.2f} CPU s per hour of recording;"
        f" {per_track_hour:.2f} per hour of track"
        f" ({per_track_hour / TARGET_CPU_S_PER_HOUR:.0%} of the 2 s target);"
        f" {sum(map(len, plans))} chunks, {size:.1f} MB uploaded"
    )


def covered(spans: list[tuple[float, float]]) -> float:
    """Seconds within at least one of ``spans`` (overlapping answers count once)."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(spans):
        total += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    return total


async def end_to_end(path: Path, directory: Path) -> None:
    """Transcribe ``path`` through Transcripts and the stand-in; print where the wall time went."""
    postgres = LocalPostgres(directory / "postgres", durable=False).start()
    api = OpenAIStandIn()
    await api.start()
    try:
        database = postgres.url("streamrec")
        await schema.migrate(database)
        pool = await asyncpg.create_pool(database, min_size=1, max_size=4)
        event = RecordingEvent.create(
            recording_sid=recording_sid(), call_sid=call_sid(), account_sid=ACCOUNT_SID,
            business_id="bench", status="completed", channels="2", source="DialVerb",
        )  # fmt: skip
        await pool.execute(
            "INSERT INTO recordings (recording_sid, call_sid, account_sid, business_id, status)"
            " VALUES ($1, $2, $3, 'bench', 'downloaded')",
            event.recording_sid, event.call_sid, ACCOUNT_SID,
        )  # fmt: skip
        async with openai.AsyncOpenAI(
            api_key=OPENAI_KEY, base_url=api.url + "/v1", max_retries=0
        ) as client:
            model = "gpt-4o-mini-transcribe"
            profile = Profile("transcribe", model, None, "split", None)
            transcripts = Transcripts(
                transcriber=Transcriber(client=client, model=model), store=Store(pool),
                chunk_s=CHUNK_MS / 1000, overlap_s=OVERLAP_MS / 1000, concurrency=4,
                defaults=profile,
            )  # fmt: skip
            delivery = Delivery("1-0", event.to_fields(), 1)
            begun = time.perf_counter()
            result = await transcripts.transcribe(event, delivery, str(path), profile)
            wall = time.perf_counter() - begun
        busy = covered([span for spans in api.spans.values() for span in spans])
        print(
            f"  {result.chunks} chunks, {len(result.conversation.segments)} segments:"
            f" {wall:.2f} s wall in all, of which some answer of the stand-in (decoding"
            f" each upload, in this process) was in progress for {busy:.2f} s;"
            f" added by audio handling and the rest: {wall - busy:.2f} s"
        )
        await pool.close()
    finally:
        await api.close()
        postgres.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=60.0, help="length of each recording")
    args = parser.parse_args()
    seconds, hours = args.minutes * 60, args.minutes / 60
    with tempfile.TemporaryDirectory(prefix="streamrec-bench-audio-") as scratch:
        directory = Path(scratch)
        directory.chmod(0o755)  # PostgreSQL's own user enters it when run as root
        caller, callee = conversation(seconds, seed=3, pause_s=(1.0, 4.0))
        print(f"audio handling, {args.minutes:g} min recordings, 20 min chunks")
        for label, fmt, rate, channels in SOURCES:
            path = directory / f"{label.split(',')[0].replace(' ', '-')}-{rate}.{fmt}"
            parts = [caller, callee][:channels]
            write_audio(path, fmt=fmt, rate=rate, duration_s=seconds, channels=parts)
            print(f"{label}: {path.stat().st_size / 1e6:.1f} MB")
            handle(path, hours)
        print("end to end, the two-channel mp3, gpt-4o-mini-transcribe stand-in, 4 chunks at once")
        asyncio.run(end_to_end(directory / "two-channel-mp3-8000.mp3", directory))


if __name__ == "__main__":
    main()
