"""The recording event and its encoding as stream fields.

Stream fields are plain strings so that ``redis-cli XRANGE`` shows them as they
are. ``v`` is the schema version; a consumer rejects versions it does not know.
A field added later (``origin``) is optional within version 1: an entry written
before it existed reads as its default, and a consumer that predates it ignores it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

SCHEMA_VERSION = "1"

RECORDING_SID = re.compile(r"^RE[0-9a-fA-F]{32}$")
CALL_SID = re.compile(r"^CA[0-9a-fA-F]{32}$")
ACCOUNT_SID = re.compile(r"^AC[0-9a-fA-F]{32}$")
BUSINESS_ID = re.compile(r"^(?!\.+$)[A-Za-z0-9_.-]{1,64}$")
"""A tenant: it names a directory under STREAMREC_MEDIA_DIR and Redis keys, so "." and
".." (the directory itself, its parent) are refused with the other all-dots ids."""
BUSINESS_ID_RULE = "1-64 of A-Z a-z 0-9 _ . - and not only dots"

Status = Literal["completed", "absent", "failed"]
TERMINAL_STATUSES: frozenset[str] = frozenset({"completed", "absent", "failed"})
Origin = Literal["webhook", "reconcile"]
ORIGINS: frozenset[str] = frozenset({"webhook", "reconcile"})


def is_business_id(value: str) -> bool:
    """True when ``value`` is a business id (see BUSINESS_ID).

    The one check of the webhook, the stream, the command line, the numbers
    table and the settings.
    """
    return BUSINESS_ID.fullmatch(value) is not None


class InvalidEvent(ValueError):
    """A callback or stream entry does not describe a valid recording event."""


@dataclass(frozen=True, slots=True)
class RecordingEvent:
    """One terminal RecordingStatusCallback, as it travels through the stream."""

    recording_sid: str
    call_sid: str
    account_sid: str
    business_id: str
    status: Status
    duration_s: int | None = None
    channels: int | None = None
    source: str = ""
    received_ms: int = 0
    origin: Origin = "webhook"
    """How it reached the stream: its callback, or the reconciler (the callback was lost)."""

    def to_fields(self) -> dict[str, str]:
        """Encode as stream fields: readable strings, empty for a missing value."""
        items = self.field_list()
        return dict(zip(items[::2], items[1::2], strict=True))

    def field_list(self) -> list[str]:
        """The stream fields as a flat [name, value, ...] list, schema version first."""
        return [
            "v", SCHEMA_VERSION,
            "recording_sid", self.recording_sid,
            "call_sid", self.call_sid,
            "account_sid", self.account_sid,
            "business_id", self.business_id,
            "status", self.status,
            "duration_s", "" if self.duration_s is None else str(self.duration_s),
            "channels", "" if self.channels is None else str(self.channels),
            "source", self.source,
            "received_ms", str(self.received_ms),
            "origin", self.origin,
        ]  # fmt: skip

    @classmethod
    def from_fields(cls, fields: Mapping[str, str]) -> RecordingEvent:
        """Decode stream fields; raises InvalidEvent for an unknown version or bad field."""
        version = fields.get("v")
        if version != SCHEMA_VERSION:
            raise InvalidEvent(f"unknown schema version {version!r}")
        try:
            received_ms = int(fields.get("received_ms") or 0)
        except ValueError:
            raise InvalidEvent("received_ms must be an integer") from None
        try:
            return cls.create(
                recording_sid=fields["recording_sid"],
                call_sid=fields["call_sid"],
                account_sid=fields["account_sid"],
                business_id=fields["business_id"],
                status=fields["status"],
                duration_s=fields.get("duration_s", ""),
                channels=fields.get("channels", ""),
                source=fields.get("source", ""),
                received_ms=received_ms,
                origin=fields.get("origin") or "webhook",
            )
        except KeyError as exc:
            raise InvalidEvent(f"missing field {exc.args[0]}") from None

    @classmethod
    def create(
        cls,
        *,
        recording_sid: str,
        call_sid: str,
        account_sid: str,
        business_id: str,
        status: str,
        duration_s: str = "",
        channels: str = "",
        source: str = "",
        received_ms: int | None = None,
        origin: str = "webhook",
    ) -> RecordingEvent:
        """Validate raw strings (from a callback or the stream) into an event."""
        _check(RECORDING_SID, "RecordingSid", recording_sid)
        _check(CALL_SID, "CallSid", call_sid)
        _check(ACCOUNT_SID, "AccountSid", account_sid)
        _check(BUSINESS_ID, "business_id", business_id)
        if status not in TERMINAL_STATUSES:
            raise InvalidEvent(f"RecordingStatus {status!r} is not terminal")
        if origin not in ORIGINS:
            raise InvalidEvent(f"origin {origin!r} is neither webhook nor reconcile")
        return cls(
            recording_sid=recording_sid,
            call_sid=call_sid,
            account_sid=account_sid,
            business_id=business_id,
            status=status,  # type: ignore[arg-type]  # checked against TERMINAL_STATUSES
            duration_s=_optional_int("RecordingDuration", duration_s),
            channels=_optional_int("RecordingChannels", channels),
            source=source[:64],
            received_ms=int(time.time() * 1000) if received_ms is None else received_ms,
            origin=origin,  # type: ignore[arg-type]  # checked against ORIGINS
        )


def _check(pattern: re.Pattern[str], name: str, value: str) -> None:
    if not value:
        raise InvalidEvent(f"{name} is missing")
    if not pattern.fullmatch(value):
        raise InvalidEvent(f"{name} is malformed")


def _optional_int(name: str, value: str) -> int | None:
    if not value or value == "-1":  # Twilio sends -1 when there is no duration
        return None
    # isdigit() alone passes non-ASCII digits such as "²", which int() rejects.
    if not (value.isascii() and value.isdigit()) or len(value) > 9:
        raise InvalidEvent(f"{name} must be a non-negative integer")
    return int(value)
