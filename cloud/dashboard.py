"""``GET /ui``: the operator's dashboard, one self-contained page over the admin API.

The page holds no data and no secret, so it is public; every figure on it comes from
``/admin/...`` (docs/ADMIN.md) with the admin token the operator types in, kept in
``sessionStorage`` (gone with the tab). What a webhook sender or a connector controls (message
ids, nack reasons, connector names) reaches the page, so the script builds the DOM with
``textContent`` only, and the Content-Security-Policy allows no script but the page's own
(pinned by its hash, cloud/pages.py): an injected ``<script>`` or ``onerror=`` would not run
even if it got in. The page itself is in ``cloud/static/dashboard.{html,css,js}``.
"""

from __future__ import annotations

import orjson
from starlette.requests import Request
from starlette.responses import HTMLResponse

from webhook_connect.cloud.pages import build_page
from webhook_connect.shared.limits import LIMIT_NAMES

# cloud/static/dashboard.{html,css,js}, read once when the cloud starts; the limits a channel
# shows are those of shared/limits.py.
PAGE = build_page(
    "Webhook Connect: dashboard", "dashboard", orjson.dumps({"limits": LIMIT_NAMES}).decode()
)


async def dashboard(request: Request) -> HTMLResponse:
    """``GET /ui``: the dashboard page (public: it holds no data; it asks for the admin token)."""
    return HTMLResponse(PAGE.html, headers=PAGE.headers)
