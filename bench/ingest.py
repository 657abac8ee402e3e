"""streamrec ingest benchmark: signed RecordingStatusCallbacks/s the webhook accepts.

    .venv/bin/python bench/ingest.py [--duration 10] [--connections 32] [--threads 1]
                                     [--bodies 150000] [--rounds 1] [--warmup 2]
                                     [--wait-replicas 1] [--appendfsync off]

Measures, in one run, the real webhook app (``create_app``: form parsing,
Twilio signature check, event validation, the Lua dedupe script's XADD into a
Redis Stream) against a bare aiohttp handler at the same path that only reads
the form and answers a small JSON 200. Load comes from ``wrk`` (a separate
process, loopback only) sending the same correctly signed callbacks to both;
each server runs in a process of its own (bench/ingest_server.py), next to a
Redis of our own in a temporary directory. Everything started is stopped and
every temporary file removed on exit, Ctrl-C included.

With ``--wait-replicas N`` (default 1; 0: skip it) the same Redis gets N
replicas of our own and a third server, the webhook with
STREAMREC_MIN_REPLICA_ACKS=N, is measured beside the others: the cost of
answering only after WAIT N, printed beside the figure without it. Both
streamrec servers verify signatures over one public URL, so the same signed
callbacks serve all servers.

With INGEST_PROFILE_DIR set, each server writes cProfile's stats of its whole run
(warm-ups and every round) to DIR/<mode>.prof as it stops.

Every body carries a distinct RecordingSid, so the dedupe script never
short-circuits unless a wrk thread sends more requests than it has bodies; it
then starts over and those repeats are answered as duplicates (counted and
reported below, raise --bodies to avoid them).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import resource
import secrets
import select
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlencode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp
import redis
from twilio.request_validator import RequestValidator

from streamrec.devservers import LocalRedis
from streamrec.keys import Keys
from streamrec.producer import WEBHOOK_PATH

ROOT = Path(__file__).resolve().parent.parent
NAMESPACE = "bench-ingest"
BUSINESSES = 10
TARGET = 0.6
SIGNED_URL = "https://ingest.bench.example"  # STREAMREC_PUBLIC_URL of the streamrec servers
RESULT_MARK = "INGEST_RESULT "

# The wrk script. setup() numbers the threads; each thread's init() reads its
# share of the data file (every n-th line: path, signature, body separated by
# tabs) and formats the requests once, so request() only hands out the next one.
# done() prints wrk's own figures as one JSON line for this script to read.
WRK_SCRIPT = r"""
local data_file = %(data_file)s
local thread_count = %(threads)d
local next_id = 0

function setup(thread)
  thread:set("id", next_id)
  next_id = next_id + 1
end

function init(args)
  requests = {}
  local line_no = 0
  for line in io.lines(data_file) do
    if line_no %% thread_count == id then
      local path, signature, body = line:match("^([^\t]*)\t([^\t]*)\t(.*)$")
      requests[#requests + 1] = wrk.format("POST", path, {
        ["Content-Type"] = "application/x-www-form-urlencoded",
        ["X-Twilio-Signature"] = signature,
      }, body)
    end
    line_no = line_no + 1
  end
  if #requests == 0 then error("no requests for thread " .. id) end
  position = 0
end

function request()
  position = position %% #requests + 1
  return requests[position]
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '%(mark)s{"requests": %%d, "duration_us": %%d, "non_2xx": %%d, "connect": %%d, '
    .. '"read": %%d, "write": %%d, "timeout": %%d, "p50_us": %%d, "p90_us": %%d, '
    .. '"p99_us": %%d, "max_us": %%d}\n',
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""


class BenchError(RuntimeError):
    """The benchmark cannot run or its figures are not valid."""


@dataclass
class Figure:
    """One wrk measurement of one server."""

    mode: str
    requests: int
    seconds: float
    non_2xx: int
    socket_errors: dict[str, int]
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    server_cpu_s: float
    wrk_cpu_s: float
    stream_entries: int | None = None
    redis_cpu_s: float | None = None
    redis_calls: int | None = None
    """Script calls (EVAL, EVALSHA) Redis ran during the run: one per batch of callbacks."""
    replica_entries: int | None = None

    @property
    def accepted(self) -> int:
        """Responses below 400 (wrk counts status > 399 as errors)."""
        return self.requests - self.non_2xx

    @property
    def rate(self) -> float:
        return self.accepted / self.seconds

    @property
    def cpu_us(self) -> float:
        return self.server_cpu_s / max(self.requests, 1) * 1e6


