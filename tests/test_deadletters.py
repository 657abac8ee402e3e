"""Dead letters: listing, replaying and purging them, through the API and ``streamrec dlq``."""

from __future__ import annotations

import asyncio
import functools
import json
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from streamrec import deadletters, service
from streamrec.events import RecordingEvent
from streamrec.keys import Keys
from streamrec.producer import Enqueuer
from streamrec.settings import Settings
from tests.conftest import entries
from tests.processes import environment, streamrec
from tests.standins import ACCOUNT_SID, MediaStandIn, call_sid, recording_sid


async def enqueue(redis: aioredis.Redis, keys: Keys, *, business: str = "7") -> str:
    """Add one completed-recording event as the webhook does; returns its RecordingSid."""
    event = RecordingEvent.create(
        recording_sid=recording_sid(),
        call_sid=call_sid(),
        account_sid=ACCOUNT_SID,
        business_id=business,
        status="completed",
        duration_s="42",
    )
    added, _ = await Enqueuer(redis, keys, dedupe_ttl_s=600).enqueue(event)
    assert added
    return event.recording_sid


async def consume_all(settings: Settings) -> None:
    await asyncio.wait_for(service.consume(settings, asyncio.Event(), until_idle=True), 60)


async def rows(db: Any) -> dict[str, Any]:
    return {r["recording_sid"]: r for r in await db.fetch("SELECT * FROM recordings")}


async def dead_recordings(
    redis: aioredis.Redis, keys: Keys, settings: Settings, media: MediaStandIn, count: int
) -> list[str]:
    """``count`` recordings the media endpoint refuses (403), consumed into dead letters."""
    sids = [await enqueue(redis, keys) for _ in range(count)]
    for sid in sids:
        media.status_for[sid] = 403
    await consume_all(settings)
    return sids


async def add_dead(redis: aioredis.Redis, keys: Keys, count: int) -> list[str]:
    """``count`` stream entries (ids 1-0, 1-1, ...) moved to the dead letters as a consumer
    moves them; returns the dead letters' ids."""
    for n in range(count):
        fields = {"v": "1", "recording_sid": f"RE{n:032x}", "business_id": "9"}
        await redis.xadd(keys.stream, fields, id=f"1-{n}")  # type: ignore[arg-type]
        assert await deadletters.move(
            redis,
            keys,
            entry_id=f"1-{n}",
            fields=fields,
            error=f"PermanentError: media request got 40{n}",
            attempts=n + 1,
            consumer="worker-a",
        )
    return [entry_id for entry_id, _ in await entries(redis, keys.dead)]


async def test_replayed_dead_recording_completes_once(
    redis: aioredis.Redis,
    keys: Keys,
    settings: Settings,
    media: MediaStandIn,
    db: Any,
    tmp_path: Path,
) -> None:
    """A recording dead-lettered by a 403 completes once after ``dlq replay <id>``."""
    [sid] = await dead_recordings(redis, keys, settings, media, 1)
    [(dead_id, dead)] = await entries(redis, keys.dead)
    assert dead["recording_sid"] == sid
    assert "403" in dead["error"]
    assert (await rows(db))[sid]["status"] == "failed"

    del media.status_for[sid]  # the cause is fixed
    finished = await streamrec("dlq", "replay", dead_id, env=environment(settings), cwd=tmp_path)
    assert finished.returncode == 0, finished.stderr
    assert finished.stdout.startswith(f"{dead_id} -> ")
    await consume_all(settings)

    found = await rows(db)
    assert list(found) == [sid]
    assert found[sid]["status"] == "completed"
    assert found[sid]["error"] is None
    assert found[sid]["transcript"] == f"transcript of {sid}"
    assert media.served[sid] == 1
    assert await redis.xlen(keys.dead) == 0
    assert await redis.xlen(keys.stream) == 0


async def test_replay_all_replays_every_dead_letter(
    redis: aioredis.Redis,
    keys: Keys,
    settings: Settings,
    media: MediaStandIn,
    db: Any,
    tmp_path: Path,
) -> None:
    """``dlq replay --all`` puts every dead recording back; all of them then complete."""
    sids = await dead_recordings(redis, keys, settings, media, 4)
    assert await redis.xlen(keys.dead) == 4
    for sid in sids:
        del media.status_for[sid]
    finished = await streamrec("dlq", "replay", "--all", env=environment(settings), cwd=tmp_path)
    assert finished.returncode == 0, finished.stderr
    assert finished.stdout.strip() == "replayed 4"
    assert await redis.xlen(keys.dead) == 0
    await consume_all(settings)
    found = await rows(db)
    assert set(found) == set(sids)
    assert {row["status"] for row in found.values()} == {"completed"}
    assert await redis.xlen(keys.stream) == 0


async def test_replay_all_works_through_batches(redis: aioredis.Redis, keys: Keys) -> None:
    """replay_all with a batch smaller than the dead letters replays them all, in order."""
    await add_dead(redis, keys, 5)
    assert await deadletters.replay_all(redis, keys, batch=2) == 5
    assert await redis.xlen(keys.dead) == 0
    replayed = [fields["recording_sid"] for _, fields in await entries(redis, keys.stream)]
    assert replayed == [f"RE{n:032x}" for n in range(5)]


