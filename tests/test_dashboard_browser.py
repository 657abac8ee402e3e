"""The dashboard in a real browser: headless Chromium driven by Playwright.

Each test runs the webhook (with the dashboard) and a consumer in its own
loop against the test's Redis, PostgreSQL and stand-ins, sends callbacks as
Twilio does, and works the pages as a person would: no reloads where the page
is meant to update by itself, no script or style the CSP refuses (a page that
logs a violation or an uncaught error fails its test). A screenshot of every
page goes to ``test-artefacts/dashboard/``; with STREAMREC_SCREENSHOT_DOCS=1
the overview is also written as ``docs/dashboard.png`` for the README.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestServer

from streamrec.dashboard.auth import CSP
from streamrec.keys import Keys
from streamrec.semaphore import picture
from streamrec.settings import Settings
from tests.audio import Burst, audio_bytes
from tests.browser import (
    VIEWPORT,
    WAIT_MS,
    Dashboard,
    backfill_hour,
    chromium,
    dashboard,
    docs_wanted,
    log_in,
    mark,
    missing,
    shoot,
    shoot_docs,
    still_marked,
    until,
    watch,
)
from tests.conftest import wait_for
from tests.standins import MediaStandIn, recording_sid

# Without the dev extra there is no playwright: the tests skip (tests.browser.missing).
with contextlib.suppress(ImportError):
    from playwright.async_api import Browser, Locator, Page, expect

NAV = {
    "Overview": "/ui/",
    "Businesses": "/ui/businesses",
    "Dead letters": "/ui/dead",
    "Recordings": "/ui/recordings",
}


def exactly(number: int) -> re.Pattern[str]:
    """A text that is ``number`` and nothing else (whitespace aside)."""
    return re.compile(rf"^\s*{number}\s*$")


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def browser() -> AsyncIterator[Browser]:
    """The session's headless Chromium; the test skips, saying why, where it cannot run."""
    reason = missing()
    if reason is not None:
        pytest.skip(reason)
    async with chromium() as launched:
        yield launched


@pytest_asyncio.fixture(loop_scope="session")
async def stack(settings: Settings, redis: aioredis.Redis) -> AsyncIterator[Dashboard]:
    """The webhook with the dashboard and a consumer, for this test.

    It asks for ``redis`` so that it stops before that fixture deletes the test's keys.
    """
    async with dashboard(settings) as running:
        yield running


@pytest_asyncio.fixture(loop_scope="session")
async def page(browser: Browser, stack: Dashboard) -> AsyncIterator[Page]:
    """A tab of a fresh browser context (no cookies) on the dashboard, 1280x800.

    Fails the test if any tab of the context logged a CSP violation or an
    uncaught script error.
    """
    context = await browser.new_context(viewport=VIEWPORT, base_url=stack.url)
    context.set_default_timeout(WAIT_MS)
    problems: list[str] = []
    context.on("page", lambda tab: watch(tab, problems))
    tab = await context.new_page()
    yield tab
    await context.close()
    assert not problems, "\n".join(problems)


async def visit(page: Page, path: str, shot: str) -> None:
    """Open ``path``, then ``framed``."""
    await page.goto(path)
    await framed(page, shot)


async def framed(page: Page, shot: str) -> None:
    """Check the navigation every page carries, and screenshot the page as ``shot``."""
    nav = page.locator("nav")
    for name, href in NAV.items():
        await expect(nav.get_by_role("link", name=name, exact=True)).to_have_attribute("href", href)
    await shoot(page, shot)


async def submit(page: Page, button: Locator, path: str) -> None:
    """Click a form's ``button`` and wait until its answer has led the page to ``path``
    (whatever the query string): the POST is done by then."""
    async with page.expect_navigation(url=lambda url: urlsplit(url).path == path):
        await button.click()


async def status_is(db: Any, sid: str, status: str) -> bool:
    """Whether the recording's row has ``status``."""
    found = await db.fetchval("SELECT status FROM recordings WHERE recording_sid = $1", sid)
    return bool(found == status)


async def dead_letters(redis: aioredis.Redis, keys: Keys, count: int) -> bool:
    """Whether the dead-letter stream holds ``count`` entries."""
    return bool(await redis.xlen(keys.dead) == count)


