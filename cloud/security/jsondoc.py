"""A webhook body as a JSON document: fast with orjson, and right where orjson is too strict.

orjson refuses some valid JSON: a number beyond a double (``1e400``) or a lone surrogate
escape. The cloud stores a body as received and validates only its structure, so what orjson
refuses is judged again by the standard library, strictly: UTF-8 only, and none of its
extensions (``NaN``, ``Infinity``).
"""

from __future__ import annotations

import json
from typing import Any

import orjson

# Python converts at most 4,300 digits to an int (a ValueError beyond).
MAX_INT_DIGITS = 4000


def loads(body: bytes) -> Any:
    """The document; ``ValueError`` (orjson's reason) when ``body`` is not JSON, and
    ``RecursionError`` when it nests too deeply to parse."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        first = exc
    try:
        return json.loads(
            body.decode("utf-8"), parse_constant=_refuse_constant, parse_int=_parse_int
        )
    except RecursionError:
        raise
    except ValueError:  # not UTF-8, or not JSON
        raise first from None


def _parse_int(text: str) -> int | float:
    # Only the structure is validated: a longer integer is kept as a float (infinite) rather
    # than refused.
    return int(text) if len(text) <= MAX_INT_DIGITS else float(text)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")
