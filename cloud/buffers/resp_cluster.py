"""Slot-aware routing for the lean pipelining client: the hot path on a Redis Cluster.

One :class:`~.resp.RespClient` per master (so whatever the single-node client does to open a
connection, TLS and ACL included, applies to every node), a slot table read from
``CLUSTER SLOTS``, and the key's slot (CRC16, hash tags) choosing the node. Commands issued in
one event-loop turn still share one write per node, so a batch costs one round trip per node.

Redirections are followed: ``MOVED`` updates the table (and a full refresh follows),
``ASK`` sends ``ASKING`` and the command once to the importing node, ``TRYAGAIN`` and
``CLUSTERDOWN`` are retried for a bounded time, and a lost node makes the table be read again
before a bounded retry; past the bounds the caller gets :class:`StorageUnavailable`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from typing import Any
from urllib.parse import parse_qsl, unquote

from webhook_connect.cloud.buffers.redisurl import RedisEndpoint, parse_redis_url
from webhook_connect.cloud.buffers.resp import ReplyError, RespClient
from webhook_connect.shared.exceptions import StorageUnavailable

logger = logging.getLogger("webhook_connect.redis")

SLOTS = 16384
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
# How long a command keeps being retried through a failover, a migration or a lost node
# before the caller gets StorageUnavailable (a 503 with Retry-After for a webhook).
RETRY_SECONDS = 3.0
MAX_REDIRECTS = 16
# Replica acknowledgement of an accepted message (see replicated()).
WAIT_REPLICAS = 1  # the default of the URL option wait_replicas
WAIT_TIMEOUT_MS = 1000
ROLE_MAX_AGE = 1.0
# Replies that mean "the cluster is changing, ask again shortly".
TRANSIENT = frozenset({"TRYAGAIN", "CLUSTERDOWN", "MASTERDOWN", "LOADING"})

Node = tuple[str, int]


# Pure logic ------------------------------------------------------------------------------


def _crc16_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
        table.append(crc & 0xFFFF)
    return table


_CRC16 = _crc16_table()


def crc16(data: bytes) -> int:
    """CRC16-CCITT (XModem), the checksum Redis Cluster hashes keys with."""
    crc = 0
    for byte in data:
        crc = ((crc << 8) & 0xFFFF) ^ _CRC16[((crc >> 8) ^ byte) & 0xFF]
    return crc


@functools.lru_cache(maxsize=4096)  # the keys of busy channels come again and again
def key_slot(key: bytes | str) -> int:
    """The cluster slot of ``key``: only the part inside the first non-empty ``{...}`` counts,
    so ``wc:{orders}:s`` and ``wc:{orders}:cfg`` share one slot."""
    data = key.encode() if isinstance(key, str) else key
    start = data.find(b"{")
    if start >= 0:
        end = data.find(b"}", start + 1)
        if end > start + 1:
            data = data[start + 1 : end]
    return crc16(data) % SLOTS


def command_key(args: tuple[Any, ...]) -> Any | None:
    """The key that routes a command the hot path sends, or None for a keyless one."""
    name = str(args[0]).upper() if not isinstance(args[0], bytes) else args[0].decode().upper()
    if name in ("EVALSHA", "EVAL"):
        return args[3] if int(args[2]) > 0 else None
    if name in ("PUBLISH", "SCRIPT", "PING", "WAIT", "CLUSTER", "INFO", "ROLE"):
        return None
    return args[1] if len(args) > 1 else None


@dataclasses.dataclass(frozen=True)
class ClusterUrl:
    """A ``redis+cluster://[user:password@]host:port[,host:port...][/][?options]`` URL."""

    scheme: str  # the single-node scheme: redis or rediss
    userinfo: str  # "user:password@" as written, or ""
    nodes: tuple[Node, ...]
    query: str  # the options every node's URL carries (TLS), without wait_replicas
    # Replicas that must have an accepted message before its 202 (0: do not wait).
    wait_replicas: int = WAIT_REPLICAS

    def node_url(self, node: Node) -> str:
        """A single-node URL for ``node`` carrying the credentials and the TLS options."""
        host, port = node
        host = f"[{host}]" if ":" in host else host
        query = f"?{self.query}" if self.query else ""
        return f"{self.scheme}://{self.userinfo}{host}:{port}/0{query}"

    @property
    def username(self) -> str | None:
        user = self.userinfo.removesuffix("@").partition(":")[0]
        return unquote(user) if user else None

    @property
    def password(self) -> str | None:
        user, sep, password = self.userinfo.removesuffix("@").partition(":")
        return unquote(password) if sep else (unquote(user) if user else None)


