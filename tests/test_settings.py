"""Settings: defaults, variable names, files, errors and secrets."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from streamrec.settings import ConfigError, Settings, address, load_settings
from tests.standins import ACCOUNT_SID, AUTH_TOKEN
from tests.test_events import BAD_BUSINESS_IDS

# The README's configuration table: variable -> (field, default).
DEFAULTS: dict[str, tuple[str, Any]] = {
    "REDIS_URL": ("redis_url", "redis://localhost:6379/0"),
    "DATABASE_URL": ("database_url", "postgresql://localhost/streamrec"),
    "STREAMREC_PUBLIC_URL": ("public_url", "http://localhost:8080"),
    "STREAMREC_HTTP_HOST": ("http_host", "0.0.0.0"),
    "STREAMREC_HTTP_PORT": ("http_port", 8080),
    "STREAMREC_TWILIO_API_BASE": ("twilio_api_base", "https://api.twilio.com"),
    "STREAMREC_MEDIA_DIR": ("media_dir", Path("./media")),
    "STREAMREC_TRANSCRIBE_MODEL": ("transcribe_model", "gpt-4o-mini-transcribe"),
    "STREAMREC_CONCURRENCY": ("concurrency", 16),
    "STREAMREC_CLAIM_IDLE_MS": ("claim_idle_ms", 60_000),
    "STREAMREC_MAX_DELIVERIES": ("max_deliveries", 5),
    "STREAMREC_DELETE_FROM_TWILIO": ("delete_from_twilio", False),
    "STREAMREC_WEBHOOK_DEADLINE_MS": ("webhook_deadline_ms", 5000),
    "STREAMREC_MIN_REPLICA_ACKS": ("min_replica_acks", 0),
    "STREAMREC_WAIT_AOF": ("wait_aof", False),
    "STREAMREC_RECONCILE_INTERVAL_S": ("reconcile_interval_s", 300),
    "STREAMREC_RECONCILE_LOOKBACK_H": ("reconcile_lookback_h", 48),
    "STREAMREC_RECONCILE_DEFAULT_BUSINESS": ("reconcile_default_business", None),
}

# A non-default value of each variable: variable -> (raw value, field, parsed value).
OVERRIDES: dict[str, tuple[str, str, Any]] = {
    "REDIS_URL": ("redis://cache:6380/2", "redis_url", "redis://cache:6380/2"),
    "DATABASE_URL": ("postgresql://db/rec", "database_url", "postgresql://db/rec"),
    "TWILIO_ACCOUNT_SID": (ACCOUNT_SID, "twilio_account_sid", ACCOUNT_SID),
    "STREAMREC_PUBLIC_URL": (
        "https://hooks.example.com/",
        "public_url",
        "https://hooks.example.com",
    ),
    "STREAMREC_HTTP_HOST": ("127.0.0.1", "http_host", "127.0.0.1"),
    "STREAMREC_HTTP_PORT": ("9090", "http_port", 9090),
    "STREAMREC_TWILIO_API_BASE": ("http://127.0.0.1:1", "twilio_api_base", "http://127.0.0.1:1"),
    "STREAMREC_MEDIA_DIR": ("/srv/media", "media_dir", Path("/srv/media")),
    "STREAMREC_TRANSCRIBE_MODEL": ("whisper-1", "transcribe_model", "whisper-1"),
    "STREAMREC_CONCURRENCY": ("3", "concurrency", 3),
    "STREAMREC_CLAIM_IDLE_MS": ("5000", "claim_idle_ms", 5000),
    "STREAMREC_MAX_DELIVERIES": ("9", "max_deliveries", 9),
    "STREAMREC_NAMESPACE": ("tenant-1", "namespace", "tenant-1"),
    "STREAMREC_LOG_LEVEL": ("DEBUG", "log_level", "debug"),
}


def variable_names() -> set[str]:
    """Every variable (and field name) Settings could conceivably read, upper-cased."""
    names = {field.upper() for field in Settings.model_fields}
    for field in Settings.model_fields.values():
        if isinstance(field.validation_alias, str):
            names.add(field.validation_alias.upper())
    return names


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """An environment without any streamrec variable, in a directory without .env files."""
    monkeypatch.chdir(tmp_path)
    names = variable_names()
    for name in list(os.environ):
        if name.upper() in names:
            monkeypatch.delenv(name)
    return monkeypatch


def test_defaults_match_the_table(env: pytest.MonkeyPatch) -> None:
    """With nothing configured, every setting has the default the README's table gives."""
    settings = load_settings()
    for variable, (field, default) in DEFAULTS.items():
        assert getattr(settings, field) == default, variable
    assert settings.twilio_account_sid is None
    assert settings.twilio_auth_token is None
    assert not settings.transcription_enabled


