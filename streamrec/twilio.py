"""Twilio's side: the media URL of a recording, its download and its deletion.

URLs are built from AccountSid and RecordingSid against the configured API
base, never taken from the callback, so a forged callback cannot point a worker
at another host or make it send the auth token there.
"""

from __future__ import annotations

import base64
import itertools
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import aiohttp
import structlog

from streamrec.disk import Disk
from streamrec.events import RecordingEvent
from streamrec.retry import PermanentError, TransientError

log = structlog.get_logger("streamrec.twilio")

CHUNK = 64 * 1024
WRITE_BYTES = 1024 * 1024
"""Received chunks are written to disk in pieces this large: one thread hop per MiB; a
body no larger is written whole, with its rename, in one hop."""
AUDIO_MAGIC = (b"ID3", b"RIFF", b"OggS", b"fLaC")


def media_url(api_base: str, event: RecordingEvent) -> str:
    """The mp3 media URL of a recording, both channels of a two-channel one.

    Twilio serves some two-channel recordings (conferences) mixed down to one
    channel unless ``RequestedChannels=2`` asks for both; with both, each
    speaker is transcribed on their own.
    """
    recordings = f"{api_base}/2010-04-01/Accounts/{event.account_sid}/Recordings"
    both = "?RequestedChannels=2" if event.channels == 2 else ""
    return f"{recordings}/{event.recording_sid}.mp3{both}"


def looks_like_audio(head: bytes) -> bool:
    """True for the first bytes of an mp3 (ID3 tag or frame sync), wav, ogg or flac."""
    if head.startswith(AUDIO_MAGIC):
        return True
    return len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0


_PART_TAG = uuid.uuid4().hex[:12]
"""Names this process's partial files apart from another process's."""
_part_numbers = itertools.count()


@dataclass(frozen=True, slots=True)
class Downloaded:
    """A recording's audio on disk."""

    path: Path
    size: int
    body: bytes | None = None
    """The file's bytes when the download held them whole (up to WRITE_BYTES); None when
    they were streamed to disk or the file was there already."""


