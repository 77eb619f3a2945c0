"""The dashboard (``GET /ui``) in a real headless Chromium, against the real cloud.

Chromium is the system one (Debian ``chromium``, which scripts/test installs), driven by
Playwright over CDP; nothing is downloaded. Every wait is an auto-waiting expectation on what
the operator would see.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import (
    BrowserContext,
    ConsoleMessage,
    Locator,
    Page,
    expect,
    sync_playwright,
)

from tests.servers import Cloud, running

ADMIN = "dashboard-admin-token-0123"
TOKEN = "dev-channel-token"
WEBHOOKS = {
    "hook": {
        "module": "webhook_connect",
        "data_type": "json",
        "module-config": {"channel": "dev", "channel_token": TOKEN},
    }
}
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# The page refreshes every 2 s; leave room for a loaded machine.
expect.set_options(timeout=15_000)
# A nack reason is the connector's to choose; the page must show it as text, never run it.
HOSTILE = '<img src=x onerror="window.injected=1"><script>window.injected=2</script>'


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrowserContext]:
    """One Chromium for the module, with a fresh profile; closed whatever happened."""
    if not CHROMIUM.exists():
        raise RuntimeError("chromium is not installed: run scripts/test (it installs it)")
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            tmp_path_factory.mktemp("chromium-profile"),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
        )
        try:
            yield context
        finally:
            context.close()


@pytest.fixture
def page(browser: BrowserContext) -> Iterator[Page]:
    """A new tab, so a new ``sessionStorage``: nobody is logged in. The page must run without
    a script error or a Content-Security-Policy refusal (the refused admin calls aside)."""
    tab = browser.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda error: errors.append(str(error)))
    tab.on("console", lambda message: _record_error(message, errors))
    try:
        yield tab
    finally:
        tab.close()
    assert errors == []


def _record_error(message: ConsoleMessage, errors: list[str]) -> None:
    # Chromium logs every non-2xx fetch; a 401 or 404 answer is part of the test.
    if message.type == "error" and not message.text.startswith("Failed to load resource"):
        errors.append(message.text)


def start(workdir: Path, *extra: str) -> Cloud:
    path = workdir / "webhooks.json"
    path.write_text(json.dumps(WEBHOOKS))
    return Cloud(f"sqlite:///{workdir / 'buffer.db'}", path, workdir, *extra)


def poll(cloud: Cloud, channel: str, token: str, timeout: int = 2) -> httpx.Response:
    return httpx.get(
        f"{cloud.url}/connect/stream/{channel}/poll",
        params={"timeout": timeout},
        headers={"Authorization": f"Bearer {token}"},
        timeout=timeout + 10,
    )


def log_in(page: Page, cloud: Cloud, token: str = ADMIN) -> None:
    page.goto(f"{cloud.url}/ui")
    expect(page.locator("#login-form")).to_be_visible()
    page.fill("#login-token", token)
    page.click("#login-submit")


def row(page: Page, testid: str, **data: str) -> Locator:
    selector = f'[data-testid="{testid}"]'
    selector += "".join(
        f'[data-{name.replace("_", "-")}="{value}"]' for name, value in data.items()
    )
    return page.locator(selector)


def test_log_in_create_a_channel_watch_a_webhook_and_replay_its_dead_letter(
    page: Page, tmp_path: Path
) -> None:
    with running(start(tmp_path, "--admin-token", ADMIN)) as cloud:
        log_in(page, cloud, token="not-the-admin-token-000")
        expect(page.locator("#login-error")).to_have_text("The admin token was refused.")
        expect(page.locator("#app")).to_be_hidden()
        page.fill("#login-token", ADMIN)
        page.click("#login-submit")
        expect(page.locator("#login")).to_be_hidden()
        dev = row(page, "channel-row", channel="dev")
        expect(dev).to_be_visible()

        page.fill("#create-name", "made-in-ui")
        page.click("#create-submit")
        expect(row(page, "channel-row", channel="made-in-ui")).to_be_visible()
        shown_token = page.locator("#created-value")
        expect(shown_token).to_have_text(re.compile(r"^wct_\S+$"))
        assert poll(cloud, "made-in-ui", shown_token.inner_text(), timeout=1).status_code == 204

        answer = httpx.post(f"{cloud.url}/webhook/hook", json={"order": 1})
        assert answer.status_code == 202, answer.text
        message_id = answer.json()["message_id"]
        expect(dev.locator('[data-field="depth"]')).to_have_text("1")
        dev.click()
        expect(page.locator("#detail-name")).to_have_text("dev")
        expect(row(page, "event-row", type="received", message_id=message_id)).to_be_visible()

        taken = poll(cloud, "dev", TOKEN).json()
        assert [m["message_id"] for m in taken["messages"]] == [message_id]
        expect(row(page, "connection-row", connection_id=taken["connection_id"])).to_be_visible()
        nack = {"message_id": message_id, "status": "nack", "retry": False, "reason": HOSTILE}
        headers = {"Authorization": f"Bearer {TOKEN}", "X-Connection-ID": taken["connection_id"]}
        assert httpx.post(f"{cloud.url}/connect/ack", json=nack, headers=headers).is_success

        letter = row(page, "dead-letter-row", message_id=message_id)
        expect(letter.locator('[data-field="reason"]')).to_have_text(HOSTILE)
        tried = letter.locator('[data-field="delivery_attempts"]')
        expect(tried).to_have_text(re.compile(r"^#1 .* ms$"))
        expect(tried).to_contain_text(HOSTILE)
        expect(dev.locator('[data-field="dead_letters"]')).to_have_text("1")
        expect(row(page, "event-row", type="dead_lettered", message_id=message_id)).to_be_visible()
        assert page.evaluate("() => window.injected") is None

        letter.get_by_test_id("replay").click()
        expect(row(page, "dead-letter-row")).to_have_count(0)
        expect(dev.locator('[data-field="dead_letters"]')).to_have_text("0")
        again = poll(cloud, "dev", TOKEN).json()
        assert [m["payload"] for m in again["messages"]] == [{"order": 1}]
        replayed_id = again["messages"][0]["message_id"]
        assert replayed_id != message_id  # a replay is a new message

        # Dead again, then purged for good (after the browser's confirm()).
        nack["message_id"] = replayed_id
        headers["X-Connection-ID"] = again["connection_id"]
        assert httpx.post(f"{cloud.url}/connect/ack", json=nack, headers=headers).is_success
        expect(row(page, "dead-letter-row", message_id=replayed_id)).to_be_visible()
        page.once("dialog", lambda dialog: dialog.accept())
        page.click("#purge-all")
        expect(page.locator("#status")).to_have_text("Purged 1")
        expect(row(page, "dead-letter-row")).to_have_count(0)
        assert poll(cloud, "dev", TOKEN, timeout=1).status_code == 204


def test_issue_rotate_and_revoke_tokens_and_disconnect_a_connector(
    page: Page, tmp_path: Path
) -> None:
    with running(start(tmp_path, "--admin-token", ADMIN)) as cloud:
        log_in(page, cloud)
        row(page, "channel-row", channel="dev").click()
        expect(page.locator("#detail-name")).to_have_text("dev")

        connection_id = poll(cloud, "dev", TOKEN, timeout=1).headers["x-connection-id"]
        connection = row(page, "connection-row", connection_id=connection_id)
        connection.get_by_test_id("disconnect").click()
        expect(connection).to_have_count(0)

        page.fill("#issue-label", "laptop")
        page.click("#issue-submit")
        new_token = page.locator("#new-token-value")
        expect(new_token).to_have_text(re.compile(r"^wct_\S+$"))
        issued = new_token.inner_text()
        expect(page.get_by_test_id("token-row").filter(has_text="laptop")).to_be_visible()
        assert poll(cloud, "dev", issued, timeout=1).status_code == 204

        page.fill("#rotate-grace", "0")
        page.once("dialog", lambda dialog: dialog.accept())
        page.click("#rotate-submit")
        expect(new_token).not_to_have_text(issued)
        rotated = new_token.inner_text()
        assert poll(cloud, "dev", issued, timeout=1).status_code == 401
        assert poll(cloud, "dev", rotated, timeout=1).status_code == 204

        # The rotated token is the one that does not expire.
        survivor = page.get_by_test_id("token-row").filter(
            has=page.locator('[data-field="expires_at"]', has_text="never")
        )
        expect(survivor).to_have_count(1)
        page.once("dialog", lambda dialog: dialog.accept())
        survivor.get_by_test_id("revoke").click()
        expect(survivor).to_have_count(0)
        assert poll(cloud, "dev", rotated, timeout=1).status_code == 401


def test_without_an_admin_token_the_page_says_the_api_is_off(page: Page, tmp_path: Path) -> None:
    with running(start(tmp_path)) as cloud:
        page.goto(f"{cloud.url}/ui")
        expect(page.locator("#admin-off")).to_be_visible()
        expect(page.locator("#login")).to_be_hidden()
