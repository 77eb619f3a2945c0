"""A lean asyncio HTTP/1.1 client that delivers webhooks byte-exact to a local target.

The connector delivers thousands of requests per second; httpx spends more CPU per request than
the rest of the connector together (its pool cost grows with its size). This client does only
what delivery needs: keep-alive pools per origin, one request at a time per connection, headers
and body sent exactly as given, httptools to parse the answer.

HttpClientError                 (a WebhookConnectError)
├── ConnectError    the connection could not be opened, or broke before a complete response;
│                   also a ConnectionError — retryable
├── RequestTimeout  no complete response within ``timeout``; also a TimeoutError — retryable
├── ProtocolError   the target answered something that is not HTTP/1.1
└── InvalidRequest  the request cannot be sent as given (URL, CR/LF or non-Latin-1 header)
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import cast

import httptools

from webhook_connect.connector.proxy import ProxyPolicy, ProxyServer, open_tunnel
from webhook_connect.shared.exceptions import WebhookConnectError

MAX_CONNECTIONS_PER_HOST = 64
MAX_RESPONSE_BODY = 1024 * 1024
MAX_RESPONSE_HEAD = 64 * 1024
KEEPALIVE_EXPIRY = 5.0  # below the usual server keep-alive timeouts (uvicorn: 5 s)
WRITE_JOINED_UP_TO = 64 * 1024  # head and body in one send() below this body size
READ_BUFFER_SIZE = 256 * 1024

_URL = re.compile(r"(?i)(https?)://([^/?#]*)([^#]*)(?:#.*)?", re.DOTALL)
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_DEFAULT_PORTS = {"http": 80, "https": 443}


class HttpClientError(WebhookConnectError):
    """Root of the errors of :class:`HttpClient`."""


class ConnectError(HttpClientError, ConnectionError):
    """The connection could not be opened, or broke before a complete response arrived."""


class RequestTimeout(HttpClientError, TimeoutError):
    """No complete response arrived within the request's timeout."""


class ProtocolError(HttpClientError):
    """The target's answer is not valid HTTP/1.1, or exceeds the header size limit."""


class InvalidRequest(HttpClientError, ValueError):
    """The request cannot be sent as given; sending it again will not help."""


@dataclass(frozen=True, slots=True)
class Response:
    """A complete response; ``body`` is cut at the client's ``max_response_body``."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), or None."""
        name = name.lower()
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None


@dataclass(frozen=True, slots=True)
class _Origin:
    scheme: str
    host: str
    port: int
    authority: str  # the Host header: the URL's host[:port] as written, without userinfo

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.scheme, self.host.lower(), self.port)


def split_url(url: str) -> tuple[str, str, str]:
    """``(scheme, authority, target)``; the target is the path and raw query, untouched."""
    match = _URL.fullmatch(url)
    if match is None:
        raise InvalidRequest(f"not an absolute http(s) URL: {url!r}")
    scheme, authority, target = match.groups()
    if not target.startswith("/"):
        target = "/" + target
    if " " in target or "\r" in target or "\n" in target:
        raise InvalidRequest(f"whitespace in the URL's path or query: {url!r}")
    return scheme.lower(), authority, target