async def test_chromium_runs_own_scripts_and_reports_refused_ones(browser: Browser) -> None:
    """Chromium as launched here runs a page's script from its own origin under the
    dashboard's CSP, refuses an inline one, and the refusal reaches ``watch``."""
    body = {
        "/": (
            "<!doctype html><p id=out>static</p>"
            "<script>document.getElementById('out').dataset.inline = 'ran';</script>"
            "<script src='/app.js'></script>",
            "text/html",
        ),
        "/app.js": ("document.getElementById('out').textContent = 'scripted';", "text/javascript"),
    }

    async def serve(request: web.Request) -> web.Response:
        text, content_type = body[request.path]
        return web.Response(
            text=text, content_type=content_type, headers={"Content-Security-Policy": CSP}
        )

    app = web.Application()
    for path in body:
        app.router.add_get(path, serve)
    async with TestServer(app, host="127.0.0.1") as server:
        context = await browser.new_context(base_url=str(server.make_url("/")))
        try:
            tab = await context.new_page()
            problems: list[str] = []
            watch(tab, problems)
            await tab.goto("/")
            await expect(tab.locator("p#out")).to_have_text("scripted")
            assert await tab.locator("p#out").get_attribute("data-inline") is None
            assert any("Content Security Policy" in problem for problem in problems)
        finally:
            await context.close()


async def test_overview_updates_live_after_login(
    page: Page, stack: Dashboard, media: MediaStandIn, redis: aioredis.Redis, keys: Keys
) -> None:
    """Logged in, the overview shows the consumer, then its counts and chart move as
    callbacks are worked, without a reload."""
    await page.goto("/ui/login")
    await shoot(page, "login")
    await log_in(page)
    await visit(page, "/ui/", "overview-empty")
    await expect(page.locator("table#consumers tr[data-consumer='test-consumer']")).to_be_visible()
    completed = page.locator("[data-field=completed_hour]")
    await expect(completed).to_have_text(exactly(0))
    await mark(page)
    await page.evaluate(
        "() => { window.flowBefore = document.querySelector('svg#flow').innerHTML;"
        " window.updatedBefore = document.querySelector('span#updated').textContent; }"
    )

    poisoned = recording_sid()
    media.status_for[poisoned] = 403  # a permanent failure: one dead letter
    await stack.call_back(poisoned, business="13")
    for index in range(6):
        await stack.call_back(recording_sid(), business=("42", "42", "42", "7", "7", "13")[index])

    await expect(completed).to_have_text(exactly(6))
    await expect(page.locator("[data-field=dead_letters]")).to_have_text(exactly(1))
    await expect(page.locator("[data-series=queued]")).to_have_text(exactly(7))
    await until(page, "() => document.querySelector('svg#flow').innerHTML !== window.flowBefore")
    await until(
        page, "() => document.querySelector('span#updated').textContent !== window.updatedBefore"
    )
    for name in ("length", "pending", "lag", "oldest_waiting", "parked"):
        await expect(page.locator(f"[data-field={name}]")).not_to_be_empty()
    for name in ("health-redis", "health-postgres"):
        await expect(page.locator(f"[data-field={name}]")).not_to_be_empty()
    assert await still_marked(page), "the overview reloaded instead of updating in place"
    assert await redis.xlen(keys.dead) == 1
    await shoot(page, "overview")
    if docs_wanted():
        await backfill_hour(redis, keys)
        await expect(completed).not_to_have_text(exactly(6))  # redrawn with the past hour
        await shoot_docs(page)


async def test_dead_letter_replayed_from_its_page(
    page: Page, stack: Dashboard, media: MediaStandIn, redis: aioredis.Redis, keys: Keys
) -> None:
    """A dead letter opened from the list and replayed once its cause is fixed: its
    recording's page, open meanwhile, turns completed without a reload."""
    sid = recording_sid()
    media.status_for[sid] = 403
    await stack.call_back(sid)
    await wait_for(lambda: dead_letters(redis, keys, 1), what="the dead letter")
    await log_in(page)

    await visit(page, "/ui/dead", "dead-letters")
    row = page.locator("table#dead tr[data-dead]", has_text=sid)
    await expect(row).to_have_count(1)
    entry_id = await row.get_attribute("data-dead")
    assert entry_id

    watcher = await page.context.new_page()
    await watcher.goto(f"/ui/recordings/{sid}")
    status = watcher.locator("dl#recording dd[data-field=status]")
    await expect(status).to_have_text(re.compile("failed"))
    await mark(watcher)

    await row.locator(f"a[href='/ui/dead/{entry_id}']").click()
    await page.wait_for_url(f"**/ui/dead/{entry_id}")
    await expect(page.locator("body")).to_contain_text(sid)
    await framed(page, "dead-letter")
    del media.status_for[sid]  # the cause is fixed
    await submit(page, page.locator("form#replay-one [type=submit]"), "/ui/dead")
    await expect(page.locator(f"tr[data-dead='{entry_id}']")).to_have_count(0)

    await expect(status).to_have_text(re.compile("completed"))
    assert await still_marked(watcher), "the recording page reloaded instead of updating"
    await shoot(watcher, "recording-replayed")
    assert await redis.xlen(keys.dead) == 0


