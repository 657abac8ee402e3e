"""The media client against Twilio's stand-in: downloads to the media directory, deletes."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from streamrec.events import RecordingEvent
from streamrec.retry import PermanentError, TransientError
from streamrec.twilio import WRITE_BYTES, Downloaded, MediaClient
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
    assert await client.download(recording) == Downloaded(path, len(AUDIO))
    assert media.requests[recording.recording_sid] == 0


@pytest.mark.parametrize(("channels", "query"), [(2, {"RequestedChannels": "2"}), (1, {})])
async def test_a_two_channel_recording_is_fetched_with_both_channels(
    client: MediaClient, media: MediaStandIn, channels: int, query: dict[str, str]
) -> None:
    """RecordingChannels 2 asks for both channels (Twilio mixes conferences down otherwise)."""
    recording = dataclasses.replace(event(), channels=channels)
    await client.download(recording)
    assert media.query_of[recording.recording_sid] == query


@pytest.mark.parametrize("extra", [0, 100_000, WRITE_BYTES, 3 * WRITE_BYTES])
async def test_disk_work_runs_off_the_event_loop(
    client: MediaClient, media: MediaStandIn, tmp_path: Path, extra: int
) -> None:
    """A download checks, writes and renames its file in threads: no disk call on the loop.

    A body of up to WRITE_BYTES is held whole and handed back; a longer one is streamed.
    """
    recording = event()
    body = AUDIO + os.urandom(extra)
    media.body_for[recording.recording_sid] = body
    with disk_calls_on_this_thread(tmp_path) as on_loop:
        downloaded = await client.download(recording)
    assert on_loop == []
    assert downloaded.size == len(body)
    assert downloaded.body == (body if len(body) <= WRITE_BYTES else None)
    assert downloaded.path.read_bytes() == body
    # no .part left behind
    assert [p.name for p in downloaded.path.parent.iterdir()] == [downloaded.path.name]


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (None, True),
        (404, False),
        (429, TransientError),
        (500, TransientError),
        (503, TransientError),
        (401, PermanentError),
        (403, PermanentError),
    ],
)
async def test_a_delete_is_sorted_by_twilios_answer(
    client: MediaClient, media: MediaStandIn, status: int | None, outcome: bool | type[Exception]
) -> None:
    """DELETE: 204 deleted, 404 already gone, 429/5xx transient, 401/403 permanent."""
    recording = event()
    sid = recording.recording_sid
    if status is not None:
        media.delete_status_for[sid] = status
    if isinstance(outcome, bool):
        assert await client.delete(recording) is outcome
    else:
        with pytest.raises(outcome):
            await client.delete(recording)
    assert media.delete_requests[sid] == 1
    assert media.deletes[sid] == (status is None)


async def test_a_deleted_recording_is_gone_for_good(
    client: MediaClient, media: MediaStandIn
) -> None:
    """A second delete of a recording answers 404 (done), and its media is gone too."""
    recording = event()
    assert await client.delete(recording) is True
    assert await client.delete(recording) is False
    assert media.deletes[recording.recording_sid] == 1
    with pytest.raises(TransientError, match="404"):
        await client.download(recording)


async def test_stored_audio_is_synced_before_it_counts(
    client: MediaClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """sync_stored fsyncs the file and the directories naming it; a wrong size is refused."""
    recording = event()
    downloaded = await client.download(recording)
    path, size = downloaded.path, downloaded.size
    synced: list[str] = []
    fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    await client.sync_stored(path, size)
    assert synced == [str(path), str(path.parent), str(path.parent.parent)]
    with pytest.raises(PermanentError, match="missing or not"):
        await client.sync_stored(path, size + 1)
    with pytest.raises(PermanentError, match="missing or not"):
        await client.sync_stored(path.with_name("elsewhere.mp3"), size)
