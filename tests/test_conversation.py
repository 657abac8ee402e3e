"""Real audio through the real consumer: channels to speakers, chunks, checkpoints, modes.

Recordings are made on the fly with PyAV (tests/audio.py): each speaker's words
are tones on their own channel. The OpenAI stand-in decodes every upload and
answers with the words it actually heard, so what the tests read back proves
which audio reached which call.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from streamrec import service
from streamrec.businesses import Businesses, default_profile
from streamrec.events import RecordingEvent
from streamrec.keys import Keys
from streamrec.producer import Enqueuer
from streamrec.settings import Settings
from tests.audio import Burst, conversation, spoken, write_audio
from tests.conftest import wait_for
from tests.openai_audio import Upload
from tests.processes import spawn_consumer
from tests.standins import ACCOUNT_SID, MediaStandIn, OpenAIStandIn, call_sid, recording_sid

Call = tuple[Path, list[Burst], list[Burst]]
"""A recorded call: its file, the caller's words and the callee's."""


@dataclass
class Rig:
    """The stack a recording goes through: stand-ins, stream, database, settings."""

    settings: Settings
    media: MediaStandIn
    api: OpenAIStandIn
    redis: aioredis.Redis
    keys: Keys
    db: Any

    async def record(
        self, path: Path, *, business: str = "7", source: str = "DialVerb", channels: str = "2"
    ) -> str:
        """Serve the audio at ``path`` as a new recording of ``business``; enqueue its event."""
        sid = recording_sid()
        self.media.body_for[sid] = await asyncio.to_thread(path.read_bytes)
        self.media.business_of[sid] = business
        event = RecordingEvent.create(
            recording_sid=sid, call_sid=call_sid(), account_sid=ACCOUNT_SID,
            business_id=business, status="completed", channels=channels, source=source,
        )  # fmt: skip
        await Enqueuer(self.redis, self.keys, dedupe_ttl_s=60).enqueue(event)
        return sid

    def chunked(self, **update: Any) -> Settings:
        """The settings with short chunks, so a short file makes several."""
        values = {"transcribe_chunk_s": 30.0, "transcribe_overlap_s": 1.0, **update}
        return self.settings.model_copy(update=values)

    async def consume_all(self, settings: Settings | None = None) -> None:
        run = service.consume(settings or self.settings, asyncio.Event(), until_idle=True)
        await asyncio.wait_for(run, 120)

    def businesses(self) -> Businesses:
        return Businesses(self.db, defaults=default_profile(self.settings))

    async def row(self, sid: str) -> Any:
        found = await self.db.fetchrow("SELECT * FROM recordings WHERE recording_sid = $1", sid)
        assert found is not None, f"no row for {sid}"
        return found

    async def completed(self, sid: str) -> bool:
        status = await self.db.fetchval(
            "SELECT status FROM recordings WHERE recording_sid = $1", sid
        )
        return bool(status == "completed")

    def uploads(self, sid: str) -> list[Upload]:
        return [u for u in self.api.uploads if u.sid == sid]


@pytest.fixture
def rig(
    settings: Settings,
    media: MediaStandIn,
    openai_api: OpenAIStandIn,
    redis: aioredis.Redis,
    keys: Keys,
    db: Any,
) -> Rig:
    return Rig(settings, media, openai_api, redis, keys, db)


def said(segments: list[dict[str, Any]], speaker: str | None) -> list[str]:
    """The words ``speaker`` said, in order, from the stored segments."""
    return [w for s in segments if s["speaker"] == speaker for w in s["text"].split()]


@pytest.fixture
def call(tmp_path: Path) -> Call:
    """A 100 s two-channel mp3 at 8 kHz: two speakers taking turns, one per channel."""
    caller, callee = conversation(100.0, seed=1)
    path = tmp_path / "call.mp3"
    write_audio(path, fmt="mp3", rate=8000, duration_s=100.0, channels=[caller, callee])
    return path, caller, callee


async def test_a_two_channel_call_becomes_a_time_ordered_conversation(rig: Rig, call: Call) -> None:
    """Each channel's words reach its speaker, in time order; each chunk of a channel sent once."""
    path, caller, callee = call
    sid = await rig.record(path)
    await rig.consume_all(rig.chunked(transcribe_model="whisper-1"))
    found = await rig.row(sid)
    segments = json.loads(found["segments"])
    assert said(segments, "caller") == spoken(caller)
    assert said(segments, "callee") == spoken(callee)
    assert [s["text"] for s in segments] == spoken(caller + callee)  # one word per segment
    assert found["transcript"].splitlines()[0].startswith("caller: ")
    assert (found["audio_channels"], found["audio_sample_rate"]) == (2, 8000)
    assert found["audio_duration_s"] == pytest.approx(100.0, abs=0.1)
    uploads = rig.uploads(sid)
    assert len(uploads) == 2 * 4  # 100 s in chunks of at most 30 s, per channel
    assert {(u.channels, u.rate, u.codec) for u in uploads} == {(1, 8000, "pcm_mulaw")}
    assert max(u.duration_s for u in uploads) <= 31.0  # a chunk and its overlap
    assert {u.response_format for u in uploads} == {"verbose_json"}
    assert max(u.bytes for u in uploads) < 24_000_000
    await assert_tiled(rig.db, sid, uploads, {1: 100_000, 2: 100_000})


