"""``mqtt``: publish each webhook to an MQTT broker (3.1.1 or 5) with aiomqtt.

The payload is the exact body received. Over MQTT 5 the metadata travels as user properties
(and the original content type as the Content Type property); MQTT 3.1.1 has no headers, so
there the payload is the body alone unless ``envelope`` wraps body and metadata in JSON.

QoS 1 and 2 return once the broker acknowledged (PUBACK / PUBCOMP). An MQTT 5 broker that
refuses a QoS 1 publish says so in the PUBACK's reason code (0x87 not authorized, 0x97 quota
exceeded ...): aiomqtt drops that code, so :class:`ConfirmingClient` keeps it. At QoS 2 the
refusal is in the PUBREC, which paho-mqtt ignores: use QoS 1 where refusals must surface. QoS 0
returns once the packet is written to the socket: nothing more is knowable.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Any, ClassVar, Literal

import aiomqtt
import orjson
import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator

from webhook_connect.shared.config.connections import ConnectionEntry
from webhook_connect.shared.modules import attributes
from webhook_connect.shared.modules.attributes import json_envelope
from webhook_connect.shared.modules.base import Message, Module, Permanent, Pools, Transient

logger = logging.getLogger("webhook_connect.modules.mqtt")

# An MQTT string (topic, user property) is at most 65535 bytes of UTF-8.
MQTT_STRING_MAX = 65535
VERSIONS = {
    "3.1": aiomqtt.ProtocolVersion.V31,
    "3.1.1": aiomqtt.ProtocolVersion.V311,
    "5": aiomqtt.ProtocolVersion.V5,
    "5.0": aiomqtt.ProtocolVersion.V5,
}


def _check_topic(value: str | None) -> str | None:
    """A topic one can publish to (spec 4.7): no wildcards, no NUL, not a ``$`` system topic."""
    if value is None:
        return None
    if not value or len(value.encode()) > MQTT_STRING_MAX:
        raise ValueError("must be 1 to 65535 bytes of UTF-8")
    if any(char in value for char in "+#\x00"):
        raise ValueError("cannot contain the wildcards + or #, or NUL")
    if value.startswith("$"):
        raise ValueError("topics starting with '$' are reserved for the broker")
    return value


class MQTTConfig(BaseModel):
    """``module-config`` of ``mqtt`` (the Core Webhook Module's keys, plus ``envelope``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    topic: str
    topic_prefix: str | None = None
    qos: Literal[0, 1, 2] = 1
    retained: bool = Field(default=False, validation_alias=AliasChoices("retained", "retain"))
    # Accepted for compatibility: the body is always published as received, which for a
    # JSON webhook is the JSON itself.
    format: Literal["json", "raw"] = "raw"
    # Publish {"payload" | "body_base64", "message_id", ..., "headers"} instead of the body
    # alone: for MQTT 3.1.1 consumers that need the metadata.
    envelope: bool = False
    timeout_seconds: float = Field(default=10.0, gt=0)

    _topics = field_validator("topic", "topic_prefix")(_check_topic)

    @property
    def full_topic(self) -> str:
        if self.topic_prefix is None:
            return self.topic
        return f"{self.topic_prefix.rstrip('/')}/{self.topic.lstrip('/')}"


class MQTTSettings(BaseModel):
    """The ``connections.json`` entry (the Core Webhook Module's keys)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = "localhost"
    port: int = Field(default=1883, ge=1, le=65535)
    username: str | None = Field(default=None, validation_alias=AliasChoices("username", "user"))
    password: str | None = Field(default=None, validation_alias=AliasChoices("password", "pass"))
    # None: a random identifier, so replicas of a connector never take over each other's session.
    client_id: str | None = None
    keepalive: int = Field(default=60, ge=1, le=65535)
    mqtt_version: Literal["3.1", "3.1.1", "5", "5.0"] = "3.1.1"
    tls: bool = False
    tls_ca_cert_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_insecure: bool = False
    connect_timeout: float = Field(default=10.0, gt=0)

    @property
    def is_v5(self) -> bool:
        return VERSIONS[self.mqtt_version] is aiomqtt.ProtocolVersion.V5

    def tls_context(self) -> ssl.SSLContext | None:
        if not self.tls:
            return None
        context = ssl.create_default_context(cafile=self.tls_ca_cert_file)
        if self.tls_cert_file is not None:
            context.load_cert_chain(self.tls_cert_file, self.tls_key_file)
        if self.tls_insecure:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    def client(self) -> ConfirmingClient:
        return ConfirmingClient(
            self.host,
            self.port,
            username=self.username,
            password=self.password,
            identifier=self.client_id,
            protocol=VERSIONS[self.mqtt_version],
            keepalive=self.keepalive,
            tls_context=self.tls_context(),
            timeout=self.connect_timeout,
        )


class ConfirmingClient(aiomqtt.Client):
    """An aiomqtt client whose publish reports the broker's reason code, and which knows when
    its connection is gone (it is then replaced, never reconnected: aiomqtt clients are not)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._outcomes: dict[int, asyncio.Future[ReasonCode]] = {}
        self.is_lost = False

    async def publish_confirmed(
        self, topic: str, payload: bytes, qos: int, retain: bool, properties: Properties | None
    ) -> ReasonCode | None:
        """Publish; the reason code of the PUBACK / PUBCOMP (None for QoS 0, once written)."""
        info = self._client.publish(topic, payload, qos, retain, properties)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise aiomqtt.MqttCodeError(info.rc, "Could not publish message")
        if info.is_published():
            return None
        outcome = asyncio.get_running_loop().create_future()
        self._outcomes[info.mid] = outcome
        try:
            reason = await outcome
        finally:
            self._outcomes.pop(info.mid, None)
        return None if qos == 0 else reason

    def _on_publish(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties,
    ) -> None:
        outcome = self._outcomes.get(mid)
        if outcome is not None and not outcome.done():
            outcome.set_result(reason_code)
        super()._on_publish(client, userdata, mid, reason_code, properties)

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None = None,
    ) -> None:
        self.is_lost = True
        for outcome in self._outcomes.values():
            if not outcome.done():
                outcome.set_exception(aiomqtt.MqttError(f"disconnected: {reason_code}"))
        super()._on_disconnect(client, userdata, flags, reason_code, properties)


