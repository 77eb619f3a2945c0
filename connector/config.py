"""``connector.json``: where to connect and where to deliver, validated before anything starts."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    PrivateAttr,
    field_validator,
    model_validator,
)

from webhook_connect.connector import proxy as proxies
from webhook_connect.connector.routing import MatchConfig, events_text, split_events
from webhook_connect.connector.signing import ResignConfig, SignConfig, Signer
from webhook_connect.connector.tls import check_files
from webhook_connect.shared.config import aliases
from webhook_connect.shared.config.connections import load_connections
from webhook_connect.shared.config.delivery import DeliveryPlan, build_plan, load_plans
from webhook_connect.shared.config.loading import load_json_file, validate_model
from webhook_connect.shared.config.webhooks import CHANNEL_NAME_PATTERN
from webhook_connect.shared.exceptions import ConfigError

Protocol = Literal["websocket", "sse", "long_poll"]
# The keys of a route that delivers by modules instead of a target, as in webhooks_config.
MODULE_ROUTE_KEYS = frozenset(
    {"module", "chain", "connection", "module-config", "chain-config", "retry", "transform"}
    | {"timeout_seconds", "queue_name", "topic"}
)
# Every key may be given as a flag or a WEBHOOK_CONNECT_* variable (connector/flags.py derives
# them from the fields below). Besides the keys, overrides may hold FORWARD_TO:
# ``default_target.url`` (``--forward-to``), the file's other target keys kept.
FORWARD_TO = "forward_to"


def _http_url(value: str, schemes: tuple[str, ...]) -> str:
    parts = urlsplit(value)
    if parts.scheme not in schemes or not parts.hostname:
        raise ValueError(f"must be a {' or '.join(schemes)} URL with a host, not {value!r}")
    try:
        _ = parts.port
    except ValueError as exc:
        raise ValueError(f"bad port in {value!r}") from exc
    return value


def _proxy_url(value: str | None) -> str | None:
    if value is not None:
        proxies.parse_proxy(value)  # ValueError says why
    return value


class Target(BaseModel):
    """A local HTTP target and its retry policy."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str
    method: str | None = Field(default=None, pattern=r"^[A-Z]{3,10}$")
    headers: dict[str, str] = Field(default_factory=dict)
    timeout_seconds: PositiveFloat = 30.0
    retry_enabled: bool = True
    retry_max_attempts: PositiveInt = 3
    retry_delay_seconds: float = Field(default=1.0, ge=0)
    retry_backoff_multiplier: float = Field(default=2.0, ge=1)
    retry_max_delay_seconds: PositiveFloat = 60.0
    # TLS to this target (https:// and 307/308 redirects to https://), and its own proxy
    # (loopback targets ignore the environment's proxies; see connector/proxy.py).
    verify_tls: bool = True
    ca_file: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    proxy: str | None = None

    # Standard Webhooks headers of the connector's own, and the provider's signature made
    # afresh (connector/signing.py).
    sign: SignConfig | None = None
    resign: ResignConfig | None = None

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        return _http_url(value, ("http", "https"))

    @model_validator(mode="after")
    def _check_signing(self) -> Target:
        if self.sign is not None and self.resign is not None:
            if self.resign.provider == "standard_webhooks":
                raise ValueError(
                    "sign and resign standard_webhooks both write webhook-signature: choose one"
                )
        return self

    # A cached_property, not a private attribute: it is read for every request, and pydantic
    # serves private attributes through __getattr__ (4 µs a read, measured, against 0.06 µs).
    @cached_property
    def signer(self) -> Signer | None:
        """What signs this target's requests (None: no ``sign`` or ``resign``)."""
        if self.sign is None and self.resign is None:
            return None
        return Signer(self.sign, self.resign)

    @field_validator("proxy")
    @classmethod
    def _check_proxy(cls, value: str | None) -> str | None:
        return _proxy_url(value)


