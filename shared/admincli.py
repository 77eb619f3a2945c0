"""``webhook-connect channels ...`` and ``webhook-connect dlq ...``: clients of the admin API.

Every command takes ``--cloud-url``, ``--admin-token`` and ``--json`` (or the environment
variables ``--help`` names), sends one request (docs/ADMIN.md) and prints the answer as aligned
text, or as the API's own JSON with ``--json``. Exit status: 0 done; 1 the API answered an error
or the cloud could not be reached; 2 a usage error, a missing admin token included.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import click

from webhook_connect.shared.admintext import (
    CHANNEL_COLUMNS,
    CONNECTION_COLUMNS,
    DEAD_LETTER_COLUMNS,
    GROUP_COLUMNS,
    TOKEN_COLUMNS,
    Answer,
    channel_fields,
    channel_report,
    dead_letter_report,
    listing,
    new_token_lines,
    webhook_url_lines,
)
from webhook_connect.shared.exceptions import AdminClientError
from webhook_connect.shared.limits import limit_options

if TYPE_CHECKING:
    from webhook_connect.shared.adminclient import AdminClient

CLOUD_URL_ENV = "WEBHOOK_CONNECT_CLOUD_URL"
ADMIN_TOKEN_ENV = "WEBHOOK_CONNECT_ADMIN_TOKEN"
DEFAULT_CLOUD_URL = "http://127.0.0.1:8000"
# Where the common options wait for connect(): they are not arguments of every command.
META_KEY = "webhook_connect.admin."

POSITIVE_INT = click.IntRange(min=1)
POSITIVE_FLOAT = click.FloatRange(min=0, min_open=True)

Render = Callable[[Answer], list[str]]
CommandT = TypeVar("CommandT", bound=Callable[..., None])


def _remember(ctx: click.Context, param: click.Parameter, value: object) -> object:
    ctx.meta[META_KEY + str(param.name)] = value
    return value


def admin_options(command: CommandT) -> CommandT:
    """Add ``--cloud-url``, ``--admin-token`` and ``--json``, read back by ``connect()``."""
    options = [
        click.option(
            "--cloud-url",
            metavar="URL",
            envvar=CLOUD_URL_ENV,
            default=DEFAULT_CLOUD_URL,
            show_default=True,
            show_envvar=True,
            expose_value=False,
            callback=_remember,
            help="The cloud to administer.",
        ),
        click.option(
            "--admin-token",
            metavar="TOKEN",
            envvar=ADMIN_TOKEN_ENV,
            show_envvar=True,
            expose_value=False,
            callback=_remember,
            help="The cloud's --admin-token.",
        ),
        click.option(
            "--json",
            "as_json",
            is_flag=True,
            expose_value=False,
            callback=_remember,
            help="Print the API's JSON answer instead of text.",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@dataclass(frozen=True)
class Admin:
    """The admin API as one command uses it: the client, the output format, the error prefix."""

    client: AdminClient
    as_json: bool
    prog: str

    def call(
        self,
        method: str,
        *segments: str,
        body: dict[str, Any] | None = None,
        params: dict[str, Any] | None = None,
    ) -> Answer:
        """One request to ``/admin/<segments>``; on failure, say why and exit 1."""
        try:
            return self.client.request(method, *segments, body=body, params=params)
        except AdminClientError as exc:
            click.echo(f"{self.prog}: {exc}", err=True)
            sys.exit(1)

    def show(self, answer: Answer, render: Render) -> None:
        """Print ``answer`` as JSON for scripts, or as ``render`` makes it readable."""
        lines = [json.dumps(answer, indent=2)] if self.as_json else render(answer)
        click.echo("\n".join(lines))


def connect() -> Admin:
    """The ``Admin`` of the running command, from its common options."""
    ctx = click.get_current_context()
    token = ctx.meta.get(META_KEY + "admin_token")
    if not token:
        raise click.UsageError(f"no admin token: pass --admin-token or set {ADMIN_TOKEN_ENV}", ctx)
    try:  # httpx comes with the cloud and connector extras; --help must work without it.
        from webhook_connect.shared.adminclient import AdminClient
    except ImportError as exc:
        click.echo(f"webhook-connect: pip install 'webhook-connect[connector]' ({exc})", err=True)
        sys.exit(2)
    group = ctx.parent.info_name if ctx.parent is not None else ctx.info_name
    return Admin(
        AdminClient(str(ctx.meta[META_KEY + "cloud_url"]), str(token)),
        bool(ctx.meta.get(META_KEY + "as_json")),
        f"webhook-connect {group}",
    )


def given(options: Mapping[str, Any]) -> dict[str, Any]:
    """The options the user gave; the others stay out of the request body."""
    return {name: value for name, value in options.items() if value is not None}


def selection(ids: Sequence[str], everything: bool, everything_body: Answer) -> Answer:
    """The request body naming the dead letters a command acts on: some ids, or ``--all``."""
    if bool(ids) == everything:
        raise click.UsageError("give MESSAGE_IDs or --all (not both)")
    return everything_body if everything else {"ids": list(ids)}


# channels ------------------------------------------------------------------------------------


@click.group()
def channels() -> None:
    """Manage channels, tokens and connections (admin API)."""


@channels.command()
@click.argument("name")
@limit_options
@click.option("--label", help="A label for the channel's first connector token.")
@click.option("--expires-in", type=POSITIVE_INT, metavar="SECONDS", help="Token lifetime.")
@admin_options
def create(name: str, label: str | None, expires_in: int | None, **limits: Any) -> None:
    """Create channel NAME and print its first connector token (shown only this once) and the
    URLs of the webhooks that feed it."""
    admin = connect()
    body = {"name": name, **given(limits)}
    body |= given({"token_label": label, "token_expires_in_seconds": expires_in})
    answer = admin.call("POST", "channels", body=body)
    admin.show(
        answer,
        lambda a: [
            f"created channel {a['channel']['name']}",
            *webhook_url_lines(a["channel"]),
            *new_token_lines(a),
        ],
    )


@channels.command("list")
@admin_options
def list_channels() -> None:
    """List every channel with its depth, dead letters and connections."""
    admin = connect()
    answer = admin.call("GET", "channels")
    admin.show(answer, lambda a: listing(a["channels"], CHANNEL_COLUMNS, "no channels"))


@channels.command()
@click.argument("name")
@admin_options
def show(name: str) -> None:
    """Show channel NAME: limits, stats, tokens and live connections."""
    admin = connect()
    admin.show(admin.call("GET", "channels", name), channel_report)


@channels.command()
@click.argument("name")
@limit_options
@admin_options
def update(name: str, **limits: Any) -> None:
    """Change limits of channel NAME; the ones not given stay as they are."""
    if not given(limits):
        raise click.UsageError("nothing to update: give at least one limit option")
    admin = connect()
    answer = admin.call("PATCH", "channels", name, body=given(limits))
    admin.show(answer, lambda a: [f"updated channel {name}", *channel_fields(a["channel"])])


@channels.command()
@click.argument("name")
@click.option(
    "--grace-seconds",
    type=click.IntRange(min=0),
    default=3600,
    show_default=True,
    help="How long the old tokens keep working; 0 ends them now.",
)
@click.option("--label", help="A label for the new token.")
@admin_options
def rotate(name: str, grace_seconds: int, label: str | None) -> None:
    """Issue a new token for NAME and end every other one after the grace period."""
    admin = connect()
    body = {"grace_seconds": grace_seconds, **given({"label": label})}
    answer = admin.call("POST", "channels", name, "rotate-token", body=body)
    admin.show(answer, lambda a: [f"rotated the tokens of channel {name}", *new_token_lines(a)])


@channels.command("replay")
@click.argument("name")
@click.option(
    "--since",
    required=True,
    metavar="TIME",
    help="Unix seconds, or ISO 8601 with a zone (2026-12-01T09:00:00Z).",
)
@click.option("--group", default="default", show_default=True, help="The group to deliver to.")
@admin_options
def replay_history(name: str, since: str, group: str) -> None:
    """Deliver channel NAME's history since TIME again, to one group (needs history_seconds)."""
    admin = connect()
    when: float | str = float(since) if since.replace(".", "", 1).isdigit() else since
    answer = admin.call("POST", "channels", name, "replay", body={"since": when, "group": group})
    admin.show(answer, lambda a: [f"replayed {a['replayed']} message(s) to group {a['group']}"])


