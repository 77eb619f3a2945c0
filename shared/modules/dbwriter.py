"""How the database modules write: rows coalesced into batches, one retry after a lost link.

Concurrent ``deliver`` calls are coalesced (:class:`~..coalescer.Coalescer`) into one
multi-row write: many webhooks share one round trip and one commit. A batch the server rejects
is written again row by row, so only the bad row fails. Writes are upserts on the row's key, so
a retry or a redelivery never duplicates: that is what makes retrying once after a connection
the server dropped (it restarted while the pool sat idle) safe.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Any, ClassVar, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from webhook_connect.shared.coalescer import Coalescer
from webhook_connect.shared.config.connections import ConnectionEntry
from webhook_connect.shared.modules.base import DeliveryError, Message, Module, Permanent, Pools
from webhook_connect.shared.modules.dbtable import (
    TableConfig,
    fitted_columns,
    row_values,
    table_columns,
)

logger = logging.getLogger("webhook_connect.modules")

RowT = tuple[Any, ...]
TableConfigT = TypeVar("TableConfigT", bound=TableConfig)


class ServerSettings(BaseModel):
    """The ``connections.json`` keys of a database server (each module adds its own)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = "localhost"
    port: int | None = Field(default=None, ge=1, le=65535)
    user: str | None = None
    password: SecretStr | None = None
    database: str | None = None
    pool_min_size: int = Field(default=0, ge=0)
    pool_max_size: int = Field(default=10, ge=1)
    connect_timeout: float = Field(default=10.0, gt=0)

    def secret(self) -> str | None:
        return self.password.get_secret_value() if self.password else None


async def write_isolating(
    rows: list[RowT], write: Callable[[list[RowT]], Awaitable[None]]
) -> list[None | Exception]:
    """Write ``rows`` in one go; if the server rejects the batch, write each row alone, so
    one bad row is refused without taking its neighbours with it."""
    try:
        await write(rows)
        return [None] * len(rows)
    except Permanent as exc:
        if len(rows) == 1:
            return [exc]
    except DeliveryError as exc:
        return [exc] * len(rows)
    results: list[None | Exception] = []
    for row in rows:
        try:
            await write([row])
            results.append(None)
        except DeliveryError as exc:
            results.append(exc)
    return results


class TableModule(Module[TableConfigT]):
    """A module that writes one row per webhook into ``table``, created if missing.

    Subclasses say how to write a batch (:meth:`_write_once`, which creates the table first
    while ``_table_ready`` is false, then may :meth:`_fit` the rows to it), what a driver error
    means (:meth:`_classify`) and how to drop connections the server closed (:meth:`_reset`).
    """

    Settings: ClassVar[type[ServerSettings]] = ServerSettings
    max_batch: ClassVar[int] = 500

    def __init__(
        self, config: TableConfigT, connection: ConnectionEntry | None, pools: Pools
    ) -> None:
        super().__init__(config, connection, pools)
        # A bad connection entry is refused when the configuration loads, not at the first row.
        self.settings = self.Settings.model_validate(self.connection_settings)
        raw = orjson.dumps(self.connection_settings, option=orjson.OPT_SORT_KEYS, default=str)
        self._pool_key = f"{self.name}:{raw.decode()}"
        # Every row is built with all the columns; _fit narrows what is written to the table.
        self._columns = table_columns(config)
        self._written = self._columns
        self._key = tuple(column.name for column in self._columns if column.key)
        self._table_ready = False
        self._coalescer: Coalescer[RowT, None] = Coalescer(self._flush, max_batch=self.max_batch)

    async def start(self) -> None:
        """Create the table now; a server that is down only delays that to the first row."""
        try:
            await self._write([])
        except DeliveryError as exc:
            logger.warning("%s: table %s not ready yet: %s", self.name, self.config.table, exc)

    async def deliver(self, message: Message) -> None:
        await self._coalescer.submit(row_values(message, self.config, self._columns))

    async def aclose(self) -> None:
        await self._coalescer.aclose()

    async def _flush(self, rows: list[RowT]) -> list[None | Exception]:
        return await write_isolating(rows, self._write)

    async def _write(self, rows: list[RowT]) -> None:
        """Write ``rows`` (none: just make sure the table exists), retrying once when the
        connection broke or the table vanished (it is created again)."""
        for attempt in (1, 2):
            try:
                await self._write_once(rows)
                return
            except Exception as exc:
                error = self._classify(exc)
                missing = self._is_missing_table(exc)
                if missing:
                    self._table_ready = False
                if attempt == 2 or (isinstance(error, Permanent) and not missing):
                    raise error from exc
                if not missing:
                    await self._reset()

    def _fit(self, existing: Collection[str], primary: Sequence[str]) -> None:
        """Write to the table as it stands, given its column names and primary key. One an
        earlier version made keeps its key (``message_id`` alone): upserts target that key,
        and rows go in without a ``channel`` column it lacks (see ``fitted_columns``)."""
        self._written = fitted_columns(self._columns, existing)
        names = {column.name for column in self._written}
        own = tuple(column.name for column in self._written if column.key)
        self._key = tuple(primary) if primary and set(primary) <= names else own

    def _shaped(self, rows: list[RowT]) -> list[RowT]:
        """``rows`` cut down to the columns written (see :meth:`_fit`)."""
        if len(self._written) == len(self._columns):
            return rows
        keep = [i for i, column in enumerate(self._columns) if column in self._written]
        return [tuple(row[i] for i in keep) for row in rows]

    async def _write_once(self, rows: list[RowT]) -> None:
        raise NotImplementedError

    def _classify(self, exc: Exception) -> DeliveryError:
        raise NotImplementedError

    def _is_missing_table(self, exc: Exception) -> bool:
        return False

    async def _reset(self) -> None:
        """Drop pooled connections so the next attempt opens fresh ones."""
