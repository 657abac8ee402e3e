"""Command line: python -m streamrec {serve,consume,run,migrate,status,dev}."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
from redis.exceptions import RedisError

from streamrec import devrun, service, status, store
from streamrec import logging as logs
from streamrec.keys import Keys
from streamrec.settings import ConfigError, Settings, load_settings

COMMON = "REDIS_URL, STREAMREC_NAMESPACE, STREAMREC_LOG_FORMAT, STREAMREC_LOG_LEVEL"
WEBHOOK = (
    "TWILIO_ACCOUNT_SID, TWILIO_AUTH_TOKEN, STREAMREC_PUBLIC_URL, STREAMREC_HTTP_HOST, "
    "STREAMREC_HTTP_PORT, STREAMREC_MAX_BODY_BYTES, STREAMREC_DEDUPE_TTL_S"
)
CONSUMER = (
    "DATABASE_URL, TWILIO_ACCOUNT_SID, TWILIO_AUTH_TOKEN, STREAMREC_TWILIO_API_BASE, "
    "STREAMREC_MEDIA_DIR, STREAMREC_MEDIA_MAX_BYTES, OPENAI_API_KEY, OPENAI_BASE_URL, "
    "STREAMREC_TRANSCRIBE_MODEL, STREAMREC_CONCURRENCY, STREAMREC_CLAIM_IDLE_MS, "
    "STREAMREC_MAX_DELIVERIES, STREAMREC_RETRY_BASE_MS, STREAMREC_RETRY_MAX_MS, "
    "STREAMREC_HTTP_TIMEOUT_S, STREAMREC_SHUTDOWN_GRACE_S, STREAMREC_BLOCK_MS, "
    "STREAMREC_CONSUMER_NAME"
)

COMMANDS = {
    "serve": ("serve the Twilio webhook (POST /twilio/recording, GET /healthz)", WEBHOOK),
    "consume": ("run one consumer-group worker; run as many replicas as you like", CONSUMER),
    "run": ("serve the webhook and run one consumer in this process", f"{WEBHOOK}, {CONSUMER}"),
    "migrate": ("create or upgrade the PostgreSQL schema (idempotent)", "DATABASE_URL"),
    "status": ("summarise stream length, lag, pending entries, consumers, dead letters", ""),
    "dev": (
        "serve and consume on this machine, starting local Redis/PostgreSQL if none answer",
        f"{WEBHOOK}, {CONSUMER}",
    ),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamrec",
        description="Twilio call recordings from webhook to stored, transcribed result.",
        epilog="Settings come from the environment, .env or config/streamrec.env; see README.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (summary, reads) in COMMANDS.items():
        settings = ", ".join(s for s in (reads, COMMON) if s)
        cmd = sub.add_parser(name, help=summary, description=summary, epilog=f"Reads: {settings}.")
        if name == "consume":
            cmd.add_argument(
                "--until-idle",
                action="store_true",
                help="exit once nothing is left to read or reclaim",
            )
        if name == "status":
            cmd.add_argument("--json", action="store_true", help="print one JSON document")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m streamrec`` and the ``streamrec`` script."""
    args = _parser().parse_args(argv)
    try:
        settings = load_settings()
        logs.configure(fmt=settings.log_format, level=settings.log_level)
        return asyncio.run(_dispatch(args, settings))
    except ConfigError as exc:
        print(f"streamrec: {exc}", file=sys.stderr)
        return 2
    except (OSError, RedisError, asyncpg.PostgresError) as exc:
        # Unreachable or refusing servers at start: one line, not a traceback.
        print(f"streamrec: {args.command} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


async def _dispatch(args: argparse.Namespace, settings: Settings) -> int:
    if args.command == "migrate":
        applied = await store.migrate(settings.database_url)
        print(f"migrations applied: {applied or 'none (up to date)'}")
        return 0
    if args.command == "status":
        return await _status(settings, as_json=args.json)
    runners: dict[str, Callable[[asyncio.Event], Awaitable[None]]] = {
        "serve": lambda stop: service.serve(settings, stop),
        "consume": lambda stop: service.consume(settings, stop, until_idle=args.until_idle),
        "run": lambda stop: service.run_all(settings, stop),
        "dev": lambda stop: devrun.run(settings, stop, Path(".dev").resolve()),
    }
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await runners[args.command](stop)
    return 0


async def _status(settings: Settings, *, as_json: bool) -> int:
    async with service.open_redis(settings) as redis:
        report = await status.collect(redis, Keys(settings.namespace))
    print(json.dumps(report, indent=2) if as_json else status.render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