@channels.command()
@click.argument("name")
@click.argument("token_id")
@admin_options
def revoke(name: str, token_id: str) -> None:
    """Revoke token TOKEN_ID of channel NAME and close the connections using it."""
    admin = connect()
    answer = admin.call("DELETE", "channels", name, "tokens", token_id)
    admin.show(
        answer, lambda a: [f"revoked token {a['revoked']} ({a['disconnected']} disconnected)"]
    )


@channels.command()
@click.argument("name")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@admin_options
def delete(name: str, yes: bool) -> None:
    """Delete channel NAME with its messages, dead letters and tokens."""
    admin = connect()
    if not yes:
        # err=True: the question must not end up in the --json output a script reads.
        click.confirm(
            f"Delete channel {name} with its messages, dead letters and tokens?",
            abort=True,
            err=True,
        )
    answer = admin.call("DELETE", "channels", name)
    admin.show(
        answer, lambda a: [f"deleted channel {a['deleted']} ({a['disconnected']} disconnected)"]
    )


@channels.command()
@click.argument("name")
@admin_options
def tokens(name: str) -> None:
    """List the connector tokens of channel NAME (ids and labels; never the tokens)."""
    admin = connect()
    answer = admin.call("GET", "channels", name, "tokens")
    admin.show(answer, lambda a: listing(a["tokens"], TOKEN_COLUMNS, "no tokens"))


