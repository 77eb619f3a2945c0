"""Configuration files in the Core Webhook Module's formats, validated at the edge."""

from webhook_connect.shared.config.connections import ConnectionEntry, load_connections
from webhook_connect.shared.config.loading import load_json_file
from webhook_connect.shared.config.webhooks import (
    Webhook,
    WebhookConnectSettings,
    WebhookEntry,
    load_webhooks,
)

__all__ = [
    "ConnectionEntry",
    "Webhook",
    "WebhookConnectSettings",
    "WebhookEntry",
    "load_connections",
    "load_json_file",
    "load_webhooks",
]
