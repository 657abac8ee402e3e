"""Command line: python -m streamrec COMMAND (see --help); nothing else lives here."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections.abc import Awaitable, Callable
from datetime import date
from pathlib import Path

import asyncpg
from redis.asyncio import Redis
from redis.exceptions import RedisError

from streamrec import (
    businesses,
    deadletters,
    devrun,
    health,
    numbers,
    partitions,
    reads,
    reconcile,
    repartition,
    schema,
    semaphore,
    service,
    simulate,
    status,
)
from streamrec import logging as logs
from streamrec.devservers import ServerError
from streamrec.events import BUSINESS_ID_RULE, is_business_id
from streamrec.loops import loop_factory, tune_gc
from streamrec.metrics import Metrics
from streamrec.partitions import Layout
from streamrec.retry import describe
from streamrec.settings import ConfigError, Settings, address, load_settings

Tool = Callable[[argparse.Namespace, Settings], Awaitable[int]]

SUMMARIES = {
    "serve": "serve the Twilio webhook (/twilio/recording, /healthz, /readyz, /metrics)",
    "consume": "run one consumer-group worker; run as many replicas as you like",
    "run": "serve the webhook and run one consumer in this process",
    "dev": "serve and consume on this machine, starting local Redis/PostgreSQL if none answer",
    "migrate": "create or upgrade the PostgreSQL schema (idempotent)",
    "status": "summarise lag, pending and oldest waiting entries, throughput, consumers,"
    " dead letters and slots",
    "check": "exit 0 if Redis answers and a consumer heartbeat is fresh, else 1",
    "simulate": "post RecordingStatusCallbacks signed with the configured token",
    "dlq": "list, replay or purge dead letters",
    "slots": "show or change per-business slot limits",
    "reconcile": "enqueue the account's recordings whose callbacks never arrived"
    " (Twilio's REST API)",
    "numbers": "map phone numbers to businesses, for reconcile",
    "businesses": "per-business transcription: mode, model, language, channels, speakers",
    "partitions": "show the partition layout, or change the partition count once drained",
}
LOGGING = ("STREAMREC_LOG_FORMAT", "STREAMREC_LOG_LEVEL")
"""What ``main`` reads for every command before running it."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamrec",
        description="Twilio call recordings from webhook to stored, transcribed result.",
        epilog="Settings come from the environment, .env or config/streamrec.env; see README.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands = {}
    for name, summary in SUMMARIES.items():
        # Found in the code the command runs, so the list cannot drift from it.
        variables = ", ".join(dict.fromkeys([*reads.variables_read(TOOLS[name]), *LOGGING]))
        commands[name] = sub.add_parser(
            name, help=summary, description=summary, epilog=f"Reads: {variables}."
        )
    commands["consume"].add_argument(
        "--until-idle", action="store_true", help="exit once nothing is left to read or reclaim"
    )
    commands["migrate"].add_argument(
        "--wait", type=float, default=0.0, metavar="SECONDS",
        help="wait up to SECONDS for PostgreSQL to accept connections (default 0: fail at once)",
    )  # fmt: skip
    _status_parser(commands["status"])
    check = commands["check"].add_mutually_exclusive_group()
    check.add_argument("--consumer", metavar="NAME", help="this consumer's heartbeat must be fresh")
    check.add_argument(
        "--this-host", action="store_true", help="a heartbeat from a consumer on this host"
    )
    sim = commands["simulate"]
    sim.add_argument("--business-id", default="1", help="tenant in the callback URL (default 1)")
    sim.add_argument("--status", default="completed", help="RecordingStatus (default completed)")
    sim.add_argument("--count", type=int, default=1, help="how many callbacks (default 1)")
    sim.add_argument("--recording-sid", help="use this RecordingSid instead of a random one")
    sim.add_argument(
        "--url", help="post here instead of STREAMREC_PUBLIC_URL (still signed over it)"
    )
    _dlq_parser(commands["dlq"])
    _reconcile_parser(commands["reconcile"])
    _numbers_parser(commands["numbers"])
    businesses.add_arguments(commands["businesses"])
    repartition.add_arguments(commands["partitions"])
    slots = commands["slots"].add_subparsers(dest="action", required=True, metavar="ACTION")
    _action(slots, "list", "per business: slots in use / limit, parked entries")
    limit = _action(slots, "set", "override one business's limit")
    limit.add_argument("business_id", type=_business_id)
    limit.add_argument("limit", type=int)
    unset = _action(slots, "unset", "back to STREAMREC_BUSINESS_SLOTS")
    unset.add_argument("business_id", type=_business_id)
    return parser


