"""The media client: downloads from Twilio's media endpoint (stand-in) to the media directory."""

from __future__ import annotations

import contextlib
import io
import os
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import aiohttp
import pytest_asyncio

from streamrec.events import RecordingEvent
from streamrec.twilio import MediaClient
from tests.standins import ACCOUNT_SID, AUDIO, AUTH_TOKEN, MediaStandIn, call_sid, recording_sid

MEDIA_LIMIT = 100 * 1024 * 1024
FILE_FUNCTIONS = {os.stat, os.lstat, os.replace, os.rename, os.unlink, os.open, io.open, os.mkdir}


@pytest_asyncio.fixture(loop_scope="session")
async def client(media: MediaStandIn, tmp_path: Path) -> AsyncIterator[MediaClient]:
    """A media client of the stand-in, saving to a fresh media directory."""
    media.not_ready = 0
    async with aiohttp.ClientSession() as session:
        yield MediaClient(
            session=session,
            api_base=media.url,
            account_sid=ACCOUNT_SID,
            auth_token=AUTH_TOKEN,
            media_dir=tmp_path / "media",
            max_bytes=MEDIA_LIMIT,
        )


def event() -> RecordingEvent:
    """A fresh completed recording of business 7."""
    return RecordingEvent.create(
        recording_sid=recording_sid(),
        call_sid=call_sid(),
        account_sid=ACCOUNT_SID,
        business_id="7",
        status="completed",
    )


@contextlib.contextmanager
def disk_calls_on_this_thread(directory: Path) -> Iterator[list[str]]:
    """Collects the file-system calls made on this thread (the event loop's) in the block.

    Sees calls of os/io file functions and methods of files under ``directory``.
    """
    seen: list[str] = []
    prefix = str(directory)

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        if event != "c_call":
            return
        owner = getattr(arg, "__self__", None)
        on_file = isinstance(owner, io.IOBase) and str(getattr(owner, "name", "")).startswith(
            prefix
        )
        if on_file or arg in FILE_FUNCTIONS:
            seen.append(arg.__qualname__)

    sys.setprofile(profile)
    try:
        yield seen
    finally:
        sys.setprofile(None)


async def test_a_file_already_in_place_is_not_fetched(
    client: MediaClient, media: MediaStandIn
) -> None:
    """A complete file at the recording's path is returned with its size; no media request."""
    recording = event()
    path = client.path_for(recording)
    path.parent.mkdir(parents=True)
    path.write_bytes(AUDIO)
    assert await client.download(recording) == (path, len(AUDIO))
    assert media.requests[recording.recording_sid] == 0


async def test_disk_work_runs_off_the_event_loop(
    client: MediaClient, media: MediaStandIn, tmp_path: Path
) -> None:
    """A download checks, writes and renames its file in threads: no disk call on the loop."""
    recording = event()
    body = AUDIO + os.urandom(3 * 1024 * 1024)
    media.body_for[recording.recording_sid] = body
    with disk_calls_on_this_thread(tmp_path) as on_loop:
        path, size = await client.download(recording)
    assert on_loop == []
    assert size == len(body)
    assert path.read_bytes() == body
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no .part left behind
