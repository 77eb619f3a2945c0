"""ClickHouse output over its HTTP interface: one row per webhook, many rows per INSERT.

No driver beyond httpx: every ClickHouse since the first release speaks HTTP. Rows travel as
``TabSeparated``, whose escaping carries any byte, so ``body`` (a ``String``) holds exactly the
bytes received; ``headers`` and ``payload`` are JSON text (``Nullable(String)``), queried with
``JSONExtract*``. ClickHouse has no unique keys: before each batch the (channel, message id)
pairs already stored are looked up and skipped, so a redelivery adds no row, and the default
``ReplacingMergeTree`` ordered by ``(channel, message_id)`` also collapses what two writers
raced to insert (on merge, or at once with ``FINAL``). A table an earlier version made is
ordered by ``message_id`` alone and kept as it is: the look-up still compares pairs, but its
merges collapse rows of two channels that share an id, so recreate it (see
:mod:`webhook_connect.shared.modules.dbtable`).
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Literal

import httpx
from pydantic import Field

from webhook_connect.shared.exceptions import ModuleProtocolError
from webhook_connect.shared.modules.base import DeliveryError, Permanent, Transient
from webhook_connect.shared.modules.dbtable import Column, TableConfig
from webhook_connect.shared.modules.dbwriter import RowT, ServerSettings, TableModule

TYPES = {"string": "String", "text": "String", "json": "String", "bytes": "String"}
# Server error codes for data or a table the server will never accept as they are: parse
# errors (6, 26, 27, 32, 33, 38, 41, 72), no such column (16), unknown identifier (47), type
# mismatch (53), syntax (62), argument out of bound (69), conversion (70), incorrect data (117),
# string too large (131), NULL into a non-Nullable column (349). Anything else (memory, too many
# parts or queries, timeouts, a replica or the network) may pass on a later attempt.
PERMANENT_CODES = frozenset({6, 16, 26, 27, 32, 33, 38, 41, 47, 53, 62, 69, 70, 72, 117, 131, 349})
UNKNOWN_TABLE = 60
ERROR_CODE = re.compile(r"Code: (\d+)")
# TabSeparated escaping (ClickHouse "Formats: TabSeparated"): backslash first.
ESCAPES = ((b"\\", b"\\\\"), (b"\t", b"\\t"), (b"\n", b"\\n"), (b"\r", b"\\r"), (b"\0", b"\\0"))


class ClickHouseError(ModuleProtocolError):
    """The server answered a query with an error."""

    def __init__(self, status: int, code: int | None, text: str) -> None:
        super().__init__(f"{text.strip()[:500]} (HTTP {status})")
        self.status, self.code = status, code


def escape(value: bytes) -> bytes:
    for raw, escaped in ESCAPES:
        value = value.replace(raw, escaped)
    return value


def tsv_row(values: RowT, subsecond: bool) -> bytes:
    """One row as a ``TabSeparated`` line."""
    fields = []
    for value in values:
        if value is None:
            fields.append(b"\\N")
        elif isinstance(value, datetime):
            fields.append(
                value.strftime(
                    "%Y-%m-%d %H:%M:%S.%f" if subsecond else "%Y-%m-%d %H:%M:%S"
                ).encode()
            )
        elif isinstance(value, bytes):
            fields.append(escape(value))
        else:
            fields.append(escape(str(value).encode()))
    return b"\t".join(fields) + b"\n"


def literal(text: str) -> str:
    """A quoted ClickHouse string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def quote(name: str) -> str:
    """A checked (``dbtable.TABLE_NAME``) name as a quoted identifier."""
    return ".".join(f"`{part}`" for part in name.split("."))


def create_statement(config: ClickHouseConfig, columns: tuple[Column, ...], version: str) -> str:
    """``CREATE TABLE IF NOT EXISTS``; DateTime64 (microseconds) from ClickHouse 20.1 on."""
    major = int(version.split(".")[0]) if version.split(".")[0].isdigit() else 0
    time_type = "DateTime64(6, 'UTC')" if major >= 20 else "DateTime('UTC')"
    key = ", ".join(quote(column.name) for column in columns if column.key)
    definitions = []
    for column in columns:
        sql_type = time_type if column.type == "datetime" else TYPES[column.type]
        definitions.append(
            f"{quote(column.name)} {sql_type if column.not_null else f'Nullable({sql_type})'}"
        )
    return (
        f"CREATE TABLE IF NOT EXISTS {quote(config.table)} ({', '.join(definitions)}) "
        f"ENGINE = {config.engine}() ORDER BY ({key})"
    )


class ClickHouseConfig(TableConfig):
    """``module-config`` of ``clickhouse``."""

    engine: Literal["ReplacingMergeTree", "MergeTree"] = "ReplacingMergeTree"