def _action(
    actions: argparse._SubParsersAction[argparse.ArgumentParser], name: str, summary: str
) -> argparse.ArgumentParser:
    """An action of a command, its summary shown in the command's help and its own."""
    return actions.add_parser(name, help=summary, description=summary)


def _status_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument(
        "--watch", nargs="?", type=float, const=2.0, metavar="SECONDS",
        help="redraw in place every SECONDS (default 2) until Ctrl-C; with --json,"
        " one document per line",
    )  # fmt: skip
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)  # frames, then exit


def _business_id(value: str) -> str:
    """A business id argument, checked as the webhook checks it (else exit 2 saying the rule)."""
    if not is_business_id(value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a business id ({BUSINESS_ID_RULE})")
    return value


def _dlq_parser(dlq: argparse.ArgumentParser) -> None:
    actions = dlq.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = _action(actions, "list", "show dead letters, oldest first")
    listing.add_argument("--count", type=int, default=100, help="at most this many (default 100)")
    listing.add_argument("--json", action="store_true", help="one JSON document")
    replay = _action(actions, "replay", "put dead letters back on the stream to run again")
    which = replay.add_mutually_exclusive_group(required=True)
    which.add_argument("ids", nargs="*", default=[], metavar="ID", help="dead-letter ids")
    which.add_argument("--all", action="store_true", help="every dead letter")
    purge = _action(actions, "purge", "delete dead letters (all, or the given ids)")
    purge.add_argument("ids", nargs="*", metavar="ID", help="only these dead-letter ids")
    purge.add_argument("--yes", action="store_true", help="do not ask for confirmation")


def _reconcile_parser(parser: argparse.ArgumentParser) -> None:
    window = parser.add_mutually_exclusive_group()
    window.add_argument(
        "--since", type=reconcile.parse_hours, metavar="SPAN",
        help="recordings of the last SPAN (90m, 48h, 2d; default STREAMREC_RECONCILE_LOOKBACK_H)",
    )  # fmt: skip
    window.add_argument(
        "--from", dest="first", type=date.fromisoformat, metavar="DATE",
        help="from this GMT day (YYYY-MM-DD), whole days as Twilio filters",
    )  # fmt: skip
    parser.add_argument(
        "--to", dest="last", type=date.fromisoformat, metavar="DATE",
        help="to this GMT day, inclusive (with --from; default today)",
    )  # fmt: skip
    parser.add_argument("--dry-run", action="store_true", help="count, enqueue nothing")
    parser.add_argument(
        "--json", action="store_true", help="one JSON document, unassigned recordings listed"
    )


def _numbers_parser(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = _action(actions, "add", "map a number (E.164, +15551234567) to a business")
    add.add_argument("number")
    add.add_argument("business_id", type=_business_id)
    _action(actions, "list", "every number and its business")
    remove = _action(actions, "remove", "forget a number")
    remove.add_argument("number")


FAILURES = (OSError, RedisError, asyncpg.PostgresError, asyncpg.InterfaceError, ServerError)
"""Errors a command ends on with one line and exit 1: a server unreachable or refusing, a
port taken. Anything else is a bug, and its traceback is shown."""


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m streamrec`` and the ``streamrec`` script.

    A configuration error exits 2, one of FAILURES exits 1: either as one line
    saying what failed and where, without credentials or a traceback.
    """
    args = _parser().parse_args(argv)
    settings = None
    try:
        settings = load_settings()
        logs.configure(
            fmt=settings.log_format, level=settings.log_level, secrets=settings.secrets()
        )
        tune_gc()
        factory = loop_factory(settings.event_loop == "uvloop")
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(_dispatch(args, settings))
    except Exception as exc:
        error = _first(exc)
        if isinstance(error, ConfigError | partitions.PartitionsChanged):
            print(f"streamrec: {error}", file=sys.stderr)
            return 2
        if settings is None or not isinstance(error, FAILURES):
            raise
        print(f"streamrec: {args.command} failed: {_failure(error, settings)}", file=sys.stderr)
        return 1


def _first(error: Exception) -> Exception:
    """``error``, or the first error of a task group (``run`` and ``dev`` run two services)."""
    while isinstance(error, ExceptionGroup):
        error = error.exceptions[0]
    return error


def _failure(error: Exception, settings: Settings) -> str:
    """What failed and where (host:port), in one line without credentials."""
    where = ""
    if isinstance(error, RedisError) and not isinstance(error, health.UnsupportedRedis):
        where = f"Redis at {address(settings.redis_url)}: "  # its errors may not say Redis
    elif isinstance(error, asyncpg.PostgresError | asyncpg.InterfaceError):
        where = f"PostgreSQL at {address(settings.database_url)}: "
    return logs.redact(where + describe(error), settings.secrets())


async def _dispatch(args: argparse.Namespace, settings: Settings) -> int:
    return await TOOLS[args.command](args, settings)


async def _until_signalled(run: Callable[[asyncio.Event], Awaitable[None]]) -> int:
    """Run ``run`` until SIGTERM or SIGINT sets its stop event and it returns; 0 then."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await run(stop)
    return 0


async def _serve(args: argparse.Namespace, settings: Settings) -> int:
    return await _until_signalled(lambda stop: service.serve(settings, stop))


async def _consume(args: argparse.Namespace, settings: Settings) -> int:
    return await _until_signalled(
        lambda stop: service.consume(settings, stop, until_idle=args.until_idle)
    )


async def _run(args: argparse.Namespace, settings: Settings) -> int:
    return await _until_signalled(lambda stop: service.run_all(settings, stop))


async def _dev(args: argparse.Namespace, settings: Settings) -> int:
    return await _until_signalled(lambda stop: devrun.run(settings, stop, Path(".dev").resolve()))


async def _migrate(args: argparse.Namespace, settings: Settings) -> int:
    applied = await schema.migrate(settings.database_url, wait_s=args.wait)
    print(f"migrations applied: {applied or 'none (up to date)'}")
    return 0


async def _checked(redis: Redis, layout: Layout) -> Layout:
    """The configured ``layout``, once Redis agrees on the partition count.

    The operations commands check the count Redis records but never record it
    (``partitions.claim`` is for the processes that run the streams): they
    raise PartitionsChanged (exit 2) when it differs, as a wrong count would
    read, or write, other partitions' keys.
    """
    recorded = await partitions.recorded(redis, layout.namespace)
    if recorded is not None and recorded != layout.count:
        raise partitions.PartitionsChanged(
            f"STREAMREC_PARTITIONS is {layout.count}, but namespace {layout.namespace!r} "
            f"has {recorded} partitions (recorded in {layout.home.partitions}). "
            f"Run with STREAMREC_PARTITIONS={recorded}."
        )
    return layout


async def _status(args: argparse.Namespace, settings: Settings) -> int:
    async with service.open_redis(settings) as redis:
        layout = await _checked(redis, settings.layout)
        if args.watch is not None:
            return await _until_signalled(
                lambda stop: status.watch(
                    redis, layout, default_slots=settings.business_slots, every_s=args.watch,
                    as_json=args.json, frames=args.count, stop=stop,
                )
            )  # fmt: skip
        report = await status.collect(redis, layout, default_slots=settings.business_slots)
    print(json.dumps(report, indent=2) if args.json else status.render(report))
    return 0


async def _check(args: argparse.Namespace, settings: Settings) -> int:
    async with service.open_redis(settings) as redis:
        try:
            layout = await _checked(redis, settings.layout)
        except partitions.PartitionsChanged as exc:
            # 1, not 2: a container health check knows only healthy (0) or not (1).
            print(f"streamrec: {exc}", file=sys.stderr)
            return 1
        except (RedisError, OSError):
            layout = settings.layout  # check says "redis unreachable" in its own words
        healthy, why = await health.check(
            redis, layout, consumer=args.consumer, this_host=args.this_host
        )
    print(why, file=sys.stdout if healthy else sys.stderr)
    return 0 if healthy else 1


async def _simulate(args: argparse.Namespace, settings: Settings) -> int:
    if settings.twilio_account_sid and settings.twilio_auth_token:
        account_sid, token = settings.twilio_credentials()
    else:
        account_sid, token = devrun.DEV_ACCOUNT_SID, devrun.DEV_AUTH_TOKEN
        print("no Twilio credentials set: signing as the development account", file=sys.stderr)
    try:
        posted = await simulate.post_callbacks(
            account_sid=account_sid,
            auth_token=token,
            public_url=settings.public_url,
            post_to=args.url,
            business_id=args.business_id,
            status=args.status,
            count=args.count,
            recording_sid=args.recording_sid,
            on_answer=_print_answer,
        )
    except simulate.Interrupted as exc:
        url = args.url or settings.public_url
        print(f"streamrec: simulate stopped, no answer from {url}: {exc}", file=sys.stderr)
        print(f"streamrec: {simulate.summary(exc.posted, args.count)}", file=sys.stderr)
        return 1
    print(f"streamrec: {simulate.summary(posted, args.count)}", file=sys.stderr)
    return 0 if all(answer.accepted for answer in posted) else 1


def _print_answer(answer: simulate.Posted) -> None:
    """One line per answer as it arrives, so progress shows (and survives an error)."""
    print(f"{answer.recording_sid} {answer.status} {answer.body}", flush=True)


async def _dlq(args: argparse.Namespace, settings: Settings) -> int:
    async with service.open_redis(settings) as redis:
        layout = await _checked(redis, settings.layout)
        try:
            if args.action == "list":
                letters = await deadletters.listing(redis, layout, count=args.count)
                print(
                    deadletters.render(letters, as_json=args.json, partitioned=layout.partitioned)
                )
                return 0
            if args.action == "replay":
                return await _replay(redis, layout, args)
            return await _purge(redis, layout, args)
        except deadletters.Ambiguous as exc:
            print(f"streamrec: nothing done: {exc}", file=sys.stderr)
            return 2


async def _replay(redis: Redis, layout: Layout, args: argparse.Namespace) -> int:
    """``dlq replay``: each letter back on its own partition's stream."""
    if args.all:
        print(f"replayed {await deadletters.replay_all(redis, layout)}")
        return 0
    moved = await deadletters.replay_refs(redis, layout, args.ids)
    for old, new in moved.items():
        if new is None:
            print(f"{old}: no such dead letter")
        else:
            partition, new_id = new
            shown = deadletters.qualified(partition, new_id) if layout.partitioned else new_id
            print(f"{old} -> {shown}")
    return 0 if all(moved.values()) else 1


async def _purge(redis: Redis, layout: Layout, args: argparse.Namespace) -> int:
    if args.ids:
        await deadletters.locate(redis, layout, args.ids)  # an ambiguous id: refused before asking
    what = str(len(args.ids)) if args.ids else f"all {await deadletters.total(redis, layout)}"
    if not args.yes:
        if not sys.stdin.isatty():
            print("streamrec: dlq purge deletes for good; confirm with --yes", file=sys.stderr)
            return 2
        where = status.named(layout).dead
        answer = await asyncio.to_thread(input, f"Delete {what} dead letters of {where}? [y/N] ")
        if answer.strip().lower() not in {"y", "yes"}:
            print("nothing deleted")
            return 1
    print(f"deleted {await deadletters.purge(redis, layout, args.ids or None)}")
    return 0


async def _slots(args: argparse.Namespace, settings: Settings) -> int:
    async with service.open_redis(settings) as redis:
        layout = await _checked(redis, settings.layout)
        if args.action in {"set", "unset"}:
            # A business's limit lives in its partition, beside its slots.
            slots = semaphore.Slots(
                redis, layout.of(args.business_id), default_limit=settings.business_slots,
                lease_ms=settings.lease_ms,
            )  # fmt: skip
            if args.action == "set" and args.limit < 1:
                print("streamrec: a limit is at least 1", file=sys.stderr)
                return 2
            await slots.set_limit(args.business_id, args.limit if args.action == "set" else None)
        rows = await status.businesses(redis, layout, default_limit=settings.business_slots)
    print(f"default limit {settings.business_slots or 'off'}")
    for row in rows:
        print(f"{row['business_id']:<36} {row['in_use']}/{row['limit']}  parked {row['parked']}")
    return 0


async def _reconcile(args: argparse.Namespace, settings: Settings) -> int:
    if args.last is not None and args.first is None:
        print("streamrec: --to needs --from", file=sys.stderr)
        return 2
    if args.first is not None:
        window = reconcile.Window(args.first, args.last)
    else:
        window = reconcile.Window.since(args.since or settings.reconcile_lookback_h)
    await schema.migrate(settings.database_url)
    async with (
        service.open_redis(settings) as redis,
        service.open_reconciler(settings, redis, Metrics()) as reconciler,
    ):
        outcome = await reconciler.run(window, dry_run=args.dry_run)
    if args.json:
        print(json.dumps(outcome.summary(), indent=2))
    else:
        would = " (dry run: nothing enqueued)" if args.dry_run else ""
        print(f"reconcile {window}: {outcome.line()}{would}")
        for r in outcome.unassigned_recordings:
            print(f"  unassigned {r['recording_sid']} call {r['call_sid']} to {r['to']}"
                  f" from {r['from']} ({r['direction']}): {r['reason']}")  # fmt: skip
    return 1 if outcome.error else 0


TOOLS: dict[str, Tool] = {
    "serve": _serve,
    "consume": _consume,
    "run": _run,
    "dev": _dev,
    "migrate": _migrate,
    "status": _status,
    "check": _check,
    "simulate": _simulate,
    "dlq": _dlq,
    "slots": _slots,
    "reconcile": _reconcile,
    "numbers": numbers.command,
    "businesses": businesses.command,
    "partitions": repartition.command,
}


if __name__ == "__main__":
    sys.exit(main())
