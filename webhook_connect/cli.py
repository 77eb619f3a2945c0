"""``webhook-connect``: one console command for every role.

Each subcommand imports its side lazily, so a laptop that only runs the connector needs none of
the cloud's dependencies. The CLI parses, builds the config, calls ``run()`` and maps failure to
an exit status: 0 clean stop, 2 bad configuration or usage, 1 anything else.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, NoReturn

import click

from webhook_connect.connector.config import FORWARD_TO, ConnectorSettings
from webhook_connect.connector.flags import (
    BadValue,
    SettingOption,
    flag_specs,
    given_values,
    settings_options,
)
from webhook_connect.shared.admincli import channels, dlq
from webhook_connect.shared.exceptions import ConfigError

if TYPE_CHECKING:
    from webhook_connect.cloud.config import CloudConfig

ENV_PREFIX = "WEBHOOK_CONNECT_"


def fail_config(error: ConfigError) -> NoReturn:
    click.echo(f"webhook-connect: configuration error: {error}", err=True)
    sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="webhook-connect")
def main() -> None:
    """Webhook Connect: a self-hosted cloud-to-local webhook relay."""


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, envvar=ENV_PREFIX + "HOST")
@click.option("--port", default=8000, show_default=True, type=int, envvar=ENV_PREFIX + "PORT")
@click.option(
    "--webhooks",
    "webhooks_path",
    type=click.Path(dir_okay=False),
    envvar=ENV_PREFIX + "WEBHOOKS",
    help="webhooks.json (Core Webhook Module format).",
)
@click.option(
    "--connections",
    "connections_path",
    type=click.Path(dir_okay=False),
    envvar=ENV_PREFIX + "CONNECTIONS",
    help="connections.json with named connection settings.",
)
@click.option(
    "--storage",
    "storage_url",
    envvar=ENV_PREFIX + "STORAGE",
    help="sqlite:///FILE (default: ./webhook-connect.db) or redis://HOST:PORT/DB.",
)
@click.option("--admin-token", envvar=ENV_PREFIX + "ADMIN_TOKEN", help="Token for /admin.")
@click.option("--workers", default=1, show_default=True, type=int, envvar=ENV_PREFIX + "WORKERS")
@click.option("--log-level", default="info", show_default=True, envvar=ENV_PREFIX + "LOG_LEVEL")
@click.option(
    "--log-format",
    type=click.Choice(["auto", "json", "text"]),
    default="auto",
    show_default=True,
    envvar=ENV_PREFIX + "LOG_FORMAT",
    help="JSON lines, or text for people; auto: text on a terminal, JSON otherwise.",
)
@click.option(
    "--public-url",
    metavar="URL",
    envvar=ENV_PREFIX + "PUBLIC_URL",
    help="The address providers post to (https://hooks.example.com): webhook URLs are shown "
    "with it. Default: the address of each admin request, and the bound one at start-up.",
)
@click.option(
    "--public-docs",
    is_flag=True,
    envvar=ENV_PREFIX + "PUBLIC_DOCS",
    help="Serve /openapi.json and /docs to anyone (generic, no webhook ids); otherwise only "
    "with the admin token.",
)
@click.option(
    "--header-timeout",
    type=float,
    default=10.0,
    show_default=True,
    envvar=ENV_PREFIX + "HEADER_TIMEOUT",
    help="Seconds a client has from connecting to the end of its request head.",
)
@click.option(
    "--body-timeout",
    type=float,
    default=30.0,
    show_default=True,
    envvar=ENV_PREFIX + "BODY_TIMEOUT",
    help="Seconds a client has from the end of its request head to the end of the body.",
)
@click.option(
    "--max-open-connections",
    type=int,
    default=1000,
    show_default=True,
    envvar=ENV_PREFIX + "MAX_OPEN_CONNECTIONS",
    help="Client connections per process; lowered to fit the descriptor limit.",
)
def cloud(**options: object) -> None:
    """Receive webhooks and buffer them durably per channel."""
    try:
        from webhook_connect.cloud.config import build_cloud_config
        from webhook_connect.cloud.server import check_storage, run
    except ImportError as exc:
        click.echo(
            f"webhook-connect: the cloud needs its extras: pip install 'webhook-connect[cloud]' "
            f"({exc})",
            err=True,
        )
        sys.exit(2)
    try:
        config = build_cloud_config(**options)  # type: ignore[arg-type]
        check_storage(config)  # a Redis Cluster URL's nodes, before any other line
    except ConfigError as exc:
        fail_config(exc)
    announce_webhooks(config)
    try:
        run(config)
    except ConfigError as exc:  # the descriptor limit cannot hold the connections asked for
        fail_config(exc)


def announce_webhooks(config: CloudConfig) -> None:
    """Log each webhook's ingest URL once, in the supervising process (not once per worker),
    through the same handler and format uvicorn sets up for the workers."""
    import logging
    import logging.config

    from webhook_connect.cloud.logs import logging_config, resolve_format
    from webhook_connect.cloud.publicurl import bound_base, start_up_lines

    logging.config.dictConfig(logging_config(resolve_format(config.log_format), config.log_level))
    logger = logging.getLogger("webhook_connect.cloud")
    base = config.public_url or bound_base(config.host, config.port)
    for line in start_up_lines(base, config.webhooks):
        logger.info("%s", line)
    if config.public_url is None and config.webhooks:
        logger.info(
            "these URLs use the bound address: give --public-url with the address providers "
            "reach (https://hooks.example.com) to show theirs"
        )


@main.command()
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    envvar=ENV_PREFIX + "CONFIG",
    show_envvar=True,
    help="connector.json (optional when flags and variables say everything).",
)
@click.option(
    "--forward-to",
    FORWARD_TO,
    metavar="URL",
    cls=SettingOption,
    envvar=ENV_PREFIX + "FORWARD_TO",
    show_envvar=True,
    help="Deliver to this URL: default_target.url (the file's other target keys kept).",
)
@click.option(
    "--log-format",
    type=click.Choice(["auto", "json", "text"]),
    cls=SettingOption,
    envvar=ENV_PREFIX + "LOG_FORMAT",
    show_envvar=True,
    help="JSON lines, or text for people; auto (default): text on a terminal, JSON otherwise.",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    cls=SettingOption,
    envvar=ENV_PREFIX + "LOG_LEVEL",
    show_envvar=True,
    help="info (default): a line per delivery; warning: failed deliveries and problems only.",
)
@settings_options(flag_specs(ConnectorSettings.model_fields))
def connector(config_path: str | None, **_: object) -> None:
    """Dial out to the cloud and deliver a channel's messages locally.

    \b
    webhook-connect connector --cloud-url URL --channel C --token T \\
        --forward-to http://localhost:3000/hook

    Every connector.json key is also a flag and a WEBHOOK_CONNECT_* variable: the file, then
    the environment, then flags. Structured keys (default_target, targets) take JSON.
    """
    try:
        from webhook_connect.connector.config import load_connector_settings, load_delivery_plans
        from webhook_connect.connector.main import run
    except ImportError as exc:
        click.echo(
            "webhook-connect: the connector needs its extras: "
            f"pip install 'webhook-connect[connector]' ({exc})",
            err=True,
        )
        sys.exit(2)
    ctx = click.get_current_context()
    try:
        overrides, origins = given_values(ctx, os.environ)
    except BadValue as exc:
        fail_config(ConfigError(exc.name, "", exc.reason))
    log_format = str(overrides.pop("log_format", "auto"))
    log_level = str(overrides.pop("log_level", "info"))
    try:
        settings = load_connector_settings(config_path, overrides)
        plans = load_delivery_plans(settings, config_path)
    except ConfigError as exc:
        fail_config(named_origin(exc, origins))
    sys.exit(run(settings, plans, log_format=log_format, log_level=log_level))


def named_origin(error: ConfigError, origins: Mapping[str, str]) -> ConfigError:
    """The error of a key given by a flag or variable names that flag or variable."""
    key = error.key_path.partition(".")[0].split("[", 1)[0]
    if key == "default_target" and FORWARD_TO in origins and "url" in error.key_path:
        return ConfigError(origins[FORWARD_TO], "", error.reason)
    if key not in origins:
        return error
    return ConfigError(origins[key], error.key_path.removeprefix(key).lstrip("."), error.reason)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, envvar=ENV_PREFIX + "SINK_HOST")
@click.option("--port", default=9000, show_default=True, type=int, envvar=ENV_PREFIX + "SINK_PORT")
@click.option("--status", default=200, show_default=True, type=click.IntRange(100, 599))
@click.option("--jsonl", type=click.Path(dir_okay=False), help="Also append each request here.")
@click.option("--quiet", is_flag=True, help="Do not print requests.")
def sink(host: str, port: int, status: int, jsonl: str | None, quiet: bool) -> None:
    """A local target that prints every request it receives and answers STATUS."""
    try:
        from webhook_connect.connector.sink import run_sink
    except ImportError as exc:
        click.echo(f"webhook-connect: pip install 'webhook-connect[connector]' ({exc})", err=True)
        sys.exit(2)
    try:
        run_sink(host, port, status=status, jsonl_path=jsonl, quiet=quiet)
    except ValueError as exc:
        click.echo(f"webhook-connect sink: {exc}", err=True)
        sys.exit(2)
    except OSError as exc:
        click.echo(f"webhook-connect sink: cannot listen on {host}:{port}: {exc}", err=True)
        sys.exit(1)


main.add_command(channels)
main.add_command(dlq)
