"""Outbound HTTP proxies: which one a connection takes, and the ``CONNECT`` tunnel through it.

Every connection the connector opens through a proxy is a ``CONNECT`` tunnel, plain ``http://``
destinations included, so WebSocket, SSE, long-poll and targets behave alike and the proxy sees
one tunnel per connection. Only ``http://`` proxies are supported (the tunnel itself is
plain TCP to the proxy); credentials in the proxy URL become ``Proxy-Authorization: Basic``.

Which proxy (pure, decided once per origin, never per request):

- the cloud connection: the ``proxy`` key if set, else ``HTTPS_PROXY`` / ``HTTP_PROXY`` (by the
  cloud's scheme) unless ``NO_PROXY`` excludes the cloud's host;
- a target: its own ``proxy`` key if set, else the environment's as above, except that a
  loopback target (``localhost``, ``127.0.0.0/8``, ``::1``) is always reached directly: a proxy
  on another machine cannot reach our loopback.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from webhook_connect.shared.exceptions import WebhookConnectError

SUPPORTED_SCHEMES = ("http",)
MAX_PROXY_HEAD = 16 * 1024
_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
# The URL schemes whose connections take HTTPS_PROXY; the rest take HTTP_PROXY.
_SECURE = frozenset({"https", "wss"})


class ProxyError(WebhookConnectError, ConnectionError):
    """The proxy could not be reached, or refused the tunnel (retryable like any connect)."""


@dataclass(frozen=True, slots=True)
class ProxyServer:
    """An ``http://`` proxy: where it listens and the ``Proxy-Authorization`` to send."""

    host: str
    port: int
    authorization: str | None = None

    @property
    def address(self) -> str:
        """``host:port`` as shown in log lines (never the credentials)."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_proxy(url: str) -> ProxyServer:
    """``http://[user:pass@]host[:port]``; ValueError saying why for anything else."""
    parts = urlsplit(url.strip() if "://" in url else f"http://{url.strip()}")
    scheme = parts.scheme.lower()
    if scheme not in SUPPORTED_SCHEMES:
        raise ValueError(
            f"{scheme}:// proxies are not supported; use an http:// proxy "
            "(the connector tunnels through it with CONNECT)"
        )
    if not parts.hostname:
        raise ValueError(f"no host in proxy URL {_redacted(url)!r}")
    try:
        port = parts.port or 80
    except ValueError as exc:
        raise ValueError(f"bad port in proxy URL {_redacted(url)!r}") from exc
    authorization = None
    if parts.username is not None:
        credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        authorization = "Basic " + base64.b64encode(credentials.encode()).decode("ascii")
    return ProxyServer(parts.hostname, port, authorization)


def _redacted(url: str) -> str:
    """The URL without its password, for error messages."""
    scheme, _, rest = url.rpartition("://")
    userinfo, at, hostport = rest.rpartition("@")
    if not at:
        return url
    user = userinfo.partition(":")[0]
    return f"{scheme}://{user}:***@{hostport}" if scheme else f"{user}:***@{hostport}"


@dataclass(frozen=True, slots=True)
class NoProxy:
    """``NO_PROXY``: ``*``, or comma-separated hosts, domain suffixes (``.corp`` or ``corp``
    matches ``corp`` and ``x.corp``), IP addresses or CIDR ranges, each optionally ``:port``."""

    everything: bool = False
    rules: tuple[tuple[str, int | None], ...] = ()

    @classmethod
    def parse(cls, text: str) -> NoProxy:
        """Parse a ``NO_PROXY`` value; entries it cannot read are skipped (as curl does)."""
        rules: list[tuple[str, int | None]] = []
        for raw in text.replace(" ", ",").split(","):
            entry = raw.strip().lower()
            if not entry:
                continue
            if entry == "*":
                return cls(everything=True)
            port: int | None = None
            if entry.startswith("["):  # [::1]:8080
                host, _, rest = entry[1:].partition("]")
                if rest.startswith(":") and rest[1:].isdigit():
                    port = int(rest[1:])
                entry = host
            elif entry.count(":") == 1:
                host, _, port_text = entry.partition(":")
                if port_text.isdigit():
                    entry, port = host, int(port_text)
            rules.append((entry.lstrip("*").lstrip("."), port))
        return cls(rules=tuple(rules))

    def excludes(self, host: str, port: int) -> bool:
        """True if a connection to ``host:port`` must not use the proxy."""
        if self.everything:
            return True
        host = host.lower().strip("[]").rstrip(".")
        address = _ip(host)
        for rule, rule_port in self.rules:
            if rule_port is not None and rule_port != port:
                continue
            if address is not None and "/" in rule:
                try:
                    if address in ipaddress.ip_network(rule, strict=False):
                        return True
                except ValueError:
                    pass
                continue
            if host == rule or host.endswith("." + rule):
                return True
        return False


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def is_loopback(host: str) -> bool:
    """``localhost`` (and names under it), 127.0.0.0/8, ``::1``."""
    host = host.lower().strip("[]").rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    address = _ip(host)
    return address is not None and address.is_loopback


