"""``transform``: reshape a JSON payload before a module sees it (pure; no code execution).

In order: ``pick`` keeps only the listed paths, ``rename`` moves values, ``add`` sets static
values, ``wrap`` nests the result under a key. A path is dotted (``data.order.id``); a picked or
renamed path that is missing is skipped, never an error, because providers omit fields.
"""

from __future__ import annotations

from typing import Any

import orjson

from webhook_connect.shared.config.delivery import TransformConfig
from webhook_connect.shared.modules.base import Message, Permanent

MISSING = object()


def transform_message(config: TransformConfig, message: Message) -> Message:
    """``message`` with its body replaced by the transformed JSON (compact, UTF-8)."""
    payload = message.json()
    if not isinstance(payload, dict):
        raise Permanent("transform needs a JSON object body")
    body = orjson.dumps(transform(config, payload))
    return Message(
        message.message_id,
        message.webhook_id,
        message.channel,
        message.attempt,
        message.envelope,
        body,
    )


def transform(config: TransformConfig, payload: dict[str, Any]) -> Any:
    out: dict[str, Any]
    if config.pick is not None:
        out = {}
        for path in config.pick:
            value = _get(payload, path)
            if value is not MISSING:
                _set(out, path, value)
    else:
        out = _copy(payload)
    for old, new in config.rename.items():
        value = _pop(out, old)
        if value is not MISSING:
            _set(out, new, value)
    for path, value in config.add.items():
        _set(out, path, value)
    if config.wrap is not None:
        wrapped: dict[str, Any] = {}
        _set(wrapped, config.wrap, out)
        return wrapped
    return out


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def _get(payload: dict[str, Any], path: str) -> Any:
    node: Any = payload
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return MISSING
        node = node[part]
    return _copy(node)


def _pop(payload: dict[str, Any], path: str) -> Any:
    *parents, last = path.split(".")
    node: Any = payload
    for part in parents:
        if not isinstance(node, dict) or part not in node:
            return MISSING
        node = node[part]
    if not isinstance(node, dict) or last not in node:
        return MISSING
    return node.pop(last)


def _set(payload: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    node = payload
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[last] = value
