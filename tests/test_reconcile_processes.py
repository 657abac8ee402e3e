"""The reconciler with real processes: a webhook outage, scheduled runs, the commands."""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest_asyncio
import redis.asyncio as aioredis

from streamrec.keys import Keys
from streamrec.settings import Settings
from tests.conftest import wait_for
from tests.edge import Callbacks, Webhook, number_of
from tests.processes import environment, spawn_consumer, streamrec
from tests.standins import MediaStandIn, OpenAIStandIn, call_sid, callback_params, recording_sid

SHOP = "+15550100000"  # a number mapped to no business
LOST = 200
"""Recordings completing while ``serve`` is down."""
GIVE_UP_S = 1.0
"""Twilio's total time for a callback (15 s), shortened."""


@pytest_asyncio.fixture(loop_scope="session")
async def webhook(settings: Settings, tmp_path: Path) -> AsyncIterator[Webhook]:
    """The webhook process, killed at the end if still running."""
    server = Webhook(settings, tmp_path)
    yield server
    server.kill()


async def test_callbacks_lost_in_a_webhook_outage_all_come_in_with_one_reconcile(
    settings: Settings,
    media: MediaStandIn,
    openai_api: OpenAIStandIn,
    db: Any,
    tmp_path: Path,
    webhook: Webhook,
    children: list[subprocess.Popen[bytes]],
) -> None:
    """Serve down while 200 calls complete: Twilio gives up on them; one run brings all in, once."""
    env = environment(settings)
    added = await streamrec("numbers", "add", number_of("shop-1"), "shop-1", env=env, cwd=tmp_path)
    assert added.returncode == 0, added.stderr
    children.append(
        spawn_consumer(settings, "worker", tmp_path, STREAMREC_RECONCILE_INTERVAL_S="0")
    )
    await webhook.start()
    callbacks = Callbacks(webhook, media, give_up_s=GIVE_UP_S, pause_s=0.1)
    async with aiohttp.ClientSession() as session:
        # Given 20 recordings whose callbacks came in
        heard = [callback_params() for _ in range(20)]
        assert [await callbacks.send(session, p, "shop-1") for p in heard] == ["queued"] * 20
        # When serve is down while 200 more complete, Twilio gives up on their callbacks
        await webhook.stop()
        lost = [callback_params() for _ in range(LOST)]
        answers = await asyncio.gather(*(callbacks.send(session, p, "shop-1") for p in lost))
        assert answers == [None] * LOST
        await webhook.start()
        # Then one reconcile run enqueues exactly those
        run = await streamrec("reconcile", "--json", env=env, cwd=tmp_path)
        assert run.returncode == 0, run.stderr
        outcome = json.loads(run.stdout)
        assert (outcome["enqueued"], outcome["known"], outcome["unassigned"]) == (LOST, 20, 0)
        await wait_for(lambda: completed(db, LOST + 20), timeout=60, what="every recording done")
        rows = await db.fetch("SELECT origin, count(*) AS n FROM recordings GROUP BY origin")
        assert {r["origin"]: r["n"] for r in rows} == {"reconcile": LOST, "webhook": 20}
        assert Counter(Counter(media.started).values()) == {1: LOST + 20}  # each fetched once
        # A second run finds nothing to do; a late callback is a duplicate.
        again = json.loads((await streamrec("reconcile", "--json", env=env, cwd=tmp_path)).stdout)
        assert (again["enqueued"], again["known"]) == (0, LOST + 20)
        assert await callbacks.send(session, lost[0], "shop-1") == "duplicate"


async def completed(db: Any, count: int) -> bool:
    done = await db.fetchval("SELECT count(*) FROM recordings WHERE status = 'completed'")
    return bool(done == count)


async def test_scheduled_reconcile_runs_once_per_interval_in_one_of_three_consumers(
    settings: Settings,
    media: MediaStandIn,
    redis: aioredis.Redis,
    keys: Keys,
    tmp_path: Path,
    children: list[subprocess.Popen[bytes]],
) -> None:
    """Three consumers run one reconcile per interval; kill the one running: another takes over."""
    interval = 1.0
    for n in range(3):
        children.append(
            spawn_consumer(
                settings, f"c{n}", tmp_path, STREAMREC_RECONCILE_INTERVAL_S=str(interval)
            )
        )
    # Each run asks for the list's first page once (the list is empty).
    await wait_for(lambda: len(media.rest.list_requests) >= 5, what="five runs")
    starts = [at for at, _ in media.rest.list_requests]
    gaps = [later - earlier for earlier, later in itertools.pairwise(starts)]
    assert min(gaps) >= interval * 0.95, gaps
    # When a run hangs in the listing and its consumer is killed
    media.rest.list_gate = asyncio.Event()
    asked = len(media.rest.list_requests)
    await wait_for(lambda: len(media.rest.list_requests) > asked, what="a run to hang")
    holder = str(await redis.get(keys.reconcile_lease))
    victim = children[int(holder.removeprefix("c"))]
    victim.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    await asyncio.to_thread(victim.wait, 10)
    # Then another consumer holds the lease within one interval (and one poll)
    await wait_for(
        lambda: _held_by_another(redis, keys, holder), timeout=5 * interval, what="a new holder"
    )
    assert time.monotonic() - killed <= interval * 1.5
    media.rest.list_gate.set()


async def _held_by_another(redis: aioredis.Redis, keys: Keys, holder: str) -> bool:
    return await redis.get(keys.reconcile_lease) not in (None, holder)


async def test_numbers_commands_and_unassigned_in_reconcile_json(
    settings: Settings, media: MediaStandIn, redis: aioredis.Redis, keys: Keys, tmp_path: Path
) -> None:
    """``numbers`` adds, lists and removes; ``reconcile --json`` lists what maps to no business."""
    env = environment(settings)

    async def run(*args: str) -> subprocess.CompletedProcess[str]:
        return await streamrec(*args, env=env, cwd=tmp_path)

    assert (await run("numbers", "add", "+15550100001", "shop-1")).returncode == 0
    assert (await run("numbers", "remove", "+15550100002")).returncode == 1  # never added
    bad = await run("numbers", "add", "5550100", "shop-1")
    assert bad.returncode == 2 and "E.164" in bad.stderr
    assert (await run("numbers", "list")).stdout.split() == ["+15550100001", "shop-1"]
    sid = recording_sid()
    media.rest.add(sid, call_sid(), to=SHOP)
    dry = json.loads((await run("reconcile", "--dry-run", "--json")).stdout)
    assert dry["unassigned"] == 1
    [unassigned] = dry["unassigned_recordings"]
    assert (unassigned["recording_sid"], unassigned["to"]) == (sid, SHOP)
    assert await redis.xlen(keys.stream) == 0
    listing = await run("reconcile", "--from", "2026-01-01", "--to", "2026-01-02")
    assert listing.returncode == 0, listing.stderr
    assert "listed 0" in listing.stdout
    shown = await run("status")
    assert "reconcile: last run" in shown.stdout and "over 2026-01-01..2026-01-02" in shown.stdout