def is_cluster_url(url: str) -> bool:
    return url.partition("://")[0] in CLUSTER_SCHEMES


def parse_cluster_url(url: str) -> ClusterUrl:
    """Split a cluster URL; raise ValueError naming what is wrong."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in CLUSTER_SCHEMES:
        raise ValueError(f"not a cluster URL (use redis+cluster://HOST:PORT[,HOST:PORT...]): {url}")
    rest, _, query = rest.partition("?")
    options = parse_qsl(query, keep_blank_values=True)
    waits = [value for name, value in options if name == "wait_replicas"]
    if waits and not (len(waits) == 1 and waits[0].isdigit()):
        raise ValueError("wait_replicas: give it once, a number of replicas (0: do not wait)")
    # The other options go to every node's URL as written.
    query = "&".join(p for p in query.split("&") if p.partition("=")[0] != "wait_replicas")
    netloc, _, path = rest.partition("/")
    if path.strip("/") not in ("", "0"):
        raise ValueError("a Redis Cluster has only database 0")
    userinfo = ""
    if "@" in netloc:
        creds, _, netloc = netloc.rpartition("@")
        userinfo = creds + "@"
    nodes = []
    for part in netloc.split(","):
        host, colon, port = part.strip().rpartition(":")
        if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{part.strip() or '(empty)'!r} is not HOST:PORT")
        nodes.append((host.strip("[]"), int(port)))
    wait = int(waits[0]) if waits else WAIT_REPLICAS
    return ClusterUrl(CLUSTER_SCHEMES[scheme], userinfo, tuple(nodes), query, wait)


@dataclasses.dataclass
class SlotTable:
    """Which master serves each slot, and every node the cluster reported (masters first)."""

    masters: list[Node | None]
    nodes: list[Node]
    # The distinct masters, worked out once (not per keyless command: 16,384 slots to scan).
    _primaries: list[Node] | None = None

    @classmethod
    def from_reply(cls, reply: list[Any], default_host: str) -> SlotTable:
        """From ``CLUSTER SLOTS``: ``[[start, end, [host, port, id], replica...], ...]``."""
        masters: list[Node | None] = [None] * SLOTS
        primaries: list[Node] = []
        replicas: list[Node] = []
        for start, end, primary, *others in reply:
            node = _node(primary, default_host)
            masters[int(start) : int(end) + 1] = [node] * (int(end) - int(start) + 1)
            primaries.append(node)
            replicas.extend(_node(other, default_host) for other in others)
        nodes = list(dict.fromkeys([*primaries, *replicas]))
        return cls(masters, nodes)

    def primaries(self) -> list[Node]:
        if self._primaries is None:
            self._primaries = list(dict.fromkeys(n for n in self.masters if n is not None))
        return self._primaries

    def assign(self, slot: int, node: Node) -> None:
        """``slot`` is served by ``node`` now (a MOVED reply said so)."""
        self.masters[slot] = node
        self._primaries = None


def _node(entry: list[Any], default_host: str) -> Node:
    host = entry[0].decode() if isinstance(entry[0], bytes) else str(entry[0])
    # "" or "?" when a node does not know its address: it is the one we asked.
    return (host if host not in ("", "?") else default_host, int(entry[1]))


def redirect_target(error: ReplyError) -> tuple[str, int, Node]:
    """``MOVED 3999 127.0.0.1:6381`` → ("MOVED", 3999, ("127.0.0.1", 6381))."""
    kind, slot, address = str(error).split()[:3]
    host, _, port = address.rpartition(":")
    return kind, int(slot), (host.strip("[]"), int(port))


def reply_code(error: ReplyError) -> str:
    return str(error).partition(" ")[0]


def tls_port_hint(reached: Node, table: SlotTable) -> str:
    """Why the masters a cluster names may not answer TLS, when the node that answered at
    ``reached`` (over TLS) is announced at no such port: a cluster run with ``tls-cluster no``
    announces its plain ports, even to a TLS client (Redis 7.0). "" when nothing says so."""
    if any(port == reached[1] for _, port in table.nodes):
        return ""
    announced = ", ".join(f"{host}:{port}" for host, port in table.primaries())
    return (
        f"the cluster, reached over TLS at {reached[0]}:{reached[1]}, announces {announced} "
        "for its masters: plain ports, unless its nodes run with tls-cluster yes"
    )


# I/O -------------------------------------------------------------------------------------


class ClusterRespClient:
    """The :class:`RespClient` interface (``execute``, ``aclose``) over every master."""

    def __init__(self, url: str) -> None:
        self.url = parse_cluster_url(url)
        # The URL read once (redisurl.py): every node, those the cluster names later (a MOVED
        # or ASK target, a promoted replica) included, is reached with the same login and the
        # one SSLContext, not one built again from the files for each node as it turns up.
        self._endpoint = parse_redis_url(self.url.node_url(self.url.nodes[0]))
        self._clients: dict[Node, RespClient] = {}
        self._asking: dict[Node, tuple[RespClient, asyncio.Lock]] = {}
        self._table: SlotTable | None = None
        self._refreshing: asyncio.Task[SlotTable] | None = None
        self._refreshed_at = 0.0
        self._source: list[Node] = []  # the node the table was last read from
        self._hint = ""  # tls_port_hint of the last table read
        # Replica acknowledgements: per node, the WAIT in progress and how many commands had
        # been sent to the node when it was sent (it covers those, and only those).
        self._sent: dict[Node, int] = {}
        self._waits: dict[Node, tuple[int, asyncio.Future[Any]]] = {}
        # Per node: how many replicas ROLE listed, and when it was read.
        self._replicas: dict[Node, tuple[int, float]] = {}
        self._role_reads: dict[Node, asyncio.Future[Any]] = {}

    def endpoint(self, node: Node) -> RedisEndpoint:
        """How to reach ``node``: the URL's login and TLS context at the node's address."""
        return self._endpoint.at(*node)

    def client(self, node: Node) -> RespClient:
        client = self._clients.get(node)
        if client is None:
            client = self._clients[node] = RespClient(self.endpoint(node))
        return client

    async def table(self) -> SlotTable:
        return self._table if self._table is not None else await self.refresh()

    async def refresh(self) -> SlotTable:
        """Read the slot table again (one read at a time, shared by every caller)."""
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.create_task(self._read_table())
        return await asyncio.shield(self._refreshing)

    async def _read_table(self) -> SlotTable:
        known = self._table.nodes if self._table is not None else []
        errors = []
        for node in dict.fromkeys([*self._source, *known, *self.url.nodes]):
            try:
                reply = await self.client(node).execute("CLUSTER", "SLOTS")
            except StorageUnavailable as exc:
                errors.append(f"{node[0]}:{node[1]}: {exc}")
                continue
            if isinstance(reply, ReplyError) or not reply:
                errors.append(f"{node[0]}:{node[1]}: {reply or 'no slots served'}")
                continue
            self._table = table = SlotTable.from_reply(reply, node[0])
            self._refreshed_at = time.monotonic()
            self._source = [node]
            hint = tls_port_hint(node, table) if self._endpoint.tls is not None else ""
            if hint and hint != self._hint:
                logger.warning("redis cluster: %s", hint)
            self._hint = hint
            return table
        raise StorageUnavailable("redis cluster unreachable: " + "; ".join(errors))

    async def execute(self, *args: Any) -> Any:
        """Send one command to the node serving its key; return its reply or a ReplyError."""
        name = args[0].upper() if isinstance(args[0], str) else args[0]
        if name == "SCRIPT":
            return await self._on_every_master(*args)
        key = command_key(args)
        slot = key_slot(key) if key is not None else None
        deadline = time.monotonic() + RETRY_SECONDS
        asking: Node | None = None
        redirects = 0
        delay = 0.02
        while True:
            table = await self.table()
            node = asking or _serving(table, slot)
            try:
                if asking is not None:
                    reply = await self._ask(node, args)
                    asking = None
                else:
                    self._sent[node] = self._sent.get(node, 0) + 1
                    reply = await self.client(node).execute(*args)
            except StorageUnavailable:
                if time.monotonic() + delay > deadline:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)
                await self._refresh_quietly()
                continue
            if not isinstance(reply, ReplyError):
                return reply
            code = reply_code(reply)
            if code in ("MOVED", "ASK") and redirects < MAX_REDIRECTS:
                redirects += 1
                _, moved_slot, target = redirect_target(reply)
                if code == "ASK":
                    asking = target
                else:
                    table.assign(moved_slot, target)
                    if time.monotonic() - self._refreshed_at > 0.5:
                        self._refreshing = asyncio.create_task(self._read_table())
                        self._refreshing.add_done_callback(_ignore)
                continue
            if code in TRANSIENT and time.monotonic() + delay <= deadline:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)
                if code != "TRYAGAIN":
                    await self._refresh_quietly()
                continue
            return reply

    async def _ask(self, node: Node, args: tuple[Any, ...]) -> Any:
        """``ASKING`` then the command, adjacent on a connection of their own (the flag holds
        for the next command only, so nothing else may come between)."""
        entry = self._asking.get(node)
        if entry is None:
            entry = self._asking[node] = (RespClient(self.endpoint(node)), asyncio.Lock())
        client, lock = entry
        async with lock:
            asked = await client.execute("ASKING")
            if isinstance(asked, ReplyError):
                return asked
            return await client.execute(*args)

    async def _refresh_quietly(self) -> None:
        try:
            await self.refresh()
        except StorageUnavailable as exc:
            logger.debug("cluster slot table not refreshed: %s", exc)

    async def _on_every_master(self, *args: Any) -> Any:
        """A command every master must run (SCRIPT LOAD); the first master's reply."""
        table = await self.table()
        replies = []
        for node in table.primaries():
            try:
                replies.append(await self.client(node).execute(*args))
            except StorageUnavailable:
                await self._refresh_quietly()
                raise
        return replies[0]

    async def replicated(self, key: Any) -> None:
        """Return once every write sent so far to the master of ``key`` is on replicas too
        (``WAIT``; how many: the URL's ``wait_replicas``, 1 by default), so a failover cannot
        lose what was acknowledged to a sender. Writes issued together share one ``WAIT``.
        Only replicas connected now are waited for (ROLE, read at most once a second): a
        master with none has no one to hand over to, and a WAIT there would block its
        connection for the whole timeout. Connected replicas silent past the timeout make
        this StorageUnavailable (a 503: the sender sends again)."""
        if not self.url.wait_replicas:
            return
        table = await self.table()
        node = _serving(table, key_slot(key))
        wanted = min(self.url.wait_replicas, await self._replica_count(node))
        if not wanted:
            return
        sent = self._sent.get(node, 0)
        current = self._waits.get(node)
        if current is None or current[0] < sent or current[1].done():
            future = asyncio.ensure_future(
                self.client(node).execute("WAIT", wanted, WAIT_TIMEOUT_MS)
            )
            current = self._waits[node] = (sent, future)
        acked = await asyncio.shield(current[1])
        if isinstance(acked, ReplyError):
            raise StorageUnavailable(f"redis WAIT refused: {acked}")
        connected = await self._replica_count(node, fresh=int(acked) < wanted)
        if int(acked) >= min(wanted, connected):
            return
        raise StorageUnavailable(
            f"redis master {node[0]}:{node[1]}: {acked} of {wanted} replicas acknowledged "
            f"within {WAIT_TIMEOUT_MS} ms"
        )

    async def _replica_count(self, node: Node, *, fresh: bool = False) -> int:
        """How many replicas are connected to ``node`` (``ROLE``), as read in the last
        second unless ``fresh``; concurrent callers share one read."""
        known = self._replicas.get(node)
        now = time.monotonic()
        if known is not None and not fresh and now - known[1] < ROLE_MAX_AGE:
            return known[0]
        reading = self._role_reads.get(node)
        if reading is None or reading.done():
            reading = self._role_reads[node] = asyncio.ensure_future(
                self.client(node).execute("ROLE")
            )
        role = await asyncio.shield(reading)
        if isinstance(role, ReplyError) or role[0] != b"master":
            raise StorageUnavailable(f"redis {node[0]}:{node[1]} is no longer a master")
        self._replicas[node] = (len(role[2]), time.monotonic())
        return len(role[2])

    async def check(self) -> None:
        """For ``/ready``: the cluster says it is ok and every master answers ``PING``."""
        table = await self.refresh()
        for node in table.primaries():
            try:
                info = await self.client(node).execute("CLUSTER", "INFO")
            except StorageUnavailable as exc:
                await self._refresh_quietly()
                if self._hint:
                    raise StorageUnavailable(f"{exc}; {self._hint}") from exc
                raise
            if isinstance(info, ReplyError):
                raise StorageUnavailable(f"redis {node[0]}:{node[1]}: {info}")
            if b"cluster_state:ok" not in info:
                raise StorageUnavailable(f"redis cluster state is not ok at {node[0]}:{node[1]}")
        if any(node is None for node in table.masters):
            raise StorageUnavailable("redis cluster: some slots are served by no master")

    async def aclose(self) -> None:
        # The table read first: it would open connections to nodes after they were closed.
        refreshing, self._refreshing = self._refreshing, None
        if refreshing is not None and not refreshing.done():
            refreshing.cancel()
            await asyncio.wait({refreshing})
        for client in self._clients.values():
            await client.aclose()
        for client, _ in self._asking.values():
            await client.aclose()