@channels.command()
@click.argument("name")
@click.option("--label", help="A label for the token, e.g. who uses it.")
@click.option("--expires-in", type=POSITIVE_INT, metavar="SECONDS", help="Token lifetime.")
@admin_options
def issue(name: str, label: str | None, expires_in: int | None) -> None:
    """Issue one more connector token for channel NAME and print it."""
    admin = connect()
    body = given({"label": label, "expires_in_seconds": expires_in})
    answer = admin.call("POST", "channels", name, "tokens", body=body)
    admin.show(answer, lambda a: [f"issued a token for channel {name}", *new_token_lines(a)])


@channels.command()
@click.argument("name")
@admin_options
def connections(name: str) -> None:
    """List the live connections of channel NAME."""
    admin = connect()
    answer = admin.call("GET", "channels", name, "connections")
    admin.show(answer, lambda a: listing(a["connections"], CONNECTION_COLUMNS, "no connections"))


@channels.command()
@click.argument("name")
@click.argument("connection_id")
@admin_options
def disconnect(name: str, connection_id: str) -> None:
    """Close connection CONNECTION_ID; what it held goes back to the channel."""
    admin = connect()
    answer = admin.call("DELETE", "channels", name, "connections", connection_id)
    admin.show(answer, lambda a: [f"disconnected {a['disconnected']}"])


@channels.command()
@click.argument("name")
@admin_options
def groups(name: str) -> None:
    """List the consumer groups of channel NAME with their backlog (messages not acked)."""
    admin = connect()
    answer = admin.call("GET", "channels", name, "groups")
    admin.show(answer, lambda a: listing(a["groups"], GROUP_COLUMNS, "no groups"))


@channels.command("add-group")
@click.argument("name")
@click.argument("group")
@admin_options
def add_group(name: str, group: str) -> None:
    """Create GROUP on channel NAME; it gets the messages from now on (the way to allow a
    group on a channel with --no-dynamic-groups)."""
    admin = connect()
    answer = admin.call("POST", "channels", name, "groups", body={"group": group})
    admin.show(answer, lambda a: [f"added group {group} to channel {name}"])


@channels.command("drop-group")
@click.argument("name")
@click.argument("group")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@admin_options
def drop_group(name: str, group: str, yes: bool) -> None:
    """Drop GROUP of channel NAME: its backlog is let go and its connections are closed.
    Dropping "default" empties it; it exists again at once."""
    admin = connect()
    if not yes:
        click.confirm(
            f"Drop group {group} of channel {name} with the messages it has not acked?",
            abort=True,
            err=True,
        )
    answer = admin.call("DELETE", "channels", name, "groups", group)
    admin.show(
        answer,
        lambda a: [
            f"dropped group {a['dropped']} of channel {name}: {a['backlog']} message(s) let go, "
            f"{a['disconnected']} disconnected" + (" (recreated, empty)" if a["recreated"] else "")
        ],
    )


# dlq -----------------------------------------------------------------------------------------


@click.group()
def dlq() -> None:
    """Inspect, replay and purge dead letters (admin API)."""


@dlq.command("list")
@click.argument("channel")
@click.option("--limit", type=POSITIVE_INT, default=100, show_default=True)
@admin_options
def list_dead_letters(channel: str, limit: int) -> None:
    """List the dead letters of CHANNEL, oldest first."""
    admin = connect()
    answer = admin.call("GET", "channels", channel, "dead-letters", params={"limit": limit})
    empty = "no dead letters"
    admin.show(answer, lambda a: listing(a["dead_letters"], DEAD_LETTER_COLUMNS, empty))


@dlq.command("show")
@click.argument("channel")
@click.argument("message_id")
@admin_options
def show_dead_letter(channel: str, message_id: str) -> None:
    """Show one dead letter: why it died, its headers and its body."""
    admin = connect()
    answer = admin.call("GET", "channels", channel, "dead-letters", message_id)
    admin.show(answer, dead_letter_report)


@dlq.command()
@click.argument("channel")
@click.argument("message_ids", nargs=-1)
@click.option("--all", "everything", is_flag=True, help="Every dead letter of CHANNEL.")
@admin_options
def replay(channel: str, message_ids: tuple[str, ...], everything: bool) -> None:
    """Send dead letters back to the group that gave up on them (with new message ids)."""
    body = selection(message_ids, everything, {"all": True})
    admin = connect()
    answer = admin.call("POST", "channels", channel, "dead-letters", "replay", body=body)
    admin.show(answer, lambda a: [f"replayed {a['replayed']}"])


@dlq.command()
@click.argument("channel")
@click.argument("message_ids", nargs=-1)
@click.option("--all", "everything", is_flag=True, help="Every dead letter of CHANNEL.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@admin_options
def purge(channel: str, message_ids: tuple[str, ...], everything: bool, yes: bool) -> None:
    """Delete dead letters for good."""
    body = selection(message_ids, everything, {})
    admin = connect()
    if not yes:
        which = "every dead letter" if everything else f"{len(message_ids)} dead letter(s)"
        click.confirm(f"Delete {which} of channel {channel} for good?", abort=True, err=True)
    answer = admin.call("DELETE", "channels", channel, "dead-letters", body=body)
    admin.show(answer, lambda a: [f"purged {a['purged']}"])
