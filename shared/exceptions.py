"""The exception tree of Webhook Connect.

WebhookConnectError
├── ConfigError              bad configuration file, flag or environment variable (exit 2)
└── StorageError              anything the storage backend reports
    ├── StorageUnavailable   the backend cannot be reached (ingest answers 503)
    ├── ChannelFull          max_queue_size reached (ingest answers 503)
    └── UnknownChannel       the channel is not provisioned
"""

from __future__ import annotations


class WebhookConnectError(Exception):
    """Root of every error this project raises on purpose."""


class ConfigError(WebhookConnectError):
    """A configuration source is wrong; ``str()`` names file, key path and reason."""

    def __init__(self, source: str, key_path: str, reason: str) -> None:
        self.source = source
        self.key_path = key_path
        self.reason = reason
        where = f"{source}: {key_path}" if key_path else source
        super().__init__(f"{where}: {reason}")


class StorageError(WebhookConnectError):
    """The storage backend refused or failed an operation."""

    retry_after: int = 1


class StorageUnavailable(StorageError):
    """The backend cannot be reached right now; the caller should retry."""


class ChannelFull(StorageError):
    """The channel holds ``max_queue_size`` messages; the sender should retry later."""

    def __init__(self, channel: str, limit: int) -> None:
        self.channel = channel
        self.limit = limit
        super().__init__(f"channel {channel!r} is full ({limit} messages)")


class UnknownChannel(StorageError):
    """The channel has not been provisioned."""

    def __init__(self, channel: str) -> None:
        self.channel = channel
        super().__init__(f"unknown channel {channel!r}")
