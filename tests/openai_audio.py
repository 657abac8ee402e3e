"""OpenAI's audio transcription requests as read, and its answers and errors as sent.

The bodies follow the installed SDK's models (``openai.types.audio``:
Transcription, TranscriptionVerbose, TranscriptionDiarized) and the error
bodies OpenAI is seen to send (a 413 over 26214400 bytes; 400s with
``invalid_request_error``). Which model takes which ``response_format``
follows the SDK's documentation of ``response_format``.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO, Any

from aiohttp import web
from multidict import MultiDictProxy

from tests.audio import Heard, Word

MAX_CONTENT_BYTES = 26_214_400
"""OpenAI reads at most this much of a request body (25 MiB)."""
EXTENSIONS = ("flac", "m4a", "mp3", "mp4", "mpeg", "mpga", "oga", "ogg", "wav", "webm")
"""File name extensions OpenAI takes, in the order its error message lists them."""
DIARIZE_UNCHUNKED_S = 30.0
"""A diarizing model needs ``chunking_strategy`` for audio longer than this."""
_LANGUAGES = {"en": "english", "he": "hebrew", "es": "spanish", "fr": "french", "de": "german"}


@dataclass(frozen=True, slots=True)
class Upload:
    """One transcription request the stand-in decoded, and its answer's status."""

    sid: str
    filename: str
    model: str
    language: str | None
    response_format: str
    bytes: int
    """The request body's size."""
    duration_s: float
    """Decoded samples over the rate: what the upload really holds."""
    channels: int
    rate: int
    codec: str
    words: list[Word]
    """``(start_s, end_s, word)`` heard on the upload's first channel."""
    status: int


@dataclass(frozen=True, slots=True)
class Request:
    """The fields of one ``POST /v1/audio/transcriptions`` the stand-in reads."""

    sid: str
    filename: str
    file: IO[bytes]
    size: int
    model: str
    response_format: str
    language: str | None
    granularities: tuple[str, ...]
    chunked: bool
    """A ``chunking_strategy`` was sent."""


def read(
    sid: str,
    form: MultiDictProxy[str | bytes | bytearray | web.FileField],
    upload: web.FileField,
    content_length: int | None,
) -> Request:
    """The request's fields; its size is the body's length, or the file's when sent chunked."""
    file = upload.file
    size = content_length if content_length is not None else file.seek(0, io.SEEK_END)
    file.seek(0)
    language = form.get("language")
    return Request(
        sid=sid,
        filename=upload.filename,
        file=file,
        size=size,
        model=str(form["model"]),
        response_format=str(form.get("response_format", "json")),
        language=str(language) if language else None,
        granularities=tuple(str(value) for value in form.getall("timestamp_granularities[]", [])),
        chunked=any(key.startswith("chunking_strategy") for key in form),
    )


def upload(request: Request, heard: Heard, status: int) -> Upload:
    """The record of ``request``, as heard and answered with ``status``."""
    return Upload(
        sid=request.sid,
        filename=request.filename,
        model=request.model,
        language=request.language,
        response_format=request.response_format,
        bytes=request.size,
        duration_s=heard.duration_s,
        channels=heard.channels,
        rate=heard.rate,
        codec=heard.codec,
        words=heard.words,
        status=status,
    )


def formats_of(model: str) -> frozenset[str]:
    """The response formats ``model`` accepts (srt and vtt are not spoken here)."""
    if model.startswith("whisper"):
        return frozenset({"json", "text", "verbose_json"})
    if "diarize" in model:
        return frozenset({"json", "text", "diarized_json"})
    return frozenset({"json", "text"})


def error(
    status: int,
    message: str,
    *,
    code: str | None,
    param: str | None = None,
    kind: str = "invalid_request_error",
) -> web.Response:
    """An error answer in OpenAI's envelope."""
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return web.json_response(body, status=status)


def too_large(read: int) -> web.Response:
    """The 413 for a request body over 25 MiB."""
    message = f"Maximum content size limit ({MAX_CONTENT_BYTES}) exceeded ({read} bytes read)"
    return error(413, message, code=None, kind="server_error")


