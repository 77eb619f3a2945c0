"""The Core Webhook Module's key names and forms, mapped onto ours before validation.

Its files must load here unchanged. Pure functions: each takes one object of a file and
returns the object in our terms, reporting through :func:`warn` every key it drops. A key is
dropped, with one warning line naming the file and key path, when it means nothing to us
(a key of neither project, or one of theirs we cannot apply yet); keys whose names start with
``_`` are comments and dropped without a word. Nothing security-relevant is dropped silently.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from webhook_connect.shared.config.substitution import join_path

logger = logging.getLogger("webhook_connect.config")

# Entry-level keys its loader hands to the module as if they were in module-config.
ENTRY_MODULE_KEYS = ("queue_name", "topic")
# module-config key renames, per module: theirs -> ours.
MODULE_RENAMES: Mapping[str, Mapping[str, str]] = {
    "save_to_disk": {"filename_template": "filename_pattern"},
}
# module-config keys of theirs that ours cannot apply, per module, and what happens instead.
MODULE_NOT_APPLIED: Mapping[str, Mapping[str, str]] = {
    "save_to_disk": {
        "format": "not applied: each message is written as one JSON file",
        "append": "not applied: each message is written to a file of its own under 'path'",
    },
    "mqtt": {
        key: "not applied: Shelly and Tasmota message formats are not built; the message is "
        "published to 'topic' as the module's 'format' says"
        for key in (
            "shelly_gen2_format",
            "device_id",
            "tasmota_format",
            "tasmota_type",
            "device_name",
            "command",
        )
    },
}
CREDENTIAL_CLEANUP_WARNING = (
    "not applied: credentials in payloads and headers reach the modules unchanged "
    "(log's redact_sensitive masks them in the log)"
)
# Connector keys: theirs -> ours.
CONNECTOR_RENAMES: Mapping[str, str] = {
    "max_concurrent": "max_concurrent_requests",
    "reconnect_delay": "reconnect_delay_seconds",
    "max_reconnect_delay": "max_reconnect_delay_seconds",
    "verify_ssl": "verify_tls",
    "ca_cert_path": "ca_file",
}
CONNECTOR_NOT_APPLIED: Mapping[str, str] = {
    "heartbeat_timeout": "not applied: the cloud's heartbeats and the transport's own "
    "timeouts detect a dead connection",
    "connection_timeout": "not applied: a connection attempt that hangs is retried with backoff",
    "ack_timeout": "not applied: the channel's ack_timeout_seconds (cloud side) decides",
    "log_level": "not applied from the file: give --log-level (WEBHOOK_CONNECT_LOG_LEVEL)",
    "log_format": "not applied from the file: give --log-format json|text "
    "(WEBHOOK_CONNECT_LOG_FORMAT)",
    # Not taken as client_cert/client_key: ours are read at start (a missing file exits 2),
    # and a Core Webhook Module file must load unchanged wherever its paths point.
    "client_cert_path": "not applied: give client_cert (and client_key) for the connector to "
    "present a client certificate; without one, a cloud that requires it will refuse it",
    "client_key_path": "not applied: give client_key (with client_cert) for the connector to "
    "present a client certificate; without one, a cloud that requires it will refuse it",
    "etcd_host": "not applied: configuration from etcd is not supported; use webhooks_config",
    "etcd_port": "not applied: configuration from etcd is not supported",
    "etcd_prefix": "not applied: configuration from etcd is not supported",
    "namespace": "not applied: configuration from etcd is not supported",
}
# connections.json key renames, per connection type: theirs -> ours.
CONNECTION_RENAMES: Mapping[str, Mapping[str, str]] = {
    kind: {"access_key_id": "aws_access_key_id", "secret_access_key": "aws_secret_access_key"}
    for kind in ("s3", "aws_sqs", "aws")
}
UNKNOWN = "unknown key, ignored"


def warn(source: str, path: str, reason: str) -> None:
    """One warning line naming the file, the key path and why the key has no effect."""
    logger.warning("configuration warning: %s: %s: %s", source, path, reason)


def is_comment(key: object) -> bool:
    """``_comment``, ``_note``, ``_``: keys its files use as comments."""
    return isinstance(key, str) and key.startswith("_")


def drop_comments(tree: Mapping[str, Any]) -> dict[str, Any]:
    """The object without its comment keys (one level)."""
    return {key: value for key, value in tree.items() if not is_comment(key)}


def keep_known(
    tree: Mapping[str, Any],
    known: Iterable[str],
    source: str,
    path: str,
    not_applied: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """``tree`` with only the ``known`` keys; comments dropped silently, every other key with
    a warning (``not_applied`` gives the reason for keys that mean something elsewhere)."""
    known = set(known)
    kept: dict[str, Any] = {}
    for key, value in tree.items():
        if key in known:
            kept[key] = value
        elif not is_comment(key):
            reason = (not_applied or {}).get(key, UNKNOWN)
            warn(source, join_path(path, key), reason)
    return kept


def connector_settings(
    tree: Mapping[str, Any], known: Iterable[str], source: str
) -> dict[str, Any]:
    """``connector.json`` in our names. Where a file has both their key and ours, ours wins."""
    renamed: dict[str, Any] = {}
    for key, value in tree.items():
        ours = CONNECTOR_RENAMES.get(key)
        if ours is None:
            renamed.setdefault(key, value)
        elif ours in tree:
            warn(source, key, f"ignored: {ours} is given too")
        else:
            renamed[ours] = value
    return keep_known(renamed, known, source, "", CONNECTOR_NOT_APPLIED)


def entry_module_config(
    raw: Mapping[str, Any], module: str, accepted: Iterable[str]
) -> dict[str, Any]:
    """``module-config`` of an entry or chain step, with the entry-level keys its loader also
    reads (``queue_name``, ``topic``) moved in when the module takes them and does not set
    them itself, and its module-config key names renamed to ours."""
    config = dict(raw.get("module-config") or {})
    accepted = set(accepted)
    for key in ENTRY_MODULE_KEYS:
        if key in raw and key in accepted and key not in config:
            config[key] = raw[key]
    for theirs, ours in MODULE_RENAMES.get(module, {}).items():
        if theirs in config and ours not in config:
            config[ours] = config.pop(theirs)
    return config


def bare_function_warning(module: str, config: Mapping[str, Any]) -> str | None:
    """Why a ``redis_rq`` function given as a bare name will not run as intended, if it is."""
    function = config.get("function")
    if module == "redis_rq" and isinstance(function, str) and function and "." not in function:
        return (
            f"{function!r} is a bare name: an rq worker resolves it only among builtins; "
            "write 'module.function' (queued as written)"
        )
    return None


def redis_block(raw: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """An entry's ``redis`` object (``redis_publish`` without a named connection): the
    connection it describes, and the module-config keys it holds (``channel``)."""
    block = raw.get("redis")
    if not isinstance(block, dict):
        return {}, {}
    config = {key: block[key] for key in ("channel",) if key in block}
    connection = {key: value for key, value in block.items() if key != "channel"}
    return {"type": "redis", **connection}, config


def rate_limit(value: Any, source: str, path: str) -> Any:
    """``rate_limit`` with its ``enabled`` flag: false means no limit; true is our default."""
    if not isinstance(value, dict) or "enabled" not in value:
        return value
    rest = {key: item for key, item in value.items() if key != "enabled"}
    if value["enabled"] is False:
        return None
    if value["enabled"] is not True:
        warn(source, join_path(path, "enabled"), "expected true or false; taken as true")
    return rest


def connection_entry(tree: Mapping[str, Any], source: str, path: str) -> dict[str, Any]:
    """A ``connections.json`` entry in our terms (aws key names, gcp ``credentials``)."""
    entry = drop_comments(tree)
    for theirs, ours in CONNECTION_RENAMES.get(str(entry.get("type")), {}).items():
        if theirs in entry and ours not in entry:
            entry[ours] = entry.pop(theirs)
    if entry.get("type") == "gcp_pubsub" and "credentials" in entry:
        credentials = entry.pop("credentials")
        if isinstance(credentials, str) and credentials:
            entry.setdefault("credentials_path", credentials)
        elif credentials not in ({}, None, ""):
            warn(
                source,
                join_path(path, "credentials"),
                "not applied: inline service-account keys are not read; put the key in a "
                "file and name it in credentials_path (without one, the default "
                "credentials or the emulator are used)",
            )
    return entry
