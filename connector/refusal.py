"""Which answers at connect mean "this token is refused" (fatal) and which mean "try again".

Only the cloud's explicit refusal of the token ends the connector: a ``401`` whose body is the
cloud's JSON error (``{"error": "unauthorized", ...}`` from this cloud, ``{"detail": ...}`` from
the Core Webhook Module's), or the WebSocket close code 4001 after the upgrade. Everything else
at connect (a proxy's 403 or 407 page, a 404 or 502 while the cloud is being deployed, HTML,
an empty 403 from a cloud that refused the upgrade without a word) is retried with backoff and
logged with what came back, so an agent outlives its network's bad moments.
"""

from __future__ import annotations

import orjson

BODY_EXCERPT = 120
# The error codes of the cloud's JSON refusal that name the token (docs/PROTOCOL.md).
TOKEN_ERRORS = frozenset({"unauthorized", "invalid_token", "token_revoked", "token_expired"})


def token_refusal(status: int, body: bytes) -> str | None:
    """The cloud's reason when this answer is its refusal of the token, else None (pure)."""
    if status != 401:
        return None
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict):
        return None
    error, detail = data.get("error"), data.get("detail")
    if isinstance(error, str) and error in TOKEN_ERRORS:
        return f"{error}: {detail}" if isinstance(detail, str) and detail else error
    if error is None and isinstance(detail, str) and detail:
        return detail  # the Core Webhook Module's cloud: {"detail": "Invalid channel token"}
    return None


def describe_answer(status: int, body: bytes, content_type: str = "") -> str:
    """``HTTP 403 (text/html): b'<html>...'``: what came back, for the retry line (pure)."""
    kind = f" ({content_type.split(';', 1)[0].strip()})" if content_type else ""
    excerpt = body[:BODY_EXCERPT].strip()
    more = "..." if len(body) > BODY_EXCERPT else ""
    said = f": {excerpt!r}{more}" if excerpt else ", empty body"
    return f"HTTP {status}{kind}{said}"


def not_a_refusal(status: int, body: bytes, content_type: str = "") -> str:
    """The Disconnected reason of an answer at connect that is not the token's refusal."""
    return (
        f"{describe_answer(status, body, content_type)} "
        "(not the cloud's refusal of the token: a proxy, or a cloud restarting?)"
    )
