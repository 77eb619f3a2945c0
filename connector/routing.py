"""Routes: which destination a message goes to, decided from its webhook id, headers and body.

Pure logic, no I/O. Everything is compiled once at start (globs become regular expressions,
JSON paths become tuples of keys), so a message costs a few regex matches, and its body is
parsed as JSON at most once, and only when a route or the events filter asks for a body field.

Globs: ``*`` any run of characters, ``?`` one character, ``[abc]`` / ``[a-z]`` / ``[!abc]`` a
class; no escapes (``[*]`` is a literal star). A string in a ``json`` condition is a glob when
it holds one of ``*?[``, so ``"opened"`` compares equal and ``"pull_*"`` matches; any other JSON
value (number, boolean, null, object, array) compares equal, with ``true`` never equal to ``1``.

JSON paths, a documented subset: ``$`` (the whole body), ``.name``, ``[0]``, ``['any key']``
or ``["any key"]``, chained: ``$.pull_request.labels[0].name``, ``$['key with space'].a``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# What ``Router.decide`` answers besides a route's index.
DEFAULT: Final = -1  # no route took it: the configured fallback (default_target, targets...)
UNMATCHED: Final = -2  # the events filter refused it: acked and counted, or nacked

# The event-name fields of the common providers: GitHub's header, and the ``type`` field of the
# JSON body that Stripe and Standard Webhooks both use.
EVENT_HEADER = "x-github-event"
EVENT_FIELD = ("type",)

GLOB_CHARS = frozenset("*?[")
_NAME = re.compile(r"[A-Za-z_$][A-Za-z0-9_$-]*")
_INDEX = re.compile(r"\[(\d+)\]")
_QUOTED = re.compile(r"""\[(?:'([^']*)'|"([^"]*)")\]""")
_MISSING = object()  # a path that leads nowhere in this body
_NOT_JSON = object()  # a body that is not JSON


def compile_glob(pattern: str) -> re.Pattern[str]:
    """The regular expression of a glob, anchored at both ends; ValueError if it cannot parse
    (``[`` without its ``]``, an empty class)."""
    parts: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        char = pattern[i]
        i += 1
        if char == "*":
            parts.append(".*")
        elif char == "?":
            parts.append(".")
        elif char == "[":
            end = i
            if end < n and pattern[end] == "!":
                end += 1
            if end < n and pattern[end] == "]":  # a leading ] belongs to the class
                end += 1
            end = pattern.find("]", end)
            if end < 0:
                raise ValueError(f"bad glob {pattern!r}: '[' at {i - 1} has no closing ']'")
            body = pattern[i:end]
            negated = body.startswith("!")
            if negated:
                body = body[1:]
            if not body:
                raise ValueError(f"bad glob {pattern!r}: empty character class at {i - 1}")
            escaped = body.replace("\\", "\\\\").replace("^", "\\^").replace("[", "\\[")
            parts.append(f"[{'^' if negated else ''}{escaped}]")
            i = end + 1
        else:
            parts.append(re.escape(char))
    try:
        return re.compile("".join(parts), re.DOTALL)
    except re.error as exc:  # a class range out of order: [z-a]
        raise ValueError(f"bad glob {pattern!r}: {exc}") from None


def parse_json_path(path: str) -> tuple[str | int, ...]:
    """``$.a[0]['b c']`` → ``("a", 0, "b c")``; ValueError naming the position otherwise."""
    if not path.startswith("$"):
        raise ValueError(f"bad JSON path {path!r}: must start with '$'")
    keys: list[str | int] = []
    i = 1
    while i < len(path):
        if path[i] == ".":
            name = _NAME.match(path, i + 1)
            if name is None:
                raise ValueError(
                    f"bad JSON path {path!r}: expected a name after '.' at {i} "
                    "(use ['...'] for other keys)"
                )
            keys.append(name.group())
            i = name.end()
            continue
        index = _INDEX.match(path, i)
        if index is not None:
            keys.append(int(index.group(1)))
            i = index.end()
            continue
        quoted = _QUOTED.match(path, i)
        if quoted is not None:
            single, double = quoted.groups()
            keys.append(single if single is not None else double)
            i = quoted.end()
            continue
        raise ValueError(
            f"bad JSON path {path!r} at {i}: expected .name, [index] or ['key'] "
            "(supported: $.a.b, $.a[0].b, $['key with space'])"
        )
    return tuple(keys)


def resolve(document: Any, keys: tuple[str | int, ...]) -> Any:
    """The value at ``keys`` in a parsed JSON document, or a sentinel when there is none."""
    node = document
    for key in keys:
        if isinstance(key, int):
            if not isinstance(node, list) or key >= len(node):
                return _MISSING
            node = node[key]
        else:
            if not isinstance(node, dict) or key not in node:
                return _MISSING
            node = node[key]
    return node


def value_test(expected: Any) -> Callable[[Any], bool]:
    """How a JSON value is compared with ``expected``: a glob for strings with glob
    characters, JSON equality otherwise (``true`` is not ``1``, ``1`` is ``1.0``)."""
    if isinstance(expected, str):
        if GLOB_CHARS.isdisjoint(expected):
            return lambda value: isinstance(value, str) and value == expected
        regex = compile_glob(expected)
        return lambda value: isinstance(value, str) and regex.fullmatch(value) is not None
    return lambda value: _json_equal(value, expected)


