"""The cloud's configuration: one typed object built at the edge (the CLI) and passed in."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from webhook_connect.cloud.buffers import ChannelSpec
from webhook_connect.cloud.publicurl import validate_public_url
from webhook_connect.cloud.security.guard import OFFLINE, build_guards
from webhook_connect.shared.config import Webhook, load_connections, load_webhooks
from webhook_connect.shared.exceptions import ConfigError
from webhook_connect.shared.limits import ChannelLimits, limit_values

DEFAULT_STORAGE = "sqlite:///webhook-connect.db"
STORAGE_SCHEMES = (
    "sqlite:///",
    "redis://",
    "rediss://",
    "unix://",
    "amqp://",
    "amqps://",
    "redis+cluster://",  # docs/STORAGE-REDIS-CLUSTER.md
    "rediss+cluster://",
)
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
LOG_FORMATS = ("auto", "json", "text")  # auto: text on a terminal, JSON lines elsewhere
# Slow and idle client connections (cloud/connections.py).
DEFAULT_HEADER_TIMEOUT = 10.0
DEFAULT_BODY_TIMEOUT = 30.0
DEFAULT_MAX_OPEN = 1000
# Handed to uvicorn's worker processes, which rebuild the config from it.
CONFIG_ENV = "WEBHOOK_CONNECT_INTERNAL_CLOUD_CONFIG"


@dataclass(frozen=True)
class CloudConfig:
    """Everything ``webhook-connect cloud`` needs; validated before anything starts."""

    host: str = "127.0.0.1"
    port: int = 8000
    webhooks_path: str | None = None
    connections_path: str | None = None
    storage_url: str = DEFAULT_STORAGE
    admin_token: str | None = None
    workers: int = 1
    log_level: str = "info"
    log_format: str = "auto"
    # The address providers post to (a proxy in front); None: derived from requests.
    public_url: str | None = None
    # /openapi.json and /docs for anyone; otherwise only with the admin token.
    public_docs: bool = False
    # Slow and idle client connections (cloud/connections.py): seconds, and connections per
    # process (lowered at start-up if the descriptor limit cannot hold them).
    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    body_timeout: float = DEFAULT_BODY_TIMEOUT
    max_open_connections: int = DEFAULT_MAX_OPEN
    webhooks: Mapping[str, Webhook] = field(default_factory=dict)

    def channels(self) -> dict[str, ChannelSpec]:
        """Channels named in ``webhooks.json``, with their limits."""
        specs: dict[str, ChannelSpec] = {}
        for webhook in self.webhooks.values():
            relay = webhook.relay
            specs[relay.channel] = channel_spec(relay.channel, relay)
        return specs

    def to_environment(self) -> str:
        """Serialise the options (not the loaded files) for worker processes."""
        options = dataclasses.asdict(self)
        del options["webhooks"]
        return orjson.dumps(options).decode()


def channel_spec(name: str, limits: ChannelLimits) -> ChannelSpec:
    """Channel ``name`` as storage keeps it, with ``limits`` (shared/limits.py)."""
    return ChannelSpec(name=name, **limit_values(limits))


def _check_storage(storage: str) -> None:
    """Refuse a storage URL no backend takes, or an ``amqp://`` one without its registry."""
    if not storage.startswith(STORAGE_SCHEMES):
        raise ConfigError(
            "--storage", "", f"unsupported URL {storage!r}: use sqlite:///FILE or redis://HOST:PORT"
        )
    if storage.startswith(("amqp://", "amqps://")):
        from webhook_connect.cloud.buffers.rabbitmq import split_url

        try:
            split_url(storage)  # RabbitMQ needs its companion registry store
        except ValueError as exc:
            raise ConfigError("--storage", "registry", str(exc)) from None
    if storage.startswith(("redis+cluster://", "rediss+cluster://")):
        from webhook_connect.cloud.buffers.resp_cluster import parse_cluster_url

        try:
            parse_cluster_url(storage)  # the nodes themselves are checked at start-up
        except ValueError as exc:
            raise ConfigError("--storage", "", str(exc)) from None


