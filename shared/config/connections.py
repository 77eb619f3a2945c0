"""``connections.json``: named connection settings that modules refer to by ``"connection"``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from webhook_connect.shared.config import aliases
from webhook_connect.shared.config.loading import load_json_file, validate_model
from webhook_connect.shared.exceptions import ConfigError


class ConnectionEntry(BaseModel):
    """One named connection; the keys beyond ``type`` belong to the module that uses it."""

    model_config = ConfigDict(extra="allow", frozen=True)

    type: str = Field(min_length=1)


def load_connections(
    path: str | Path | None, environ: Mapping[str, str] | None = None
) -> dict[str, ConnectionEntry]:
    """Load ``connections.json``; no path means no named connections."""
    if path is None:
        return {}
    source = str(path)
    tree = load_json_file(path, environ)
    if not isinstance(tree, dict):
        raise ConfigError(source, "", "expected a JSON object of named connections")
    return {
        name: validate_model(
            ConnectionEntry,
            aliases.connection_entry(entry, source, name) if isinstance(entry, dict) else entry,
            source,
            name,
        )
        for name, entry in aliases.drop_comments(tree).items()
    }
