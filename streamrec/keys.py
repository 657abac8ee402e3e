"""Every Redis key, stream and group name streamrec uses, in one place.

All keys of one namespace share the hash tag ``{<namespace>}`` so that the Lua
scripts, which touch several keys at once, also run on Redis Cluster. A later
partitioning by business would give each partition its own tag.
"""

from __future__ import annotations

from dataclasses import dataclass

GROUP = "workers"


@dataclass(frozen=True, slots=True)
class Keys:
    """Key names for one namespace (``STREAMREC_NAMESPACE``)."""

    namespace: str = "streamrec"

    @property
    def _tag(self) -> str:
        return "{" + self.namespace + "}"

    @property
    def stream(self) -> str:
        """The stream of recording events (consumer group ``workers``)."""
        return f"{self._tag}:recordings"

    @property
    def dead(self) -> str:
        """The dead-letter stream: entries that failed for good, with their error."""
        return f"{self._tag}:dead"

    @property
    def group(self) -> str:
        """The consumer group every worker joins."""
        return GROUP

    def seen(self, recording_sid: str) -> str:
        """Dedupe marker of one recording: holds the stream entry id it was added as."""
        return f"{self._tag}:seen:{recording_sid}"

    def heartbeat(self, consumer: str) -> str:
        """A consumer's heartbeat: JSON about the process, expiring unless renewed."""
        return f"{self._tag}:heartbeat:{consumer}"

    @property
    def heartbeat_pattern(self) -> str:
        """SCAN pattern matching every consumer heartbeat of this namespace."""
        return f"{self._tag}:heartbeat:*"

    def slots(self, business: str) -> str:
        """Sorted set of the entry ids holding a slot of ``business``, scored by lease expiry."""
        return f"{self._tag}:slots:{business}"

    def parked(self, business: str) -> str:
        """List of ``business``'s parked entries (JSON), oldest first."""
        return f"{self._tag}:parked:{business}"

    @property
    def parked_set(self) -> str:
        """Set of the businesses that have parked entries."""
        return f"{self._tag}:parked"

    @property
    def slot_limits(self) -> str:
        """Hash of per-business slot limits overriding STREAMREC_BUSINESS_SLOTS."""
        return f"{self._tag}:slot-limits"
