"""What an output module is: set up once per configuration, deliver one message, close.

A module is a class with a pydantic ``Config`` for its ``module-config`` (unknown keys refused),
the ``connections.json`` types it accepts, and three coroutines. ``deliver`` returns only once
the server confirmed the write (a publisher confirm, a committed transaction, a PUBACK ...);
it raises :class:`Transient` for what a later attempt may fix (the server is down, a timeout)
and :class:`Permanent` for what it never will (the server rejected the data).

Modules share clients per named connection through :class:`Pools`, so ten webhooks writing to
``pg_main`` use one connection pool.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict

from webhook_connect.shared.envelope import Envelope
from webhook_connect.shared.exceptions import ModuleError

if (
    TYPE_CHECKING
):  # at run time webhook_connect.shared.config imports this module (a cycle otherwise)
    from webhook_connect.shared.config.connections import ConnectionEntry

logger = logging.getLogger("webhook_connect.modules")

T = TypeVar("T")
ConfigT = TypeVar("ConfigT", bound=BaseModel)


class DeliveryError(ModuleError):
    """A module could not deliver a message; ``retry`` says whether another attempt may."""

    retry: ClassVar[bool] = True


class Transient(DeliveryError):
    """Worth another attempt: the server is unreachable, busy or timed out."""

    retry = True


class Permanent(DeliveryError):
    """Never worth another attempt: the server or the module rejected the message itself."""

    retry = False


class NoConfig(BaseModel):
    """``module-config`` of a module that takes none."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True, slots=True)
class Message:
    """One webhook as a module sees it: the exact bytes received, and where it came from.

    ``body`` is the payload to write: the bytes received, or the transformed JSON when the
    webhook configures a ``transform``.
    """

    message_id: str
    webhook_id: str
    channel: str
    attempt: int
    envelope: Envelope
    body: bytes

    @classmethod
    def of(cls, message_id: str, attempt: int, envelope: Envelope) -> Message:
        return cls(
            message_id, envelope.webhook_id, envelope.channel, attempt, envelope, envelope.body
        )

    @property
    def headers(self) -> tuple[tuple[str, str], ...]:
        """The headers as received, in order (names as sent, values latin-1)."""
        return self.envelope.headers

    @property
    def header_map(self) -> dict[str, str]:
        """The headers by lower-cased name; a repeated header's values joined by ``", "``."""
        out: dict[str, str] = {}
        for name, value in self.envelope.headers:
            key = name.lower()
            out[key] = f"{out[key]}, {value}" if key in out else value
        return out

    def json(self) -> Any:
        """The body parsed as JSON; :class:`Permanent` when it is not JSON."""
        try:
            return orjson.loads(self.body)
        except orjson.JSONDecodeError as exc:
            raise Permanent(f"the body is not JSON: {exc}") from None

    def json_or_none(self) -> Any:
        """The body parsed as JSON, or None when it is not JSON."""
        try:
            return orjson.loads(self.body)
        except orjson.JSONDecodeError:
            return None

    def metadata(self) -> dict[str, Any]:
        """What modules that carry metadata beside the body attach (headers, ids, times)."""
        envelope = self.envelope
        return {
            "message_id": self.message_id,
            "webhook_id": self.webhook_id,
            "channel": self.channel,
            "received_at": envelope.received_at,
            "method": envelope.method,
            "path": envelope.path,
            "query_string": envelope.query_string,
            "headers": [list(pair) for pair in envelope.headers],
        }


@dataclass
class Pools:
    """Clients shared per named connection, opened on first use and closed together."""

    # Not in the repr: a key or a client may hold connection settings, passwords included.
    _clients: dict[str, Any] = field(default_factory=dict, repr=False)
    _closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list, repr=False)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)

    async def get(
        self,
        key: str,
        open_client: Callable[[], Awaitable[T]],
        close: Callable[[T], Awaitable[None]],
    ) -> T:
        """The client under ``key`` (e.g. ``"postgresql:pg_main"``), opened once."""
        async with self._lock:
            if key not in self._clients:
                client = await open_client()
                self._clients[key] = client
                self._closers.append(lambda: close(client))
            found: T = self._clients[key]
            return found

    def forget(self, key: str) -> None:
        """Drop a broken client so the next ``get`` opens a new one (its closer still runs)."""
        self._clients.pop(key, None)

    async def aclose(self) -> None:
        closers, self._closers = self._closers, []
        self._clients.clear()
        for close in reversed(closers):
            try:
                await close()
            except Exception:  # closing the rest matters more
                logger.warning("closing a module client failed", exc_info=True)


class Module(Generic[ConfigT]):
    """Base of every output module. Subclasses set ``name``, ``Config`` and, when they talk to
    a server, ``connection_types`` (the ``connections.json`` types they accept)."""

    name: ClassVar[str]
    Config: ClassVar[type[BaseModel]] = NoConfig
    connection_types: ClassVar[frozenset[str]] = frozenset()
    # Whether a ``connection`` (or connection keys in module-config) is required.
    needs_connection: ClassVar[bool] = False

    def __init__(self, config: ConfigT, connection: ConnectionEntry | None, pools: Pools) -> None:
        self.config = config
        self.connection = connection
        self.pools = pools

    @property
    def connection_settings(self) -> dict[str, Any]:
        """The named connection's keys (``type`` excluded), or nothing."""
        if self.connection is None:
            return {}
        return {k: v for k, v in self.connection.model_dump().items() if k != "type"}

    async def start(self) -> None:
        """Set up once per configuration (connect, declare, create a table). A server that is
        down is not an error here: ``deliver`` raises :class:`Transient` until it is back."""

    async def deliver(self, message: Message) -> None:
        """Write ``message``; return only once the server confirmed it."""
        raise NotImplementedError

    async def aclose(self) -> None:
        """Release what ``start`` and ``deliver`` opened (pooled clients close with the pools)."""