# -- signed callbacks ----------------------------------------------------------------------


def callback_params(n: int, account_sid: str) -> dict[str, str]:
    """The form fields of the n-th RecordingStatusCallback; its RecordingSid is unique."""
    sid = f"RE{n:08x}{secrets.token_hex(12)}"
    return {
        "AccountSid": account_sid,
        "CallSid": "CA" + secrets.token_hex(16),
        "RecordingSid": sid,
        "RecordingUrl": f"https://api.twilio.com/2010-04-01/Accounts/{account_sid}/Recordings/{sid}",
        "RecordingStatus": "completed",
        "RecordingDuration": str(1 + n % 600),
        "RecordingChannels": "1",
        "RecordingSource": "RecordVerb",
        "RecordingStartTime": "Sat, 28 Nov 2026 10:00:00 +0000",
        "ErrorCode": "0",
    }


def signed_callback(
    n: int, public_url: str, account_sid: str, validator: RequestValidator
) -> tuple[str, str, str]:
    """(path with query, X-Twilio-Signature, form body) of the n-th callback."""
    path = f"{WEBHOOK_PATH}?business_id=biz-{n % BUSINESSES}"
    params = callback_params(n, account_sid)
    signature = str(validator.compute_signature(public_url + path, params))
    return path, signature, urlencode(params)


def write_data(
    file: Path, count: int, public_url: str, account_sid: str, auth_token: str
) -> list[tuple[str, str, str]]:
    """Write ``count`` signed callbacks, one per line, for the wrk script; returns the first."""
    validator = RequestValidator(auth_token)
    first: list[tuple[str, str, str]] = []
    with file.open("w", encoding="ascii") as out:
        for n in range(count):
            callback = signed_callback(n, public_url, account_sid, validator)
            assert all("\t" not in part and "\n" not in part for part in callback)
            out.write("\t".join(callback) + "\n")
            if n < 3:
                first.append(callback)
    return first


def write_script(file: Path, data_file: Path, threads: int) -> None:
    file.write_text(
        WRK_SCRIPT
        % {"data_file": json.dumps(str(data_file)), "threads": threads, "mark": RESULT_MARK}
    )


# -- processes -----------------------------------------------------------------------------


