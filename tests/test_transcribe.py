"""The transcriber: OpenAI's audio API (stand-in) through the real openai SDK."""

from __future__ import annotations

import contextlib
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
import pytest_asyncio

from streamrec.retry import PermanentError
from streamrec.transcribe import MAX_UPLOAD_BYTES, Transcriber
from tests.standins import AUDIO, OPENAI_KEY, OpenAIStandIn, recording_sid

MiB = 1024 * 1024


@pytest_asyncio.fixture(loop_scope="session")
async def transcriber(openai_api: OpenAIStandIn) -> AsyncIterator[Transcriber]:
    """A transcriber of the stand-in, with the SDK's retries off as in production."""
    async with openai.AsyncOpenAI(
        api_key=OPENAI_KEY, base_url=openai_api.url + "/v1", max_retries=0
    ) as client:
        yield Transcriber(client=client, model="gpt-4o-mini-transcribe")


@dataclass
class Allocated:
    peak: int = 0
    """The most memory allocated at once, in bytes."""


@contextlib.contextmanager
def allocations() -> Iterator[Allocated]:
    """Measures the memory allocated within the block, from nothing (tracemalloc)."""
    measured = Allocated()
    tracemalloc.start()
    try:
        yield measured
    finally:
        measured.peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()


def sparse_audio(directory: Path, size: int) -> Path:
    """A recording file of ``size`` bytes: an audio header, then a hole (no disk used)."""
    path = directory / f"{recording_sid()}.mp3"
    with path.open("wb") as file:
        file.write(AUDIO)
        file.truncate(size)
    return path


async def test_an_oversized_file_is_rejected_unread(
    transcriber: Transcriber, openai_api: OpenAIStandIn, tmp_path: Path
) -> None:
    """A file over OpenAI's 25 MB limit is refused by its size, not read: no request, no memory."""
    path = sparse_audio(tmp_path, 100 * MiB)
    with allocations() as memory, pytest.raises(PermanentError, match="over OpenAI's 25 MB"):
        await transcriber.transcribe(path)
    assert memory.peak < MiB, f"{memory.peak / MiB:.1f} MiB allocated to reject the file"
    assert sum(openai_api.calls.values()) == 0


async def test_a_large_file_is_streamed(
    transcriber: Transcriber, openai_api: OpenAIStandIn, tmp_path: Path
) -> None:
    """A file just under the limit is uploaded whole, with memory far below its size."""
    await transcriber.transcribe(sparse_audio(tmp_path, MiB))  # the SDK imports on first use
    path = sparse_audio(tmp_path, MAX_UPLOAD_BYTES - MiB)
    sid = path.name.partition(".")[0]
    with allocations() as memory:
        assert await transcriber.transcribe(path) == f"transcript of {sid}"
    # The stand-in, in this process, spools the upload to a temporary file as it arrives.
    assert memory.peak < 4 * MiB, f"{memory.peak / MiB:.1f} MiB to upload {path.stat().st_size}"
    assert openai_api.calls[sid] == 1
