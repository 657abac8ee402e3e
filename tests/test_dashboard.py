"""The dashboard without a browser: its locks, its audio route and its JSON document,
with one partition and with four."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from pydantic import SecretStr
from yarl import URL

from streamrec import lua, semaphore, service, status
from streamrec.dashboard import auth
from streamrec.devservers import free_port
from streamrec.events import RecordingEvent
from streamrec.keys import Keys
from streamrec.partitions import Layout
from streamrec.producer import WEBHOOK_PATH
from streamrec.settings import Settings
from streamrec.tally import Tally
from tests.conftest import entries, wait_for
from tests.standins import ACCOUNT_SID, AUDIO, call_sid, callback_params, recording_sid, sign
from tests.test_status import PARTS, build_partitions, dead_fields, monitor_of, partitioned

Client = TestClient[web.Request, web.Application]

TOKEN = "dashboard-token-0123456789abcdef"
HEADERS = {
    "Content-Security-Policy": auth.CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}
NAV = [
    ("/ui/", "Overview"),
    ("/ui/businesses", "Businesses"),
    ("/ui/dead", "Dead letters"),
    ("/ui/recordings", "Recordings"),
]
PAGES = ["/ui/", "/ui/businesses", "/ui/dead", "/ui/recordings", "/ui/recordings?q=42"]


def with_token(settings: Settings, token: str | None = TOKEN, **more: Any) -> Settings:
    """``settings`` with STREAMREC_UI_TOKEN (and ``more``) set."""
    return settings.model_copy(
        update={"ui_token": None if token is None else SecretStr(token), **more}
    )


@asynccontextmanager
async def webhook(
    settings: Settings, redis: aioredis.Redis, db: Any
) -> AsyncIterator[tuple[Client, str]]:
    """A client of the webhook app as ``serve`` builds it (no cookie jar: each request
    says its cookie), and the public URL its callbacks are signed for."""
    app = service.webhook_app(settings, redis, db, tally_every_s=0.05)
    server = TestServer(app, host="127.0.0.1")
    async with TestClient(server, cookie_jar=aiohttp.DummyCookieJar()) as client:
        yield client, settings.public_url


async def log_in(client: Client, token: str = TOKEN) -> str:
    """Log in with ``token``; the session cookie's value."""
    response = await client.post("/ui/login", data={"token": token}, allow_redirects=False)
    assert response.status == 303, await response.text()
    return str(response.cookies[auth.COOKIE].value)


def cookie(value: str) -> dict[str, str]:
    """The request header carrying session ``value``."""
    return {"Cookie": f"{auth.COOKIE}={value}"}


async def csrf_of_page(client: Client, session: str, path: str = "/ui/dead") -> str:
    """The CSRF token the page at ``path`` puts in its forms."""
    page = await (await client.get(path, headers=cookie(session))).text()
    found = re.search(r'name="csrf" value="([0-9a-f]+)"', page)
    assert found, page
    return found[1]


async def dead_letter(redis: aioredis.Redis, keys: Keys, business: str = "42") -> str:
    """A dead letter of a fresh recording of ``business``, as the consumer writes one."""
    event = RecordingEvent.create(
        recording_sid=recording_sid(),
        call_sid=call_sid(),
        account_sid=ACCOUNT_SID,
        business_id=business,
        status="completed",
    )
    meta = {"error": "PermanentError: 403", "attempts": "1", "origin_id": "1-1"}
    fields = {**event.to_fields(), **meta, "consumer": "c1", "failed_at": "1700000000000"}
    return str(await redis.xadd(keys.dead, fields))  # type: ignore[arg-type]


async def add_row(db: Any, sid: str, *, business: str = "42", **columns: Any) -> str:
    """A recordings row for ``sid`` (its CallSid returned), with ``columns`` set."""
    call = columns.pop("call_sid", call_sid())
    values = {"status": "completed", **columns}
    names = ", ".join(values)
    marks = ", ".join(f"${n}" for n in range(5, 5 + len(values)))
    await db.execute(
        f"INSERT INTO recordings (recording_sid, call_sid, account_sid, business_id, {names})"  # noqa: S608
        f" VALUES ($1, $2, $3, $4, {marks})",
        sid,
        call,
        ACCOUNT_SID,
        business,
        *values.values(),
    )
    return str(call)