async def test_dead_letters_purged_only_with_confirmation(
    page: Page, stack: Dashboard, media: MediaStandIn, redis: aioredis.Redis, keys: Keys
) -> None:
    """A purge without the confirmation box ticked deletes nothing and asks to confirm;
    confirmed there or in the list, the selected dead letter goes; another is replayed by
    selection."""
    asked, ticked, replayed = recording_sid(), recording_sid(), recording_sid()
    for sid in (asked, ticked, replayed):
        media.status_for[sid] = 403
        await stack.call_back(sid)
    await wait_for(lambda: dead_letters(redis, keys, 3), what="three dead letters")
    await log_in(page)
    await page.goto("/ui/dead")
    form = page.locator("form#dead-actions")

    await form.locator("tr[data-dead]", has_text=asked).locator("input[name=id]").check()
    async with page.expect_response(re.compile(r"/ui/dead/purge$")) as answer:
        await form.locator("button#purge-selected").click()
    assert (await answer.value).status == 400
    await shoot(page, "dead-purge-unconfirmed")
    assert await redis.xlen(keys.dead) == 3, "purged without confirmation"
    confirming = page.locator("form:has(input#confirm-purge)")
    await confirming.locator("input#confirm-purge").check()
    await submit(page, confirming.locator("[type=submit]"), "/ui/dead")
    await expect(page.locator("tr[data-dead]", has_text=asked)).to_have_count(0)
    assert await redis.xlen(keys.dead) == 2

    await form.locator("tr[data-dead]", has_text=ticked).locator("input[name=id]").check()
    await form.locator("input#confirm-purge[name=confirm][value=yes]").check()
    await submit(page, form.locator("button#purge-selected"), "/ui/dead")
    await expect(page.locator("tr[data-dead]", has_text=ticked)).to_have_count(0)
    assert await redis.xlen(keys.dead) == 1

    del media.status_for[replayed]
    await form.locator("tr[data-dead]", has_text=replayed).locator("input[name=id]").check()
    await submit(page, form.locator("button#replay-selected"), "/ui/dead")
    await expect(page.locator("tr[data-dead]")).to_have_count(0)
    assert await redis.xlen(keys.dead) == 0


async def test_business_limit_set_from_the_page(
    page: Page, stack: Dashboard, db: Any, redis: aioredis.Redis, keys: Keys
) -> None:
    """Business 42, the busiest, gets a slot limit of 3 from its row, which every
    consumer's slots then read; emptying the field puts the default back."""
    sids = [recording_sid() for _ in range(3)]
    for sid, business in zip(sids, ("42", "42", "7"), strict=True):
        await stack.call_back(sid, business=business)
    for sid in sids:
        await wait_for(lambda sid=sid: status_is(db, sid, "completed"), what=f"{sid} done")
    await log_in(page)
    await visit(page, "/ui/businesses", "businesses")
    table = page.locator("table#businesses")
    await expect(table.locator("tr[data-business]").first).to_have_attribute("data-business", "42")

    row = table.locator("tr[data-business='42']")
    await row.locator("form.limit input[name=limit]").fill("3")
    await submit(page, row.locator("form.limit [type=submit]"), "/ui/businesses")
    assert await redis.hget(keys.slot_limits, "42") == "3"
    limits = {b["business_id"]: b["limit"] for b in await picture(redis, keys, default_limit=4)}
    assert limits["42"] == 3
    await expect(await column(table, row, "limit")).to_have_text(exactly(3))
    await shoot(page, "businesses-limited")

    await row.locator("form.limit input[name=limit]").fill("")
    await submit(page, row.locator("form.limit [type=submit]"), "/ui/businesses")
    assert await redis.hget(keys.slot_limits, "42") is None
    await expect(await column(table, row, "limit")).to_have_text(exactly(4))


