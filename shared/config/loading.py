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
# No configuration needs more (a json_schema inside an entry included); deeper trees would
# exhaust the recursion of the walks that follow parsing.
MAX_DEPTH = 100


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
    except RecursionError:
        # The parser recurses per level: a file of 100,000 nested arrays would otherwise end
        # start-up with a traceback, and the reload watcher for good.
        raise ConfigError(source, "", f"nested deeper than {MAX_DEPTH} levels") from None
    if nesting_depth(tree) > MAX_DEPTH:
        # Shallower than the parser's limit but deep enough to exhaust the recursion of what
        # walks the tree next (substitution, validation).
        raise ConfigError(source, "", f"nested deeper than {MAX_DEPTH} levels")
    return substitute(tree, os.environ if environ is None else environ, source)


def nesting_depth(tree: Any) -> int:
    """How deeply objects and arrays nest (a scalar is 0), without recursing."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list):
            depth += 1
            stack.extend(
                (item, depth) for item in (node.values() if isinstance(node, dict) else node)
            )
        deepest = max(deepest, depth)
    return deepest


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
