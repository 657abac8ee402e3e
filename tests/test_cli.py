"""The command line, run as ``python -m streamrec`` in a subprocess."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from streamrec.keys import Keys
from streamrec.settings import Settings
from tests.standins import ACCOUNT_SID, AUTH_TOKEN

DEADLINE_S = 60.0


@dataclass(frozen=True)
class Finished:
    """How a streamrec process ended."""

    returncode: int
    stdout: str
    stderr: str


def setting_names() -> set[str]:
    """Every variable Settings reads (and every field name, to keep those out too)."""
    names = {field.upper() for field in Settings.model_fields}
    for field in Settings.model_fields.values():
        if isinstance(field.validation_alias, str):
            names.add(field.validation_alias)
    return names


@pytest.fixture
def env() -> dict[str, str]:
    """This process's environment without any streamrec setting."""
    names = setting_names()
    return {name: value for name, value in os.environ.items() if name.upper() not in names}


async def streamrec(*args: str, env: dict[str, str], cwd: Path) -> Finished:
    """Run ``python -m streamrec *args`` to completion (killed after DEADLINE_S)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "streamrec",
        *args,
        cwd=cwd,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(DEADLINE_S):
            out, err = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        pytest.fail(f"streamrec {' '.join(args)} still running after {DEADLINE_S}s")
    assert process.returncode is not None
    return Finished(process.returncode, out.decode(), err.decode())


def listed_settings(help_text: str) -> list[str]:
    """The variables a subcommand's --help says it reads."""
    match = re.search(r"Reads: (.*?)\.(\s|$)", " ".join(help_text.split()))
    assert match, help_text
    return match[1].split(", ")


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (
            "serve",
            {
                "TWILIO_ACCOUNT_SID",
                "TWILIO_AUTH_TOKEN",
                "STREAMREC_PUBLIC_URL",
                "STREAMREC_HTTP_HOST",
                "STREAMREC_HTTP_PORT",
                "REDIS_URL",
                "STREAMREC_NAMESPACE",
            },
        ),
        (
            "consume",
            {
                "REDIS_URL",
                "DATABASE_URL",
                "TWILIO_ACCOUNT_SID",
                "TWILIO_AUTH_TOKEN",
                "STREAMREC_TWILIO_API_BASE",
                "STREAMREC_MEDIA_DIR",
                "OPENAI_API_KEY",
                "STREAMREC_TRANSCRIBE_MODEL",
                "STREAMREC_CONCURRENCY",
                "STREAMREC_CLAIM_IDLE_MS",
                "STREAMREC_MAX_DELIVERIES",
                "STREAMREC_NAMESPACE",
            },
        ),
        ("migrate", {"DATABASE_URL"}),
        ("status", {"REDIS_URL", "STREAMREC_NAMESPACE"}),
    ],
)
async def test_help_lists_the_settings_read(
    env: dict[str, str], tmp_path: Path, command: str, expected: set[str]
) -> None:
    """``<command> --help`` exits 0 and lists the settings it reads, each a real variable."""
    finished = await streamrec(command, "--help", env=env, cwd=tmp_path)
    assert finished.returncode == 0, finished.stderr
    listed = listed_settings(finished.stdout)
    assert expected <= set(listed)
    assert set(listed) <= setting_names()


async def test_bad_setting_exits_2_naming_it(env: dict[str, str], tmp_path: Path) -> None:
    """An invalid STREAMREC_CONCURRENCY ends the process with 2 and a message naming it."""
    env |= {"STREAMREC_CONCURRENCY": "abc"}
    finished = await streamrec("consume", env=env, cwd=tmp_path)
    assert finished.returncode == 2
    assert "STREAMREC_CONCURRENCY" in finished.stderr
    assert "Traceback" not in finished.stderr


