"""The webhook: verifies Twilio's RecordingStatusCallback and adds it to the stream.

A callback is answered 2xx only once its event is in Redis, and, when
configured, confirmed on N replicas (WAIT) and in the AOF (WAITAOF). Otherwise
it is answered 503 so Twilio may retry: while Redis is unreachable or refuses
the event, when the confirmation falls short, and whenever no answer came
within the deadline (well inside Twilio's 15 s). Retries and duplicate
callbacks of one recording add one entry: a Lua script checks the RecordingSid
marker and XADDs in one atomic call. Callbacks arriving together share that
call and its confirmation (each is still answered only after its own entry is
in, and an error about one of them fails that one alone).

A 503 does not mean nothing was written: a timed-out or unconfirmed enqueue
may have added the entry. Twilio's retry is then answered ``duplicate`` (once
that first add is confirmed): nothing is lost and nothing is added twice.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import hmac
import itertools
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
import structlog
from aiohttp import web
from multidict import MultiMapping
from redis.exceptions import RedisError, ResponseError
from twilio.request_validator import RequestValidator, get_signature_algorithm

from streamrec import health, lua
from streamrec.batch import Batcher
from streamrec.confirm import Unconfirmed
from streamrec.connections import on_primary
from streamrec.events import TERMINAL_STATUSES, InvalidEvent, RecordingEvent, is_business_id
from streamrec.keys import Keys
from streamrec.metrics import METRICS_KEY, Metrics, metrics_endpoint
from streamrec.partitions import Layout, as_layout, index_of
from streamrec.retry import describe
from streamrec.tally import Tally, sending

log = structlog.get_logger("streamrec.producer")

WEBHOOK_PATH = "/twilio/recording"


@dataclass(frozen=True, slots=True)
class WebhookConfig:
    """What the webhook needs to verify and route a callback."""

    account_sid: str
    auth_token: str
    public_url: str
    keys: Keys | Layout
    """The namespace's keys, or its partitions: a callback goes to its business's."""
    dedupe_ttl_s: int = 7 * 24 * 3600
    max_body_bytes: int = 64 * 1024
    deadline_ms: int = 5_000
    """The enqueue's answer, WAIT included, comes within this; past it, 503."""
    replica_acks: int = 0
    """Replicas that must acknowledge an entry (WAIT) before its 2xx."""
    wait_aof: bool = False
    """Also require the primary's AOF fsync (WAITAOF 1 0; Redis 7.2 or later)."""


ReadinessCheck = Callable[[], Awaitable[None]]
"""Raises when a dependency is not usable; named in /readyz's answer."""

CONFIG_KEY: web.AppKey[WebhookConfig] = web.AppKey("config", WebhookConfig)
VALIDATOR_KEY: web.AppKey[RequestValidator] = web.AppKey("validator", RequestValidator)
CHECKS_KEY: web.AppKey[dict[str, ReadinessCheck]] = web.AppKey("checks", dict)


SCRIPT = "producer_enqueue_once"

WAIT_SHARE = 0.8
"""Of the deadline, what WAIT and WAITAOF may block for (together); the rest is the round trip."""


Submitted = tuple[RecordingEvent, float]
"""An event to enqueue and the loop time by which its caller must have an answer."""


