"""Configuration files, substitution, flags and environment; bad input stops with exit 2."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.servers import REPO, Cloud
from webhook_connect.cloud.config import build_cloud_config
from webhook_connect.shared.config import load_connections, load_webhooks
from webhook_connect.shared.config.substitution import substitute
from webhook_connect.shared.exceptions import ConfigError
from webhook_connect.shared.modules.registry import MODULES

GOOD = {
    "github": {
        "module": "webhook_connect",
        "module-config": {"channel": "dev", "channel_token": "{$TOKEN:default-token}"},
    }
}


def write(tmp_path: Path, data: object, name: str = "webhooks.json") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_defaults_of_a_webhook_connect_entry(tmp_path: Path) -> None:
    [webhook] = load_webhooks(write(tmp_path, GOOD), environ={}).values()
    relay = webhook.relay
    assert (relay.channel, relay.channel_token) == ("dev", "default-token")
    assert (relay.ttl_seconds, relay.max_queue_size, relay.max_connections) == (86400, 10000, 10)
    assert relay.max_in_flight == 100
    assert webhook.entry.data_type == "json"
    assert webhook.entry.methods == ("POST",)


def test_placeholders_are_replaced_from_the_environment() -> None:
    tree = {"a": "{$HOST}:{$PORT:5432}", "b": ["x{$HOST}"], "c": 3, "d": "{$EMPTY:}"}
    assert substitute(tree, {"HOST": "db"}, "f.json") == {
        "a": "db:5432",
        "b": ["xdb"],
        "c": 3,
        "d": "",
    }


@pytest.mark.parametrize(
    ("content", "key_path", "reason"),
    [
        ("{ nope", "", "invalid JSON at line 1 column 3"),
        ([], "", "expected a JSON object"),
        ({"gh": {"module": "nope"}}, "gh.module", "unknown module 'nope'"),
        ({"gh": {"module": "save_to_disk"}}, "gh.module-config.path", "required key is missing"),
        ({"gh": {"data_type": "json"}}, "gh.module", "required key is missing"),
        ({"gh": {"chain": []}}, "gh.chain", "expected a list of 1 to 20 modules"),
        (
            {"gh": {"chain": ["log", {"module": "nope"}]}},
            "gh.chain[1].module",
            "unknown module 'nope'",
        ),
        ({"gh": {"chain": ["log", "webhook_connect"]}}, "gh.chain[1].module", "cannot be chained"),
        (
            {"gh": {"chain": ["log"], "chain-config": {"execution": "later"}}},
            "gh.chain-config.execution",
            "'sequential' or 'parallel'",
        ),
        (
            {"gh": {"module": "log", "transform": {"pick": ["a..b"]}}},
            "gh.transform",
            "bad field path 'a..b'",
        ),
        (
            {"gh": {"module": "log", "retry": {"max_attempts": 0}}},
            "gh.retry.max_attempts",
            "greater than 0",
        ),
        (
            {
                "gh": {
                    "module": "http_webhook",
                    "module-config": {"url": "http://10.0.0.1/", "allowed_hosts": ["example.com"]},
                }
            },
            "gh.module-config",
            "not in allowed_hosts",
        ),
        ({"gh": {"module": "webhook_connect"}}, "gh.module-config.channel", "required"),
        (
            {
                "gh": {
                    "module": "webhook_connect",
                    "module-config": {
                        "channel": "dev",
                        "channel_token": "t" * 10,
                        "max_queue_size": "many",
                    },
                }
            },
            "gh.module-config.max_queue_size",
            "valid integer",
        ),
        (
            {
                "gh": {
                    "module": "webhook_connect",
                    "module-config": {"channel": "a/b", "channel_token": "t" * 10},
                }
            },
            "gh.module-config.channel",
            "should match pattern",
        ),
        (
            {
                "gh": {
                    "module": "webhook_connect",
                    "module-config": {"channel": "dev", "channel_token": "{$NOT_SET_ANYWHERE}"},
                }
            },
            "gh.module-config.channel_token",
            "NOT_SET_ANYWHERE is not set",
        ),
        (
            {
                "gh": {
                    "module": "webhook_connect",
                    "hmac": {"secret": "s", "algorithm": "md5"},
                    "module-config": {"channel": "dev", "channel_token": "t" * 10},
                }
            },
            "gh.hmac.algorithm",
            "Input should be 'sha1', 'sha256' or 'sha512'",
        ),
        (
            {
                "gh": {
                    "module": "webhook_connect",
                    "jwt": {"secret": "s", "algorithm": "none"},
                    "module-config": {"channel": "dev", "channel_token": "t" * 10},
                }
            },
            "gh.jwt.algorithm",
            "('none' is refused)",
        ),
        (
            {
                "gh": {
                    "module": "webhook_connect",
                    "ip_whitelist": ["10.0.0.0/33"],
                    "module-config": {"channel": "dev", "channel_token": "t" * 10},
                }
            },
            "gh.ip_whitelist",
            "'10.0.0.0/33' is not an IP address or CIDR range",
        ),
        (
            {
                "gh": {
                    "module": "webhook_connect",
                    "json_schema": {"$ref": "https://example.com/schema.json"},
                    "module-config": {"channel": "dev", "channel_token": "t" * 10},
                }
            },
            "gh.json_schema",
            "remote $ref 'https://example.com/schema.json' is not allowed",
        ),
        (
            {
                "gh": {
                    "module": "webhook_connect",
                    "json_schema": {"type": "thing"},
                    "module-config": {"channel": "dev", "channel_token": "t" * 10},
                }
            },
            "gh.json_schema",
            "not a valid JSON Schema",
        ),
        (
            {
                "gh": {
                    "module": "webhook_connect",
                    "digest_auth": {
                        "username": "u",
                        "password": "p",
                        "algorithm": "MD5-sess",
                        "qop": "",
                    },
                    "module-config": {"channel": "dev", "channel_token": "t" * 10},
                }
            },
            "gh.digest_auth",
            "MD5-sess needs qop 'auth'",
        ),
        (
            {
                "gh": {
                    "module": "webhook_connect",
                    "provider": "github",
                    "module-config": {"channel": "dev", "channel_token": "t" * 10},
                }
            },
            "gh",
            "provider 'github' needs 'hmac'",
        ),
        (
            {
                "gh": {
                    "module": "webhook_connect",
                    "rate_limit": {"max_requests": 0, "window_seconds": 1},
                    "module-config": {"channel": "dev", "channel_token": "t" * 10},
                }
            },
            "gh.rate_limit.max_requests",
            "greater than 0",
        ),
        (
            {
                "a": {
                    "module": "webhook_connect",
                    "module-config": {"channel": "dev", "channel_token": "t" * 10},
                },
                "b": {
                    "module": "webhook_connect",
                    "module-config": {
                        "channel": "dev",
                        "channel_token": "t" * 10,
                        "ttl_seconds": 5,
                    },
                },
            },
            "b.module-config.ttl_seconds",
            "already has ttl_seconds=86400",
        ),
    ],
)
def test_a_bad_file_names_file_key_and_reason(
    tmp_path: Path, content: object, key_path: str, reason: str
) -> None:
    path = write(tmp_path, content)
    with pytest.raises(ConfigError) as raised:
        load_webhooks(path, environ={})
    error = raised.value
    assert error.source == str(path)
    assert error.key_path == key_path
    assert reason in error.reason


def test_connections_are_loaded_and_referenced(tmp_path: Path) -> None:
    connections = load_connections(
        write(tmp_path, {"pg": {"type": "postgresql", "host": "{$PGHOST:db}"}}, "c.json"), {}
    )
    assert connections["pg"].type == "postgresql"
    assert connections["pg"].model_extra == {"host": "db"}
    entry = {**GOOD["github"], "connection": "missing"}
    with pytest.raises(ConfigError, match="no connection named 'missing'"):
        load_webhooks(write(tmp_path, {"gh": entry}), connections, environ={})


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "webhook_connect", *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
    )


def test_the_cli_stops_with_exit_2_and_one_message(tmp_path: Path) -> None:
    path = write(tmp_path, {"gh": {"module": "webhook_connect"}})
    result = run_cli("cloud", "--webhooks", str(path), "--port", "1")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == [
        f"webhook-connect: configuration error: {path}: gh.module-config.channel: "
        "required key is missing (and 1 more problem)"
    ]


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--storage", "mysql://x"], {}, "--storage: unsupported URL"),
        (["--webhooks", "/nonexistent/webhooks.json"], {}, "file not found"),
        ([], {"WEBHOOK_CONNECT_STORAGE": "ftp://x"}, "--storage: unsupported URL 'ftp://x'"),
        ([], {"WEBHOOK_CONNECT_PORT": "99999"}, "--port: 99999 is not a TCP port"),
        (["--workers", "0"], {}, "--workers: must be at least 1"),
        (["--port", "nope"], {}, "'nope' is not a valid integer"),
    ],
)
def test_bad_flags_and_environment_variables_exit_2(
    args: list[str], env: dict[str, str], message: str
) -> None:
    result = run_cli("cloud", *args, env=env)
    assert result.returncode == 2
    assert message in result.stderr


def test_flags_override_environment_only_when_given(tmp_path: Path) -> None:
    env = {"WEBHOOK_CONNECT_PORT": "9100"}
    assert build_cloud_config(port=9100, environ=env).port == 9100
    result = run_cli("cloud", "--port", "99999", env={"WEBHOOK_CONNECT_PORT": "8000"})
    assert "--port: 99999" in result.stderr


def test_every_level_has_help() -> None:
    for args in ([], ["cloud"], ["connector"], ["channels"], ["dlq"], ["sink"]):
        result = run_cli(*args, "--help")
        assert result.returncode == 0, result.stderr
        assert "Usage:" in result.stdout


CONNECTOR = {
    "cloud_url": "http://127.0.0.1:8000",
    "channel": "dev",
    "token": "t0ken",
    "default_target": {"url": "http://127.0.0.1:9000/"},
}


@pytest.mark.parametrize(
    ("change", "key_path", "reason"),
    [
        ({"webhooks_config": "webhooks.json"}, "webhooks_config", "choose one delivery mode"),
        ({"default_target": None}, "default_target", "no delivery mode"),
        ({"cloud_url": "ftp://cloud"}, "cloud_url", "must be a http or https or ws or wss URL"),
        ({"cloud_url": "http://:80"}, "cloud_url", "with a host"),
        ({"token": None}, "token", "required key is missing"),
        ({"protocol": "carrier-pigeon"}, "protocol", "websocket"),
        ({"default_target": {"url": "localhost:9000"}}, "default_target.url", "http or https"),
        ({"max_concurrent_requests": 0}, "max_concurrent_requests", "greater than 0"),
    ],
)
def test_a_bad_connector_config_exits_2_naming_the_key(
    tmp_path: Path, change: dict[str, object], key_path: str, reason: str
) -> None:
    settings = {**CONNECTOR, **change}
    settings = {k: v for k, v in settings.items() if v is not None}
    path = write(tmp_path, settings, "connector.json")
    result = run_cli("connector", "--config", str(path))
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"webhook-connect: configuration error: {path}: {key_path}: ")
    assert reason in line


def test_connector_flags_and_environment_override_the_file(tmp_path: Path) -> None:
    from webhook_connect.connector.config import load_connector_settings

    path = write(tmp_path, CONNECTOR, "connector.json")
    settings = load_connector_settings(path, {"channel": "other", "token": None}, environ={})
    assert (settings.channel, settings.token) == ("other", "t0ken")
    result = run_cli(
        "connector", "--config", str(path), env={"WEBHOOK_CONNECT_CLOUD_URL": "gopher://x"}
    )
    assert result.returncode == 2
    # The line names where the bad value came from: the variable, not the file's key.
    assert "WEBHOOK_CONNECT_CLOUD_URL: must be a http" in result.stderr


@pytest.mark.parametrize("name", ["webhooks.json", "webhooks-secure.json"])
def test_the_example_webhooks_load_and_compile(name: str) -> None:
    from webhook_connect.cloud.security.guard import OFFLINE, build_guards

    path = Path(__file__).resolve().parents[1] / "examples" / name
    webhooks = load_webhooks(path, environ={})
    guards = build_guards(webhooks, OFFLINE, str(path))
    assert set(guards) == set(webhooks)


def test_a_module_without_its_driver_names_the_extra_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(MODULES, "fakemq", ("fakemq_driver_not_installed:Module", "fakemq"))
    with pytest.raises(ConfigError) as raised:
        load_webhooks(write(tmp_path, {"gh": {"module": "fakemq"}}), environ={})
    assert raised.value.key_path == "gh.module"
    assert "install webhook-connect[fakemq]" in raised.value.reason


def test_a_bad_module_file_of_the_connector_exits_2_naming_it(tmp_path: Path) -> None:
    hooks = write(tmp_path, {"gh": {"module": "save_to_disk", "connection": "pg"}}, "hooks.json")
    connections = write(tmp_path, {"pg": {"type": "postgresql"}}, "connections.json")
    settings = {**CONNECTOR, "webhooks_config": hooks.name, "connections_config": connections.name}
    del settings["default_target"]
    path = write(tmp_path, settings, "connector.json")
    result = run_cli("connector", "--config", str(path))
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"webhook-connect: configuration error: {hooks}: gh.module-config.path")


def test_the_secrets_of_connections_the_cloud_delivers_with_are_masked(tmp_path: Path) -> None:
    from webhook_connect.cloud.masking import configured_secrets

    pg = {"type": "postgresql", "host": "db", "user": "app", "password": "pg-password-123"}
    connections = load_connections(write(tmp_path, {"pg": pg}, "connections.json"), {})
    hooks = write(tmp_path, {"gh": {"module": "postgresql", "connection": "pg"}})
    secrets = configured_secrets(load_webhooks(hooks, connections, environ={}))
    assert "pg-password-123" in secrets
    assert "app" not in secrets and "db" not in secrets


def test_the_module_mode_example_is_valid() -> None:
    from webhook_connect.connector.config import load_connector_settings, load_delivery_plans

    path = REPO / "examples" / "modules" / "connector.json"
    settings = load_connector_settings(path, {})
    plans = load_delivery_plans(settings, path)
    assert plans is not None and set(plans) == {"github", "*"}
    assert [step.module for step in plans["github"].steps] == ["postgresql", "rabbitmq"]


@pytest.mark.parametrize(
    ("sig", "workers"),
    [(signal.SIGTERM, "1"), (signal.SIGINT, "1"), (signal.SIGTERM, "2")],
    ids=["sigterm", "sigint", "sigterm-2-workers"],
)
def test_a_stopped_cloud_exits_0(tmp_path: Path, sig: int, workers: str) -> None:
    # A clean stop is exit status 0 (uvicorn raises the signal again after its shutdown, which
    # used to end the process by the signal: 143 or 130, which systemd counts as a failure
    # under some settings and scripts take for a crash).
    cloud = Cloud(
        f"sqlite:///{tmp_path / 'buffer.db'}",
        write(tmp_path, {}),
        tmp_path,
        "--workers",
        workers,
    )
    cloud.start()
    try:
        assert cloud.process is not None
        process = cloud.process
        process.send_signal(sig)
        assert process.wait(15) == 0, cloud.log.read_text()[-2000:]
    finally:
        cloud.stop()
