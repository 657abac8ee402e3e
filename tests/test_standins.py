"""The OpenAI stand-in, driven by the real SDK: it hears uploads and answers in OpenAI's shapes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import openai
import pytest
import pytest_asyncio
from openai.types import AudioResponseFormat
from openai.types.audio import Transcription, TranscriptionDiarized, TranscriptionVerbose

from tests.audio import Burst, audio_bytes
from tests.conftest import wait_for
from tests.standins import AUDIO, OPENAI_KEY, OpenAIStandIn, recording_sid

TWO_WORDS = [Burst(0.5, 0.4, "alpha"), Burst(1.5, 0.5, "kilo")]


@pytest_asyncio.fixture(loop_scope="session")
async def client(openai_api: OpenAIStandIn) -> AsyncIterator[openai.AsyncOpenAI]:
    """The SDK pointed at the stand-in, without its own retries."""
    async with openai.AsyncOpenAI(
        api_key=OPENAI_KEY, base_url=openai_api.url + "/v1", max_retries=0
    ) as sdk:
        yield sdk


def speech(duration_s: float = 3.0, bursts: list[Burst] = TWO_WORDS) -> bytes:
    """A mono 8 kHz wav of ``duration_s`` with ``bursts``."""
    return audio_bytes(fmt="wav", rate=8000, duration_s=duration_s, channels=[bursts])


async def test_json_is_the_words_heard(
    client: openai.AsyncOpenAI, openai_api: OpenAIStandIn
) -> None:
    """A json transcription is the words on the upload, and the upload is recorded as heard."""
    sid = recording_sid()
    result = await client.audio.transcriptions.create(
        model="gpt-4o-mini-transcribe", file=(f"{sid}.c0.wav", speech()), language="he"
    )
    assert isinstance(result, Transcription)
    assert result.text == "alpha kilo"
    assert result.usage is not None and result.usage.type == "tokens"
    (upload,) = openai_api.uploads
    assert (upload.sid, upload.filename, upload.language) == (sid, f"{sid}.c0.wav", "he")
    assert (upload.codec, upload.rate, upload.channels, upload.status) == (
        "pcm_s16le",
        8000,
        1,
        200,
    )
    assert upload.duration_s == pytest.approx(3.0)
    assert [word for *_, word in upload.words] == ["alpha", "kilo"]
    assert openai_api.calls[sid] == 1


async def test_silence_is_answered_as_before(client: openai.AsyncOpenAI) -> None:
    """An upload with no words heard is answered ``transcript of {sid}``; plain text as asked."""
    sid = recording_sid()
    text = await client.audio.transcriptions.create(
        model="gpt-4o-transcribe", file=(f"{sid}.mp3", AUDIO), response_format="text"
    )
    assert text.strip() == f"transcript of {sid}"


async def test_whisper_gives_a_timed_segment_per_word(client: openai.AsyncOpenAI) -> None:
    """whisper-1's verbose_json has a segment (and a word) per word heard, at its time."""
    result = await client.audio.transcriptions.create(
        model="whisper-1",
        file=(f"{recording_sid()}.wav", speech()),
        response_format="verbose_json",
        timestamp_granularities=["segment", "word"],
    )
    assert isinstance(result, TranscriptionVerbose)
    assert result.segments is not None and result.words is not None
    assert [s.text.strip() for s in result.segments] == ["alpha", "kilo"]
    spans = [value for s in result.segments for value in (s.start, s.end)]
    assert spans == pytest.approx([0.5, 0.9, 1.5, 2.0], abs=0.02)
    assert [word.word for word in result.words] == ["alpha", "kilo"]
    assert result.duration == pytest.approx(3.0)


async def test_diarize_gives_speaker_segments(client: openai.AsyncOpenAI) -> None:
    """The diarizing model's diarized_json labels each word's segment with a speaker."""
    result = await client.audio.transcriptions.create(
        model="gpt-4o-transcribe-diarize",
        file=(f"{recording_sid()}.wav", speech(40.0)),
        response_format="diarized_json",
        chunking_strategy="auto",
    )
    assert isinstance(result, TranscriptionDiarized)
    assert [(s.speaker, s.text) for s in result.segments] == [("A", "alpha"), ("A", "kilo")]


