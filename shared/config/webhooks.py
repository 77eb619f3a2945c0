"""``webhooks.json``: ``{"<webhook_id>": {"module": ..., "module-config": {...}, ...}}``."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt

from webhook_connect.shared.config import aliases
from webhook_connect.shared.config.connections import ConnectionEntry
from webhook_connect.shared.config.delivery import (
    RELAY_MODULE,
    DeliveryPlan,
    accepted_keys,
    build_plan,
)
from webhook_connect.shared.config.inbound import InboundSecurity, RateLimitConfig
from webhook_connect.shared.config.loading import load_json_file, validate_model
from webhook_connect.shared.exceptions import ConfigError
from webhook_connect.shared.limits import ChannelLimits

CHANNEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
WEBHOOK_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
DEFAULT_MAX_BODY_SIZE = 1024 * 1024

# Webhooks the cloud delivers itself are buffered in a channel of their own, named so that no
# channel of webhooks.json or the admin API (whose names start with a letter or digit) clashes.
DIRECT_CHANNEL_PREFIX = "_direct."

HttpMethod = Literal["POST", "PUT", "PATCH"]


class RelayChannel(BaseModel):
    """The channel a ``webhook_connect`` entry relays to, and its connector token."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    channel: str = Field(pattern=CHANNEL_NAME_PATTERN)
    channel_token: str = Field(min_length=8)


# ChannelLimits second: pydantic orders fields from the last base on, so channel and
# channel_token come first and are named first when several keys are wrong, as they always were.
class WebhookConnectSettings(ChannelLimits, RelayChannel):
    """``module-config`` of a ``webhook_connect`` entry: the channel and its limits
    (shared/limits.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # For the whole channel, whichever webhook feeds it, across every cloud replica.
    rate_limit: RateLimitConfig | None = None


class WebhookEntry(InboundSecurity):
    """One webhook of ``webhooks.json``: where it goes, and what the cloud accepts."""

    model_config = ConfigDict(extra="allow", frozen=True, populate_by_name=True)

    module: str | None = None
    module_config: dict[str, Any] = Field(default_factory=dict, alias="module-config")
    # Delivery by modules (shared/config/delivery.py checks these).
    chain: list[Any] | None = None
    chain_config: dict[str, Any] | None = Field(default=None, alias="chain-config")
    retry: dict[str, Any] | None = None
    transform: dict[str, Any] | None = None
    timeout_seconds: PositiveFloat | None = None
    data_type: Literal["json", "blob"] = "json"
    methods: tuple[HttpMethod, ...] = ("POST",)
    max_body_size: PositiveInt = DEFAULT_MAX_BODY_SIZE
    connection: str | None = None


class Webhook(BaseModel):
    """A validated webhook: relayed to connectors through ``relay.channel``, or, with a
    ``plan``, buffered in its own channel and delivered by the cloud through modules."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    webhook_id: str
    entry: WebhookEntry
    relay: WebhookConnectSettings
    plan: DeliveryPlan | None = None

    @property
    def is_direct(self) -> bool:
        return self.plan is not None


def load_webhooks(
    path: str | Path,
    connections: Mapping[str, ConnectionEntry] | None = None,
    environ: Mapping[str, str] | None = None,
) -> dict[str, Webhook]:
    """Load and validate ``webhooks.json`` for the cloud."""

    source = str(path)
    tree = load_json_file(path, environ)
    if not isinstance(tree, dict):
        raise ConfigError(source, "", "expected a JSON object of webhooks keyed by id")
    webhooks: dict[str, Webhook] = {}
    for webhook_id, raw in aliases.drop_comments(tree).items():
        if not re.match(WEBHOOK_ID_PATTERN, webhook_id):
            raise ConfigError(
                source, webhook_id, "webhook id must be 1-128 letters, digits, '.', '_' or '-'"
            )
        raw = _entry_in_our_terms(raw, source, webhook_id)
        entry = validate_model(WebhookEntry, raw, source, webhook_id)
        _check_entry(entry, webhook_id, source, connections or {})
        if entry.module == RELAY_MODULE and entry.chain is None:
            settings = aliases.keep_known(
                entry.module_config,
                accepted_keys(WebhookConnectSettings),
                source,
                f"{webhook_id}.module-config",
            )
            if "rate_limit" in settings:
                settings["rate_limit"] = aliases.rate_limit(
                    settings["rate_limit"], source, f"{webhook_id}.module-config.rate_limit"
                )
            relay = validate_model(
                WebhookConnectSettings, settings, source, f"{webhook_id}.module-config"
            )
            webhooks[webhook_id] = Webhook(webhook_id=webhook_id, entry=entry, relay=relay)
            continue
        plan = build_plan(raw, source, webhook_id, connections or {})
        webhooks[webhook_id] = Webhook(
            webhook_id=webhook_id, entry=entry, relay=direct_channel(webhook_id, plan), plan=plan
        )
    _check_channels_agree(webhooks, source)
    _check_tokens_unique(webhooks, source)
    return webhooks


