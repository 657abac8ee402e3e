"""compose.yaml, the Dockerfile and .dockerignore, read as files: no Docker engine runs here.

Each test holds one property that makes ``docker compose up`` start on the first
try; together they stand in for running it.
"""

from __future__ import annotations

import re
import shlex
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_TEXT = (ROOT / "compose.yaml").read_text(encoding="utf-8")
COMPOSE: dict[str, Any] = yaml.safe_load(COMPOSE_TEXT)
SERVICES: dict[str, Any] = COMPOSE["services"]
OURS = ("migrate", "serve", "consume")
"""The services that run streamrec's image."""
APP = ("serve", "consume")
REQUIRED = ("TWILIO_ACCOUNT_SID", "TWILIO_AUTH_TOKEN", "STREAMREC_PUBLIC_URL")


def check_command(service: str) -> str:
    """The health check of ``service`` as one shell line (without CMD / CMD-SHELL)."""
    test = SERVICES[service]["healthcheck"]["test"]
    assert test[0] in {"CMD", "CMD-SHELL"}, test
    return " ".join(test[1:]) if test[0] == "CMD-SHELL" else shlex.join(test[1:])


def test_postgres_health_check_goes_over_tcp() -> None:
    """PostgreSQL is healthy only once it accepts TCP on 127.0.0.1, not its Unix socket."""
    command = check_command("postgres")
    assert command.startswith("pg_isready ")
    assert "-h 127.0.0.1" in command


def test_redis_health_check_goes_over_tcp_and_wants_pong() -> None:
    """Redis is healthy once it answers PONG over TCP (an AOF still loading answers LOADING)."""
    command = check_command("redis")
    assert command.startswith("redis-cli -h 127.0.0.1 ")
    assert "grep -q PONG" in command


def test_migrate_waits_for_the_database_and_restarts_on_failure() -> None:
    """migrate starts on a healthy PostgreSQL, waits for it anyway, and is retried on exit 1."""
    migrate = SERVICES["migrate"]
    command = migrate["command"]
    assert command[0] == "migrate"
    assert float(command[command.index("--wait") + 1]) > 0
    assert re.fullmatch(r"on-failure(:\d+)?", migrate["restart"])
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"


@pytest.mark.parametrize("service", APP)
def test_app_waits_for_migrate_and_healthy_servers(service: str) -> None:
    """serve and consume start only after migrate succeeded and Redis/PostgreSQL are healthy."""
    assert SERVICES[service]["depends_on"] == {
        "redis": {"condition": "service_healthy"},
        "postgres": {"condition": "service_healthy"},
        "migrate": {"condition": "service_completed_successfully"},
    }


@pytest.mark.parametrize("service", APP)
@pytest.mark.parametrize("name", REQUIRED)
def test_required_variables_stop_compose_when_missing(service: str, name: str) -> None:
    """Each required variable is ``${NAME:?message}``: compose refuses to start without it."""
    value = SERVICES[service]["environment"][name]
    assert re.fullmatch(rf"\$\{{{name}:\?[^}}]+\}}", value), value


def test_no_variable_is_silently_empty() -> None:
    """Every ``${...}`` in the file is required (``:?``) or has a default (``:-``)."""
    for reference in re.findall(r"\$\{([^}]*)\}", COMPOSE_TEXT):
        assert re.fullmatch(r"\w+(:\?.+|:-.*)", reference), reference


def test_no_unused_anchor() -> None:
    """Every YAML anchor is used by an alias, and every alias has its anchor."""
    defined, used = set(), set()
    for event in yaml.parse(COMPOSE_TEXT):
        if isinstance(event, yaml.AliasEvent):
            used.add(event.anchor)
        elif isinstance(event, yaml.NodeEvent) and event.anchor is not None:
            defined.add(event.anchor)
    assert defined == used


def test_the_image_is_built_once_and_reused() -> None:
    """One service builds the image under a name; every other one of ours runs that name."""
    builders = [name for name, service in SERVICES.items() if "build" in service]
    assert len(builders) == 1, builders
    builder = SERVICES[builders[0]]
    assert builder["image"] and builder["pull_policy"] == "build"
    for name in OURS:
        assert SERVICES[name]["image"] == builder["image"], name
        if name != builders[0]:
            assert SERVICES[name]["pull_policy"] == "never", name


def test_the_compose_version_needed_is_noted_and_matches_the_readme() -> None:
    """The file's comments name the Compose version it needs, and the README names the same."""
    comments = " ".join(
        line.lstrip("# ") for line in COMPOSE_TEXT.splitlines() if line.startswith("#")
    )
    found = re.search(r"Docker Compose v(\d+\.\d+\.\d+) or later", comments)
    assert found, comments
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert f"Docker Compose v{found[1]} or later" in readme


def test_keeps_durability_replicas_health_and_a_non_root_image() -> None:
    """Redis keeps AOF on, three consumers run with health checks, the image is not root."""
    assert shlex.join(SERVICES["redis"]["command"]).endswith(
        "--appendonly yes --appendfsync everysec"
    )
    assert SERVICES["consume"]["deploy"]["replicas"] == 3
    assert all("healthcheck" in SERVICES[name] for name in ("redis", "postgres", *APP))
    users = re.findall(r"^USER\s+(\S+)", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert users and users[-1] not in {"root", "0"}


def dockerignore() -> list[str]:
    """The .dockerignore patterns, without comments, blank lines or a leading/trailing slash."""
    lines = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    return [line.strip().strip("/") for line in lines if line.strip() and line[0] != "#"]


def test_dockerignore_keeps_out_the_venv_media_git_secrets_and_caches() -> None:
    """The build context carries no .venv, media, .git, .env, config/streamrec.env or caches."""
    patterns = set(dockerignore())
    wanted = {".venv", "media", ".git", ".env", "config/streamrec.env", ".dev"}
    caches = {"**/__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache"}
    assert wanted | caches <= patterns


def test_dockerignore_keeps_what_the_image_is_built_from() -> None:
    """No pattern drops a file the Dockerfile copies (pyproject, README, the package)."""
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    sources = [
        source
        for line in re.findall(r"^COPY\s+(?!--from)(.+)$", dockerfile, re.MULTILINE)
        for source in line.split()[:-1]
    ]
    assert sources
    files = []
    for source in sources:
        path = ROOT / source
        found = [path] if path.is_file() else sorted(path.rglob("*"))
        files += [p for p in found if p.is_file() and "__pycache__" not in p.parts]
    patterns = dockerignore()
    for file in files:
        parts = file.relative_to(ROOT).parts
        # Docker drops a path when a pattern matches it or any directory above it.
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        hit = [p for p in patterns for prefix in prefixes if fnmatch(prefix, p)]
        assert not hit, (file, hit)
