"""The command line, run as ``python -m streamrec`` in a subprocess."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import asyncpg
import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from streamrec.__main__ import main
from streamrec.devservers import LocalRedis, free_port
from streamrec.events import RecordingEvent
from streamrec.keys import Keys
from streamrec.partitions import Layout
from streamrec.settings import Settings
from tests.conftest import entries, wait_for
from tests.processes import environment
from tests.standins import ACCOUNT_SID, AUTH_TOKEN, MediaStandIn, call_sid, recording_sid
from tests.test_events import BAD_BUSINESS_IDS
from tests.test_status import PARTS, partitioned

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


def failure_lines(stderr: str) -> list[str]:
    """What a process printed to stderr besides its JSON log lines."""
    return [line for line in stderr.splitlines() if line and not line.startswith("{")]


@pytest.mark.parametrize(
    ("command", "variable", "raw"),
    [
        ("status", "REDIS_URL", "notaurl"),
        ("consume", "REDIS_URL", "http://:hunter2@cache:6379/0"),
        ("migrate", "DATABASE_URL", "mysql://rec:hunter2@db/rec"),
    ],
)
async def test_a_malformed_url_exits_2_naming_its_variable(
    env: dict[str, str], tmp_path: Path, command: str, variable: str, raw: str
) -> None:
    """A URL of the wrong scheme ends with 2 and one line naming its variable, not echoing it."""
    finished = await streamrec(command, env=env | {variable: raw}, cwd=tmp_path)
    assert finished.returncode == 2
    [line] = failure_lines(finished.stderr)
    assert line.startswith(f"streamrec: invalid configuration: {variable}: must start with ")
    assert "hunter2" not in finished.stdout + finished.stderr


async def test_start_up_failures_are_one_line_naming_server_and_address(
    env: dict[str, str], tmp_path: Path, database_url: str
) -> None:
    """Redis down, a database host that does not resolve: one line each, host:port, exit 1."""
    closed = free_port()
    cases = [
        (
            ["consume"],
            {"REDIS_URL": f"redis://:hunter2@127.0.0.1:{closed}/0", "DATABASE_URL": database_url},
            f"Redis at 127.0.0.1:{closed}",
        ),
        (
            ["status"],
            {"REDIS_URL": f"redis://:hunter2@127.0.0.1:{closed}/0"},
            f"Redis at 127.0.0.1:{closed}: ConnectionError",
        ),
        (
            ["migrate"],
            {"DATABASE_URL": "postgresql://rec:hunter2@nowhere.invalid:6543/rec"},
            "PostgreSQL at nowhere.invalid:6543",
        ),
    ]
    env |= {"TWILIO_ACCOUNT_SID": ACCOUNT_SID, "TWILIO_AUTH_TOKEN": AUTH_TOKEN}
    env |= {"STREAMREC_METRICS_PORT": "0", "STREAMREC_LOG_FORMAT": "json"}
    for args, variables, where in cases:
        finished = await streamrec(*args, env=env | variables, cwd=tmp_path)
        assert finished.returncode == 1, finished.stderr
        [line] = failure_lines(finished.stderr)
        assert line.startswith(f"streamrec: {args[0]} failed: ") and where in line, line
        assert "hunter2" not in finished.stdout + finished.stderr


BAD_IDS_ON_THE_COMMAND_LINE = [b for b in BAD_BUSINESS_IDS if b in (".", "..", "a b")]


@pytest.mark.parametrize("business_id", BAD_IDS_ON_THE_COMMAND_LINE)
async def test_commands_refuse_a_bad_business_id(
    env: dict[str, str],
    tmp_path: Path,
    settings: Settings,
    redis: aioredis.Redis,
    db: Any,
    business_id: str,
) -> None:
    """``slots set/unset`` and ``numbers add`` exit 2 on an id the webhook refuses; nothing set."""
    env = environment(settings)
    for args in (
        ["slots", "set", business_id, "3"],
        ["slots", "unset", business_id],
        ["numbers", "add", "+15551234567", business_id],
    ):
        finished = await streamrec(*args, env=env, cwd=tmp_path)
        assert finished.returncode == 2, (args, finished.stdout)
        assert "is not a business id" in finished.stderr
    assert await redis.hgetall(Keys(settings.namespace).slot_limits) == {}
    assert await db.fetchval("SELECT count(*) FROM numbers") == 0


async def test_a_slot_limit_lands_in_its_business_partition(
    env: dict[str, str], tmp_path: Path, settings: Settings, redis: aioredis.Redis, keys: Keys
) -> None:
    """With four partitions, ``slots set`` writes the limit beside the business's slots (its
    partition's hash of limits, no other), ``slots list`` shows it, ``slots unset`` clears it."""
    env = environment(settings, STREAMREC_PARTITIONS=str(PARTS))
    async with partitioned(redis, keys) as layout:
        # Two businesses of different partitions, so that a misplaced limit would show.
        first = layout.of("42").partition
        other = next(f"b{n}" for n in range(100) if layout.of(f"b{n}").partition != first)
        for business, limit in (("42", "5"), (other, "2")):
            done = await streamrec("slots", "set", business, limit, env=env, cwd=tmp_path)
            assert done.returncode == 0, done.stderr
        limits = [await redis.hgetall(part.slot_limits) for part in layout]
        assert limits[first] == {"42": "5"}
        assert limits[layout.of(other).partition] == {other: "2"}
        assert sum(len(found) for found in limits) == 2
        listed = await streamrec("slots", "list", env=env, cwd=tmp_path)
        rows = [line.split() for line in listed.stdout.splitlines()[1:]]
        assert sorted(rows) == sorted([["42", "0/5", "parked", "0"], [other, "0/2", "parked", "0"]])
        unset = await streamrec("slots", "unset", "42", env=env, cwd=tmp_path)
        assert unset.returncode == 0, unset.stderr
        assert await redis.hgetall(layout.partitions[first].slot_limits) == {}
        assert await redis.get(layout.home.partitions) is None  # checked, never recorded


