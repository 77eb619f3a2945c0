"""MySQL and MariaDB output: one row per webhook, upserted by key, many rows per statement.

Concurrent deliveries are coalesced (see :mod:`.dbwriter`) into one multi-row
``INSERT ... ON DUPLICATE KEY UPDATE`` (the driver splits it at about 1 MB) and one commit. The
session runs in strict mode, so a value that does not fit its column is an error, never a
silent truncation.

The key is ``PRIMARY KEY (channel, message_id)``, two ``VARCHAR(255)`` in utf8mb4: 2,040 bytes,
within InnoDB's 3,072-byte index limit (DYNAMIC rows, the default since MySQL 5.7 and MariaDB
10.2). A table an earlier version made keeps its ``message_id`` key and is written as it is
(see :mod:`webhook_connect.shared.modules.dbtable`).
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import aiomysql  # type: ignore[import-untyped]

from webhook_connect.shared.config.connections import ConnectionEntry
from webhook_connect.shared.modules.base import DeliveryError, Permanent, Pools, Transient
from webhook_connect.shared.modules.dbtable import Column, SqlTableConfig
from webhook_connect.shared.modules.dbwriter import RowT, ServerSettings, TableModule

SQL_TYPES = {
    "string": "VARCHAR(255)",
    "text": "LONGTEXT",
    "integer": "BIGINT",
    "float": "DOUBLE",
    "boolean": "BOOLEAN",
    "datetime": "DATETIME(6)",
    "date": "DATE",
    "time": "TIME(6)",
    "json": "JSON",
    "bytes": "LONGBLOB",
}
# Server errors a later attempt may get past: too many connections (1040, 1203, 1226), out of
# memory (1041), handshake and host (1042, 1043, 1129, 1130), access (1044, 1045) and unknown
# database (1049) until an operator fixes them, shutdown (1053), aborted or killed connection
# (1152, 1927), network (1158-1161), lock wait and deadlock (1205, 1213), read-only (1290,
# 1836). Client errors (2000-2999: cannot connect, server gone, lost connection) too.
TRANSIENT_CODES = frozenset(
    {
        1040,
        1041,
        1042,
        1043,
        1044,
        1045,
        1049,
        1053,
        1129,
        1130,
        1152,
        1158,
        1159,
        1160,
        1161,
        1203,
        1205,
        1213,
        1226,
        1290,
        1836,
        1927,
    }
)
NO_SUCH_TABLE = 1146
# Appended to the server's sql_mode: bad values are errors, not warnings and truncation.
STRICT = (
    "SET SESSION sql_mode = TRIM(BOTH ',' FROM CONCAT(@@SESSION.sql_mode, ',STRICT_ALL_TABLES'))"
)


def quote(name: str) -> str:
    """A checked (``dbtable.TABLE_NAME``) name as a quoted identifier."""
    return ".".join(f"`{part}`" for part in name.split("."))


def create_statement(config: SqlTableConfig, columns: tuple[Column, ...]) -> str:
    """``CREATE TABLE IF NOT EXISTS`` with the schema's indexes (MySQL has no CREATE INDEX
    IF NOT EXISTS, so they are made with the table)."""
    definitions = []
    for column in columns:
        sql = f"{quote(column.name)} {SQL_TYPES[column.type]}"
        sql += " NOT NULL" if column.not_null else ""
        definitions.append(sql + (" UNIQUE" if column.unique else ""))
    key = ", ".join(quote(column.name) for column in columns if column.key)
    definitions.append(f"PRIMARY KEY ({key})")
    indexes = config.table_schema.indexes if config.table_schema else {}
    for name, index in indexes.items():
        names = ", ".join(quote(column) for column in index.columns)
        definitions.append(f"{'UNIQUE ' if index.unique else ''}INDEX {quote(name)} ({names})")
    return (
        f"CREATE TABLE IF NOT EXISTS {quote(config.table)} ({', '.join(definitions)}) "
        "CHARACTER SET utf8mb4"
    )


def insert_statement(
    config: SqlTableConfig, columns: tuple[Column, ...], key: Sequence[str]
) -> str:
    """One row's upsert (``key``: the table's primary key), on one line: the driver rewrites
    ``VALUES (%s, ...)`` into a multi-row insert only when the statement has exactly that shape."""
    names = ", ".join(quote(column.name) for column in columns)
    placeholders = ", ".join(["%s"] * len(columns))
    if config.upsert:
        updated = [quote(c.name) for c in columns if c.name not in key]
        updates = ", ".join(f"{name} = VALUES({name})" for name in updated)
    else:
        # Keep the stored row (unlike INSERT IGNORE, errors stay errors).
        first = quote(key[0])
        updates = f"{first} = {first}"
    return (
        f"INSERT INTO {quote(config.table)} ({names}) VALUES ({placeholders}) "
        f"ON DUPLICATE KEY UPDATE {updates}"
    )


def classify(exc: BaseException) -> DeliveryError:
    """What a failed write means for the message: retry it later, or give up on it."""
    if isinstance(exc, DeliveryError):
        return exc
    if isinstance(exc, aiomysql.InterfaceError | OSError | TimeoutError):
        return Transient(f"MySQL unreachable: {exc!r}")
    if isinstance(exc, aiomysql.MySQLError):
        code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else 0
        if code in TRANSIENT_CODES or 2000 <= code < 3000:
            return Transient(f"MySQL: {exc.args[-1]} ({code})")
        return Permanent(f"MySQL refused the row: {exc.args[-1]} ({code})")
    return Transient(f"MySQL: {exc!r}")


class MySQLSettings(ServerSettings):
    """``connections.json`` keys of a ``mysql`` or ``mariadb`` connection."""

    unix_socket: str | None = None
    ssl: bool = False


class _QuietCursor(aiomysql.Cursor):  # type: ignore[misc]
    """A cursor that does not fetch server warnings after each statement (a round trip, then
    Python warnings): in strict mode, what matters about a row is an error."""

    async def _show_warnings(self, connection: Any) -> None:
        return None


async def open_pool(settings: MySQLSettings) -> Any:
    """A pool that connects on demand (unless ``pool_min_size``), so it opens while the
    server is down."""
    return await aiomysql.create_pool(
        minsize=settings.pool_min_size,
        maxsize=max(settings.pool_max_size, settings.pool_min_size),
        host=settings.host,
        port=settings.port or 3306,
        unix_socket=settings.unix_socket,
        user=settings.user,
        password=settings.secret() or "",
        db=settings.database,
        charset="utf8mb4",
        autocommit=False,
        connect_timeout=settings.connect_timeout,
        init_command=STRICT,
        ssl=ssl.create_default_context() if settings.ssl else None,
        cursorclass=_QuietCursor,
    )


async def close_pool(pool: Any) -> None:
    pool.close()
    await pool.wait_closed()


def adapt(columns: tuple[Column, ...], row: RowT) -> RowT:
    """MySQL's spelling of values: naive UTC datetimes, 1/0 for JSON booleans."""
    values = []
    for column, value in zip(columns, row, strict=True):
        if isinstance(value, datetime):
            value = value.replace(tzinfo=None)
        elif column.type == "boolean" and value in ("true", "false"):
            value = int(value == "true")
        values.append(value)
    return tuple(values)


