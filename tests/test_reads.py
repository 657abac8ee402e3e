"""Each command's ``--help`` lists every setting its code reads when it really runs.

The truth is taken independently of ``streamrec.reads``: the commands run
against the test servers with a Settings object that records each field read.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from streamrec import service
from streamrec.__main__ import TOOLS, main
from streamrec.devservers import free_port
from streamrec.keys import Keys
from streamrec.settings import Settings
from tests.conftest import wait_for
from tests.standins import enqueue


def recording(settings: Settings) -> tuple[Settings, set[str]]:
    """A copy of ``settings`` that notes the variable of each field read into the set."""
    read: set[str] = set()

    class Recording(Settings):
        def __getattribute__(self, name: str) -> Any:
            if name in Settings.model_fields:
                alias = Settings.model_fields[name].validation_alias
                read.add(str(alias))
            return super().__getattribute__(name)

    copy = Recording(**settings.model_dump(), _env_file=None)
    read.clear()  # what validation looked at is not the command's doing
    return copy, read


def listed(command: str, capsys: pytest.CaptureFixture[str]) -> list[str]:
    """The variables ``streamrec <command> --help`` says it reads."""
    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    assert exited.value.code == 0
    match = re.search(r"Reads: (.*?)\.(\s|$)", " ".join(capsys.readouterr().out.split()))
    assert match
    return match[1].split(", ")


async def test_serve_reads_what_its_help_lists(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    """``serve`` started, asked /readyz (which checks PostgreSQL) and stopped reads only
    variables its help lists, DATABASE_URL among them."""
    port = free_port()
    served, read = recording(
        settings.model_copy(update={"http_port": port, "http_host": "127.0.0.1"})
    )
    stop = asyncio.Event()
    running = asyncio.create_task(service.serve(served, stop))
    try:
        async with aiohttp.ClientSession() as session:
            await wait_for(
                lambda: _ready(session, f"http://127.0.0.1:{port}/readyz"), what="/readyz 200"
            )
    finally:
        stop.set()
        await running
    assert "DATABASE_URL" in read
    assert read <= set(listed("serve", capsys))


async def _ready(session: aiohttp.ClientSession, url: str) -> bool:
    with contextlib.suppress(aiohttp.ClientConnectionError):
        async with session.get(url) as response:
            return response.status == 200
    return False


async def test_consume_reads_what_its_help_lists(
    redis: aioredis.Redis, keys: Keys, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    """``consume`` working an entry to the end, its metrics served, reads only what its
    help lists."""
    consumer, read = recording(settings.model_copy(update={"metrics_port": free_port()}))
    await enqueue(redis, keys, 1)
    await asyncio.wait_for(service.consume(consumer, asyncio.Event(), until_idle=True), 60)
    assert {"REDIS_URL", "DATABASE_URL", "STREAMREC_METRICS_PORT"} <= read
    assert read <= set(listed("consume", capsys))


@pytest.mark.parametrize(
    ("command", "args"),
    [
        ("migrate", {"wait": 0.0}),
        ("status", {"json": True, "watch": None, "count": None}),
        ("check", {"consumer": None, "this_host": False}),
        ("slots", {"action": "list"}),
        ("dlq", {"action": "list", "count": 10, "json": True}),
    ],
)
async def test_tools_read_what_their_help_lists(
    settings: Settings,
    capsys: pytest.CaptureFixture[str],
    command: str,
    args: dict[str, Any],
) -> None:
    """migrate, status, check, slots list and dlq list read only what their help lists."""
    tool_settings, read = recording(settings)
    await TOOLS[command](argparse.Namespace(**args), tool_settings)
    assert read
    assert read <= set(listed(command, capsys))


def test_migrate_help_lists_only_the_database_and_logging(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``migrate --help`` lists DATABASE_URL and the logging settings, no Redis."""
    assert listed("migrate", capsys) == [
        "DATABASE_URL",
        "STREAMREC_LOG_FORMAT",
        "STREAMREC_LOG_LEVEL",
    ]
