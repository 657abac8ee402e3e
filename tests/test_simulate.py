"""``simulate``: signed callbacks posted to the real webhook app served on a local port."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest_asyncio
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.typedefs import Handler

from streamrec import devrun, simulate
from streamrec.devservers import free_port
from streamrec.keys import Keys
from streamrec.producer import WebhookConfig, create_app
from streamrec.settings import Settings
from tests.conftest import entries
from tests.processes import environment, streamrec
from tests.standins import ACCOUNT_SID, AUTH_TOKEN, recording_sid


async def serve(redis: aioredis.Redis, keys: Keys, public_url: str, port: int) -> web.AppRunner:
    """The webhook app on 127.0.0.1:``port``, verifying signatures over ``public_url``."""
    config = WebhookConfig(
        account_sid=ACCOUNT_SID, auth_token=AUTH_TOKEN, public_url=public_url, keys=keys
    )
    runner = web.AppRunner(create_app(redis, config), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", port).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner


@pytest_asyncio.fixture(loop_scope="session")
async def webhook_url(redis: aioredis.Redis, keys: Keys) -> AsyncIterator[str]:
    """Base URL of the webhook, served on a free port; it is also the public URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    runner = await serve(redis, keys, url, port)
    yield url
    await runner.cleanup()


async def test_post_callbacks_enqueues_count_entries(
    webhook_url: str, redis: aioredis.Redis, keys: Keys
) -> None:
    """post_callbacks(count=3) gets three 200 queued answers and adds three entries."""
    posted = await simulate.post_callbacks(
        account_sid=ACCOUNT_SID,
        auth_token=AUTH_TOKEN,
        public_url=webhook_url,
        post_to=None,
        business_id="5",
        count=3,
    )
    assert [p.status for p in posted] == [200, 200, 200]
    assert [json.loads(p.body)["status"] for p in posted] == ["queued"] * 3
    added = [fields for _, fields in await entries(redis, keys.stream)]
    assert [f["recording_sid"] for f in added] == [p.recording_sid for p in posted]
    assert {f["business_id"] for f in added} == {"5"}
    assert {f["account_sid"] for f in added} == {ACCOUNT_SID}


async def test_post_callbacks_with_a_wrong_token_is_refused(
    webhook_url: str, redis: aioredis.Redis, keys: Keys
) -> None:
    """Callbacks signed with another token get 403 and add nothing."""
    posted = await simulate.post_callbacks(
        account_sid=ACCOUNT_SID,
        auth_token="not-the-token",
        public_url=webhook_url,
        post_to=None,
        business_id="5",
        count=2,
    )
    assert [p.status for p in posted] == [403, 403]
    assert await redis.xlen(keys.stream) == 0


async def test_one_recording_sid_twice_is_queued_then_duplicate(
    webhook_url: str, redis: aioredis.Redis, keys: Keys
) -> None:
    """With a fixed RecordingSid the second callback is answered duplicate; one entry."""
    sid = recording_sid()
    posted = await simulate.post_callbacks(
        account_sid=ACCOUNT_SID,
        auth_token=AUTH_TOKEN,
        public_url=webhook_url,
        post_to=None,
        business_id="5",
        count=2,
        recording_sid=sid,
    )
    assert [json.loads(p.body)["status"] for p in posted] == ["queued", "duplicate"]
    assert [f["recording_sid"] for _, f in await entries(redis, keys.stream)] == [sid]


async def test_post_to_signs_over_the_public_url(redis: aioredis.Redis, keys: Keys) -> None:
    """post_to sends elsewhere while signing over the public URL the webhook verifies with."""
    port = free_port()
    public = "https://hooks.example.com"
    runner = await serve(redis, keys, public, port)
    try:
        posted = await simulate.post_callbacks(
            account_sid=ACCOUNT_SID,
            auth_token=AUTH_TOKEN,
            public_url=public,
            post_to=f"http://127.0.0.1:{port}/",
            business_id="5",
        )
    finally:
        await runner.cleanup()
    assert [p.status for p in posted] == [200]
    assert await redis.xlen(keys.stream) == 1


