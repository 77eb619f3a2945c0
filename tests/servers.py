"""Real peers for the tests: redis-server, the cloud under uvicorn, all on free loopback ports.

Each helper starts a process it owns, waits on a condition with a deadline (never a fixed
sleep), and stops exactly that process by its PID.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

import httpx

if TYPE_CHECKING:
    from webhook_connect.shared.config.connections import ConnectionEntry

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A loopback port no socket holds, for a server a test starts.

    Not the kernel's pick (``bind(0)``): that comes from the ephemeral range, where another
    xdist worker's server or any outgoing connection may take the same port between this
    check and the server's own bind, and a readiness check would then find the other
    worker's server (whose tests flush it).
    Each worker takes ports from a block of its own below the ephemeral range, in turn, so a
    port is not handed out again while a stopped server's sockets may linger on it."""
    with _PORTS_LOCK:
        for _ in range(len(_PORTS)):
            port = _PORTS[next(_PORT_TURN) % len(_PORTS)]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _port_block(size: int = 1500, first: int = 10_000) -> range:
    """This process's block of ports: one per xdist worker (``gw0``, ``gw1`` …) and one for
    a run without workers, all below the kernel's ephemeral range (empty if they don't fit)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    index = int(worker[2:]) + 1 if worker[:2] == "gw" and worker[2:].isdigit() else 0
    try:
        ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral = 32768
    start = first + index * size
    return range(start, start + size) if start + size <= ephemeral else range(0)


_PORTS = _port_block()
# Where in the block to begin: anywhere, so a run right after another does not meet the
# sockets the previous run's servers left lingering.
_PORT_TURN = itertools.count(random.randrange(max(len(_PORTS), 1)))
_PORTS_LOCK = threading.Lock()


class Exited(RuntimeError):
    """A server process ended while a test waited for it to be ready."""


def check_running(
    process: subprocess.Popen[bytes] | None, what: str, log: Path | None = None
) -> None:
    """Raise :class:`Exited`, with ``log``'s text, if ``process`` has ended (``wait_until``
    then fails at once)."""
    if process is not None and process.poll() is not None:
        output = f": {log.read_text()}" if log is not None else ""
        raise Exited(f"{what} exited ({process.returncode}){output}")


def wait_until(condition: Callable[[], object], timeout: float = 10.0, what: str = "") -> None:
    """Poll ``condition`` until it is truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except Exited:
            raise
        except Exception:  # not ready yet: any other exception here means "try again"
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what or condition}")
        time.sleep(0.02)


def freeze(pid: int, timeout: float = 10.0) -> None:
    """SIGSTOP ``pid`` and return once every thread of it is stopped (alive, silent).

    ``kill`` only queues the signal: a multi-threaded server (a JVM, the Erlang VM) stops
    when one of its threads takes it, and on a loaded machine another thread could still
    answer a request sent meanwhile (once each in CI runs, for ActiveMQ and RabbitMQ)."""
    os.kill(pid, signal.SIGSTOP)

    def all_stopped() -> bool:
        states = []
        for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
            with contextlib.suppress(OSError):  # a thread that ended meanwhile
                states.append(stat.read_text().rpartition(")")[2].split()[0])
        return bool(states) and all(state in "tT" for state in states)

    wait_until(all_stopped, timeout, f"every thread of process {pid} to stop")


def stop(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 10) -> None:
    """Stop a process we started, by PID; kill it if it does not go in time."""
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)


class RedisServer:
    """A redis-server with append-only persistence in ``directory``."""

    def __init__(
        self, directory: Path, port: int | None = None, cluster_node_timeout_ms: int = 0
    ) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed: run scripts/test (it installs it)")
        self.binary = binary
        self.directory = directory
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None
        # A node of a Redis Cluster (RedisCluster) when non-zero: its cluster-node-timeout.
        self.cluster_node_timeout_ms = cluster_node_timeout_ms

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def arguments(self) -> list[str]:
        """The redis-server command line (a TLS node replaces the listening options)."""
        return [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--dir",
            str(self.directory),
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
            *(self.cluster_arguments() if self.cluster_node_timeout_ms else []),
        ]

    def cluster_arguments(self) -> list[str]:
        return [
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            str(self.directory / "nodes.conf"),
            "--cluster-node-timeout",
            str(self.cluster_node_timeout_ms),
            # A port of its own for the cluster bus (the default, port + 10000, may be
            # taken or past 65535).
            "--cluster-port",
            str(free_port()),
            # A replica syncs at once (not after the default 5 s wait for more replicas).
            "--repl-diskless-sync-delay",
            "0",
        ]

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(self.arguments(), stdout=subprocess.DEVNULL)
        wait_until(self._answers, what=f"redis-server on port {self.port}")

    def _answers(self) -> bool:
        check_running(self.process, f"redis-server on port {self.port}")
        with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None:
            stop(self.process, sig)
            self.process = None


