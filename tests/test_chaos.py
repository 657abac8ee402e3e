"""The chaos run, short form (a few hundred recordings, each kind of kill and outage), and its
accounting."""

from __future__ import annotations

import pytest

from tests.chaos import ChaosConfig, run
from tests.chaos_report import over_limit, peak, work_intervals


async def test_nothing_is_lost_when_everything_is_killed_once(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Kill a consumer, Redis, PostgreSQL, the webhook: each recording is done once, in slots."""
    # Once: enqueued once however often its callback came, by webhook or
    # reconciler; downloaded and transcribed once, plus once per consumer kill
    # that caught it in work. Callbacks Twilio gave up on (the webhook down)
    # are brought in by the scheduled reconciler.
    config = ChaosConfig(
        recordings=300,
        send_rate=60,
        consumers=3,
        consumer_kills=2,
        kill_every_s=1.5,
        redis_kill_after_s=1.0,
        postgres_stop_after_s=2.0,
        postgres_down_s=2.0,
        webhook_outage_after_s=1.0,
        webhook_outage_s=1.0,
        retry_pause_s=0.2,
        reconcile_interval_s=1.0,
        timeout_s=240,
    )
    report = await run(config)
    with capsys.disabled():
        print("\n  chaos (short form):\n" + report.render())
    assert report.consumer_kills == 2
    assert report.redis_kills == 1
    assert report.postgres_stops == 1
    assert report.webhook_outages == 1
    assert report.lost_at_edge > 0
    assert report.reconciled > 0
    assert report.queued_not_once == 0
    assert report.lost == 0
    assert report.dead_letters == 0
    assert report.extra_downloads_unexplained == 0
    assert report.extra_transcriptions_unexplained == 0
    assert report.pending == 0
    assert report.parked == 0
    assert report.slot_peak <= report.slot_limit


def test_a_kill_ends_a_recordings_work_and_the_next_delivery_starts_afresh() -> None:
    """A delivery cut by a kill ends at the cut; the next starts with its first request after."""
    straggler = (1.9, 2.5)  # sent before the kill, answered after it
    spans = [(1.0, 1.1), (1.2, 1.3), straggler, (5.0, 5.1), (5.2, 5.4)]
    assert work_intervals(spans, [2.0]) == [(1.0, 2.0), (5.0, 5.4)]
    assert work_intervals(spans, []) == [(1.0, 5.4)]
    assert work_intervals([(1.0, 1.1)], [2.0]) == [(1.0, 2.0)]  # killed with nothing redone


def test_the_peak_counts_overlapping_work_only() -> None:
    """Work that ends as other work begins does not overlap it."""
    assert peak([(0.0, 1.0), (1.0, 2.0), (2.0, 3.0)]) == 1
    assert peak([(0.0, 1.0), (0.5, 1.5), (0.9, 2.0), (1.0, 2.0)]) == 3
    assert peak([]) == 0


def test_a_peak_over_the_limit_names_the_recordings_in_work_then() -> None:
    """Three recordings of one business overlap with a limit of 2: all three are named."""
    business_of = {"RE1": "b", "RE2": "b", "RE3": "b", "RE4": "c"}
    spans = {"RE1": [(0.0, 1.0)], "RE2": [(0.5, 1.5)], "RE3": [(0.9, 2.0)], "RE4": [(0.0, 9.0)]}
    found = over_limit(business_of, spans, {}, 2)
    assert found[0] == "business b at 0.900"
    assert sorted(line.split()[0] for line in found[1:]) == ["RE1", "RE2", "RE3"]
    assert over_limit(business_of, spans, {}, 3) == []
    # A cut ends RE1's delivery before the others begin: no longer over 2.
    assert over_limit(business_of, spans, {"RE1": [0.4]}, 2) == []