class RouteConfig(BaseModel):
    """``routes[n]``: a match and where it delivers: a ``target``, or modules as in
    ``webhooks_config`` (``module`` / ``chain`` and their keys)."""

    # Module keys are checked by the module plan (load_connector_settings), not here.
    model_config = ConfigDict(extra="allow", frozen=True)

    match: MatchConfig
    target: Target | None = None
    _plan: DeliveryPlan | None = PrivateAttr(default=None)

    @property
    def module_keys(self) -> dict[str, Any]:
        """The route's keys besides ``match`` and ``target`` (``_`` keys are comments)."""
        return {k: v for k, v in (self.model_extra or {}).items() if not k.startswith("_")}

    @property
    def plan(self) -> DeliveryPlan | None:
        """The module plan of a ``module`` / ``chain`` route, built when settings load."""
        return self._plan

    def bind_plan(self, plan: DeliveryPlan) -> None:
        """Keep the plan built from :attr:`module_keys` (load_connector_settings)."""
        self._plan = plan


class ConnectorSettings(BaseModel):
    """The whole connector configuration (file, then environment and flags on top)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cloud_url: str
    channel: str = Field(pattern=CHANNEL_NAME_PATTERN)
    token: str = Field(min_length=1)
    protocol: Protocol = "websocket"
    connector_id: str = Field(default_factory=socket.gethostname, pattern=r"^[\x21-\x7e]{1,128}$")
    group: str = Field(default="default", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    max_concurrent_requests: PositiveInt = 10
    max_in_flight: PositiveInt | None = None
    ordered: bool = False
    reconnect_delay_seconds: PositiveFloat = 1.0
    max_reconnect_delay_seconds: PositiveFloat = 60.0
    reconnect_backoff_multiplier: float = Field(default=2.0, ge=1)
    verify_tls: bool = True
    ca_file: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    proxy: str | None = None
    shutdown_timeout_seconds: float = Field(default=10.0, ge=0)
    state_dir: str | None = None
    dedup_capacity: PositiveInt = 100_000
    default_target: Target | None = None
    targets: dict[str, Target] = Field(default_factory=dict)
    webhooks_config: str | None = None
    connections_config: str | None = None
    # Routing and filtering (connector/routing.py): routes tried in order, the events filter
    # (comma-separated names, or a list in the file), and what becomes of a message neither
    # a route nor a fallback target takes.
    routes: tuple[RouteConfig, ...] = ()
    events: str | None = None
    unmatched: Literal["ack", "nack"] = "ack"
    # The connector's own /health and /metrics (connector/metrics.py); off unless a port is set.
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    metrics_host: str = "127.0.0.1"

    @field_validator("cloud_url")
    @classmethod
    def _check_cloud_url(cls, value: str) -> str:
        return _http_url(value, ("http", "https", "ws", "wss")).rstrip("/")

    @field_validator("proxy")
    @classmethod
    def _check_proxy(cls, value: str | None) -> str | None:
        return _proxy_url(value)

    @field_validator("events", mode="before")
    @classmethod
    def _check_events(cls, value: Any) -> Any:
        return None if value is None else events_text(split_events(value))

    @property
    def event_names(self) -> tuple[str, ...]:
        """The events filter's names (empty: no filter)."""
        return tuple(split_events(self.events)) if self.events else ()

    @property
    def concurrency(self) -> int:
        """Deliveries at once: one in ordered mode."""
        return 1 if self.ordered else self.max_concurrent_requests

    @property
    def window(self) -> int | None:
        """The in-flight window to ask the cloud for: one in ordered mode, so a retried
        message is never overtaken by the next one."""
        return 1 if self.ordered else self.max_in_flight

    def target_for(self, webhook_id: str) -> Target | None:
        """``targets[webhook_id]``, else ``default_target``."""
        return self.targets.get(webhook_id, self.default_target)