@pytest.mark.parametrize(
    ("model", "response_format", "extra", "match"),
    [
        ("gpt-4o-transcribe", "verbose_json", {}, "not compatible with model"),
        ("whisper-1", "diarized_json", {}, "not compatible with model"),
        ("gpt-4o-transcribe-diarize", "diarized_json", {}, "chunking_strategy is required"),
        ("gpt-4o-mini-transcribe", "json", {"max_duration_s": 30.0}, "audio duration 40.0 sec"),
    ],
)
async def test_requests_openai_refuses_are_refused(
    client: openai.AsyncOpenAI,
    openai_api: OpenAIStandIn,
    model: str,
    response_format: AudioResponseFormat,
    extra: dict[str, float],
    match: str,
) -> None:
    """A format the model lacks, unchunked long diarizing, audio over the model's limit: 400."""
    openai_api.max_duration_s = extra.get("max_duration_s", openai_api.max_duration_s)
    with pytest.raises(openai.BadRequestError, match=match) as caught:
        await client.audio.transcriptions.create(
            model=model,
            file=(f"{recording_sid()}.wav", speech(40.0)),
            response_format=response_format,
        )
    assert caught.value.code in ("invalid_value", "unsupported_value")
    assert [upload.status for upload in openai_api.uploads] == [400]


async def test_whisper_has_no_duration_limit(
    client: openai.AsyncOpenAI, openai_api: OpenAIStandIn
) -> None:
    """whisper-1 takes audio longer than the gpt-4o models' limit."""
    openai_api.max_duration_s = 2.0
    result = await client.audio.transcriptions.create(
        model="whisper-1", file=(f"{recording_sid()}.wav", speech())
    )
    assert result.text == "alpha kilo"


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("x.mp3", b"ID3\x04\x00\x00\x00\x00\x00\x00\xff\xfb\x90\x00" + bytes(2000), "corrupted"),
        ("x.txt", AUDIO, "Invalid file format"),
    ],
)
async def test_files_that_are_not_audio_are_refused(
    client: openai.AsyncOpenAI, openai_api: OpenAIStandIn, name: str, content: bytes, match: str
) -> None:
    """Undecodable content, or a name that is not an audio format, is a 400 invalid_value."""
    with pytest.raises(openai.BadRequestError, match=match) as caught:
        await client.audio.transcriptions.create(model="whisper-1", file=(name, content))
    assert caught.value.code == "invalid_value"
    assert openai_api.uploads == []
    assert [status for _, status, _ in openai_api.errors] == [400]


async def test_a_body_over_25_mib_is_a_413(
    client: openai.AsyncOpenAI, openai_api: OpenAIStandIn, tmp_path: Path
) -> None:
    """Over 26214400 bytes of request, OpenAI's 413 names the limit and the bytes read."""
    path = tmp_path / f"{recording_sid()}.mp3"
    with path.open("wb") as file:
        file.write(AUDIO)
        file.truncate(26_214_400)
    with path.open("rb") as file, pytest.raises(openai.APIStatusError) as caught:
        await client.audio.transcriptions.create(model="whisper-1", file=file)
    assert caught.value.status_code == 413
    assert "Maximum content size limit (26214400) exceeded" in caught.value.message


async def test_a_gate_can_let_some_calls_through_first(
    client: openai.AsyncOpenAI, openai_api: OpenAIStandIn
) -> None:
    """With hold_after, that many calls are answered and the next waits at the gate."""
    openai_api.gate, openai_api.hold_after = asyncio.Event(), 1
    first = await client.audio.transcriptions.create(
        model="whisper-1", file=(f"{recording_sid()}.wav", speech())
    )
    assert first.text == "alpha kilo"
    sid = recording_sid()
    second = asyncio.create_task(
        client.audio.transcriptions.create(model="whisper-1", file=(f"{sid}.wav", speech()))
    )
    await wait_for(lambda: openai_api.waiting[sid] == 1, what="the second call at the gate")
    assert not second.done()
    openai_api.gate.set()
    assert (await second).text == "alpha kilo"
