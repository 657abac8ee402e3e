"""The recording event and its stream encoding."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from streamrec.events import SCHEMA_VERSION, InvalidEvent, RecordingEvent, is_business_id
from tests.standins import ACCOUNT_SID, call_sid, recording_sid


def create(received_ms: int | None = None, **changes: str) -> RecordingEvent:
    """RecordingEvent.create of a valid completed recording, with ``changes`` to its raw strings."""
    values = {
        "recording_sid": recording_sid(),
        "call_sid": call_sid(),
        "account_sid": ACCOUNT_SID,
        "business_id": "shop-7.eu_1",
        "status": "completed",
        "duration_s": "42",
        "channels": "2",
        "source": "RecordVerb",
    } | changes
    return RecordingEvent.create(
        recording_sid=values["recording_sid"],
        call_sid=values["call_sid"],
        account_sid=values["account_sid"],
        business_id=values["business_id"],
        status=values["status"],
        duration_s=values["duration_s"],
        channels=values["channels"],
        source=values["source"],
        received_ms=received_ms,
    )


def fields(**changes: str) -> dict[str, str]:
    """Stream fields of a valid event, with ``changes``."""
    return create().to_fields() | changes


@pytest.mark.parametrize("duration", ["42", "0", "-1", ""])
def test_fields_round_trip(duration: str) -> None:
    """to_fields gives plain strings with v=1, and from_fields gives the same event back."""
    event = create(received_ms=1_764_000_000_123, duration_s=duration)
    encoded = event.to_fields()
    assert encoded["v"] == SCHEMA_VERSION == "1"
    assert all(isinstance(name, str) and isinstance(v, str) for name, v in encoded.items())
    assert encoded["received_ms"] == "1764000000123"
    assert RecordingEvent.from_fields(encoded) == event


@pytest.mark.parametrize("version", ["2", "0", "", "1.0"])
def test_unknown_schema_version_is_rejected(version: str) -> None:
    """An entry whose v is not a version this code knows is rejected."""
    with pytest.raises(InvalidEvent, match="version"):
        RecordingEvent.from_fields(fields(v=version))


def test_missing_schema_version_is_rejected() -> None:
    """An entry without v is rejected."""
    encoded = fields()
    del encoded["v"]
    with pytest.raises(InvalidEvent, match="version"):
        RecordingEvent.from_fields(encoded)


def test_missing_field_is_rejected() -> None:
    """An entry missing a required field is rejected, naming it."""
    encoded = fields()
    del encoded["business_id"]
    with pytest.raises(InvalidEvent, match="business_id"):
        RecordingEvent.from_fields(encoded)


MALFORMED: dict[str, Callable[[str], str]] = {
    "wrong-prefix": lambda prefix: "XX" + "a" * 32,
    "other-sid-prefix": lambda prefix: ("CA" if prefix != "CA" else "RE") + "a" * 32,
    "short": lambda prefix: prefix + "a" * 31,
    "long": lambda prefix: prefix + "a" * 33,
    "not-hex": lambda prefix: prefix + "g" * 32,
    "trailing-newline": lambda prefix: prefix + "a" * 32 + "\n",
    "lowercase-prefix": lambda prefix: prefix.lower() + "a" * 32,
    "empty": lambda prefix: "",
}


@pytest.mark.parametrize("shape", list(MALFORMED))
@pytest.mark.parametrize(
    ("field", "prefix", "named"),
    [
        ("recording_sid", "RE", "RecordingSid"),
        ("call_sid", "CA", "CallSid"),
        ("account_sid", "AC", "AccountSid"),
    ],
)
def test_malformed_sid_is_rejected(field: str, prefix: str, named: str, shape: str) -> None:
    """A malformed SID is rejected, naming it, from a callback and from the stream."""
    value = MALFORMED[shape](prefix)
    with pytest.raises(InvalidEvent, match=named):
        create(None, **{field: value})
    with pytest.raises(InvalidEvent, match=named):
        RecordingEvent.from_fields(fields(**{field: value}))


# Business ids every entry point must refuse (webhook, stream, CLI, numbers, settings):
# outside [A-Za-z0-9_.-]{1,64}, or only dots, which name a media directory's self or parent.
BAD_BUSINESS_IDS = ["", ".", "..", "...", "a b", "a/b", "x" * 65, "é", "1\n"]
GOOD_BUSINESS_IDS = ["1", "shop-7.eu_1", ".hidden", "a..b", "-", "x" * 64]


@pytest.mark.parametrize("business_id", BAD_BUSINESS_IDS)
def test_malformed_business_id_is_rejected(business_id: str) -> None:
    """A malformed or all-dots business_id is refused, in a callback and in stream fields."""
    assert not is_business_id(business_id)
    with pytest.raises(InvalidEvent, match="business_id"):
        create(business_id=business_id)
    with pytest.raises(InvalidEvent, match="business_id"):
        RecordingEvent.from_fields(fields(business_id=business_id))


@pytest.mark.parametrize("business_id", GOOD_BUSINESS_IDS)
def test_well_formed_business_id_is_accepted(business_id: str) -> None:
    """Dots among other characters are fine; only ids made of dots alone are refused."""
    assert is_business_id(business_id)
    assert create(business_id=business_id).business_id == business_id


def test_duration_minus_one_means_none() -> None:
    """Twilio's RecordingDuration -1 (no duration) decodes to None, as does an empty value."""
    assert create(duration_s="-1").duration_s is None
    assert create(duration_s="").duration_s is None
    assert create(duration_s="0").duration_s == 0
    assert create(duration_s="3600").duration_s == 3600