class ClickHouseSettings(ServerSettings):
    """``connections.json`` keys of a ``clickhouse`` connection (the HTTP port)."""

    url: str | None = None
    secure: bool = False
    timeout: float = Field(default=30.0, gt=0)

    def base_url(self) -> str:
        if self.url:
            return self.url
        scheme, port = ("https", 8443) if self.secure else ("http", 8123)
        return f"{scheme}://{self.host}:{self.port or port}"


async def open_client(settings: ClickHouseSettings) -> httpx.AsyncClient:
    auth = httpx.BasicAuth(settings.user, settings.secret() or "") if settings.user else None
    return httpx.AsyncClient(
        base_url=settings.base_url(),
        auth=auth,
        params={"database": settings.database} if settings.database else None,
        timeout=httpx.Timeout(settings.timeout, connect=settings.connect_timeout),
        limits=httpx.Limits(max_connections=settings.pool_max_size),
    )


async def close_client(client: httpx.AsyncClient) -> None:
    await client.aclose()


def classify(exc: BaseException) -> DeliveryError:
    """What a failed write means for the message: retry it later, or give up on it."""
    if isinstance(exc, DeliveryError):
        return exc
    if isinstance(exc, ClickHouseError):
        if exc.code in PERMANENT_CODES or (exc.code is None and exc.status in (400, 413)):
            return Permanent(f"ClickHouse refused the rows: {exc}")
        return Transient(f"ClickHouse: {exc}")
    if isinstance(exc, httpx.TransportError | OSError):
        return Transient(f"ClickHouse unreachable: {exc!r}")
    return Transient(f"ClickHouse: {exc!r}")


class ClickHouseModule(TableModule[ClickHouseConfig]):
    """Writes each webhook as a row of ``table`` (created if missing)."""

    name = "clickhouse"
    Config = ClickHouseConfig
    Settings = ClickHouseSettings
    connection_types = frozenset({"clickhouse"})
    needs_connection = True
    max_batch = 1000

    # Whether received_at takes microseconds (DateTime64) or whole seconds (DateTime).
    _subsecond = False

    async def _query(self, sql: str, data: bytes | None = None) -> str:
        """Run ``sql`` (with ``data`` as its input rows, if any) and return the answer."""
        assert isinstance(self.settings, ClickHouseSettings)
        settings = self.settings

        async def open_pooled() -> httpx.AsyncClient:
            return await open_client(settings)

        client = await self.pools.get(self._pool_key, open_pooled, close_client)
        if data is None:
            response = await client.post("/", content=sql.encode())
        else:
            response = await client.post("/", params={"query": sql}, content=data)
        if response.status_code != 200:
            header = response.headers.get("X-ClickHouse-Exception-Code")
            found = ERROR_CODE.search(response.text)
            code = int(header) if header else int(found.group(1)) if found else None
            raise ClickHouseError(response.status_code, code, response.text)
        return response.text

    async def _write_once(self, rows: list[RowT]) -> None:
        """Insert the rows whose key is not stored yet, creating the table first if need be."""
        if not self._table_ready:
            await self._create_table()
        positions = [i for i, column in enumerate(self._columns) if column.key]
        fresh: dict[tuple[str, ...], RowT] = {}
        for row in rows:
            fresh.setdefault(tuple(str(row[i]) for i in positions), row)
        if not fresh:
            return
        keys, table = [quote(self._columns[i].name) for i in positions], quote(self.config.table)
        # Each key column IN its values: a superset of the stored pairs, matched exactly below.
        where = " AND ".join(
            f"{name} IN ({', '.join(sorted({literal(key[n]) for key in fresh}))})"
            for n, name in enumerate(keys)
        )
        stored = await self._query(
            f"SELECT {', '.join(f'hex({name})' for name in keys)} FROM {table} "
            f"WHERE {where} FORMAT TabSeparated"
        )
        for line in stored.splitlines():  # hex: no TSV escapes to undo
            key = tuple(bytes.fromhex(part).decode(errors="replace") for part in line.split("\t"))
            fresh.pop(key, None)
        if fresh:
            names = ", ".join(quote(column.name) for column in self._columns)
            data = b"".join(tsv_row(row, self._subsecond) for row in fresh.values())
            await self._query(f"INSERT INTO {table} ({names}) FORMAT TabSeparated", data)

    async def _create_table(self) -> None:
        version = (await self._query("SELECT version()")).strip()
        await self._query(create_statement(self.config, self._columns, version))
        described = await self._query(
            f"DESCRIBE TABLE {quote(self.config.table)} FORMAT TabSeparated"
        )
        types = dict(line.split("\t")[:2] for line in described.splitlines())
        self._subsecond = "DateTime64" in types.get("received_at", "")
        self._table_ready = True

    def _classify(self, exc: Exception) -> DeliveryError:
        return classify(exc)

    def _is_missing_table(self, exc: Exception) -> bool:
        return isinstance(exc, ClickHouseError) and exc.code == UNKNOWN_TABLE