async def test_without_a_token_every_ui_path_is_not_found(
    settings: Settings, redis: aioredis.Redis, db: Any
) -> None:
    """With STREAMREC_UI_TOKEN unset or empty, every /ui path answers 404, as if no route."""
    for token in (None, ""):
        async with webhook(with_token(settings, token), redis, db) as (client, _):
            for path in [*PAGES, "/ui", "/ui/login", "/ui/api/status", "/ui/static/app.js"]:
                assert (await client.get(path, allow_redirects=False)).status == 404, path
            audio = f"/ui/recordings/{recording_sid()}/audio"
            assert (await client.get(audio)).status == 404
            for path in ("/ui/login", "/ui/dead/replay", "/ui/dead/purge", "/ui/logout"):
                assert (await client.post(path, data={"token": token or ""})).status == 404


async def test_a_wrong_token_gets_401_and_no_session(
    settings: Settings, redis: aioredis.Redis, db: Any
) -> None:
    """A wrong, empty or missing token is answered 401 with the form again, and no cookie."""
    async with webhook(with_token(settings), redis, db) as (client, _):
        for form in ({"token": "wrong"}, {"token": TOKEN + "x"}, {"token": ""}, {}):
            response = await client.post("/ui/login", data=form, allow_redirects=False)
            assert response.status == 401
            assert "Set-Cookie" not in response.headers
            assert 'id="login"' in await response.text()


async def test_the_right_token_gets_a_strict_http_only_session_cookie(
    settings: Settings, redis: aioredis.Redis, db: Any
) -> None:
    """The token is answered 303 to /ui/ with a cookie that is HttpOnly, SameSite=Strict,
    Path=/ui/ and lives 12 h; Secure when the public URL is https."""
    for public_url, secure in (("http://127.0.0.1:1", False), ("https://hooks.example.com", True)):
        served = with_token(settings, public_url=public_url)
        async with webhook(served, redis, db) as (client, _):
            response = await client.post("/ui/login", data={"token": TOKEN}, allow_redirects=False)
            assert response.status == 303
            assert response.headers["Location"] == "/ui/"
            jar: SimpleCookie = SimpleCookie()
            jar.load(response.headers["Set-Cookie"])
            morsel = jar[auth.COOKIE]
            assert morsel["httponly"] is True
            assert morsel["samesite"] == "Strict"
            assert morsel["path"] == "/ui/"
            assert morsel["max-age"] == str(12 * 3600)
            assert bool(morsel["secure"]) is secure
            expiry, _, mac = morsel.value.partition(".")
            assert int(expiry) == pytest.approx(time.time() + 12 * 3600, abs=5)
            assert re.fullmatch(r"[0-9a-f]{64}", mac)
            overview = await client.get("/ui/", headers=cookie(morsel.value))
            assert overview.status == 200


async def test_without_a_session_pages_redirect_and_json_and_audio_answer_401(
    settings: Settings, redis: aioredis.Redis, db: Any
) -> None:
    """No cookie, a forged, expired or altered one, or one of an earlier token: pages
    answer 303 to the login form, the JSON and the audio 401."""
    sid = recording_sid()
    other = auth.Guard.of("an earlier token")
    mine = auth.Guard.of(TOKEN)
    expired = mine.issue(now=time.time() - 13 * 3600)
    good = mine.issue()
    far = str(int(time.time()) + 10 * 24 * 3600)
    cookies = [
        {},
        cookie("1.abc"),
        cookie(expired),
        cookie(other.issue()),
        cookie(good[:-1] + ("0" if good[-1] != "0" else "1")),
        cookie(f"{far}.{good.partition('.')[2]}"),
    ]
    async with webhook(with_token(settings), redis, db) as (client, _):
        for headers in cookies:
            for path in [*PAGES, f"/ui/recordings/{sid}", "/ui/dead/1-1"]:
                response = await client.get(path, headers=headers, allow_redirects=False)
                assert response.status == 303, (path, headers)
                assert response.headers["Location"] == "/ui/login"
            for path in (
                "/ui/api/status",
                f"/ui/api/recordings/{sid}",
                f"/ui/recordings/{sid}/audio",
            ):
                response = await client.get(path, headers=headers)
                assert response.status == 401, (path, headers)
                assert "error" in await response.json()
        assert (await client.get("/ui/api/status", headers=cookie(good))).status == 200