async def test_dlq_list_shows_fields_error_and_attempts(
    redis: aioredis.Redis, keys: Keys, settings: Settings, tmp_path: Path
) -> None:
    """``dlq list`` and ``dlq list --json`` show each dead letter's fields, error, attempts."""
    ids = await add_dead(redis, keys, 2)
    env = environment(settings)

    as_json = await streamrec("dlq", "list", "--json", env=env, cwd=tmp_path)
    assert as_json.returncode == 0, as_json.stderr
    listed = json.loads(as_json.stdout)
    assert [letter["id"] for letter in listed] == ids
    for n, letter in enumerate(listed):
        assert letter["fields"] == {"v": "1", "recording_sid": f"RE{n:032x}", "business_id": "9"}
        assert letter["error"] == f"PermanentError: media request got 40{n}"
        assert letter["attempts"] == n + 1
        assert letter["origin_id"] == f"1-{n}"
        assert letter["consumer"] == "worker-a"
        assert letter["failed_at_ms"] > 0

    plain = await streamrec("dlq", "list", env=env, cwd=tmp_path)
    assert plain.returncode == 0, plain.stderr
    for n, dead_id in enumerate(ids):
        assert dead_id in plain.stdout
        assert f"attempts {n + 1}" in plain.stdout
        assert f"error: PermanentError: media request got 40{n}" in plain.stdout
        assert f"recording_sid=RE{n:032x}" in plain.stdout

    first = await streamrec("dlq", "list", "--json", "--count", "1", env=env, cwd=tmp_path)
    assert [letter["id"] for letter in json.loads(first.stdout)] == ids[:1]


async def test_dlq_list_of_no_dead_letters(
    redis: aioredis.Redis, settings: Settings, tmp_path: Path
) -> None:
    """``dlq list`` with nothing dead says so; ``--json`` prints an empty list."""
    env = environment(settings)
    plain = await streamrec("dlq", "list", env=env, cwd=tmp_path)
    assert (plain.returncode, plain.stdout.strip()) == (0, "no dead letters")
    as_json = await streamrec("dlq", "list", "--json", env=env, cwd=tmp_path)
    assert (as_json.returncode, json.loads(as_json.stdout)) == (0, [])


async def test_purge_without_yes_and_without_a_tty_deletes_nothing(
    redis: aioredis.Redis, keys: Keys, settings: Settings, tmp_path: Path
) -> None:
    """``dlq purge`` with no --yes and no terminal to ask on exits 2 and deletes nothing."""
    await add_dead(redis, keys, 3)
    env = environment(settings)
    for args in (("dlq", "purge"), ("dlq", "purge", "1-0")):
        finished = await streamrec(*args, env=env, cwd=tmp_path)
        assert finished.returncode == 2
        assert "--yes" in finished.stderr
        assert await redis.xlen(keys.dead) == 3


async def test_purge_with_yes_deletes_them_all(
    redis: aioredis.Redis, keys: Keys, settings: Settings, tmp_path: Path
) -> None:
    """``dlq purge --yes`` deletes every dead letter and says how many."""
    await add_dead(redis, keys, 3)
    finished = await streamrec("dlq", "purge", "--yes", env=environment(settings), cwd=tmp_path)
    assert finished.returncode == 0, finished.stderr
    assert finished.stdout.strip() == "deleted 3"
    assert await redis.xlen(keys.dead) == 0


async def test_purge_with_ids_deletes_only_those(
    redis: aioredis.Redis, keys: Keys, settings: Settings, tmp_path: Path
) -> None:
    """``dlq purge --yes ID ID`` deletes those two dead letters and keeps the others."""
    ids = await add_dead(redis, keys, 4)
    finished = await streamrec(
        "dlq", "purge", "--yes", ids[0], ids[2], env=environment(settings), cwd=tmp_path
    )
    assert finished.returncode == 0, finished.stderr
    assert finished.stdout.strip() == "deleted 2"
    assert [entry_id for entry_id, _ in await entries(redis, keys.dead)] == [ids[1], ids[3]]


@pytest.mark.parametrize("bad", ["1-999", "not-an-id"], ids=["unknown", "malformed"])
async def test_replay_of_a_bad_id_exits_1_and_still_moves_the_others(
    redis: aioredis.Redis, keys: Keys, settings: Settings, tmp_path: Path, bad: str
) -> None:
    """``dlq replay KNOWN BAD`` replays KNOWN, says so, names BAD as unknown and exits 1."""
    [known] = await add_dead(redis, keys, 1)
    finished = await streamrec("dlq", "replay", known, bad, env=environment(settings), cwd=tmp_path)
    assert finished.returncode == 1
    assert f"{known} -> " in finished.stdout
    assert f"{bad}: no such dead letter" in finished.stdout
    assert await redis.xlen(keys.dead) == 0
    assert await redis.xlen(keys.stream) == 1