def bad_extension() -> web.Response:
    """The 400 for a file name whose extension is not an audio format OpenAI takes."""
    listed = ", ".join(f"'{extension}'" for extension in EXTENSIONS)
    return error(400, f"Invalid file format. Supported formats: [{listed}]", code="invalid_value")


def undecodable() -> web.Response:
    """The 400 for a file that cannot be decoded as audio."""
    message = "Audio file might be corrupted or unsupported"
    return error(400, message, code="invalid_value", param="file")


def incompatible(response_format: str, model: str) -> web.Response:
    """The 400 for a response format the model does not produce."""
    message = (
        f"response_format '{response_format}' is not compatible with model '{model}'. "
        f"Use one of: {', '.join(sorted(formats_of(model)))}."
    )
    return error(400, message, code="unsupported_value", param="response_format")


def too_long(duration_s: float, limit_s: float) -> web.Response:
    """The 400 for audio longer than the model takes."""
    message = (
        f"audio duration {duration_s} seconds is longer than {limit_s:g} seconds "
        "which is the maximum for this model"
    )
    return error(400, message, code="invalid_value")


def unchunked() -> web.Response:
    """The 400 for long audio sent to a diarizing model without ``chunking_strategy``."""
    message = (
        "chunking_strategy is required for diarization models "
        f"when the input audio is longer than {DIARIZE_UNCHUNKED_S:g} seconds"
    )
    return error(400, message, code="invalid_value", param="chunking_strategy")


def answer(
    *,
    text: str,
    words: Sequence[Word],
    duration_s: float,
    model: str,
    response_format: str,
    language: str | None,
    granularities: Sequence[str] = (),
) -> web.Response:
    """The transcription of audio of ``duration_s`` in which ``words`` were heard.

    ``text`` is the whole transcript; timed formats carry one segment per
    word (or one segment of ``text`` over the whole audio when no word was heard).
    """
    if response_format == "text":
        return web.Response(text=text, content_type="text/plain")
    timed = list(words) if words else [(0.0, duration_s, text)]
    if response_format == "verbose_json":
        return web.json_response(_verbose(text, timed, duration_s, language, granularities))
    if response_format == "diarized_json":
        return web.json_response(_diarized(text, timed, duration_s))
    return web.json_response({"text": text, "usage": _usage(model, duration_s, text)})


def _usage(model: str, duration_s: float, text: str) -> dict[str, Any]:
    if model.startswith("whisper"):
        return _seconds(duration_s)
    audio = math.ceil(duration_s * 10)  # about ten audio tokens a second
    output = len(text.split()) + 1
    return {
        "type": "tokens",
        "input_tokens": audio,
        "output_tokens": output,
        "total_tokens": audio + output,
        "input_token_details": {"text_tokens": 0, "audio_tokens": audio},
    }


def _seconds(duration_s: float) -> dict[str, Any]:
    return {"type": "duration", "seconds": math.ceil(duration_s)}


def _verbose(
    text: str,
    words: Sequence[Word],
    duration_s: float,
    language: str | None,
    granularities: Sequence[str],
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "task": "transcribe",
        "language": _LANGUAGES.get(language or "en", language),
        "duration": duration_s,
        "text": text,
        "usage": _seconds(duration_s),
    }
    if "segment" in granularities or not granularities:
        body["segments"] = [
            {
                "id": index,
                "seek": 0,
                "start": start,
                "end": end,
                "text": f" {word}",
                "tokens": [],
                "temperature": 0.0,
                "avg_logprob": -0.2,
                "compression_ratio": 1.0,
                "no_speech_prob": 0.01,
            }
            for index, (start, end, word) in enumerate(words)
        ]
    if "word" in granularities:
        body["words"] = [{"word": word, "start": start, "end": end} for start, end, word in words]
    return body


def _diarized(text: str, words: Sequence[Word], duration_s: float) -> dict[str, Any]:
    return {
        "task": "transcribe",
        "duration": duration_s,
        "text": text,
        "segments": [
            {
                "type": "transcript.text.segment",
                "id": f"seg_{index}",
                "start": start,
                "end": end,
                "text": word,
                "speaker": "A",
            }
            for index, (start, end, word) in enumerate(words)
        ],
        "usage": _seconds(duration_s),
    }