async def test_a_post_without_its_csrf_token_changes_nothing(
    settings: Settings, redis: aioredis.Redis, db: Any, keys: Keys
) -> None:
    """A POST with no CSRF token, a wrong one or another session's is refused 403 and
    changes nothing; with the page's token the replay happens."""
    entry_id = await dead_letter(redis, keys)
    async with webhook(with_token(settings, business_slots=3), redis, db) as (client, _):
        session = await log_in(client)
        another = auth.Guard.of(TOKEN).issue(time.time() - 60)  # a session of its own
        token = await csrf_of_page(client, session)
        assert token == await csrf_of_page(client, session, "/ui/businesses")
        refused = [
            {},
            {"csrf": ""},
            {"csrf": "0" * 64},
            {"csrf": auth.Guard.of(TOKEN).csrf(another)},
        ]
        for extra in refused:
            for path, form in (
                ("/ui/dead/replay", {"id": entry_id}),
                ("/ui/dead/purge", {"id": entry_id, "confirm": "yes"}),
                ("/ui/businesses/42/limit", {"limit": "1"}),
                ("/ui/logout", {}),
            ):
                response = await client.post(
                    path, data={**form, **extra}, headers=cookie(session), allow_redirects=False
                )
                assert response.status == 403, (path, extra)
        assert await redis.xlen(keys.dead) == 1
        assert await redis.xlen(keys.stream) == 0
        assert await redis.hget(keys.slot_limits, "42") is None

        response = await client.post(
            "/ui/dead/replay",
            data={"id": entry_id, "csrf": token},
            headers=cookie(session),
            allow_redirects=False,
        )
        assert response.status == 303
        assert response.headers["Location"].startswith("/ui/dead?replayed=1")
    assert await redis.xlen(keys.dead) == 0
    assert await redis.xlen(keys.stream) == 1


async def test_every_ui_answer_carries_the_security_headers(
    settings: Settings, redis: aioredis.Redis, db: Any, keys: Keys
) -> None:
    """Pages, JSON, redirects, errors and static files under /ui/ all carry the CSP,
    nosniff and Referrer-Policy; pages and JSON are not to be stored."""
    async with webhook(with_token(settings), redis, db) as (client, _):
        session = await log_in(client)
        mine = cookie(session)
        asks: list[tuple[str, str, dict[str, str], dict[str, str], int]] = [
            ("GET", "/ui/login", {}, {}, 200),
            ("POST", "/ui/login", {}, {"token": "wrong"}, 401),
            ("GET", "/ui/", {}, {}, 303),
            ("GET", "/ui", mine, {}, 303),
            ("GET", "/ui/api/status", {}, {}, 401),
            ("POST", "/ui/dead/replay", mine, {"id": "1-1"}, 403),
            ("GET", "/ui/no-such-page", mine, {}, 404),
            ("GET", "/ui/dead/not-an-id", mine, {}, 404),
            ("PUT", "/ui/", mine, {}, 405),
            ("GET", "/ui/static/app.js", {}, {}, 200),
            ("GET", "/ui/static/app.css", {}, {}, 200),
            ("GET", "/ui/static/../templates/base.html", {}, {}, 404),
            ("GET", f"/ui/recordings/{recording_sid()}/audio", mine, {}, 404),
            *(("GET", path, mine, {}, 200) for path in PAGES),
            ("GET", "/ui/api/status", mine, {}, 200),
        ]
        for method, path, headers, form, expected in asks:
            response = await client.request(
                method, path, headers=headers, data=form or None, allow_redirects=False
            )
            assert response.status == expected, (method, path)
            for name, value in HEADERS.items():
                assert response.headers.get(name) == value, (method, path, name)
            if not path.startswith("/ui/static/"):
                assert response.headers["Cache-Control"] == "no-store", path
        script = await client.get("/ui/static/app.js")
        assert "javascript" in script.headers["Content-Type"]


async def test_pages_hold_no_inline_script_or_style(
    settings: Settings, redis: aioredis.Redis, db: Any, keys: Keys
) -> None:
    """No page has an inline script, style or event handler (the CSP would block them),
    and text from a recording is escaped, not markup."""
    sid = recording_sid()
    evil = "<script>alert(1)</script><img src=x onerror=alert(2)>"
    await add_row(db, sid, transcript=evil, error=evil)
    await dead_letter(redis, keys)
    async with webhook(with_token(settings), redis, db) as (client, _):
        session = await log_in(client)
        for path in [*PAGES, f"/ui/recordings/{sid}", "/ui/login"]:
            page = await (await client.get(path, headers=cookie(session))).text()
            nav = page.partition("<nav>")[2].partition("</nav>")[0]
            assert re.findall(r'<a href="([^"]+)"[^>]*>([^<]+)</a>', nav) == NAV, path
            assert re.findall(r"<script[^>]*>", page) == [
                '<script src="/ui/static/app.js" defer>'
            ], path
            for tag in re.findall(r"<[a-zA-Z][^>]*>", page):
                assert not re.search(r"\s(on[a-z]+|style)=", tag), (path, tag)
                assert not tag.startswith(("<style", "<img")), (path, tag)
        page = await (await client.get(f"/ui/recordings/{sid}", headers=cookie(session))).text()
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


