"""``--public-url``: each webhook's full ingest URL, ready to paste into a provider's settings,
at start-up, in the admin API, in ``channels show|create`` and on the dashboard."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.servers import REPO, Cloud, running, wait_until
from webhook_connect.cloud.publicurl import bound_base, ingest_url, validate_public_url
from webhook_connect.shared.exceptions import ConfigError

ADMIN = "public-url-admin-token-01"
PUBLIC = "https://hooks.example.com/relay"
DEV = {"channel": "dev", "channel_token": "public-url-dev-token"}
WEBHOOKS = {
    "github": {"module": "webhook_connect", "module-config": DEV},
    "stripe": {"module": "webhook_connect", "module-config": DEV},
    "billing": {
        "module": "webhook_connect",
        "module-config": {"channel": "billing", "channel_token": "public-url-billing-token"},
    },
}
AS_ADMIN = {"Authorization": f"Bearer {ADMIN}"}


# Pure ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "base"),
    [
        ("https://hooks.example.com", "https://hooks.example.com"),
        ("https://hooks.example.com/", "https://hooks.example.com"),
        ("https://hooks.example.com/relay/", "https://hooks.example.com/relay"),
        ("http://[2001:db8::1]:8443", "http://[2001:db8::1]:8443"),
        (" https://h.example:443/a ", "https://h.example:443/a"),
    ],
)
def test_a_public_url_is_a_base_without_trailing_slash(given: str, base: str) -> None:
    assert validate_public_url(given) == base


@pytest.mark.parametrize(
    ("given", "reason"),
    [
        ("hooks.example.com", "absolute http(s) URL"),
        ("/relay", "absolute http(s) URL"),
        ("ftp://hooks.example.com", "absolute http(s) URL"),
        ("https://", "absolute http(s) URL"),
        ("https://hooks.example.com/?a=1", "query or a fragment"),
        ("https://hooks.example.com/?", "query or a fragment"),
        ("https://hooks.example.com/#top", "query or a fragment"),
        ("https://user:pw@hooks.example.com", "user name or password"),
        ("https://hooks.example.com:99999", "not a URL"),
    ],
)
def test_a_bad_public_url_is_refused_naming_the_flag(given: str, reason: str) -> None:
    with pytest.raises(ConfigError) as refused:
        validate_public_url(given)
    assert str(refused.value).startswith("--public-url: ")
    assert reason in str(refused.value)


def test_ingest_urls_quote_the_id_whole() -> None:
    assert ingest_url("https://h.example/", "gh") == "https://h.example/webhook/gh"
    assert ingest_url("https://h.example", "a b/c?d") == "https://h.example/webhook/a%20b%2Fc%3Fd"
    assert bound_base("::1", 8000) == "http://[::1]:8000"
    assert bound_base("0.0.0.0", 80) == "http://0.0.0.0:80"


# The real command ------------------------------------------------------------------------------


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("WEBHOOK_CONNECT_")}
    return subprocess.run(
        [sys.executable, "-m", "webhook_connect", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**clean, "PYTHONPATH": str(REPO), **(env or {})},
    )


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (["--public-url", "hooks.example.com"], {}),
        ([], {"WEBHOOK_CONNECT_PUBLIC_URL": "https://hooks.example.com/?x=1"}),
    ],
)
def test_the_cloud_stops_with_exit_2_on_a_bad_public_url(
    args: list[str], env: dict[str, str]
) -> None:
    result = run_cli("cloud", *args, env=env)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("webhook-connect: configuration error: --public-url: ")


def write_webhooks(workdir: Path) -> Path:
    path = workdir / "webhooks.json"
    path.write_text(json.dumps(WEBHOOKS))
    return path


@pytest.fixture(scope="module")
def public_cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cloud]:
    workdir = tmp_path_factory.mktemp("public-url")
    cloud = Cloud(
        f"sqlite:///{workdir / 'b.db'}",
        write_webhooks(workdir),
        workdir,
        "--admin-token",
        ADMIN,
        "--public-url",
        PUBLIC + "/",
        "--log-format",
        "text",
        "--workers",
        "2",
    )
    with running(cloud):
        yield cloud


def test_start_up_lines_name_every_webhook_url(public_cloud: Cloud) -> None:
    log = public_cloud.log.read_text()
    assert f"webhook github: {PUBLIC}/webhook/github (channel dev)" in log
    assert f"webhook stripe: {PUBLIC}/webhook/stripe (channel dev)" in log
    assert f"webhook billing: {PUBLIC}/webhook/billing (channel billing)" in log
    assert log.count(f"{PUBLIC}/webhook/github") == 1  # once, not once per worker


def test_the_admin_api_gives_the_urls_of_the_webhooks_feeding_a_channel(
    public_cloud: Cloud,
) -> None:
    shown = httpx.get(f"{public_cloud.url}/admin/channels/dev", headers=AS_ADMIN).json()
    assert shown["channel"]["webhook_urls"] == {
        "github": f"{PUBLIC}/webhook/github",
        "stripe": f"{PUBLIC}/webhook/stripe",
    }
    listed = httpx.get(f"{public_cloud.url}/admin/channels", headers=AS_ADMIN).json()
    by_name = {channel["name"]: channel["webhook_urls"] for channel in listed["channels"]}
    assert by_name["billing"] == {"billing": f"{PUBLIC}/webhook/billing"}


def test_channels_show_and_create_print_the_urls(public_cloud: Cloud) -> None:
    env = {"WEBHOOK_CONNECT_CLOUD_URL": public_cloud.url, "WEBHOOK_CONNECT_ADMIN_TOKEN": ADMIN}
    show = run_cli("channels", "show", "dev", env=env)
    assert show.returncode == 0, show.stderr
    lines = show.stdout.splitlines()
    start = lines.index("webhook URLs:")
    assert lines[start + 1].split() == ["github", f"{PUBLIC}/webhook/github"]
    assert lines[start + 2].split() == ["stripe", f"{PUBLIC}/webhook/stripe"]

    # A channel of webhooks.json made again through the API: its webhook is back in use.
    deleted = run_cli("channels", "delete", "billing", "--yes", env=env)
    assert deleted.returncode == 0, deleted.stderr
    created = run_cli("channels", "create", "billing", env=env)
    assert created.returncode == 0, created.stderr
    assert f"billing  {PUBLIC}/webhook/billing" in created.stdout
    fresh = run_cli("channels", "create", "orders", env=env)
    assert fresh.returncode == 0, fresh.stderr
    assert "webhook URLs:\n  none: add a webhook with this channel to webhooks.json" in fresh.stdout
    as_json = run_cli("channels", "show", "dev", "--json", env=env)
    assert json.loads(as_json.stdout)["channel"]["webhook_urls"]["github"].startswith(PUBLIC)


def test_without_a_public_url_the_address_in_use_is_shown(tmp_path: Path) -> None:
    cloud = Cloud(
        f"sqlite:///{tmp_path / 'b.db'}",
        write_webhooks(tmp_path),
        tmp_path,
        "--admin-token",
        ADMIN,
        "--log-format",
        "text",
    )
    with running(cloud):
        # The admin API answers with the address the operator reached the cloud by.
        through = {**AS_ADMIN, "Host": "relay.internal:8443"}
        shown = httpx.get(f"{cloud.url}/admin/channels/billing", headers=through).json()
        direct = httpx.get(f"{cloud.url}/admin/channels/billing", headers=AS_ADMIN).json()
        # A webhook added by a reload is announced too.
        webhooks = {**WEBHOOKS, "shopify": WEBHOOKS["github"]}
        (tmp_path / "webhooks.json").write_text(json.dumps(webhooks))
        new_line = f"webhook shopify: {cloud.url}/webhook/shopify (channel dev) (new)"
        wait_until(lambda: new_line in cloud.log.read_text(), what="the reloaded webhook's URL")
    assert shown["channel"]["webhook_urls"] == {
        "billing": "http://relay.internal:8443/webhook/billing"
    }
    assert direct["channel"]["webhook_urls"] == {"billing": f"{cloud.url}/webhook/billing"}
    log = cloud.log.read_text()
    assert f"webhook github: {cloud.url}/webhook/github (channel dev)" in log
    assert "give --public-url" in log


def test_the_dashboard_shows_the_urls(public_cloud: Cloud) -> None:
    playwright_api = pytest.importorskip("playwright.sync_api")
    chromium = Path("/usr/bin/chromium")
    if not chromium.exists():
        raise RuntimeError("chromium is not installed: run scripts/test (it installs it)")
    expect = playwright_api.expect
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium, headless=True, args=["--no-sandbox", "--disable-gpu"]
        )
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(f"{public_cloud.url}/ui")
            page.fill("#login-token", ADMIN)
            page.click("#login-submit")
            page.locator('[data-testid="channel-row"][data-channel="dev"]').click()
            row = page.locator('[data-testid="webhook-url-row"][data-webhook-id="github"]')
            expect(row).to_have_text(f"github{PUBLIC}/webhook/github", timeout=15_000)
            urls = page.locator('[data-testid="webhook-url-row"] [data-field="url"]')
            expect(urls).to_have_text([f"{PUBLIC}/webhook/github", f"{PUBLIC}/webhook/stripe"])
            assert errors == []
        finally:
            browser.close()
