"""The Redis buffer's Lua scripts, the constants they share with Python, and their errors.

``redis_scripts.lua`` holds every script after one prelude. Each script is given a header of
``local NAME = value`` lines rendered from :data:`LUA_CONSTANTS`, so a limit or a code is
written once, here. Errors reach Python as error replies whose first word is a code: the
scripts' own (``WC_CHANNEL_FULL``, ``WC_NO_CHANNEL``, ``WC_NO_STREAM``) or Redis's
(``NOGROUP``); :func:`storage_error` is the one place they (and a lost connection) become the
project's exceptions.
"""

from __future__ import annotations

from importlib import resources

import orjson
from redis.exceptions import ClusterError, RedisClusterException, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from webhook_connect.cloud.buffers.base import ATTEMPTS_KEPT, EVENTS_KEPT
from webhook_connect.shared.exceptions import (
    ChannelFull,
    StorageError,
    StorageUnavailable,
    UnknownChannel,
)

# The sections of redis_scripts.lua. (Names wrapped by length: one a line would make the list
# the longest thing in the module.)
SCRIPT_NAMES = (
    "append",
    "read",
    "ack",
    "nack",
    "release",
    "housekeep",
    "depth",
    "connect",
    "touch",
    "hit",
    "groups",
    "dropgroup",
    "idlegroups",
    "join",
    "hasgroup",
)

# The error codes of the scripts' replies.
CHANNEL_FULL = "WC_CHANNEL_FULL"  # + " <limit> <group> <backlog>": the group holding the most
NO_CHANNEL = "WC_NO_CHANNEL"  # the channel has no configuration (never provisioned, deleted)
NO_STREAM = "WC_NO_STREAM"  # the channel has no stream (deleted, or nothing ever joined)
NO_GROUP = "NOGROUP"  # Redis's own: the consumer group (or the stream) does not exist
# What a caller may take as "nothing there" (a dropped group, a deleted channel).
ABSENT = frozenset({NO_STREAM, NO_GROUP})
# Redis's refusals of who we are (no AUTH, a wrong password, an ACL user without the right):
# storage is unusable until the operator fixes credentials, so a 503 and a retry, as for a
# server that is down.
REFUSED_CREDENTIALS = frozenset({"NOAUTH", "WRONGPASS", "NOPERM"})

# Per-connection delivered counts live in the stats hash under this prefix.
BY_CONNECTION = "by:"
# Messages nacked or released wait in the group's pending list under this consumer.
RETRY_CONSUMER = "__retry__"
# How many entries a group's backlog counts when Redis does not know its lag (see backlog()).
LAG_COUNTED = 1000

LUA_CONSTANTS: dict[str, int | str] = {
    "RETRY_CONSUMER": RETRY_CONSUMER,
    "EVENTS_KEPT": EVENTS_KEPT,
    "ATTEMPTS_KEPT": ATTEMPTS_KEPT,
    "LAG_COUNTED": LAG_COUNTED,
    "BY_CONNECTION": BY_CONNECTION,
    "CHANNEL_FULL": CHANNEL_FULL,
    "NO_CHANNEL": NO_CHANNEL,
    "NO_STREAM": NO_STREAM,
}

# A Redis Cluster failing over, migrating a slot or without quorum is storage unavailable too
# (a 503 and a retry), as are its replies saying so (CLUSTER_DOWN).
UNAVAILABLE = (
    RedisConnectionError,
    RedisTimeoutError,
    OSError,
    ClusterError,
    RedisClusterException,
    TryAgainError,
)
CLUSTER_DOWN = frozenset({"CLUSTERDOWN", "TRYAGAIN", "MASTERDOWN", "LOADING"})


def lua_header(constants: dict[str, int | str]) -> str:
    """``local NAME = value`` lines; strings as JSON literals, which Lua reads the same."""
    return "".join(
        f"local {name} = {orjson.dumps(value).decode()}\n" for name, value in constants.items()
    )


def load_scripts() -> dict[str, str]:
    """Every script's full source: the constants, the prelude, then its own section."""
    text = (
        resources.files("webhook_connect.cloud.buffers").joinpath("redis_scripts.lua").read_text()
    )
    prelude, *sections = text.split("\n-- script: ")
    head = lua_header(LUA_CONSTANTS) + prelude
    scripts = {}
    for section in sections:
        name, _, body = section.partition("\n")
        scripts[name.strip()] = head + "\n" + body
    assert set(scripts) == set(SCRIPT_NAMES), sorted(scripts)
    return scripts


def error_code(error: Exception | str) -> str:
    """The code of an error reply (its first word, after Redis's generic ``ERR``)."""
    return str(error).removeprefix("ERR ").partition(" ")[0]


def storage_error(error: Exception, channel: str = "") -> StorageError:
    """The project's exception for what Redis reported: a lost or unreachable server is
    StorageUnavailable (a 503, a retry); a full or unknown channel its own refusal; anything
    else StorageError. Every caller handles these, where redis-py's own exceptions would end a
    background loop or answer 500."""
    if isinstance(error, StorageError):
        return error
    if isinstance(error, UNAVAILABLE):
        return StorageUnavailable(f"redis unreachable: {error}")
    code = error_code(error)
    if code in CLUSTER_DOWN:
        return StorageUnavailable(f"redis cluster unavailable: {error}")
    if code in REFUSED_CREDENTIALS:
        return StorageUnavailable(f"redis refused our credentials: {error}")
    if code == CHANNEL_FULL:
        return _channel_full(channel, str(error).removeprefix("ERR ").split()[1:])
    if code in (NO_CHANNEL, NO_STREAM):
        return UnknownChannel(channel)
    return StorageError(f"redis: {error}")


def _channel_full(channel: str, parts: list[str]) -> ChannelFull:
    """From ``<limit> <group> <backlog>``: the group with the largest backlog."""
    limit = int(parts[0]) if parts else 0
    if len(parts) > 2:
        return ChannelFull(channel, limit, parts[1], int(parts[2]))
    return ChannelFull(channel, limit)