async def test_operations_commands_refuse_another_partition_count(
    env: dict[str, str], tmp_path: Path, settings: Settings, redis: aioredis.Redis, keys: Keys
) -> None:
    """With 4 partitions recorded, ``dlq`` and ``slots`` configured for 2 exit 2 saying
    both counts, and change nothing."""
    await redis.set(keys.partitions, PARTS)
    env = environment(settings, STREAMREC_PARTITIONS="2")
    for args in (["dlq", "list"], ["dlq", "purge", "--yes"], ["slots", "set", "42", "3"]):
        finished = await streamrec(*args, env=env, cwd=tmp_path)
        assert finished.returncode == 2, (args, finished.stdout)
        assert f"STREAMREC_PARTITIONS is 2, but namespace {keys.namespace!r} has 4" in (
            finished.stderr
        )
    assert await redis.get(keys.partitions) == str(PARTS)
    assert [await redis.hgetall(part.slot_limits) for part in Layout(keys.namespace, 2)] == [{}, {}]


def audio_outside(root: Path, media_dir: Path) -> list[Path]:
    """The audio files under ``root`` that are not under ``media_dir``."""
    return [path for path in root.rglob("*.mp3") if media_dir not in path.parents]


async def test_a_dot_dot_business_writes_nothing_outside_the_media_dir(
    tmp_path: Path, settings: Settings, redis: aioredis.Redis, media: MediaStandIn
) -> None:
    """An entry of business ``..`` is dead-lettered unread: no file lands beside the media dir."""
    keys = Keys(settings.namespace)
    sid = recording_sid()
    event = RecordingEvent(recording_sid=sid, call_sid=call_sid(), account_sid=ACCOUNT_SID,
                           business_id="..", status="completed")  # fmt: skip
    await redis.xadd(keys.stream, event.to_fields())  # type: ignore[arg-type]
    finished = await streamrec("consume", "--until-idle", env=environment(settings), cwd=tmp_path)
    assert finished.returncode == 0, finished.stderr
    assert audio_outside(tmp_path, settings.media_dir) == []
    assert media.requests[sid] == 0
    [(_, letter)] = await entries(redis, keys.dead)
    assert "business_id" in letter["error"]


COMMANDS = (
    "serve", "consume", "run", "dev", "migrate", "status", "check", "simulate", "dlq", "slots",
    "reconcile", "numbers", "businesses", "partitions",
)  # fmt: skip
ACTIONS = {
    "dlq": ("list", "replay", "purge"),
    "slots": ("list", "set", "unset"),
    "numbers": ("add", "list", "remove"),
    "businesses": ("set", "unset", "delete", "show", "list"),
    "partitions": ("show", "set"),
}


