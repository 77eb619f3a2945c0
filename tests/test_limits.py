"""A channel's limits are defined once (shared/limits.py): the config file, the admin API, the
CLI, storage and the dashboard all have every limit, with the same defaults and bounds."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from playwright.sync_api import Page, expect
from pydantic import ValidationError

from tests.servers import running
from tests.test_dashboard import ADMIN, log_in, row, start

# The dashboard's tests' Chromium and tab, as fixtures of this module too.
from tests.test_dashboard import browser as browser
from tests.test_dashboard import page as page
from webhook_connect.cloud.admin.common import ChannelLimits as AdminLimits
from webhook_connect.cloud.admin.common import NewChannel, applied_limits
from webhook_connect.cloud.buffers import ChannelSpec
from webhook_connect.cloud.config import channel_spec
from webhook_connect.cloud.dashboard import PAGE
from webhook_connect.shared.admincli import channels
from webhook_connect.shared.config.webhooks import WebhookConnectSettings
from webhook_connect.shared.limits import LIMIT_NAMES, ChannelLimits, limit_values

DEFAULTS = ChannelLimits()
# A value past each limit's bound, and one on it (the bound is allowed).
OUT_OF_BOUNDS = {
    "ttl_seconds": 0,
    "max_queue_size": 0,
    "max_connections": -1,
    "max_in_flight": 0,
    "ack_timeout_seconds": 0.0,
    "max_delivery_attempts": 0,
    "retry_delay_seconds": -0.5,
    "history_seconds": -1,
    "group_idle_seconds": -1,
    "dynamic_groups": "yes",
}


def test_storage_has_every_limit_with_the_same_default() -> None:
    fields = {f.name: f.default for f in dataclasses.fields(ChannelSpec) if f.name != "name"}
    assert fields == limit_values(DEFAULTS)
    assert channel_spec("orders", DEFAULTS) == ChannelSpec("orders")


def test_webhooks_json_takes_every_limit_with_its_default() -> None:
    settings = WebhookConnectSettings(channel="orders", channel_token="t" * 8)
    assert limit_values(settings) == limit_values(DEFAULTS)
    # channel and channel_token are named first when several keys are wrong.
    assert list(WebhookConnectSettings.model_fields)[:2] == ["channel", "channel_token"]


@pytest.mark.parametrize("name", LIMIT_NAMES)
def test_every_model_refuses_the_same_out_of_bounds_value(name: str) -> None:
    wrong = {name: OUT_OF_BOUNDS[name]}
    messages = []
    for model, extra in (
        (WebhookConnectSettings, {"channel": "orders", "channel_token": "t" * 8}),
        (AdminLimits, {}),
        (NewChannel, {"name": "orders"}),
    ):
        with pytest.raises(ValidationError) as caught:
            model.model_validate({**extra, **wrong})
        (error,) = caught.value.errors(include_url=False)
        assert error["loc"] == (name,)
        messages.append(error["msg"])
    assert len(set(messages)) == 1, messages


def test_the_admin_api_leaves_out_a_limit_not_given() -> None:
    spec = ChannelSpec("orders", ttl_seconds=60, dynamic_groups=False)
    given = AdminLimits.model_validate({"max_in_flight": 3, "history_seconds": None})
    assert applied_limits(given, spec) == dataclasses.replace(spec, max_in_flight=3)
    assert set(AdminLimits.model_fields) == set(LIMIT_NAMES)


@pytest.mark.parametrize("command", ["create", "update"])
def test_the_cli_has_an_option_per_limit(command: str) -> None:
    assert isinstance(channels, click.Group)
    options = {param.name for param in channels.commands[command].params}
    assert set(LIMIT_NAMES) <= options
    out = CliRunner().invoke(channels, [command, "--help"]).output
    assert "--group-idle-seconds" in out and "--no-dynamic-groups" in out


def test_the_cli_refuses_what_the_api_would() -> None:
    result = CliRunner().invoke(channels, ["update", "orders", "--max-in-flight", "0"])
    assert result.exit_code == 2
    assert "0 is not in the range x>=1" in result.output


def page_limits() -> list[str]:
    found = re.search(r'<script type="application/json" id="page-data">(.*?)</script>', PAGE.html)
    assert found is not None
    limits: list[str] = json.loads(found.group(1))["limits"]
    return limits


def test_the_dashboard_page_carries_every_limit() -> None:
    assert page_limits() == list(LIMIT_NAMES)


def as_javascript_shows(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return f"{value:g}" if isinstance(value, float) else str(value)


def test_the_dashboard_shows_every_limit_of_a_channel(page: Page, tmp_path: Path) -> None:
    """The page used to list seven limits of its own and miss history_seconds and the rest."""
    with running(start(tmp_path, "--admin-token", ADMIN)) as cloud:
        log_in(page, cloud)
        row(page, "channel-row", channel="dev").click()
        limits = page.locator("#limits")
        for name, value in limit_values(DEFAULTS).items():
            expect(limits.locator(f'[data-field="{name}"]')).to_have_text(
                as_javascript_shows(value)
            )
