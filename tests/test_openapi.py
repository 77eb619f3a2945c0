"""``/openapi.json`` and ``/docs``: off for strangers, generic with ``--public-docs``, every
webhook with the admin token; the document covers ingest, the connector API and the admin API.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.routing import Route, WebSocketRoute

from tests.servers import REPO, Cloud, running
from webhook_connect.cloud.app import CloudApp
from webhook_connect.cloud.config import build_cloud_config
from webhook_connect.cloud.openapi import openapi_document
from webhook_connect.cloud.security.guard import OFFLINE, build_guards

ADMIN = "openapi-admin-token-0123"
TOKEN = "openapi-channel-token-1"
HMAC_SECRET = "hmac-secret-never-shown"
RELAY = {"channel": "dev", "channel_token": TOKEN}
WEBHOOKS: dict[str, Any] = {
    "wide-open-hook": {"module": "webhook_connect", "module-config": RELAY},
    "two": {
        "module": "webhook_connect",
        "authorization": "Bearer s3cret-bearer-token",
        "hmac": {"secret": HMAC_SECRET},
        "module-config": RELAY,
    },
    "query": {
        "module": "webhook_connect",
        "query_auth": {"parameter_name": "api_key", "api_key": "query-key-1"},
        "module-config": RELAY,
    },
    "schema": {
        "module": "webhook_connect",
        "json_schema": {"type": "object", "required": ["event"]},
        "module-config": RELAY,
    },
}
SECRETS = ("s3cret-bearer-token", HMAC_SECRET, "query-key-1", TOKEN, ADMIN)
AS_ADMIN = {"Authorization": f"Bearer {ADMIN}"}
HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


def start(workdir: Path, *extra: str) -> Cloud:
    path = workdir / "webhooks.json"
    path.write_text(json.dumps(WEBHOOKS))
    return Cloud(f"sqlite:///{workdir / 'buffer.db'}", path, workdir, *extra)


@pytest.fixture(scope="module")
def private_cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cloud]:
    """Docs not public; an admin token configured."""
    with running(start(tmp_path_factory.mktemp("private"), "--admin-token", ADMIN)) as cloud:
        yield cloud


def test_without_public_docs_strangers_get_404(private_cloud: Cloud) -> None:
    for path in ("/openapi.json", "/docs"):
        for headers in ({}, {"Authorization": f"Bearer {TOKEN}"}, {"Authorization": "Bearer x"}):
            answer = httpx.get(private_cloud.url + path, headers=headers)
            assert answer.status_code == 404, (path, headers)
            assert answer.json()["error"] == "docs_disabled"
            assert "two" not in answer.text and "wide-open-hook" not in answer.text


def test_the_admin_token_gets_every_webhook_with_its_schemes(private_cloud: Cloud) -> None:
    answer = httpx.get(f"{private_cloud.url}/openapi.json", headers=AS_ADMIN)
    assert answer.status_code == 200
    spec = answer.json()
    assert spec["openapi"].startswith("3.1")
    ingest = {path for path in spec["paths"] if path.startswith("/webhook/")}
    assert ingest == {f"/webhook/{name}" for name in WEBHOOKS}
    two = spec["paths"]["/webhook/two"]["post"]
    assert set(two["security"][0]) == {"two.authorization", "two.hmac"}
    schemes = spec["components"]["securitySchemes"]
    assert schemes["two.authorization"] == {"type": "http", "scheme": "bearer"}
    assert schemes["query.query_auth"] == {"type": "apiKey", "in": "query", "name": "api_key"}
    assert "security" not in spec["paths"]["/webhook/wide-open-hook"]["post"]
    body = spec["paths"]["/webhook/schema"]["post"]["requestBody"]["content"]
    assert body["application/json"]["schema"]["required"] == ["event"]
    for secret in SECRETS:
        assert secret not in answer.text
    page = httpx.get(f"{private_cloud.url}/docs", headers=AS_ADMIN)
    assert page.status_code == 200 and "openapi.json" in page.text


def test_public_docs_name_no_webhook(tmp_path: Path) -> None:
    with running(start(tmp_path, "--public-docs", "--admin-token", ADMIN)) as cloud:
        answer = httpx.get(f"{cloud.url}/openapi.json")
        page = httpx.get(f"{cloud.url}/docs")
        detailed = httpx.get(f"{cloud.url}/openapi.json", headers=AS_ADMIN).json()
    assert answer.status_code == 200 and page.status_code == 200
    spec = answer.json()
    ingest = {path for path in spec["paths"] if path.startswith("/webhook/")}
    assert ingest == {"/webhook/{webhook_id}"}
    # Neither the ids nor which webhook checks what (or nothing at all).
    for name in WEBHOOKS:
        assert f"/webhook/{name}" not in answer.text
    assert "wide-open-hook" not in answer.text and "x-authentication" not in answer.text
    assert not any("." in name for name in spec["components"]["securitySchemes"])
    for secret in SECRETS:
        assert secret not in answer.text
    # The rest of the document is the same for everyone.
    public_rest = {k: v for k, v in spec["paths"].items() if not k.startswith("/webhook/")}
    admin_rest = {k: v for k, v in detailed["paths"].items() if not k.startswith("/webhook/")}
    assert public_rest == admin_rest


@pytest.mark.parametrize("detailed", [False, True])
def test_the_document_is_valid_openapi_3_1(detailed: bool, tmp_path: Path) -> None:
    validator = pytest.importorskip("openapi_spec_validator")
    path = tmp_path / "webhooks.json"
    path.write_text(json.dumps(WEBHOOKS))
    config = build_cloud_config(webhooks_path=str(path), storage_url="sqlite:///unused.db")
    guards = build_guards(config.webhooks, OFFLINE, str(path))
    validator.validate(openapi_document(guards, detailed=detailed))


def app_routes(tmp_path: Path) -> set[tuple[str, str]]:
    """(method, path) of every route the cloud serves, read from its router (no server: the
    route table is what is compared)."""
    config = build_cloud_config(storage_url=f"sqlite:///{tmp_path / 'unused.db'}")
    app = CloudApp(config)
    try:
        routes = app.router.routes  # type: ignore[attr-defined]
    finally:
        asyncio.run(app.http.aclose())
    found = set()
    for route in routes:
        if isinstance(route, WebSocketRoute):
            found.add(("get", route.path))
        elif isinstance(route, Route):
            found |= {(m.lower(), route.path) for m in route.methods or () if m != "HEAD"}
    return found


def documented(spec: dict[str, Any]) -> set[tuple[str, str]]:
    return {
        (method, path)
        for path, item in spec["paths"].items()
        for method in item
        if method in HTTP_METHODS
    }


def test_every_route_of_the_cloud_is_documented(tmp_path: Path) -> None:
    spec = openapi_document({}, detailed=False)
    served = app_routes(tmp_path) | {(m, "/webhook/{webhook_id}") for m in ("post", "put", "patch")}
    assert served == documented(spec)
    # Every operation says what it answers, and every admin one needs the admin token.
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            if method not in HTTP_METHODS:
                continue
            assert operation["responses"], (method, path)
            if path.startswith("/admin/"):
                assert operation["security"] == [{"adminToken": []}], (method, path)
                assert {"401", "503"} <= set(operation["responses"]), (method, path)
            if path.startswith(("/connect/", "/smee/")):
                assert {"channelToken": []} in operation["security"], (method, path)


def _routes_named_in(doc: str) -> set[tuple[str, str]]:
    """``METHOD /path`` as the docs write them (parameters as {name}, query strings cut)."""
    text = (REPO / "docs" / doc).read_text()
    found = set()
    for method, path in re.findall(r"`?(GET|POST|PUT|PATCH|DELETE) (/[^\s`?]*)", text):
        found.add((method.lower(), path.rstrip(".,:")))
    return found


def test_every_route_of_the_admin_and_protocol_docs_is_in_the_document() -> None:
    spec = openapi_document({}, detailed=False)
    named = _routes_named_in("ADMIN.md") | _routes_named_in("PROTOCOL.md")
    assert ("get", "/admin/channels/{channel}/dead-letters/{message_id}") in named
    assert ("post", "/connect/ack") in named
    missing = named - documented(spec)
    assert not missing, f"routes in the docs but not in the OpenAPI document: {missing}"
    # Request bodies are the models the handlers validate with.
    schemas = spec["components"]["schemas"]
    assert "token_expires_in_seconds" in schemas["NewChannel"]["properties"]
    assert "message_ids" in schemas["AckRequest"]["properties"]
    assert "webhook_urls" in schemas["Channel"]["properties"]


def test_the_docs_page_renders_in_a_browser(tmp_path: Path) -> None:
    """The page's own script draws every operation; the dashboard's login (same tab) unlocks
    the per-webhook details."""
    playwright_api = pytest.importorskip("playwright.sync_api")
    chromium = Path("/usr/bin/chromium")
    if not chromium.exists():
        raise RuntimeError("chromium is not installed: run scripts/test (it installs it)")
    expect = playwright_api.expect
    with (
        running(start(tmp_path, "--public-docs", "--admin-token", ADMIN)) as cloud,
        playwright_api.sync_playwright() as playwright,
    ):
        browser = playwright.chromium.launch(
            executable_path=chromium, headless=True, args=["--no-sandbox", "--disable-gpu"]
        )
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(f"{cloud.url}/docs")
            api = page.locator("#api")
            expect(api).to_contain_text("/admin/channels/{channel}/dead-letters/{message_id}")
            expect(api).to_contain_text("/connect/stream/{channel}/poll")
            expect(api).to_contain_text("/webhook/{webhook_id}")
            assert "wide-open-hook" not in api.inner_text()
            # Logged in to the dashboard in this tab: the page asks with the admin token.
            page.goto(f"{cloud.url}/ui")
            page.fill("#login-token", ADMIN)
            page.click("#login-submit")
            expect(page.locator("#app")).to_be_visible()
            page.goto(f"{cloud.url}/docs")
            expect(api).to_contain_text("/webhook/wide-open-hook")
            expect(api).to_contain_text("two.hmac: apiKey (header X-Hub-Signature-256)")
            assert errors == []
        finally:
            browser.close()
