"""Per-business transcription settings: the table, its replicas, and ``businesses`` commands."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import structlog

from streamrec.__main__ import TOOLS, main
from streamrec.businesses import (
    Businesses,
    InvalidSetting,
    Profile,
    default_profile,
    render_listing,
)
from streamrec.devservers import free_port
from streamrec.settings import Settings
from tests.test_cli import listed_settings, setting_names
from tests.test_events import BAD_BUSINESS_IDS
from tests.test_reads import listed, recording

MODEL = "gpt-4o-mini-transcribe"
DEFAULTS = Profile(mode="transcribe", model=MODEL, language=None, channels="split", speakers=None)


@pytest.fixture
def table(db: Any) -> Businesses:
    """The business_settings table of this test's database, with DEFAULTS."""
    return Businesses(db, defaults=DEFAULTS)


def test_defaults_are_the_transcribe_settings() -> None:
    """A business with no settings of its own gets STREAMREC_TRANSCRIBE_MODE, _MODEL,
    _LANGUAGE and _CHANNELS, and speakers by Twilio's RecordingSource."""
    settings = Settings(
        transcribe_mode="download-only", transcribe_model="whisper-1",
        transcribe_language="he", transcribe_channels="mixed", _env_file=None,
    )  # fmt: skip
    expected = Profile("download-only", "whisper-1", "he", "mixed", None)
    assert Profile.defaults(settings) == default_profile(settings) == expected


async def test_a_business_without_settings_gets_the_defaults(table: Businesses) -> None:
    """profile() of a business with no row is the defaults, and nothing is written."""
    assert await table.profile("42") == DEFAULTS
    entry = await table.entry("42")
    assert (entry.own, entry.updated_at) == (frozenset(), None)
    assert await table.listing() == []


async def test_set_changes_only_the_fields_given(table: Businesses) -> None:
    """Each set changes its own fields; the others keep their value or stay the default."""
    await table.set("42", language="he")
    entry = await table.set("42", mode="download-only", speakers=["לקוח", "נציג"])
    assert entry.profile == Profile("download-only", MODEL, "he", "split", ("לקוח", "נציג"))
    assert entry.own == {"mode", "language", "speakers"}
    assert await table.profile("42") == entry.profile
    assert await table.profile("43") == DEFAULTS


async def test_unset_and_delete_go_back_to_the_defaults(table: Businesses) -> None:
    """unset puts the fields named back to the defaults; delete all of them; both say
    whether the business had settings of its own."""
    await table.set("42", mode="download-only", language="he", model="whisper-1")
    entry = await table.unset("42", ["language", "model"])
    assert entry is not None
    assert entry.profile == Profile("download-only", MODEL, None, "split", None)
    assert entry.own == {"mode"}
    assert await table.delete("42") is True
    assert await table.profile("42") == DEFAULTS
    assert await table.delete("42") is False
    assert await table.unset("42", ["mode"]) is None
    assert await table.listing() == []


async def test_a_change_reaches_another_replica_at_once(
    database_url: str, table: Businesses
) -> None:
    """A change made through one pool is what another replica's next profile() reads."""
    other_pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        other = Businesses(other_pool, defaults=DEFAULTS)
        assert (await other.profile("42")).mode == "transcribe"
        await table.set("42", mode="download-only")
        assert (await other.profile("42")).mode == "download-only"
        await table.set("42", mode="transcribe", language="fr")
        assert await other.profile("42") == Profile("transcribe", MODEL, "fr", "split", None)
        await table.delete("42")
        assert await other.profile("42") == DEFAULTS
    finally:
        await other_pool.close()


async def test_a_changed_default_reaches_businesses_that_did_not_set_it(db: Any) -> None:
    """A business follows a new default for every field it did not set itself."""
    await Businesses(db, defaults=DEFAULTS).set("42", language="he")
    later = Profile("transcribe", "whisper-1", "en", "mixed", None)
    assert await Businesses(db, defaults=later).profile("42") == Profile(
        "transcribe", "whisper-1", "he", "mixed", None
    )


async def test_a_business_can_ask_for_detection_over_a_default_language(db: Any) -> None:
    """language auto: the model detects it for this business though the default names one."""
    english = Profile("transcribe", "whisper-1", "en", "split", None)
    table = Businesses(db, defaults=english)
    await table.set("42", language="auto")
    assert (await table.profile("42")).language is None
    assert (await table.profile("43")).language == "en"
    assert "auto" not in render_listing(english, await table.listing())


async def test_the_longest_values_allowed_are_stored(table: Businesses) -> None:
    """A 64-character model, a 3-letter language and 32-character labels pass the table's
    own checks as they pass ours."""
    model, speakers = "m" * 63 + ":", ("c" * 32, "a" * 32)
    await table.set("x" * 64, model=model, language="fil", speakers=speakers)
    assert await table.profile("x" * 64) == Profile("transcribe", model, "fil", "split", speakers)