def help_of(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """What ``streamrec *args --help`` prints (the real parser, in this process)."""
    with pytest.raises(SystemExit) as exited:
        main([*args, "--help"])
    assert exited.value.code == 0
    return capsys.readouterr().out


def test_every_help_lists_real_variables_once(capsys: pytest.CaptureFixture[str]) -> None:
    """Each command's --help names only variables Settings reads, each once; serve's names
    DATABASE_URL (its /readyz checks it); migrate's names no Redis setting."""
    found = {command: listed_settings(help_of(capsys, command)) for command in COMMANDS}
    for command, names in found.items():
        assert len(names) == len(set(names)), (command, names)
        assert set(names) <= setting_names(), command
    assert "DATABASE_URL" in found["serve"]
    assert not {"REDIS_URL", "STREAMREC_NAMESPACE"} & set(found["migrate"])
    assert set(found["run"]) == set(found["serve"]) | set(found["consume"])


def test_every_action_has_a_description(capsys: pytest.CaptureFixture[str]) -> None:
    """Actions of ``dlq``, ``slots``, ``numbers`` and ``businesses`` describe themselves
    in their own --help as in their command's list."""
    for command, actions in ACTIONS.items():
        rows = _listing(help_of(capsys, command))
        summaries = {row.split()[0]: " ".join(row.split()[1:]) for row in rows}
        for action in actions:
            assert summaries[action], (command, action)
            own = " ".join(help_of(capsys, command, action).split())
            assert summaries[action] in own, (command, action)


def _listing(help_text: str) -> list[str]:
    """The rows of the ACTION list in a command's --help (after its ``ACTION`` line)."""
    lines = help_text.splitlines()
    rows = []
    for line in lines[lines.index("  ACTION") + 1 :]:
        if not line.startswith("    "):
            break
        rows.append(line)
    return rows


@pytest_asyncio.fixture(loop_scope="session")
async def redis_with_password(tmp_path: Path) -> AsyncIterator[str]:
    """A Redis server of this test's own that requires the password ``redsecret``: its URL."""
    server = LocalRedis(tmp_path / "redis").start()
    client = aioredis.Redis.from_url(server.url)
    await client.config_set("requirepass", "redsecret")
    await client.aclose()
    yield f"redis://:redsecret@127.0.0.1:{server.port}/0"
    server.stop()


@pytest_asyncio.fixture(loop_scope="session")
async def new_database(postgres: str) -> AsyncIterator[str]:
    """The URL, with the password ``pgsecret``, of a database that does not exist yet."""
    name = f"dev_{uuid.uuid4().hex[:12]}"
    server = urlsplit(postgres)
    yield f"postgresql://{server.username}:pgsecret@{server.hostname}:{server.port}/{name}"
    admin = await asyncpg.connect(postgres)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await admin.close()


def spawn_dev(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """Start ``python -m streamrec dev`` in ``log``'s directory, its output going to ``log``."""
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "streamrec", "dev"],
            env=env, cwd=log.parent, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip


async def test_dev_is_ready_once_listening_and_a_second_dev_fails_in_one_line(
    env: dict[str, str],
    tmp_path: Path,
    redis_with_password: str,
    new_database: str,
    children: list[subprocess.Popen[bytes]],
) -> None:
    """dev_ready follows the database and the webhook, passwords masked; a second dev exits 1."""
    port = free_port()
    env |= {
        "REDIS_URL": redis_with_password,
        "DATABASE_URL": new_database,
        "STREAMREC_HTTP_HOST": "127.0.0.1",
        "STREAMREC_HTTP_PORT": str(port),
        "STREAMREC_METRICS_PORT": "0",
        "STREAMREC_LOG_FORMAT": "json",
    }
    log = tmp_path / "dev.log"
    first = spawn_dev(env, log)
    children.append(first)
    await wait_for(lambda: "dev_ready" in log.read_text(), what="dev_ready")
    events = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    names = [e["event"] for e in events]
    assert names.index("database_created") < names.index("webhook_ready") < names.index("dev_ready")
    [ready] = [e for e in events if e["event"] == "dev_ready"]
    assert ready["redis"] == redis_with_password.replace("redsecret", "***")
    assert ready["database"] == new_database.replace("pgsecret", "***")
    assert "secret" not in log.read_text()
    # The dashboard is on, behind a token kept in .dev/ui-token (not in the log).
    assert ready["dashboard"] == f"http://127.0.0.1:{port}/ui/"
    token = (tmp_path / ".dev" / "ui-token").read_text().strip()
    assert len(token) >= 32
    assert token not in log.read_text()
    async with aiohttp.ClientSession() as session:
        login = f"http://127.0.0.1:{port}/ui/login"
        async with session.post(login, data={"token": token}, allow_redirects=False) as answer:
            assert answer.status == 303
            assert "streamrec_ui" in answer.cookies

    second = await streamrec("dev", env=env, cwd=tmp_path)
    assert second.returncode == 1
    [line] = failure_lines(second.stderr)
    assert line == (
        f"streamrec: dev failed: CannotListen: cannot listen on 127.0.0.1:{port}:"
        " Address already in use"
    )
    assert "dev_ready" not in second.stderr

    first.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(first.wait, DEADLINE_S) == 0
