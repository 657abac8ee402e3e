"""Transcription with OpenAI's audio API: one call per chunk, errors sorted by cause.

The response format follows the model: ``whisper-1`` gives segments with
timestamps (``verbose_json``), a diarizing model gives speaker-labelled segments
(``diarized_json``), and the others give text only (``json``).

The SDK is imported only where a transcribing consumer makes its client: it takes
a third of a second and 14 MiB to load, which the webhook and a consumer that does
not transcribe never pay.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from streamrec.chunking import Segment
from streamrec.retry import PermanentError, TransientError

if TYPE_CHECKING:
    import openai

log = structlog.get_logger("streamrec.transcribe")

MAX_UPLOAD_BYTES = 25 * 1024 * 1024
"""OpenAI's limit for one audio file."""
UPLOAD_BUDGET_BYTES = 24 * 1000 * 1000
"""What a chunk may take of it: room for the multipart envelope and a rounding."""
MIME = {"wav": "audio/wav", "flac": "audio/flac", "mp3": "audio/mpeg"}

# OpenAI's 400 for an upload over a model's duration ("audio duration 1502 seconds is
# longer than 1500 seconds which is the maximum for this model") or size.
_TOO_LONG = re.compile(r"longer than|too long|maximum content size|too large|duration", re.I)
_TOO_LONG_CODES = frozenset({"audio_too_long", "file_too_large", "request_too_large"})


class TooLong(PermanentError):
    """The upload is over the model's duration or size limit: a shorter chunk would pass."""


@dataclass(frozen=True, slots=True)
class Heard:
    """What the model heard in one upload; segment times are from the upload's start."""

    text: str
    segments: tuple[Segment, ...] | None
    """None when the model returns no timestamps."""


def response_format(model: str) -> str:
    """The richest format ``model`` answers: segments where it has them, else text."""
    if model == "whisper-1":
        return "verbose_json"
    return "diarized_json" if "diarize" in model else "json"


class Transcriber:
    """Sends audio chunks to ``client.audio.transcriptions``; ``model`` is the default."""

    def __init__(self, *, client: openai.AsyncOpenAI, model: str) -> None:
        self._client = client
        self.model = model

    async def transcribe(
        self, name: str, data: bytes, *, model: str | None = None, language: str | None = None
    ) -> Heard:
        """What ``model`` (default: this transcriber's) hears in ``data``, a file named ``name``.

        Raises TooLong for an upload over the model's size or duration limit
        (413, or a 400 saying so), PermanentError for a file over 25 MB (unsent),
        any other rejected request (400, 401, 403, 404, 422) or an exhausted
        quota (``insufficient_quota`` is a billing state, not a rate limit);
        TransientError for 429, 5xx, timeouts and connection failures.
        """
        if len(data) > MAX_UPLOAD_BYTES:
            raise TooLong(f"chunk is {len(data)} bytes, over OpenAI's 25 MB limit")
        model = model or self.model
        extension = name.rpartition(".")[2]
        options: dict[str, Any] = {"response_format": response_format(model)}
        if options["response_format"] == "verbose_json":
            options["timestamp_granularities"] = ["segment"]
        elif options["response_format"] == "diarized_json":
            options["chunking_strategy"] = "auto"
        if language:
            options["language"] = language
        file = (name, data, MIME.get(extension, "application/octet-stream"))
        result = await self._request(model=model, file=file, **options)
        heard = _heard(result)
        log.info("chunk_transcribed", name=name, chars=len(heard.text), model=model)
        return heard

    async def _request(self, **params: Any) -> Any:
        """POST the audio and sort the SDK's errors into retry classes."""
        import openai  # noqa: PLC0415 - loaded by then: the client is the SDK's

        try:
            return await self._client.audio.transcriptions.create(**params)
        except openai.RateLimitError as exc:
            if _code(exc) == "insufficient_quota":
                raise PermanentError(f"OpenAI quota exhausted: {exc.message}") from exc
            raise TransientError(
                f"OpenAI rate limit: {exc.message}", retry_after=_retry_after(exc)
            ) from exc
        except openai.APIStatusError as exc:
            raise _sorted(exc) from exc
        except openai.APIConnectionError as exc:  # includes APITimeoutError
            raise TransientError(f"OpenAI unreachable: {type(exc).__name__}") from exc


def _sorted(exc: openai.APIStatusError) -> Exception:
    """The retry class of an error answer other than 429."""
    too_long = exc.status_code == 413 or (
        exc.status_code == 400
        and (_code(exc) in _TOO_LONG_CODES or bool(_TOO_LONG.search(exc.message)))
    )
    if too_long:
        return TooLong(f"OpenAI refused the chunk as too long ({exc.status_code}): {exc.message}")
    import openai  # noqa: PLC0415 - loaded by then: the error is the SDK's

    permanent = (
        openai.BadRequestError,
        openai.AuthenticationError,
        openai.PermissionDeniedError,
        openai.NotFoundError,
        openai.UnprocessableEntityError,
    )
    if isinstance(exc, permanent):
        return PermanentError(f"OpenAI rejected the audio ({exc.status_code}): {exc.message}")
    return TransientError(f"OpenAI error {exc.status_code}: {exc.message}")


def _heard(result: Any) -> Heard:
    """Text and (where given) segments of any of the SDK's transcription answers."""
    if isinstance(result, str):
        return Heard(result, None)
    text = str(getattr(result, "text", "") or "")
    raw = getattr(result, "segments", None)
    if raw is None:
        return Heard(text, None)
    segments = tuple(
        Segment(float(s.start), float(s.end), str(s.text), getattr(s, "speaker", None)) for s in raw
    )
    return Heard(text, segments)


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
