"""The output-module registry the connector (module mode) and the cloud (direct delivery) share."""

from __future__ import annotations

from webhook_connect.shared.modules.base import (
    DeliveryError,
    Message,
    Module,
    NoConfig,
    Permanent,
    Pools,
    Transient,
)
from webhook_connect.shared.modules.registry import (
    MODULES,
    MissingDriver,
    UnknownModule,
    module_class,
)

__all__ = [
    "MODULES",
    "DeliveryError",
    "Message",
    "MissingDriver",
    "Module",
    "NoConfig",
    "Permanent",
    "Pools",
    "Transient",
    "UnknownModule",
    "module_class",
]