async def media_rows(settings: Settings, db: Any) -> dict[str, str]:
    """Rows whose audio_path is: a file in the media directory, /etc/passwd, a file
    beside the media directory reached with ../, a link out of it, a missing file."""
    media = settings.media_dir
    (media / "42").mkdir(parents=True)
    inside = media / "42" / "good.mp3"
    inside.write_bytes(AUDIO)
    beside = media.parent / "secret.mp3"
    beside.write_bytes(b"not for the dashboard")
    (media / "42" / "link.mp3").symlink_to(beside)
    paths = {
        "good": str(inside),
        "passwd": "/etc/passwd",
        "dotdot": str(media / "42" / ".." / ".." / "secret.mp3"),
        "link": str(media / "42" / "link.mp3"),
        "missing": str(media / "42" / "gone.mp3"),
        "folder": str(media / "42"),
    }
    sids = {}
    for name, path in paths.items():
        sids[name] = recording_sid()
        await add_row(db, sids[name], audio_path=path)
    return sids


async def test_audio_is_served_only_from_the_media_directory(
    settings: Settings, redis: aioredis.Redis, db: Any
) -> None:
    """The stored file is served as audio/mpeg; paths out of the media directory, tricks
    in the URL and sids of another format are 404."""
    sids = await media_rows(settings, db)
    async with webhook(with_token(settings), redis, db) as (client, _):
        mine = cookie(await log_in(client))
        good = await client.get(f"/ui/recordings/{sids['good']}/audio", headers=mine)
        assert good.status == 200
        assert good.headers["Content-Type"] == "audio/mpeg"
        assert await good.read() == AUDIO
        for name in ("passwd", "dotdot", "link", "missing", "folder"):
            response = await client.get(f"/ui/recordings/{sids[name]}/audio", headers=mine)
            assert response.status == 404, name
        call = await db.fetchval(
            "SELECT call_sid FROM recordings WHERE recording_sid = $1", sids["good"]
        )
        tricks = [
            "/ui/recordings/../../../../etc/passwd/audio",
            "/ui/recordings/%2e%2e/audio",
            "/ui/recordings/%2e%2e%2f%2e%2e%2fetc%2fpasswd/audio",
            "/ui/recordings/%2Fetc%2Fpasswd/audio",
            "/ui/recordings/..%2F..%2Fsecret.mp3/audio",
            f"/ui/recordings/{call}/audio",
            f"/ui/recordings/{sids['good'].lower().replace('re', 'RE', 1)}x/audio",
            f"/ui/recordings/{sids['good']}%0A/audio",
            f"/ui/recordings/{sids['good']}%00/audio",
            f"/ui/recordings/{sids['good'][:-1]}/audio",
        ]
        for path in tricks:
            url = URL(str(client.make_url("/"))).with_path(path, encoded=True)
            response = await client.session.get(url, headers=mine)
            assert response.status == 404, path
            assert await response.read() != AUDIO


async def test_audio_answers_range_requests(
    settings: Settings, redis: aioredis.Redis, db: Any
) -> None:
    """A Range request is answered 206 with exactly the bytes asked for."""
    sids = await media_rows(settings, db)
    path = f"/ui/recordings/{sids['good']}/audio"
    async with webhook(with_token(settings), redis, db) as (client, _):
        mine = cookie(await log_in(client))
        for ask, want in (("bytes=10-19", AUDIO[10:20]), ("bytes=-7", AUDIO[-7:])):
            response = await client.get(path, headers={**mine, "Range": ask})
            assert response.status == 206
            assert await response.read() == want
            first = len(AUDIO) - 7 if ask == "bytes=-7" else 10
            assert response.headers["Content-Range"].startswith(f"bytes {first}-")
        assert (await client.get(path, headers={"Range": "bytes=0-9"})).status == 401


