"""Every Redis key, stream and group name streamrec uses, in one place.

All keys of one partition share one hash tag, so that the Lua scripts, which
touch several keys at once, run on Redis Cluster too. With one partition (the
default) that tag is ``{<namespace>}`` for every key. With more
(``streamrec.partitions``), each partition's stream, group, dead letters, slots,
parked lists and dedupe markers carry the partition's own tag, and what belongs
to the whole deployment (the consumer registry, heartbeats, outcome counts, the
reconcile lease, the partition count) keeps ``{<namespace>}``.
"""

from __future__ import annotations

from dataclasses import dataclass

GROUP = "workers"


@dataclass(frozen=True, slots=True)
class Keys:
    """Key names for one namespace (``STREAMREC_NAMESPACE``), or one partition of it."""

    namespace: str = "streamrec"
    tag: str = ""
    """The hash tag's text (empty: the namespace); a partition's own (``streamrec.partitions``)."""
    partition: int = 0
    """Which partition these keys are (0 of 1 without partitions)."""

    @property
    def _tag(self) -> str:
        return "{" + (self.tag or self.namespace) + "}"

    @property
    def confirmed(self) -> str:
        """Written just before a WAIT that confirms the partition's writes on replicas
        (``streamrec.confirm``): the name of the process that last confirmed."""
        return f"{self._tag}:confirmed"

    @property
    def partitions(self) -> str:
        """How many partitions the namespace has: recorded at first start, checked at each."""
        return f"{self._tag}:partitions"

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

    def dead_moved(self, entry_id: str) -> str:
        """Marker of an entry just moved to the dead letters: the consumer that moved it."""
        return f"{self._tag}:dead-moved:{entry_id}"

    def replayed(self, dead_id: str) -> str:
        """Marker of a dead letter just replayed: the id it was put back on the stream as."""
        return f"{self._tag}:replayed:{dead_id}"

    @property
    def consumers(self) -> str:
        """Sorted set of the consumers' names, scored by heartbeat expiry (ms, server time)."""
        return f"{self._tag}:consumers"

    @property
    def heartbeats(self) -> str:
        """Hash of consumer name → its last heartbeat (JSON about the process)."""
        return f"{self._tag}:heartbeats"

    @property
    def outcomes(self) -> str:
        """Hash of ``<outcome>:<slot>`` → how many entries ended so in that 10 s slot of
        Redis time (the last hour's; consumers add to it with their heartbeats, the
        webhook its answers: queued, duplicate, rejected)."""
        return f"{self._tag}:outcomes"

    @property
    def outcome_slots(self) -> str:
        """Sorted set of the slots ``outcomes`` holds counts of, to prune those past an hour."""
        return f"{self._tag}:outcome-slots"

    def tally(self, process: str) -> str:
        """The number of the last batch of answer counts a webhook process added to
        ``outcomes`` (a repeated call adds nothing); expires once the process stops."""
        return f"{self._tag}:tally:{process}"

    @property
    def outcome_totals(self) -> str:
        """Hash of ``<consumer>:<outcome>`` → that consumer's running total already counted
        into ``outcomes`` (a repeated heartbeat adds nothing)."""
        return f"{self._tag}:outcome-totals"

    def slots(self, business: str) -> str:
        """Sorted set of the entry ids holding a slot of ``business``, scored by lease expiry."""
        return f"{self._tag}:slots:{business}"

    def parked(self, business: str) -> str:
        """List of ``business``'s parked entries (JSON), oldest first."""
        return f"{self._tag}:parked:{business}"

    @property
    def parked_set(self) -> str:
        """Sorted set of the businesses that have parked entries, scored by the earliest
        time (Redis time, ms) one of them could be woken: a sweep reads only those due."""
        return f"{self._tag}:parked-due"

    @property
    def legacy_parked_set(self) -> str:
        """Plain set of the businesses with parked entries, as earlier versions kept it;
        the first sweep moves it into ``parked_set``."""
        return f"{self._tag}:parked"

    @property
    def slot_businesses(self) -> str:
        """Set of the businesses that hold slots, have parked entries or a limit of their own."""
        return f"{self._tag}:slot-businesses"

    @property
    def slot_sweep(self) -> str:
        """Lock (``SET NX PX``) letting one consumer of the group sweep per period."""
        return f"{self._tag}:slot-sweep"

    @property
    def slot_limits(self) -> str:
        """Hash of per-business slot limits overriding STREAMREC_BUSINESS_SLOTS."""
        return f"{self._tag}:slot-limits"

    @property
    def reconcile_lease(self) -> str:
        """Lease (``SET NX PX``, renewed while running) of the consumer running a scheduled
        reconcile: one run at a time across replicas; a crashed holder's lapses."""
        return f"{self._tag}:reconcile:lease"

    @property
    def reconcile_next(self) -> str:
        """Present (``PX`` one interval) from the claim of a scheduled reconcile until the
        next one is due: one run per interval, whichever consumer claims it."""
        return f"{self._tag}:reconcile:next"

    @property
    def reconcile_last(self) -> str:
        """The last reconcile run's result (JSON), for ``status``."""
        return f"{self._tag}:reconcile:last"
