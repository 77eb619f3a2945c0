"""A Redis storage URL turned into connection parameters, once, for every client.

The cloud opens Redis connections two ways: redis-py for the cold path and pub/sub, and the
lean pipelining :class:`~.resp.RespClient` for the hot path (and for each node of a cluster).
When each read the URL on its own they disagreed: redis-py honoured ``ssl_ca_certs`` while the
hot path verified against the system CAs, so ``/ready`` answered 200 while every webhook failed
``CERTIFICATE_VERIFY_FAILED``. :func:`parse_redis_url` is the one reading of the URL, and the
:class:`RedisEndpoint` it returns carries one built :class:`ssl.SSLContext` that both clients
use as it is.

Accepted query options (anything else is refused, naming the option)::

    ssl_ca_certs=FILE        CA bundle the server's certificate must chain to (default: the
                             system CAs)
    ssl_certfile=FILE        client certificate, for a server with tls-auth-clients yes
    ssl_keyfile=FILE         its private key (default: in ssl_certfile)
    ssl_cert_reqs=required|optional|none   server certificate check (default: required)
    ssl_check_hostname=true|false          the name in the certificate must match the host
                                           (default: true; false with ssl_cert_reqs=none)
    db=N                     database number (also the path: redis://host:port/N)
"""

from __future__ import annotations

import dataclasses
import ssl
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

SCHEMES = ("redis", "rediss", "unix")
TLS_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_check_hostname")
OPTIONS = (*TLS_OPTIONS, "db")
CERT_REQS: Mapping[str, ssl.VerifyMode] = {
    "required": ssl.CERT_REQUIRED,
    "optional": ssl.CERT_OPTIONAL,
    "none": ssl.CERT_NONE,
}
BOOLEANS: Mapping[str, bool] = {
    "true": True,
    "yes": True,
    "on": True,
    "1": True,
    "false": False,
    "no": False,
    "off": False,
    "0": False,
}
DEFAULT_PORT = 6379


class RedisUrlError(ValueError):
    """A storage URL no Redis client can use; ``key`` names the part at fault."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}" if key else reason)
        self.key = key
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class RedisEndpoint:
    """Where and how to connect: what every Redis client of the cloud is built from."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    path: str = ""  # a unix socket (unix://); host and port are then unused
    username: str | None = None
    password: str | None = dataclasses.field(default=None, repr=False)
    db: int = 0
    tls: ssl.SSLContext | None = None  # built once from tls_settings, shared by every client
    tls_settings: TLSSettings | None = None

    def at(self, host: str, port: int) -> RedisEndpoint:
        """The same credentials and TLS for another node (a cluster member, a MOVED target)."""
        return dataclasses.replace(self, host=host, port=port, path="")

    def handshake(self) -> list[tuple[str | int, ...]]:
        """The commands a fresh connection sends before anything else (AUTH, SELECT)."""
        commands: list[tuple[str | int, ...]] = []
        if self.password is not None:
            if self.username is not None:
                commands.append(("AUTH", self.username, self.password))
            else:
                commands.append(("AUTH", self.password))
        if self.db:
            commands.append(("SELECT", self.db))
        return commands


