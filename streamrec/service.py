"""Wiring: opens each resource in one place and runs the webhook and the consumer.

Every client is an async context manager entered on one AsyncExitStack, so they
close in reverse order of opening: work first, pools last.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import aiohttp
import asyncpg
import openai
import redis.asyncio as aioredis
import structlog
from aiohttp import web
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError, TimeoutError

from streamrec import store
from streamrec.consumer import Consumer, ConsumerConfig
from streamrec.keys import Keys
from streamrec.pipeline import RecordingPipeline
from streamrec.producer import WebhookConfig, create_app
from streamrec.retry import RetryPolicy
from streamrec.settings import Settings
from streamrec.transcribe import Transcriber
from streamrec.twilio import MediaClient

log = structlog.get_logger("streamrec.service")


def redis_client(url: str, *, block_ms: int = 2_000) -> aioredis.Redis:
    """A Redis client that reconnects and retries a command on a dropped connection.

    Every command streamrec sends is safe to repeat (the enqueue script dedupes,
    acks are idempotent, a repeated read only leaves entries to reclaim), so a
    Redis restart costs a reconnect, not an error. The socket timeout outlasts
    the consumer's blocking read.
    """
    return aioredis.Redis.from_url(
        url,
        decode_responses=True,
        socket_connect_timeout=5,
        socket_timeout=block_ms / 1000 + 10,
        health_check_interval=30,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=3),
        retry_on_error=[ConnectionError, TimeoutError],
    )


@contextlib.asynccontextmanager
async def open_redis(settings: Settings) -> AsyncIterator[aioredis.Redis]:
    """The process's Redis client, closed on exit."""
    client = redis_client(settings.redis_url, block_ms=settings.block_ms)
    try:
        yield client
    finally:
        await client.aclose()


@contextlib.asynccontextmanager
async def open_pool(settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    """An asyncpg pool sized for the consumer's concurrency."""
    pool = await asyncpg.create_pool(
        settings.database_url, min_size=1, max_size=min(settings.concurrency, 20)
    )
    try:
        yield pool
    finally:
        await pool.close()


def consumer_config(settings: Settings) -> ConsumerConfig:
    """The consumer knobs from the settings."""
    return ConsumerConfig(
        name=settings.resolved_consumer_name,
        concurrency=settings.concurrency,
        claim_idle_ms=settings.claim_idle_ms,
        block_ms=settings.block_ms,
        shutdown_grace_s=settings.shutdown_grace_s,
        log_fields=("recording_sid", "call_sid", "business_id"),
        retry=RetryPolicy(
            max_deliveries=settings.max_deliveries,
            base_s=settings.retry_base_ms / 1000,
            max_s=settings.retry_max_ms / 1000,
        ),
    )


async def consume(settings: Settings, stop: asyncio.Event, *, until_idle: bool = False) -> None:
    """Run one consumer of the recording pipeline until ``stop`` (or idle)."""
    account_sid, auth_token = settings.twilio_credentials()
    await store.migrate(settings.database_url)
    timeout = aiohttp.ClientTimeout(total=settings.http_timeout_s, sock_connect=10)
    async with contextlib.AsyncExitStack() as stack:
        redis = await stack.enter_async_context(open_redis(settings))
        pool = await stack.enter_async_context(open_pool(settings))
        session = await stack.enter_async_context(aiohttp.ClientSession(timeout=timeout))
        transcriber = None
        if settings.transcription_enabled:
            assert settings.openai_api_key is not None  # noqa: S101 - transcription_enabled says so
            client = openai.AsyncOpenAI(
                api_key=settings.openai_api_key.get_secret_value(),
                base_url=settings.openai_base_url,
                max_retries=0,  # retries are the consumer's, counted as deliveries
                timeout=settings.http_timeout_s * 5,
            )
            await stack.enter_async_context(client)
            transcriber = Transcriber(client=client, model=settings.transcribe_model)
        else:
            log.warning("transcription_disabled", reason="OPENAI_API_KEY is not set")
        pipeline = RecordingPipeline(
            store=store.Store(pool),
            media=MediaClient(
                session=session,
                api_base=settings.twilio_api_base,
                account_sid=account_sid,
                auth_token=auth_token,
                media_dir=settings.media_dir,
                max_bytes=settings.media_max_bytes,
            ),
            transcriber=transcriber,
        )
        consumer = Consumer(
            redis=redis,
            keys=Keys(settings.namespace),
            handler=pipeline,
            config=consumer_config(settings),
            on_dead=pipeline.dead,
        )
        await consumer.run(stop, until_idle=until_idle)


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    """Serve the webhook until ``stop``; in-flight requests finish before it returns."""
    account_sid, auth_token = settings.twilio_credentials()
    async with open_redis(settings) as redis:
        app = create_app(
            redis,
            WebhookConfig(
                account_sid=account_sid,
                auth_token=auth_token,
                public_url=settings.public_url,
                keys=Keys(settings.namespace),
                dedupe_ttl_s=settings.dedupe_ttl_s,
                max_body_bytes=settings.max_body_bytes,
            ),
        )
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=10)
        await runner.setup()
        try:
            site = web.TCPSite(runner, settings.http_host, settings.http_port)
            await site.start()
            log.info(
                "webhook_listening",
                host=settings.http_host,
                port=settings.http_port,
                public_url=settings.public_url,
            )
            await stop.wait()
        finally:
            await runner.cleanup()


async def run_all(settings: Settings, stop: asyncio.Event) -> None:
    """The webhook and one consumer in this process; either failing stops both."""
    settings.twilio_credentials()
    async with asyncio.TaskGroup() as group:
        group.create_task(serve(settings, stop))
        group.create_task(consume(settings, stop))
