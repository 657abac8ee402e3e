"""The webhook: signature, validation, dedupe and durability before 2xx."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient, TestServer
from multidict import MultiDict, MultiDictProxy
from redis.exceptions import ResponseError
from twilio.request_validator import RequestValidator, get_signature_algorithm

from streamrec import service
from streamrec.devservers import LocalRedis
from streamrec.events import RecordingEvent
from streamrec.keys import Keys
from streamrec.producer import WEBHOOK_PATH, Enqueuer, WebhookConfig, create_app
from tests.conftest import wait_for
from tests.standins import ACCOUNT_SID, AUTH_TOKEN, call_sid, callback_params, sign
from tests.test_events import BAD_BUSINESS_IDS

Client = TestClient[web.Request, web.Application]

PUBLIC_URL = "https://hooks.example.com"
PATH = WEBHOOK_PATH + "?business_id=42"
OTHER_SID = "RE" + "f" * 32

# Twilio's published signature example (token 12345), also in twilio-python's test suite.
VECTOR_TOKEN = "12345"
VECTOR_URL = "https://mycompany.com/myapp.php?foo=1&bar=2"


def vector_params(caller: str) -> dict[str, str]:
    """The form fields of Twilio's example request, from ``caller``."""
    return {
        "CallSid": "CA1234567890ABCDE",
        "Caller": caller,
        "Digits": "1234",
        "From": caller,
        "To": "+18005551212",
    }


def twilio_signature(token: str, url: str, params: Mapping[str, str]) -> str:
    """Twilio's algorithm written out: base64 HMAC-SHA1 of the URL then sorted name+value pairs."""
    payload = url + "".join(name + params[name] for name in sorted(params))
    return base64.b64encode(
        hmac.new(token.encode(), payload.encode(), hashlib.sha1).digest()
    ).decode()


def webhook_config(keys: Keys, **overrides: Any) -> WebhookConfig:
    """This test's webhook configuration, with ``overrides``."""
    values: dict[str, Any] = {
        "account_sid": ACCOUNT_SID,
        "auth_token": AUTH_TOKEN,
        "public_url": PUBLIC_URL,
        "keys": keys,
    }
    return WebhookConfig(**(values | overrides))


@asynccontextmanager
async def serving(redis: aioredis.Redis, config: WebhookConfig) -> AsyncIterator[Client]:
    """A test client of the webhook app built with ``redis`` and ``config``."""
    async with TestClient(TestServer(create_app(redis, config))) as test_client:
        yield test_client


@pytest_asyncio.fixture(loop_scope="session")
async def client(redis: aioredis.Redis, keys: Keys) -> AsyncIterator[Client]:
    """The webhook app on this test's keys, with the default limits."""
    async with serving(redis, webhook_config(keys)) as test_client:
        yield test_client


async def post(
    client: Client,
    params: Mapping[str, str],
    *,
    path: str = PATH,
    signature: str | None = None,
) -> ClientResponse:
    """POST ``params`` to ``path``, signed for PUBLIC_URL + path unless ``signature`` is given."""
    if signature is None:
        signature = sign(PUBLIC_URL + path, dict(params))
    headers = {"X-Twilio-Signature": signature}
    return await client.post(path, data=dict(params), headers=headers)


async def entries(redis: aioredis.Redis, keys: Keys) -> list[dict[str, str]]:
    """The fields of every entry of this test's stream, oldest first."""
    rows = await redis.xrange(keys.stream) or []
    found = []
    for _, fields in rows:
        assert fields is not None
        assert all(isinstance(v, str) for v in (*fields, *fields.values()))
        found.append({str(name): str(value) for name, value in fields.items()})
    return found


async def namespace_keys(redis: aioredis.Redis, keys: Keys) -> list[str]:
    """Every Redis key of this test's namespace (stream, markers, anything) but the
    counts of the webhook's answers (``streamrec.tally``), which a refusal adds to."""
    counts = (keys.outcomes, keys.outcome_slots, keys.tally(""))
    return [
        str(key)
        async for key in redis.scan_iter(match=f"{{{keys.namespace}}}:*")
        if not str(key).startswith(counts)
    ]


