"""Transcription with OpenAI's audio API, with its errors sorted into retry classes."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import BinaryIO

import openai
import structlog

from streamrec.retry import PermanentError, TransientError

log = structlog.get_logger("streamrec.transcribe")

MAX_UPLOAD_BYTES = 25 * 1024 * 1024  # OpenAI's limit for one audio file

_PERMANENT = (
    openai.BadRequestError,
    openai.AuthenticationError,
    openai.PermissionDeniedError,
    openai.NotFoundError,
    openai.UnprocessableEntityError,
)


class Transcriber:
    """Turns a stored recording into text with ``client.audio.transcriptions``."""

    def __init__(self, *, client: openai.AsyncOpenAI, model: str) -> None:
        self._client = client
        self.model = model

    async def transcribe(self, path: Path) -> str:
        """The transcript of the audio at ``path``.

        Raises PermanentError for a file over 25 MB, a rejected request (400,
        401, 403, 404, 422) or an exhausted quota (``insufficient_quota`` is a
        billing state, not a rate limit); TransientError for 429, 5xx, timeouts
        and connection failures. The file is sized before it is opened and is
        streamed, not read into memory.
        """
        size = (await asyncio.to_thread(path.stat)).st_size
        if size > MAX_UPLOAD_BYTES:
            raise PermanentError(f"audio is {size} bytes, over OpenAI's 25 MB limit")
        file = await asyncio.to_thread(path.open, "rb")
        try:
            text = await self._request(path.name, file)
        finally:
            await asyncio.to_thread(file.close)
        log.info("recording_transcribed", chars=len(text), model=self.model)
        return text

    async def _request(self, name: str, file: BinaryIO) -> str:
        """POST the audio and sort the SDK's errors into retry classes."""
        # Given a file object, the SDK streams it: httpx2's multipart body reads
        # 64 KiB at a time as the socket takes it (bytes would hold the whole
        # file). Those small reads run on the event loop; the SDK has no other way.
        try:
            result = await self._client.audio.transcriptions.create(
                model=self.model, file=(name, file, "audio/mpeg"), response_format="json"
            )
        except openai.RateLimitError as exc:
            if _code(exc) == "insufficient_quota":
                raise PermanentError(f"OpenAI quota exhausted: {exc.message}") from exc
            raise TransientError(
                f"OpenAI rate limit: {exc.message}", retry_after=_retry_after(exc)
            ) from exc
        except _PERMANENT as exc:
            raise PermanentError(
                f"OpenAI rejected the audio ({exc.status_code}): {exc.message}"
            ) from exc
        except openai.APIStatusError as exc:
            raise TransientError(f"OpenAI error {exc.status_code}: {exc.message}") from exc
        except openai.APIConnectionError as exc:  # includes APITimeoutError
            raise TransientError(f"OpenAI unreachable: {type(exc).__name__}") from exc
        text = result if isinstance(result, str) else getattr(result, "text", "")
        return str(text)


def _code(exc: openai.APIStatusError) -> str | None:
    body = exc.body
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict):
            code = error.get("code")
            return str(code) if code is not None else None
    return getattr(exc, "code", None)


def _retry_after(exc: openai.APIStatusError) -> float | None:
    value = exc.response.headers.get("retry-after", "")
    try:
        return float(value)
    except ValueError:
        return None
