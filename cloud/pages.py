"""The cloud's own HTML pages (``/ui``, ``/docs``), assembled at load from ``cloud/static/``.

Each page is one document with its style and script inline, so it needs no second request and
its Content-Security-Policy can allow exactly that style and that script, pinned by their
SHA-256 (CSP 3 hash-source): an injected ``<script>`` or ``onerror=`` would not run. The hashes
are computed here from the files as loaded, so editing a file never leaves a stale hash.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.resources
from dataclasses import dataclass

# Package data of webhook_connect.cloud (pyproject.toml lists it for the wheel).
STATIC = "static"


def asset(name: str) -> str:
    """The text of ``cloud/static/<name>``."""
    return (importlib.resources.files("webhook_connect.cloud") / STATIC / name).read_text("utf-8")


def source_hash(text: str) -> str:
    """A CSP source for exactly this inline script or style (CSP 3, hash-source)."""
    digest = base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()
    return f"'sha256-{digest}'"


@dataclass(frozen=True)
class Page:
    """An HTML page with its one inline style and one inline script, and the headers that
    allow exactly those two."""

    html: str
    headers: dict[str, str]


def build_page(title: str, name: str, data: str = "") -> Page:
    """The page ``<name>.html`` with ``<name>.css`` and ``<name>.js`` inline.

    ``data`` (a JSON document, not executed, so no CSP source is needed for it) is placed in a
    ``<script type="application/json" id="page-data">`` the page's script may read.
    """
    style, body, script = asset(f"{name}.css"), asset(f"{name}.html"), asset(f"{name}.js")
    # "</" would end the data block; JSON reads the escaped "<\/" as the same two characters.
    safe = data.replace("</", "<\\/")
    block = f'<script type="application/json" id="page-data">{safe}</script>' if data else ""
    html = (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{title}</title>"
        f"<style>{style}</style></head><body>{body}{block}<script>{script}</script></body></html>\n"
    )
    headers = {
        "content-security-policy": (
            f"default-src 'none'; script-src {source_hash(script)}; "
            f"style-src {source_hash(style)}; connect-src 'self'; base-uri 'none'; "
            "form-action 'none'; frame-ancestors 'none'"
        ),
        "referrer-policy": "no-referrer",
        "x-content-type-options": "nosniff",
    }
    return Page(html, headers)