async def error_of(response: ClientResponse) -> str:
    """The ``error`` reason of a JSON refusal."""
    body = await response.json()
    assert isinstance(body, dict)
    return str(body["error"])


async def test_signed_callback_is_enqueued_once(
    client: Client, redis: aioredis.Redis, keys: Keys
) -> None:
    """A signed completed callback is answered 200 and adds one readable entry."""
    params = callback_params()
    response = await post(client, params)
    assert response.status == 200
    found = await entries(redis, keys)
    assert len(found) == 1
    fields = found[0]
    assert fields["v"] == "1"
    assert fields["recording_sid"] == params["RecordingSid"]
    assert fields["call_sid"] == params["CallSid"]
    assert fields["account_sid"] == ACCOUNT_SID
    assert fields["business_id"] == "42"
    assert fields["status"] == "completed"
    assert fields["duration_s"] == "42"
    assert await redis.xlen(keys.stream) == 1


async def test_unsigned_callback_is_refused(
    client: Client, redis: aioredis.Redis, keys: Keys
) -> None:
    """A callback without X-Twilio-Signature is refused 403 and writes nothing."""
    response = await client.post(PATH, data=callback_params())
    assert response.status == 403
    assert await namespace_keys(redis, keys) == []


@pytest.mark.parametrize(
    ("signed_url", "token", "posted_path", "tamper"),
    [
        pytest.param(PUBLIC_URL + PATH, "", PATH, {}, id="empty-signature"),
        pytest.param(PUBLIC_URL + PATH, "not-our-token", PATH, {}, id="wrong-token"),
        pytest.param(
            PUBLIC_URL + PATH, AUTH_TOKEN, PATH, {"RecordingDuration": "43"}, id="tampered-param"
        ),
        pytest.param(
            PUBLIC_URL + PATH, AUTH_TOKEN, PATH, {"RecordingSid": OTHER_SID}, id="tampered-sid"
        ),
        pytest.param(PUBLIC_URL + PATH, AUTH_TOKEN, PATH, {"Extra": "1"}, id="added-param"),
        pytest.param(
            PUBLIC_URL + PATH,
            AUTH_TOKEN,
            WEBHOOK_PATH + "?business_id=43",
            {},
            id="tampered-business-id",
        ),
        pytest.param("https://other.example.com" + PATH, AUTH_TOKEN, PATH, {}, id="other-host"),
        pytest.param(
            PUBLIC_URL + "/twilio/other?business_id=42", AUTH_TOKEN, PATH, {}, id="other-path"
        ),
        pytest.param("http://hooks.example.com" + PATH, AUTH_TOKEN, PATH, {}, id="other-scheme"),
    ],
)
async def test_signature_that_does_not_verify_is_refused(
    client: Client,
    redis: aioredis.Redis,
    keys: Keys,
    signed_url: str,
    token: str,
    posted_path: str,
    tamper: dict[str, str],
) -> None:
    """A callback whose signature does not verify for its URL and form is refused 403."""
    params = callback_params()
    signature = sign(signed_url, params, token) if token else ""
    response = await post(client, params | tamper, path=posted_path, signature=signature)
    assert response.status == 403
    assert "signature" in await error_of(response)
    assert await namespace_keys(redis, keys) == []