async def test_businesses_sorted_by_a_clicked_column(page: Page, stack: Dashboard, db: Any) -> None:
    """Clicking a column's header sorts the businesses by it; clicking again reverses."""
    sids = [recording_sid() for _ in range(3)]
    for sid, business in zip(sids, ("42", "42", "7"), strict=True):
        await stack.call_back(sid, business=business)
    for sid in sids:
        await wait_for(lambda sid=sid: status_is(db, sid, "completed"), what=f"{sid} done")
    await log_in(page)
    await page.goto("/ui/businesses")
    table = page.locator("table#businesses")
    await expect(table.locator("tr[data-business]")).to_have_count(2)
    header = table.locator("th[data-sort=completed_hour]")
    await header.click()
    once = await order(table)
    await header.click()
    await until(page, f"() => {json.dumps(list(reversed(once)))}.join() === " + ORDER_JS)
    assert await order(table) == list(reversed(once))


ORDER_JS = (
    "Array.from(document.querySelectorAll('table#businesses tr[data-business]'))"
    ".map((row) => row.dataset.business).join()"
)


async def order(table: Locator) -> list[str]:
    """The business ids of the table's rows, top to bottom."""
    return [
        str(await row.get_attribute("data-business"))
        for row in await table.locator("tr[data-business]").all()
    ]


async def column(table: Locator, row: Locator, sort: str) -> Locator:
    """The cell of ``row`` under the header ``th[data-sort=<sort>]``."""
    headers = [await th.get_attribute("data-sort") for th in await table.locator("th").all()]
    return row.locator("td").nth(headers.index(sort))


async def test_recording_found_and_its_audio_plays(
    page: Page, stack: Dashboard, media: MediaStandIn, db: Any
) -> None:
    """A recording found by its RecordingSid shows its transcript, and its stored mp3
    plays in the page's player (the element reports the file's duration)."""
    sid = recording_sid()
    words = [Burst(0.5, 0.4, "alpha"), Burst(1.5, 0.4, "bravo")]
    media.body_for[sid] = audio_bytes(fmt="mp3", rate=8000, duration_s=3.0, channels=[words])
    await stack.call_back(sid)
    await wait_for(lambda: status_is(db, sid, "completed"), what="the recording completed")
    await log_in(page)

    await visit(page, "/ui/recordings", "recordings-search")
    await page.locator("form#search input[name=q]").fill(sid)
    await page.locator("form#search [type=submit]").click()
    await page.wait_for_url(re.compile(r"/ui/recordings\?q="))
    row = page.locator(f"table#recordings tr[data-recording='{sid}']")
    await expect(row).to_have_count(1)
    await shoot(page, "recordings")
    await row.locator(f"a[href='/ui/recordings/{sid}']").click()
    await page.wait_for_url(f"**/ui/recordings/{sid}")

    await expect(page.locator("dl#recording dd[data-field=status]")).to_have_text(
        re.compile("completed")
    )
    await expect(page.locator("div#transcript p[data-speaker]").first).to_be_visible()
    await expect(page.locator("div#transcript")).to_contain_text("alpha bravo")
    player = page.locator(f"audio#player[controls][src='/ui/recordings/{sid}/audio']")
    await expect(player).to_have_count(1)
    duration = await until(page, "() => document.getElementById('player').duration")
    assert abs(duration - 3.0) < 0.2
    await page.evaluate("() => document.getElementById('player').play()")
    await until(page, "() => document.getElementById('player').currentTime > 0.1")
    await framed(page, "recording")


async def test_overview_fits_a_phone(browser: Browser, stack: Dashboard) -> None:
    """On a phone-sized screen the overview needs no sideways scrolling."""
    context = await browser.new_context(
        viewport={"width": 390, "height": 844}, base_url=stack.url, is_mobile=True
    )
    try:
        tab = await context.new_page()
        problems: list[str] = []
        watch(tab, problems)
        await log_in(tab)
        await expect(tab.locator("tr[data-consumer]")).not_to_have_count(0)
        await shoot(tab, "overview-phone")
        overflow = await tab.evaluate(
            "() => document.documentElement.scrollWidth - window.innerWidth"
        )
        assert overflow <= 0, f"{overflow}px wider than the screen"
        assert not problems, "\n".join(problems)
    finally:
        await context.close()
