"""A channel's limits, defined once.

:class:`ChannelLimits` holds every limit a channel has: its name, type, default, bounds and a
one-line help. Everything else is generated from it:

* ``webhooks.json``: ``WebhookConnectSettings`` (shared/config/webhooks.py) inherits it;
* the admin API: :func:`optional_limits` makes the model of a create or an update, where a
  limit not given is ``None`` (the default on create, unchanged on update);
* the CLI: :func:`limit_options` adds one option per limit to ``channels create|update``;
* the dashboard: :data:`LIMIT_NAMES` is handed to its page;
* storage: ``ChannelSpec(name, **limit_values(limits))`` (cloud/buffers/base.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import annotated_types
import click
from pydantic import BaseModel, ConfigDict, Field, create_model
from pydantic.fields import FieldInfo

CommandT = TypeVar("CommandT", bound=Callable[..., None])
ModelT = TypeVar("ModelT", bound=BaseModel)


class ChannelLimits(BaseModel):
    """Every limit of a channel, with its default. Descriptions are the CLI's help."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ttl_seconds: int = Field(default=86400, gt=0, description="How long a message may wait")
    max_queue_size: int = Field(default=10000, gt=0, description="Messages the channel holds")
    max_connections: int = Field(default=10, gt=0, description="Live connections")
    max_in_flight: int = Field(default=100, gt=0, description="Unacked messages per connection")
    ack_timeout_seconds: float = Field(default=30.0, gt=0, description="Redelivery without an ack")
    max_delivery_attempts: int = Field(default=5, gt=0, description="Attempts before a dead letter")
    retry_delay_seconds: float = Field(default=5.0, ge=0, description="Delay after a nack")
    # A copy of every message is kept this long, for replaying history (0: keep none).
    history_seconds: int = Field(default=0, ge=0, description="Keep messages for replay")
    # Strict: a group dropped because "3600" was read as seconds would lose its backlog.
    group_idle_seconds: int = Field(
        default=3600,
        ge=0,
        strict=True,
        description="Drop a group (not default) with no connection this long; 0 never",
    )
    dynamic_groups: bool = Field(
        default=True,
        strict=True,
        description="Whether a connector may create a group by naming it",
    )


LIMIT_NAMES: tuple[str, ...] = tuple(ChannelLimits.model_fields)


def limit_values(limits: ChannelLimits) -> dict[str, Any]:
    """The limits of ``limits`` (a model that has them, and maybe more) by name."""
    return {name: getattr(limits, name) for name in LIMIT_NAMES}


def optional_limits(
    name: str, base: type[ModelT], doc: str, /, **fields: tuple[Any, Any]
) -> type[ModelT]:
    """A model named ``name`` with every limit optional (``None``: not given), with the same
    types, bounds and strictness as :class:`ChannelLimits`, and ``fields`` after them."""
    limits: dict[str, Any] = {
        field: (
            Annotated[(info.annotation, *info.metadata)] | None,
            Field(default=None, description=info.description),
        )
        for field, info in ChannelLimits.model_fields.items()
    }
    return create_model(name, __base__=base, __doc__=doc, **{**limits, **fields})


def limit_options(command: CommandT) -> CommandT:
    """Add one option per limit (``--ttl-seconds`` ...), ``None`` when not given."""
    for name, info in reversed(ChannelLimits.model_fields.items()):
        flag = "--" + name.replace("_", "-")
        help_text = f"{info.description} (default {_shown(info.default)})."
        if info.annotation is bool:
            option = click.option(f"{flag}/--no-{flag[2:]}", default=None, help=help_text)
        else:
            option = click.option(flag, type=_click_type(info), help=help_text)
        command = option(command)
    return command


def _shown(default: object) -> str:
    if isinstance(default, bool):
        return "yes" if default else "no"
    return f"{default:g}" if isinstance(default, float) else str(default)


def _click_type(info: FieldInfo) -> click.IntRange | click.FloatRange:
    """The click range of a limit's bounds (only ``gt 0`` and ``ge 0`` occur)."""
    open_low = any(isinstance(bound, annotated_types.Gt) for bound in info.metadata)
    if info.annotation is int:
        # Whole numbers: "more than 0" is "at least 1".
        return click.IntRange(min=1 if open_low else 0)
    return click.FloatRange(min=0, min_open=open_low)