@dataclass(frozen=True, slots=True)
class ProxyPolicy:
    """Which proxy a connection to an origin takes (None: direct)."""

    explicit: ProxyServer | None = None
    http: ProxyServer | None = None
    https: ProxyServer | None = None
    no_proxy: NoProxy = NoProxy()
    loopback_direct: bool = False

    def choose(self, scheme: str, host: str, port: int | None = None) -> ProxyServer | None:
        """The proxy for ``scheme://host:port``; the explicit one always wins."""
        if self.explicit is not None:
            return self.explicit
        proxy = self.https if scheme.lower() in _SECURE else self.http
        if proxy is None:
            return None
        if self.loopback_direct and is_loopback(host):
            return None
        if port is None:
            port = _DEFAULT_PORTS.get(scheme.lower(), 80)
        if self.no_proxy.excludes(host, port):
            return None
        return proxy

    def choose_url(self, url: str) -> ProxyServer | None:
        """:meth:`choose` for an absolute URL."""
        parts = urlsplit(url)
        return self.choose(parts.scheme, parts.hostname or "", parts.port)


def environment_value(environ: Mapping[str, str], name: str) -> tuple[str, str] | None:
    """``(variable, value)`` of ``name`` in lower case, else upper case (the lower-case
    spelling wins, as in curl and Python's urllib); None when unset or empty."""
    for variable in (name.lower(), name.upper()):
        value = environ.get(variable, "").strip()
        if value:
            return variable, value
    return None


def environment_proxies(environ: Mapping[str, str]) -> dict[str, ProxyServer]:
    """``{"http": ..., "https": ...}`` from ``HTTP_PROXY`` / ``HTTPS_PROXY``; ValueError
    naming the variable when one is not a usable proxy URL."""
    proxies: dict[str, ProxyServer] = {}
    for scheme in ("http", "https"):
        found = environment_value(environ, f"{scheme}_proxy")
        if found is None:
            continue
        variable, value = found
        try:
            proxies[scheme] = parse_proxy(value)
        except ValueError as exc:
            raise ValueError(f"{variable}: {exc}") from None
    return proxies


def policy(
    explicit: str | None, environ: Mapping[str, str], *, loopback_direct: bool
) -> ProxyPolicy:
    """The policy of a ``proxy`` key (None: the environment's proxies and ``NO_PROXY``)."""
    if explicit:
        return ProxyPolicy(explicit=parse_proxy(explicit))
    proxies = environment_proxies(environ)
    if not proxies:
        return ProxyPolicy()
    found = environment_value(environ, "no_proxy")
    return ProxyPolicy(
        http=proxies.get("http"),
        https=proxies.get("https"),
        no_proxy=NoProxy.parse(found[1]) if found else NoProxy(),
        loopback_direct=loopback_direct,
    )


async def open_tunnel(proxy: ProxyServer, host: str, port: int) -> socket.socket:
    """A connected socket to ``host:port`` through ``proxy`` (``CONNECT``), ready for TLS or
    plain HTTP. The caller bounds the time; :class:`ProxyError` says what went wrong."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(proxy.host, proxy.port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ProxyError(f"proxy {proxy.address}: cannot resolve {proxy.host}: {exc}") from exc
    sock: socket.socket | None = None
    error: OSError | None = None
    for family, kind, proto, _, address in infos:
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, address)
            break
        except OSError as exc:
            sock.close()
            sock, error = None, exc
        except BaseException:
            sock.close()
            raise
    if sock is None:
        reason = "connection refused" if isinstance(error, ConnectionRefusedError) else error
        raise ProxyError(f"proxy {proxy.address}: {reason}")
    try:
        await _ask_tunnel(loop, sock, proxy, host, port)
    except BaseException:
        sock.close()
        raise
    return sock


async def _ask_tunnel(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, proxy: ProxyServer, host: str, port: int
) -> None:
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
    if proxy.authorization:
        lines.append(f"Proxy-Authorization: {proxy.authorization}")
    await loop.sock_sendall(sock, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    # Read the answer's head only: nothing follows a 2xx until we speak through the tunnel.
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = await loop.sock_recv(sock, 4096)
        if not chunk:
            raise ProxyError(f"proxy {proxy.address} closed the connection during CONNECT")
        head += chunk
        if len(head) > MAX_PROXY_HEAD:
            raise ProxyError(f"proxy {proxy.address}: answer to CONNECT too long")
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise ProxyError(f"proxy {proxy.address} answered CONNECT with {status_line[:100]!r}")
    if not 200 <= int(parts[1]) < 300:
        raise ProxyError(
            f"proxy {proxy.address} refused CONNECT {authority}: {' '.join(parts[1:])[:200]}"
        )
    if not head.endswith(b"\r\n\r\n"):
        raise ProxyError(f"proxy {proxy.address} sent data before the tunnel was used")
