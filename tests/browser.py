"""Headless Chromium driven by Playwright, and the running service it looks at.

The browser is Debian's ``/usr/bin/chromium``: Playwright's Python package
drives it and never downloads one of its own. ``missing`` says why the browser
tests cannot run on a machine (they skip with that reason). ``chromium``
launches it with a fresh temporary profile; ``Dashboard`` is the webhook with
its dashboard and one consumer, running in the test's event loop against the
test's Redis, PostgreSQL and stand-ins; ``watch`` collects what a page reports
going wrong (a Content-Security-Policy violation, an uncaught script error), so
a test can require that there was none.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis
from pydantic import SecretStr

from streamrec import service
from streamrec.devservers import free_port
from streamrec.keys import Keys
from streamrec.producer import WEBHOOK_PATH
from streamrec.settings import Settings
from streamrec.status import SLOT_MS, SLOTS_KEPT
from tests.conftest import wait_for
from tests.standins import callback_params, post_like_twilio

try:
    from playwright.async_api import (
        Browser,
        ConsoleMessage,
        Error,
        Page,
        ViewportSize,
        async_playwright,
        expect,
    )
except ImportError:  # the dev extra is not installed: `missing` says so and the tests skip
    HAVE_PLAYWRIGHT = False
else:
    HAVE_PLAYWRIGHT = True

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = (
    # Root (containers, CI) cannot use Chromium's sandbox.
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--no-first-run",
    # Nothing but the page under test goes over the network.
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
ROOT = Path(__file__).resolve().parent.parent
ARTEFACTS = ROOT / "test-artefacts" / "dashboard"
"""Where each page's screenshot is written (gitignored)."""
DOCS_IMAGE = ROOT / "docs" / "dashboard.png"
"""The README's picture of the overview, rewritten when STREAMREC_SCREENSHOT_DOCS=1."""
VIEWPORT: ViewportSize = {"width": 1280, "height": 800}
TOKEN = "ui-test-token-0123456789abcdef"
WAIT_MS = 20_000
"""How long an expectation on a page may take to come true."""


def missing() -> str | None:
    """Why the browser tests cannot run here, or None when they can."""
    if not HAVE_PLAYWRIGHT:
        return "playwright is not installed (pip install -e '.[dev]')"
    if not os.access(CHROMIUM, os.X_OK):
        return f"{CHROMIUM} is missing (apt-get install chromium; ./dev test tries to)"
    return None


@contextlib.asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    """Headless Chromium with a fresh profile (Playwright makes and removes its directory).

    Also sets how long Playwright's ``expect`` waits (WAIT_MS), for the whole session.
    """
    expect.set_options(timeout=WAIT_MS)
    async with async_playwright() as driver:
        browser = await driver.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=list(CHROMIUM_ARGS)
        )
        try:
            yield browser
        finally:
            await browser.close()


def watch(page: Page, problems: list[str]) -> None:
    """Append to ``problems`` each CSP violation and uncaught script error of the page."""

    def console(message: ConsoleMessage) -> None:
        if "Content Security Policy" in message.text:
            problems.append(f"{page.url}: {message.text}")

    def error(exc: Error) -> None:
        problems.append(f"{page.url}: uncaught {exc.name}: {exc.message}")

    page.on("console", console)
    page.on("pageerror", error)


async def shoot(page: Page, name: str) -> None:
    """Write the whole page as ``test-artefacts/dashboard/<name>.png``."""
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=ARTEFACTS / f"{name}.png", full_page=True)


def docs_wanted() -> bool:
    """Whether this run is to rewrite the README's picture (STREAMREC_SCREENSHOT_DOCS=1)."""
    return os.environ.get("STREAMREC_SCREENSHOT_DOCS") == "1"


async def shoot_docs(page: Page) -> None:
    """Write the viewport as the README's picture."""
    DOCS_IMAGE.parent.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=DOCS_IMAGE)


