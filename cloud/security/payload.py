"""What a body may be: valid JSON for a ``json`` webhook, within depth and string-length limits,
and conforming to ``json_schema`` where one is configured.

Limits are checked without a tree walk when the bytes alone prove them: a document with fewer
than ``max_depth`` opening brackets cannot nest deeper, and no string is longer than the body.
"""

from __future__ import annotations

from typing import Any

from jsonschema.exceptions import best_match
from jsonschema.validators import validator_for
from referencing import Registry

from webhook_connect.cloud.security import jsondoc
from webhook_connect.cloud.security.inbound import Rejected


class PayloadRules:
    """The body checks of one webhook, compiled once."""

    def __init__(
        self,
        *,
        require_json: bool,
        max_depth: int,
        max_string_length: int,
        schema: dict[str, Any] | None,
    ) -> None:
        self.require_json = require_json or schema is not None
        self.max_depth = max_depth
        self.max_string_length = max_string_length
        # An empty registry: a $ref can only point inside the schema, never fetch anything.
        self._validator = (
            None if schema is None else validator_for(schema)(schema, registry=Registry())
        )

    def check(self, body: bytes) -> Any:
        """Raise :class:`Rejected` (400 or 422) with the reason; return the parsed document."""
        if not self.require_json:
            return None
        if not body:
            raise Rejected(400, "invalid_json", "the body is empty; this webhook expects JSON")
        document = parse_json(body)
        if body.count(b"{") + body.count(b"[") > self.max_depth:
            depth = json_depth(document)
            if depth > self.max_depth:
                detail = f"JSON nests {depth} levels deep; the limit is {self.max_depth}"
                raise Rejected(400, "payload_too_deep", detail)
        if len(body) > self.max_string_length:
            longest = longest_string(document)
            if longest > self.max_string_length:
                detail = (
                    f"a JSON string has {longest} characters; the limit is {self.max_string_length}"
                )
                raise Rejected(400, "string_too_long", detail)
        if self._validator is not None:
            error = best_match(self._validator.iter_errors(document))
            if error is not None:
                where = "/".join(str(part) for part in error.absolute_path) or "(root)"
                raise Rejected(422, "schema_violation", f"{where}: {error.message}")
        return document


def parse_json(body: bytes) -> Any:
    """The body as a document, or :class:`Rejected` 400 (``invalid_json``, or
    ``payload_too_deep`` when it nests too deeply to parse at all)."""
    try:
        return jsondoc.loads(body)
    except RecursionError:
        raise Rejected(400, "payload_too_deep", "JSON nests too deeply to parse") from None
    except ValueError as exc:
        raise Rejected(400, "invalid_json", f"the body is not valid JSON: {exc}") from None


def json_depth(document: Any) -> int:
    """How deeply arrays and objects nest (a scalar is 0, ``[]`` is 1)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(document, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            depth += 1
            stack.extend((value, depth) for value in node.values())
        elif isinstance(node, list):
            depth += 1
            stack.extend((value, depth) for value in node)
        deepest = max(deepest, depth)
    return deepest


def longest_string(document: Any) -> int:
    """The length of the longest string, keys included."""
    longest = 0
    stack = [document]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            longest = max(longest, len(node))
        elif isinstance(node, dict):
            longest = max([longest, *(len(key) for key in node)])
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return longest