async def test_callback_of_another_account_is_refused(
    client: Client, redis: aioredis.Redis, keys: Keys
) -> None:
    """A callback signed with our token but naming another AccountSid is refused 403."""
    params = callback_params(account_sid="AC" + "f" * 32)
    response = await post(client, params)
    assert response.status == 403
    assert "AccountSid" in await error_of(response)
    assert await namespace_keys(redis, keys) == []


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        pytest.param({"RecordingSid": "CA" + "a" * 32}, "RecordingSid", id="sid-prefix"),
        pytest.param({"RecordingSid": "RE" + "a" * 31}, "RecordingSid", id="sid-short"),
        pytest.param({"RecordingSid": "RE" + "a" * 33}, "RecordingSid", id="sid-long"),
        pytest.param({"RecordingSid": "RE" + "g" * 32}, "RecordingSid", id="sid-not-hex"),
        pytest.param({"RecordingSid": None}, "RecordingSid", id="sid-missing"),
        pytest.param({"CallSid": "RE" + "a" * 32}, "CallSid", id="call-prefix"),
        pytest.param({"CallSid": "CA" + "a" * 31}, "CallSid", id="call-short"),
        pytest.param({"CallSid": "CA" + "a" * 33}, "CallSid", id="call-long"),
        pytest.param({"CallSid": "CA" + "z" * 32}, "CallSid", id="call-not-hex"),
        pytest.param({"CallSid": None}, "CallSid", id="call-missing"),
        pytest.param({"RecordingStatus": None}, "RecordingStatus", id="status-missing"),
        pytest.param({"RecordingDuration": "forty"}, "RecordingDuration", id="duration-bad"),
        pytest.param({"RecordingDuration": "²"}, "RecordingDuration", id="duration-superscript"),
    ],
)
async def test_malformed_callback_is_refused_with_reason(
    client: Client,
    redis: aioredis.Redis,
    keys: Keys,
    changes: dict[str, str | None],
    named: str,
) -> None:
    """A signed callback with a missing or malformed field is refused 400 naming the field."""
    params = callback_params()
    for name, value in changes.items():
        if value is None:
            del params[name]
        else:
            params[name] = value
    response = await post(client, params)
    assert response.status == 400
    assert named in await error_of(response)
    assert await namespace_keys(redis, keys) == []


@pytest.mark.parametrize(
    "path",
    [
        pytest.param(WEBHOOK_PATH, id="missing"),
        *(
            pytest.param(f"{WEBHOOK_PATH}?business_id={quote(b, safe='/')}", id=repr(b)[:12])
            for b in BAD_BUSINESS_IDS
        ),
    ],
)
async def test_missing_or_malformed_business_id_is_refused(
    client: Client, redis: aioredis.Redis, keys: Keys, path: str
) -> None:
    """A signed callback whose business_id query parameter is missing or malformed gets 400."""
    response = await post(client, callback_params(), path=path)
    assert response.status == 400
    assert "business_id" in await error_of(response)
    assert await namespace_keys(redis, keys) == []


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_body_over_the_limit_is_refused(
    redis: aioredis.Redis, keys: Keys, chunked: bool
) -> None:
    """A body larger than max_body_bytes is refused 413, with or without Content-Length."""
    params = callback_params() | {"Padding": "x" * 4096}
    body = urlencode(params).encode()
    headers = {
        "X-Twilio-Signature": sign(PUBLIC_URL + PATH, params),
        "Content-Type": "application/x-www-form-urlencoded",
    }

    async def stream() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 1024):
            yield body[start : start + 1024]

    async with serving(redis, webhook_config(keys, max_body_bytes=2048)) as small:
        response = await small.post(PATH, data=stream() if chunked else body, headers=headers)
        assert response.status == 413
    assert await namespace_keys(redis, keys) == []


async def test_repeated_callback_adds_one_entry(
    client: Client, redis: aioredis.Redis, keys: Keys
) -> None:
    """The same callback posted three times gets 2xx each time and adds one entry."""
    params = callback_params()
    answers = []
    for _ in range(3):
        response = await post(client, params)
        assert 200 <= response.status < 300
        answers.append(await response.json())
    found = await entries(redis, keys)
    assert [f["recording_sid"] for f in found] == [params["RecordingSid"]]
    assert [a["status"] for a in answers] == ["queued", "duplicate", "duplicate"]
    assert len({a["entry_id"] for a in answers}) == 1
    ttl = await redis.ttl(keys.seen(params["RecordingSid"]))
    assert 0 < ttl <= webhook_config(keys).dedupe_ttl_s


