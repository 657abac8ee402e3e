"""Local stand-ins for Twilio and OpenAI that speak their wire protocols.

``MediaStandIn`` serves ``GET /2010-04-01/Accounts/{AccountSid}/Recordings/{Sid}.mp3``
behind HTTP Basic auth and, like Twilio right after a callback, answers 404 for
the first requests of each recording; ``DELETE .../Recordings/{Sid}.json``
answers 204, then 404 (and so does the media) once the recording is deleted;
the Recordings list and the Calls resource are ``tests/twilio_rest.py``'s.
``OpenAIStandIn`` serves ``POST /v1/audio/transcriptions`` (multipart, Bearer
auth), decodes each upload and answers with the words it heard, as OpenAI
does, errors included (bodies in ``tests/openai_audio.py``), so the real
``openai`` SDK drives it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import secrets
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import aiohttp
import av
import redis.asyncio as aioredis
from aiohttp import web
from twilio.request_validator import RequestValidator

from streamrec.events import RecordingEvent
from streamrec.keys import Keys
from streamrec.producer import Enqueuer
from tests import openai_audio
from tests.audio import Heard, Word, audio_bytes, hear
from tests.openai_audio import Upload
from tests.twilio_rest import RestResources

ACCOUNT_SID = "AC" + "0123456789abcdef" * 2
AUTH_TOKEN = "test-auth-token-0123456789abcdef"
OPENAI_KEY = "sk-test"
AUDIO = audio_bytes(fmt="mp3", rate=8000, duration_s=0.5, channels=[[]])
"""A real mp3 (ID3 tag, then frames): half a second of near-silence, 8 kHz mono."""


def recording_sid() -> str:
    """A fresh, well-formed RecordingSid."""
    return "RE" + secrets.token_hex(16)


def call_sid() -> str:
    """A fresh, well-formed CallSid."""
    return "CA" + secrets.token_hex(16)


def callback_params(
    sid: str | None = None, *, status: str = "completed", account_sid: str = ACCOUNT_SID
) -> dict[str, str]:
    """The form fields of a RecordingStatusCallback."""
    sid = sid or recording_sid()
    return {
        "AccountSid": account_sid,
        "CallSid": call_sid(),
        "RecordingSid": sid,
        "RecordingUrl": f"https://api.twilio.com/2010-04-01/Accounts/{account_sid}/Recordings/{sid}",
        "RecordingStatus": status,
        "RecordingDuration": "42",
        "RecordingChannels": "1",
        "RecordingSource": "RecordVerb",
        "RecordingStartTime": "Sat, 28 Nov 2026 10:00:00 +0000",
        "ErrorCode": "0",
    }


async def enqueue(
    redis: aioredis.Redis,
    keys: Keys,
    count: int,
    *,
    business: str = "9",
    media: MediaStandIn | None = None,
) -> list[str]:
    """Add ``count`` completed recordings of ``business`` to the stream, as the webhook does."""
    enqueuer = Enqueuer(redis, keys, dedupe_ttl_s=3600)
    sids = [recording_sid() for _ in range(count)]
    events = [
        RecordingEvent.create(
            recording_sid=sid,
            call_sid=call_sid(),
            account_sid=ACCOUNT_SID,
            business_id=business,
            status="completed",
        )
        for sid in sids
    ]
    if media is not None:
        media.business_of.update(dict.fromkeys(sids, business))
    for start in range(0, len(events), 50):
        await asyncio.gather(*(enqueuer.enqueue(event) for event in events[start : start + 50]))
    return sids


def sign(url: str, params: dict[str, str], token: str = AUTH_TOKEN) -> str:
    """X-Twilio-Signature of a POST to ``url`` with ``params``, as Twilio computes it."""
    return str(RequestValidator(token).compute_signature(url, params))


async def post_like_twilio(
    session: aiohttp.ClientSession,
    url: str,
    params: dict[str, str],
    *,
    signed_url: str | None = None,
    total_s: float = 15.0,
    pause_s: float = 0.0,
) -> dict[str, Any] | None:
    """POST a status callback as Twilio does by default; the 2xx's JSON, or None: given up.

    Twilio's defaults (its connection overrides): one retry (``rc=1``), only
    when the connection cannot be made (``rp=ct``), all within ``total_s``
    (``tt``, 15 s). Any other answer, a 503 included, ends it with no retry;
    ``pause_s`` is the wait before the retry. The signature is over
    ``signed_url`` (default ``url``).
    """
    headers = {"X-Twilio-Signature": sign(signed_url or url, params)}
    deadline = asyncio.get_running_loop().time() + total_s
    for attempt in range(2):
        try:
            async with asyncio.timeout_at(deadline):
                async with session.post(url, data=params, headers=headers) as response:
                    return dict(await response.json()) if response.status < 300 else None
        except aiohttp.ClientConnectorError:
            if attempt == 0:
                await asyncio.sleep(pause_s)  # Twilio's pause before its retry
        except (aiohttp.ClientError, TimeoutError):
            return None
    return None


Span = tuple[float, float]
"""When a stand-in began and finished answering one request (``time.monotonic``)."""


@contextlib.contextmanager
def _span(spans: list[Span]) -> Iterator[None]:
    begun = time.monotonic()
    try:
        yield
    finally:
        spans.append((begun, time.monotonic()))


class _Server:
    """An aiohttp app on a free loopback port."""

    def __init__(self, app: web.Application) -> None:
        self._runner = web.AppRunner(app, access_log=None)
        self.url = ""

    async def start(self) -> None:
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"

    async def close(self) -> None:
        await self._runner.cleanup()


class MediaStandIn(_Server):
    """Twilio's recording media endpoint."""

    def __init__(self, *, not_ready: int = 1) -> None:
        app = web.Application()
        app.router.add_get("/2010-04-01/Accounts/{account}/Recordings/{name}", self._recording)
        app.router.add_delete("/2010-04-01/Accounts/{account}/Recordings/{name}", self._delete)
        super().__init__(app)
        self.not_ready = not_ready
        """How many requests of each recording get Twilio's early 404."""
        self.requests: Counter[str] = Counter()
        self.served: Counter[str] = Counter()
        self.query_of: dict[str, dict[str, str]] = {}
        """Per RecordingSid, the query string of its last media request."""
        self.unauthorized = 0
        self.status_for: dict[str, int] = {}
        self.body_for: dict[str, bytes] = {}
        self.in_flight: Counter[str] = Counter()
        self.gate: asyncio.Event | None = None
        self.delay_s = 0.0
        """Simulated transfer time of each download."""
        self.business_of: dict[str, str] = {}
        """RecordingSid to business, for the per-business figures below."""
        self.busy: Counter[str] = Counter()
        self.peak: Counter[str] = Counter()
        """Most downloads of one business in progress at once."""
        self.started: list[str] = []
        """RecordingSids in the order their downloads began."""
        self.spans: defaultdict[str, list[Span]] = defaultdict(list)
        """Per RecordingSid, each request answered (early 404s included)."""
        self.deleted: set[str] = set()
        """Recordings deleted: their media and deletes answer 404; listings leave them out."""
        self.deletes: Counter[str] = Counter()
        """Per RecordingSid, the deletes that took effect (answered 204)."""
        self.delete_requests: Counter[str] = Counter()
        self.delete_status_for: dict[str, int] = {}
        self.delete_gate: asyncio.Event | None = None
        self.delete_hold: set[str] | None = None
        """With a delete gate: the recordings whose deletes wait at it (None: all)."""
        self.delete_waiting: Counter[str] = Counter()
        self.on_delete: Callable[[str], Awaitable[None]] | None = None
        """Awaited as a delete takes effect, with its RecordingSid: a test's look at that moment."""
        self._expected = (
            "Basic " + base64.b64encode(f"{ACCOUNT_SID}:{AUTH_TOKEN}".encode()).decode()
        )
        self.rest = RestResources(
            account_sid=ACCOUNT_SID, authorization=self._expected, deleted=self.deleted
        )
        """The Recordings list and the Calls resource (see tests/twilio_rest.py)."""
        self.rest.route(app)

    async def _recording(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") != self._expected:
            self.unauthorized += 1
            return web.json_response({"code": 20003, "message": "Authenticate"}, status=401)
        sid, _, ext = request.match_info["name"].partition(".")
        if request.match_info["account"] != ACCOUNT_SID or ext != "mp3":
            return web.json_response({"code": 20404, "message": "not found"}, status=404)
        self.requests[sid] += 1
        self.query_of[sid] = dict(request.query)
        with _span(self.spans[sid]):
            return await self._answer(sid)

    async def _answer(self, sid: str) -> web.StreamResponse:
        if sid in self.deleted:
            return web.json_response({"code": 20404, "message": "not found"}, status=404)
        if sid in self.status_for:
            return web.json_response({"message": "injected"}, status=self.status_for[sid])
        if self.requests[sid] <= self.not_ready:
            return web.json_response({"code": 20404, "message": "not found"}, status=404)
        business = self.business_of.get(sid, "")
        self.in_flight[sid] += 1
        self.busy[business] += 1
        self.peak[business] = max(self.peak[business], self.busy[business])
        self.started.append(sid)
        try:
            if self.gate is not None:
                await self.gate.wait()
            if self.delay_s:
                await asyncio.sleep(self.delay_s)  # a slow transfer, not a wait for state
            self.served[sid] += 1
            return web.Response(body=self.body_for.get(sid, AUDIO), content_type="audio/mpeg")
        finally:
            self.in_flight[sid] -= 1
            self.busy[business] -= 1

    async def _delete(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") != self._expected:
            self.unauthorized += 1
            return web.json_response({"code": 20003, "message": "Authenticate"}, status=401)
        sid, _, ext = request.match_info["name"].partition(".")
        if request.match_info["account"] != ACCOUNT_SID or ext != "json":
            return web.json_response({"code": 20404, "message": "not found"}, status=404)
        self.delete_requests[sid] += 1
        return await self._take_delete(sid)

    async def _take_delete(self, sid: str) -> web.StreamResponse:
        """Twilio's answer to a delete: every recording exists (as for its media) until deleted."""
        if sid in self.delete_status_for:
            return web.json_response({"message": "injected"}, status=self.delete_status_for[sid])
        if self.delete_gate is not None and (self.delete_hold is None or sid in self.delete_hold):
            self.delete_waiting[sid] += 1
            await self.delete_gate.wait()
        if sid in self.deleted:
            return web.json_response({"code": 20404, "message": "not found"}, status=404)
        if self.on_delete is not None:
            await self.on_delete(sid)
        self.deleted.add(sid)
        self.deletes[sid] += 1
        return web.Response(status=204)


class OpenAIStandIn(_Server):
    """OpenAI's audio transcription endpoint, which hears what it is sent.

    Each upload is decoded with PyAV (``tests/audio.py``'s ``hear``) and
    recorded in ``uploads``; the transcript is the words heard, in the shape
    the ``response_format`` asks for. It refuses as OpenAI does: a body over
    25 MiB (413), a file that is not audio, a format the model does not
    produce, audio longer than the model takes, a long upload to a diarizing
    model without ``chunking_strategy`` (400s).
    """

    def __init__(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/audio/transcriptions", self._transcribe)
        super().__init__(app)
        self.calls: Counter[str] = Counter()
        """Requests per RecordingSid (the file name before its first dot)."""
        self.models: list[str] = []
        self.error_for: dict[str, tuple[int, dict[str, Any]]] = {}
        self.gate: asyncio.Event | None = None
        self.hold: set[str] | None = None
        """With a gate: the recordings held at it (None: all of them)."""
        self.hold_after = 0
        """With a gate: how many calls are answered before it holds the rest."""
        self.passed = 0
        """Calls the gate let through under ``hold_after``."""
        self.delay_s = 0.0
        """Simulated transcription time."""
        self.waiting: Counter[str] = Counter()
        self.text_for: dict[str, str] = {}
        """Transcripts to answer instead of the words heard (JSON-escaped as OpenAI's)."""
        self.spans: defaultdict[str, list[Span]] = defaultdict(list)
        """Per RecordingSid, each transcription call answered."""
        self.max_duration_s: float | None = 1400.0
        """The longest audio the gpt-4o models take (whisper-1 has only the size limit)."""
        self.uploads: list[Upload] = []
        """Every upload decoded, in arrival order, refused ones included."""
        self.errors: list[tuple[str, int, str]] = []
        """``(sid, status, body)`` of every error answered, injected ones included."""

    async def _transcribe(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {OPENAI_KEY}":
            return openai_audio.error(401, "Incorrect API key provided", code="invalid_api_key")
        form = await request.post()
        upload = form.get("file")
        if not isinstance(upload, web.FileField) or not form.get("model"):
            return openai_audio.error(400, "file and model are required", code=None)
        sid = upload.filename.partition(".")[0]
        self.calls[sid] += 1
        self.models.append(str(form["model"]))
        with _span(self.spans[sid]):
            response = await self._answer(
                openai_audio.read(sid, form, upload, request.content_length)
            )
        if response.status >= 400:
            self.errors.append((sid, response.status, response.text or ""))
        return response

    async def _answer(self, request: openai_audio.Request) -> web.Response:
        if request.sid in self.error_for:
            status, error = self.error_for[request.sid]
            return web.json_response({"error": error}, status=status)
        if request.size > openai_audio.MAX_CONTENT_BYTES:
            return openai_audio.too_large(request.size)
        if request.filename.rpartition(".")[2].lower() not in openai_audio.EXTENSIONS:
            return openai_audio.bad_extension()
        try:
            heard = await asyncio.to_thread(hear, request.file)
        except (av.FFmpegError, ValueError):
            return openai_audio.undecodable()
        refusal = self._refusal(request, heard)
        self.uploads.append(openai_audio.upload(request, heard, refusal.status if refusal else 200))
        if refusal is not None:
            return refusal
        await self._wait(request.sid)
        words = [word for _, _, word in heard.words]
        if request.sid in self.text_for or not words:
            text = self.text_for.get(request.sid, f"transcript of {request.sid}")
            timed: list[Word] = []
        else:
            text, timed = " ".join(words), heard.words
        return openai_audio.answer(
            text=text,
            words=timed,
            duration_s=heard.duration_s,
            model=request.model,
            response_format=request.response_format,
            language=request.language,
            granularities=request.granularities,
        )

    def _refusal(self, request: openai_audio.Request, heard: Heard) -> web.Response | None:
        """OpenAI's 400 for this upload, or None when it would be transcribed."""
        if request.response_format not in openai_audio.formats_of(request.model):
            return openai_audio.incompatible(request.response_format, request.model)
        limit = None if request.model.startswith("whisper") else self.max_duration_s
        if limit is not None and heard.duration_s > limit:
            return openai_audio.too_long(heard.duration_s, limit)
        diarizing = "diarize" in request.model
        if (
            diarizing
            and heard.duration_s > openai_audio.DIARIZE_UNCHUNKED_S
            and not request.chunked
        ):
            return openai_audio.unchunked()
        return None

    async def _wait(self, sid: str) -> None:
        if self.gate is not None and (self.hold is None or sid in self.hold):
            if self.passed < self.hold_after:
                self.passed += 1
            else:
                self.waiting[sid] += 1
                await self.gate.wait()
        if self.delay_s:
            await asyncio.sleep(self.delay_s)  # transcription takes time, not a wait for state


def quota_error() -> tuple[int, dict[str, Any]]:
    """OpenAI's 429 for an exhausted quota."""
    return 429, {
        "message": "You exceeded your current quota, please check your plan and billing details.",
        "type": "insufficient_quota",
        "param": None,
        "code": "insufficient_quota",
    }
