"""Planning chunks around checkpoints, and stitching their transcripts into a conversation."""

from __future__ import annotations

from streamrec.chunking import Piece, Segment, Span, halves, plan, stitch


def latest(lo: int, hi: int) -> int:
    """A track with no quiet moment: the cut falls at the longest end allowed."""
    return hi


def test_a_long_track_is_cut_into_even_chunks_that_tile_it() -> None:
    """As few chunks as the target allows, of even length, covering the track end to end."""
    spans = plan(1, 65_000, [], target_ms=20_000, overlap_ms=1_000, quiet=latest)
    # Four chunks of 16.25 s; each cut searched within 2 s around its even place.
    assert [(s.start_ms, s.end_ms) for s in spans] == [
        (0, 18_281), (18_281, 34_531), (34_531, 50_781), (50_781, 65_000),
    ]  # fmt: skip
    # Each upload begins at the quiet point found in the half overlap before the chunk.
    assert [s.audio_start_ms for s in spans] == [0, 17_781, 34_031, 50_281]
    assert {s.track for s in spans} == {1}


def test_an_hour_in_twenty_minute_chunks_is_three() -> None:
    """60 minutes at the default 1200 s: three chunks, none past the target and its window."""
    spans = plan(0, 3_600_000, [], target_ms=1_200_000, overlap_ms=1_000, quiet=latest)
    assert len(spans) == 3
    assert max(s.end_ms - s.start_ms for s in spans) <= 1_200_000 + 30_000


def test_cuts_fall_at_the_quiet_point_found_around_the_even_place() -> None:
    """The cut is where ``quiet`` says, searched within a quarter chunk around its place."""
    asked: list[tuple[int, int]] = []

    def quiet(lo: int, hi: int) -> int:
        asked.append((lo, hi))
        return lo + 100

    spans = plan(0, 30_000, [], target_ms=20_000, overlap_ms=0, quiet=quiet)
    assert asked == [(13_125, 16_875)]  # no overlap: no quiet point asked for the upload
    assert [(s.start_ms, s.end_ms) for s in spans] == [(0, 13_225), (13_225, 30_000)]


def test_committed_chunks_are_not_planned_again() -> None:
    """With chunks done in the middle and at the start, only the gaps are planned."""
    done = [(0, 20_000), (40_000, 60_000)]
    spans = plan(2, 70_000, done, target_ms=20_000, overlap_ms=500, quiet=latest)
    assert [(s.start_ms, s.end_ms, s.audio_start_ms) for s in spans] == [
        (20_000, 40_000, 19_750), (60_000, 70_000, 59_750),
    ]  # fmt: skip
    assert plan(2, 70_000, [(0, 70_000)], target_ms=20_000, overlap_ms=0, quiet=latest) == []


def test_a_refused_chunk_is_cut_in_two_near_its_middle() -> None:
    """Halves meet at the quiet point; the second's upload overlaps the first."""
    first, second = halves(Span(1, 10_000, 30_000, 9_000), overlap_ms=1_000, quiet=latest)
    assert first == Span(1, 10_000, 22_500, 9_000)
    assert second == Span(1, 22_500, 30_000, 22_000)


def piece(track: int, start: int, end: int, text: str, *segments: Segment) -> Piece:
    audio_start = max(0, start - 2_000)
    return Piece(Span(track, start, end, audio_start), text, segments or None, "whisper-1")


def test_timestamped_segments_are_ordered_across_channels_and_overlaps_dropped() -> None:
    """Two speakers interleave by time; a segment the overlap repeated appears once."""
    caller = [
        piece(1, 0, 10_000, "hello there", Segment(1.0, 2.0, "hello"), Segment(8.5, 9.5, "there")),
        # Its upload began at 8 s: "there" (8.5-9.5) is the overlap's repeat.
        piece(1, 10_000, 20_000, "there again",
              Segment(8.5, 9.5, "there"), Segment(12.0, 13.0, "again")),
    ]  # fmt: skip
    callee = [piece(2, 0, 20_000, "hi", Segment(3.0, 4.0, "hi"))]
    conversation = stitch(caller + callee, {1: "caller", 2: "callee"})
    assert conversation.timestamps
    assert [(s["speaker"], s["text"]) for s in conversation.segments] == [
        ("caller", "hello"), ("callee", "hi"), ("caller", "there"), ("caller", "again"),
    ]  # fmt: skip
    assert conversation.text == "caller: hello\ncallee: hi\ncaller: there again"


def test_text_only_chunks_are_stitched_without_doubled_words() -> None:
    """Without timestamps, words the overlap repeats at a chunk's start are dropped once."""
    pieces = [
        piece(0, 0, 10_000, "we will ship it on Monday."),
        piece(0, 10_000, 20_000, "on monday, then invoice"),
        piece(0, 20_000, 30_000, "invoice the rest"),
    ]
    conversation = stitch(pieces, {0: None})
    assert conversation.text == "we will ship it on Monday. then invoice the rest"
    assert not conversation.timestamps
    assert [(s["start_s"], s["end_s"]) for s in conversation.segments] == [
        (0.0, 10.0), (10.0, 20.0), (20.0, 30.0),
    ]  # fmt: skip


def test_a_single_chunk_keeps_its_text_as_given() -> None:
    """One chunk of a mono recording: the transcript is the model's text, spacing and all."""
    text = "Line one.\nLine  two."
    assert stitch([piece(0, 0, 5_000, text)], {0: None}).text == text


def test_diarized_labels_name_the_speakers_of_a_mixed_track() -> None:
    """On one mixed track the model's speaker labels are used; a channel's name wins over them."""
    mixed = piece(0, 0, 5_000, "a b", Segment(0, 1, "yes", "A"), Segment(1, 2, "no", "B"))
    assert stitch([mixed], {0: None}).text == "speaker A: yes\nspeaker B: no"
    split = piece(1, 0, 5_000, "a", Segment(0, 1, "yes", "A"))
    assert stitch([split], {1: "agent"}).text == "agent: yes"
