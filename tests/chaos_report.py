"""What a chaos run found, and the accounting behind its figures.

The stand-ins see every request a recording's work makes; the run notes which
recordings each consumer kill caught in work. From these: how many recordings
ran a stage more often than the kills explain, and how many recordings of one
business were in work at once.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field

from tests.standins import MediaStandIn, OpenAIStandIn, Span


@dataclass
class ChaosReport:
    """What the run found; ``ok`` says whether every promise held."""

    sent: int = 0
    unique: int = 0
    callbacks_given_up: int = 0
    """Callbacks Twilio would have given up on: no 2xx after its one retry."""
    lost_at_edge: int = 0
    """Recordings none of whose callbacks got a 2xx: without the reconciler, lost for good."""
    reconciled: int = 0
    """Recordings the scheduled reconciler enqueued (their rows say origin reconcile)."""
    queued_not_once: int = 0
    """Recordings enqueued more than once: answered "queued" twice, or also reconciled."""
    completed: int = 0
    lost: int = 0
    dead_letters: int = 0
    extra_downloads: int = 0
    extra_transcriptions: int = 0
    interrupted: int = 0
    """Recordings a consumer kill caught in work (pending on the killed consumer), or whose
    work a consumer gave up (``work_stopped``)."""
    work_stopped: int = 0
    """Work a live consumer gave up because it could not renew its claim or slot lease in
    time, or Redis failed it between attempts (Redis down, a failover): it stops before
    its next side effect, and the next owner repeats at most the stage it was in."""
    extra_downloads_unexplained: int = 0
    """Recordings downloaded more than once plus once per kill that interrupted them."""
    extra_transcriptions_unexplained: int = 0
    """Recordings transcribed more than once plus once per kill that interrupted them."""
    consumer_kills: int = 0
    consumer_exits: int = 0
    """Consumers that exited on their own (a dependency down as they started) and were replaced."""
    redis_kills: int = 0
    postgres_stops: int = 0
    webhook_outages: int = 0
    longest_reclaim_s: float = 0.0
    pending: int = 0
    parked: int = 0
    slot_peak: int = 0
    """Most recordings of one business in work at once (first media request to last answer)."""
    slot_limit: int = 0
    seconds: float = 0.0
    order_inversions: int = 0
    """Pairs of recordings of one business (neither cut by a kill) whose first downloads
    began in the other order than their stream entries: consumers admitting batches at
    the same moment may swap neighbours; the slots never let more than the limit run."""
    order_most_ahead: int = 0
    """The most places a recording began ahead of its business's stream order (the slot
    limit lets that many run at once, so up to limit - 1 is concurrency, not reordering)."""
    failover_recovery_s: float = 0.0
    """A cluster run: from killing a primary to the first download of a recording sent
    after it on a partition that primary served."""
    reclaim_times: list[float] = field(default_factory=list)
    over_limit: list[str] = field(default_factory=list)
    """When the slot peak passed the limit: the business, and each recording in work at
    that moment with its spans and cuts, to see whether a slot or the accounting failed."""

    @property
    def ok(self) -> bool:
        return (
            self.lost == 0
            and self.queued_not_once == 0
            and self.extra_downloads_unexplained == 0
            and self.extra_transcriptions_unexplained == 0
            and self.pending == 0
            and self.parked == 0
            and self.slot_peak <= self.slot_limit
        )

    def render(self) -> str:
        rows = {k: v for k, v in asdict(self).items() if k not in ("reclaim_times", "over_limit")}
        width = max(len(k) for k in rows)
        lines = [f"  {k:<{width}}  {v:.2f}" if isinstance(v, float) else f"  {k:<{width}}  {v}"
                 for k, v in rows.items()]  # fmt: skip
        lines.append(f"  {'verdict':<{width}}  {'OK' if self.ok else 'FAILED'}")
        return "\n".join(lines + [f"  over the limit: {line}" for line in self.over_limit])

    def count_work(
        self,
        sids: list[str],
        media: MediaStandIn,
        openai: OpenAIStandIn,
        cuts: Mapping[str, list[float]],
    ) -> None:
        """What the stand-ins did per recording, against the kills that explain repeats.

        ``cuts``: per RecordingSid, when each consumer kill that caught it in work was noted.
        """
        downloads, transcriptions = Counter(media.started), openai.calls
        self.extra_downloads = sum(downloads.values()) - len(sids)
        self.extra_transcriptions = sum(transcriptions.values()) - len(sids)
        self.interrupted = len(cuts)
        self.extra_downloads_unexplained = unexplained(downloads, cuts, sids)
        self.extra_transcriptions_unexplained = unexplained(transcriptions, cuts, sids)
        spans = {sid: media.spans.get(sid, []) + openai.spans.get(sid, []) for sid in sids}
        self.slot_peak = slot_peak(media.business_of, spans, cuts)
        if self.slot_peak > self.slot_limit:
            self.over_limit = over_limit(media.business_of, spans, cuts, self.slot_limit)


def starts_in_stream_order(
    entry_ids: Mapping[str, str],
    business_of: Mapping[str, str],
    spans: Mapping[str, list[Span]],
    cuts: Mapping[str, list[float]],
) -> dict[str, list[float]]:
    """Per business, when each of its recordings (not cut by a kill) first began, in the
    order of their stream entries."""
    firsts: defaultdict[str, list[tuple[tuple[int, int], float]]] = defaultdict(list)
    for sid, entry_id in entry_ids.items():
        if sid in cuts or not spans.get(sid) or sid not in business_of:
            continue
        millis, _, seq = entry_id.partition("-")
        begun = min(start for start, _ in spans[sid])
        firsts[business_of[sid]].append(((int(millis), int(seq or 0)), begun))
    return {b: [begun for _, begun in sorted(found)] for b, found in firsts.items()}


def order_inversions(starts: Mapping[str, list[float]]) -> int:
    """Pairs of one business's recordings that began in the other order than their entries."""
    return sum(
        1 for begun in starts.values() for i, a in enumerate(begun) for b in begun[i + 1 :] if b < a
    )


