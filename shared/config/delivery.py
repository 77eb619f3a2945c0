"""Where a webhook goes when it is delivered by modules: one module, or a ``chain`` of them.

The Core Webhook Module's keys: ``module`` / ``connection`` / ``module-config``, or ``chain``
(module names, or objects with those keys and a ``retry``) with ``chain-config {execution,
continue_on_error}``; ``retry {enabled, max_attempts, initial_delay, max_delay,
backoff_multiplier}``. Ours adds ``transform`` (payload reshaping before a module) and
``timeout_seconds`` per module. The connector's ``webhooks_config`` and the cloud's direct
delivery read the same entries, so one file works in both places.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    model_validator,
)

from webhook_connect.shared.config import aliases
from webhook_connect.shared.config.connections import ConnectionEntry
from webhook_connect.shared.config.loading import config_error_from, load_json_file
from webhook_connect.shared.exceptions import ConfigError
from webhook_connect.shared.modules.base import Pools
from webhook_connect.shared.modules.registry import MissingDriver, UnknownModule, module_class

M = TypeVar("M", bound=BaseModel)

MAX_CHAIN = 20
RELAY_MODULE = "webhook_connect"
# A dotted path into a JSON object: "data.order.id".
FIELD_PATH = r"^[^.\s][^.]*(\.[^.\s][^.]*)*$"


class RetryConfig(BaseModel):
    """How often a module is tried within one delivery attempt before the message is nacked."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    max_attempts: PositiveInt = 3
    initial_delay: float = Field(default=1.0, ge=0)
    max_delay: PositiveFloat = 60.0
    backoff_multiplier: float = Field(default=2.0, ge=1)


class TransformConfig(BaseModel):
    """Reshape a JSON object before a module sees it, in this order: pick, rename, add, wrap.

    Declarative only: no expressions, no code. Paths are dotted (``data.order.id``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    pick: tuple[str, ...] | None = None
    rename: dict[str, str] = Field(default_factory=dict)
    add: dict[str, Any] = Field(default_factory=dict)
    wrap: str | None = Field(default=None, pattern=FIELD_PATH)

    @model_validator(mode="after")
    def _check_paths(self) -> TransformConfig:
        for path in (*(self.pick or ()), *self.rename, *self.rename.values(), *self.add):
            if not re.match(FIELD_PATH, path):
                raise ValueError(f"bad field path {path!r}: dotted names, no empty parts")
        return self


class StepConfig(BaseModel):
    """One module of a chain (or the only one)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    module: str
    connection: str | None = None
    module_config: dict[str, Any] = Field(default_factory=dict, alias="module-config")
    retry: RetryConfig | None = None
    transform: TransformConfig | None = None
    timeout_seconds: PositiveFloat = 30.0


class ChainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    execution: Literal["sequential", "parallel"] = "sequential"
    continue_on_error: bool = True


@dataclass(frozen=True, slots=True)
class Step:
    """A validated step: the module's class is loaded and its config checked."""

    module: str
    config: BaseModel
    connection_name: str | None
    connection: ConnectionEntry | None
    retry: RetryConfig
    transform: TransformConfig | None
    timeout_seconds: float


@dataclass(frozen=True, slots=True)
class DeliveryPlan:
    """What delivering one webhook means."""

    steps: tuple[Step, ...]
    execution: Literal["sequential", "parallel"] = "sequential"
    continue_on_error: bool = True


def build_plan(
    raw: Mapping[str, Any],
    source: str,
    path: str,
    connections: Mapping[str, ConnectionEntry],
) -> DeliveryPlan:
    """The plan of one ``webhooks.json`` entry that delivers by modules (``module`` or ``chain``).

    Every module named is imported now, so a missing driver or a bad ``module-config`` stops
    start-up with the file, the key and the reason.
    """
    raw, connections = _inline_connection(raw, path, connections)
    entry_keys = {key: raw[key] for key in aliases.ENTRY_MODULE_KEYS if key in raw}
    entry_retry = _model(RetryConfig, raw.get("retry"), source, f"{path}.retry")
    entry_transform = _model(TransformConfig, raw.get("transform"), source, f"{path}.transform")
    if "chain" in raw:
        chain = raw["chain"]
        if not isinstance(chain, list) or not 1 <= len(chain) <= MAX_CHAIN:
            raise ConfigError(
                source, f"{path}.chain", f"expected a list of 1 to {MAX_CHAIN} modules"
            )
        settings = (
            _model(ChainConfig, raw.get("chain-config"), source, f"{path}.chain-config")
            or ChainConfig()
        )
        steps = []
        for index, item in enumerate(chain):
            item_path = f"{path}.chain[{index}]"
            step = _model(
                StepConfig,
                {"module": item} if isinstance(item, str) else _step_object(item),
                source,
                item_path,
            )
            if step is None:
                raise ConfigError(source, item_path, "expected a module name or object")
            steps.append(
                _step(
                    step, entry_retry, entry_transform, source, item_path, connections, entry_keys
                )
            )
        _report_unused(entry_keys, steps, source, path)
        return DeliveryPlan(tuple(steps), settings.execution, settings.continue_on_error)
    single = {
        key: raw[key]
        for key in ("module", "connection", "module-config", "timeout_seconds")
        if key in raw
    }
    step = _model(StepConfig, single, source, path)
    if step is None:
        raise ConfigError(source, f"{path}.module", "required key is missing")
    only = _step(step, entry_retry, entry_transform, source, path, connections, entry_keys)
    _report_unused(entry_keys, [only], source, path)
    return DeliveryPlan((only,))


