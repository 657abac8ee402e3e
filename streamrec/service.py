"""Wiring: opens each resource in one place and runs the webhook and the consumer.

Every client is an async context manager entered on one AsyncExitStack, so they
close in reverse order of opening: work first, pools last.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

import aiohttp
import asyncpg
import redis.asyncio as aioredis
import structlog
from aiohttp import web
from redis.exceptions import RedisError

from streamrec import dashboard, health, partitions, schema, store, twilio_api
from streamrec.businesses import Businesses, default_profile
from streamrec.connections import open_redis, redis_client
from streamrec.consumer import Consumer, ConsumerConfig
from streamrec.conversation import Transcripts
from streamrec.keys import Keys
from streamrec.metrics import Metrics, serving
from streamrec.monitor import Monitor
from streamrec.pipeline import RecordingPipeline
from streamrec.producer import WEBHOOK_PATH, Enqueuer, WebhookConfig, create_app
from streamrec.reconcile import Reconciler, Schedule
from streamrec.retry import RetryPolicy
from streamrec.semaphore import Slots
from streamrec.settings import Settings
from streamrec.transcribe import Transcriber
from streamrec.twilio import MediaClient

if TYPE_CHECKING:
    import openai

log = structlog.get_logger("streamrec.service")

__all__ = ["consume", "open_redis", "redis_client", "run_all", "serve"]


@contextlib.asynccontextmanager
async def open_pool(settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    """An asyncpg pool sized for the consumer's concurrency."""
    # No connection floor: during a database outage a floor only means a
    # background task retrying (and logging) connects nobody asked for.
    pool = await asyncpg.create_pool(
        settings.database_url,
        min_size=0,
        max_size=min(settings.concurrency, 20),
        connection_class=store.PlainConnection,
    )
    try:
        yield pool
    finally:
        await pool.close()


def business_slots(settings: Settings, redis: aioredis.Redis) -> Slots | None:
    """The per-business slots, or None when STREAMREC_BUSINESS_SLOTS is 0 (no limit)."""
    if not settings.business_slots:
        return None
    return Slots(
        redis,
        Keys(settings.namespace),
        default_limit=settings.business_slots,
        lease_ms=settings.lease_ms,
    )


def consumer_config(settings: Settings) -> ConsumerConfig:
    """The consumer knobs from the settings."""
    return ConsumerConfig(
        name=settings.resolved_consumer_name,
        concurrency=settings.concurrency,
        claim_idle_ms=settings.claim_idle_ms,
        block_ms=settings.block_ms,
        shutdown_grace_s=settings.shutdown_grace_s,
        log_fields=("recording_sid", "call_sid", "business_id"),
        replica_acks=settings.min_replica_acks,
        retry=RetryPolicy(
            max_deliveries=settings.max_deliveries,
            base_s=settings.retry_base_ms / 1000,
            max_s=settings.retry_max_ms / 1000,
        ),
    )


async def consume(
    settings: Settings,
    stop: asyncio.Event,
    *,
    until_idle: bool = False,
    metrics: Metrics | None = None,
    serve_metrics: bool = True,
    check_redis: bool = True,
) -> None:
    """Run one consumer of the recording pipeline until ``stop`` (or idle).

    Beside it run its monitor (heartbeat, gauges, progress line), the scheduled
    reconcile (unless ``until_idle`` or ``STREAMREC_RECONCILE_INTERVAL_S`` is 0)
    and, when ``serve_metrics`` and ``STREAMREC_METRICS_PORT`` is not 0, a
    /metrics server on that port or the next free one (its heartbeat says which).
    With ``check_redis``, a Redis before 7.0 is refused first (UnsupportedRedis).
    """
    await schema.migrate(settings.database_url)
    metrics = metrics or Metrics()
    layout = settings.layout
    async with contextlib.AsyncExitStack() as stack:
        redis = await stack.enter_async_context(open_redis(settings))
        if check_redis:
            await health.require_redis(redis)
            # A cluster failing over as this starts is waited out, as the lanes would.
            await partitions.claim(redis, layout, patience_s=30 if settings.redis_cluster else 0)
        pipeline = await _pipeline(settings, stack, metrics)
        consumer = Consumer(
            redis=redis,
            keys=layout,
            handler=pipeline,
            config=consumer_config(settings),
            on_dead=pipeline.dead,
            metrics=metrics,
            slots=business_slots(settings, redis),
        )
        metrics_port = None
        if serve_metrics and settings.metrics_port:
            metrics_port = await stack.enter_async_context(
                serving(metrics, settings.http_host, settings.metrics_port)
            )
        monitor = Monitor(
            redis=redis,
            layout=layout,
            consumer=consumer,
            metrics=metrics,
            interval_s=settings.heartbeat_s,
            progress_s=settings.progress_s,
            metrics_port=metrics_port,
        )
        schedule = None if until_idle else await _schedule(settings, stack, redis, metrics)
        monitor_stop = asyncio.Event()
        async with asyncio.TaskGroup() as group:
            group.create_task(monitor.run(monitor_stop))
            if schedule is not None:
                group.create_task(schedule.run(monitor_stop))
            try:
                await consumer.run(stop, until_idle=until_idle)
            finally:
                monitor_stop.set()


