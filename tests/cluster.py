"""A throwaway Redis Cluster on local ports: 3 primaries, 3 replicas, failover in seconds.

``LocalCluster`` starts six ``redis-server`` processes in cluster mode, joins
them with ``redis-cli --cluster create`` and waits until the cluster has
settled: every node says ``cluster_state:ok``, every replica's link is up,
every primary's replicas acknowledge a write (a ``cluster-probe:<n>`` key, set
and deleted again) and all nodes report the same slot map. Tests kill a primary with SIGKILL, wait
for its replica to take over, and restart the killed node, which rejoins as
a replica of the node that replaced it.

The node timeout is one second and any replica may take over whatever its
data's age, so a failover completes within about three seconds.

Fixtures: ``redis_cluster`` is one cluster for the whole session; a test that
uses it must keep to keys of its own (a hash tag made from a unique
namespace), since other tests share it. ``fresh_cluster`` is a new cluster for
one test, for tests that kill or restart nodes.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis
from redis.backoff import NoBackoff
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot
from redis.retry import Retry

from streamrec.devservers import ServerError, find_binary, free_port

NODE_TIMEOUT_MS = 1_000
"""How long a node may be unreachable before it is suspected to have failed."""

T = TypeVar("T")


@dataclass(eq=False)
class Node:
    """One redis-server of the cluster: its address, its directory and its process."""

    port: int
    bus_port: int
    directory: Path
    host: str = "127.0.0.1"
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        """redis:// URL of this node."""
        return f"redis://{self.host}:{self.port}/0"

    @property
    def alive(self) -> bool:
        """Whether the node's process is running."""
        return self.process is not None and self.process.poll() is None

    def client(self) -> redis.Redis:
        """A plain (non-cluster) client of this node alone; close it after use."""
        return redis.Redis(
            host=self.host,
            port=self.port,
            decode_responses=True,
            socket_timeout=2,
            socket_connect_timeout=1,
            # The harness polls: a failed call is simply asked again.
            retry=Retry(NoBackoff(), 0),
        )


@dataclass(frozen=True)
class Peer:
    """One line of CLUSTER NODES: a node as another node sees it."""

    port: int
    flags: frozenset[str]
    slots: tuple[tuple[int, int], ...]
    connected: bool

    @property
    def failing(self) -> bool:
        """Suspected (pfail) or agreed (fail) to be down, or not reachable at all."""
        return bool(self.flags & {"fail", "fail?", "noaddr", "handshake"})


def parse_nodes(text: str) -> dict[int, Peer]:
    """CLUSTER NODES output as peers by port (slots being migrated are left out)."""
    peers = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 8:
            continue
        # ``:0@0`` while a node is still in handshake or has no known address.
        port_text = fields[1].split("@")[0].rpartition(":")[2]
        port = int(port_text) if port_text.isdigit() else 0
        slots = []
        for item in fields[8:]:
            if item.startswith("["):
                continue
            low, _, high = item.partition("-")
            slots.append((int(low), int(high or low)))
        flags = frozenset(fields[2].split(","))
        peers[port] = Peer(port, flags, tuple(sorted(slots)), connected=fields[7] == "connected")
    return peers


def slot_map(peers: dict[int, Peer]) -> tuple[tuple[int, int, int], ...]:
    """(first slot, last slot, port) of every range served by a primary that is not failing."""
    return tuple(
        sorted(
            (low, high, peer.port)
            for peer in peers.values()
            if "master" in peer.flags and not peer.failing
            for low, high in peer.slots
        )
    )


def covers_all(ranges: tuple[tuple[int, int, int], ...]) -> bool:
    """Whether the ranges cover every slot exactly once."""
    expected = 0
    for low, high, _ in ranges:
        if low != expected:
            return False
        expected = high + 1
    return expected == REDIS_CLUSTER_HASH_SLOTS


