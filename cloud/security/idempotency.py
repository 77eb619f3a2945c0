"""Which delivery a request is, so a provider's retry of it is stored once.

A configured ``idempotency`` (a header, or a dotted path into the JSON body) wins; otherwise a
provider preset names its own delivery id (GitHub's ``X-GitHub-Delivery``, Stripe's event id,
Standard Webhooks' ``webhook-id`` ...). Without either, every request is a new message.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from webhook_connect.cloud.security.inbound import InboundRequest
from webhook_connect.shared.config import WebhookEntry

DEFAULT_WINDOW_SECONDS = 86400.0
MAX_KEY_LENGTH = 512

DeliveryKey = Callable[[InboundRequest], str | None]


def json_path_value(document: Any, path: str) -> Any:
    """The value at ``$.a.b`` / ``a.b`` in ``document``, or None."""
    node = document
    for part in path.removeprefix("$").strip(".").split("."):
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def build_delivery_key(entry: WebhookEntry) -> tuple[DeliveryKey | None, float]:
    """How to name a request's delivery for ``entry``, and for how long a repeat is one."""
    config = entry.idempotency
    if config is not None:
        header, path = config.header, config.json_path

        def configured(request: InboundRequest) -> str | None:
            value: Any = None
            if header is not None:
                value = request.header(header)
            if value is None and path is not None:
                value = json_path_value(request.json(), path)
            return _key(value)

        return configured, config.window_seconds
    if entry.provider is not None:
        from webhook_connect.cloud.security import providers

        provider = entry.provider

        def preset(request: InboundRequest) -> str | None:
            return _key(providers.delivery_id(provider, request))

        return preset, DEFAULT_WINDOW_SECONDS
    return None, 0.0


def _key(value: Any) -> str | None:
    if value is None or isinstance(value, dict | list) or value == "":
        return None
    text = str(value)
    return text if len(text) <= MAX_KEY_LENGTH else None