def _check_redis_url(storage: str) -> None:
    """Refuse a Redis URL no client of ours can use (an unknown option, a CA file that does not
    load) now, in one line, rather than in every request. RabbitMQ's registry may be one; a
    cluster URL's options are those of each node's URL."""
    where = ""
    if storage.startswith(("amqp://", "amqps://")):
        from webhook_connect.cloud.buffers.rabbitmq import split_url

        where, storage = "registry", split_url(storage)[1]  # checked by _check_storage
    if storage.startswith(("redis+cluster://", "rediss+cluster://")):
        from webhook_connect.cloud.buffers.resp_cluster import parse_cluster_url

        cluster = parse_cluster_url(storage)  # checked by _check_storage
        storage = cluster.node_url(cluster.nodes[0])
    if not storage.startswith(("redis://", "rediss://", "unix://")):
        return
    from webhook_connect.cloud.buffers.redisurl import RedisUrlError, parse_redis_url

    try:
        parse_redis_url(storage)
    except RedisUrlError as exc:
        key = ".".join(part for part in (where, exc.key) if part)
        raise ConfigError("--storage", key, exc.reason) from None


def build_cloud_config(
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    webhooks_path: str | None = None,
    connections_path: str | None = None,
    storage_url: str | None = None,
    admin_token: str | None = None,
    workers: int = 1,
    log_level: str = "info",
    log_format: str = "auto",
    public_url: str | None = None,
    public_docs: bool = False,
    header_timeout: float = DEFAULT_HEADER_TIMEOUT,
    body_timeout: float = DEFAULT_BODY_TIMEOUT,
    max_open_connections: int = DEFAULT_MAX_OPEN,
    environ: Mapping[str, str] | None = None,
) -> CloudConfig:
    """Validate options and load the files they name; raise :class:`ConfigError` on a problem."""
    storage = storage_url or DEFAULT_STORAGE
    _check_storage(storage)
    _check_redis_url(storage)
    if not 0 < port < 65536:
        raise ConfigError("--port", "", f"{port} is not a TCP port")
    if workers < 1:
        raise ConfigError("--workers", "", "must be at least 1")
    if log_level.lower() not in LOG_LEVELS:
        raise ConfigError("--log-level", "", f"must be one of {', '.join(LOG_LEVELS)}")
    if log_format.lower() not in LOG_FORMATS:
        raise ConfigError("--log-format", "", f"must be one of {', '.join(LOG_FORMATS)}")
    if admin_token is not None and len(admin_token) < 16:
        raise ConfigError("--admin-token", "", "must be at least 16 characters")
    if public_url is not None:
        public_url = validate_public_url(public_url)
    for flag, seconds in (("--header-timeout", header_timeout), ("--body-timeout", body_timeout)):
        if not 0 < seconds < math.inf:  # NaN fails too
            raise ConfigError(flag, "", f"{seconds} is not a positive number of seconds")
    if max_open_connections < 1:
        raise ConfigError("--max-open-connections", "", "must be at least 1")
    connections = load_connections(connections_path, environ)
    webhooks = {} if webhooks_path is None else load_webhooks(webhooks_path, connections, environ)
    # Compile every check now, so a key no check can use (a malformed PEM key) stops start-up.
    build_guards(webhooks, OFFLINE, webhooks_path or "webhooks.json")
    return CloudConfig(
        host=host,
        port=port,
        webhooks_path=webhooks_path,
        connections_path=connections_path,
        storage_url=storage,
        admin_token=admin_token,
        workers=workers,
        log_level=log_level.lower(),
        log_format=log_format.lower(),
        public_url=public_url,
        public_docs=public_docs,
        header_timeout=header_timeout,
        body_timeout=body_timeout,
        max_open_connections=max_open_connections,
        webhooks=webhooks,
    )


def config_from_environment() -> CloudConfig:
    """Rebuild the config in a uvicorn worker from what the parent process validated."""
    options = orjson.loads(os.environ[CONFIG_ENV])
    for key in ("webhooks_path", "connections_path"):
        if options[key] is not None:
            options[key] = str(Path(options[key]))
    return build_cloud_config(**options)