async def assert_tiled(db: Any, sid: str, uploads: list[Upload], ends: dict[int, int]) -> None:
    """Each track's committed chunks cover it end to end, each upload as long as its chunk."""
    rows = await db.fetch(
        "SELECT track, start_ms, end_ms, audio_start_ms FROM transcript_chunks"
        " WHERE recording_sid = $1 ORDER BY track, start_ms",
        sid,
    )
    by_name = {u.filename: u for u in uploads}
    for track, end in ends.items():
        spans = [r for r in rows if r["track"] == track]
        assert spans[0]["start_ms"] == 0
        assert all(a["end_ms"] == b["start_ms"] for a, b in itertools.pairwise(spans))
        assert spans[-1]["end_ms"] == pytest.approx(end, abs=50)
        for r in spans:
            upload = by_name[f"{sid}.t{track}.{r['start_ms']}.wav"]
            length_s = (r["end_ms"] - r["audio_start_ms"]) / 1000
            assert upload.duration_s == pytest.approx(length_s, abs=0.002)


async def test_a_mono_call_longer_than_two_chunks_is_one_unlabelled_text(
    rig: Rig, tmp_path: Path
) -> None:
    """A mono wav of 70 s in 30 s chunks: three calls, every word once, in order, no speaker."""
    words, _ = conversation(70.0, seed=5)
    path = tmp_path / "mono.wav"
    write_audio(path, fmt="wav", rate=8000, duration_s=70.0, channels=[words])
    sid = await rig.record(path, channels="1", source="RecordVerb")
    await rig.consume_all(rig.chunked(transcribe_model="whisper-1"))
    found = await rig.row(sid)
    assert found["transcript"].split() == spoken(words)
    assert {s["speaker"] for s in json.loads(found["segments"])} == {None}
    assert (found["audio_channels"], found["audio_sample_rate"]) == (1, 8000)
    uploads = rig.uploads(sid)
    assert len(uploads) == 3
    await assert_tiled(rig.db, sid, uploads, {0: 70_000})


async def test_text_only_chunks_become_per_channel_blocks_without_doubled_words(
    rig: Rig, call: Call
) -> None:
    """A model without timestamps: one block per chunk and channel; overlaps are not repeated."""
    path, caller, callee = call
    sid = await rig.record(path)
    await rig.consume_all(rig.chunked(transcribe_overlap_s=3.0))
    segments = json.loads((await rig.row(sid))["segments"])
    assert said(segments, "caller") == spoken(caller)
    assert said(segments, "callee") == spoken(callee)
    assert len(segments) == 8
    starts = [s["start_s"] for s in segments]
    assert starts == sorted(starts)
    repeated = [u for u in rig.api.uploads if u.sid == sid and u.words and u.duration_s > 30]
    assert repeated, "no upload carried its overlap"
    assert {u.response_format for u in rig.api.uploads if u.sid == sid} == {"json"}


async def test_a_business_with_mixed_channels_gets_one_track(rig: Rig, call: Call) -> None:
    """channels=mixed: both speakers on one downmixed track, no speaker names, half the calls."""
    path, caller, callee = call
    await rig.businesses().set("7", channels="mixed")
    sid = await rig.record(path)
    await rig.consume_all(rig.chunked(transcribe_model="whisper-1"))
    found = await rig.row(sid)
    assert found["transcript"].split() == spoken(caller + callee)
    assert {s["speaker"] for s in json.loads(found["segments"])} == {None}
    assert len(rig.uploads(sid)) == 4


async def test_a_download_only_business_is_never_transcribed(rig: Rig, call: Call) -> None:
    """mode=download-only: the row completes with its audio's facts and no transcription call."""
    await rig.businesses().set("7", mode="download-only")
    sid = await rig.record(call[0])
    await rig.consume_all()
    found = await rig.row(sid)
    assert found["status"] == "completed"
    assert found["transcript"] is None
    assert found["transcript_mode"] == "download-only"
    assert (found["audio_channels"], found["audio_sample_rate"]) == (2, 8000)
    assert found["audio_duration_s"] == pytest.approx(100.0, abs=1.0)  # the header's estimate
    assert rig.api.calls[sid] == 0


