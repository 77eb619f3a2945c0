"""Secrets never reach logs: every emitted line is masked on its way to a handler.

Masked: the values of credential headers (however they are printed: ``name: value``, uvicorn's
trace dumps of ``(b'name', b'value')`` pairs, ``"name": "value"``), credential query parameters,
and, literally, every secret configured in ``webhooks.json``. Only log lines change; the relayed
request is stored and delivered untouched.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from typing import Any

from webhook_connect.shared.config import Webhook

MASK = "***"
SECRET_HEADERS = (
    "authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key",
    "x-auth-token", "x-access-token", "api-key", "x-hub-signature", "x-hub-signature-256",
    "stripe-signature", "x-slack-signature", "x-shopify-hmac-sha256", "webhook-signature",
    "svix-signature", "x-recaptcha-token", "x-webhook-signature", "x-signature",
)  # fmt: skip
SECRET_PARAMETERS = (
    "token", "access_token", "api_key", "apikey", "key", "secret", "password", "signature",
    "sig", "auth_token", "client_secret",
)  # fmt: skip
# Config keys whose string values are secrets, wherever they sit in an entry.
SECRET_KEYS = frozenset(
    {
        "secret", "password", "api_key", "channel_token", "client_secret", "consumer_secret",
        "token_secret", "secret_key", "jwt_secret", "authorization",
    }
)  # fmt: skip
# In connections.json a URL or DSN may hold a password too.
CONNECTION_SECRET_KEYS = SECRET_KEYS | {
    "aws_secret_access_key", "aws_session_token", "sasl_plain_password", "pass", "url", "dsn",
}  # fmt: skip
MIN_LITERAL = 4  # shorter "secrets" would mask ordinary words


def _header_pattern(names: Iterable[str]) -> re.Pattern[str]:
    alternatives = "|".join(re.escape(name) for name in sorted(names, key=len, reverse=True))
    return re.compile(
        # name, then a separator as printed by str(), repr() of bytes pairs or JSON, then value
        rf"(?i)(\b(?:{alternatives})\b['\"]?\s*(?::|,|=)\s*(?-i:b)?['\"]?)([^'\"\r\n)}}&]+)"
    )


HEADER_VALUES = _header_pattern(SECRET_HEADERS)
QUERY_VALUES = re.compile(rf"(?i)([?&;\s](?:{'|'.join(SECRET_PARAMETERS)})=)([^&\s\"']+)")


def configured_secrets(webhooks: Mapping[str, Webhook]) -> list[str]:
    """Every secret string of the configuration, longest first."""
    found: set[str] = set()
    for webhook in webhooks.values():
        _collect(webhook.entry.model_dump(by_alias=True), found, under_secret=False)
        for step in webhook.plan.steps if webhook.plan else ():
            if step.connection is not None:  # the connections.json entries in use
                _collect(step.connection.model_dump(), found, False, CONNECTION_SECRET_KEYS)
    return sorted((item for item in found if len(item) >= MIN_LITERAL), key=len, reverse=True)


def _collect(
    node: Any, found: set[str], under_secret: bool, keys: frozenset[str] = SECRET_KEYS
) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            _collect(value, found, under_secret or key in keys, keys)
    elif isinstance(node, list):
        for item in node:
            _collect(item, found, under_secret, keys)
    elif isinstance(node, str) and under_secret:
        found.add(node)
        # "Bearer <token>": the token alone may appear too.
        if " " in node:
            found.add(node.split(" ", 1)[1])


class SecretMasker(logging.Filter):
    """A handler filter that masks credentials in the final text of every record."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self.set_secrets(secrets)

    def set_secrets(self, secrets: Iterable[str]) -> None:
        """Replace the literal secrets (after a configuration reload)."""
        items = sorted({item for item in secrets if len(item) >= MIN_LITERAL}, key=len)
        self._literals = (
            re.compile("|".join(re.escape(item) for item in reversed(items))) if (items) else None
        )

    def mask(self, text: str) -> str:
        """``text`` with every credential replaced by ``***``."""
        if self._literals is not None:
            text = self._literals.sub(MASK, text)
        text = HEADER_VALUES.sub(rf"\g<1>{MASK}", text)
        return QUERY_VALUES.sub(rf"\g<1>{MASK}", text)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = self.mask(message)
        if masked != message:
            record.msg, record.args = masked, None
        if record.exc_info and not record.exc_text:
            record.exc_text = self.mask(logging.Formatter().formatException(record.exc_info))
        # Structured events (cloud/logs.py) carry their values beside the message.
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            record.fields = {
                key: self.mask(value) if isinstance(value, str) else value
                for key, value in fields.items()
            }
        return True


def install(masker: SecretMasker) -> None:
    """Put ``masker`` on every handler of the root and uvicorn loggers."""
    for name in ("", "uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi"):
        for handler in logging.getLogger(name).handlers:
            if masker not in handler.filters:
                handler.addFilter(masker)
