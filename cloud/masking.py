"""Secrets never reach logs: every emitted line is masked on its way to a handler.

Masked: the values of credential headers (however they are printed: ``name: value``, uvicorn's
trace dumps of ``(b'name', b'value')`` pairs, ``"name": "value"``), credential query parameters,
and, literally, every secret configured in ``webhooks.json``. Only log lines change; the relayed
request is stored and delivered untouched.
"""

from __future__ import annotations

import logging
import re
import urllib.parse
from collections.abc import Iterable, Mapping
from typing import Any

from webhook_connect.shared.config import Webhook

MASK = "***"
SECRET_HEADERS = (
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
    "x-api-key",
    "x-auth-token",
    "x-access-token",
    "api-key",
    "x-hub-signature",
    "x-hub-signature-256",
    "stripe-signature",
    "x-slack-signature",
    "x-shopify-hmac-sha256",
    "webhook-signature",
    "svix-signature",
    "x-recaptcha-token",
    "x-webhook-signature",
    "x-signature",
)
SECRET_PARAMETERS = (
    "token",
    "access_token",
    "api_key",
    "apikey",
    "key",
    "secret",
    "password",
    "signature",
    "sig",
    "auth_token",
    "client_secret",
)
# Config keys whose string values are secrets, wherever they sit in an entry.
SECRET_KEYS = frozenset(
    {
        "secret",
        "password",
        "api_key",
        "channel_token",
        "client_secret",
        "consumer_secret",
        "token_secret",
        "secret_key",
        "jwt_secret",
        "authorization",
    }
)
# In connections.json a URL or DSN may hold a password too.
CONNECTION_SECRET_KEYS = SECRET_KEYS | {
    "aws_secret_access_key",
    "aws_session_token",
    "sasl_plain_password",
    "pass",
    "url",
    "dsn",
}
MIN_LITERAL = 4  # shorter "secrets" would mask ordinary words


def _header_pattern(names: Iterable[str]) -> re.Pattern[str]:
    alternatives = "|".join(re.escape(name) for name in sorted(names, key=len, reverse=True))
    return re.compile(
        # name, then a separator as printed by str(), repr() of bytes pairs or JSON, then value
        rf"(?i)(\b(?:{alternatives})\b['\"]?\s*(?::|,|=)\s*(?-i:b)?['\"]?)([^'\"\r\n)}}&]+)"
    )


HEADER_VALUES = _header_pattern(SECRET_HEADERS)
# Any ``name=value`` pair of a query string (or of free text); the name is judged after
# percent-decoding and lower-casing (``API%5FKey=`` is ``api_key=`` to the server that reads it).
QUERY_PAIRS = re.compile(r"([?&;\s])([^=&;\s\"'?#]+)=([^&\s\"']+)")


def configured_secrets(webhooks: Mapping[str, Webhook]) -> list[str]:
    """Every secret string of the configuration, longest first."""
    found: set[str] = set()
    for webhook in webhooks.values():
        _collect(webhook.entry.model_dump(by_alias=True), found, under_secret=False)
        for step in webhook.plan.steps if webhook.plan else ():
            if step.connection is not None:  # the connections.json entries in use
                _collect(step.connection.model_dump(), found, False, CONNECTION_SECRET_KEYS)
    return sorted((item for item in found if len(item) >= MIN_LITERAL), key=len, reverse=True)


def configured_names(webhooks: Mapping[str, Webhook]) -> tuple[set[str], set[str]]:
    """The credential query parameters and headers the configuration names, lower-cased:
    ``query_auth.parameter_name`` (``?code=``), ``header_auth.header_name``, the ``hmac``
    header and a reCAPTCHA token header."""
    parameters: set[str] = set()
    headers: set[str] = set()
    for webhook in webhooks.values():
        entry = webhook.entry
        if entry.query_auth is not None:
            parameters.add(entry.query_auth.parameter_name.lower())
        if entry.header_auth is not None:
            headers.add(entry.header_auth.header_name.lower())
        if entry.hmac is not None and entry.provider is None:
            headers.add(entry.hmac.header.lower())
        if entry.recaptcha is not None and entry.recaptcha.token_source == "header":
            headers.add(entry.recaptcha.token_field.lower())
    return parameters, headers


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

    def __init__(
        self,
        secrets: Iterable[str] = (),
        parameters: Iterable[str] = (),
        headers: Iterable[str] = (),
    ) -> None:
        super().__init__()
        self.set_secrets(secrets, parameters, headers)

    def configure(self, webhooks: Mapping[str, Webhook]) -> None:
        """Mask what ``webhooks`` holds and names (at start-up and after a reload)."""
        self.set_secrets(configured_secrets(webhooks), *configured_names(webhooks))

    def set_secrets(
        self,
        secrets: Iterable[str],
        parameters: Iterable[str] = (),
        headers: Iterable[str] = (),
    ) -> None:
        """Replace the literal secrets and the configured credential parameter and header
        names, which are masked beside the fixed lists."""
        items = sorted({item for item in secrets if len(item) >= MIN_LITERAL}, key=len)
        # Case-insensitive: a key compared without case (``case_sensitive: false``) is still
        # the key in capitals, and a near miss of a secret is worth hiding too.
        self._literals = (
            re.compile("|".join(re.escape(item) for item in reversed(items)), re.IGNORECASE)
            if items
            else None
        )
        self._parameters = frozenset(SECRET_PARAMETERS) | {name.lower() for name in parameters}
        extra = {name.lower() for name in headers} - set(SECRET_HEADERS)
        self._headers = _header_pattern({*SECRET_HEADERS, *extra}) if extra else HEADER_VALUES

    def mask(self, text: str) -> str:
        """``text`` with every credential replaced by ``***``."""
        if self._literals is not None:
            text = self._literals.sub(MASK, text)
        text = self._headers.sub(rf"\g<1>{MASK}", text)
        return QUERY_PAIRS.sub(self._mask_pair, text)

    def _mask_pair(self, match: re.Match[str]) -> str:
        name = match.group(2)
        if urllib.parse.unquote_plus(name).lower() not in self._parameters:
            return match.group(0)
        return f"{match.group(1)}{name}={MASK}"

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