async def test_in_progress_callback_is_acknowledged_not_enqueued(
    client: Client, redis: aioredis.Redis, keys: Keys
) -> None:
    """A RecordingStatus=in-progress callback is answered 2xx and enqueues nothing."""
    response = await post(client, callback_params(status="in-progress"))
    assert 200 <= response.status < 300
    assert await namespace_keys(redis, keys) == []


@pytest.mark.parametrize("status", ["absent", "failed"])
async def test_absent_and_failed_callbacks_are_enqueued(
    client: Client, redis: aioredis.Redis, keys: Keys, status: str
) -> None:
    """absent and failed are terminal: enqueued so the consumer records them."""
    params = callback_params(status=status)
    response = await post(client, params)
    assert response.status == 200
    found = await entries(redis, keys)
    assert [(f["recording_sid"], f["status"]) for f in found] == [(params["RecordingSid"], status)]


async def test_recording_url_is_not_copied_into_the_stream(
    client: Client, redis: aioredis.Redis, keys: Keys
) -> None:
    """A RecordingUrl pointing elsewhere never reaches the stream; no field holds a URL."""
    params = callback_params() | {"RecordingUrl": "https://attacker.example.net/evil.mp3"}
    response = await post(client, params)
    assert response.status == 200
    (fields,) = await entries(redis, keys)
    assert not any("url" in name.lower() for name in fields)
    assert not any("://" in value or "attacker" in value for value in fields.values())


