"""Recording audio with PyAV: probe, decode to tracks, quiet points, chunk encoding.

Every file is real audio made on the fly (tests/audio.py): words are tones,
one speaker per channel, and what comes out is checked by hearing it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import pytest

from streamrec.audio import (
    MAX_UPLOAD_RATE,
    UnreadableAudio,
    decode,
    encode,
    probe,
    quiet_point,
    upload_bytes_per_second,
)
from tests.audio import Burst, conversation, hear, spoken, write_audio

DURATION_S = 20.0
HEADER_BYTES = 100
"""Room for a chunk's file header beside upload_bytes_per_second's bound."""
SPAN_S = 0.02
"""How far a heard word's edges may stray from the burst's."""

Call = tuple[Path, list[Burst], list[Burst]]


def make_call(
    directory: Path, *, fmt: Literal["mp3", "wav"], rate: int, stereo: bool = True
) -> Call:
    """A call of DURATION_S: two speakers on two channels, or speaker 0 alone on one."""
    first, second = conversation(DURATION_S, seed=rate)
    path = directory / f"call-{rate}-{'stereo' if stereo else 'mono'}.{fmt}"
    channels = [first, second] if stereo else [first]
    write_audio(path, fmt=fmt, rate=rate, duration_s=DURATION_S, channels=channels)
    return path, first, second


@pytest.fixture(scope="module")
def calls(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Call]:
    """The module's recordings, made once."""
    directory = tmp_path_factory.mktemp("calls")
    return {
        "mp3": make_call(directory, fmt="mp3", rate=8000),
        "wav": make_call(directory, fmt="wav", rate=2000),
        "mono": make_call(directory, fmt="mp3", rate=8000, stereo=False),
        "wideband": make_call(directory, fmt="mp3", rate=16000),
        "cd": make_call(directory, fmt="wav", rate=44100),
    }


def assert_heard(heard: list[tuple[float, float, str]], bursts: list[Burst]) -> None:
    """The words heard are the bursts, in order, each at its own time."""
    ordered = sorted(bursts, key=lambda burst: burst.start_s)
    assert [word for _, _, word in heard] == spoken(bursts)
    for (start, end, _), burst in zip(heard, ordered, strict=True):
        assert start == pytest.approx(burst.start_s, abs=SPAN_S)
        assert end == pytest.approx(burst.end_s, abs=SPAN_S)


@pytest.mark.parametrize(
    ("name", "channels", "rate", "codec"),
    [("mp3", 2, 8000, "mp3"), ("wav", 2, 2000, "pcm_s16le"), ("mono", 1, 8000, "mp3")],
)
def test_probe_reads_the_header(
    calls: dict[str, Call], name: str, channels: int, rate: int, codec: str
) -> None:
    """probe gives the duration, channels, sample rate and codec the file was made with,
    alike from the file and from its bytes in memory."""
    path = calls[name][0]
    info = probe(path)
    assert (info.channels, info.sample_rate, info.codec) == (channels, rate, codec)
    assert info.duration_s == pytest.approx(DURATION_S, abs=0.01)
    assert probe(path.with_name("elsewhere"), path.read_bytes()) == info


@pytest.mark.parametrize("name", ["mp3", "wav"])
def test_split_puts_each_speaker_on_their_own_track(calls: dict[str, Call], name: str) -> None:
    """decode(split=True) gives one track per channel, each with only its speaker's words."""
    path, first, second = calls[name]
    with decode(path, split=True) as tracks:
        assert (tracks.count, tracks.source_channels) == (2, 2)
        assert tracks.rate == tracks.source_rate
        assert tracks.frames == round(DURATION_S * tracks.rate)
        for track, bursts in enumerate([first, second]):
            data, extension = encode(tracks.samples(track), tracks.rate)
            assert extension == "wav"
            heard = hear(data)
            assert (heard.rate, heard.codec, heard.channels) == (tracks.rate, "pcm_mulaw", 1)
            assert heard.duration_s == pytest.approx(DURATION_S)
            assert_heard(heard.words, bursts)


def test_a_mono_file_splits_into_one_track(calls: dict[str, Call]) -> None:
    """A mono recording split is one track carrying its one speaker."""
    path, first, _ = calls["mono"]
    with decode(path, split=True) as tracks:
        assert (tracks.count, tracks.source_channels) == (1, 1)
        assert_heard(hear(encode(tracks.samples(0), tracks.rate)[0]).words, first)


@pytest.mark.parametrize("name", ["mp3", "wav"])
def test_mixed_downmixes_both_speakers_into_one_track(calls: dict[str, Call], name: str) -> None:
    """decode(split=False) gives one track in which both speakers' words are heard, in order."""
    path, first, second = calls[name]
    with decode(path, split=False) as tracks:
        assert (tracks.count, tracks.source_channels) == (1, 2)
        assert_heard(hear(encode(tracks.samples(0), tracks.rate)[0]).words, first + second)


def test_a_wideband_source_is_uploaded_as_flac_at_its_rate(calls: dict[str, Call]) -> None:
    """A 16 kHz recording stays at 16 kHz and its chunks are FLAC."""
    path, first, _ = calls["wideband"]
    with decode(path, split=True) as tracks:
        assert tracks.rate == MAX_UPLOAD_RATE
        data, extension = encode(tracks.samples(0), tracks.rate)
    heard = hear(data)
    assert (extension, heard.codec, heard.rate) == ("flac", "flac", 16000)
    assert_heard(heard.words, first)