@contextlib.asynccontextmanager
async def open_reconciler(
    settings: Settings, redis: aioredis.Redis, metrics: Metrics
) -> AsyncIterator[Reconciler]:
    """A reconciler with its own small pool and Twilio REST client, closed on exit.

    It enqueues as the webhook does (same Enqueuer, confirmations included).
    """
    account_sid, auth_token = settings.twilio_credentials()
    keys = settings.layout
    async with contextlib.AsyncExitStack() as stack:
        # Its own two connections: a run's queries never wait behind recordings' writes.
        pool = await asyncpg.create_pool(
            settings.database_url, min_size=0, max_size=2, connection_class=store.PlainConnection
        )
        stack.push_async_callback(pool.close)
        client = await stack.enter_async_context(
            twilio_api.open_client(
                api_base=settings.twilio_api_base, account_sid=account_sid, auth_token=auth_token
            )
        )
        enqueuer = Enqueuer(
            redis, keys, dedupe_ttl_s=settings.dedupe_ttl_s,
            deadline_ms=settings.webhook_deadline_ms, replica_acks=settings.min_replica_acks,
            wait_aof=settings.wait_aof,
        )  # fmt: skip
        yield Reconciler(
            api=twilio_api.TwilioApi(client, timeout_s=settings.http_timeout_s),
            pool=pool,
            redis=redis,
            keys=keys,
            enqueuer=enqueuer,
            default_business=settings.reconcile_default_business,
            metrics=metrics,
        )


async def _schedule(
    settings: Settings, stack: contextlib.AsyncExitStack, redis: aioredis.Redis, metrics: Metrics
) -> Schedule | None:
    """The scheduled reconcile beside the consumer (None when the interval is 0)."""
    if not settings.reconcile_interval_s:
        return None
    reconciler = await stack.enter_async_context(open_reconciler(settings, redis, metrics))
    name = settings.resolved_consumer_name
    return Schedule(
        redis=redis,
        keys=Keys(settings.namespace),
        name=name,
        interval_s=settings.reconcile_interval_s,
        lookback_h=settings.reconcile_lookback_h,
        reconcile=lambda window: reconciler.run(window, by=name),
    )


def transcripts_of(
    settings: Settings, client: openai.AsyncOpenAI, records: store.Store
) -> Transcripts:
    """Transcription as ``settings`` say, through ``client``, checkpointed in ``records``."""
    return Transcripts(
        transcriber=Transcriber(client=client, model=settings.transcribe_model),
        store=records,
        chunk_s=settings.transcribe_chunk_s,
        overlap_s=settings.transcribe_overlap_s,
        concurrency=settings.transcribe_chunk_concurrency,
        defaults=default_profile(settings),
    )


async def _pipeline(
    settings: Settings, stack: contextlib.AsyncExitStack, metrics: Metrics
) -> RecordingPipeline:
    """The recording pipeline with its clients, which ``stack`` closes."""
    account_sid, auth_token = settings.twilio_credentials()
    pool = await stack.enter_async_context(open_pool(settings))
    timeout = aiohttp.ClientTimeout(total=settings.http_timeout_s, sock_connect=10)
    session = await stack.enter_async_context(aiohttp.ClientSession(timeout=timeout))
    records, transcripts = store.Store(pool), None
    if settings.openai_api_key is not None and settings.transcription_enabled:
        import openai  # noqa: PLC0415 - only a transcribing consumer loads the SDK

        client = openai.AsyncOpenAI(
            api_key=settings.openai_api_key.get_secret_value(),
            base_url=settings.openai_base_url,
            max_retries=0,  # retries are the consumer's, counted as deliveries
            timeout=settings.http_timeout_s * 5,
        )
        await stack.enter_async_context(client)
        transcripts = transcripts_of(settings, client, records)
    else:
        log.warning("transcription_disabled", reason="OPENAI_API_KEY is not set")
    media = MediaClient(
        session=session,
        api_base=settings.twilio_api_base,
        account_sid=account_sid,
        auth_token=auth_token,
        media_dir=settings.media_dir,
        max_bytes=settings.media_max_bytes,
    )
    businesses = Businesses(pool, defaults=default_profile(settings))
    return RecordingPipeline(
        store=records,
        media=media,
        transcripts=transcripts,
        profiles=businesses.profile,
        metrics=metrics,
        delete_from_twilio=settings.delete_from_twilio,
    )


