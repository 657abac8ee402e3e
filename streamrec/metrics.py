"""Prometheus metrics, one registry per process (no module-level global registry).

Served as ``GET /metrics`` by the webhook app and by each consumer on its own
port: ``STREAMREC_METRICS_PORT``, or the next free one after it when another
consumer on the host holds it (the heartbeat says which, and ``status`` shows it).
"""

from __future__ import annotations

import contextlib
import errno
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

log = structlog.get_logger("streamrec.metrics")

PORTS_TRIED = 100
"""Ports tried from STREAMREC_METRICS_PORT on: room for that many consumers on one host."""

STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
RECONCILE_BUCKETS = (0.1, 0.5, 1, 5, 15, 60, 180, 600, 1800, 3600)


class Metrics:
    """The metrics of one process; components take it and record into it."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.webhooks = Counter(
            "streamrec_webhooks", "Webhook requests by outcome.", ["outcome"], registry=r
        )
        self._webhook_outcomes: dict[str, Counter] = {}
        self.entries = Counter(
            "streamrec_entries",
            "Stream entries finished by this process, by outcome "
            "(completed, dead_lettered, left_pending).",
            ["outcome"],
            registry=r,
        )
        self.retries = Counter("streamrec_retries", "Attempts retried after a failure.", registry=r)
        self.reclaimed = Counter(
            "streamrec_reclaimed", "Entries taken over from idle consumers.", registry=r
        )
        self.parked = Counter(
            "streamrec_parked", "Entries parked because their business was at its limit.",
            registry=r,
        )  # fmt: skip
        self.stage_seconds = Histogram(
            "streamrec_stage_seconds",
            "Time spent per pipeline stage.",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "streamrec_in_flight", "Entries in work in this process.", registry=r
        )
        self.pending = Gauge(
            "streamrec_pending_entries", "Entries delivered and not yet acked (whole group).",
            registry=r,
        )  # fmt: skip
        self.oldest_pending_age = Gauge(
            "streamrec_oldest_pending_age_seconds",
            "Idle time of the oldest pending entry (whole group).",
            registry=r,
        )
        self.lag = Gauge("streamrec_lag_entries", "Entries not yet delivered to any consumer.",
                         registry=r)  # fmt: skip
        self.dead_letters = Gauge(
            "streamrec_dead_letters", "Entries in the dead-letter stream.", registry=r
        )
        self.partition_pending = Gauge(
            "streamrec_partition_pending_entries",
            "Entries delivered and not yet acked, per partition.",
            ["partition"],
            registry=r,
        )
        self.partition_oldest_pending_age = Gauge(
            "streamrec_partition_oldest_pending_age_seconds",
            "Idle time of the partition's oldest pending entry.",
            ["partition"],
            registry=r,
        )
        self.partition_lag = Gauge(
            "streamrec_partition_lag_entries",
            "Entries of the partition not yet delivered to any consumer.",
            ["partition"],
            registry=r,
        )
        self.partition_dead_letters = Gauge(
            "streamrec_partition_dead_letters",
            "Entries in the partition's dead-letter stream.",
            ["partition"],
            registry=r,
        )
        self.reconcile_runs = Counter(
            "streamrec_reconcile_runs", "Reconcile runs by this process, by outcome (ok, failed).",
            ["outcome"], registry=r,
        )  # fmt: skip
        self.reconcile_recordings = Counter(
            "streamrec_reconcile_recordings",
            "Recordings reconcile runs saw, by result (listed, known, enqueued, unassigned).",
            ["result"],
            registry=r,
        )
        self.reconcile_pages = Counter(
            "streamrec_reconcile_pages", "Recordings list pages reconcile runs read.", registry=r
        )
        self.reconcile_seconds = Histogram(
            "streamrec_reconcile_seconds", "Duration of reconcile runs.",
            buckets=RECONCILE_BUCKETS, registry=r,
        )  # fmt: skip
        self.reconcile_last_success = Gauge(
            "streamrec_reconcile_last_success_timestamp_seconds",
            "When this process last finished a reconcile run without error (Unix time).",
            registry=r,
        )

    def webhook(self, outcome: str) -> None:
        """Count one webhook answer (the labelled counter is looked up once per outcome)."""
        child = self._webhook_outcomes.get(outcome)
        if child is None:
            child = self._webhook_outcomes[outcome] = self.webhooks.labels(outcome)
        child.inc()

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the block as pipeline stage ``name`` (whether it succeeds or not)."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.stage_seconds.labels(name).observe(time.perf_counter() - started)

    def sample(self, report: dict[str, Any]) -> None:
        """Set the group's gauges from a status document (``status.collect``): the
        totals over every partition, and each partition's own."""
        self.pending.set(report["pending"])
        self.lag.set(report["lag"] or 0)
        self.dead_letters.set(report["dead_letters"])
        self.oldest_pending_age.set((report["oldest_pending_idle_ms"] or 0) / 1000)
        for part in report["partitions"]:
            index = str(part["index"])
            self.partition_pending.labels(index).set(part["pending"])
            self.partition_lag.labels(index).set(part["lag"] or 0)
            self.partition_dead_letters.labels(index).set(part["dead_letters"])
            idle = (part["oldest_pending_idle_ms"] or 0) / 1000
            self.partition_oldest_pending_age.labels(index).set(idle)

    def render(self) -> bytes:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry)


METRICS_KEY: web.AppKey[Metrics] = web.AppKey("metrics", Metrics)


async def metrics_endpoint(request: web.Request) -> web.Response:
    """GET /metrics."""
    body = request.app[METRICS_KEY].render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def metrics_app(metrics: Metrics) -> web.Application:
    """A small app serving /metrics and /healthz, for consumer processes."""
    app = web.Application()
    app[METRICS_KEY] = metrics
    app.router.add_get("/metrics", metrics_endpoint)
    app.router.add_get("/healthz", _alive)
    return app


async def _alive(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


@contextlib.asynccontextmanager
async def serving(metrics: Metrics, host: str, first_port: int) -> AsyncIterator[int]:
    """Serve ``metrics_app`` on the first free port from ``first_port`` on; yields that port.

    Raises OSError naming host and ports when all PORTS_TRIED of them are taken,
    or the address cannot be bound for another reason.
    """
    runner = web.AppRunner(metrics_app(metrics), access_log=None, shutdown_timeout=10)
    await runner.setup()
    try:
        port = await _bind(runner, host, first_port)
        log.info("metrics_listening", host=host, port=port)
        yield port
    finally:
        await runner.cleanup()


async def _bind(runner: web.AppRunner, host: str, first_port: int) -> int:
    last = min(first_port + PORTS_TRIED, 65536) - 1
    for port in range(first_port, last + 1):
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            await site.stop()  # a site that failed to start stays registered otherwise
            if exc.errno != errno.EADDRINUSE:
                raise
            continue
        return port
    raise OSError(errno.EADDRINUSE, f"metrics ports {host}:{first_port}-{last} are all in use")