def direct_channel(webhook_id: str, plan: DeliveryPlan) -> WebhookConnectSettings:
    """The channel a directly delivered webhook is buffered in. Its ack timeout outlasts the
    slowest delivery the plan allows (every retry of every step), so a message is not handed
    to a second delivery while the first is still trying."""
    step_times = [
        step.timeout_seconds * step.retry.max_attempts
        + step.retry.max_delay * (step.retry.max_attempts - 1)
        for step in plan.steps
    ]
    slowest = max(step_times) if plan.execution == "parallel" else sum(step_times)
    return WebhookConnectSettings.model_construct(
        channel=DIRECT_CHANNEL_PREFIX + webhook_id,
        channel_token="",
        ack_timeout_seconds=max(30.0, slowest + 10),
    )


def _check_entry(
    entry: WebhookEntry, webhook_id: str, source: str, connections: Mapping[str, ConnectionEntry]
) -> None:
    if entry.module is None and entry.chain is None:
        raise ConfigError(source, f"{webhook_id}.module", "required key is missing")
    for key in entry.model_extra or {}:
        # Read by the module or its connection (shared/config/delivery.py), not by us here.
        if key not in (*aliases.ENTRY_MODULE_KEYS, "redis"):
            aliases.warn(source, f"{webhook_id}.{key}", aliases.UNKNOWN)
    if entry.connection is not None and entry.connection not in connections:
        raise ConfigError(
            source, f"{webhook_id}.connection", f"no connection named {entry.connection!r}"
        )


def _entry_in_our_terms(raw: Any, source: str, webhook_id: str) -> Any:
    """An entry of the Core Webhook Module's file in our terms (shared/config/aliases.py):
    comments dropped, ``rate_limit.enabled`` applied, ``credential_cleanup`` reported."""
    if not isinstance(raw, dict):
        return raw
    entry = aliases.drop_comments(raw)
    if "rate_limit" in entry:
        entry["rate_limit"] = aliases.rate_limit(
            entry["rate_limit"], source, f"{webhook_id}.rate_limit"
        )
    if "credential_cleanup" in entry:
        cleanup = entry.pop("credential_cleanup")
        if not (isinstance(cleanup, dict) and cleanup.get("enabled") is False):
            path = f"{webhook_id}.credential_cleanup"
            aliases.warn(source, path, aliases.CREDENTIAL_CLEANUP_WARNING)
    return entry


def _check_channels_agree(webhooks: Mapping[str, Webhook], source: str) -> None:
    """Several webhooks may feed one channel, but they must agree on its limits."""
    seen: dict[str, Webhook] = {}
    for webhook in webhooks.values():
        first = seen.setdefault(webhook.relay.channel, webhook)
        mine = webhook.relay.model_dump(exclude={"channel_token"})
        theirs = first.relay.model_dump(exclude={"channel_token"})
        for key, value in mine.items():
            if value != theirs[key]:
                raise ConfigError(
                    source,
                    f"{webhook.webhook_id}.module-config.{key}",
                    f"channel {webhook.relay.channel!r} already has {key}={theirs[key]!r} "
                    f"from webhook {first.webhook_id!r}",
                )


def _check_tokens_unique(webhooks: Mapping[str, Webhook], source: str) -> None:
    """A connector token names its channel: shared by two channels, one of them would never
    be reached (the token finds the other)."""
    owners: dict[str, Webhook] = {}
    for webhook in webhooks.values():
        if webhook.is_direct:
            continue
        first = owners.setdefault(webhook.relay.channel_token, webhook)
        if first.relay.channel != webhook.relay.channel:
            raise ConfigError(
                source,
                f"{webhook.webhook_id}.module-config.channel_token",
                f"channel {webhook.relay.channel!r} has the same channel_token as channel "
                f"{first.relay.channel!r} (webhook {first.webhook_id!r}); each channel needs "
                "its own",
            )
