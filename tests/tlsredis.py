"""redis-server speaking only TLS, with certificates of a test CA (tests/certs.py), and ACL
users if asked: one server (:class:`TLSRedisServer`) or a Redis Cluster of them
(:class:`TLSRedisCluster`).

A server listens on ``--port 0 --tls-port P`` on loopback and is stopped by its PID. In a
cluster the bus and replication speak TLS too (``tls-cluster``, ``tls-replication``), so the
addresses the cluster announces (``CLUSTER SLOTS``, ``MOVED``) are TLS ports.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
from pathlib import Path
from urllib.parse import quote

from tests.certs import TLSFiles as TLSFiles
from tests.certs import make_tls_files as make_tls_files
from tests.servers import RedisCluster, RedisServer, free_port, stop, wait_until


def tls_arguments(
    port: int, files: TLSFiles, auth_clients: str, users: dict[str, str]
) -> list[str]:
    """redis-server options: TLS only, on ``port`` (``--port 0`` turns plain TCP off), with
    ``users`` as ACL users and the default user off when there are any."""
    args = [
        "--port",
        "0",
        "--tls-port",
        str(port),
        "--tls-cert-file",
        str(files.server_cert),
        "--tls-key-file",
        str(files.server_key),
        "--tls-ca-cert-file",
        str(files.ca),
        "--tls-auth-clients",
        auth_clients,
    ]
    if users:
        args += ["--user", "default", "off"]
        for name, password in users.items():
            args += ["--user", name, "on", f">{password}", "~*", "&*", "+@all"]
    return args


def answers_over_tls(process: subprocess.Popen[bytes] | None, port: int, files: TLSFiles) -> bool:
    """A TLS handshake with the client certificate and an answer to PING (PONG, or the
    refusal of a server whose default user is off)."""
    if process is not None and process.poll() is not None:
        raise RuntimeError(f"redis-server exited with {process.returncode}")
    context = files.client_context()
    with socket.create_connection(("127.0.0.1", port), timeout=1) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith((b"+PONG", b"-NOAUTH"))


def rediss_url(
    scheme: str, ports: list[int], user: str, password: str, options: dict[str, str | Path]
) -> str:
    """``scheme://[user:password@]127.0.0.1:port[,...]`` with ``options`` as the query, every
    part escaped."""
    auth = f"{quote(user, safe='')}:{quote(password, safe='')}@" if password else ""
    nodes = ",".join(f"127.0.0.1:{port}" for port in ports)
    query = "&".join(f"{name}={quote(str(value), safe='/')}" for name, value in options.items())
    return f"{scheme}://{auth}{nodes}/0" + (f"?{query}" if query else "")


class TLSRedisServer:
    """redis-server on a TLS port only (``--port 0``), on loopback.

    ``auth_clients`` is redis's ``tls-auth-clients``: ``yes`` demands a client certificate.
    ``users`` maps ACL user names to passwords; with any, the default user is off, so every
    client must authenticate as one of them.
    """

    def __init__(
        self,
        directory: Path,
        files: TLSFiles,
        *,
        auth_clients: str = "optional",
        users: dict[str, str] | None = None,
    ) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed: run scripts/test (it installs it)")
        self.binary = binary
        self.directory = directory
        self.files = files
        self.auth_clients = auth_clients
        self.users = users or {}
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def url(self, *, user: str = "", password: str = "", **options: str | Path) -> str:
        """A ``rediss://`` URL of this server with ``options`` as its query."""
        return rediss_url("rediss", [self.port], user, password, options)

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [
            self.binary,
            *tls_arguments(self.port, self.files, self.auth_clients, self.users),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.directory),
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
        ]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL)
        wait_until(self._answers, what=f"TLS redis-server on port {self.port}")

    def _answers(self) -> bool:
        return answers_over_tls(self.process, self.port, self.files)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None:
            stop(self.process, sig)
            self.process = None