async def test_redis_down_answers_503_then_enqueues_after_restart(
    tmp_path: Path, keys: Keys
) -> None:
    """With Redis stopped the webhook answers 503 + Retry-After; once restarted, 200."""
    server = LocalRedis(tmp_path / "redis").start()
    try:
        redis = aioredis.Redis.from_url(server.url, decode_responses=True, socket_connect_timeout=5)
        try:
            async with serving(redis, webhook_config(keys)) as client:
                response = await post(client, callback_params())
                assert response.status == 200  # the pool holds a live connection now
                await asyncio.to_thread(server.stop)

                params = callback_params()
                response = await post(client, params)
                assert response.status == 503
                assert int(response.headers["Retry-After"]) > 0
                assert "error" in await response.json()

                await asyncio.to_thread(server.start)
                response = await post(client, params)
                assert response.status == 200
                assert (await response.json())["status"] == "queued"
                found = await entries(redis, keys)
                assert params["RecordingSid"] in [f["recording_sid"] for f in found]
        finally:
            await redis.aclose()
    finally:
        server.stop()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[LocalRedis]:
    """A redis-server of this test's own, to pause, stop and start again."""
    server = LocalRedis(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.stop()


async def test_a_paused_redis_is_answered_503_within_the_deadline(
    own_redis: LocalRedis, keys: Keys
) -> None:
    """With Redis paused (SIGSTOP) callbacks get 503 by the deadline; once resumed, each once."""
    deadline_ms = 1_000
    bound = deadline_ms / 1000 + 1.0
    redis = service.redis_client(own_redis.url)  # the real client: socket timeout 12 s, retries
    try:
        async with serving(redis, webhook_config(keys, deadline_ms=deadline_ms)) as client:
            assert (await post(client, callback_params())).status == 200
            callbacks = [callback_params() for _ in range(10)]
            own_redis.pause()
            try:
                started = asyncio.get_running_loop().time()
                async with asyncio.timeout(bound):
                    answers = await asyncio.gather(*(post(client, c) for c in callbacks))
                elapsed = asyncio.get_running_loop().time() - started
            finally:
                own_redis.resume()
            assert elapsed < bound
            assert [a.status for a in answers] == [503] * 10
            assert all(int(a.headers["Retry-After"]) > 0 for a in answers)
            assert "in time" in await error_of(answers[0])

            # A timed-out enqueue may still have been written: the repeat is then a duplicate.
            again = await asyncio.gather(*(post(client, c) for c in callbacks))
            assert [a.status for a in again] == [200] * 10
            sids = [f["recording_sid"] for f in await entries(redis, keys)]
            assert len(sids) == 11
            assert {c["RecordingSid"] for c in callbacks} <= set(sids)
    finally:
        await redis.aclose()


async def test_a_callback_queued_behind_a_stuck_call_is_answered_by_its_own_deadline(
    own_redis: LocalRedis, keys: Keys
) -> None:
    """Redis paused: a callback arriving while another's enqueue call hangs waits for that
    call to end (by the first one's deadline), then is answered 503 by its own deadline,
    not by a deadline counted from when its own call went out."""
    deadline_s, margin_s = 2.0, 0.5
    redis = service.redis_client(own_redis.url)
    try:
        config = webhook_config(keys, deadline_ms=int(deadline_s * 1000))
        async with serving(redis, config) as client:
            assert (await post(client, callback_params())).status == 200
            loop = asyncio.get_running_loop()
            own_redis.pause()
            try:

                async def timed() -> tuple[int, float]:
                    started = loop.time()
                    answer = await post(client, callback_params())
                    return answer.status, loop.time() - started

                first = asyncio.create_task(timed())
                # Its script call sits unread in the paused server's socket; the next one
                # must wait for that call to end.
                await wait_for(lambda: unread_bytes(own_redis.port) > 0, what="a stuck call")
                second = asyncio.create_task(timed())
                answers = await asyncio.wait_for(asyncio.gather(first, second), 3 * deadline_s)
            finally:
                own_redis.resume()
            for status, elapsed in answers:
                assert status == 503
                assert elapsed < deadline_s + margin_s
    finally:
        await redis.aclose()


def unread_bytes(port: int) -> int:
    """Bytes clients sent to the server on ``port`` that it has not read yet (the receive
    queues of its established IPv4 connections, from /proc/net/tcp)."""
    unread = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port, state = int(fields[1].rpartition(":")[2], 16), fields[3]
        if local_port == port and state == "01":
            unread += int(fields[4].partition(":")[2], 16)
    return unread


async def test_a_marker_of_the_wrong_type_answers_503_and_adds_nothing(
    client: Client, redis: aioredis.Redis, keys: Keys
) -> None:
    """A WRONGTYPE from the enqueue call gets 503 + Retry-After and adds nothing to the stream."""
    params = callback_params()
    marker = keys.seen(params["RecordingSid"])
    await redis.rpush(marker, "not a marker")
    response = await post(client, params)
    assert response.status == 503
    assert int(response.headers["Retry-After"]) > 0
    assert "error" in await response.json()
    assert await redis.xlen(keys.stream) == 0
    assert await redis.lrange(marker, 0, -1) == ["not a marker"]


async def test_out_of_memory_answers_503_and_adds_nothing(tmp_path: Path, keys: Keys) -> None:
    """An OOM refusal of the enqueue call gets 503 + Retry-After, adds nothing; 200 once freed."""
    server = LocalRedis(tmp_path / "redis").start()
    try:
        redis = aioredis.Redis.from_url(server.url, decode_responses=True)
        try:
            async with serving(redis, webhook_config(keys)) as client:
                await redis.config_set("maxmemory", "1")  # every write is over the limit
                params = callback_params()
                response = await post(client, params)
                assert response.status == 503
                assert int(response.headers["Retry-After"]) > 0
                assert await namespace_keys(redis, keys) == []

                await redis.config_set("maxmemory", "0")
                response = await post(client, params)
                assert (response.status, (await response.json())["status"]) == (200, "queued")
                assert await redis.xlen(keys.stream) == 1
        finally:
            await redis.aclose()
    finally:
        server.stop()


async def test_an_event_redis_refuses_fails_alone_in_its_call(
    redis: aioredis.Redis, keys: Keys
) -> None:
    """Events sharing a call with a refused one are added and answered; the refused adds nothing."""
    enqueuer = Enqueuer(redis, keys, dedupe_ttl_s=60)
    before, refused, after = (_event_of(callback_params()) for _ in range(3))
    await redis.rpush(keys.seen(refused.recording_sid), "not a marker")
    first, error, last = await asyncio.gather(
        *(enqueuer.enqueue(e) for e in (before, refused, after)), return_exceptions=True
    )
    assert isinstance(error, ResponseError)
    assert "WRONGTYPE" in str(error)
    assert not isinstance(first, BaseException)
    assert not isinstance(last, BaseException)
    assert (first[0], last[0]) == (True, True)
    assert [i for i, _ in await redis.xrange(keys.stream) or []] == [first[1], last[1]]


@pytest.mark.parametrize(
    ("caller", "expected"),
    [
        ("+14158675309", "RSOYDt4T1cUTdK1PDd93/VVr8B8="),
        ("+12349013030", "0/KCTR6DLpKmkAf8muzZqo1nDgQ="),
    ],
)
def test_twilio_published_vectors_verify(caller: str, expected: str) -> None:
    """Twilio's published vectors verify with RequestValidator called as the webhook calls it."""
    params = vector_params(caller)
    form = MultiDictProxy(MultiDict(params))  # request.post() hands the validator this type
    validator = RequestValidator(VECTOR_TOKEN)
    algorithm = get_signature_algorithm(None)  # no X-Twilio-Webhooks-Signature-Settings header
    assert twilio_signature(VECTOR_TOKEN, VECTOR_URL, params) == expected
    assert validator.compute_signature(VECTOR_URL, form, algorithm) == expected
    assert validator.validate(VECTOR_URL, form, expected, algorithm)
    changed = MultiDictProxy(MultiDict(params | {"Digits": "4321"}))
    assert not validator.validate(VECTOR_URL, changed, expected, algorithm)
    assert not validator.validate(VECTOR_URL + "&baz=3", form, expected, algorithm)


async def test_app_accepts_request_signed_by_twilio_algorithm(
    redis: aioredis.Redis, keys: Keys
) -> None:
    """A request signed as in Twilio's example (token 12345, query) is accepted end to end."""
    public_url = "https://mycompany.com"
    path = WEBHOOK_PATH + "?foo=1&bar=2&business_id=42"
    params = callback_params() | vector_params("+14158675309") | {"CallSid": call_sid()}
    signature = twilio_signature(VECTOR_TOKEN, public_url + path, params)
    config = webhook_config(keys, auth_token=VECTOR_TOKEN, public_url=public_url)
    async with serving(redis, config) as client:
        response = await client.post(path, data=params, headers={"X-Twilio-Signature": signature})
        assert response.status == 200, await response.text()
        tampered = params | {"From": "+12349013030"}
        response = await client.post(path, data=tampered, headers={"X-Twilio-Signature": signature})
        assert response.status == 403
    found = await entries(redis, keys)
    assert [(f["recording_sid"], f["business_id"]) for f in found] == [
        (params["RecordingSid"], "42")
    ]


async def test_healthz(client: Client) -> None:
    """GET /healthz answers 200 while the process runs."""
    response = await client.get("/healthz")
    assert response.status == 200
    assert json.loads(await response.text()) == {"status": "ok"}


async def test_callbacks_arriving_together_share_one_call_and_still_dedupe(
    redis: aioredis.Redis, keys: Keys
) -> None:
    """Concurrent enqueues of one recording and of others: one entry per recording."""
    enqueuer = Enqueuer(redis, keys, dedupe_ttl_s=60)
    params = callback_params()
    twice = _event_of(params)
    others = [_event_of(callback_params()) for _ in range(5)]
    results = await asyncio.gather(*(enqueuer.enqueue(e) for e in [twice, *others, twice, twice]))
    assert [added for added, _ in results] == [True] * 6 + [False, False]
    assert results[0][1] == results[6][1] == results[7][1]
    assert await redis.xlen(keys.stream) == 6


def _event_of(params: dict[str, str]) -> RecordingEvent:
    return RecordingEvent.create(
        recording_sid=params["RecordingSid"],
        call_sid=params["CallSid"],
        account_sid=params["AccountSid"],
        business_id="42",
        status="completed",
    )
