"""The Core Webhook Module's files load unchanged, and mean what they meant there.

The files under ``files/`` were written for these tests in the shapes of that project's
examples, compose scenarios and docs (every key and form they use); each is loaded with our
loaders and checked for the meaning kept: an alias became our key, an entry-level key reached
its module, a key we cannot apply produced one warning line naming the file and key path.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from webhook_connect.connector.config import load_connector_settings, load_delivery_plans
from webhook_connect.shared.config import Webhook, load_connections, load_webhooks
from webhook_connect.shared.exceptions import ConfigError

FILES = Path(__file__).parent / "files"
REPO = Path(__file__).resolve().parents[2]
# Their examples name variables without defaults; ours refuses those unset, so they are set.
ENVIRON = {
    "COMPAT_DIR": "/tmp/compat",
    "COMPAT_API_KEY": "api-key",
    "COMPAT_FORWARD_SECRET": "forward-secret",
    "COMPAT_PASSWORD": "basic-password",
    "COMPAT_JWT_SECRET": "jwt-secret",
    "COMPAT_RECAPTCHA_SECRET": "recaptcha-secret",
    "COMPAT_AUTH_TOKEN": "auth-token",
}


class Warnings:
    """The configuration warnings logged while loading, one line each."""

    def __init__(self, caplog: pytest.LogCaptureFixture) -> None:
        self._caplog = caplog

    @property
    def lines(self) -> list[str]:
        return [
            record.getMessage()
            for record in self._caplog.records
            if record.name == "webhook_connect.config"
        ]

    def about(self, path: str) -> list[str]:
        """The warnings naming key path ``path``."""
        return [line for line in self.lines if f": {path}: " in line]


@pytest.fixture
def warnings(caplog: pytest.LogCaptureFixture) -> Iterator[Warnings]:
    caplog.set_level(logging.WARNING, logger="webhook_connect.config")
    yield Warnings(caplog)


@pytest.fixture(autouse=True)
def _pubsub_emulator(monkeypatch: pytest.MonkeyPatch) -> None:
    # Their compose scenario runs gcp_pubsub against the emulator, named by this variable.
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", "127.0.0.1:8085")


def cloud_files(folder: str, environ: dict[str, str] | None = None) -> dict[str, Webhook]:
    connections_path = FILES / folder / "connections.json"
    env = ENVIRON if environ is None else environ
    connections = load_connections(connections_path if connections_path.exists() else None, env)
    return load_webhooks(FILES / folder / "webhooks.json", connections, env)


def step_config(webhook: Webhook, index: int = 0) -> dict[str, Any]:
    assert webhook.plan is not None
    return webhook.plan.steps[index].config.model_dump()


@pytest.mark.parametrize("folder", ["examples", "compose", "integration", "kubernetes", "docs"])
def test_every_cloud_file_loads(folder: str, warnings: Warnings) -> None:
    webhooks = cloud_files(folder)
    tree = json.loads((FILES / folder / "webhooks.json").read_text())
    assert set(webhooks) == {key for key in tree if not key.startswith("_")}
    for line in warnings.lines:
        assert line.startswith(f"configuration warning: {FILES / folder}/"), line
        assert len(line.splitlines()) == 1


def test_examples_keep_their_meaning(warnings: Warnings) -> None:
    webhooks = cloud_files("examples")
    rabbit = webhooks["to_rabbit"]
    assert step_config(rabbit)["queue_name"] == "orders_queue"
    assert rabbit.plan is not None and rabbit.plan.steps[0].connection_name == "rabbit_a"
    assert rabbit.entry.authorization == "Bearer rabbit_token"
    assert step_config(webhooks["all_checks"])["queue_name"] == "checked_queue"
    kafka = step_config(webhooks["to_kafka"])
    assert (kafka["topic"], kafka["key"], kafka["forward_headers"]) == (
        "compat_events",
        "event_id",
        True,
    )
    rq = step_config(webhooks["to_rq"])
    assert (rq["function"], rq["queue_name"]) == ("handle_report", "reports")
    [bare] = warnings.about("to_rq.module-config.function")
    assert "bare name" in bare and "builtins" in bare
    forward = step_config(webhooks["forward"])
    assert forward["url"] == "http://127.0.0.1:9/in"
    assert forward["headers"] == {"X-Extra": "extra", "X-Key": "api-key"}
    assert forward["timeout"] == 15
    assert webhooks["forward"].entry.authorization == "Bearer forward-secret"
    assert webhooks["by_query"].entry.query_auth is not None
    assert webhooks["by_query"].entry.query_auth.parameter_name == "key"
    assert webhooks["by_header"].entry.header_auth is not None
    assert webhooks["by_header"].entry.header_auth.case_sensitive is True
    assert webhooks["signed"].entry.hmac is not None
    assert webhooks["signed"].entry.hmac.header == "X-Signature"
    assert webhooks["allow_listed"].entry.ip_whitelist == ["192.0.2.10", "198.51.100.7"]
    limit = webhooks["limited"].entry.rate_limit
    assert limit is not None and (limit.max_requests, limit.window_seconds) == (50, 30)
    s3 = step_config(webhooks["to_s3"])
    assert (s3["bucket"], s3["filename_pattern"]) == (
        "compat-bucket",
        "hook_{timestamp}_{uuid}.json",
    )
    websocket = step_config(webhooks["to_websocket"])
    assert (websocket["max_retries"], websocket["headers"]) == (2, {"X-Key": "ws_key"})
    jwt = webhooks["with_jwt"].entry.jwt
    assert jwt is not None and (jwt.secret, jwt.issuer) == ("jwt-secret", "issuer-a")
    assert webhooks["with_basic"].entry.basic_auth is not None
    assert webhooks["with_basic"].entry.basic_auth.username == "operator"
    captcha = webhooks["captcha_v3"].entry.recaptcha
    assert captcha is not None and captcha.min_score == 0.6
    assert webhooks["captcha_v2"].entry.recaptcha is not None
    assert webhooks["captcha_v2"].entry.recaptcha.token_source == "body"
    assert webhooks["with_schema"].entry.json_schema is not None


def test_an_inline_redis_object_becomes_the_connection_and_channel() -> None:
    publish = cloud_files("examples")["to_redis_channel"]
    assert publish.plan is not None
    [step] = publish.plan.steps
    assert step.config.model_dump()["channel"] == "compat_events"
    assert step.connection is not None
    extra = step.connection.model_extra or {}
    assert (step.connection.type, extra["host"], extra["port"]) == ("redis", "127.0.0.1", 6390)


def test_credential_cleanup_is_reported_as_not_applied_unless_off(warnings: Warnings) -> None:
    cloud_files("examples")
    [line] = warnings.about("cleaned.credential_cleanup")
    assert "not applied" in line
    assert warnings.about("not_cleaned.credential_cleanup") == []


def test_compose_shapes_keep_their_meaning(warnings: Warnings) -> None:
    webhooks = cloud_files("compose")
    assert step_config(webhooks["c_kafka"])["topic"] == "compat_topic"
    assert step_config(webhooks["c_mqtt"])["topic"] == "compat/events"
    assert step_config(webhooks["c_rabbitmq"])["queue_name"] == "compat_queue"
    assert step_config(webhooks["c_sqs"])["queue_name"] == "compat-queue"
    assert step_config(webhooks["c_pubsub"])["topic"] == "compat-events"
    assert step_config(webhooks["c_activemq"])["destination"] == "compat.events"
    assert step_config(webhooks["c_save"])["filename_pattern"] == "saved_{timestamp}.json"
    assert step_config(webhooks["c_publish"])["channel"] == "compat_channel"
    assert step_config(webhooks["c_only_log"])["pretty_print"] is True
    # Empty credentials: the default ones (here the emulator); nothing to warn about.
    assert warnings.about("pubsub_c.credentials") == []
    assert step_config(webhooks["c_rq"])["function"] == "process_webhook"


def test_integration_shapes_keep_their_meaning() -> None:
    webhooks = cloud_files("integration")
    on = webhooks["i_limit_on"].entry.rate_limit
    assert on is not None and (on.max_requests, on.window_seconds) == (7, 45)
    assert webhooks["i_limit_off"].entry.rate_limit is None
    chain = webhooks["i_db_then_kafka"].plan
    assert chain is not None and [step.module for step in chain.steps] == ["postgresql", "kafka"]
    # The entry's topic reached the module that takes one, and only that one.
    assert step_config(webhooks["i_db_then_kafka"], 1)["topic"] == "chained_events"
    assert "topic" not in step_config(webhooks["i_db_then_kafka"], 0)
    publish = webhooks["i_publish_retry"].plan
    assert publish is not None and publish.steps[0].retry.max_attempts == 4
    assert webhooks["i_print"].plan is not None


def test_forms_of_their_documentation(warnings: Warnings) -> None:
    webhooks = cloud_files("docs")
    digest = webhooks["d_digest"].entry.digest_auth
    assert digest is not None and (digest.username, digest.realm) == ("digest_user", "Compat API")
    oauth1 = webhooks["d_oauth1"].entry.oauth1
    assert oauth1 is not None and (oauth1.token_secret, oauth1.timestamp_window) == ("", 120)
    introspect = webhooks["d_oauth2_introspect"].entry.oauth2
    assert introspect is not None
    assert introspect.introspection_endpoint == "https://auth.example.org/introspect"
    jwt = webhooks["d_oauth2_jwt"].entry.oauth2
    assert jwt is not None and (jwt.jwt_secret, jwt.verify_exp) == ("compat_jwt_secret", True)
    mqtt = step_config(webhooks["d_mqtt"])
    assert (mqtt["topic"], mqtt["qos"], mqtt["topic_prefix"]) == ("compat/events", 1, "compat")
    assert step_config(webhooks["d_tasmota"])["qos"] == 2
    for webhook_id, key in [("d_shelly", "shelly_gen2_format"), ("d_tasmota", "tasmota_type")]:
        [line] = warnings.about(f"{webhook_id}.module-config.{key}")
        assert "not applied: Shelly and Tasmota" in line
    s3 = webhooks["d_s3"].plan
    assert s3 is not None and s3.steps[0].connection is not None
    assert (s3.steps[0].connection.model_extra or {})["aws_access_key_id"] == "compat_key"
    chain = webhooks["d_chain_parallel"].plan
    assert chain is not None and chain.execution == "parallel"
    assert [step.retry.max_attempts for step in chain.steps] == [5, 5]
    postgres = step_config(webhooks["d_postgres_cleanup"])
    assert (postgres["upsert"], postgres["upsert_key"]) == (True, "event_id")
    assert len(warnings.about("d_postgres_cleanup.credential_cleanup")) == 1


def test_an_entry_key_no_module_takes_is_reported(tmp_path: Path, warnings: Warnings) -> None:
    path = tmp_path / "webhooks.json"
    path.write_text(json.dumps({"gh": {"module": "log", "topic": "nowhere"}}))
    load_webhooks(path, {}, {})
    assert warnings.lines == [
        f"configuration warning: {path}: gh.topic: ignored: no module of this entry takes 'topic'"
    ]


def test_a_null_authorization_means_none() -> None:
    assert cloud_files("kubernetes")["k_health"].entry.authorization is None


def test_relay_entries_of_their_cloud(warnings: Warnings) -> None:
    webhooks = load_webhooks(FILES / "scenario" / "cloud-webhooks.json", {}, ENVIRON)
    one = webhooks["relay-one"].relay
    assert (one.channel, one.channel_token, one.ttl_seconds) == (
        "compat-one",
        "compat_one_token_1",
        1800,
    )
    assert (one.max_queue_size, one.max_connections, one.max_in_flight) == (500, 4, 25)
    assert webhooks["relay-two"].relay.max_queue_size == 3
    assert warnings.lines == []


def test_save_to_disk_keys_we_cannot_apply_warn_once_each(warnings: Warnings) -> None:
    [webhook] = load_webhooks(FILES / "scenario" / "local-webhooks.json", {}, ENVIRON).values()
    assert step_config(webhook)["path"] == "/tmp/compat/local"
    for key in ("format", "append"):
        [line] = warnings.about(f"relay-one.module-config.{key}")
        assert "not applied" in line


def test_connector_keys_are_taken_as_ours(warnings: Warnings) -> None:
    path = FILES / "scenario" / "connector-http.json"
    settings = load_connector_settings(path, {}, ENVIRON)
    assert settings.max_concurrent_requests == 7
    assert (settings.reconnect_delay_seconds, settings.max_reconnect_delay_seconds) == (3.0, 45.0)
    assert settings.protocol == "sse"
    assert settings.default_target is not None
    assert settings.default_target.headers == {"Content-Type": "application/json"}
    # Keys neither project reads: one line each, naming the file and the key.
    for key in ("retry_attempts", "retry_delay"):
        assert warnings.about(key) == [
            f"configuration warning: {path}: {key}: unknown key, ignored"
        ]
    assert len(warnings.lines) == 2


def test_every_key_of_their_connector(warnings: Warnings) -> None:
    path = FILES / "scenario" / "connector-every-key.json"
    settings = load_connector_settings(path, {}, ENVIRON)
    assert settings.protocol == "long_poll"
    assert (settings.verify_tls, settings.ca_file) == (False, "/etc/compat/ca.pem")
    assert settings.reconnect_backoff_multiplier == 1.5
    assert settings.max_concurrent_requests == 4
    target = settings.target_for("other")
    assert target is not None and (target.method, target.retry_max_attempts) == ("PUT", 5)
    one = settings.target_for("relay-one")
    assert one is not None and one.retry_enabled is False
    not_applied = (
        "heartbeat_timeout",
        "connection_timeout",
        "ack_timeout",
        "log_level",
        "log_format",
        "client_cert_path",
        "client_key_path",
    )
    for key in not_applied:
        [line] = warnings.about(key)
        assert "not applied" in line
    # A client certificate is security-relevant: the warning says what follows from ignoring it.
    assert "refuse" in warnings.about("client_cert_path")[0]
    assert len(warnings.lines) == len(not_applied)


def test_module_mode_connector_and_its_webhooks(warnings: Warnings) -> None:
    path = FILES / "scenario" / "connector-module.json"
    settings = load_connector_settings(path, {}, ENVIRON)
    assert settings.reconnect_delay_seconds == 2.0
    os.environ.setdefault("COMPAT_DIR", "/tmp/compat")
    plans = load_delivery_plans(settings, path)
    assert plans is not None and plans["relay-two"].steps[0].module == "save_to_disk"


def test_our_key_wins_over_their_alias(tmp_path: Path, warnings: Warnings) -> None:
    path = tmp_path / "connector.json"
    config = {
        "cloud_url": "http://127.0.0.1:8000",
        "channel": "dev",
        "token": "t0ken",
        "default_target": {"url": "http://127.0.0.1:9000/"},
        "max_concurrent": 3,
        "max_concurrent_requests": 5,
    }
    path.write_text(json.dumps(config))
    assert load_connector_settings(path, {}, {}).max_concurrent_requests == 5
    [line] = warnings.about("max_concurrent")
    assert "max_concurrent_requests is given too" in line


def test_comment_keys_are_ignored_at_every_level(tmp_path: Path, warnings: Warnings) -> None:
    webhooks = {
        "_comment": "top",
        "gh": {
            "_note": "entry",
            "module": "log",
            "module-config": {"_comment": "module", "pretty_print": True},
        },
        "chained": {"chain": [{"_comment": "step", "module": "log"}]},
    }
    connections = {"_comment": "top", "mq": {"_comment": "entry", "type": "rabbitmq"}}
    (tmp_path / "webhooks.json").write_text(json.dumps(webhooks))
    (tmp_path / "connections.json").write_text(json.dumps(connections))
    loaded = load_webhooks(
        tmp_path / "webhooks.json", load_connections(tmp_path / "connections.json", {}), {}
    )
    assert set(loaded) == {"gh", "chained"}
    assert step_config(loaded["gh"])["pretty_print"] is True
    assert warnings.lines == []


@pytest.mark.parametrize(
    ("content", "key_path"),
    [
        ({"gh": {"module": "log", "module-config": {"colour": 1}}}, "gh.module-config.colour"),
        (
            {
                "gh": {
                    "module": "webhook_connect",
                    "colour": "blue",
                    "module-config": {"channel": "dev", "channel_token": "t" * 10},
                }
            },
            "gh.colour",
        ),
        (
            {
                "gh": {
                    "module": "webhook_connect",
                    "module-config": {"channel": "dev", "channel_token": "t" * 10, "hue": 1},
                }
            },
            "gh.module-config.hue",
        ),
    ],
)
def test_a_key_of_neither_project_is_one_warning_not_an_error(
    tmp_path: Path, warnings: Warnings, content: object, key_path: str
) -> None:
    path = tmp_path / "webhooks.json"
    path.write_text(json.dumps(content))
    assert set(load_webhooks(path, {}, {})) == {"gh"}
    assert warnings.lines == [f"configuration warning: {path}: {key_path}: unknown key, ignored"]


def test_an_undefined_variable_stays_an_error_naming_it() -> None:
    environ = {key: value for key, value in ENVIRON.items() if key != "COMPAT_API_KEY"}
    with pytest.raises(ConfigError) as raised:
        cloud_files("examples", environ)
    assert raised.value.key_path == "forward.module-config.headers.X-Key"
    assert "COMPAT_API_KEY is not set" in raised.value.reason


def test_a_vault_reference_is_refused_not_read_as_a_default(tmp_path: Path) -> None:
    path = tmp_path / "webhooks.json"
    entry = {"module": "log", "authorization": "Bearer {$vault:hooks/auth#token:fallback}"}
    path.write_text(json.dumps({"gh": entry}))
    with pytest.raises(ConfigError) as raised:
        load_webhooks(path, {}, {})
    assert raised.value.key_path == "gh.authorization"
    assert "vault" in raised.value.reason and "not supported" in raised.value.reason


def test_the_cli_prints_one_warning_line_per_key(tmp_path: Path) -> None:
    config = {
        "cloud_url": "http://127.0.0.1:8000",
        "channel": "dev",
        "token": "t0ken",
        "default_target": {"url": "http://127.0.0.1:9000/"},
        "colour": "blue",
        "protocol": "carrier-pigeon",
    }
    path = tmp_path / "connector.json"
    path.write_text(json.dumps(config))
    result = subprocess.run(
        [sys.executable, "-m", "webhook_connect", "connector", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 2, result.stderr
    warning, error = result.stderr.strip().splitlines()
    assert warning.endswith(f"configuration warning: {path}: colour: unknown key, ignored")
    assert error.startswith(f"webhook-connect: configuration error: {path}: protocol: ")


def test_a_bare_function_naming_a_builtin_is_refused(tmp_path: Path) -> None:
    # Accepting bare names must not let one reach a builtin: rq would call eval(payload).
    path = tmp_path / "webhooks.json"
    entry = {"module": "redis_rq", "connection": "rq", "module-config": {"function": "eval"}}
    path.write_text(json.dumps({"gh": entry}))
    connections = {"rq": {"type": "redis-rq", "host": "127.0.0.1"}}
    (tmp_path / "connections.json").write_text(json.dumps(connections))
    with pytest.raises(ConfigError) as raised:
        load_webhooks(path, load_connections(tmp_path / "connections.json", {}), {})
    assert raised.value.key_path == "gh.module-config.function"
    assert "builtins.eval" in raised.value.reason