BAD_SETTINGS: list[dict[str, Any]] = [
    {"mode": "full"},
    {"mode": "Transcribe"},
    {"channels": "stereo"},
    {"language": "HE"},
    {"language": "english"},
    {"language": "e"},
    {"model": "gpt 4o"},
    {"model": "m" * 65},
    {"model": ""},
    {"speakers": ["agent"]},
    {"speakers": ["a", "b", "c"]},
    {"speakers": ["agent", "agent"]},
    {"speakers": ["", "agent"]},
    {"speakers": ["c" * 33, "agent"]},
    {"speakers": ["cust\nomer", "agent"]},
    {"language": "he", "channels": "both"},
    {},
]


@pytest.mark.parametrize("changes", BAD_SETTINGS)
async def test_a_bad_setting_is_refused_before_any_sql(
    database_url: str, db: Any, changes: dict[str, Any]
) -> None:
    """A bad value (or none at all) raises InvalidSetting naming the field, without a
    statement: a table whose pool is closed says the same; nothing is written."""
    closed = await asyncpg.create_pool(database_url, min_size=0)
    await closed.close()
    for pool in (db, closed):
        with pytest.raises(InvalidSetting) as refused:
            await Businesses(pool, defaults=DEFAULTS).set("42", **changes)
        named = [field.rstrip("s") for field in changes] or ["nothing to set"]
        assert any(name in str(refused.value) for name in named), refused.value
    assert await db.fetchval("SELECT count(*) FROM business_settings") == 0


@pytest.mark.parametrize("business_id", BAD_BUSINESS_IDS)
async def test_a_bad_business_id_is_refused(table: Businesses, business_id: str) -> None:
    """Every method refuses a business id the webhook refuses, saying the rule."""
    for call in (
        table.profile(business_id),
        table.set(business_id, mode="transcribe"),
        table.unset(business_id, ["mode"]),
        table.delete(business_id),
    ):
        with pytest.raises(InvalidSetting, match="is not a business id"):
            await call


async def test_unset_refuses_an_unknown_field(table: Businesses) -> None:
    """unset of no field, or of one that is not a setting, raises InvalidSetting."""
    await table.set("42", mode="download-only")
    for fields in ([], ["mode", "speed"]):
        with pytest.raises(InvalidSetting, match="not some of"):
            await table.unset("42", fields)
    assert (await table.profile("42")).mode == "download-only"


# The command line, run in this process as ``python -m streamrec`` runs it.


@pytest.fixture
def cli(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    database_url: str,
    capsys: pytest.CaptureFixture[str],
) -> Iterator[pytest.CaptureFixture[str]]:
    """capsys, in the environment of a command against this test's database with
    STREAMREC_TRANSCRIBE_* defaults of its own; logging as it was afterwards."""
    for name in setting_names():
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # no .env of the checkout's
    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setenv("STREAMREC_TRANSCRIBE_MODEL", MODEL)
    monkeypatch.setenv("STREAMREC_TRANSCRIBE_LANGUAGE", "en")
    monkeypatch.setenv("STREAMREC_LOG_FORMAT", "json")
    saved, root = structlog.get_config(), logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield capsys
    root.handlers, root.level = handlers, level
    structlog.configure(**saved)