class LocalCluster:
    """A Redis Cluster of ``primaries`` primaries with one replica each, on free local ports.

    Each node runs in its own directory under ``base``. ``binary`` is the
    redis-server to run (default: the one on PATH). Every method that changes
    the cluster waits until it has settled again, or raises ``ServerError``.
    """

    def __init__(self, base: Path, *, primaries: int = 3, binary: str | None = None):
        self.base = base
        self.binary = binary
        self.nodes: list[Node] = []
        self._served: dict[int, tuple[tuple[int, int], ...]] = {}
        for _ in range(primaries * 2):
            port = free_port()
            self.nodes.append(Node(port, free_port(), base / f"node-{port}"))

    def start(self, timeout: float = 30.0) -> LocalCluster:
        """Start the nodes, create the cluster and wait until it has settled.

        On any failure every process started so far is killed before the error
        propagates.
        """
        atexit.register(self.stop)
        try:
            for node in self.nodes:
                for _ in range(5):
                    if self._launch(node):
                        break
                    # Another process took the port after free_port found it free.
                    shutil.rmtree(node.directory, ignore_errors=True)
                    node.port, node.bus_port = free_port(), free_port()
                    node.directory = self.base / f"node-{node.port}"
                else:
                    raise ServerError("no free ports for redis-server after 5 tries")
            self._create()
            self._poll(self._settled, "the new cluster to settle", timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _launch(self, node: Node) -> bool:
        """Start ``node``'s process and wait until it answers; False if its port was taken."""
        node.directory.mkdir(parents=True, exist_ok=True)
        args = [
            self.binary or find_binary("redis-server"),
            "--port", str(node.port),
            "--bind", node.host,
            "--protected-mode", "no",
            "--dir", str(node.directory),
            "--logfile", str(node.directory / "redis.log"),
            "--save", "",
            "--appendonly", "no",
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            # The bus port's default (port + 10000) may be taken, or past 65535.
            "--cluster-port", str(node.bus_port),
            "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
            # Any replica may take over, however long since it last heard its primary.
            "--cluster-replica-validity-factor", "0",
            # Replicas stay with their primary, so the layout after a failover is known.
            "--cluster-allow-replica-migration", "no",
            # A replica's first sync (also after a restart) starts at once.
            "--repl-diskless-sync", "yes",
            "--repl-diskless-sync-delay", "0",
        ]  # fmt: skip
        node.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if node.process.poll() is not None:
                node.process = None
                if "Address already in use" in _log_tail(node):
                    return False
                raise ServerError(f"redis-server on port {node.port} exited:\n{_log_tail(node)}")
            if _answers_as(node, node.process.pid):
                return True
            time.sleep(0.02)
        raise ServerError(f"redis-server on port {node.port} did not answer within 15s")

    def _create(self) -> None:
        addresses = [f"{node.host}:{node.port}" for node in self.nodes]
        create = [
            find_binary("redis-cli"), "--cluster", "create", *addresses,
            "--cluster-replicas", "1", "--cluster-yes",
        ]  # fmt: skip
        done = subprocess.run(create, capture_output=True, text=True, timeout=60, check=False)
        if done.returncode != 0:
            raise ServerError(f"redis-cli --cluster create failed: {done.stdout}{done.stderr}")

    @property
    def seed_url(self) -> str:
        """URL of the first node (in start order) that is a live primary: a client's seed."""
        return self.primaries()[0].url

    def primaries(self) -> list[Node]:
        """The live nodes that serve slots, in start order."""
        serving = {port for _, _, port in slot_map(self._peers())}
        return [node for node in self.nodes if node.alive and node.port in serving]

    def replicas(self) -> list[Node]:
        """The live nodes that replicate a primary, in start order."""
        peers = self._peers()
        return [
            node
            for node in self.nodes
            if node.alive and node.port in peers and "slave" in peers[node.port].flags
        ]

    def primary_for(self, key: str) -> Node:
        """The live node that serves ``key``'s hash slot."""
        slot = key_slot(key.encode())
        for low, high, port in slot_map(self._peers()):
            if low <= slot <= high:
                return self._node(port)
        raise ServerError(f"no live primary serves slot {slot} (key {key!r})")

    def kill(self, node: Node) -> None:
        """SIGKILL ``node``, as a crash would; its directory and nodes.conf stay."""
        if node.alive:
            # Remembered for wait_promoted: once a replica took over, nobody says.
            with contextlib.suppress(ServerError):
                peer = self._peers().get(node.port)
                self._served[node.port] = peer.slots if peer else ()
        _sigkill(node)

    def wait_promoted(self, killed: Node, timeout: float = 30.0) -> Node:
        """Wait until a live node serves the slots ``killed`` (a primary) served; return it.

        Also waits until every live node says ``cluster_state:ok`` and all agree
        on the slot map. Raises ServerError when that takes past ``timeout``.
        """
        served = self._served.get(killed.port)
        if not served:
            raise ServerError(f"node {killed.port} served no slots when it was killed")
        first_slot = served[0][0]

        def promoted() -> Node | None:
            ranges = self._settled()
            owner = next((port for low, high, port in ranges if low <= first_slot <= high), None)
            if owner is None or owner == killed.port:
                return None
            return self._node(owner)

        return self._poll(promoted, f"a replica to take over from node {killed.port}", timeout)

    def restart(self, node: Node, timeout: float = 30.0) -> Node:
        """Start a killed ``node`` again and wait until it has rejoined and the cluster settled.

        A killed primary whose replica took over comes back as that replica's
        replica (its nodes.conf names the cluster, which tells it the rest).
        """
        if node.alive:
            raise ServerError(f"node {node.port} is running")
        if not self._launch(node):
            raise ServerError(f"port {node.port} was taken while node {node.port} was down")

        def rejoined() -> bool:
            # Settled, and it replicates or serves slots: a primary that lost its
            # slots is briefly one with none before it turns replica.
            ranges = self._settled()
            peer = self._peers().get(node.port)
            serves = any(port == node.port for _, _, port in ranges)
            return bool(ranges) and peer is not None and ("slave" in peer.flags or serves)

        self._poll(rejoined, f"node {node.port} to rejoin the cluster", timeout)
        return node

    def stop(self) -> None:
        """Kill every node and remove their directories. Safe to call more than once."""
        for node in self.nodes:
            with contextlib.suppress(Exception):
                _sigkill(node)
        for node in self.nodes:
            shutil.rmtree(node.directory, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.base.rmdir()
        atexit.unregister(self.stop)

    def _node(self, port: int) -> Node:
        return next(node for node in self.nodes if node.port == port)

    def _peers(self) -> dict[int, Peer]:
        """CLUSTER NODES as the first live node that answers sees it."""
        for node in self.nodes:
            if node.alive:
                with contextlib.suppress(redis.RedisError), node.client() as client:
                    return parse_nodes(str(client.execute_command("CLUSTER", "NODES")))
        raise ServerError("no node of the cluster answers")

    def _settled(self) -> tuple[tuple[int, int, int], ...]:
        """The slot map, when every live node agrees on it and is healthy; else empty."""
        live = {node.port for node in self.nodes if node.alive}
        agreed = {self._healthy_view(node, live) for node in self.nodes if node.alive}
        ranges = agreed.pop() if len(agreed) == 1 else ()
        if not covers_all(ranges) or any(port not in live for _, _, port in ranges):
            return ()
        return ranges

    def _healthy_view(self, node: Node, live: set[int]) -> tuple[tuple[int, int, int], ...]:
        """The slot map as ``node`` sees it, if it is healthy; else empty.

        Healthy: ``cluster_state:ok``; it sees every live node connected and
        not failing; as a replica its link is up; as a primary its replicas
        acknowledge a write (see ``_replicated``).
        """
        try:
            with node.client() as client:
                if client.cluster("INFO").get("cluster_state") != "ok":
                    return ()
                peers = parse_nodes(str(client.execute_command("CLUSTER", "NODES")))
                if any(
                    port not in peers or peers[port].failing or not peers[port].connected
                    for port in live
                ):
                    return ()
                replication = client.info("replication")
                if replication.get("role") == "slave":
                    up = replication.get("master_link_status") == "up"
                else:
                    up = _replicated(client, peers[node.port], replication)
        except redis.RedisError:
            return ()
        return slot_map(peers) if up else ()

    def _poll(self, check: Callable[[], T | None], what: str, timeout: float) -> T:
        """Call ``check`` until it returns a truthy value; ServerError after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            result = check()
            if result:
                return result
            exited = next(
                (n for n in self.nodes if n.process and n.process.poll() is not None), None
            )
            if exited:
                raise ServerError(
                    f"redis-server on port {exited.port} exited while waiting for {what}; "
                    f"its log ends:\n{_log_tail(exited)}"
                )
            if time.monotonic() > deadline:
                raise ServerError(f"timed out after {timeout}s waiting for {what}")
            time.sleep(0.05)


def _replicated(client: redis.Redis, me: Peer, replication: dict[str, Any]) -> bool:
    """Whether every replica of this primary acknowledges a write (a probe key set and deleted).

    After a full sync a primary streams writes to a replica only once the
    replica first acknowledges, up to a second later; a write made before
    then is lost if the primary dies. Only WAIT tells that the stream flows.
    """
    replicas = int(replication.get("connected_slaves", 0))
    if not replicas or not me.slots:
        return True
    key = _probe_key(me.slots[0])
    with client.pipeline(transaction=False) as pipe:
        pipe.set(key, "1")
        pipe.delete(key)
        pipe.wait(replicas, 100)
        acked = pipe.execute()[-1]
    return int(acked) >= replicas


@functools.cache
def _probe_key(slots: tuple[int, int]) -> str:
    """A key whose hash slot is in ``slots`` (first and last)."""
    n = 0
    while not slots[0] <= key_slot(f"cluster-probe:{n}".encode()) <= slots[1]:
        n += 1
    return f"cluster-probe:{n}"


def _sigkill(node: Node) -> None:
    if node.process is not None:
        if node.process.poll() is None:
            node.process.send_signal(signal.SIGKILL)
        node.process.wait(timeout=30)
    node.process = None


def _log_tail(node: Node, lines: int = 15) -> str:
    try:
        text = (node.directory / "redis.log").read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def _answers_as(node: Node, pid: int) -> bool:
    """Whether the server at ``node``'s port answers and is process ``pid`` (not another's)."""
    try:
        with node.client() as client:
            return int(client.info("server")["process_id"]) == pid
    except redis.RedisError:
        return False


def _require_binaries() -> None:
    try:
        find_binary("redis-server")
        find_binary("redis-cli")
    except ServerError as error:
        pytest.skip(f"Redis Cluster tests need redis-server and redis-cli: {error}")


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """One Redis Cluster for the session. Shared: use keys of your own namespace's tag only,
    and never kill or restart its nodes (use ``fresh_cluster`` for that)."""
    _require_binaries()
    cluster = LocalCluster(tmp_path_factory.mktemp("redis-cluster")).start()
    yield cluster
    cluster.stop()


@pytest.fixture
def fresh_cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    """A new Redis Cluster for this test alone, free to kill and restart."""
    _require_binaries()
    cluster = LocalCluster(tmp_path / "redis-cluster").start()
    yield cluster
    cluster.stop()