async def test_the_document_has_every_part(
    settings: Settings, redis: aioredis.Redis, db: Any, keys: Keys
) -> None:
    """The JSON document is status --json's plus health, a 60-minute series, and the
    last hour per business from PostgreSQL, merged into the businesses."""
    await add_row(db, recording_sid(), business="42")
    await add_row(db, recording_sid(), business="42", status="failed", error="boom")
    await add_row(db, recording_sid(), business="7")
    await redis.hset(keys.slot_limits, "9", "2")
    async with webhook(with_token(settings, business_slots=3), redis, db) as (client, _):
        mine = cookie(await log_in(client))
        doc = await (await client.get("/ui/api/status", headers=mine)).json()
    expected = await status.collect(redis, keys, default_slots=3)
    assert set(expected) <= set(doc)
    assert doc["health"] == {"webhook": True, "redis": True, "postgres": True}
    assert doc["errors"] == []
    series = doc["series"]
    assert list(series) == [
        "minutes", "completed", "failed", "dead_lettered", "queued", "duplicate", "rejected",
    ]  # fmt: skip
    minutes = series["minutes"]
    assert len(minutes) == 60
    assert minutes == list(range(minutes[0], minutes[0] + 60))
    assert abs(minutes[-1] - time.time() // 60) <= 1
    assert all(values == [0] * 60 for name, values in series.items() if name != "minutes")
    recent = {b["business_id"]: (b["completed"], b["failed"]) for b in doc["recent_businesses"]}
    assert recent == {"42": (1, 1), "7": (1, 0)}
    merged = [
        (b["business_id"], b["limit"], b["completed_hour"], b["failed_hour"])
        for b in doc["businesses"]
    ]
    assert merged == [("42", 3, 1, 1), ("7", 3, 1, 0), ("9", 2, 0, 0)]


@pytest.mark.parametrize("down", ["redis", "postgres"])
async def test_the_dashboard_says_which_dependency_is_down(
    settings: Settings, redis: aioredis.Redis, db: Any, down: str
) -> None:
    """With Redis or PostgreSQL not answering, the document and the overview are still
    served, saying which is down; a page that needs it is a 503 naming the failure."""
    nobody = f"127.0.0.1:{free_port()}"
    dead_redis = aioredis.Redis.from_url(f"redis://{nobody}/0", decode_responses=True)
    dead_pool = await asyncpg.create_pool(f"postgresql://{nobody}/x", min_size=0, max_size=1)
    pair = (dead_redis, db) if down == "redis" else (redis, dead_pool)
    try:
        async with webhook(with_token(settings), *pair) as (client, _):
            mine = cookie(await log_in(client))
            answer = await client.get("/ui/api/status", headers=mine)
            assert answer.status == 200
            doc = await answer.json()
            assert doc["health"] == {"webhook": True, "redis": down != "redis",
                                     "postgres": down != "postgres"}  # fmt: skip
            assert any(down in error for error in doc["errors"])
            if down == "redis":
                assert doc["series"] is None and "length" not in doc
            else:
                assert doc["recent_businesses"] is None and doc["series"] is not None
                assert all(b["completed_hour"] is None for b in doc["businesses"])
            overview = await client.get("/ui/", headers=mine)
            assert overview.status == 200
            assert f"{down} down" in await overview.text()
            needs = "/ui/dead" if down == "redis" else "/ui/recordings?q=42"
            failed = await client.get(needs, headers=mine)
            assert failed.status == 503
            assert failed.headers["Content-Security-Policy"] == auth.CSP
            assert "did not answer" in await failed.text()
    finally:
        await dead_redis.aclose()
        await dead_pool.close()


async def test_the_series_counts_callbacks_and_recordings(
    settings: Settings, redis: aioredis.Redis, db: Any, keys: Keys
) -> None:
    """Callbacks move queued, duplicate and rejected; worked recordings move completed,
    in the current minute of the series and in the last hour of business 42."""
    async with webhook(with_token(settings), redis, db) as (client, public_url):
        mine = cookie(await log_in(client))
        path = f"{WEBHOOK_PATH}?business_id=42"
        first, second = callback_params(), callback_params()
        for params, signature_of in ((first, first), (second, second), (first, first), (first, {})):
            headers = {"X-Twilio-Signature": sign(public_url + path, signature_of)}
            await client.post(path, data=params, headers=headers)
        bad = f"{WEBHOOK_PATH}?business_id=no%20such"
        await client.post(
            bad, data=second, headers={"X-Twilio-Signature": sign(public_url + bad, second)}
        )

        async def now(names: tuple[str, ...]) -> dict[str, int] | None:
            doc = await (await client.get("/ui/api/status", headers=mine)).json()
            found = {name: sum(doc["series"][name]) for name in names}
            return found if all(found.values()) else None

        counts = await wait_for(lambda: now(("queued", "duplicate", "rejected")), what="answers")
        assert counts == {"queued": 2, "duplicate": 1, "rejected": 2}
        await asyncio.wait_for(service.consume(settings, asyncio.Event(), until_idle=True), 60)
        done = await wait_for(lambda: now(("completed",)), what="the completed recordings")
        assert done == {"completed": 2}
        doc = await (await client.get("/ui/api/status", headers=mine)).json()
    assert doc["series"]["completed"][-1] + doc["series"]["completed"][-2] == 2
    assert doc["throughput"]["last_hour"]["completed"] == 2
    assert doc["recent_businesses"] == [{"business_id": "42", "completed": 2, "failed": 0}]


async def test_old_outcome_slots_are_pruned_whoever_counted_them(
    redis: aioredis.Redis, keys: Keys
) -> None:
    """A slot past the hour loses the webhook's counts and the consumers' alike, whether
    the webhook's send or a consumer's heartbeat prunes it; newer slots stay."""
    for prune in ("tally", "beat"):
        server_s = int((await redis.time())[0])
        old, new = server_s * 1000 // status.SLOT_MS - status.SLOTS_KEPT - 5, server_s // 10 - 1
        for slot in (old, new):
            await redis.hset(keys.outcomes, mapping={f"queued:{slot}": 3, f"completed:{slot}": 4})
            await redis.zadd(keys.outcome_slots, {str(slot): slot})
        if prune == "tally":
            tally = Tally(redis, keys)
            tally.count("duplicate")
            assert await tally.send()
        else:
            await monitor_of(redis, keys, "c1").tick()
        fields = set(await redis.hkeys(keys.outcomes))
        assert not {f"queued:{old}", f"completed:{old}"} & fields, prune
        assert {f"queued:{new}", f"completed:{new}"} <= fields, prune
        assert str(old) not in await redis.zrange(keys.outcome_slots, 0, -1)
        await redis.delete(keys.outcomes, keys.outcome_slots)


async def test_a_batch_of_answer_counts_sent_twice_is_added_once(
    redis: aioredis.Redis, keys: Keys
) -> None:
    """The tally script called again with a batch's number (a retry after a lost reply)
    adds nothing; the next number adds again."""
    script = lua.register(redis, "tally_add", "outcomes_prune")
    names = [keys.outcomes, keys.outcome_slots, keys.tally("p1")]

    def batch(number: int) -> list[str]:
        return [str(status.SLOT_MS), str(status.SLOTS_KEPT), str(number), "60000", "queued", "2"]

    assert await script(keys=names, args=batch(1)) == 1
    assert await script(keys=names, args=batch(1)) == 0
    assert await script(keys=names, args=batch(2)) == 1
    counts = await redis.hgetall(keys.outcomes)
    assert sum(int(v) for f, v in counts.items() if str(f).startswith("queued:")) == 4


async def test_a_dead_letter_is_purged_only_when_confirmed(
    settings: Settings, redis: aioredis.Redis, db: Any, keys: Keys
) -> None:
    """A purge without confirm=yes is a 400 page asking for it and deletes nothing; with
    it, the chosen dead letters go; all=1 takes every one."""
    ids = [await dead_letter(redis, keys) for _ in range(3)]
    async with webhook(with_token(settings), redis, db) as (client, _):
        session = await log_in(client)
        token = await csrf_of_page(client, session)

        async def purge(form: dict[str, str] | list[tuple[str, str]]) -> aiohttp.ClientResponse:
            data = [*(form.items() if isinstance(form, dict) else form), ("csrf", token)]
            return await client.post(
                "/ui/dead/purge", data=data, headers=cookie(session), allow_redirects=False
            )

        refused = await purge({"id": ids[0]})
        assert refused.status == 400
        assert 'id="confirm-purge"' in await refused.text()
        assert (await purge({"all": "1", "confirm": "no"})).status == 400
        assert await redis.xlen(keys.dead) == 3
        assert (await purge([("id", ids[0]), ("id", ids[1]), ("confirm", "yes")])).status == 303
        assert [i for i, _ in await entries(redis, keys.dead)] == [ids[2]]
        assert (await purge({"all": "1", "confirm": "yes"})).status == 303
        assert await redis.xlen(keys.dead) == 0
        assert (await purge({"id": "1; DEL x", "confirm": "yes"})).status == 400


async def test_a_business_limit_is_set_and_unset_from_its_form(
    settings: Settings, redis: aioredis.Redis, db: Any, keys: Keys
) -> None:
    """A limit from the form is the business's own (as `slots set`), an empty one goes
    back to the default; 0, words and malformed business ids are refused."""
    await add_row(db, recording_sid(), business="42")
    async with webhook(with_token(settings, business_slots=3), redis, db) as (client, _):
        session = await log_in(client)
        page = await (await client.get("/ui/businesses", headers=cookie(session))).text()
        assert '<tr data-business="42">' in page
        assert 'action="/ui/businesses/42/limit"' in page
        token = await csrf_of_page(client, session, "/ui/businesses")

        async def limit(business: str, value: str) -> int:
            response = await client.post(
                f"/ui/businesses/{business}/limit",
                data={"limit": value, "csrf": token},
                headers=cookie(session),
                allow_redirects=False,
            )
            return response.status

        async def limits() -> dict[str, int]:
            rows = await semaphore.picture(redis, keys, default_limit=3)
            return {row["business_id"]: row["limit"] for row in rows}

        assert await limit("42", "5") == 303
        assert await redis.hget(keys.slot_limits, "42") == "5"
        assert (await limits())["42"] == 5
        for value in ("0", "-1", "two", "1e3", "9999999"):
            assert await limit("42", value) == 400, value
        assert await limit("..", "4") == 404
        assert await limit("a%20b", "4") == 404
        assert (await limits())["42"] == 5
        assert await limit("42", "") == 303
        assert await redis.hget(keys.slot_limits, "42") is None


async def test_recordings_are_found_and_shown_with_their_transcript(
    settings: Settings, redis: aioredis.Redis, db: Any
) -> None:
    """A search by RecordingSid, CallSid or business finds the rows; a recording's page
    shows its transcript turn by turn, and its JSON its status."""
    sid, other = recording_sid(), recording_sid()
    segments = [
        {"speaker": "agent", "start_s": 0.0, "end_s": 1.0, "text": "hello"},
        {"speaker": "agent", "start_s": 1.0, "end_s": 2.0, "text": "there"},
        {"speaker": "customer", "start_s": 2.0, "end_s": 3.0, "text": "hi"},
    ]
    call = await add_row(db, sid, business="shop-1", segments=json.dumps(segments))
    await add_row(db, other, business="shop-1", status="failed", error="PermanentError: 403")
    async with webhook(with_token(settings), redis, db) as (client, _):
        mine = cookie(await log_in(client))

        async def found(query: str) -> list[str]:
            page = await (
                await client.get("/ui/recordings", params={"q": query}, headers=mine)
            ).text()
            return re.findall(r'<tr data-recording="(RE[0-9a-f]{32})">', page)

        assert await found(sid) == [sid]
        assert await found(call) == [sid]
        assert sorted(await found("shop-1")) == sorted([sid, other])
        assert await found("shop") == []
        page = await (await client.get(f"/ui/recordings/{sid}", headers=mine)).text()
        turns = re.findall(r'<p data-speaker="([^"]*)"><b>[^<]*</b> ([^<]*)</p>', page)
        assert turns == [("agent", "hello there"), ("customer", "hi")]
        state = await (await client.get(f"/ui/api/recordings/{other}", headers=mine)).json()
        assert (state["status"], state["error"]) == ("failed", "PermanentError: 403")
        assert (await client.get(f"/ui/recordings/{recording_sid()}", headers=mine)).status == 404
        missing = await client.get(f"/ui/api/recordings/{recording_sid()}", headers=mine)
        assert missing.status == 404
        assert "error" in await missing.json()


async def login_page_status(settings: Settings) -> int:
    """The status ``serve``, run with ``settings`` on a free port, answers /ui/login with."""
    port = free_port()
    served = settings.model_copy(update={"http_host": "127.0.0.1", "http_port": port})
    stop, ready = asyncio.Event(), asyncio.Event()
    running = asyncio.create_task(service.serve(served, stop, on_ready=ready.set))
    try:
        await wait_for(lambda: ready.is_set() or running.done(), what="serve listening")
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/ui/login") as response,
        ):
            return response.status
    finally:
        stop.set()
        await asyncio.wait_for(running, 30)


