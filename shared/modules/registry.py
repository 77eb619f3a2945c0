"""The output modules by name, imported only when a configuration names them.

A module whose driver is not installed fails at start-up (exit 2) with the extra to install,
and only when it is configured: a connector that writes to PostgreSQL never needs aiokafka.
"""

from __future__ import annotations

import importlib
from typing import Any

from webhook_connect.shared.exceptions import ModuleError
from webhook_connect.shared.modules.base import Module

# name -> ("python.module:Class", the extra that installs its driver, or None if none needed)
MODULES: dict[str, tuple[str, str | None]] = {
    "log": ("webhook_connect.shared.modules.log:LogModule", None),
    "save_to_disk": ("webhook_connect.shared.modules.disk:SaveToDiskModule", None),
    "http_webhook": ("webhook_connect.shared.modules.http:HttpWebhookModule", "http"),
    "rabbitmq": ("webhook_connect.shared.modules.rabbitmq:RabbitMQModule", "rabbitmq"),
    "redis_rq": ("webhook_connect.shared.modules.redis:RedisRQModule", "redis"),
    "redis_publish": ("webhook_connect.shared.modules.redis:RedisPublishModule", "redis"),
    "postgresql": ("webhook_connect.shared.modules.postgresql:PostgreSQLModule", "postgresql"),
    "mysql": ("webhook_connect.shared.modules.mysql:MySQLModule", "mysql"),
    "mariadb": ("webhook_connect.shared.modules.mysql:MySQLModule", "mysql"),
    "clickhouse": ("webhook_connect.shared.modules.clickhouse:ClickHouseModule", "clickhouse"),
    "kafka": ("webhook_connect.shared.modules.kafka:KafkaModule", "kafka"),
    "s3": ("webhook_connect.shared.modules.s3:S3Module", "aws"),
    "aws_sqs": ("webhook_connect.shared.modules.sqs:SQSModule", "aws"),
    "mqtt": ("webhook_connect.shared.modules.mqtt:MQTTModule", "mqtt"),
    "websocket": ("webhook_connect.shared.modules.websocket:WebSocketModule", "websocket"),
    "zeromq": ("webhook_connect.shared.modules.zeromq:ZeroMQModule", "zeromq"),
    "activemq": ("webhook_connect.shared.modules.activemq:ActiveMQModule", None),
    "gcp_pubsub": ("webhook_connect.shared.modules.gcp_pubsub:PubSubModule", "gcp"),
}


class MissingDriver(ModuleError):
    """The module is configured but its driver is not installed."""

    def __init__(self, name: str, extra: str | None, missing: str) -> None:
        self.name, self.extra, self.missing = name, extra, missing
        install = f"install webhook-connect[{extra}]" if extra else "reinstall webhook-connect"
        super().__init__(f"module {name!r} needs {missing!r}, which is not installed: {install}")


class UnknownModule(ModuleError):
    """No module has this name."""


def module_class(name: str) -> type[Module[Any]]:
    """The class of module ``name``, importing it (and its driver) now."""
    try:
        target, extra = MODULES[name]
    except KeyError:
        known = ", ".join(sorted(MODULES))
        raise UnknownModule(f"unknown module {name!r} (known: {known}, chain)") from None
    path, _, attribute = target.partition(":")
    try:
        loaded = importlib.import_module(path)
    except ModuleNotFoundError as exc:
        if exc.name and not exc.name.startswith("shared."):
            raise MissingDriver(name, extra, exc.name) from None
        raise
    cls: type[Module[Any]] = getattr(loaded, attribute)
    return cls
