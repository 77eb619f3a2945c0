"""The address webhook providers use: each webhook's full ingest URL, ready to paste.

A provider (GitHub, Stripe, ...) needs the URL it will POST to, which is the address in front
of the cloud (a reverse proxy, a load balancer), not the one the cloud binds. ``--public-url``
names it; without one the admin API derives it from the request it answers and the start-up
lines use the bound address. Pure functions: tested without a server.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from urllib.parse import quote, urlsplit

from webhook_connect.shared.config import Webhook
from webhook_connect.shared.exceptions import ConfigError

INGEST_PATH = "/webhook/"
FLAG = "--public-url"


def validate_public_url(value: str) -> str:
    """``value`` as a base URL without a trailing slash; :class:`ConfigError` if unusable.

    It must be absolute ``http``/``https`` with a host, and carry no query, fragment or
    credentials: every ingest URL is this plus ``/webhook/<id>``, and a provider would send
    anything else along with every delivery.
    """
    try:
        parts = urlsplit(value.strip())
        parts.port  # noqa: B018 - raises ValueError on a port out of range or not a number
    except ValueError as exc:
        raise ConfigError(FLAG, "", f"{value!r} is not a URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(FLAG, "", f"{value!r}: must be an absolute http(s) URL with a host")
    if parts.query or parts.fragment or value.rstrip().endswith(("?", "#")):
        raise ConfigError(FLAG, "", f"{value!r}: must not have a query or a fragment")
    if parts.username is not None or parts.password is not None:
        raise ConfigError(FLAG, "", f"{value!r}: must not hold a user name or password")
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"


def bound_base(host: str, port: int) -> str:
    """The base URL of the address the cloud listens on (``http://127.0.0.1:8000``)."""
    try:
        is_v6 = ipaddress.ip_address(host).version == 6
    except ValueError:
        is_v6 = False
    return f"http://{'[' + host + ']' if is_v6 else host}:{port}"


def ingest_url(base: str, webhook_id: str) -> str:
    """``base`` + ``/webhook/<id>``, the id percent-encoded whole (it may hold any character)."""
    return base.rstrip("/") + INGEST_PATH + quote(webhook_id, safe="")


def ingest_urls(
    base: str, webhooks: Iterable[Webhook], channel: str | None = None
) -> dict[str, str]:
    """Webhook id → ingest URL, sorted by id; only the webhooks feeding ``channel`` if given."""
    chosen = [w for w in webhooks if channel is None or w.relay.channel == channel]
    return {w.webhook_id: ingest_url(base, w.webhook_id) for w in sorted(chosen, key=_id)}


def start_up_lines(base: str, webhooks: Mapping[str, Webhook]) -> list[str]:
    """One line per webhook for the start-up log: its URL and where its messages go."""
    lines = []
    for webhook in sorted(webhooks.values(), key=_id):
        where = (
            "delivered by the cloud" if webhook.is_direct else f"channel {webhook.relay.channel}"
        )
        lines.append(
            f"webhook {webhook.webhook_id}: {ingest_url(base, webhook.webhook_id)} ({where})"
        )
    return lines


def _id(webhook: Webhook) -> str:
    return webhook.webhook_id
