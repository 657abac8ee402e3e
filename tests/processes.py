"""streamrec as real processes: consumers to kill and signal, commands to run."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

from streamrec.settings import Settings

ENV_OF = {
    "redis_url": "REDIS_URL",
    "database_url": "DATABASE_URL",
    "twilio_account_sid": "TWILIO_ACCOUNT_SID",
    "twilio_api_base": "STREAMREC_TWILIO_API_BASE",
    "openai_base_url": "OPENAI_BASE_URL",
    "media_dir": "STREAMREC_MEDIA_DIR",
    "namespace": "STREAMREC_NAMESPACE",
    "partitions": "STREAMREC_PARTITIONS",
    "redis_cluster": "STREAMREC_REDIS_CLUSTER",
    "min_replica_acks": "STREAMREC_MIN_REPLICA_ACKS",
    "concurrency": "STREAMREC_CONCURRENCY",
    "claim_idle_ms": "STREAMREC_CLAIM_IDLE_MS",
    "block_ms": "STREAMREC_BLOCK_MS",
    "retry_base_ms": "STREAMREC_RETRY_BASE_MS",
    "retry_max_ms": "STREAMREC_RETRY_MAX_MS",
    "max_deliveries": "STREAMREC_MAX_DELIVERIES",
    "shutdown_grace_s": "STREAMREC_SHUTDOWN_GRACE_S",
    "metrics_port": "STREAMREC_METRICS_PORT",
    "heartbeat_s": "STREAMREC_HEARTBEAT_S",
    "business_slots": "STREAMREC_BUSINESS_SLOTS",
    "slot_lease_ms": "STREAMREC_SLOT_LEASE_MS",
    "reconcile_interval_s": "STREAMREC_RECONCILE_INTERVAL_S",
    "reconcile_lookback_h": "STREAMREC_RECONCILE_LOOKBACK_H",
    "reconcile_default_business": "STREAMREC_RECONCILE_DEFAULT_BUSINESS",
    "transcribe_model": "STREAMREC_TRANSCRIBE_MODEL",
    "transcribe_mode": "STREAMREC_TRANSCRIBE_MODE",
    "transcribe_language": "STREAMREC_TRANSCRIBE_LANGUAGE",
    "transcribe_channels": "STREAMREC_TRANSCRIBE_CHANNELS",
    "transcribe_chunk_s": "STREAMREC_TRANSCRIBE_CHUNK_S",
    "transcribe_overlap_s": "STREAMREC_TRANSCRIBE_OVERLAP_S",
    "transcribe_chunk_concurrency": "STREAMREC_TRANSCRIBE_CHUNK_CONCURRENCY",
}


def environment(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment that makes a child process read ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STREAMREC_", "TWILIO_"))}
    for field, name in ENV_OF.items():
        value = getattr(settings, field)
        if value is not None:
            env[name] = str(value)
    assert settings.twilio_auth_token is not None
    env["TWILIO_AUTH_TOKEN"] = settings.twilio_auth_token.get_secret_value()
    if settings.openai_api_key is not None:
        env["OPENAI_API_KEY"] = settings.openai_api_key.get_secret_value()
    env["STREAMREC_LOG_FORMAT"] = "json"
    env.update(extra)
    return env


def spawn_consumer(
    settings: Settings, name: str, log_dir: Path, **extra: str
) -> subprocess.Popen[bytes]:
    """Start ``python -m streamrec consume`` as consumer ``name``; its log goes to log_dir."""
    log = (log_dir / f"{name}.log").open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "streamrec", "consume"],
        env=environment(settings, STREAMREC_CONSUMER_NAME=name, **extra),
        cwd=log_dir,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


async def streamrec(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``python -m streamrec *args`` to completion, off the event loop."""
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "streamrec", *args],
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
