"""``activemq``: send each webhook to an ActiveMQ queue or topic over STOMP 1.2.

The body is the exact bytes received, framed by ``content-length`` (ActiveMQ makes it a
BytesMessage, NULs and all); the metadata travels as STOMP headers (JMS properties for Java
consumers). Every SEND carries a ``receipt`` header and ``deliver`` returns only on the broker's
RECEIPT, which ActiveMQ sends after a persistent message is in its store.
"""

from __future__ import annotations

import logging
import ssl
from typing import ClassVar, Literal

import orjson
from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from webhook_connect.shared.config.connections import ConnectionEntry
from webhook_connect.shared.modules import attributes
from webhook_connect.shared.modules.base import Message, Module, Permanent, Pools, Transient
from webhook_connect.shared.modules.stomp import StompClient, StompError

logger = logging.getLogger("webhook_connect.modules.activemq")

DESTINATION_PATTERN = r"^[A-Za-z0-9_.:\-]{1,255}$"
# ActiveMQ ends the session over a header line longer than its maxHeaderLength (10 KiB by
# default), with no receipt-id to say which SEND: every retry would fail the same way. So the
# original headers are left out (and the omission said) when they would not fit.
MAX_HEADER_LINE = 10240
# Carries our message id: STOMP's ``message-id`` header is the broker's own.
MESSAGE_ID = "webhook-connect-message-id"


class ActiveMQConfig(BaseModel):
    """``module-config`` of ``activemq`` (the Core Webhook Module's keys)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    destination: str = Field(pattern=DESTINATION_PATTERN)
    destination_type: Literal["queue", "topic"] = "queue"
    persistent: bool = True
    timeout_seconds: float = Field(default=10.0, gt=0)

    @property
    def address(self) -> str:
        return f"/{self.destination_type}/{self.destination}"


class ActiveMQSettings(BaseModel):
    """The ``connections.json`` entry."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = "localhost"
    port: int = Field(default=61613, ge=1, le=65535)
    username: str | None = Field(default=None, validation_alias=AliasChoices("username", "user"))
    password: str | None = Field(default=None, validation_alias=AliasChoices("password", "pass"))
    use_ssl: bool = Field(default=False, validation_alias=AliasChoices("use_ssl", "ssl"))
    # The STOMP ``host`` header (a virtual host on brokers that have them); defaults to host.
    virtual_host: str | None = None
    connect_timeout: float = Field(default=10.0, gt=0)

    def client(self) -> StompClient:
        return StompClient(
            self.host,
            self.port,
            login=self.username,
            passcode=self.password,
            virtual_host=self.virtual_host,
            tls=ssl.create_default_context() if self.use_ssl else None,
            connect_timeout=self.connect_timeout,
        )


class ActiveMQModule(Module[ActiveMQConfig]):
    """Sends the body to a queue or topic, persistent by default, confirmed by receipt."""

    name: ClassVar[str] = "activemq"
    Config: ClassVar[type[BaseModel]] = ActiveMQConfig
    connection_types: ClassVar[frozenset[str]] = frozenset({"activemq"})
    needs_connection: ClassVar[bool] = True

    def __init__(
        self, config: ActiveMQConfig, connection: ConnectionEntry | None, pools: Pools
    ) -> None:
        super().__init__(config, connection, pools)
        self._settings = ActiveMQSettings.model_validate(self.connection_settings)

    async def start(self) -> None:
        try:
            await (await self._client()).connect()
        except (OSError, TimeoutError) as exc:
            logger.warning("activemq: not reachable yet, deliveries will retry: %r", exc)

    async def deliver(self, message: Message) -> None:
        client = await self._client()
        try:
            await client.send(
                self.config.address,
                message.body,
                stomp_headers(message, persistent=self.config.persistent),
                receipt_timeout=self.config.timeout_seconds,
            )
        except StompError as exc:
            raise Permanent(f"ActiveMQ refused the message: {exc}") from exc
        except (OSError, TimeoutError) as exc:
            raise Transient(f"ActiveMQ is unreachable: {exc!r}") from exc

    async def _client(self) -> StompClient:
        settings = orjson.dumps(self._settings.model_dump(), option=orjson.OPT_SORT_KEYS)
        return await self.pools.get(
            f"activemq:{settings.decode()}",
            lambda: _open_client(self._settings),
            StompClient.aclose,
        )


async def _open_client(settings: ActiveMQSettings) -> StompClient:
    return settings.client()  # connects on first use


def stomp_headers(message: Message, *, persistent: bool) -> list[tuple[str, str]]:
    """SEND headers: delivery mode, the original content type, and the metadata under the names
    every module uses (``attributes``), but for the message id: ``message-id`` is the broker's."""
    fields = attributes.message_attributes(message)
    fields[MESSAGE_ID] = fields.pop(attributes.MESSAGE_ID)
    # Escaping makes each ':' and '\\' of the JSON two bytes on the wire.
    value = attributes.headers_json(message)
    room = MAX_HEADER_LINE - len(attributes.HEADERS) - 1 - value.count(":") - value.count("\\")
    fields.update(attributes.fitting_headers(message, room, "ActiveMQ header line limit"))
    headers = [("persistent", "true" if persistent else "false"), *fields.items()]
    content_type = message.header_map.get("content-type")
    if content_type is not None:
        headers.append(("content-type", content_type))
    return headers
