"""``streamrec dev``: the whole service on one machine with one command.

Uses the Redis and PostgreSQL that REDIS_URL and DATABASE_URL name, or that
answer on the default ports. When neither is configured nor answering, it
starts its own servers with their data under ``.dev/`` (Redis with AOF on),
and stops them again on exit. Without Twilio credentials it uses a local
development account and serves that account's recordings itself (a second of
silent mp3 each), so ``streamrec simulate`` goes all the way to a completed row.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import structlog
from aiohttp import web
from pydantic import SecretStr

from streamrec import schema, service
from streamrec.devservers import LocalPostgres, LocalRedis, answers, free_port
from streamrec.settings import Settings

log = structlog.get_logger("streamrec.dev")

UI_TOKEN_FILE = "ui-token"  # noqa: S105 - a file name, not the token
"""Where ``dev`` keeps the dashboard's token when STREAMREC_UI_TOKEN is not set."""
DEV_ACCOUNT_SID = "AC" + "0" * 32
DEV_AUTH_TOKEN = "dev-auth-token"  # noqa: S105 - a fixed, local-only development secret


@contextlib.contextmanager
def local_servers(settings: Settings, directory: Path) -> Iterator[Settings]:
    """Settings pointing at working servers, starting local ones where needed."""
    updates: dict[str, object] = {}
    started: list[LocalRedis | LocalPostgres] = []
    try:
        if "redis_url" not in settings.model_fields_set and not answers("127.0.0.1", 6379):
            redis = LocalRedis(directory / "redis", 6379, appendonly=True).start()
            started.append(redis)
            updates["redis_url"] = redis.url
            log.info("local_redis_started", url=redis.url, data=str(redis.directory))
        if "database_url" not in settings.model_fields_set and not answers("127.0.0.1", 5432):
            # As root the cluster runs as the postgres user, who must reach its directory.
            pg_dir = Path("/var/lib/streamrec-dev") if os.geteuid() == 0 else directory
            postgres = LocalPostgres(pg_dir / "postgres", 5432).start()
            started.append(postgres)
            updates["database_url"] = postgres.url("streamrec")
            log.info("local_postgres_started", url=updates["database_url"])
        if not settings.twilio_account_sid or not settings.twilio_auth_token:
            updates["twilio_account_sid"] = DEV_ACCOUNT_SID
            updates["twilio_auth_token"] = SecretStr(DEV_AUTH_TOKEN)
            log.warning(
                "development_account",
                account_sid=DEV_ACCOUNT_SID,
                hint="set TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN for real callbacks",
            )
        yield settings.model_copy(update=updates)
    finally:
        for server in reversed(started):
            server.stop()


DEV_RECORDING_S = 1
"""How long each development recording is; ``simulate`` says so as RecordingDuration."""
# That much silence: MPEG-1 Layer III frames (128 kbit/s, 44.1 kHz) of 417 bytes, each
# 1152 samples long.
_SILENT_FRAME = b"\xff\xfb\x90\x00" + bytes(413)
SILENCE_MP3 = b"ID3\x04\x00\x00\x00\x00\x00\x00" + _SILENT_FRAME * round(
    DEV_RECORDING_S * 44_100 / 1152
)


async def _silence(request: web.Request) -> web.Response:
    return web.Response(body=SILENCE_MP3, content_type="audio/mpeg")


@contextlib.asynccontextmanager
async def dev_media(settings: Settings) -> AsyncIterator[Settings]:
    """For the development account, serve its recordings locally and point the API base there."""
    if settings.twilio_account_sid != DEV_ACCOUNT_SID:
        yield settings
        return
    app = web.Application()
    app.router.add_get(f"/2010-04-01/Accounts/{DEV_ACCOUNT_SID}/Recordings/{{sid}}.mp3", _silence)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        # The development account has no REST API to reconcile against.
        local = {"twilio_api_base": f"http://127.0.0.1:{port}", "reconcile_interval_s": 0.0}
        yield settings.model_copy(update=local)
    finally:
        await runner.cleanup()


async def run(settings: Settings, stop: asyncio.Event, directory: Path) -> None:
    """Run webhook and consumer against working servers until ``stop``.

    ``dev_ready`` is logged once the database exists and the webhook listens;
    a failure before (port taken, server unreachable) raises instead. The
    dashboard is on: with STREAMREC_UI_TOKEN, or else a token of its own kept
    in ``directory/ui-token`` (made once; the log names the file, not the token).
    """
    with local_servers(dashboard_on(settings, directory), directory) as servers:
        async with dev_media(servers) as ready:
            await schema.migrate(ready.database_url)
            await service.run_all(ready, stop, on_ready=lambda: _ready(ready))


def dashboard_on(settings: Settings, directory: Path) -> Settings:
    """``settings`` with a dashboard token: its own, or the one kept in ``directory``."""
    if settings.ui_token is not None and settings.ui_token.get_secret_value():
        return settings
    kept = directory / UI_TOKEN_FILE
    if not kept.exists():
        directory.mkdir(parents=True, exist_ok=True)
        kept.touch(mode=0o600)
        kept.write_text(secrets.token_urlsafe(32) + "\n", encoding="utf-8")
    token = kept.read_text(encoding="utf-8").strip()
    return settings.model_copy(update={"ui_token": SecretStr(token)})


def _ready(settings: Settings) -> None:
    # The URLs may carry passwords: the log's redaction masks them.
    local = f"http://127.0.0.1:{settings.http_port}"
    log.info(
        "dev_ready",
        webhook=f"{local}/twilio/recording?business_id=1",
        dashboard=f"{local}/ui/",
        dashboard_token=f"STREAMREC_UI_TOKEN, or the one in .dev/{UI_TOKEN_FILE}",
        redis=settings.redis_url,
        database=settings.database_url,
        try_it="python -m streamrec simulate; python -m streamrec status",
    )