class MQTTLink:
    """One MQTT session per named connection, replaced by the first caller after it was lost."""

    def __init__(self, settings: MQTTSettings) -> None:
        self._settings = settings
        self._client: ConfirmingClient | None = None
        self._lock = asyncio.Lock()

    async def client(self) -> ConfirmingClient:
        async with self._lock:
            client = self._client
            if client is None or client.is_lost:
                if client is not None:
                    await self.discard(client)
                client = self._settings.client()
                await client.__aenter__()  # connects; the link owns the session from here
                self._client = client
            return client

    async def discard(self, client: ConfirmingClient) -> None:
        """Drop ``client`` (overdue, or lost): the next caller connects afresh."""
        if self._client is client:
            self._client = None
        client.is_lost = True
        try:
            await client.__aexit__(None, None, None)
        except (aiomqtt.MqttError, OSError):
            pass  # already gone: nothing left to close

    async def aclose(self) -> None:
        if self._client is not None:
            await self.discard(self._client)


class MQTTModule(Module[MQTTConfig]):
    """Publishes the body to a topic with the configured QoS and retain flag."""

    name: ClassVar[str] = "mqtt"
    Config: ClassVar[type[BaseModel]] = MQTTConfig
    connection_types: ClassVar[frozenset[str]] = frozenset({"mqtt"})
    needs_connection: ClassVar[bool] = True

    def __init__(
        self, config: MQTTConfig, connection: ConnectionEntry | None, pools: Pools
    ) -> None:
        super().__init__(config, connection, pools)
        self._settings = MQTTSettings.model_validate(self.connection_settings)

    async def start(self) -> None:
        try:
            await (await self._link()).client()
        except (aiomqtt.MqttError, OSError) as exc:
            logger.warning("mqtt: not reachable yet, deliveries will retry: %s", exc)

    async def deliver(self, message: Message) -> None:
        config = self.config
        link = await self._link()
        client: ConfirmingClient | None = None
        try:
            client = await link.client()
            async with asyncio.timeout(config.timeout_seconds):
                reason = await client.publish_confirmed(
                    config.full_topic,
                    json_envelope(message) if config.envelope else message.body,
                    config.qos,
                    config.retained,
                    user_properties(message) if self._settings.is_v5 else None,
                )
        except ValueError as exc:  # paho's own checks: payload over 256 MiB, a bad topic
            raise Permanent(f"MQTT cannot carry the message: {exc}") from exc
        except (aiomqtt.MqttError, OSError, TimeoutError) as exc:
            if client is not None:  # an overdue acknowledgement: the session may be dead
                await link.discard(client)
            raise Transient(f"MQTT broker unreachable: {exc!r}") from exc
        if reason is not None and reason.is_failure:
            raise Permanent(f"the MQTT broker refused the message: {reason} ({reason.value:#x})")

    async def _link(self) -> MQTTLink:
        settings = orjson.dumps(self._settings.model_dump(), option=orjson.OPT_SORT_KEYS)
        return await self.pools.get(
            f"mqtt:{settings.decode()}", lambda: _open_link(self._settings), MQTTLink.aclose
        )


async def _open_link(settings: MQTTSettings) -> MQTTLink:
    return MQTTLink(settings)  # connects on first use


def user_properties(message: Message) -> Properties:
    """MQTT 5 PUBLISH properties: the metadata as user properties under the names every module
    uses (``attributes``), and the original content type."""
    pairs = {
        **attributes.message_attributes(message),
        **attributes.fitting_headers(message, MQTT_STRING_MAX, "MQTT string limit"),
    }
    properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    properties.UserProperty = list(pairs.items())
    content_type = message.header_map.get("content-type")
    if content_type is not None and len(content_type.encode()) <= MQTT_STRING_MAX:
        properties.ContentType = content_type
    return properties
