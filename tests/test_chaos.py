"""The chaos run, short form: a few hundred recordings, one kill of each kind."""

from __future__ import annotations

import pytest

from tests.chaos import ChaosConfig, run


async def test_nothing_is_lost_when_everything_is_killed_once(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """SIGKILL a consumer, SIGKILL Redis, stop PostgreSQL: every recording completes once."""
    config = ChaosConfig(
        recordings=300,
        send_rate=60,
        consumers=3,
        consumer_kills=2,
        kill_every_s=1.5,
        redis_kill_after_s=1.0,
        postgres_stop_after_s=2.0,
        postgres_down_s=2.0,
        timeout_s=240,
    )
    report = await run(config)
    with capsys.disabled():
        print("\n  chaos (short form):\n" + report.render())
    assert report.consumer_kills == 2
    assert report.redis_kills == 1
    assert report.postgres_stops == 1
    assert report.lost == 0
    assert report.duplicate_rows == 0
    assert report.dead_letters == 0
    assert report.pending == 0
    assert report.parked == 0
    assert report.slot_peak <= report.slot_limit