class CannotListen(OSError):
    """A server could not bind its address; the message names host:port and why."""


@contextlib.asynccontextmanager
async def _listening(app: web.Application, host: str, port: int) -> AsyncIterator[None]:
    """Serve ``app`` on host:port for the duration of the block; CannotListen if it can't."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=10)
    await runner.setup()
    try:
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as exc:
            why = os.strerror(exc.errno) if exc.errno else str(exc)
            raise CannotListen(f"cannot listen on {host}:{port}: {why}") from exc
        log.info("listening", host=host, port=port)
        yield
    finally:
        await runner.cleanup()


def webhook_app(
    settings: Settings,
    redis: aioredis.Redis,
    pool: asyncpg.Pool,
    *,
    metrics: Metrics | None = None,
    tally_every_s: float = 5.0,
) -> web.Application:
    """The webhook's app as ``serve`` runs it, on ``redis`` and ``pool`` (owned by the
    caller): /readyz probes PostgreSQL through ``pool``, and with STREAMREC_UI_TOKEN
    the dashboard is mounted under /ui/. ConfigError without Twilio credentials."""
    account_sid, auth_token = settings.twilio_credentials()
    config = WebhookConfig(
        account_sid=account_sid,
        auth_token=auth_token,
        public_url=settings.public_url,
        keys=settings.layout,
        dedupe_ttl_s=settings.dedupe_ttl_s,
        max_body_bytes=settings.max_body_bytes,
        deadline_ms=settings.webhook_deadline_ms,
        replica_acks=settings.min_replica_acks,
        wait_aof=settings.wait_aof,
    )

    async def database() -> None:
        async with pool.acquire(timeout=2) as conn:
            await conn.fetchval("SELECT 1", timeout=2)

    app = create_app(
        redis, config, metrics=metrics, checks={"postgres": database}, tally_every_s=tally_every_s
    )
    if dashboard.mount(app, settings, redis, pool):
        log.info("dashboard_ready", url=settings.public_url + dashboard.PREFIX)
    return app


async def serve(
    settings: Settings,
    stop: asyncio.Event,
    *,
    metrics: Metrics | None = None,
    check_redis: bool = True,
    on_ready: Callable[[], None] | None = None,
) -> None:
    """Serve the webhook until ``stop``; in-flight requests finish before it returns.

    ``on_ready`` is called once it listens. CannotListen when its port is taken.

    PostgreSQL is not needed to accept callbacks; a pool that opens no
    connection until asked serves /readyz and, with STREAMREC_UI_TOKEN, the
    dashboard under /ui/ (``streamrec.dashboard``). With ``check_redis``, a Redis
    before 7.0, or one that cannot confirm as configured (WAITAOF), is refused
    first (UnsupportedRedis).
    """
    settings.twilio_credentials()
    async with contextlib.AsyncExitStack() as stack:
        redis = await stack.enter_async_context(open_redis(settings))
        if check_redis:
            await health.require_redis(
                redis,
                unreachable_ok=True,
                replica_acks=settings.min_replica_acks,
                wait_aof=settings.wait_aof,
            )
            with contextlib.suppress(RedisError):  # unreachable: its answers will say so
                await partitions.claim(redis, settings.layout)
        # A few connections: the dashboard's reads must not hold up /readyz's probe.
        pool = await asyncpg.create_pool(
            settings.database_url, min_size=0, max_size=4 if settings.ui_enabled else 1
        )
        stack.push_async_callback(pool.close)
        app = webhook_app(settings, redis, pool, metrics=metrics)
        await stack.enter_async_context(_listening(app, settings.http_host, settings.http_port))
        log.info("webhook_ready", public_url=settings.public_url + WEBHOOK_PATH)
        if on_ready is not None:
            on_ready()
        await stop.wait()


async def run_all(
    settings: Settings, stop: asyncio.Event, *, on_ready: Callable[[], None] | None = None
) -> None:
    """The webhook and one consumer in this process, one /metrics; either failing stops both.

    ``on_ready`` is called once the webhook listens.
    """
    settings.twilio_credentials()
    async with open_redis(settings) as redis:
        # Once, before either starts; the webhook's confirmations too.
        await health.require_redis(
            redis, replica_acks=settings.min_replica_acks, wait_aof=settings.wait_aof
        )
        await partitions.claim(redis, settings.layout)
    metrics = Metrics()
    async with asyncio.TaskGroup() as group:
        group.create_task(
            serve(settings, stop, metrics=metrics, check_redis=False, on_ready=on_ready)
        )
        group.create_task(
            consume(settings, stop, metrics=metrics, serve_metrics=False, check_redis=False)
        )
