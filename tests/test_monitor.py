"""The monitor's rate: events per second over the last minute of a running count."""

from __future__ import annotations

from streamrec.monitor import Rate


def test_rate_is_over_the_last_minute_of_samples() -> None:
    """From one sample the rate is 0; later, the count added since the newest sample
    at least a minute old, per second."""
    rate = Rate()
    assert rate.sample(0, 100.0) == 0.0
    assert rate.sample(10, 105.0) == 2.0
    assert rate.sample(40, 160.0) == round(40 / 60, 2)
    # (100, 0) is now older than (105, 10), which is itself a minute old: it goes.
    assert rate.sample(70, 165.0) == 1.0
    assert rate.sample(70, 400.0) == 0.0