def parse_redis_url(url: str) -> RedisEndpoint:
    """Read a ``redis://``, ``rediss://`` or ``unix://`` URL; build its SSLContext (reading the
    files it names). Raise :class:`RedisUrlError` naming the option or part at fault."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise RedisUrlError("", f"unsupported scheme {parts.scheme!r}: use redis:// or rediss://")
    query = _query(parts.query)
    unknown = sorted(set(query) - set(OPTIONS))
    if unknown:
        raise RedisUrlError(
            unknown[0],
            f"unknown option; the options are {', '.join(OPTIONS)} (docs/CONFIGURATION.md)",
        )
    try:
        port = parts.port
    except ValueError:
        raise RedisUrlError("port", "not a TCP port") from None
    db_text = query.get("db", "" if scheme == "unix" else parts.path.strip("/"))
    if db_text and not db_text.isdigit():
        raise RedisUrlError("db", f"{db_text!r} is not a database number")
    if scheme != "rediss":
        given = [name for name in TLS_OPTIONS if name in query]
        if given:
            raise RedisUrlError(given[0], f"needs TLS: use rediss:// instead of {scheme}://")
    if scheme == "unix" and not parts.path:
        raise RedisUrlError("path", "unix:// needs the socket's path (unix:///run/redis.sock)")
    tls = TLSSettings.from_options(query) if scheme == "rediss" else None
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    if username is not None and password is None:
        raise RedisUrlError("password", f"user {username!r} given without one: USER:PASSWORD@")
    return RedisEndpoint(
        host=parts.hostname or "127.0.0.1",
        port=port or DEFAULT_PORT,
        path=unquote(parts.path) if scheme == "unix" else "",
        username=username,
        password=password,
        db=int(db_text) if db_text else 0,
        tls=tls.context() if tls is not None else None,
        tls_settings=tls,
    )


def _query(text: str) -> dict[str, str]:
    options: dict[str, str] = {}
    for name, value in parse_qsl(text, keep_blank_values=True):
        if name in options:
            raise RedisUrlError(name, "given twice")
        options[name] = value
    return options


@dataclasses.dataclass(frozen=True)
class TLSSettings:
    """A ``rediss://`` URL's TLS options, checked. :meth:`context` builds the SSLContext every
    client shares; :meth:`redis_py_options` says the same to a redis-py client that builds its
    own (``RedisCluster`` takes no context), with the same meaning redis-py gives them."""

    ca_certs: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    cert_reqs: str = "required"
    check_hostname: bool = True

    @classmethod
    def from_options(cls, options: Mapping[str, str]) -> TLSSettings:
        cert_reqs = options.get("ssl_cert_reqs", "required").lower()
        if cert_reqs not in CERT_REQS:
            raise RedisUrlError("ssl_cert_reqs", f"{cert_reqs!r}: use required, optional or none")
        default_check = "false" if cert_reqs == "none" else "true"
        check_text = options.get("ssl_check_hostname", default_check).lower()
        if check_text not in BOOLEANS:
            raise RedisUrlError("ssl_check_hostname", f"{check_text!r}: use true or false")
        if BOOLEANS[check_text] and cert_reqs == "none":
            raise RedisUrlError(
                "ssl_check_hostname",
                "true needs the certificate checked: not with ssl_cert_reqs=none",
            )
        if "ssl_keyfile" in options and "ssl_certfile" not in options:
            raise RedisUrlError("ssl_keyfile", "given without ssl_certfile")
        return cls(
            ca_certs=options.get("ssl_ca_certs"),
            certfile=options.get("ssl_certfile"),
            keyfile=options.get("ssl_keyfile"),
            cert_reqs=cert_reqs,
            check_hostname=BOOLEANS[check_text],
        )

    def context(self) -> ssl.SSLContext:
        """The client SSLContext (reading the files named); RedisUrlError if one does not load."""
        context = ssl.create_default_context()
        context.check_hostname = self.check_hostname
        context.verify_mode = CERT_REQS[self.cert_reqs]
        if self.ca_certs is not None:
            try:
                context.load_verify_locations(cafile=self.ca_certs)
            except (OSError, ssl.SSLError) as exc:
                reason = f"cannot load {self.ca_certs!r}: {_reason(exc)}"
                raise RedisUrlError("ssl_ca_certs", reason) from None
        if self.certfile is not None:
            try:
                context.load_cert_chain(self.certfile, self.keyfile)
            except (OSError, ssl.SSLError) as exc:
                key = "ssl_certfile" if self.keyfile is None else "ssl_certfile/ssl_keyfile"
                raise RedisUrlError(key, f"cannot load {self.certfile!r}: {_reason(exc)}") from None
        return context

    def redis_py_options(self) -> dict[str, Any]:
        """redis-py's ``ssl_*`` keyword arguments meaning what :meth:`context` builds."""
        return {
            "ssl": True,
            "ssl_ca_certs": self.ca_certs,
            "ssl_certfile": self.certfile,
            "ssl_keyfile": self.keyfile,
            "ssl_cert_reqs": self.cert_reqs,
            "ssl_check_hostname": self.check_hostname,
        }


def _reason(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc)