@pytest.mark.parametrize("variable", list(OVERRIDES))
def test_variable_is_read_by_its_name(env: pytest.MonkeyPatch, variable: str) -> None:
    """Each variable of the table sets its setting."""
    raw, field, parsed = OVERRIDES[variable]
    env.setenv(variable, raw)
    assert getattr(load_settings(), field) == parsed


@pytest.mark.parametrize(
    ("variable", "raw"),
    [
        ("HTTP_PORT", "tcp://10.0.0.7:80"),  # what Kubernetes injects for a Service named http
        ("CONCURRENCY", "3"),
        ("NAMESPACE", "someone-else"),
        ("LOG_LEVEL", "debug"),
        ("PUBLIC_URL", "https://elsewhere.example.com"),
        ("MEDIA_DIR", "/srv/elsewhere"),
    ],
)
def test_field_names_are_not_variables(env: pytest.MonkeyPatch, variable: str, raw: str) -> None:
    """Generic variables named like a field (HTTP_PORT, LOG_LEVEL...) are not read."""
    unset = load_settings()
    env.setenv(variable, raw)
    assert load_settings() == unset


@pytest.mark.parametrize(
    ("variable", "raw"),
    [
        ("STREAMREC_CONCURRENCY", "abc"),
        ("STREAMREC_CONCURRENCY", "0"),
        ("STREAMREC_HTTP_PORT", "70000"),
        ("STREAMREC_CLAIM_IDLE_MS", "-5"),
        ("STREAMREC_MAX_DELIVERIES", "many"),
        ("STREAMREC_PUBLIC_URL", "hooks.example.com"),
        ("TWILIO_ACCOUNT_SID", "AC123"),
        ("STREAMREC_NAMESPACE", "has space"),
        ("STREAMREC_LOG_FORMAT", "xml"),
        ("REDIS_URL", "notaurl"),
        ("REDIS_URL", "http://cache:6379/0"),
        ("REDIS_URL", "redis:cache"),
        ("REDIS_URL", "redis://cache:port/0"),
        ("DATABASE_URL", "mysql://rec@db/rec"),
        ("DATABASE_URL", "db.example.com/rec"),
        *(("STREAMREC_RECONCILE_DEFAULT_BUSINESS", b) for b in BAD_BUSINESS_IDS if b),
    ],
)
def test_bad_value_is_a_config_error_naming_the_variable(
    env: pytest.MonkeyPatch, variable: str, raw: str
) -> None:
    """load_settings raises ConfigError whose message names the offending variable."""
    env.setenv(variable, raw)
    with pytest.raises(ConfigError, match=variable):
        load_settings()


@pytest.mark.parametrize(
    ("variable", "raw"),
    [
        ("REDIS_URL", "notaurl:hunter2"),
        ("REDIS_URL", "http://:hunter2@cache:6379/0"),
        ("DATABASE_URL", "mysql://rec:hunter2@db/rec"),
    ],
)
def test_a_bad_url_is_named_and_not_echoed(
    env: pytest.MonkeyPatch, variable: str, raw: str
) -> None:
    """A URL with the wrong scheme: the error says the schemes allowed, never the URL itself."""
    env.setenv(variable, raw)
    with pytest.raises(ConfigError, match=f"{variable}: .*must start with") as caught:
        load_settings()
    assert "hunter2" not in str(caught.value)


@pytest.mark.parametrize(
    ("variable", "raw"),
    [
        ("REDIS_URL", "rediss://:pw@cache.example.com:6380/1"),
        ("REDIS_URL", "unix:///run/redis/redis.sock?db=2"),
        ("REDIS_URL", "redis://"),
        ("DATABASE_URL", "postgres://rec:pw@db:5433/rec"),
        ("DATABASE_URL", "postgresql:///rec?host=/run/postgresql"),
        ("DATABASE_URL", "postgresql://db1:5432,db2:5432/rec"),
    ],
)
def test_urls_of_every_supported_scheme_are_taken(
    env: pytest.MonkeyPatch, variable: str, raw: str
) -> None:
    """Each scheme the Redis and PostgreSQL clients understand passes as written."""
    env.setenv(variable, raw)
    settings = load_settings()
    assert raw in (settings.redis_url, settings.database_url)


@pytest.mark.parametrize(
    ("url", "where"),
    [
        ("redis://:secret@cache:6380/0", "cache:6380"),
        ("rediss://cache", "cache:6379"),
        ("unix:///run/redis.sock", "/run/redis.sock"),
        ("postgresql://rec:secret@db/rec", "db:5432"),
        ("postgresql:///rec", "localhost:5432"),
        ("postgresql://rec:secret@db1:5432,db2:5433/rec", "db1:5432,db2:5433"),
    ],
)
def test_address_names_the_server_without_credentials(url: str, where: str) -> None:
    """address() gives host:port (or the socket path) a message can name, never the password."""
    assert address(url) == where


