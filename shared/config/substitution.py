"""``{$VAR}`` / ``{$VAR:default}`` replacement in every string of a configuration tree."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from webhook_connect.shared.exceptions import ConfigError

SECRET_STORES = ("vault", "etcd")
PLACEHOLDER = re.compile(r"\{\$([A-Za-z_][A-Za-z0-9_]*)(?::([^}]*))?\}")


def substitute(value: Any, environ: Mapping[str, str], source: str, path: str = "") -> Any:
    """Return ``value`` with every placeholder replaced from ``environ``.

    A placeholder naming a variable that is unset and has no default is a
    :class:`ConfigError` naming ``source`` and the key path where it stands.
    """
    if isinstance(value, str):
        return _substitute_string(value, environ, source, path)
    if isinstance(value, dict):
        return {
            key: substitute(item, environ, source, join_path(path, key))
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [
            substitute(item, environ, source, f"{path}[{index}]")
            for index, item in enumerate(value)
        ]
    return value


def join_path(path: str, key: object) -> str:
    """Extend a dotted key path; list indexes are written ``[n]``."""
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


def _substitute_string(text: str, environ: Mapping[str, str], source: str, path: str) -> str:
    def replace(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in environ:
            return environ[name]
        if name in SECRET_STORES:
            # The Core Webhook Module's {$vault:path#field} / {$etcd:...}: without this the
            # reference would read as a variable with a default, and the default, not the
            # secret, would be used.
            raise ConfigError(
                source,
                path,
                f"{match.group(0)} reads a secret from {name}, which is not supported: "
                "use an environment variable",
            )
        if default is not None:
            return default
        raise ConfigError(
            source, path, f"environment variable {name} is not set and has no default"
        )

    return PLACEHOLDER.sub(replace, text)