def _parse_origin(scheme: str, authority: str) -> _Origin:
    hostport = authority.rpartition("@")[2]
    if hostport.startswith("["):  # IPv6 literal: [::1]:8080
        host, _, rest = hostport[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port_text = hostport.partition(":")
    if not host:
        raise InvalidRequest(f"no host in {scheme}://{authority}")
    if port_text and not (port_text.isdigit() and 0 < int(port_text) < 65536):
        raise InvalidRequest(f"bad port in {scheme}://{authority}")
    port = int(port_text) if port_text else _DEFAULT_PORTS[scheme]
    return _Origin(scheme, host, port, hostport)


def encode_head(
    method: str, target: str, headers: Sequence[tuple[str, str]], host: str, length: int
) -> bytes:
    """The request line and headers, exactly as given, plus ``Host`` and ``Content-Length``.

    Byte-exact relay: names keep their case and order; only a given
    Content-Length or Transfer-Encoding is dropped, since the body is sent whole.
    """
    if method not in _METHODS and _TOKEN.fullmatch(method) is None:
        raise InvalidRequest(f"bad method {method!r}")
    lines = [f"{method} {target} HTTP/1.1", ""]
    has_host = False
    for name, value in headers:
        if len(name) in (4, 14, 17):  # cheap filter before lower()
            lowered = name.lower()
            if lowered == "content-length" or lowered == "transfer-encoding":
                continue
            has_host = has_host or lowered == "host"
        lines.append(f"{name}: {value}")
    if has_host:
        del lines[1]
    else:
        lines[1] = "Host: " + host
    lines.append(f"Content-Length: {length}\r\n\r\n")
    head = "\r\n".join(lines)
    # A CR or LF inside a name or value would let the caller inject headers or requests.
    if head.count("\n") != len(lines) + 1 or head.count("\r") != len(lines) + 1:
        raise InvalidRequest("CR or LF in a header name or value")
    try:
        return head.encode("latin-1")
    except UnicodeEncodeError as exc:
        raise InvalidRequest("a header is not Latin-1 text") from exc


class _Stale(Exception):
    """The connection closed before any byte of the response arrived."""


class _Connection(asyncio.BufferedProtocol):
    """One keep-alive connection carrying one request at a time; parsing only, no awaiting."""

    def __init__(self, pool: _Pool) -> None:
        self.pool = pool
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.lost: asyncio.Future[None] = self.loop.create_future()
        self.is_closed = False
        self.idle_since = 0.0
        self.waiter: asyncio.Future[Response] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.is_head = False
        self.received = False
        self.headers_done = False
        self.headers: list[tuple[str, str]] = []
        self.head_size = 0
        self.body: bytes | bytearray = b""
        self.truncated = False

    # -- driven by the client -------------------------------------------------------------

    def send(
        self, head: bytes, body: bytes, deadline: float, is_head: bool
    ) -> asyncio.Future[Response]:
        transport = self.transport
        if transport is None or self.is_closed or transport.is_closing():
            raise _Stale
        self.waiter = waiter = self.loop.create_future()
        self.timer = self.loop.call_at(deadline, self._time_out)
        self.is_head = is_head
        self.received = self.headers_done = self.truncated = False
        self.headers = []
        self.head_size = 0
        self.body = b""
        if len(body) <= WRITE_JOINED_UP_TO:
            transport.write(head + body)
        else:
            transport.write(head)
            transport.write(body)
        return waiter

    def close(self) -> None:
        self.is_closed = True
        if self.transport is not None:
            self.transport.abort()

    # -- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def get_buffer(self, sizehint: int) -> memoryview:
        # One buffer for all connections: each read is parsed before the next one starts.
        # (With data_received(), asyncio allocates 256 KiB per read: mmap/munmap each time.)
        return self.pool.read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.received = True
        try:
            self.parser.feed_data(self.pool.read_buffer[:nbytes])
        except httptools.HttpParserCallbackError as exc:
            self._fail(exc.__context__ or ProtocolError(str(exc)))
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self._fail(ProtocolError(f"invalid HTTP response: {exc}"))
        else:
            if not self.headers_done and self.waiter is not None:
                # Bounded everything: the parser buffers a header until it
                # ends, so an endless head must be cut here, by the bytes seen before its end.
                self.head_size += nbytes
                if self.head_size > MAX_RESPONSE_HEAD:
                    self._fail(ProtocolError(f"response head exceeds {MAX_RESPONSE_HEAD} bytes"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.is_closed = True
        if self.timer is not None:
            self.timer.cancel()
        self.pool.forget(self)
        if not self.lost.done():
            self.lost.set_result(None)
        waiter, self.waiter = self.waiter, None
        if waiter is None or waiter.done():
            return
        if not self.received:
            stale = _Stale()
            stale.__cause__ = exc  # a TLS alert (no client certificate) says why, if any
            waiter.set_exception(stale)
        elif self.headers_done and not self._is_framed():
            self._finish(waiter)  # no Content-Length, not chunked: the body ends at EOF
        else:
            waiter.set_exception(ConnectError("connection closed before the response was complete"))

    # -- httptools callbacks --------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        if self.waiter is None:
            raise ProtocolError("response without a request")
        self.headers_done = True
        if self.is_head:  # no body follows whatever the headers say; the parser cannot know
            self.truncated = True  # the parser state is now unusable: close after this
            self._finish(self.waiter)

    def on_body(self, body: bytes) -> None:
        room = self.pool.max_body - len(self.body)
        if len(body) > room:
            body = body[:room]
            self.truncated = True
        if not self.body:
            self.body = body
        else:
            if type(self.body) is bytes:
                self.body = bytearray(self.body)
            self.body += body
        if self.truncated and self.waiter is not None:
            # Excess is not read at all: a hostile target cannot make us spend time or memory.
            self._finish(self.waiter)

    def on_message_complete(self) -> None:
        waiter = self.waiter
        if waiter is None:
            return  # completed early (HEAD, truncated body); the connection is closing
        if self.parser.get_status_code() < 200:
            self.headers = []  # interim 1xx response: the real one follows
            self.headers_done = False
            self.head_size = 0
            return
        self._finish(waiter)

    # -- internals ------------------------------------------------------------------------

    def _finish(self, waiter: asyncio.Future[Response]) -> None:
        self.waiter = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        body = self.body if type(self.body) is bytes else bytes(self.body)
        if not waiter.done():
            waiter.set_result(Response(self.parser.get_status_code(), self.headers, body))
        assert self.transport is not None
        reusable = (
            not self.truncated
            and not self.is_closed
            and self.parser.should_keep_alive()
            # The target answered before reading all of the body: the rest would be misread.
            and not self.transport.get_write_buffer_size()
        )
        if reusable:
            self.pool.put_idle(self)
        else:
            self.close()

    def _fail(self, exc: BaseException) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        self.close()

    def _time_out(self) -> None:
        self.timer = None
        self._fail(RequestTimeout("no complete response within the timeout"))

    def _is_framed(self) -> bool:
        for name, value in self.headers:
            lowered = name.lower()
            if lowered == "content-length":
                return True
            if lowered == "transfer-encoding" and value.lower().rstrip().endswith("chunked"):
                return True
        return False


class _Pool:
    """The connections to one origin: idle ones (LIFO) and slots for requests in flight."""

    def __init__(self, client: HttpClient, origin: _Origin, loop: asyncio.AbstractEventLoop):
        self.client = client
        self.origin = origin
        self.loop = loop
        # Decided once per origin, so requests never look at the proxy settings.
        self.proxy: ProxyServer | None = None
        if client.proxies is not None:
            self.proxy = client.proxies.choose(origin.scheme, origin.host, origin.port)
        self.max_body = client.max_response_body
        self.read_buffer = client.read_buffer
        self.idle: list[_Connection] = []
        self.connections: set[_Connection] = set()
        self.in_use = 0
        self.waiters: deque[asyncio.Future[None]] = deque()

    async def acquire(self, deadline: float) -> None:
        """Take one of ``max_connections_per_host`` slots, waiting in FIFO order if none."""
        if self.in_use < self.client.max_connections_per_host and not self.waiters:
            self.in_use += 1
            return
        slot = self.loop.create_future()
        self.waiters.append(slot)
        try:
            async with asyncio.timeout_at(deadline):
                await slot
        except BaseException as exc:
            if slot.done() and not slot.cancelled():
                self.release()  # handed a slot just as we gave up: pass it on
            if isinstance(exc, TimeoutError):
                raise RequestTimeout("no free connection within the timeout") from exc
            raise

    def release(self) -> None:
        while self.waiters:
            slot = self.waiters.popleft()
            if not slot.done():
                slot.set_result(None)  # the slot passes on; in_use is unchanged
                return
        self.in_use -= 1

    def take_idle(self) -> _Connection | None:
        idle = self.idle
        while idle:
            connection = idle.pop()
            if connection.is_closed:
                continue
            if self.loop.time() - connection.idle_since >= self.client.keepalive_expiry:
                # LIFO: everything below is older still.
                for stale in (connection, *idle):
                    stale.close()
                idle.clear()
                return None
            return connection
        return None

    def put_idle(self, connection: _Connection) -> None:
        connection.idle_since = self.loop.time()
        self.idle.append(connection)

    def forget(self, connection: _Connection) -> None:
        self.connections.discard(connection)
        if connection in self.idle:
            self.idle.remove(connection)

    async def connect(self, deadline: float) -> _Connection:
        origin = self.origin
        if self.client.is_closed:
            raise ConnectError("the HttpClient was closed while the request was in flight")
        ssl_context = self.client.ssl_context() if origin.scheme == "https" else None
        try:
            async with asyncio.timeout_at(deadline):
                if self.proxy is None:
                    _, connection = await self.loop.create_connection(
                        lambda: _Connection(self),
                        origin.host,
                        origin.port,
                        ssl=ssl_context,
                        server_hostname=origin.host if ssl_context else None,
                    )
                else:
                    tunnel = await open_tunnel(self.proxy, origin.host, origin.port)
                    _, connection = await self.loop.create_connection(
                        lambda: _Connection(self),
                        sock=tunnel,
                        ssl=ssl_context,
                        server_hostname=origin.host if ssl_context else None,
                    )
        except TimeoutError as exc:
            raise RequestTimeout(f"connecting to {origin.authority} timed out") from exc
        except OSError as exc:
            raise ConnectError(f"cannot connect to {origin.authority}: {exc}") from exc
        if self.client.is_closed:  # aclose() ran while connecting: it could not close this one
            connection.close()
            raise ConnectError("the HttpClient was closed while the request was in flight")
        self.connections.add(connection)
        return connection


class HttpClient:
    """Keep-alive HTTP/1.1 client; create and use it inside one running event loop."""

    def __init__(
        self,
        *,
        max_connections_per_host: int = MAX_CONNECTIONS_PER_HOST,
        max_response_body: int = MAX_RESPONSE_BODY,
        keepalive_expiry: float = KEEPALIVE_EXPIRY,
        ssl_context: ssl.SSLContext | None = None,
        proxies: ProxyPolicy | None = None,
    ) -> None:
        self.max_connections_per_host = max_connections_per_host
        self.proxies = proxies
        self.max_response_body = max_response_body
        self.keepalive_expiry = keepalive_expiry
        self._ssl_context = ssl_context
        self.read_buffer = memoryview(bytearray(READ_BUFFER_SIZE))
        self._pools: dict[tuple[str, str, int], _Pool] = {}
        # (scheme, authority as written) -> its pool and Host header; targets are few.
        self._routes: dict[tuple[str, str], tuple[_Pool, str]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self.is_closed = False

    async def request(
        self,
        method: str,
        url: str,
        headers: Sequence[tuple[str, str]],
        body: bytes,
        timeout: float,  # noqa: ASYNC109 - one deadline timer is cheaper than a scope per request
    ) -> Response:
        """Send one request and read its whole response (body up to ``max_response_body``).

        ``timeout`` bounds everything: waiting for a connection, connecting, sending, reading.
        """
        if self.is_closed:
            raise RuntimeError("the HttpClient is closed")
        scheme, authority, target = split_url(url)
        pool, host = self._routes.get((scheme, authority)) or self._route(scheme, authority)
        head = encode_head(method, target, headers, host, len(body))
        deadline = pool.loop.time() + timeout
        is_head = method == "HEAD"
        await pool.acquire(deadline)
        try:
            connection = pool.take_idle()
            if connection is not None:
                try:
                    return await self._exchange(connection, head, body, deadline, is_head)
                except _Stale:
                    pass  # a keep-alive connection the target had closed: nothing was processed
            connection = await pool.connect(deadline)
            try:
                return await self._exchange(connection, head, body, deadline, is_head)
            except _Stale as exc:
                raise ConnectError("connection closed before any response") from exc
        finally:
            pool.release()

    @staticmethod
    async def _exchange(
        connection: _Connection, head: bytes, body: bytes, deadline: float, is_head: bool
    ) -> Response:
        waiter = connection.send(head, body, deadline, is_head)
        try:
            return await waiter
        except asyncio.CancelledError:
            connection.close()  # the response was not read: the connection is unusable
            raise

    async def aclose(self) -> None:
        """Close every connection and wait until they are closed."""
        self.is_closed = True
        connections = [c for pool in self._pools.values() for c in pool.connections]
        self._pools.clear()
        self._routes.clear()
        for connection in connections:
            connection.close()
        if connections:
            await asyncio.wait([c.lost for c in connections], timeout=5)

    async def __aenter__(self) -> HttpClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    def ssl_context(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            self._ssl_context = ssl.create_default_context()
        return self._ssl_context

    def _route(self, scheme: str, authority: str) -> tuple[_Pool, str]:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        origin = _parse_origin(scheme, authority)
        pool = self._pools.get(origin.key)
        if pool is None:
            pool = self._pools[origin.key] = _Pool(self, origin, self._loop)
        route = self._routes[(scheme, authority)] = (pool, origin.authority)
        return route