class MediaClient:
    """Downloads recording media with the account's credentials into ``media_dir``.

    Also deletes a recording from Twilio, for the pipeline's opt-in delete stage.
    """

    def __init__(
        self,
        *,
        session: aiohttp.ClientSession,
        api_base: str,
        account_sid: str,
        auth_token: str,
        media_dir: Path,
        max_bytes: int,
    ) -> None:
        self._session = session
        self._api_base = api_base
        self._account_sid = account_sid
        credentials = base64.b64encode(f"{account_sid}:{auth_token}".encode()).decode()
        # aiohttp drops this header on a redirect to another origin.
        self._headers = {"Authorization": f"Basic {credentials}"}
        self._media_dir = media_dir
        self._max_bytes = max_bytes
        self._disk = Disk()

    def path_for(self, event: RecordingEvent) -> Path:
        """Where the audio of a recording is stored."""
        return self._media_dir / event.business_id / f"{event.recording_sid}.mp3"

    async def download(self, event: RecordingEvent) -> Downloaded:
        """Fetch the recording's audio to disk; returns where it is, its size and,
        when it was small enough to hold whole, its bytes.

        A file already at the final path is complete (it is renamed there only
        when whole) and is not fetched again. Raises TransientError for Twilio's
        early 404, 429, 5xx and network failures, PermanentError for other 4xx,
        oversized or non-audio bodies. Disk work runs in threads, off the event
        loop: the media directory may be a network share. A body of up to
        WRITE_BYTES is written, and renamed into place, in one thread hop.
        """
        if event.account_sid != self._account_sid:
            raise PermanentError("recording belongs to another account")
        final = self.path_for(event)
        size = await self._disk.run(_size_if_present, final)
        if size is not None:
            return Downloaded(final, size)
        part = final.with_name(f"{final.name}.{_PART_TAG}-{next(_part_numbers)}.part")
        try:
            downloaded = await self._fetch(event, part, final)
        except BaseException:
            await self._disk.run(part.unlink, missing_ok=True)
            raise
        log.info("recording_downloaded", bytes=downloaded.size)
        return downloaded

    async def sync_stored(self, path: Path, size: int) -> None:
        """Force the stored audio at ``path`` to disk: the file, then the directories naming it.

        Raises PermanentError if ``path`` is not a file of ``size`` bytes: the
        audio the row records is not where it says, so Twilio's copy must stay.
        """
        if await self._disk.run(_size_if_present, path) != size:
            raise PermanentError(f"stored audio is missing or not {size} bytes: {path}")
        await self._disk.run(_fsync_each, path, path.parent, path.parent.parent)

    async def delete(self, event: RecordingEvent) -> bool:
        """Delete the recording (media and metadata) from Twilio; False if it was gone already.

        Twilio answers 204 once deleted and 404 for a recording it does not
        have, which counts as done: an earlier attempt may have deleted it and
        died before saying so. Raises TransientError for 429, 5xx and network
        failures, PermanentError for any other answer (401/403: these
        credentials may not delete).
        """
        if event.account_sid != self._account_sid:
            raise PermanentError("recording belongs to another account")
        recordings = f"{self._api_base}/2010-04-01/Accounts/{event.account_sid}/Recordings"
        url = f"{recordings}/{event.recording_sid}.json"
        try:
            async with self._session.delete(url, headers=self._headers) as response:
                status, retry_after = response.status, _retry_after(response)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise TransientError(f"delete request failed: {type(exc).__name__}: {exc}") from exc
        if status in (200, 204):
            return True
        if status == 404:
            return False
        if status == 429 or status >= 500:
            raise TransientError(f"delete request got {status}", retry_after=retry_after)
        raise PermanentError(f"delete request got {status}")

    async def _fetch(self, event: RecordingEvent, part: Path, final: Path) -> Downloaded:
        """Save the recording's media at ``final``, through ``part`` while it is incomplete."""
        url = media_url(self._api_base, event)
        try:
            async with self._session.get(url, headers=self._headers) as response:
                _check_status(response)
                return await self._save(response, part, final)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise TransientError(f"media download failed: {type(exc).__name__}: {exc}") from exc

    async def _save(self, response: aiohttp.ClientResponse, part: Path, final: Path) -> Downloaded:
        declared = response.content_length
        if declared is not None and declared > self._max_bytes:
            raise PermanentError(f"media is {declared} bytes, over the {self._max_bytes} limit")
        file: BinaryIO | None = None  # opened once the body outgrows WRITE_BYTES
        size = 0
        pending = bytearray()
        try:
            async for chunk in response.content.iter_chunked(CHUNK):
                if size == 0 and not looks_like_audio(chunk[:4]):
                    raise PermanentError("media is not audio")
                size += len(chunk)
                if size > self._max_bytes:
                    raise PermanentError(f"media is over the {self._max_bytes} byte limit")
                pending += chunk
                if len(pending) >= WRITE_BYTES:
                    if file is None:
                        file = await self._disk.run(_open_for_write, part)
                    await self._disk.run(file.write, pending)
                    pending.clear()
            if size == 0:
                raise TransientError("media body was empty")
            if file is None:
                body = bytes(pending)
                await self._disk.run(_write_whole, part, body, final)
                return Downloaded(final, size, body)
            await self._disk.run(file.write, pending)
        finally:
            if file is not None:
                await self._disk.run(file.close)
        await self._disk.run(os.replace, part, final)
        return Downloaded(final, size)


def _size_if_present(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None


def _fsync_each(*paths: Path) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _open_for_write(path: Path) -> BinaryIO:
    try:
        return path.open("wb")
    except FileNotFoundError:  # the business's first recording here
        path.parent.mkdir(parents=True, exist_ok=True)
        return path.open("wb")


def _write_whole(part: Path, body: bytes, final: Path) -> None:
    """Write ``body`` to ``part`` and rename it to ``final``: the file appears only whole."""
    with _open_for_write(part) as file:
        file.write(body)
    os.replace(part, final)


def _check_status(response: aiohttp.ClientResponse) -> None:
    status = response.status
    if status == 200:
        return
    if status == 404:
        # Twilio answers 404 for a short while after the callback, until the
        # media is ready; a 404 that persists ends at the delivery cap.
        raise TransientError("media not found yet (404)")
    if status == 429 or status >= 500:
        raise TransientError(f"media request got {status}", retry_after=_retry_after(response))
    raise PermanentError(f"media request got {status}")


def _retry_after(response: aiohttp.ClientResponse) -> float | None:
    value = response.headers.get("Retry-After", "")
    return float(value) if value.isdigit() else None