class RedisCluster:
    """A Redis Cluster of ``masters`` masters, each with ``replicas`` replicas, on free
    loopback ports: one redis-server per node (append-only, ``appendfsync always``, a short
    ``cluster-node-timeout`` so a failover takes seconds), joined by ``redis-cli --cluster
    create``. Every process is stopped by its PID."""

    def __init__(
        self, directory: Path, masters: int = 3, replicas: int = 1, node_timeout_ms: int = 2000
    ) -> None:
        cli = shutil.which("redis-cli")
        if cli is None:
            raise RuntimeError("redis-cli is not installed: run scripts/test (it installs it)")
        self.cli = cli
        self.directory = directory
        self.masters = masters
        self.replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        self.nodes: list[RedisServer] = []

    @property
    def url(self) -> str:
        """``redis+cluster://`` naming every node (the cloud needs only one to answer)."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def new_node(self, directory: Path) -> RedisServer:
        """One node, not started (a TLS cluster makes TLS nodes)."""
        return RedisServer(directory, cluster_node_timeout_ms=self.node_timeout_ms)

    def cli_options(self) -> list[str]:
        """What ``redis-cli`` needs to reach a node (a TLS cluster: CA, certificate, user)."""
        return []

    def start(self) -> None:
        count = self.masters * (1 + self.replicas)
        for index in range(count):
            node = self.new_node(self.directory / f"node-{index}")
            self.nodes.append(node)
            node.start()
        done = subprocess.run(
            self.create_command(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=60,
        )
        if done.returncode:
            raise RuntimeError(f"redis-cli --cluster create failed: {done.stdout.decode()}")
        self.wait_ok()

    def create_command(self) -> list[str]:
        """``redis-cli --cluster create`` joining every node."""
        addresses = [f"127.0.0.1:{n.port}" for n in self.nodes]
        return [self.cli, *self.cli_options(), "--cluster", "create", *addresses] + [
            "--cluster-replicas",
            str(self.replicas),
            "--cluster-yes",
        ]

    def command(self, node: RedisServer, *args: str, timeout: float = 10) -> str:
        """``redis-cli -p PORT ARGS...`` against one node; its output."""
        done = subprocess.run(
            [self.cli, *self.cli_options(), "-h", "127.0.0.1", "-p", str(node.port), *args],
            capture_output=True,
            check=True,
            timeout=timeout,
        )
        return done.stdout.decode()

    def live(self) -> list[RedisServer]:
        return [n for n in self.nodes if n.process is not None and n.process.poll() is None]

    def wait_ok(self, timeout: float = 60) -> None:
        """Until every live node says ``cluster_state:ok`` and knows every live master."""

        def ok() -> bool:
            return all(self._settled(n) for n in self.live())

        wait_until(ok, timeout=timeout, what="redis cluster state ok")

    def _settled(self, node: RedisServer) -> bool:
        """Cluster state ok, every master known, and a replica's link to its master up (so
        a WAIT for a replica answers at once)."""
        if "cluster_state:ok" not in self.command(node, "CLUSTER", "INFO"):
            return False
        if len(self.masters_now(node)) != self.masters:
            return False
        replication = self.command(node, "INFO", "replication")
        return "role:master" in replication or "master_link_status:up" in replication

    def masters_now(self, node: RedisServer) -> dict[int, str]:
        """Port → node id of every master that ``node`` sees serving slots and not failed."""
        out = {}
        for line in self.command(node, "CLUSTER", "NODES").splitlines():
            fields = line.split()
            if "master" in fields[2] and "fail" not in fields[2] and len(fields) > 8:
                port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
                out[port] = fields[0]
        return out

    def master_of(self, key: str) -> RedisServer:
        """The node serving ``key``'s slot now."""
        slot = int(self.command(self.live()[0], "CLUSTER", "KEYSLOT", key))
        for line in self.command(self.live()[0], "CLUSTER", "NODES").splitlines():
            fields = line.split()
            if "master" not in fields[2] or "fail" in fields[2]:
                continue
            for spec in fields[8:]:
                low, _, high = spec.partition("-")
                if low.isdigit() and int(low) <= slot <= int(high or low):
                    port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
                    return next(n for n in self.nodes if n.port == port)
        raise LookupError(f"no master serves slot {slot}")

    def flush(self) -> None:
        """Empty every master (replicas follow)."""
        for node in self.live():
            if "role:master" in self.command(node, "INFO", "replication"):
                self.command(node, "FLUSHALL")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        for node in self.nodes:
            node.stop(sig)