async def test_a_business_language_and_model_reach_the_api(rig: Rig, call: Call) -> None:
    """Per-business language and model are sent with every chunk of that business only."""
    businesses = rig.businesses()
    await businesses.set("7", language="he", model="whisper-1")
    ours = await rig.record(call[0], business="7")
    others = await rig.record(call[0], business="8")
    await rig.consume_all(rig.chunked())
    sent = {(u.sid, u.model, u.language) for u in rig.api.uploads}
    assert sent == {(ours, "whisper-1", "he"), (others, "gpt-4o-mini-transcribe", None)}
    assert (await rig.row(ours))["transcript_language"] == "he"


async def test_a_chunk_refused_as_too_long_is_cut_in_two_not_dead_lettered(
    rig: Rig, call: Call
) -> None:
    """A model that takes at most 20 s: every 30 s chunk's 400 leads to two shorter chunks."""
    path, caller, callee = call
    rig.api.max_duration_s = 20.0
    sid = await rig.record(path)
    await rig.consume_all(rig.chunked())
    found = await rig.row(sid)
    assert found["status"] == "completed"
    segments = json.loads(found["segments"])
    assert said(segments, "caller") == spoken(caller)
    assert said(segments, "callee") == spoken(callee)
    assert await rig.redis.xlen(rig.keys.dead) == 0
    refused = [u for u in rig.api.uploads if u.sid == sid and u.duration_s > 20.0]
    assert refused, "no chunk was refused"


async def test_undecodable_audio_is_dead_lettered_at_once(rig: Rig, tmp_path: Path) -> None:
    """A file no decoder reads (but that looks like mp3) fails for good, with no API call."""
    path = tmp_path / "noise.mp3"
    path.write_bytes(b"ID3\x04\x00\x00\x00\x00\x00\x00" + bytes(range(256)) * 64)
    sid = await rig.record(path)
    await rig.consume_all()
    found = await rig.row(sid)
    assert found["status"] == "failed"
    assert "UnreadableAudio" in found["error"]
    assert rig.api.calls[sid] == 0
    assert await rig.redis.xlen(rig.keys.dead) == 1


async def test_an_hour_long_call_survives_a_consumer_kill_without_paying_twice(
    rig: Rig, tmp_path: Path, children: list[subprocess.Popen[bytes]]
) -> None:
    """60 min, two channels, 20 min chunks: SIGKILL after 3 chunks; those are not sent again."""
    caller, callee = conversation(3600.0, seed=7, pause_s=(1.0, 4.0))
    path = tmp_path / "hour.wav"
    await asyncio.to_thread(
        write_audio, path, fmt="wav", rate=2000, duration_s=3600.0, channels=[caller, callee]
    )
    sid = await rig.record(path)
    rig.api.hold_after = 3  # answer three calls, hold the rest at the gate
    rig.api.gate = asyncio.Event()
    child = rig.settings.model_copy(update={"claim_idle_ms": 2_000})
    env = {"STREAMREC_TRANSCRIBE_CHUNK_CONCURRENCY": "1"}
    children.append(spawn_consumer(child, "victim", tmp_path, **env))
    await wait_for(lambda: sum(rig.api.waiting.values()) == 1, timeout=60, what="4th call")
    committed = await rig.db.fetch("SELECT track, start_ms FROM transcript_chunks")
    assert len(committed) == 3
    children[0].send_signal(signal.SIGKILL)
    await asyncio.to_thread(children[0].wait)
    rig.api.gate.set()
    # The victim's entry is reclaimed once idle for the claim time.
    stop = asyncio.Event()
    rescuer = asyncio.create_task(service.consume(child, stop))
    try:
        await wait_for(lambda: rig.completed(sid), timeout=120, what="the hour transcribed")
    finally:
        stop.set()
        await asyncio.wait_for(rescuer, 30)
    found = await rig.row(sid)
    assert found["status"] == "completed"
    segments = json.loads(found["segments"])
    assert said(segments, "caller") == spoken(caller)
    assert said(segments, "callee") == spoken(callee)
    sent = Counter(u.filename for u in rig.api.uploads if u.sid == sid)
    for done in committed:
        assert sent[f"{sid}.t{done['track']}.{done['start_ms']}.wav"] == 1
    assert max(u.bytes for u in rig.api.uploads if u.sid == sid) < 24_000_000
    assert len(sent) == 6  # three 20-minute chunks on each of two channels
    assert sum(sent.values()) == 7  # and the one the kill interrupted, sent again
