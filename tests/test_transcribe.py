"""The transcriber: OpenAI's audio API (stand-in) through the real openai SDK."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import openai
import pytest
import pytest_asyncio

from streamrec import audio
from streamrec.retry import PermanentError, TransientError
from streamrec.transcribe import MAX_UPLOAD_BYTES, TooLong, Transcriber
from tests.audio import Burst, write_audio
from tests.standins import OPENAI_KEY, OpenAIStandIn, quota_error, recording_sid


@pytest_asyncio.fixture(loop_scope="session")
async def transcriber(openai_api: OpenAIStandIn) -> AsyncIterator[Transcriber]:
    """A transcriber of the stand-in, with the SDK's retries off as in production."""
    async with openai.AsyncOpenAI(
        api_key=OPENAI_KEY, base_url=openai_api.url + "/v1", max_retries=0
    ) as client:
        yield Transcriber(client=client, model="gpt-4o-mini-transcribe")


def chunk(tmp_path: Path, duration_s: float = 4.0) -> bytes:
    """An encoded mono chunk saying "alpha" at 1 s and "bravo" at 2.5 s."""
    path = tmp_path / "source.wav"
    bursts = [Burst(1.0, 0.5, "alpha"), Burst(2.5, 0.5, "bravo")]
    write_audio(path, fmt="wav", rate=8000, duration_s=duration_s, channels=[bursts])
    with audio.decode(path, split=True) as tracks:
        data, extension = audio.encode(np.array(tracks.samples(0)), tracks.rate)
    assert extension == "wav"
    return data


async def test_a_text_only_model_answers_text(
    transcriber: Transcriber, openai_api: OpenAIStandIn, tmp_path: Path
) -> None:
    """gpt-4o-mini-transcribe is asked for json: the text, no timestamps."""
    sid = recording_sid()
    heard = await transcriber.transcribe(f"{sid}.t0.0.wav", chunk(tmp_path))
    assert (heard.text, heard.segments) == ("alpha bravo", None)
    assert openai_api.uploads[-1].response_format == "json"


async def test_whisper_gives_segments_with_timestamps(
    transcriber: Transcriber, openai_api: OpenAIStandIn, tmp_path: Path
) -> None:
    """whisper-1 is asked for verbose_json; its segments keep their times in the upload."""
    sid = recording_sid()
    heard = await transcriber.transcribe(f"{sid}.t1.0.wav", chunk(tmp_path), model="whisper-1")
    assert heard.segments is not None
    got = [(round(s.start_s, 1), s.text.strip()) for s in heard.segments]
    assert got == [(1.0, "alpha"), (2.5, "bravo")]  # OpenAI's segment text begins with a space
    assert openai_api.uploads[-1].model == "whisper-1"


async def test_a_diarizing_model_gives_speaker_labels(
    transcriber: Transcriber, openai_api: OpenAIStandIn, tmp_path: Path
) -> None:
    """A diarize model is asked for diarized_json, chunked by the server: speakers named."""
    sid = recording_sid()
    data = chunk(tmp_path, duration_s=40.0)  # over 30 s: needs chunking_strategy
    heard = await transcriber.transcribe(f"{sid}.t0.0.wav", data, model="gpt-4o-transcribe-diarize")
    assert heard.segments is not None
    assert [s.text.strip() for s in heard.segments] == ["alpha", "bravo"]
    assert all(s.speaker for s in heard.segments)
    assert openai_api.uploads[-1].response_format == "diarized_json"


async def test_the_language_reaches_the_api(
    transcriber: Transcriber, openai_api: OpenAIStandIn, tmp_path: Path
) -> None:
    """A language given is sent with the upload."""
    await transcriber.transcribe(f"{recording_sid()}.t0.0.wav", chunk(tmp_path), language="he")
    assert openai_api.uploads[-1].language == "he"


async def test_over_the_size_limit_is_too_long_and_unsent(
    transcriber: Transcriber, openai_api: OpenAIStandIn
) -> None:
    """A chunk over 25 MB is refused as too long (to be cut shorter) without a request."""
    sid = recording_sid()
    with pytest.raises(TooLong, match="25 MB"):
        await transcriber.transcribe(f"{sid}.t0.0.wav", bytes(MAX_UPLOAD_BYTES + 1))
    assert openai_api.calls[sid] == 0


async def test_over_the_model_duration_is_too_long(
    transcriber: Transcriber, openai_api: OpenAIStandIn, tmp_path: Path
) -> None:
    """OpenAI's 400 for audio longer than the model takes is TooLong, not a dead end."""
    openai_api.max_duration_s = 2.0
    with pytest.raises(TooLong, match="longer than"):
        await transcriber.transcribe(f"{recording_sid()}.t0.0.wav", chunk(tmp_path))


async def test_undecodable_audio_is_permanent_not_too_long(
    transcriber: Transcriber, tmp_path: Path
) -> None:
    """A 400 for a file that is not audio is permanent, and not taken for a length problem."""
    with pytest.raises(PermanentError) as raised:
        await transcriber.transcribe(f"{recording_sid()}.t0.0.wav", b"RIFF" + bytes(2000))
    assert not isinstance(raised.value, TooLong)


@pytest.mark.parametrize(
    ("status", "error", "expected"),
    [
        (429, {"message": "slow down", "code": "rate_limit_exceeded"}, TransientError),
        (500, {"message": "boom", "code": None}, TransientError),
        (401, {"message": "bad key", "code": "invalid_api_key"}, PermanentError),
        (404, {"message": "no such model", "code": "model_not_found"}, PermanentError),
        (*quota_error(), PermanentError),
    ],
    ids=["rate-limit", "server-error", "bad-key", "no-model", "quota"],
)
async def test_errors_are_sorted_by_code(
    transcriber: Transcriber,
    openai_api: OpenAIStandIn,
    tmp_path: Path,
    status: int,
    error: dict[str, object],
    expected: type[Exception],
) -> None:
    """A rate limit or server error is retried; a bad key, unknown model or spent quota is not."""
    sid = recording_sid()
    openai_api.error_for[sid] = (status, error)
    with pytest.raises(expected) as raised:
        await transcriber.transcribe(f"{sid}.t0.0.wav", chunk(tmp_path))
    assert not isinstance(raised.value, TooLong)
    if expected is TransientError:
        assert not isinstance(raised.value, PermanentError)


def test_the_sdk_is_loaded_only_to_transcribe() -> None:
    """Every process's entry point loads without the OpenAI SDK (a third of a second and
    14 MiB here): only a consumer that transcribes imports it, to make its client."""
    probe = (
        "import sys, streamrec.__main__, streamrec.service, streamrec.producer;"
        " print('openai' in sys.modules)"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert loaded.stdout.strip() == "False"