async def test_serve_mounts_the_dashboard_when_the_token_is_set(settings: Settings) -> None:
    """``serve`` answers /ui/login with the form when STREAMREC_UI_TOKEN is set, 404 when not."""
    assert await login_page_status(with_token(settings)) == 200
    assert await login_page_status(with_token(settings, None)) == 404


def test_settings_treat_the_dashboard_token_as_a_secret(settings: Settings) -> None:
    """STREAMREC_UI_TOKEN is among the secrets the logs mask; empty means off."""
    assert TOKEN in with_token(settings).secrets()
    assert with_token(settings).ui_enabled
    assert not with_token(settings, "").ui_enabled
    assert not with_token(settings, None).ui_enabled
    assert Path(auth.__file__).with_name("templates").is_dir()


@pytest_asyncio.fixture(loop_scope="session")
async def layout(redis: aioredis.Redis, keys: Keys) -> AsyncIterator[Layout]:
    """Four partitions of this test's namespace."""
    async with partitioned(redis, keys) as made:
        yield made


async def test_the_overview_breaks_the_figures_down_by_partition(
    settings: Settings, redis: aioredis.Redis, db: Any, layout: Layout
) -> None:
    """With four partitions the document's figures are their sums, its ``partitions`` list
    has each one's, and the overview has a table of them; with one it has none."""
    await build_partitions(redis, layout)
    four = with_token(settings, partitions=PARTS)
    async with webhook(four, redis, db) as (client, _):
        mine = cookie(await log_in(client))
        doc = await (await client.get("/ui/api/status", headers=mine)).json()
        page = await (await client.get("/ui/", headers=mine)).text()
    assert (doc["length"], doc["pending"], doc["lag"], doc["dead_letters"]) == (9, 5, 4, 3)
    parts = doc["partitions"]
    assert [(p["index"], p["length"], p["pending"]) for p in parts] == [
        (0, 3, 2), (1, 0, 0), (2, 2, 0), (3, 4, 3),
    ]  # fmt: skip
    assert 'id="partitions"' in page
    for part in layout:
        assert f'<tr data-partition="{part.partition}">' in page
        assert part.stream in page

    async with webhook(with_token(settings), redis, db) as (client, _):
        mine = cookie(await log_in(client))
        one = await (await client.get("/ui/api/status", headers=mine)).json()
        page = await (await client.get("/ui/", headers=mine)).text()
    assert [p["index"] for p in one["partitions"]] == [0]
    assert 'id="partitions"' not in page