def load_connector_settings(
    path: str | Path | None,
    overrides: Mapping[str, Any],
    environ: Mapping[str, str] | None = None,
) -> ConnectorSettings:
    """Read ``connector.json`` (optional when flags say everything), apply overrides, validate.

    ``overrides`` holds values from flags or ``WEBHOOK_CONNECT_*`` variables; None means
    "not given", so the file's value stands.
    """
    source = str(path) if path is not None else "command line"
    data: Any = {} if path is None else load_json_file(path, environ)
    if not isinstance(data, dict):
        raise ConfigError(source, "", "expected a JSON object")
    # The Core Webhook Module's key names are taken as ours (shared/config/aliases.py).
    data = aliases.connector_settings(data, ConnectorSettings.model_fields, source)
    given = {k: v for k, v in overrides.items() if v is not None}
    forward_to = given.pop(FORWARD_TO, None)
    data = {**data, **given}
    if forward_to is not None:
        target = data.get("default_target")
        data["default_target"] = {**(target if isinstance(target, dict) else {}), "url": forward_to}
    settings = validate_model(ConnectorSettings, data, source, "")
    http_mode = settings.default_target is not None or bool(settings.targets)
    module_mode = settings.webhooks_config is not None
    if http_mode and module_mode:
        raise ConfigError(
            source,
            "webhooks_config",
            "choose one delivery mode: HTTP (default_target/targets) or modules "
            "(webhooks_config), not both",
        )
    if not http_mode and not module_mode and not settings.routes:
        raise ConfigError(
            source, "default_target", "no delivery mode: set default_target (or targets, routes)"
        )
    module_routes = any(
        "module" in r.module_keys or "chain" in r.module_keys for r in settings.routes
    )
    if settings.connections_config is not None and not module_mode and not module_routes:
        raise ConfigError(
            source,
            "connections_config",
            "only meaningful with webhooks_config (module mode) or module routes",
        )
    _build_route_plans(settings, source, path)
    _check_network_settings(settings, source, os.environ if environ is None else environ)
    return settings


def named_targets(settings: ConnectorSettings) -> list[tuple[str, Target]]:
    """Every target of the configuration with its key path (``targets.github``,
    ``routes[0].target``), for checks and warnings that name it."""
    named = [("default_target", settings.default_target)]
    named += [(f"targets.{name}", target) for name, target in settings.targets.items()]
    named += [(f"routes[{i}].target", route.target) for i, route in enumerate(settings.routes)]
    return [(where, target) for where, target in named if target is not None]


def _check_network_settings(
    settings: ConnectorSettings, source: str, environ: Mapping[str, str]
) -> None:
    """Certificate files readable and usable, proxy variables usable: found before dialling,
    not as a TLS failure at the first connect."""
    # A ca_file is read only when verify_tls is true (connector/tls.py).
    cloud_ca = settings.ca_file if settings.verify_tls else None
    places: list[tuple[str, str | None, str | None, str | None]] = [
        ("", cloud_ca, settings.client_cert, settings.client_key)
    ]
    for where, target in named_targets(settings):
        ca_file = target.ca_file if target.verify_tls else None
        places.append((f"{where}.", ca_file, target.client_cert, target.client_key))
    for prefix, ca_file, client_cert, client_key in places:
        problem = check_files(ca_file=ca_file, client_cert=client_cert, client_key=client_key)
        if problem is not None:
            raise ConfigError(source, prefix + problem[0], problem[1])
    try:
        proxies.environment_proxies(environ)
    except ValueError as exc:
        raise ConfigError("environment", "", str(exc)) from None


def _build_route_plans(settings: ConnectorSettings, source: str, path: str | Path | None) -> None:
    """Check each route's destination and build the plan of each module route now, so a bad
    module or module-config stops start-up with its key path, as webhooks_config does."""
    connections: dict[str, Any] | None = None
    for index, route in enumerate(settings.routes):
        where = f"routes[{index}]"
        keys = route.module_keys
        for key in keys:
            if key not in MODULE_ROUTE_KEYS:
                raise ConfigError(source, f"{where}.{key}", "unknown key")
        modular = "module" in keys or "chain" in keys
        if route.target is not None and keys:
            reason = f"give target or module/chain, not both (found target and {min(keys)!r})"
            raise ConfigError(source, where, reason)
        if route.target is None and not modular:
            reason = "no destination: give target, module or chain"
            raise ConfigError(source, f"{where}.target", reason)
        if modular:
            if connections is None:
                connections = {}
                if settings.connections_config is not None:
                    base = Path(path).parent if path is not None else Path.cwd()
                    connections = dict(load_connections(base / settings.connections_config))
            route.bind_plan(build_plan(keys, source, where, connections))


def load_delivery_plans(
    settings: ConnectorSettings, config_path: str | Path | None
) -> dict[str, DeliveryPlan] | None:
    """Module mode: the plans of ``webhooks_config`` (None in HTTP mode). Relative paths are
    taken from the directory of connector.json, so the three files travel together."""
    if settings.webhooks_config is None:
        return None
    base = Path(config_path).parent if config_path is not None else Path.cwd()
    connections = {}
    if settings.connections_config is not None:
        connections = load_connections(base / settings.connections_config)
    return load_plans(base / settings.webhooks_config, connections)