@pytest.mark.parametrize("duration", ["-2", "1.5", "abc", " 4", "1e3", "9999999999", "²", "٤٢"])
def test_malformed_duration_is_rejected(duration: str) -> None:
    """A RecordingDuration that is not a small non-negative ASCII integer is InvalidEvent."""
    with pytest.raises(InvalidEvent, match="RecordingDuration"):
        create(duration_s=duration)
    with pytest.raises(InvalidEvent, match="RecordingDuration"):
        RecordingEvent.from_fields(fields(duration_s=duration))


@pytest.mark.parametrize("received_ms", ["soon", "1.5", "²", "0x10"])
def test_malformed_received_ms_is_rejected(received_ms: str) -> None:
    """A stream entry whose received_ms is not an integer is InvalidEvent, not another error."""
    with pytest.raises(InvalidEvent, match="received_ms"):
        RecordingEvent.from_fields(fields(received_ms=received_ms))


@pytest.mark.parametrize("status", ["in-progress", "processing", "", "COMPLETED", "deleted"])
def test_non_terminal_status_is_rejected(status: str) -> None:
    """Only completed, absent and failed make an event."""
    with pytest.raises(InvalidEvent, match="not terminal"):
        create(status=status)
    with pytest.raises(InvalidEvent, match="not terminal"):
        RecordingEvent.from_fields(fields(status=status))


@pytest.mark.parametrize("status", ["completed", "absent", "failed"])
def test_terminal_statuses_make_events(status: str) -> None:
    """completed, absent and failed are accepted as they are."""
    assert create(status=status).status == status


def test_origin_round_trips() -> None:
    """A reconciled event says so in its fields and reads back as reconciled."""
    event = RecordingEvent.create(
        recording_sid=recording_sid(),
        call_sid=call_sid(),
        account_sid=ACCOUNT_SID,
        business_id="7",
        status="absent",
        origin="reconcile",
    )
    assert event.to_fields()["origin"] == "reconcile"
    assert RecordingEvent.from_fields(event.to_fields()).origin == "reconcile"


def test_entry_written_before_origin_existed_reads_as_webhook() -> None:
    """An entry without ``origin`` (written by an earlier version) is still read, as a webhook's."""
    encoded = fields()
    del encoded["origin"]
    assert RecordingEvent.from_fields(encoded).origin == "webhook"


def test_unknown_origin_is_rejected() -> None:
    """An origin other than webhook or reconcile is rejected, naming the field."""
    with pytest.raises(InvalidEvent, match="origin"):
        RecordingEvent.from_fields(fields(origin="carrier-pigeon"))