async def test_dead_letters_of_partitions_are_named_replayed_and_purged(
    settings: Settings, redis: aioredis.Redis, db: Any, layout: Layout
) -> None:
    """With four partitions the dead-letter page names each letter ``<partition>/<id>``
    (the same id in two partitions twice), opens it by that name, replays it onto its own
    partition's stream and purges only the one named."""
    for index in (1, 3):
        await redis.xadd(layout.partitions[index].dead, dead_fields(index), id="5-0")  # type: ignore[arg-type]
    async with webhook(with_token(settings, partitions=PARTS), redis, db) as (client, _):
        session = await log_in(client)
        listing = await (await client.get("/ui/dead", headers=cookie(session))).text()
        for name in ("1/5-0", "3/5-0"):
            assert f'<tr data-dead="{name}">' in listing
            assert f'value="{name}"' in listing
            assert f'href="/ui/dead/{name}"' in listing
        one = await client.get("/ui/dead/3/5-0", headers=cookie(session))
        assert one.status == 200
        assert f"RE{3:032x}" in await one.text()
        assert (await client.get("/ui/dead/2/5-0", headers=cookie(session))).status == 404
        assert (await client.get("/ui/dead/5-0", headers=cookie(session))).status == 404
        token = await csrf_of_page(client, session)

        async def post(path: str, form: dict[str, str]) -> aiohttp.ClientResponse:
            return await client.post(
                path, data={**form, "csrf": token}, headers=cookie(session), allow_redirects=False
            )

        ambiguous = await post("/ui/dead/replay", {"id": "5-0"})
        assert ambiguous.status == 400
        assert "1/5-0 or 3/5-0" in await ambiguous.text()
        replayed = await post("/ui/dead/replay", {"id": "3/5-0"})
        assert replayed.headers["Location"] == "/ui/dead?replayed=1&missing=0"
        [(_, fields)] = await entries(redis, layout.partitions[3].stream)
        assert fields["recording_sid"] == f"RE{3:032x}"
        assert await redis.xlen(layout.partitions[1].stream) == 0
        purged = await post("/ui/dead/purge", {"id": "5-0", "confirm": "yes"})
        assert purged.headers["Location"] == "/ui/dead?purged=1"  # only one holds it now
    assert [await redis.xlen(part.dead) for part in layout] == [0, 0, 0, 0]


async def test_a_business_limit_from_its_form_lands_in_its_partition(
    settings: Settings, redis: aioredis.Redis, db: Any, layout: Layout
) -> None:
    """With four partitions the form's limit is written beside the business's slots."""
    async with webhook(with_token(settings, partitions=PARTS), redis, db) as (client, _):
        session = await log_in(client)
        token = await csrf_of_page(client, session, "/ui/businesses")
        response = await client.post(
            "/ui/businesses/42/limit",
            data={"limit": "4", "csrf": token},
            headers=cookie(session),
            allow_redirects=False,
        )
        assert response.status == 303
        page = await (await client.get("/ui/businesses", headers=cookie(session))).text()
    assert '<tr data-business="42">' in page
    limits = [await redis.hgetall(part.slot_limits) for part in layout]
    assert limits[layout.of("42").partition] == {"42": "4"}
    assert sum(len(found) for found in limits) == 1