async def test_replay_leaves_each_entry_in_exactly_one_stream(
    redis: aioredis.Redis, keys: Keys
) -> None:
    """After replay each letter is on the stream (original fields only) or still dead, not both."""
    ids = await add_dead(redis, keys, 3)
    moved = await deadletters.replay(redis, keys, [ids[0], ids[2], "1-999"])
    assert list(moved) == [ids[0], ids[2], "1-999"]
    assert moved["1-999"] is None
    on_stream = dict(await entries(redis, keys.stream))
    still_dead = dict(await entries(redis, keys.dead))
    assert list(still_dead) == [ids[1]]
    assert set(on_stream) == {moved[ids[0]], moved[ids[2]]}
    for n in (0, 2):
        new_id = moved[ids[n]]
        assert new_id is not None
        assert ids[n] not in still_dead
        assert on_stream[new_id] == {
            "v": "1",
            "recording_sid": f"RE{n:032x}",
            "business_id": "9",
        }
    assert await redis.xlen(keys.stream) == 2


async def test_replay_takes_only_exact_dead_letter_ids(redis: aioredis.Redis, keys: Keys) -> None:
    """An id that is no dead letter's exact id (ms only, malformed) moves nothing, even in part."""
    for seq in range(2):
        await redis.xadd(keys.dead, {"v": "1", "n": str(seq), "error": "boom"}, id=f"5-{seq}")
    assert (await deadletters.replay(redis, keys, ["5-0"]))["5-0"] is not None
    # "5" is a range to XRANGE (5-0 .. 5-max), which now starts at 5-1.
    assert await deadletters.replay(redis, keys, ["5", "not-an-id"]) == {
        "5": None,
        "not-an-id": None,
    }
    assert [i for i, _ in await entries(redis, keys.dead)] == ["5-1"]
    assert [f["n"] for _, f in await entries(redis, keys.stream)] == ["0"]


async def test_a_repeated_move_writes_one_dead_letter(redis: aioredis.Redis, keys: Keys) -> None:
    """A move run again (its reply lost) adds no second dead letter and still answers True."""
    entry_id = str(await redis.xadd(keys.stream, {"v": "1", "n": "0"}))
    await redis.xgroup_create(keys.stream, keys.group, id="0")
    await redis.xreadgroup(keys.group, "worker-a", {keys.stream: ">"})
    move = functools.partial(
        deadletters.move,
        redis,
        keys,
        entry_id=entry_id,
        fields={"v": "1", "n": "0"},
        error="PermanentError: boom",
        attempts=1,
    )
    assert await move(consumer="worker-a")
    assert await move(consumer="worker-a")  # the same call again: it recognises its move
    [(_, dead)] = await entries(redis, keys.dead)
    assert (dead["origin_id"], dead["consumer"], dead["n"]) == (entry_id, "worker-a", "0")
    assert not await move(consumer="worker-b")  # another consumer's move finds it gone
    assert await redis.xlen(keys.dead) == 1
    assert await redis.xlen(keys.stream) == 0
    assert (await redis.xpending(keys.stream, keys.group))["pending"] == 0


async def test_a_repeated_replay_returns_the_same_new_id(redis: aioredis.Redis, keys: Keys) -> None:
    """Replaying a dead letter twice (a reply lost) answers the same new id and adds one entry."""
    [dead_id] = await add_dead(redis, keys, 1)
    first = await deadletters.replay(redis, keys, [dead_id])
    again = await deadletters.replay(redis, keys, [dead_id])
    assert first[dead_id] is not None
    assert again == first
    assert [entry_id for entry_id, _ in await entries(redis, keys.stream)] == [first[dead_id]]
    assert await redis.xlen(keys.dead) == 0


async def test_replay_all_leaves_letters_that_arrive_meanwhile(
    redis: aioredis.Redis, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """replay_all replays the letters there were at its start, not those its replays create."""
    await add_dead(redis, keys, 3)
    replay, failed_again = deadletters.replay, set()

    async def replay_then_fail_again(
        redis: aioredis.Redis, keys: Keys, ids: list[str]
    ) -> dict[str, str | None]:
        """The replay, then each replayed recording failing once more, as a broken cause does."""
        moved = await replay(redis, keys, ids)
        for new_id in moved.values():
            assert new_id is not None
            [(_, fields)] = [e for e in await entries(redis, keys.stream) if e[0] == new_id]
            if fields["recording_sid"] in failed_again:
                continue
            failed_again.add(fields["recording_sid"])
            assert await deadletters.move(
                redis, keys, entry_id=new_id, fields=fields, error="again", attempts=1,
                consumer="worker-b",
            )  # fmt: skip
        return moved

    monkeypatch.setattr(deadletters, "replay", replay_then_fail_again)
    assert await deadletters.replay_all(redis, keys, batch=2) == 3
    again = await entries(redis, keys.dead)
    assert [fields["error"] for _, fields in again] == ["again"] * 3
    assert [fields["recording_sid"] for _, fields in again] == [f"RE{n:032x}" for n in range(3)]