async def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``streamrec businesses *args``: its exit code, stdout and stderr."""

    def exited() -> int:
        try:
            return main(["businesses", *args])
        except SystemExit as exc:  # argparse's usage errors
            return int(exc.code or 0)

    code = await asyncio.to_thread(exited)
    out, err = capsys.readouterr()
    return code, out, err


def cells(out: str) -> dict[str, list[str]]:
    """The rows of a printed table by business, split on runs of two spaces or more."""
    rows = [[c.strip() for c in line.split("  ") if c.strip()] for line in out.splitlines()]
    header = rows.index(["business", "mode", "model", "language", "channels", "speakers",
                         "updated"])  # fmt: skip
    return {row[0]: row[1:] for row in rows[header + 1 :]}


async def test_set_list_unset_delete_on_the_command_line(
    cli: pytest.CaptureFixture[str], db: Any
) -> None:
    """set prints the business's profile, defaults marked; list shows the defaults and each
    business; unset and delete put fields back; an unknown business exits 1."""
    code, out, _ = await run(cli, "set", "42", "--mode", "download-only", "--language", "he",
                             "--speakers", "customer, agent")  # fmt: skip
    assert code == 0
    assert cells(out)["42"][:5] == [
        "download-only", f"{MODEL} (default)", "he", "split (default)", "customer,agent"
    ]  # fmt: skip
    await run(cli, "set", "7", "--channels", "mixed", "--model", "whisper-1")
    code, out, _ = await run(cli, "list")
    assert code == 0
    assert out.splitlines()[0] == (
        f"defaults: mode transcribe, model {MODEL}, language en, channels split, speakers by source"
    )
    assert list(cells(out)) == ["42", "7"]
    assert cells(out)["7"][:5] == [
        "transcribe (default)", "whisper-1", "en (default)", "mixed", "by source (default)"
    ]  # fmt: skip
    code, out, _ = await run(cli, "unset", "42", "--language", "--speakers")
    assert (code, cells(out)["42"][2:5]) == (0, ["en (default)", "split (default)",
                                                 "by source (default)"])  # fmt: skip
    code, out, _ = await run(cli, "delete", "7")
    assert code == 0
    assert all(cell.endswith(" (default)") for cell in cells(out)["7"][:5])
    assert cells(out)["7"][5] == "-"
    code, _, err = await run(cli, "delete", "7")
    assert (code, err.strip()) == (1, "streamrec: 7 has no settings of its own")
    code, out, _ = await run(cli, "show", "99")
    assert (code, cells(out)["99"][0]) == (0, "transcribe (default)")
    assert await db.fetchval("SELECT array_agg(business_id) FROM business_settings") == ["42"]


async def test_list_as_json(cli: pytest.CaptureFixture[str]) -> None:
    """``list --json`` gives the defaults and, per business, its effective values and
    which of them are defaults."""
    await run(cli, "set", "42", "--speakers", "customer,agent")
    code, out, _ = await run(cli, "list", "--json")
    assert code == 0
    document = json.loads(out)
    assert document["defaults"] == {"mode": "transcribe", "model": MODEL, "language": "en",
                                    "channels": "split", "speakers": None}  # fmt: skip
    [business] = document["businesses"]
    assert business["business_id"] == "42"
    assert business["speakers"] == ["customer", "agent"]
    assert business["defaults"] == ["mode", "model", "language", "channels"]
    assert business["updated_at"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["set", "42", "--language", "Hebrew"], "language 'Hebrew' is not an ISO-639 code"),
        (["set", "42", "--mode", "full"], "mode 'full' is not transcribe or download-only"),
        (["set", "42", "--channels", "stereo"], "channels 'stereo' is not split or mixed"),
        (["set", "42", "--model", "gpt 4o"], "model 'gpt 4o' is not 1-64 of"),
        (["set", "42", "--speakers", "agent"], "are not two different labels"),
        (["set", "42", "--mode", "transcribe", "--speakers", "a,,"], "not two different"),
        (["set", "..", "--mode", "transcribe"], "'..' is not a business id"),
        (["set", "42"], "nothing to set"),
        (["unset", "42"], "say which to unset: --mode --model"),
        (["delete", "a b"], "'a b' is not a business id"),
    ],
)
async def test_the_command_line_refuses_bad_values(
    cli: pytest.CaptureFixture[str], db: Any, args: list[str], message: str
) -> None:
    """A bad value exits 2 with a message saying the rule; nothing is written."""
    await db.execute(
        "INSERT INTO business_settings (business_id, mode) VALUES ('42', 'transcribe')"
    )
    code, out, err = await run(cli, *args)
    assert (code, out) == (2, "")
    assert message in err, err
    assert "Traceback" not in err
    row = await db.fetchrow("SELECT * FROM business_settings")
    assert (row["mode"], row["language"], row["speakers"]) == ("transcribe", None, None)


async def test_the_command_line_without_postgresql_fails_in_one_line(
    cli: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no PostgreSQL at DATABASE_URL, ``businesses list`` exits 1 saying where."""
    port = free_port()
    monkeypatch.setenv("DATABASE_URL", f"postgresql://rec:pw@127.0.0.1:{port}/rec")
    code, _, err = await run(cli, "list")
    assert code == 1
    [line] = err.strip().splitlines()
    assert line.startswith("streamrec: businesses failed: ") and f"127.0.0.1:{port}" in line
    assert "pw" not in line


def test_help_lists_the_transcribe_settings(capsys: pytest.CaptureFixture[str]) -> None:
    """``businesses --help`` names the settings the defaults come from, and each action
    describes itself."""
    with pytest.raises(SystemExit):
        main(["businesses", "--help"])
    listed = listed_settings(capsys.readouterr().out)
    transcribe = {
        f"STREAMREC_TRANSCRIBE_{name}" for name in ("MODE", "MODEL", "LANGUAGE", "CHANNELS")
    }
    assert {"DATABASE_URL", *transcribe} <= set(listed)
    assert "REDIS_URL" not in listed
    for action in ("set", "unset", "delete", "show", "list"):
        with pytest.raises(SystemExit):
            main(["businesses", action, "--help"])
        assert "usage: streamrec businesses " + action in capsys.readouterr().out


async def test_list_reads_what_its_help_lists(
    database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``businesses list`` reads the database and the STREAMREC_TRANSCRIBE_* defaults,
    and nothing its help does not list."""
    settings, read = recording(Settings(database_url=database_url, _env_file=None))
    args = argparse.Namespace(action="list", json=True)
    assert await TOOLS["businesses"](args, settings) == 0
    assert {"DATABASE_URL", "STREAMREC_TRANSCRIBE_MODE"} <= read
    assert read <= set(listed("businesses", capsys))