class Children:
    """The processes this script started, stopped on exit whatever happens."""

    def __init__(self) -> None:
        self._processes: list[subprocess.Popen[bytes]] = []

    def start(self, args: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        # A session of its own: Ctrl-C reaches this script, which stops the child.
        process = subprocess.Popen(args, start_new_session=True, **kwargs)
        self._processes.append(process)
        return process

    def stop(self, process: subprocess.Popen[bytes]) -> None:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process in self._processes:
            self._processes.remove(process)

    def stop_all(self) -> None:
        for process in reversed(list(self._processes)):
            self.stop(process)


@dataclass
class Server:
    """A running bench/ingest_server.py."""

    mode: str
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def public_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def modes(args: argparse.Namespace) -> tuple[str, ...]:
    """The servers measured: the bare handler, streamrec, and streamrec after WAIT N; unless
    --no-uvloop, the bare handler and streamrec again on uvloop's event loop (``-uv``), the
    pair the target is checked on (``serve`` runs on uvloop by default)."""
    waits = [f"wait{args.wait_replicas}"] if args.wait_replicas else []
    return ("bare", "streamrec", *waits, *(("bare-uv", "streamrec-uv") if args.uvloop else ()))


def server_args(mode: str) -> list[str]:
    """ingest_server.py's arguments for ``mode`` (``waitN``: streamrec with N replica acks)."""
    loop = ["--uvloop"] if mode.endswith("-uv") else []
    if mode.startswith("bare"):
        return ["--mode", "bare", *loop]
    acks = mode.removeprefix("wait") if mode.startswith("wait") else "0"
    return ["--mode", "streamrec", "--public-url", SIGNED_URL, "--replica-acks", acks, *loop]


def start_server(
    children: Children, mode: str, redis_url: str, env: dict[str, str], directory: Path
) -> Server:
    """Start the server of ``mode`` and wait for its ``listening <port>`` line."""
    log = directory / f"{mode}.log"
    args = [sys.executable, str(ROOT / "bench" / "ingest_server.py"), *server_args(mode),
            "--port", "0", "--redis-url", redis_url, "--namespace", NAMESPACE]  # fmt: skip
    if profiles := os.environ.get("INGEST_PROFILE_DIR"):
        args += ["--profile", str(Path(profiles) / f"{mode}.prof")]
    with log.open("wb") as err:
        process = children.start(args, stdout=subprocess.PIPE, stderr=err, env=env, cwd=ROOT)
    assert process.stdout is not None
    deadline = time.monotonic() + 30
    line = b""
    while time.monotonic() < deadline and not line.endswith(b"\n"):
        ready, _, _ = select.select([process.stdout], [], [], 0.1)
        if ready:
            chunk = os.read(process.stdout.fileno(), 256)
            if not chunk:
                break
            line += chunk
        elif process.poll() is not None:
            break
    if not line.startswith(b"listening "):
        raise BenchError(f"{mode} server did not start:\n{tail(log)}")
    return Server(mode, process, int(line.split()[1]), log)


def tail(file: Path, lines: int = 15) -> str:
    try:
        return "\n".join(file.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a live process (Linux /proc), 0 where unavailable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu_s() -> float:
    """CPU seconds of this script's finished children: around one wrk run, wrk's."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def redis_calls(client: redis.Redis) -> int:
    """Script calls Redis has run, from INFO commandstats."""
    info: dict[str, Any] = client.info("commandstats")
    return sum(int(info.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in ("eval", "evalsha"))


def redis_cpu_s(client: redis.Redis) -> float:
    info: dict[str, Any] = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def probe(server: Server, callback: tuple[str, str, str]) -> tuple[int, str]:
    """POST one signed callback; (status, body)."""
    path, signature, body = callback
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        headers = {
            "Content-Type": "application/x-www-form-urlencoded",
            "X-Twilio-Signature": signature,
        }
        conn.request("POST", path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read().decode(errors="replace")
    finally:
        conn.close()


# -- wrk -----------------------------------------------------------------------------------


def find_wrk() -> str:
    found = shutil.which("wrk")
    if not found:
        raise BenchError(
            "wrk is not installed; it generates the load from a separate process.\n"
            "  Debian/Ubuntu: sudo apt-get install -y wrk\n"
            "  macOS:         brew install wrk\n"
            "  or build it:   https://github.com/wg/wrk"
        )
    return found


def run_wrk(children: Children, command: list[str], seconds: float) -> tuple[dict[str, int], str]:
    """Run wrk; its figures (from the script's done()) and its full output."""
    process = children.start(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        output, _ = process.communicate(timeout=seconds + 60)
    finally:
        children.stop(process)
    text = output.decode(errors="replace")
    if process.returncode != 0:
        raise BenchError(f"wrk exited with {process.returncode}:\n{text}")
    for line in text.splitlines():
        if line.startswith(RESULT_MARK):
            result: dict[str, int] = json.loads(line[len(RESULT_MARK) :])
            return result, text
    raise BenchError(f"wrk printed no result line:\n{text}")


# -- the benchmark -------------------------------------------------------------------------


def check_probe(server: Server, callback: tuple[str, str, str]) -> None:
    """One signed callback must be answered 200 before any load is sent."""
    status, body = probe(server, callback)
    if not server.mode.startswith("bare") and (status != 200 or '"queued"' not in body):
        hint = " (a 403 means the signing is wrong)" if status == 403 else ""
        raise BenchError(f"{server.mode} answered the probe callback {status}{hint}: {body}")
    if status != 200:
        raise BenchError(f"{server.mode} answered the probe callback {status}: {body}")


class Bench:
    """One run: Redis, both servers, the signed callbacks and the wrk measurements."""

    def __init__(
        self, args: argparse.Namespace, directory: Path, children: Children, wrk: str
    ) -> None:
        self.args = args
        self.directory = directory
        self.children = children
        self.wrk = wrk
        self.account_sid = "AC" + secrets.token_hex(16)
        self.auth_token = secrets.token_hex(16)
        self.data = directory / "callbacks.tsv"
        self.script = directory / "callbacks.lua"
        self.stream = Keys(NAMESPACE).stream
        self.replica: redis.Redis | None = None

    def run(self) -> list[Figure]:
        """Start Redis and its replicas, then the servers, measure; all stop in reverse order."""
        aof = self.args.appendfsync != "off"
        local_redis = LocalRedis(
            self.directory / "redis",
            appendonly=aof,
            appendfsync=self.args.appendfsync if aof else "everysec",
        ).start()
        replicas: list[LocalRedis] = []
        try:
            for n in range(self.args.wait_replicas):
                replica = LocalRedis(self.directory / f"replica{n}", replica_of=local_redis)
                replicas.append(replica.start())
            client = redis.Redis.from_url(local_redis.url, decode_responses=True)
            with contextlib.closing(client):
                if replicas:
                    self.replica = redis.Redis.from_url(replicas[0].url, decode_responses=True)
                    wait_replicas(client, len(replicas))
                return self._with_servers(local_redis.url, client)
        finally:
            if self.replica is not None:
                self.replica.close()
            for server in [*reversed(replicas), local_redis]:
                server.stop()

    def _with_servers(self, redis_url: str, client: redis.Redis) -> list[Figure]:
        env = {
            **os.environ,
            "INGEST_ACCOUNT_SID": self.account_sid,
            "INGEST_AUTH_TOKEN": self.auth_token,
        }
        servers: dict[str, Server] = {}
        try:
            for mode in modes(self.args):
                servers[mode] = start_server(self.children, mode, redis_url, env, self.directory)
            self._prepare(servers)
            return self._rounds(servers, client)
        finally:
            for server in servers.values():
                self.children.stop(server.process)

    def _prepare(self, servers: dict[str, Server]) -> None:
        """Write the signed callbacks and the wrk script; probe each server with one."""
        # Twilio signs the public URL, SIGNED_URL for both streamrec servers.
        # The bare server gets the same bytes: its signatures are merely not checked.
        started = time.perf_counter()
        first = write_data(
            self.data, self.args.bodies, SIGNED_URL, self.account_sid, self.auth_token
        )
        write_script(self.script, self.data, self.args.threads)
        elapsed = time.perf_counter() - started
        print(f"{self.args.bodies:,} signed callbacks generated in {elapsed:.1f} s")
        for server, callback in zip(servers.values(), first, strict=False):
            check_probe(server, callback)  # each its own: another's would be a duplicate

    def _rounds(self, servers: dict[str, Server], client: redis.Redis) -> list[Figure]:
        """Measure each server --rounds times, alternating which goes first."""
        figures: list[Figure] = []
        for round_no in range(self.args.rounds):
            order = modes(self.args)
            for mode in order if round_no % 2 == 0 else reversed(order):
                figure = self._measure(servers[mode], client)
                print(f"  round {round_no + 1} {mode:<9} {figure.rate:>9,.0f} req/s")
                figures.append(figure)
                if figure.non_2xx:
                    print(f"\n{mode} server log (tail):\n{tail(servers[mode].log)}\n")
        return figures

    def _wrk(self, url: str, seconds: int) -> tuple[dict[str, int], str]:
        args = self.args
        command = [self.wrk, f"-t{args.threads}", f"-c{args.connections}", f"-d{seconds}s",
                   "--timeout", "5s", "--latency", "-s", str(self.script), url]  # fmt: skip
        return run_wrk(self.children, command, seconds)

    def _measure(self, server: Server, client: redis.Redis) -> Figure:
        """Warm the server up, empty Redis, then one wrk run of --duration seconds."""
        url = server.public_url + WEBHOOK_PATH
        if self.args.warmup > 0:
            self._wrk(url, self.args.warmup)
        client.flushdb()
        redis_before, cpu_before = redis_cpu_s(client), process_cpu_s(server.process.pid)
        calls_before = redis_calls(client)
        wrk_before = children_cpu_s()
        result, output = self._wrk(url, self.args.duration)
        server_cpu = process_cpu_s(server.process.pid) - cpu_before
        wrk_cpu = children_cpu_s() - wrk_before
        redis_used = redis_cpu_s(client) - redis_before
        calls = redis_calls(client) - calls_before
        if self.args.show_wrk:
            print(f"--- wrk against {server.mode} ---\n{output}")
        errors = {k: result[k] for k in ("connect", "read", "write", "timeout") if result[k]}
        figure = Figure(
            mode=server.mode,
            requests=result["requests"],
            seconds=result["duration_us"] / 1e6,
            non_2xx=result["non_2xx"],
            socket_errors=errors,
            p50_ms=result["p50_us"] / 1000,
            p90_ms=result["p90_us"] / 1000,
            p99_ms=result["p99_us"] / 1000,
            max_ms=result["max_us"] / 1000,
            server_cpu_s=server_cpu,
            wrk_cpu_s=wrk_cpu,
        )
        if not server.mode.startswith("bare"):
            figure.stream_entries = int(client.xlen(self.stream))
            figure.redis_cpu_s = redis_used
            figure.redis_calls = calls
        if server.mode.startswith("wait") and self.replica is not None:
            figure.replica_entries = int(self.replica.xlen(self.stream))
        return figure


# -- report --------------------------------------------------------------------------------


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def wrk_version(wrk: str) -> str:
    result = subprocess.run([wrk, "--version"], capture_output=True, text=True, check=False)
    return (result.stdout or result.stderr).split("Copyright")[0].strip()


def median_figure(figures: list[Figure]) -> Figure:
    """The run with the median rate (of an odd count; the lower middle of an even one)."""
    ranked = sorted(figures, key=lambda f: f.rate)
    return ranked[(len(ranked) - 1) // 2]


def report(figures: list[Figure], args: argparse.Namespace, wrk: str) -> bool:
    """Print the table; False when a figure is not valid (non-2xx or socket errors)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(
        f"\nmachine: {cpu_model()}, {os.cpu_count()} cores ({usable} usable),"
        f" Python {platform.python_version()}, aiohttp {aiohttp.__version__},"
        f" {wrk_version(wrk)}, load average {os.getloadavg()[0]:.2f} at the end"
    )
    print(
        f"load: wrk -t{args.threads} -c{args.connections} -d{args.duration}s --latency,"
        f" {args.bodies:,} distinct signed callbacks, {args.rounds} round(s),"
        f" warm-up {args.warmup} s each"
    )
    header = (
        f"{'server':<12} {'req/s':>9} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8}"
        f" {'server CPU':>10} {'CPU µs/req':>10} {'wrk CPU':>8} {'non-2xx':>8} {'sock err':>8}"
    )
    print(header)
    valid = True
    chosen: dict[str, Figure] = {}
    for mode in modes(args):
        runs = [f for f in figures if f.mode == mode]
        figure = chosen[mode] = median_figure(runs)
        errors = sum(sum(f.socket_errors.values()) for f in runs)
        non_2xx = sum(f.non_2xx for f in runs)
        valid = valid and not errors and not non_2xx
        print(
            f"{mode:<12} {figure.rate:>9,.0f} {figure.p50_ms:>8.2f} {figure.p90_ms:>8.2f}"
            f" {figure.p99_ms:>8.2f} {figure.max_ms:>8.1f}"
            f" {figure.server_cpu_s / figure.seconds:>10.0%} {figure.cpu_us:>10.0f}"
            f" {figure.wrk_cpu_s / figure.seconds:>8.0%}"
            f" {non_2xx:>8} {errors:>8}"
        )
        if len(runs) > 1:
            rates = ", ".join(f"{f.rate:,.0f}" for f in runs)
            print(f"{'':<10} rounds: {rates} (median shown)")
    for figure in figures:
        if figure.socket_errors:
            print(f"  {figure.mode}: wrk socket errors {figure.socket_errors}")
        if figure.non_2xx:
            print(f"  {figure.mode}: {figure.non_2xx:,} responses with status >= 400")
    print()
    for figure in (f for f in figures if not f.mode.startswith("bare")):
        report_stream(figure, args)
    if args.wait_replicas:
        report_wait(chosen["streamrec"], chosen[f"wait{args.wait_replicas}"], args.wait_replicas)
    ratio = chosen["streamrec"].rate / chosen["bare"].rate
    print(f"streamrec / bare handler, both on asyncio's loop: {ratio:.0%}")
    if args.uvloop:
        on_uv, bare_uv = chosen["streamrec-uv"].rate, chosen["bare-uv"].rate
        ratio = on_uv / bare_uv
        gain = on_uv / chosen["streamrec"].rate
        print(f"streamrec / bare handler, both on uvloop's: {ratio:.0%};"
              f" streamrec, uvloop / asyncio's loop: {gain:.0%}")  # fmt: skip
    loop = "uvloop, as serve runs" if args.uvloop else "asyncio's loop"
    verdict = "meets" if ratio >= TARGET else "BELOW"
    print(f"webhook / bare handler on the same loop ({loop}): {ratio:.0%}"
          f"  ({verdict} the {TARGET:.0%} target)")  # fmt: skip
    return valid


def report_stream(figure: Figure, args: argparse.Namespace) -> None:
    """Stream entries against accepted callbacks: they differ by requests still in flight
    when wrk stopped (added, but not counted by wrk) and by repeats past --bodies."""
    per_thread = args.bodies // args.threads
    distinct = min(figure.accepted, per_thread * args.threads)
    repeats = figure.accepted - distinct
    entries = figure.stream_entries or 0
    redis_cpu = (figure.redis_cpu_s or 0) / figure.seconds
    note = "ok" if abs(entries - distinct) <= args.connections + 5 else "MISMATCH"
    if repeats:
        note += f" (more requests than --bodies {args.bodies:,}: raise it to avoid repeats)"
    per_call = figure.accepted / figure.redis_calls if figure.redis_calls else 0
    print(
        f"{figure.mode}: {figure.accepted:,} callbacks accepted (2xx), {entries:,} stream entries,"
        f" {repeats:,} repeats answered as duplicates, Redis CPU {redis_cpu:.0%},"
        f" {per_call:.1f} callbacks per script call: {note}"
    )


def report_wait(without: Figure, waiting: Figure, replicas: int) -> None:
    """The cost of WAIT: the WAIT server's figures beside those without it."""
    change = waiting.rate / without.rate - 1
    print(
        f"WAIT {replicas} (STREAMREC_MIN_REPLICA_ACKS={replicas}): {waiting.rate:,.0f} callbacks/s"
        f" against {without.rate:,.0f} without ({change:+.0%}); p50 {without.p50_ms:.2f} →"
        f" {waiting.p50_ms:.2f} ms, p99 {without.p99_ms:.2f} → {waiting.p99_ms:.2f} ms;"
        f" CPU {without.cpu_us:.0f} → {waiting.cpu_us:.0f} µs/callback;"
        f" replica has {waiting.replica_entries or 0:,} of {waiting.stream_entries or 0:,} entries"
    )


def wait_replicas(client: redis.Redis, count: int, timeout: float = 30) -> None:
    """Wait until ``count`` replicas acknowledge a write (the first sync is done)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with client.pipeline(transaction=False) as pipe:
            pipe.set("bench-probe", "1")
            pipe.wait(count, 100)
            if pipe.execute()[1] >= count:
                return
    raise BenchError(f"{count} replica(s) did not come in sync within {timeout:.0f} s")


def reproduce(args: argparse.Namespace) -> str:
    script = Path(__file__).resolve()
    with contextlib.suppress(ValueError):
        script = script.relative_to(Path.cwd())
    python = Path(sys.executable)
    with contextlib.suppress(ValueError):
        python = python.relative_to(Path.cwd())
    return shlex.join([
        str(python), str(script),
        "--duration", str(args.duration), "--connections", str(args.connections),
        "--threads", str(args.threads), "--bodies", str(args.bodies),
        "--rounds", str(args.rounds), "--warmup", str(args.warmup),
        "--wait-replicas", str(args.wait_replicas), "--appendfsync", args.appendfsync,
        "--uvloop" if args.uvloop else "--no-uvloop",
    ])  # fmt: skip


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per measurement")
    parser.add_argument("--connections", type=int, default=32, help="wrk -c")
    parser.add_argument("--threads", type=int, default=1, help="wrk -t")
    parser.add_argument("--bodies", type=int, default=150_000, help="distinct signed callbacks")
    parser.add_argument("--rounds", type=int, default=1, help="measurements per server")
    parser.add_argument(
        "--warmup", type=int, default=2, help="seconds of load before each (0: none)"
    )
    parser.add_argument("--show-wrk", action="store_true", help="print wrk's own output")
    parser.add_argument(
        "--uvloop",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also both servers on uvloop's event loop, serve's default (the target's pair)",
    )
    parser.add_argument(
        "--appendfsync",
        choices=["off", "everysec", "always"],
        default="off",
        help="Redis persistence: no AOF (default), or AOF fsynced every second or every write",
    )
    parser.add_argument(
        "--wait-replicas",
        type=int,
        default=1,
        help="also measure the webhook answering after WAIT N on N replicas (0: skip it)",
    )
    args = parser.parse_args()
    if args.connections < args.threads:
        parser.error("--connections must be at least --threads")
    if args.bodies < args.threads or args.rounds < 1 or args.duration < 1 or args.warmup < 0:
        parser.error("needs --bodies >= --threads, --rounds >= 1, --duration >= 1, --warmup >= 0")
    return args


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main() -> int:
    args = parse_args()
    # Also when started with SIGINT ignored (as background jobs of a script are).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _terminate)
    children = Children()
    directory = Path(tempfile.mkdtemp(prefix="streamrec-ingest-"))
    try:
        wrk = find_wrk()
        figures = Bench(args, directory, children, wrk).run()
        valid = report(figures, args, wrk)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        children.stop_all()
        shutil.rmtree(directory, ignore_errors=True)
    print(f"reproduce: {reproduce(args)}")
    if not valid:
        print("error: wrk saw failed requests, the figures above are not valid", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
