"""``log``: write each message to stdout as one JSON line (or indented, for a person).

Sensitive keys in the payload and credential headers are redacted by default; JSON encoding
escapes control characters, so a payload cannot forge log lines. Output is capped per message.
"""

from __future__ import annotations

import base64
import sys
from typing import Any, ClassVar

import orjson
from pydantic import BaseModel, ConfigDict, PositiveInt

from webhook_connect.shared.modules.base import Message, Module

REDACTED = "[REDACTED]"
SENSITIVE = frozenset(
    {
        "password",
        "passwd",
        "pwd",
        "secret",
        "token",
        "api_key",
        "apikey",
        "access_token",
        "refresh_token",
        "authorization",
        "auth",
        "credential",
        "credentials",
        "private_key",
        "session",
        "cookie",
        "set-cookie",
        "database_url",
        "connection_string",
        "client_secret",
        "proxy-authorization",
        "x-api-key",
    }
)
MAX_DEPTH = 10


class LogConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    pretty_print: bool = False
    redact_sensitive: bool = True
    include_headers: bool = True
    max_length: PositiveInt = 10_000


class LogModule(Module[LogConfig]):
    name = "log"
    Config: ClassVar[type[BaseModel]] = LogConfig

    async def deliver(self, message: Message) -> None:
        config = self.config
        record: dict[str, Any] = {
            "message_id": message.message_id,
            "webhook_id": message.webhook_id,
        }
        if config.include_headers:
            record["headers"] = {
                name: REDACTED if config.redact_sensitive and name.lower() in SENSITIVE else value
                for name, value in message.headers
            }
        payload = message.json_or_none()
        if payload is None and message.body.strip() != b"null":
            try:
                record["body"] = message.body.decode("utf-8")
            except UnicodeDecodeError:
                record["body_base64"] = base64.b64encode(message.body).decode()
        else:
            record["payload"] = _redact(payload, 0) if config.redact_sensitive else payload
        option = orjson.OPT_INDENT_2 if config.pretty_print else 0
        text = orjson.dumps(record, option=option).decode()
        if len(text) > config.max_length:
            text = text[: config.max_length] + f"... [{len(text) - config.max_length} more]"
        sys.stdout.write(text + "\n")
        sys.stdout.flush()


def _redact(value: Any, depth: int) -> Any:
    if depth >= MAX_DEPTH:
        return "[TOO DEEP]" if isinstance(value, dict | list) else value
    if isinstance(value, dict):
        return {
            k: REDACTED if str(k).lower() in SENSITIVE else _redact(v, depth + 1)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_redact(v, depth + 1) for v in value]
    return value