def test_each_bad_variable_is_named(env: pytest.MonkeyPatch) -> None:
    """With several bad values, the ConfigError names every one of them."""
    env.setenv("STREAMREC_CONCURRENCY", "abc")
    env.setenv("STREAMREC_HTTP_PORT", "port")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert "STREAMREC_CONCURRENCY" in str(caught.value)
    assert "STREAMREC_HTTP_PORT" in str(caught.value)


@pytest.mark.parametrize(
    ("present", "missing"),
    [
        ({}, ["TWILIO_ACCOUNT_SID", "TWILIO_AUTH_TOKEN"]),
        ({"TWILIO_AUTH_TOKEN": AUTH_TOKEN}, ["TWILIO_ACCOUNT_SID"]),
        ({"TWILIO_ACCOUNT_SID": ACCOUNT_SID}, ["TWILIO_AUTH_TOKEN"]),
        ({"TWILIO_ACCOUNT_SID": ACCOUNT_SID, "TWILIO_AUTH_TOKEN": ""}, ["TWILIO_AUTH_TOKEN"]),
    ],
)
def test_twilio_credentials_name_what_is_missing(
    env: pytest.MonkeyPatch, present: dict[str, str], missing: list[str]
) -> None:
    """twilio_credentials raises ConfigError naming exactly the missing variables."""
    for name, value in present.items():
        env.setenv(name, value)
    with pytest.raises(ConfigError) as caught:
        load_settings().twilio_credentials()
    for name in ("TWILIO_ACCOUNT_SID", "TWILIO_AUTH_TOKEN"):
        assert (name in str(caught.value)) == (name in missing), name


def test_twilio_credentials_when_set(env: pytest.MonkeyPatch) -> None:
    """twilio_credentials returns the account SID and the token in the clear."""
    env.setenv("TWILIO_ACCOUNT_SID", ACCOUNT_SID)
    env.setenv("TWILIO_AUTH_TOKEN", AUTH_TOKEN)
    assert load_settings().twilio_credentials() == (ACCOUNT_SID, AUTH_TOKEN)


def test_config_file_in_working_directory_is_read(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """config/streamrec.env in the working directory is read; the environment wins over it."""
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "streamrec.env").write_text(
        "STREAMREC_CONCURRENCY=7\nREDIS_URL=redis://from-file:6379/1\n"
        f"TWILIO_AUTH_TOKEN={AUTH_TOKEN}\n",
        encoding="utf-8",
    )
    settings = load_settings()
    assert settings.concurrency == 7
    assert settings.redis_url == "redis://from-file:6379/1"
    assert settings.twilio_auth_token is not None
    assert settings.twilio_auth_token.get_secret_value() == AUTH_TOKEN

    env.setenv("STREAMREC_CONCURRENCY", "9")
    assert load_settings().concurrency == 9


def test_bad_value_in_config_file_is_named(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A bad value in config/streamrec.env is a ConfigError naming its variable."""
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "streamrec.env").write_text(
        "STREAMREC_CLAIM_IDLE_MS=soon\n", encoding="utf-8"
    )
    with pytest.raises(ConfigError, match="STREAMREC_CLAIM_IDLE_MS"):
        load_settings()


def test_secrets_never_appear_in_repr(env: pytest.MonkeyPatch) -> None:
    """Neither the auth token nor the OpenAI key appears in repr() or str() of the settings."""
    env.setenv("TWILIO_ACCOUNT_SID", ACCOUNT_SID)
    env.setenv("TWILIO_AUTH_TOKEN", AUTH_TOKEN)
    env.setenv("OPENAI_API_KEY", "sk-very-secret-key")
    settings = load_settings()
    for text in (repr(settings), str(settings)):
        assert AUTH_TOKEN not in text
        assert "sk-very-secret-key" not in text
    assert settings.transcription_enabled


def test_secrets_are_the_token_and_key_that_are_set(env: pytest.MonkeyPatch) -> None:
    """secrets() lists the auth token and OpenAI key that are set, for the logs to mask."""
    assert load_settings().secrets() == []
    env.setenv("TWILIO_AUTH_TOKEN", AUTH_TOKEN)
    env.setenv("OPENAI_API_KEY", "")
    assert load_settings().secrets() == [AUTH_TOKEN]
    env.setenv("OPENAI_API_KEY", "sk-very-secret-key")
    assert load_settings().secrets() == [AUTH_TOKEN, "sk-very-secret-key"]


def test_a_slot_lease_longer_than_the_claim_time_is_refused(env: pytest.MonkeyPatch) -> None:
    """The slot lease may not exceed the claim time; unset, it is half of it."""
    env.setenv("STREAMREC_CLAIM_IDLE_MS", "5000")
    assert load_settings().lease_ms == 2500
    env.setenv("STREAMREC_SLOT_LEASE_MS", "6000")
    with pytest.raises(ConfigError, match=r"STREAMREC_SLOT_LEASE_MS \(6000\).*STREAMREC_CLAIM"):
        load_settings()
    env.setenv("STREAMREC_SLOT_LEASE_MS", "5000")
    assert load_settings().lease_ms == 5000