class TLSClusterNode(RedisServer):
    """A Redis Cluster node (append-only, as :class:`RedisServer` makes one) speaking TLS only:
    to clients, on the cluster bus and to its replicas. Outgoing links (bus, replication)
    present the test client certificate.

    With a ``plain_port``, the misconfiguration a TLS client can meet: the node also listens
    on that plain port, and its bus and replication stay plain (``tls-cluster no``), so it
    announces the plain port in ``CLUSTER SLOTS`` and ``MOVED``."""

    def __init__(
        self,
        directory: Path,
        files: TLSFiles,
        users: dict[str, str],
        node_timeout_ms: int,
        plain_port: int = 0,
    ) -> None:
        super().__init__(directory, cluster_node_timeout_ms=node_timeout_ms)
        self.files = files
        self.users = users
        self.plain_port = plain_port

    def arguments(self) -> list[str]:
        args = super().arguments()
        at = args.index("--port")
        del args[at : at + 2]  # the plain port: tls_arguments turns it off
        tls_links = "no" if self.plain_port else "yes"
        args += [
            *tls_arguments(self.port, self.files, "optional", self.users),
            *(["--port", str(self.plain_port)] if self.plain_port else []),
            "--tls-cluster",
            tls_links,
            "--tls-replication",
            tls_links,
            "--tls-client-cert-file",
            str(self.files.client_cert),
            "--tls-client-key-file",
            str(self.files.client_key),
        ]
        if self.users:  # a replica logs in to its master as the first user
            name, password = next(iter(self.users.items()))
            args += ["--masteruser", name, "--masterauth", password]
        return args

    def _answers(self) -> bool:
        return answers_over_tls(self.process, self.port, self.files)


class TLSRedisCluster(RedisCluster):
    """A :class:`RedisCluster` of :class:`TLSClusterNode` nodes, made and driven with
    ``redis-cli --tls``; with ``users``, every client (the cluster's tools included) logs in
    as the first one. :attr:`url` is the ``rediss+cluster://`` URL a cloud uses: every node,
    the first user, the test CA.

    ``tls_cluster=False`` makes the nodes of :class:`TLSClusterNode` with a plain port too
    (joined over their plain ports), which announce those plain ports."""

    def __init__(
        self,
        directory: Path,
        files: TLSFiles,
        *,
        masters: int = 3,
        replicas: int = 0,
        users: dict[str, str] | None = None,
        node_timeout_ms: int = 2000,
        tls_cluster: bool = True,
    ) -> None:
        super().__init__(directory, masters, replicas, node_timeout_ms)
        self.files = files
        self.users = users or {}
        self.tls_cluster = tls_cluster

    def new_node(self, directory: Path) -> RedisServer:
        plain = 0 if self.tls_cluster else free_port()
        return TLSClusterNode(directory, self.files, self.users, self.node_timeout_ms, plain)

    def create_command(self) -> list[str]:
        command = super().create_command()
        if self.tls_cluster:
            return command
        # Joined over the plain ports (the bus is plain): redis-cli as a plain client.
        plain = {f"127.0.0.1:{n.port}": f"127.0.0.1:{n.plain_port}" for n in self.tls_nodes()}
        at = command.index("--cluster")
        return [self.cli, *self.login_options(), *(plain.get(a, a) for a in command[at:])]

    def tls_nodes(self) -> list[TLSClusterNode]:
        return [node for node in self.nodes if isinstance(node, TLSClusterNode)]

    def cli_options(self) -> list[str]:
        options = ["--tls", "--cacert", str(self.files.ca)]
        options += ["--cert", str(self.files.client_cert), "--key", str(self.files.client_key)]
        return options + self.login_options()

    def login_options(self) -> list[str]:
        if not self.users:
            return []
        name, password = next(iter(self.users.items()))
        return ["--user", name, "--pass", password, "--no-auth-warning"]

    def url_with(self, *, user: str = "", password: str = "", **options: str | Path) -> str:
        """A ``rediss+cluster://`` URL naming every node, with ``options`` as its query."""
        ports = [node.port for node in self.nodes]
        return rediss_url("rediss+cluster", ports, user, password, options)

    @property
    def url(self) -> str:
        user, password = next(iter(self.users.items()), ("", ""))
        return self.url_with(user=user, password=password, ssl_ca_certs=self.files.ca)
