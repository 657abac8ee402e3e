"""Throwaway local Redis and PostgreSQL servers, for ``streamrec dev`` and the tests.

Each server is a child process on a port of our choosing with its data in a
directory of ours, so it can be stopped, killed and restarted at will without
touching any server the machine already runs. PostgreSQL refuses to run as
root, so as root its processes run as the ``postgres`` system user.
"""

from __future__ import annotations

import contextlib
import getpass
import glob
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any


class ServerError(RuntimeError):
    """A local server could not be found, started or reached."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def answers(host: str, port: int, timeout: float = 0.5) -> bool:
    """True if something accepts TCP connections at host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def find_binary(name: str) -> str:
    """The path of a server binary: on PATH, or in Debian's PostgreSQL directories."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=_version_key)
    if candidates:
        return candidates[-1]
    raise ServerError(f"{name} is not installed (Debian: apt-get install redis-server postgresql)")


def _version_key(path: str) -> int:
    part = path.split("/")[4]
    return int(part) if part.isdigit() else 0


def _wait_until(check: Any, what: str, timeout: float, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if process.poll() is not None:
            raise ServerError(f"{what} exited with {process.returncode} while starting")
        time.sleep(0.02)
    raise ServerError(f"{what} did not become ready within {timeout}s")


class LocalRedis:
    """A redis-server child process; ``appendonly`` turns AOF on, fsynced per ``appendfsync``.

    ``replica_of`` starts it as a replica of that server. ``binary`` is the
    redis-server to run (default: the one on PATH).
    """

    def __init__(
        self,
        directory: Path,
        port: int | None = None,
        *,
        appendonly: bool = False,
        appendfsync: str = "everysec",
        replica_of: LocalRedis | None = None,
        binary: str | None = None,
    ):
        self.directory = directory
        self.port = port or free_port()
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.replica_of = replica_of
        self.binary = binary
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """redis:// URL of this server."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> LocalRedis:
        """Start the server (again, after stop or kill) and wait until it answers PING."""
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [
            self.binary or find_binary("redis-server"),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", self.appendfsync,
            "--logfile", str(self.directory / "redis.log"),
            # A replica's first sync starts at once, not after the default 5 s.
            "--repl-diskless-sync-delay", "0",
        ]  # fmt: skip
        if self.replica_of is not None:
            args += ["--replicaof", "127.0.0.1", str(self.replica_of.port)]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_until(self._pong, f"redis-server on port {self.port}", 15, self.process)
        return self

    def _pong(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        """Shut the server down cleanly (SIGTERM) and wait for it."""
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL the server, as a crash would."""
        self._signal(signal.SIGKILL)

    def pause(self) -> None:
        """SIGSTOP the server: it keeps its connections but answers nothing until resumed."""
        if self.process is not None:
            self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT a paused server."""
        if self.process is not None:
            self.process.send_signal(signal.SIGCONT)

    def _signal(self, sig: signal.Signals) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.send_signal(signal.SIGCONT)  # a paused server acts on it only then
            self.process.wait(timeout=30)
        self.process = None


class LocalPostgres:
    """A PostgreSQL cluster in ``directory``, served by a child process on ``port``.

    ``durable=False`` turns fsync off: for tests, where speed matters and a
    machine crash does not.
    """

    def __init__(
        self,
        directory: Path,
        port: int | None = None,
        *,
        superuser: str | None = None,
        durable: bool = True,
    ):
        self.directory = directory
        self.port = port or free_port()
        self.superuser = superuser or getpass.getuser()
        self.durable = durable
        self.process: subprocess.Popen[bytes] | None = None
        self._run_as = "postgres" if os.geteuid() == 0 else None

    @property
    def data(self) -> Path:
        """The cluster's data directory."""
        return self.directory / "data"

    def url(self, database: str = "postgres") -> str:
        """postgresql:// DSN of a database on this server."""
        return f"postgresql://{self.superuser}@127.0.0.1:{self.port}/{database}"

    def start(self) -> LocalPostgres:
        """Create the cluster if missing, start the server and wait until it accepts work."""
        self.directory.mkdir(parents=True, exist_ok=True)
        if self._run_as:
            shutil.chown(self.directory, self._run_as)
        if not (self.data / "PG_VERSION").exists():
            subprocess.run(
                [find_binary("initdb"), "-D", str(self.data), "-U", self.superuser,
                 "-A", "trust", "-E", "UTF8", "--no-sync", "--no-instructions"],
                check=True, user=self._run_as, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            )  # fmt: skip
        log = self.directory / "postgres.log"
        settings = [
            "-c", "listen_addresses=127.0.0.1",
            "-c", f"unix_socket_directories={self.directory}",
            "-c", "max_connections=200",
        ]  # fmt: skip
        if not self.durable:
            settings += ["-c", "fsync=off", "-c", "synchronous_commit=off",
                         "-c", "full_page_writes=off"]  # fmt: skip
        with log.open("ab") as out:
            if self._run_as:
                shutil.chown(log, self._run_as)
            self.process = subprocess.Popen(
                [find_binary("postgres"), "-D", str(self.data), "-p", str(self.port), *settings],
                stdout=out, stderr=subprocess.STDOUT, user=self._run_as,
            )  # fmt: skip
        _wait_until(self._ready, f"postgres on port {self.port}", 60, self.process)
        return self

    def _ready(self) -> bool:
        ready = [find_binary("pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port)]
        return subprocess.run(ready, check=False).returncode == 0

    def stop(self) -> None:
        """Fast shutdown (SIGINT: abort sessions, checkpoint) and wait for it."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=30)
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
        self.process = None