def most_ahead(starts: Mapping[str, list[float]]) -> int:
    """The most places a recording began ahead of its place in its business's stream order."""
    ahead = 0
    for begun in starts.values():
        ranks = {i: rank for rank, i in enumerate(sorted(range(len(begun)), key=begun.__getitem__))}
        ahead = max([ahead, *(i - rank for i, rank in ranks.items())])
    return ahead


def unexplained(
    counts: Mapping[str, int], cuts: Mapping[str, list[float]], sids: Iterable[str]
) -> int:
    """How many recordings ran a stage more than once, plus once per kill that cut them."""
    return sum(1 for sid in sids if counts.get(sid, 0) > 1 + len(cuts.get(sid, ())))


def slot_peak(
    business_of: Mapping[str, str],
    spans: Mapping[str, list[Span]],
    cuts: Mapping[str, list[float]],
) -> int:
    """The most recordings of one business in work at once (see ``work_intervals``)."""
    intervals: defaultdict[str, list[Span]] = defaultdict(list)
    for sid, business in business_of.items():
        intervals[business] += work_intervals(spans.get(sid, []), cuts.get(sid, []))
    return max(map(peak, intervals.values()), default=0)


def over_limit(
    business_of: Mapping[str, str],
    spans: Mapping[str, list[Span]],
    cuts: Mapping[str, list[float]],
    limit: int,
) -> list[str]:
    """The first moment a business had more than ``limit`` recordings in work, and those
    recordings with their spans and cuts (monotonic seconds)."""
    intervals: defaultdict[str, list[tuple[Span, str]]] = defaultdict(list)
    for sid, business in business_of.items():
        for interval in work_intervals(spans.get(sid, []), cuts.get(sid, [])):
            intervals[business].append((interval, sid))
    for business, found in intervals.items():
        edges = sorted(
            [(begun, 1, sid) for (begun, _), sid in found]
            + [(ended, -1, sid) for (_, ended), sid in found]
        )
        open_now: Counter[str] = Counter()
        for moment, step, sid in edges:
            open_now[sid] += step
            if sum(open_now.values()) > limit:
                return [f"business {business} at {moment:.3f}"] + [
                    f"{s} spans {spans.get(s)} cuts {cuts.get(s, [])}"
                    for s, n in open_now.items()
                    if n > 0
                ]
    return []


def work_intervals(spans: list[Span], cuts: list[float]) -> list[Span]:
    """When one recording held a slot, as far as the requests made for it show.

    A delivery runs from its first request (the slot was taken before it) to its
    last answer (the slot is freed after it). A delivery a consumer kill cut
    short ends at the cut: the dead process did no more work, whatever the
    stand-ins still answered it; the next delivery begins with the first
    request after the cut.
    """
    intervals: list[Span] = []
    after = -math.inf
    for cut in [*sorted(cuts), math.inf]:
        inside = [span for span in spans if after < span[0] <= cut]
        if inside:
            begun = min(begun for begun, _ in inside)
            ended = cut if cut < math.inf else max(ended for _, ended in inside)
            intervals.append((begun, ended))
        after = cut
    return intervals


def peak(intervals: list[Span]) -> int:
    """Most intervals open at one moment (one that ends as another begins does not overlap it)."""
    edges = sorted([(ended, -1) for _, ended in intervals] + [(begun, 1) for begun, _ in intervals])
    most = current = 0
    for _, step in edges:
        current += step
        most = max(most, current)
    return most


def as_json(report: ChaosReport) -> str:
    """The report as JSON, for machines."""
    return json.dumps({**asdict(report), "ok": report.ok}, indent=2)