def descriptor_limit(nofile: int) -> Callable[[], None]:
    """For ``preexec_fn``: the child runs with at most ``nofile`` open files (as ``ulimit -n``)."""

    def limit() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    return limit


class Cloud:
    """``webhook-connect cloud`` as a real process under uvicorn."""

    def __init__(
        self, storage: str, webhooks: Path, workdir: Path, *extra: str, nofile: int | None = None
    ) -> None:
        self.port = free_port()
        self.storage = storage
        self.webhooks = webhooks
        self.workdir = workdir
        self.extra = extra
        # Soft and hard RLIMIT_NOFILE of the cloud process (None: inherited).
        self.nofile = nofile
        self.process: subprocess.Popen[bytes] | None = None
        self.log = workdir / f"cloud-{self.port}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        args = [
            sys.executable,
            "-m",
            "webhook_connect",
            "cloud",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--webhooks",
            str(self.webhooks),
            "--storage",
            self.storage,
            *self.extra,
        ]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                args,
                cwd=self.workdir,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=None if self.nofile is None else descriptor_limit(self.nofile),
            )
        wait_until(self._healthy, timeout=20, what=f"cloud on port {self.port}")

    def _healthy(self) -> bool:
        check_running(self.process, f"cloud on port {self.port}", self.log)
        return httpx.get(f"{self.url}/health", timeout=1).status_code == 200

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None:
            stop(self.process, sig)
            self.process = None


class Startable(Protocol):
    def start(self) -> None: ...

    def stop(self) -> None: ...


ServerT = TypeVar("ServerT", bound=Startable)


@contextlib.contextmanager
def running(server: ServerT) -> Iterator[ServerT]:
    """Start ``server`` and stop it on the way out, whatever happened (a start that failed
    half-way included: the process it launched is stopped too)."""
    try:
        server.start()
        yield server
    finally:
        server.stop()


class Sink:
    """``webhook-connect sink`` recording every request to a JSON-lines file."""

    def __init__(self, workdir: Path, status: int = 200, port: int | None = None) -> None:
        self.port = port or free_port()
        self.status = status
        self.records_path = workdir / f"sink-{self.port}.jsonl"
        self.log = workdir / f"sink-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._records: list[dict[str, object]] = []
        self._offset = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def start(self) -> None:
        args = [
            sys.executable,
            "-m",
            "webhook_connect",
            "sink",
            "--port",
            str(self.port),
            "--status",
            str(self.status),
            "--jsonl",
            str(self.records_path),
            "--quiet",
        ]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)
        wait_until(self._listening, what=f"sink on port {self.port}")

    def _listening(self) -> bool:
        check_running(self.process, f"sink on port {self.port}", self.log)
        with socket.create_connection(("127.0.0.1", self.port), timeout=1):
            return True

    def records(self) -> list[dict[str, object]]:
        """Every request recorded so far. Read incrementally: tests poll this many times a
        second while thousands of records arrive, and re-parsing the file each time made the
        polling cost more than the relay under test."""
        import json

        if not self.records_path.exists():
            return list(self._records)
        with self.records_path.open("rb") as file:
            file.seek(self._offset)
            chunk = file.read()
        complete = chunk.rfind(b"\n") + 1
        self._offset += complete
        for line in chunk[:complete].splitlines():
            if line.endswith(b"}"):
                self._records.append(json.loads(line))
        return list(self._records)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None:
            stop(self.process, sig)
            self.process = None


