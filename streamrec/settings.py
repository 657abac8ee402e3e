"""The one configuration object. Only this module reads the environment.

Values come from environment variables, then from `.env` and `config/streamrec.env`
in the working directory (the environment wins). Every name is listed in the
README's configuration table.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Literal
from urllib.parse import SplitResult, urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from streamrec.events import BUSINESS_ID_RULE, is_business_id
from streamrec.partitions import Layout

ENV_FILES = (".env", "config/streamrec.env")


class ConfigError(Exception):
    """A setting is missing or invalid; the message names the variable."""


class _VariablesOnly(PydanticBaseSettingsSource):
    """What ``source`` found under each setting's variable name, and nothing else.

    ``populate_by_name`` lets code build ``Settings(redis_url=...)``, but it also makes
    pydantic-settings read a variable spelled like the field (HTTP_PORT, LOG_LEVEL,
    NAMESPACE), names that other software sets for its own reasons.
    """

    def __init__(self, source: PydanticBaseSettingsSource) -> None:
        super().__init__(source.settings_cls)
        self._source = source

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self._source.get_field_value(field, field_name)

    def __call__(self) -> dict[str, Any]:
        fields = self.settings_cls.model_fields
        return {
            key: value
            for key, value in self._source().items()
            if key not in fields or fields[key].validation_alias in (None, key)
        }


class Settings(BaseSettings):
    """Configuration of every streamrec process, validated once at start."""

    model_config = SettingsConfigDict(
        env_file=ENV_FILES,
        env_file_encoding="utf-8",
        extra="ignore",
        populate_by_name=True,
        frozen=True,
    )

    redis_url: str = Field("redis://localhost:6379/0", validation_alias="REDIS_URL")
    database_url: str = Field("postgresql://localhost/streamrec", validation_alias="DATABASE_URL")
    twilio_account_sid: str | None = Field(None, validation_alias="TWILIO_ACCOUNT_SID")
    twilio_auth_token: SecretStr | None = Field(None, validation_alias="TWILIO_AUTH_TOKEN")
    public_url: str = Field("http://localhost:8080", validation_alias="STREAMREC_PUBLIC_URL")
    http_host: str = Field("0.0.0.0", validation_alias="STREAMREC_HTTP_HOST")  # noqa: S104
    http_port: int = Field(8080, validation_alias="STREAMREC_HTTP_PORT", ge=0, le=65535)
    twilio_api_base: str = Field(
        "https://api.twilio.com", validation_alias="STREAMREC_TWILIO_API_BASE"
    )
    media_dir: Path = Field(Path("./media"), validation_alias="STREAMREC_MEDIA_DIR")
    media_max_bytes: int = Field(
        100 * 1024 * 1024, validation_alias="STREAMREC_MEDIA_MAX_BYTES", gt=0
    )
    openai_api_key: SecretStr | None = Field(None, validation_alias="OPENAI_API_KEY")
    openai_base_url: str | None = Field(None, validation_alias="OPENAI_BASE_URL")
    transcribe_model: str = Field(
        "gpt-4o-mini-transcribe", validation_alias="STREAMREC_TRANSCRIBE_MODEL"
    )
    transcribe_mode: Literal["transcribe", "download-only"] = Field(
        "transcribe", validation_alias="STREAMREC_TRANSCRIBE_MODE"
    )
    transcribe_language: str | None = Field(
        None, validation_alias="STREAMREC_TRANSCRIBE_LANGUAGE", pattern=r"^[a-z]{2,3}$"
    )
    transcribe_channels: Literal["split", "mixed"] = Field(
        "split", validation_alias="STREAMREC_TRANSCRIBE_CHANNELS"
    )
    transcribe_chunk_s: float = Field(
        1200.0, validation_alias="STREAMREC_TRANSCRIBE_CHUNK_S", ge=10, le=1360
    )
    transcribe_overlap_s: float = Field(
        1.0, validation_alias="STREAMREC_TRANSCRIBE_OVERLAP_S", ge=0, le=10
    )
    transcribe_chunk_concurrency: int = Field(
        4, validation_alias="STREAMREC_TRANSCRIBE_CHUNK_CONCURRENCY", ge=1, le=64
    )
    delete_from_twilio: bool = Field(False, validation_alias="STREAMREC_DELETE_FROM_TWILIO")
    concurrency: int = Field(16, validation_alias="STREAMREC_CONCURRENCY", ge=1, le=10_000)
    claim_idle_ms: int = Field(60_000, validation_alias="STREAMREC_CLAIM_IDLE_MS", ge=100)
    max_deliveries: int = Field(5, validation_alias="STREAMREC_MAX_DELIVERIES", ge=1)
    retry_base_ms: int = Field(1_000, validation_alias="STREAMREC_RETRY_BASE_MS", ge=0)
    retry_max_ms: int = Field(60_000, validation_alias="STREAMREC_RETRY_MAX_MS", ge=0)
    http_timeout_s: float = Field(60.0, validation_alias="STREAMREC_HTTP_TIMEOUT_S", gt=0)
    shutdown_grace_s: float = Field(30.0, validation_alias="STREAMREC_SHUTDOWN_GRACE_S", ge=0)
    block_ms: int = Field(2_000, validation_alias="STREAMREC_BLOCK_MS", ge=1)
    max_body_bytes: int = Field(64 * 1024, validation_alias="STREAMREC_MAX_BODY_BYTES", ge=1024)
    dedupe_ttl_s: int = Field(7 * 24 * 3600, validation_alias="STREAMREC_DEDUPE_TTL_S", ge=60)
    # Twilio waits 15 s in all for an answer, its retry included.
    webhook_deadline_ms: int = Field(
        5_000, validation_alias="STREAMREC_WEBHOOK_DEADLINE_MS", ge=100, le=15_000
    )
    min_replica_acks: int = Field(0, validation_alias="STREAMREC_MIN_REPLICA_ACKS", ge=0)
    wait_aof: bool = Field(False, validation_alias="STREAMREC_WAIT_AOF")
    business_slots: int = Field(3, validation_alias="STREAMREC_BUSINESS_SLOTS", ge=0)
    slot_lease_ms: int | None = Field(None, validation_alias="STREAMREC_SLOT_LEASE_MS", ge=100)
    ui_token: SecretStr | None = Field(None, validation_alias="STREAMREC_UI_TOKEN")
    metrics_port: int = Field(9100, validation_alias="STREAMREC_METRICS_PORT", ge=0, le=65535)
    heartbeat_s: float = Field(5.0, validation_alias="STREAMREC_HEARTBEAT_S", gt=0)
    progress_s: float = Field(30.0, validation_alias="STREAMREC_PROGRESS_S", ge=0)
    reconcile_interval_s: float = Field(
        300.0, validation_alias="STREAMREC_RECONCILE_INTERVAL_S", ge=0
    )
    reconcile_lookback_h: float = Field(
        48.0, validation_alias="STREAMREC_RECONCILE_LOOKBACK_H", gt=0
    )
    reconcile_default_business: str | None = Field(
        None, validation_alias="STREAMREC_RECONCILE_DEFAULT_BUSINESS"
    )
    namespace: str = Field(
        "streamrec", validation_alias="STREAMREC_NAMESPACE", pattern=r"^[A-Za-z0-9_.-]{1,64}$"
    )
    partitions: int = Field(1, validation_alias="STREAMREC_PARTITIONS", ge=1, le=1024)
    redis_cluster: bool = Field(False, validation_alias="STREAMREC_REDIS_CLUSTER")
    consumer_name: str = Field(
        "", validation_alias="STREAMREC_CONSUMER_NAME", pattern=r"^[A-Za-z0-9_.:@-]{0,128}$"
    )
    event_loop: Literal["uvloop", "asyncio"] = Field(
        "uvloop", validation_alias="STREAMREC_EVENT_LOOP"
    )
    log_format: Literal["auto", "json", "console"] = Field(
        "auto", validation_alias="STREAMREC_LOG_FORMAT"
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", validation_alias="STREAMREC_LOG_LEVEL"
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Keyword arguments by field name; the environment and files by variable name only."""
        return (
            init_settings,
            _VariablesOnly(env_settings),
            _VariablesOnly(dotenv_settings),
            file_secret_settings,
        )

    @field_validator("public_url", "twilio_api_base")
    @classmethod
    def _strip_slash(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        parts = _scheme(value, REDIS_SCHEMES)
        try:
            parts.port  # noqa: B018 - parsing it is the check
        except ValueError:
            raise ValueError("the port is not a number") from None
        return value

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str) -> str:
        _scheme(value, DATABASE_SCHEMES)
        return value

    @field_validator("reconcile_default_business")
    @classmethod
    def _business_id(cls, value: str | None) -> str | None:
        if value is not None and not is_business_id(value):
            raise ValueError(f"must be {BUSINESS_ID_RULE}")
        return value

    @field_validator("log_format", "log_level", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("twilio_account_sid")
    @classmethod
    def _account_sid(cls, value: str | None) -> str | None:
        if value is not None and (len(value) != 34 or not value.startswith("AC")):
            raise ValueError("must be AC followed by 32 hex digits")
        return value

    @model_validator(mode="after")
    def _lease_within_claim(self) -> Settings:
        # A holder that stops renewing frees its slot within the lease; its entry can
        # be reclaimed only after the claim time. A lease longer than the claim time
        # would keep a business waiting on a dead holder for longer than needed.
        if self.slot_lease_ms is not None and self.slot_lease_ms > self.claim_idle_ms:
            raise ValueError(
                f"STREAMREC_SLOT_LEASE_MS ({self.slot_lease_ms}) must not exceed"
                f" STREAMREC_CLAIM_IDLE_MS ({self.claim_idle_ms})"
            )
        return self

    @property
    def layout(self) -> Layout:
        """The key layout: the namespace's partitions (``streamrec.partitions``)."""
        return Layout(self.namespace, self.partitions)

    @property
    def lease_ms(self) -> int:
        """The slot lease: the setting, or half the claim time."""
        return self.slot_lease_ms or max(self.claim_idle_ms // 2, 100)

    @property
    def transcription_enabled(self) -> bool:
        """True when an OpenAI key is configured; without one the pipeline is download-only."""
        return self.openai_api_key is not None and bool(self.openai_api_key.get_secret_value())

    @property
    def ui_enabled(self) -> bool:
        """True when STREAMREC_UI_TOKEN is set (not empty): the webhook serves the dashboard."""
        return self.ui_token is not None and bool(self.ui_token.get_secret_value())

    @property
    def resolved_consumer_name(self) -> str:
        """This process's consumer name in the group: the setting, or host-pid."""
        return self.consumer_name or f"{socket.gethostname()}-{os.getpid()}"

    def secrets(self) -> list[str]:
        """The secret values configured (Twilio auth token, OpenAI key, dashboard token),
        for logs to mask."""
        return [
            secret.get_secret_value()
            for secret in (self.twilio_auth_token, self.openai_api_key, self.ui_token)
            if secret is not None and secret.get_secret_value()
        ]

    def twilio_credentials(self) -> tuple[str, str]:
        """The account SID and auth token, or ConfigError naming what is missing."""
        missing = [
            name
            for name, value in (
                ("TWILIO_ACCOUNT_SID", self.twilio_account_sid),
                ("TWILIO_AUTH_TOKEN", self.twilio_auth_token),
            )
            if not value
        ]
        if missing:
            raise ConfigError(f"missing required setting: {', '.join(missing)}")
        assert self.twilio_account_sid is not None  # noqa: S101 - narrowed by the check above
        assert self.twilio_auth_token is not None  # noqa: S101
        return self.twilio_account_sid, self.twilio_auth_token.get_secret_value()


REDIS_SCHEMES = ("redis", "rediss", "unix")
DATABASE_SCHEMES = ("postgres", "postgresql")


def _scheme(url: str, schemes: tuple[str, ...]) -> SplitResult:
    """``url`` split, or ValueError naming the schemes allowed (never echoing the URL)."""
    parts = urlsplit(url)
    if parts.scheme not in schemes or url[len(parts.scheme) :][:3] != "://":
        raise ValueError("must start with " + ", ".join(f"{s}://" for s in schemes))
    return parts


def address(url: str) -> str:
    """Where a Redis or PostgreSQL URL points, host:port or socket path, without credentials."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return parts.path
    default = 6379 if parts.scheme.startswith("redis") else 5432
    try:
        port = parts.port or default
    except ValueError:  # several hosts (h1:5432,h2:5432): say them as written
        return parts.netloc.rpartition("@")[2]
    return f"{parts.hostname or 'localhost'}:{port}"


def _variable_name(field: str) -> str:
    alias = Settings.model_fields[field].validation_alias
    return alias if isinstance(alias, str) else field.upper()


def load_settings() -> Settings:
    """Build Settings from the environment, or raise ConfigError naming each bad variable."""
    try:
        return Settings()
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            message = str(error["msg"]).removeprefix("Value error, ")
            if not error["loc"]:  # a rule across settings: its message names them
                problems.append(message)
                continue
            field = str(error["loc"][0])
            name = _variable_name(field) if field in Settings.model_fields else field
            problems.append(f"{name}: {message}")
        raise ConfigError("invalid configuration: " + "; ".join(problems)) from None