async def backfill_hour(redis: aioredis.Redis, keys: Keys, *, seed: int = 12) -> None:
    """Add an hour of made-up flow before now to the outcome counts, for the README's picture.

    A test lasts seconds and the chart spans an hour: without a past, the
    picture would be one spike at its right edge. The counts go where the
    consumers' heartbeats and the webhook put theirs (``keys.outcomes``, per
    10 s slot of Redis time, the slot listed in ``keys.outcome_slots``), so
    the figures that sum them agree with the chart.
    """
    rng = random.Random(seed)
    seconds, _ = await redis.time()
    now_slot = int(seconds) * 1000 // SLOT_MS
    async with redis.pipeline(transaction=True) as pipe:
        for back in range(1, SLOTS_KEPT - 6):
            slot = now_slot - back
            busy = 1.5 + math.sin(back / 60) + rng.random()  # a gentle swell, some noise
            queued = round(busy * 2)
            counts = {
                "queued": queued,
                "completed": max(queued - rng.randint(0, 1), 0),
                "failed": int(rng.random() < 0.15),
                "duplicate": int(rng.random() < 0.1),
                "rejected": int(rng.random() < 0.03),
                "dead_lettered": int(back == 150),
            }
            for outcome, count in counts.items():
                if count:
                    pipe.hincrby(keys.outcomes, f"{outcome}:{slot}", count)
            pipe.zadd(keys.outcome_slots, {str(slot): slot})
        await pipe.execute()


async def log_in(page: Page, token: str = TOKEN) -> None:
    """Log in through the form; fails the test unless it lands on the overview."""
    await page.goto("/ui/login")
    form = page.locator("form#login")
    await form.locator("input[name=token][type=password]").fill(token)
    await form.locator("[type=submit]").click()
    await page.wait_for_url("**/ui/")


async def mark(page: Page) -> None:
    """Leave a mark in the page's window; a reload or navigation would lose it."""
    await page.evaluate("() => { window.streamrecMark = true; }")


async def still_marked(page: Page) -> bool:
    """Whether the page still holds ``mark``'s mark, that is, was not reloaded."""
    return bool(await page.evaluate("() => window.streamrecMark === true"))


async def until(page: Page, predicate: str) -> Any:
    """Wait for a JavaScript function of no arguments to return a truthy value; that value.

    The predicate must be a function (``"() => ..."``), not an expression:
    Playwright evaluates an expression by ``eval``, which the dashboard's CSP
    (no 'unsafe-eval') refuses.
    """
    handle = await page.wait_for_function(predicate, timeout=WAIT_MS)
    return await handle.json_value()


@dataclass
class Dashboard:
    """The webhook (with the dashboard) and a consumer, serving at ``url``."""

    url: str
    session: aiohttp.ClientSession

    async def call_back(self, sid: str, *, business: str = "42") -> None:
        """Send a signed RecordingStatusCallback for ``sid``; fails unless it is accepted."""
        url = f"{self.url}{WEBHOOK_PATH}?business_id={business}"
        answer = await post_like_twilio(self.session, url, callback_params(sid))
        assert answer is not None, f"callback for {sid} refused"


@contextlib.asynccontextmanager
async def dashboard(settings: Settings) -> AsyncIterator[Dashboard]:
    """Serve the webhook with the dashboard on (STREAMREC_UI_TOKEN = TOKEN) and run a consumer.

    Both run as tasks of the calling loop on a free loopback port, with
    per-business slots on (default 4). On exit both are stopped and awaited;
    an error either raised is raised here.
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    served = settings.model_copy(
        update={
            "http_host": "127.0.0.1",
            "http_port": port,
            "public_url": url,
            "ui_token": SecretStr(TOKEN),
            "business_slots": 4,
        }
    )
    stop, ready = asyncio.Event(), asyncio.Event()
    webhook = asyncio.create_task(service.serve(served, stop, on_ready=ready.set))
    consumer = asyncio.create_task(service.consume(served, stop))
    try:
        await wait_for(lambda: ready.is_set() or webhook.done(), what="the webhook listening")
        if webhook.done():
            webhook.result()  # its error, raised here
        async with aiohttp.ClientSession() as session:
            yield Dashboard(url=url, session=session)
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(webhook, consumer), 30)