def _json_equal(left: Any, right: Any) -> bool:
    if isinstance(left, bool) or isinstance(right, bool):
        return isinstance(left, bool) and isinstance(right, bool) and left == right
    if isinstance(left, dict) and isinstance(right, dict):
        return left.keys() == right.keys() and all(_json_equal(left[k], right[k]) for k in left)
    if isinstance(left, list) and isinstance(right, list):
        return len(left) == len(right) and all(map(_json_equal, left, right))
    if isinstance(left, int | float) and isinstance(right, int | float):
        return left == right
    return type(left) is type(right) and left == right


class MatchConfig(BaseModel):
    """``routes[n].match``: every condition given must hold."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    webhook: str | None = None
    header: dict[str, str] = Field(default_factory=dict)
    json_fields: dict[str, Any] = Field(default_factory=dict, alias="json")

    @field_validator("webhook")
    @classmethod
    def _check_webhook(cls, value: str | None) -> str | None:
        if value is not None:
            compile_glob(value)
        return value

    @field_validator("header")
    @classmethod
    def _check_header(cls, value: dict[str, str]) -> dict[str, str]:
        for name, pattern in value.items():
            if not name or not name.isascii() or any(c in name for c in " :\t\r\n"):
                raise ValueError(f"bad header name {name!r}")
            try:
                compile_glob(pattern)
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
        return value

    @field_validator("json_fields")
    @classmethod
    def _check_json(cls, value: dict[str, Any]) -> dict[str, Any]:
        for path, expected in value.items():
            parse_json_path(path)
            try:
                value_test(expected)
            except ValueError as exc:
                raise ValueError(f"{path}: {exc}") from None
        return value

    @model_validator(mode="after")
    def _not_empty(self) -> MatchConfig:
        if self.webhook is None and not self.header and not self.json_fields:
            raise ValueError(
                "empty match: give webhook, header or json (default_target takes the rest)"
            )
        return self


class _Message:
    """One message as the conditions see it; its body is parsed on first need only."""

    __slots__ = ("webhook_id", "headers", "body", "_document")

    def __init__(self, webhook_id: str, headers: Sequence[tuple[str, str]], body: bytes) -> None:
        self.webhook_id = webhook_id
        self.headers = headers
        self.body = body
        self._document: Any = _MISSING

    def document(self) -> Any:
        if self._document is _MISSING:
            try:
                self._document = json.loads(self.body)
            except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
                self._document = _NOT_JSON
        return self._document

    def header_values(self, lower_name: str) -> Iterable[str]:
        return (value for name, value in self.headers if name.lower() == lower_name)


Condition = Callable[[_Message], bool]


def _webhook_condition(pattern: str) -> Condition:
    if GLOB_CHARS.isdisjoint(pattern):
        return lambda message: message.webhook_id == pattern
    regex = compile_glob(pattern)
    return lambda message: regex.fullmatch(message.webhook_id) is not None


def _header_condition(name: str, pattern: str) -> Condition:
    lower = name.lower()
    regex = compile_glob(pattern)
    return lambda message: any(regex.fullmatch(v) for v in message.header_values(lower))


def _json_condition(path: str, expected: Any) -> Condition:
    keys = parse_json_path(path)
    test = value_test(expected)

    def holds(message: _Message) -> bool:
        document = message.document()
        if document is _NOT_JSON:
            return False
        found = resolve(document, keys)
        return found is not _MISSING and test(found)

    return holds


def compile_match(match: MatchConfig) -> tuple[Condition, ...]:
    """The conditions of one match, cheapest first (the body is parsed last, if at all)."""
    conditions: list[Condition] = []
    if match.webhook is not None:
        conditions.append(_webhook_condition(match.webhook))
    conditions += [_header_condition(n, p) for n, p in match.header.items()]
    conditions += [_json_condition(p, v) for p, v in match.json_fields.items()]
    return tuple(conditions)


def _events_condition(events: Sequence[str]) -> Condition:
    tests = [value_test(event) for event in events]

    def wanted(message: _Message) -> bool:
        for value in message.header_values(EVENT_HEADER):
            if any(test(value) for test in tests):
                return True
        document = message.document()
        if document is _NOT_JSON:
            return False
        found = resolve(document, EVENT_FIELD)
        return found is not _MISSING and any(test(found) for test in tests)

    return wanted


class Router:
    """Chooses a route for each message: the first whose conditions all hold."""

    def __init__(self, matches: Sequence[MatchConfig], events: Sequence[str] = ()) -> None:
        self._routes = tuple(compile_match(match) for match in matches)
        self._events = _events_condition(events) if events else None

    def decide(self, webhook_id: str, headers: Sequence[tuple[str, str]], body: bytes) -> int:
        """The index of the route taking the message, or :data:`DEFAULT` (no route took it),
        or :data:`UNMATCHED` (the events filter refused it)."""
        message = _Message(webhook_id, headers, body)
        if self._events is not None and not self._events(message):
            return UNMATCHED
        for index, conditions in enumerate(self._routes):
            if all(condition(message) for condition in conditions):
                return index
        return DEFAULT


def split_events(value: Any) -> Any:
    """``"push, issues"`` (a flag or variable) → ``["push", "issues"]``; lists pass through."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def events_text(names: Any) -> str:
    """The events filter as one comma-separated string (how a flag gives it), each name
    checked: a non-empty string without a comma, a glob that parses; ValueError otherwise."""
    if not isinstance(names, list | tuple) or not names:
        raise ValueError("expected event names: a list, or one string separated by commas")
    for name in names:
        if not isinstance(name, str) or not name.strip() or "," in name:
            raise ValueError(f"bad event name {name!r}: a non-empty name without commas")
        value_test(name.strip())
    return ",".join(name.strip() for name in names)