async def test_simulate_cli_posts_and_prints_one_line_each(
    webhook_url: str, redis: aioredis.Redis, keys: Keys, settings: Settings, tmp_path: Path
) -> None:
    """``simulate --count 2 --business-id 5`` exits 0, prints 2 lines, adds 2 entries."""
    env = environment(settings, STREAMREC_PUBLIC_URL=webhook_url)
    finished = await streamrec(
        "simulate", "--count", "2", "--business-id", "5", env=env, cwd=tmp_path
    )
    assert finished.returncode == 0, finished.stderr
    lines = finished.stdout.splitlines()
    assert len(lines) == 2
    added = [fields for _, fields in await entries(redis, keys.stream)]
    assert [f["business_id"] for f in added] == ["5", "5"]
    for line, fields in zip(lines, added, strict=True):
        sid, status, body = line.split(" ", 2)
        assert (sid, status) == (fields["recording_sid"], "200")
        assert json.loads(body)["status"] == "queued"


async def test_simulate_cli_exits_1_when_refused(
    webhook_url: str, redis: aioredis.Redis, keys: Keys, settings: Settings, tmp_path: Path
) -> None:
    """``simulate`` signing with a token the webhook does not hold exits 1 and shows 403."""
    env = environment(settings, STREAMREC_PUBLIC_URL=webhook_url, TWILIO_AUTH_TOKEN="wrong")
    finished = await streamrec("simulate", env=env, cwd=tmp_path)
    assert finished.returncode == 1
    [line] = finished.stdout.splitlines()
    assert line.split(" ", 2)[1] == "403"
    assert await redis.xlen(keys.stream) == 0


def test_simulated_duration_is_that_of_the_development_recording() -> None:
    """The RecordingDuration simulate sends is the length of the media ``dev`` serves,
    counted from its MP3 frames (1152 samples at 44.1 kHz each)."""
    frames = devrun.SILENCE_MP3.count(b"\xff\xfb\x90\x00")
    seconds = frames * 1152 / 44_100
    params = simulate.callback_params(ACCOUNT_SID, status="completed", recording_sid=None)
    assert int(params["RecordingDuration"]) == round(seconds) == 1


@pytest_asyncio.fixture(loop_scope="session")
async def going_away(redis: aioredis.Redis, keys: Keys) -> AsyncIterator[str]:
    """The webhook, which answers two callbacks and then drops every connection unanswered."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = WebhookConfig(
        account_sid=ACCOUNT_SID, auth_token=AUTH_TOKEN, public_url=url, keys=keys
    )
    app = create_app(redis, config)
    answered = 0

    @web.middleware
    async def two_then_gone(request: web.Request, handler: Handler) -> web.StreamResponse:
        nonlocal answered
        if answered == 2:
            assert request.transport is not None
            request.transport.close()  # as a server that went away mid-run
            return web.Response(status=500)
        answered += 1
        return await handler(request)

    app.middlewares.append(two_then_gone)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield url
    await runner.cleanup()


async def test_simulate_cli_shows_progress_and_a_summary_when_the_server_goes_away(
    going_away: str, redis: aioredis.Redis, keys: Keys, settings: Settings, tmp_path: Path
) -> None:
    """``simulate --count 5`` against a webhook that stops answering after two prints the
    two accepted callbacks, a summary saying 2 of 5 were accepted, and exits 1."""
    env = environment(settings, STREAMREC_PUBLIC_URL=going_away)
    finished = await streamrec("simulate", "--count", "5", env=env, cwd=tmp_path)
    assert finished.returncode == 1
    added = [fields["recording_sid"] for _, fields in await entries(redis, keys.stream)]
    assert [line.split(" ", 2)[:2] for line in finished.stdout.splitlines()] == [
        [sid, "200"] for sid in added
    ]
    assert len(added) == 2
    assert "Traceback" not in finished.stderr
    assert f"no answer from {going_away}" in finished.stderr
    assert "2 of 5 answered: 2 accepted (queued 2)" in finished.stderr


async def test_simulate_cli_summarises_a_whole_run(
    webhook_url: str, settings: Settings, tmp_path: Path
) -> None:
    """After the last answer ``simulate`` says how many were accepted, and how."""
    env = environment(settings, STREAMREC_PUBLIC_URL=webhook_url)
    sid = recording_sid()
    finished = await streamrec(
        "simulate", "--count", "3", "--recording-sid", sid, env=env, cwd=tmp_path
    )
    assert finished.returncode == 0, finished.stderr
    assert "3 of 3 answered: 3 accepted (queued 1, duplicate 2)" in finished.stderr
