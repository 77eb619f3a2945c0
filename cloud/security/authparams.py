"""RFC 7235 auth-parameters, as Digest and OAuth 1 send them in ``Authorization``."""

from __future__ import annotations

import re

# One ``name=token`` or ``name="quoted string"`` and the comma after it (RFC 7235 auth-param).
PARAMETER = re.compile(
    r"""\s*(?P<name>[!#$%&'*+.^_`|~0-9A-Za-z-]+)\s*=\s*
    (?:"(?P<quoted>(?:[^"\\]|\\.)*)"|(?P<token>[^\s,"]*))\s*(?:,|$)""",
    re.VERBOSE,
)
QUOTED_PAIR = re.compile(r"\\(.)")


def parse_parameters(text: str, fold_case: bool = False) -> dict[str, str] | None:
    """``k=v, k="quoted \\" value"`` (RFC 7235 auth-params) as a dict, names lower-cased when
    ``fold_case``; None when malformed or when a name repeats."""
    found: dict[str, str] = {}
    position, end = 0, len(text.rstrip())
    while position < end:
        match = PARAMETER.match(text, position)
        if match is None or match.end() == position:
            return None
        name = match.group("name").lower() if fold_case else match.group("name")
        quoted = match.group("quoted")
        value = match.group("token") if quoted is None else QUOTED_PAIR.sub(r"\1", quoted)
        if name in found:  # a repeated parameter is ambiguous: refuse rather than pick one
            return None
        found[name] = value
        position = match.end()
    return found