class Enqueuer:
    """Adds recording events to the stream, once per RecordingSid, answering within a deadline.

    An event goes to the stream of its business's partition, where its
    RecordingSid's marker lives too. Callbacks of one partition arriving
    together share one script call. With ``replica_acks``
    (WAIT) or ``wait_aof`` (WAITAOF 1 0), the call and its confirmation go out
    on one connection, the one whose writes they count: one confirmation per
    batch, not per event.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys | Layout,
        *,
        dedupe_ttl_s: int,
        deadline_ms: int = 5_000,
        replica_acks: int = 0,
        wait_aof: bool = False,
    ) -> None:
        self._redis = redis
        self._layout = as_layout(keys)
        self._ttl = dedupe_ttl_s
        self._deadline_s = deadline_ms / 1000
        self._acks = replica_acks
        self._aof = wait_aof
        self._confirms = bool(replica_acks) or wait_aof
        waits = bool(replica_acks) + wait_aof
        # 0 would make WAIT block for ever.
        self._wait_ms = max(int(deadline_ms * WAIT_SHARE) // max(waits, 1), 1)
        self._script = lua.register(redis, SCRIPT)
        self._batches: list[Batcher[Submitted, tuple[bool, str]]] = [
            Batcher(functools.partial(self._enqueue, part)) for part in self._layout
        ]

    async def enqueue(self, event: RecordingEvent) -> tuple[bool, str]:
        """Add the event unless its recording was seen; returns (added, entry id).

        Raises RedisError when Redis is unreachable or refuses the event (its
        marker holds another type, Redis is out of memory): then nothing of
        this event was written, and events sharing its call are unaffected.
        Raises Unconfirmed when its batch was written but not confirmed on the
        replicas (or AOF) asked for, and TimeoutError when no answer came
        within the deadline: in both cases the event may be in Redis (now or
        once the call completes), so a repeat is answered as a duplicate,
        confirmed like a new one.
        """
        partition = index_of(event.business_id, self._layout.count)
        deadline = asyncio.get_running_loop().time() + self._deadline_s
        return await self._batches[partition].submit((event, deadline))

    async def _enqueue(
        self, part: Keys, batch: list[Submitted]
    ) -> list[tuple[bool, str] | Exception]:
        events = [event for event, _ in batch]
        keys, args = _enqueue_input(part, self._ttl, events, rewrite=self._confirms)
        # The batch ends by the first deadline among its events: each caller has its
        # answer (TimeoutError at worst) within its own deadline, the batch in flight
        # before it having ended by an earlier one. One timer per batch, not per event.
        async with asyncio.timeout_at(min(deadline for _, deadline in batch)):
            if self._confirms:
                flat, missing = await self._confirmed(keys, args)
            else:
                flat, missing = await self._script(keys, args), None
        return [_outcome(int(flat[i]), str(flat[i + 1]), missing) for i in range(0, len(flat), 2)]

    async def _confirmed(self, keys: list[str], args: list[str]) -> tuple[list[Any], str | None]:
        """The script's reply, and what of the confirmation asked for was missing (None: all).

        A pipeline holds one connection for the script and the waits: WAIT and
        WAITAOF count the writes of the connection they are sent on. A retried
        pipeline runs on a new connection; the script's marker rewrite makes
        its waits cover what the lost attempt wrote.
        """
        flat, *confirmations = await self._pipeline(keys, args)
        missing = []
        if self._acks and (acked := int(confirmations.pop(0))) < self._acks:
            missing.append(f"{acked} of {self._acks} replicas acknowledged")
        if self._aof and int(confirmations[0][0]) < 1:
            missing.append("the AOF was not fsynced")
        return flat, ("; ".join(missing) + f" within {self._wait_ms} ms") if missing else None

    async def _pipeline(self, keys: list[str], args: list[str]) -> list[Any]:
        """The script, then WAIT and/or WAITAOF, in one round trip on one connection.

        EVAL with the source, not the script object: in a pipeline that one
        asks SCRIPT EXISTS first, a round trip per batch, and EVALSHA would
        fail on a server that has not seen the script (a new primary after a
        failover) after its WAIT had blocked. Redis caches the compiled script.
        On a cluster the pipeline goes to the partition's primary directly: the
        cluster client would send WAIT to another node, whose answer confirms
        nothing of this write.
        """
        return await on_primary(self._redis, keys[0], lambda r: self._confirm_on(r, keys, args))

    async def _confirm_on(
        self, redis: aioredis.Redis, keys: list[str], args: list[str]
    ) -> list[Any]:
        async with redis.pipeline(transaction=False) as pipe:
            pipe.eval(lua.source(SCRIPT), len(keys), *keys, *args)
            if self._acks:
                pipe.wait(self._acks, self._wait_ms)
            if self._aof:
                pipe.waitaof(1, 0, self._wait_ms)
            return list(await pipe.execute())


def _outcome(code: int, value: str, missing: str | None) -> tuple[bool, str] | Exception:
    """One event's part of the script's reply: (added, entry id), or why it failed."""
    if code < 0:
        return ResponseError(value)
    if missing is not None:
        return Unconfirmed(f"entry {value} written, not confirmed: {missing}")
    return code == 1, value


def _enqueue_input(
    keys: Keys, ttl_s: int, events: list[RecordingEvent], *, rewrite: bool
) -> tuple[list[str], list[str]]:
    """KEYS and ARGV of producer_enqueue_once.lua (see its header) for a batch of events.

    ``rewrite``: rewrite the markers of events already seen, so that a WAIT
    after the call covers their first add.
    """
    return (
        [keys.stream, *(keys.seen(e.recording_sid) for e in events)],
        [str(ttl_s), "1" if rewrite else "0", *(json.dumps(e.field_list()) for e in events)],
    )


ENQUEUER_KEY: web.AppKey[Enqueuer] = web.AppKey("enqueuer", Enqueuer)
TALLY_KEY: web.AppKey[Tally] = web.AppKey("tally", Tally)


def create_app(
    redis: aioredis.Redis,
    config: WebhookConfig,
    *,
    metrics: Metrics | None = None,
    checks: dict[str, ReadinessCheck] | None = None,
    tally_every_s: float = 5.0,
) -> web.Application:
    """The webhook app, using ``redis`` (owned by the caller).

    ``checks`` are the dependencies /readyz reports besides Redis (PostgreSQL
    in ``serve``); with ``replica_acks``, /readyz also names too few replicas.
    Its answers are counted into the outcome slots every ``tally_every_s``
    (``streamrec.tally``) while it runs.
    """
    app = web.Application(client_max_size=config.max_body_bytes)
    app[CONFIG_KEY] = config
    app[VALIDATOR_KEY] = RequestValidator(config.auth_token)
    app[ENQUEUER_KEY] = Enqueuer(
        redis,
        config.keys,
        dedupe_ttl_s=config.dedupe_ttl_s,
        deadline_ms=config.deadline_ms,
        replica_acks=config.replica_acks,
        wait_aof=config.wait_aof,
    )
    app[METRICS_KEY] = metrics or Metrics()
    app[TALLY_KEY] = Tally(redis, as_layout(config.keys).home, every_s=tally_every_s)
    app.cleanup_ctx.append(lambda app: sending(app[TALLY_KEY]))
    app[CHECKS_KEY] = {"redis": lambda: _ping(redis), **(checks or {})}
    if config.replica_acks:
        app[CHECKS_KEY]["replicas"] = lambda: health.require_replicas(redis, config.replica_acks)
    app.router.add_post(WEBHOOK_PATH, recording_callback)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_endpoint)
    return app


async def healthz(request: web.Request) -> web.Response:
    """200 while the process runs."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """200 when every dependency answers within 2 s, else 503 naming the failures.

    The answer says only which check failed (``failed``, ``timeout``): the port is
    public, and an error's text can carry user names and internal addresses. The
    error itself is logged (``readiness_check_failed``).
    """
    results: dict[str, str] = {}
    for name, check in request.app[CHECKS_KEY].items():
        try:
            await asyncio.wait_for(check(), 2.0)
            results[name] = "ok"
        except TimeoutError:
            results[name] = "timeout"
            log.warning("readiness_check_failed", check=name, error="no answer within 2 s")
        except Exception as exc:
            results[name] = "failed"
            log.warning("readiness_check_failed", check=name, error=describe(exc))
    ready = all(value == "ok" for value in results.values())
    return web.json_response(
        {"status": "ready" if ready else "not ready", "checks": results},
        status=200 if ready else 503,
    )


async def _ping(redis: aioredis.Redis) -> None:
    await redis.ping()


REJECTED = {400: "invalid", 403: "forbidden", 413: "too_large"}


Answer = tuple[str, web.Response]
"""A response and its outcome, the label of the webhook counter."""


def _answer(outcome: str, body: dict[str, str], status: int = 200, **headers: str) -> Answer:
    return outcome, web.json_response(body, status=status, headers=headers or None)


def _reject(status: int, reason: str, **context: str) -> Answer:
    log.warning("webhook_rejected", status=status, reason=reason, **context)
    return _answer(REJECTED[status], {"error": reason}, status)


async def recording_callback(request: web.Request) -> web.Response:
    """POST /twilio/recording?business_id=...: verify, validate, enqueue."""
    outcome, response = await _callback(request)
    request.app[METRICS_KEY].webhook(outcome)
    request.app[TALLY_KEY].count("rejected" if 400 <= response.status < 500 else outcome)
    return response


async def _callback(request: web.Request) -> Answer:
    config = request.app[CONFIG_KEY]
    if request.content_length is not None and request.content_length > config.max_body_bytes:
        return _reject(413, "body too large")
    try:
        form = await request.post()
    except web.HTTPRequestEntityTooLarge:
        return _reject(413, "body too large")
    params = {key: str(value) for key, value in form.items()}
    refusal = _verify(request, form, params, config)
    if refusal is not None:
        return refusal
    status = params.get("RecordingStatus", "")
    if status and status not in TERMINAL_STATUSES:
        log.info(
            "webhook_ignored", recording_status=status, recording_sid=params.get("RecordingSid")
        )
        return _answer("ignored", {"status": "ignored", "recording_status": status})
    try:
        event = _event(params, request.query.get("business_id", ""))
    except InvalidEvent as exc:
        return _reject(400, str(exc))
    return await _enqueue(request.app[ENQUEUER_KEY], event)


def _verify(
    request: web.Request, form: Any, params: dict[str, str], config: WebhookConfig
) -> Answer | None:
    """403 unless the signature verifies over the public URL and the account is ours."""
    url = config.public_url + request.path_qs
    signature = request.headers.get("X-Twilio-Signature", "")
    if not signature or not _signed(request.app[VALIDATOR_KEY], url, form, signature, request):
        return _reject(403, "signature does not verify")
    if params.get("AccountSid") != config.account_sid:
        return _reject(403, "AccountSid is not this account's")
    return None


def _signed(
    validator: RequestValidator, url: str, form: Any, signature: str, request: web.Request
) -> bool:
    """Twilio's signature over the URL as configured; else the validator's full check.

    The first, one HMAC, is what Twilio sends for a URL with no explicit port;
    the full check also tries the URL with and without its port and honours a
    SHA-256 signature setting.
    """
    expected = sha1_signature(validator.token, url, form)
    if hmac.compare_digest(expected.encode(), signature.encode()):
        return True
    settings = request.headers.get("X-Twilio-Webhooks-Signature-Settings")
    return bool(validator.validate(url, form, signature, get_signature_algorithm(settings)))


def sha1_signature(token: bytes, url: str, form: MultiMapping[str]) -> str:
    """What ``RequestValidator(token).compute_signature(url, form)`` gives (HMAC-SHA1): the
    URL, then each name and value, names sorted, each name's distinct values sorted, signed
    and base64-encoded. The distinct (name, value) pairs, sorted, are exactly that order;
    one join instead of a string grown per field: a third of the cost on the webhook's
    path, compared with the validator on a generated corpus in the tests."""
    signed = "".join(itertools.chain.from_iterable(sorted(set(form.items()))))
    digest = hmac.new(token, (url + signed).encode("utf-8"), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


def _event(params: dict[str, str], business_id: str) -> RecordingEvent:
    """The event a verified callback describes; InvalidEvent names what is wrong."""
    if not is_business_id(business_id):
        raise InvalidEvent("business_id query parameter is missing or malformed")
    if not params.get("RecordingStatus"):
        raise InvalidEvent("RecordingStatus is missing")
    return RecordingEvent.create(
        recording_sid=params.get("RecordingSid", ""),
        call_sid=params.get("CallSid", ""),
        account_sid=params["AccountSid"],
        business_id=business_id,
        status=params["RecordingStatus"],
        duration_s=params.get("RecordingDuration", ""),
        channels=params.get("RecordingChannels", ""),
        source=params.get("RecordingSource", ""),
    )


async def _enqueue(enqueuer: Enqueuer, event: RecordingEvent) -> Answer:
    context = {"recording_sid": event.recording_sid, "business_id": event.business_id}
    try:
        added, entry_id = await enqueuer.enqueue(event)
    except TimeoutError:  # before OSError, its base class
        log.error("webhook_enqueue_timed_out", **context)
        return _unavailable("timeout", "queue did not answer in time, retry later")
    except Unconfirmed as exc:
        log.error("webhook_enqueue_unconfirmed", error=str(exc), **context)
        return _unavailable("unconfirmed", "queue replicas did not confirm, retry later")
    except (RedisError, OSError) as exc:
        log.error("webhook_enqueue_failed", error=str(exc), **context)
        return _unavailable("unavailable", "queue unavailable, retry later")
    log.info(
        "webhook_enqueued" if added else "webhook_duplicate",
        entry_id=entry_id,
        recording_status=event.status,
        call_sid=event.call_sid,
        **context,
    )
    outcome = "queued" if added else "duplicate"
    # What json_response would send, less its encoder: a stream id is digits and a dash.
    body = f'{{"status": "{outcome}", "entry_id": "{entry_id}"}}'.encode()
    return outcome, web.Response(body=body, content_type="application/json", charset="utf-8")


def _unavailable(outcome: str, reason: str) -> Answer:
    """503 with Retry-After: Twilio may retry (see the README on its retry policy)."""
    return _answer(outcome, {"error": reason}, 503, **{"Retry-After": "5"})