class MySQLModule(TableModule[SqlTableConfig]):
    """Writes each webhook as a row of ``table`` (created if missing)."""

    name = "mysql"
    Config = SqlTableConfig
    Settings = MySQLSettings
    connection_types = frozenset({"mysql", "mariadb"})
    needs_connection = True

    def __init__(
        self, config: SqlTableConfig, connection: ConnectionEntry | None, pools: Pools
    ) -> None:
        super().__init__(config, connection, pools)
        self._insert = insert_statement(config, self._columns, self._key)
        self._pool: Any = None

    async def _write_once(self, rows: list[RowT]) -> None:
        """Insert ``rows`` and commit, creating the table first if need be."""
        assert isinstance(self.settings, MySQLSettings)
        settings = self.settings

        async def open_client() -> Any:
            return await open_pool(settings)

        self._pool = pool = await self.pools.get(self._pool_key, open_client, close_pool)
        async with pool.acquire() as connection:
            try:
                async with connection.cursor() as cursor:
                    if not self._table_ready:
                        await self._create_table(cursor)
                    if rows:
                        values = [adapt(self._written, row) for row in self._shaped(rows)]
                        await cursor.executemany(self._insert, values)
                await connection.commit()
            except BaseException:
                if not connection.closed:
                    with contextlib.suppress(Exception):  # the original error matters
                        await connection.rollback()
                raise

    async def _create_table(self, cursor: Any) -> None:
        await cursor.execute(create_statement(self.config, self._columns))
        await cursor.execute(f"SHOW COLUMNS FROM {quote(self.config.table)}")
        shape = await cursor.fetchall()  # Field, Type, Null, Key ("PRI": primary), ...
        self._fit([row[0] for row in shape], [row[0] for row in shape if row[3] == "PRI"])
        self._insert = insert_statement(self.config, self._written, self._key)
        self._table_ready = True

    def _classify(self, exc: Exception) -> DeliveryError:
        return classify(exc)

    def _is_missing_table(self, exc: Exception) -> bool:
        return isinstance(exc, aiomysql.MySQLError) and exc.args[:1] == (NO_SUCH_TABLE,)

    async def _reset(self) -> None:
        if self._pool is not None:
            await self._pool.clear()