def _report_unused(
    entry_keys: Mapping[str, Any], steps: list[Step], source: str, path: str
) -> None:
    """An entry-level ``queue_name`` / ``topic`` that no module of the entry takes."""
    for key in entry_keys:
        if not any(key in type(step.config).model_fields for step in steps):
            reason = f"ignored: no module of this entry takes {key!r}"
            aliases.warn(source, f"{path}.{key}", reason)


def _step_object(item: Any) -> Any:
    return aliases.drop_comments(item) if isinstance(item, dict) else item


def _inline_connection(
    raw: Mapping[str, Any], path: str, connections: Mapping[str, ConnectionEntry]
) -> tuple[Mapping[str, Any], Mapping[str, ConnectionEntry]]:
    """An entry's ``redis`` object (the Core Webhook Module's ``redis_publish`` without a named
    connection) becomes a connection of its own, named after the entry."""
    settings, config = aliases.redis_block(raw)
    if not settings or "connection" in raw:
        return raw, connections
    name = f"{path}.redis"
    entry = ConnectionEntry.model_validate(settings)
    merged = {**config, **(raw.get("module-config") or {})}
    return {**raw, "connection": name, "module-config": merged}, {**connections, name: entry}


def _step(
    step: StepConfig,
    retry: RetryConfig | None,
    transform: TransformConfig | None,
    source: str,
    path: str,
    connections: Mapping[str, ConnectionEntry],
    entry_keys: Mapping[str, Any] | None = None,
) -> Step:
    if step.module == RELAY_MODULE:
        reason = "webhook_connect relays to connectors: it cannot be chained or used here"
        raise ConfigError(source, f"{path}.module", reason)
    try:
        cls = module_class(step.module)
    except (UnknownModule, MissingDriver) as exc:
        raise ConfigError(source, f"{path}.module", str(exc)) from None
    module_config = module_config_of(
        cls.Config, step.module, {**(entry_keys or {}), "module-config": step.module_config}
    )
    module_config = aliases.keep_known(
        module_config,
        accepted_keys(cls.Config),
        source,
        f"{path}.module-config",
        aliases.MODULE_NOT_APPLIED.get(step.module),
    )
    bare = aliases.bare_function_warning(step.module, module_config)
    if bare is not None:
        aliases.warn(source, f"{path}.module-config.function", bare)
    try:
        config = cls.Config.model_validate(module_config)
    except ValidationError as exc:
        raise config_error_from(exc, source, f"{path}.module-config") from None
    connection = None
    if step.connection is not None:
        connection = connections.get(step.connection)
        if connection is None:
            raise ConfigError(
                source, f"{path}.connection", f"no connection named {step.connection!r}"
            )
        if cls.connection_types and connection.type not in cls.connection_types:
            accepted = ", ".join(sorted(cls.connection_types))
            raise ConfigError(
                source,
                f"{path}.connection",
                f"connection {step.connection!r} is of type {connection.type!r}; "
                f"module {step.module!r} takes {accepted}",
            )
    elif cls.needs_connection:
        raise ConfigError(
            source, f"{path}.connection", f"module {step.module!r} needs a connection"
        )
    try:  # a module checks its connection's settings when it is built (it connects later)
        cls(config, connection, Pools())
    except (ValidationError, ConfigError) as exc:
        problem = exc if isinstance(exc, ConfigError) else config_error_from(exc, "", "")
        where = f"{problem.key_path}: " if problem.key_path else ""
        reason = f"connection {step.connection!r}: {where}{problem.reason}"
        raise ConfigError(source, f"{path}.connection", reason) from None
    return Step(
        module=step.module,
        config=config,
        connection_name=step.connection,
        connection=connection,
        retry=step.retry or retry or RetryConfig(),
        transform=step.transform or transform,
        timeout_seconds=step.timeout_seconds,
    )


def accepted_keys(model: type[BaseModel]) -> set[str]:
    """The keys a model takes: its field names and their aliases."""
    keys = set(model.model_fields)
    for field in model.model_fields.values():
        if field.alias:
            keys.add(field.alias)
        choices = getattr(field.validation_alias, "choices", None)
        keys.update(choice for choice in choices or () if isinstance(choice, str))
        if isinstance(field.validation_alias, str):
            keys.add(field.validation_alias)
    return keys


def module_config_of(
    config: type[BaseModel], module: str, raw: Mapping[str, Any]
) -> dict[str, Any]:
    """The ``module-config`` of an entry or step in our names (shared/config/aliases.py)."""
    return aliases.entry_module_config(raw, module, accepted_keys(config))


def _model(model: type[M], data: Any, source: str, path: str) -> M | None:
    if data is None:
        return None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise config_error_from(exc, source, path) from None


def load_plans(
    path: str | Path,
    connections: Mapping[str, ConnectionEntry],
    environ: Mapping[str, str] | None = None,
) -> dict[str, DeliveryPlan]:
    """A connector's ``webhooks_config``: the plan of each webhook id (``"*"``: any other).

    The same file format as the cloud's ``webhooks.json``; keys a connector has no use for
    (inbound checks) are ignored, so one file can serve both.
    """
    source = str(path)
    tree = load_json_file(path, environ)
    if not isinstance(tree, dict) or not tree:
        raise ConfigError(source, "", "expected a JSON object of webhooks keyed by id")
    plans: dict[str, DeliveryPlan] = {}
    for webhook_id, raw in aliases.drop_comments(tree).items():
        if not isinstance(raw, dict):
            raise ConfigError(source, webhook_id, "expected an object")
        if "chain" not in raw and "module" not in raw:
            raise ConfigError(source, f"{webhook_id}.module", "required key is missing")
        plans[webhook_id] = build_plan(raw, source, webhook_id, connections)
    return plans