class ConnectorProcess:
    """``webhook-connect connector`` with a connector.json written for the test."""

    def __init__(self, workdir: Path, settings: dict[str, object], name: str = "connector") -> None:
        import json

        self.workdir = workdir
        self.config = workdir / f"{name}.json"
        self.config.write_text(json.dumps(settings))
        self.log = workdir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, *extra: str) -> None:
        args = [sys.executable, "-m", "webhook_connect", "connector", "--config", str(self.config)]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [*args, *extra], env=env, stdout=log, stderr=subprocess.STDOUT
            )

    def output(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def wait(self, timeout: float = 20) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self.process is None:
            return None
        process, self.process = self.process, None
        stop(process, sig, timeout=20)
        return process.returncode


# The largest message the test broker takes (tests/modules/test_rabbitmq.py sends one past it):
# above the cloud's largest body (1 MiB by default) with its headers, for the storage backend.
RABBITMQ_MAX_MESSAGE_SIZE = 4 * 1024 * 1024


class RabbitMQServer:
    """A private rabbitmq-server node: its own name, ports, epmd, cookie and data directory, so
    it never meets a system node. Stopped by the PID of the Erlang VM it started."""

    def __init__(self, directory: Path) -> None:
        binary = "/usr/lib/rabbitmq/bin/rabbitmq-server"
        if not os.path.exists(binary) or shutil.which("epmd") is None:
            raise RuntimeError(
                "rabbitmq-server is not installed: run scripts/test (it installs it)"
            )
        self.binary = binary
        self.directory = directory
        self.port, self.dist_port, self.epmd_port = free_port(), free_port(), free_port()
        self.node = f"wctest{self.port}@localhost"
        self.epmd: subprocess.Popen[bytes] | None = None
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def connection(self) -> ConnectionEntry:
        """The node as a ``connections.json`` entry (for the output module)."""
        from webhook_connect.shared.config.connections import ConnectionEntry

        return ConnectionEntry(type="rabbitmq", host="127.0.0.1", port=self.port, connect_timeout=3)

    def start(self) -> None:
        home = self.directory / "home"
        home.mkdir(parents=True, exist_ok=True)
        config = self.directory / "rabbitmq.conf"
        config.write_text(
            f"listeners.tcp.1 = 127.0.0.1:{self.port}\nlog.console = false\n"
            f"log.file.level = warning\nmax_message_size = {RABBITMQ_MAX_MESSAGE_SIZE}\n"
        )
        (self.directory / "enabled_plugins").write_text("[].\n")
        if self.epmd is None:  # a private epmd, so the node registers nowhere shared
            self.epmd = subprocess.Popen(["epmd", "-port", str(self.epmd_port)])
        env = {
            **os.environ,
            "HOME": str(home),  # the Erlang cookie is created here
            "ERL_EPMD_PORT": str(self.epmd_port),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.directory / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.directory / "log"),
            "RABBITMQ_CONFIG_FILE": str(config),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.directory / "advanced.config"),
            "RABBITMQ_CONF_ENV_FILE": str(self.directory / "rabbitmq-env.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.directory / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(self.directory / "vm.pid"),
        }
        (self.directory / "vm.pid").unlink(missing_ok=True)
        with (self.directory / "server.log").open("ab") as log:
            self.process = subprocess.Popen(
                [self.binary], env=env, stdout=log, stderr=subprocess.STDOUT
            )
        wait_until(self._answers, timeout=60, what=f"rabbitmq-server on port {self.port}")

    def _answers(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"rabbitmq-server exited, see {self.directory}/*.log")
        with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
            sock.sendall(b"AMQP\x00\x00\x09\x01")
            return sock.recv(1) == b"\x01"  # a method frame: connection.start

    def is_durable(self) -> bool:
        """Whether the node has saved its quorum queues' registry (Ra's ``names.dets``).

        RabbitMQ 3.10 (Ra 2.2) writes a queue's log to its fsynced WAL before confirming a
        publish, but registers the queue's Ra server in a DETS file it saves only about a
        second later. A node killed before that restarts without the registration: it drops
        the queue's log (every message in it) and starts the queue afresh with no members,
        so it never elects a leader and every publish and ``basic.get`` on it times out.
        DETS marks a saved file "closed properly" (header bytes 8-11 = 1) and clears the
        mark on the next write."""
        saved = [
            names.read_bytes()[8:12] == b"\x00\x00\x00\x01"
            for names in self.directory.glob("mnesia/*/quorum/*/names.dets")
        ]
        return bool(saved) and all(saved)

    def ctl(self, *args: str) -> str:
        """``rabbitmqctl`` against this node (its epmd and cookie); its output."""
        env = {
            **os.environ,
            "HOME": str(self.directory / "home"),
            "ERL_EPMD_PORT": str(self.epmd_port),
        }
        done = subprocess.run(
            [str(Path(self.binary).with_name("rabbitmqctl")), "-n", self.node, *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return done.stdout

    def stop(self) -> None:
        """Kill the VM (its data is on disk; a restart recovers it) and its wrapper script."""
        if self.process is None:
            return
        pid_file = self.directory / "vm.pid"
        if pid_file.exists() and pid_file.read_text().strip():
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
        stop(self.process)
        self.process = None

    def close(self) -> None:
        self.stop()
        if self.epmd is not None:
            stop(self.epmd)
            self.epmd = None