def test_a_cd_rate_source_is_resampled_to_the_upload_rate(calls: dict[str, Call]) -> None:
    """A 44.1 kHz recording is decoded at 16 kHz, its words intact and on time."""
    path, _, second = calls["cd"]
    with decode(path, split=True) as tracks:
        assert (tracks.source_rate, tracks.rate) == (44100, MAX_UPLOAD_RATE)
        assert tracks.duration_s == pytest.approx(DURATION_S, abs=1e-3)
        heard = hear(encode(tracks.samples(1), tracks.rate)[0])
    assert heard.rate == MAX_UPLOAD_RATE
    assert_heard(heard.words, second)


@pytest.mark.parametrize("rate", [2000, 8000, 16000])
def test_chunks_stay_within_the_upload_bound(calls: dict[str, Call], rate: int) -> None:
    """Encoded chunks are no larger than upload_bytes_per_second says, and hold their length."""
    noise = np.random.default_rng(rate).integers(-32768, 32767, size=7 * rate, dtype=np.int16)
    for seconds in (1, 7):
        data, _ = encode(noise[: seconds * rate], rate)
        assert len(data) <= seconds * upload_bytes_per_second(rate) + HEADER_BYTES
        assert hear(data).duration_s == pytest.approx(seconds)


def test_a_chunk_cut_through_a_word_hears_the_part_it_holds(tmp_path: Path) -> None:
    """A chunk that ends inside a word is heard with that word's true partial span."""
    path = tmp_path / "cut.wav"
    bursts = [Burst(0.5, 0.5, "delta"), Burst(1.5, 0.6, "kilo")]
    write_audio(path, fmt="wav", rate=2000, duration_s=3.0, channels=[bursts])
    with decode(path, split=True) as tracks:
        samples = tracks.samples(0)
        head = hear(encode(samples[: 2 * 2000], 2000)[0])
        tail = hear(encode(samples[2 * 2000 :], 2000)[0])
    assert [word for *_, word in head.words] == ["delta", "kilo"]
    assert head.words[1][:2] == pytest.approx((1.5, 2.0), abs=SPAN_S)
    assert [word for *_, word in tail.words] == ["kilo"]
    assert tail.words[0][:2] == pytest.approx((0.0, 0.1), abs=SPAN_S)


def test_quiet_point_finds_the_gap_between_words(tmp_path: Path) -> None:
    """The quietest point of a range lies in the silence between two words, not in either."""
    path = tmp_path / "gap.wav"
    bursts = [Burst(0.2, 1.0, "alpha"), Burst(1.5, 1.0, "papa")]
    write_audio(path, fmt="wav", rate=8000, duration_s=3.0, channels=[bursts])
    with decode(path, split=True) as tracks:
        point = quiet_point(tracks.samples(0), 4000, 20000, tracks.rate)
    assert 1.2 + 0.025 <= point / 8000 <= 1.5 - 0.025


def test_quiet_point_prefers_the_latest_of_equal_silences() -> None:
    """Among equally quiet centres the one nearest hi wins; an empty range returns lo."""
    samples = np.zeros(8000, dtype=np.int16)
    samples[2000:3000] = 1000
    assert quiet_point(samples, 100, 7000, 8000) == 7000
    assert quiet_point(samples, 100, 2500, 8000) == 1800
    assert quiet_point(samples, 4321, 4321, 8000) == 4321
    with pytest.raises(ValueError, match="lo <= hi"):
        quiet_point(samples, 5000, 4000, 8000)


@pytest.mark.parametrize(
    "content",
    [b"not audio at all\n" * 100, b"ID3\x04\x00\x00\x00\x00\x00\x00\xff\xfb\x90\x00" + bytes(2000)],
)
def test_undecodable_files_are_unreadable_audio(tmp_path: Path, content: bytes) -> None:
    """Text, or an mp3 header with nothing after it, is UnreadableAudio for probe and decode."""
    path = tmp_path / "recording.mp3"
    path.write_bytes(content)
    with pytest.raises(UnreadableAudio, match=r"recording\.mp3"):
        probe(path)
    with pytest.raises(UnreadableAudio, match=r"recording\.mp3"):
        probe(path, content)
    with pytest.raises(UnreadableAudio, match=r"recording\.mp3"):
        decode(path, split=True)


def test_a_missing_file_is_not_blamed_on_its_content(tmp_path: Path) -> None:
    """A file that is not there raises FileNotFoundError, not UnreadableAudio."""
    with pytest.raises(FileNotFoundError):
        probe(tmp_path / "absent.mp3")


def test_a_few_damaged_frames_are_skipped(calls: dict[str, Call], tmp_path: Path) -> None:
    """An mp3 with a damaged stretch decodes, losing only that stretch's milliseconds."""
    data = bytearray(calls["mono"][0].read_bytes())
    middle = len(data) // 2
    data[middle : middle + 300] = b"\x55" * 300
    damaged = tmp_path / "damaged.mp3"
    damaged.write_bytes(data)
    with decode(damaged, split=True) as tracks:
        assert DURATION_S - 0.5 < tracks.duration_s <= DURATION_S


def test_closed_tracks_refuse_reads(calls: dict[str, Call]) -> None:
    """After close() a track cannot be read; arrays taken before stay readable."""
    tracks = decode(calls["wav"][0], split=True)
    taken = tracks.samples(1)
    with pytest.raises(IndexError):
        tracks.samples(2)
    tracks.close()
    with pytest.raises(ValueError, match="closed"):
        tracks.samples(0)
    assert len(taken) == tracks.frames
    assert int(np.abs(taken).max()) > 0
