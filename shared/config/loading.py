"""Reading a JSON configuration file and turning validation failures into one clear message."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from webhook_connect.shared.config.substitution import join_path, substitute
from webhook_connect.shared.exceptions import ConfigError

ModelT = TypeVar("ModelT", bound=BaseModel)


def load_json_file(path: str | Path, environ: Mapping[str, str] | None = None) -> Any:
    """Parse ``path`` as JSON and substitute environment placeholders in it."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(source, "", "file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(source, "", f"cannot read file: {exc}") from exc
    try:
        tree = json.loads(text)
    except json.JSONDecodeError as exc:
        reason = f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        raise ConfigError(source, "", reason) from exc
    return substitute(tree, os.environ if environ is None else environ, source)


def validate_model(model: type[ModelT], data: Any, source: str, path: str) -> ModelT:
    """Validate ``data`` as ``model``; the first problem becomes a :class:`ConfigError`."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise config_error_from(exc, source, path) from None


def config_error_from(exc: ValidationError, source: str, path: str) -> ConfigError:
    """Name the first failing key of a pydantic error, relative to ``path``."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    key_path = path
    for part in first["loc"]:
        key_path = join_path(key_path, part)
    reason = _reason(first)
    if len(errors) > 1:
        reason += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return ConfigError(source, key_path, reason)


def _reason(error: Any) -> str:
    kind = error["type"]
    if kind == "missing":
        return "required key is missing"
    if kind == "extra_forbidden":
        return "unknown key"
    message = str(error["msg"])
    if kind.startswith("value_error"):
        message = message.removeprefix("Value error, ")
    received = error.get("input")
    if kind not in {"value_error"} and not isinstance(received, dict | list):
        message += f" (got {received!r})"
    return message