async def test_serve_without_account_sid_exits_2_naming_it(
    env: dict[str, str], tmp_path: Path, redis_url: str
) -> None:
    """``serve`` without TWILIO_ACCOUNT_SID ends with 2 and a message naming it."""
    env |= {
        "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
        "REDIS_URL": redis_url,
        "STREAMREC_HTTP_HOST": "127.0.0.1",
        "STREAMREC_HTTP_PORT": "0",
    }
    finished = await streamrec("serve", env=env, cwd=tmp_path)
    assert finished.returncode == 2
    assert "TWILIO_ACCOUNT_SID" in finished.stderr
    assert "TWILIO_AUTH_TOKEN" not in finished.stderr
    assert AUTH_TOKEN not in finished.stdout + finished.stderr
    assert "Traceback" not in finished.stderr


async def test_migrate_exits_0(
    env: dict[str, str], tmp_path: Path, database_url: str, db: Any
) -> None:
    """``migrate`` against an up-to-date database exits 0 and leaves every version recorded."""
    env |= {"DATABASE_URL": database_url}
    finished = await streamrec("migrate", env=env, cwd=tmp_path)
    assert finished.returncode == 0, finished.stderr
    assert "migrations applied" in finished.stdout
    assert await db.fetchval("SELECT count(*) FROM schema_migrations") >= 1


async def pending_setup(redis: aioredis.Redis, keys: Keys) -> None:
    """Three entries, the group, and two of them read (not acked) by consumer c1."""
    for n in range(3):
        await redis.xadd(keys.stream, {"v": "1", "n": str(n)})
    await redis.xgroup_create(keys.stream, keys.group, id="0")
    await redis.xreadgroup(keys.group, "c1", {keys.stream: ">"}, count=2)


def status_env(env: dict[str, str], redis_url: str, keys: Keys) -> dict[str, str]:
    """``env`` pointed at the test Redis and this test's namespace."""
    return env | {
        "REDIS_URL": redis_url,
        "STREAMREC_NAMESPACE": keys.namespace,
        "TWILIO_ACCOUNT_SID": ACCOUNT_SID,
    }


async def test_status_json(
    env: dict[str, str], tmp_path: Path, redis_url: str, redis: aioredis.Redis, keys: Keys
) -> None:
    """``status --json`` reports length 3, pending 2, lag 1, no dead letters, c1 holding 2."""
    await pending_setup(redis, keys)
    finished = await streamrec(
        "status", "--json", env=status_env(env, redis_url, keys), cwd=tmp_path
    )
    assert finished.returncode == 0, finished.stderr
    report = json.loads(finished.stdout)
    assert report["stream"] == keys.stream
    assert report["group"] == keys.group
    assert report["length"] == 3
    assert report["pending"] == 2
    assert report["lag"] == 1
    assert report["dead_letters"] == 0
    assert [(c["name"], c["pending"]) for c in report["consumers"]] == [("c1", 2)]


async def test_status_summary_is_readable(
    env: dict[str, str], tmp_path: Path, redis_url: str, redis: aioredis.Redis, keys: Keys
) -> None:
    """Plain ``status`` prints the same figures as a few labelled lines."""
    await pending_setup(redis, keys)
    finished = await streamrec("status", env=status_env(env, redis_url, keys), cwd=tmp_path)
    assert finished.returncode == 0, finished.stderr
    text = " ".join(finished.stdout.split())
    assert keys.stream in text
    for phrase in ("length 3", "lag 1", "pending 2", "dead letters 0", "c1 pending 2"):
        assert phrase in text, phrase
    assert not finished.stdout.lstrip().startswith("{")


async def test_status_of_an_empty_namespace(
    env: dict[str, str], tmp_path: Path, redis_url: str, keys: Keys
) -> None:
    """``status`` before anything was enqueued exits 0 and reports an empty stream."""
    finished = await streamrec(
        "status", "--json", env=status_env(env, redis_url, keys), cwd=tmp_path
    )
    assert finished.returncode == 0, finished.stderr
    report = json.loads(finished.stdout)
    assert (report["length"], report["pending"], report["consumers"]) == (0, 0, [])