def _serving(table: SlotTable, slot: int | None) -> Node:
    """The master of ``slot``; for a keyless command, any master."""
    node = table.masters[slot] if slot is not None else next(iter(table.primaries()), None)
    if node is None:
        raise StorageUnavailable(f"redis cluster: slot {slot} is served by no master")
    return node


def _ignore(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()


# Start-up check --------------------------------------------------------------------------


async def topology_problem(url: str) -> str | None:
    """Why the nodes of ``url`` are not one Redis Cluster, or None: a node with cluster
    support disabled, or two listed nodes that do not know each other. Nodes that do not
    answer are not judged (the cloud waits for storage as it does for a single Redis)."""
    parsed = parse_cluster_url(url)
    endpoint = parse_redis_url(parsed.node_url(parsed.nodes[0]))
    ids: dict[Node, bytes] = {}
    known: dict[Node, set[bytes]] = {}
    for node in parsed.nodes:
        client = RespClient(endpoint.at(*node))
        try:
            async with asyncio.timeout(5):
                nodes = await client.execute("CLUSTER", "NODES")
        except (StorageUnavailable, TimeoutError):
            continue
        finally:
            await client.aclose()
        where = f"{node[0]}:{node[1]}"
        if isinstance(nodes, ReplyError):
            if "cluster support disabled" in str(nodes):
                return f"{where} is not a Redis Cluster node (cluster support disabled)"
            return f"{where} refused CLUSTER NODES: {nodes}"
        lines = [line.split() for line in nodes.decode().splitlines() if line.strip()]
        known[node] = {line[0].encode() for line in lines}
        ids[node] = next(line[0].encode() for line in lines if "myself" in line[2])
    for node, node_ids in known.items():
        for other, other_id in ids.items():
            if other_id not in node_ids:
                return (
                    f"the node list disagrees: {node[0]}:{node[1]} and {other[0]}:{other[1]} "
                    "belong to different clusters"
                )
    return None
