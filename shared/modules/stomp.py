"""A small STOMP 1.2 producer for asyncio: pure frames, a connection that only pumps bytes.

Only what a confirmed publish needs: CONNECT, SEND with a ``receipt`` header, and the broker's
RECEIPT / ERROR answers. A SEND counts as stored once its RECEIPT arrives; an ERROR carrying its
``receipt-id`` refuses that SEND alone; an ERROR without one, or a dropped socket, fails every
SEND still waiting, since none of them is known to be stored.

Spec: https://stomp.github.io/stomp-specification-1.2.html
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import ssl
from dataclasses import dataclass

from webhook_connect.shared.exceptions import ModuleProtocolError

# The four escapes of STOMP 1.2 header values ("Value Encoding"); anything else is an error.
ESCAPES = {"\\": "\\\\", "\r": "\\r", "\n": "\\n", ":": "\\c"}
UNESCAPES = {"\\\\": "\\", "\\r": "\r", "\\n": "\n", "\\c": ":"}
ESCAPE_SEQUENCE = re.compile(r"\\.?", re.DOTALL)
HEADER_END = re.compile(rb"\r?\n\r?\n")
# CONNECT and CONNECTED predate escaping: their headers are sent as they are (spec, 1.2).
UNESCAPED_COMMANDS = frozenset({"CONNECT", "CONNECTED"})
# What a broker sends a producer is small (RECEIPT, ERROR); a larger frame is a broken stream.
MAX_FRAME_BYTES = 1 << 20


class StompFrameError(ModuleProtocolError):
    """The bytes received are not STOMP."""


class StompError(ModuleProtocolError):
    """The broker answered with an ERROR frame."""

    def __init__(self, frame: Frame) -> None:
        self.frame = frame
        # The first line: brokers append stack traces.
        detail = frame.body.decode("utf-8", "replace").strip().partition("\n")[0]
        message = frame.header("message") or "ERROR"
        super().__init__(f"{message}: {detail}" if detail and detail != message else message)


@dataclass(frozen=True, slots=True)
class Frame:
    command: str
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""

    def header(self, name: str) -> str | None:
        """The first value of ``name`` (a repeated header's first entry wins, spec 1.2)."""
        for key, value in self.headers:
            if key == name:
                return value
        return None


def escape(value: str) -> str:
    return "".join(ESCAPES.get(char, char) for char in value)


def unescape(value: str) -> str:
    def replace(match: re.Match[str]) -> str:
        try:
            return UNESCAPES[match.group()]
        except KeyError:
            raise StompFrameError(f"undefined escape sequence {match.group()!r}") from None

    return ESCAPE_SEQUENCE.sub(replace, value)


def encode(frame: Frame) -> bytes:
    """The frame on the wire: headers escaped (except CONNECT), the body as is, then NUL."""
    plain = frame.command in UNESCAPED_COMMANDS
    lines = [frame.command]
    for name, value in frame.headers:
        lines.append(f"{name}:{value}" if plain else f"{escape(name)}:{escape(value)}")
    return ("\n".join(lines) + "\n\n").encode() + frame.body + b"\x00"


class FrameParser:
    """Bytes in, frames out, whatever the chunking; heart-beat EOLs between frames are skipped."""

    def __init__(self, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        self._buffer = bytearray()
        self._max = max_frame_bytes

    def feed(self, data: bytes) -> list[Frame]:
        self._buffer += data
        frames: list[Frame] = []
        while (frame := self._next()) is not None:
            frames.append(frame)
        if len(self._buffer) > self._max:
            raise StompFrameError(f"a frame larger than {self._max} bytes")
        return frames

    def _next(self) -> Frame | None:
        buffer = self._buffer
        start = 0
        while start < len(buffer) and buffer[start] in b"\r\n":  # heart-beats
            start += 1
        del buffer[:start]
        end = HEADER_END.search(buffer)
        if end is None:
            return None
        try:
            lines = buffer[: end.start()].decode("utf-8").split("\n")
        except UnicodeDecodeError as exc:  # spec: headers are UTF-8
            raise StompFrameError(f"headers that are not UTF-8: {exc}") from None
        command = lines[0].rstrip("\r")
        headers = tuple(self._header(line.rstrip("\r"), command) for line in lines[1:])
        frame = Frame(command, headers)
        length = frame.header("content-length")
        if length is not None:
            if not length.isdigit():
                raise StompFrameError(f"bad content-length {length!r}")
            body_end = end.end() + int(length)
            if len(buffer) <= body_end:
                return None
            if buffer[body_end] != 0:
                raise StompFrameError("the body does not end with NUL where content-length says")
        else:
            body_end = buffer.find(b"\x00", end.end())
            if body_end < 0:
                return None
        body = bytes(buffer[end.end() : body_end])
        del buffer[: body_end + 1]
        return Frame(command, headers, body)

    @staticmethod
    def _header(line: str, command: str) -> tuple[str, str]:
        name, colon, value = line.partition(":")
        if not colon:
            raise StompFrameError(f"a header line without a colon: {line!r}")
        if command in UNESCAPED_COMMANDS:
            return name, value
        return unescape(name), unescape(value)


class StompConnection:
    """One STOMP session: SEND frames out, their RECEIPT or ERROR matched back by id."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader, self._writer = reader, writer
        self._parser = FrameParser()
        self._receipts: dict[str, asyncio.Future[None]] = {}
        self._ids = itertools.count(1)
        self._write_lock = asyncio.Lock()
        self._lost: Exception | None = None
        self._reading: asyncio.Task[None] | None = None

    @classmethod
    async def open(
        cls,
        host: str,
        port: int,
        *,
        login: str | None = None,
        passcode: str | None = None,
        virtual_host: str | None = None,
        tls: ssl.SSLContext | None = None,
        connect_timeout: float = 10.0,
    ) -> StompConnection:
        """Connect and log in; :class:`StompError` when the broker refuses the session."""
        async with asyncio.timeout(connect_timeout):
            reader, writer = await asyncio.open_connection(host, port, ssl=tls)
            connection = cls(reader, writer)
            try:
                await connection._handshake(virtual_host or host, login, passcode)
            except BaseException:
                await connection.aclose()
                raise
        connection._reading = asyncio.create_task(connection._read())
        return connection

    async def _handshake(self, host: str, login: str | None, passcode: str | None) -> None:
        # heart-beat 0,0: a receipt overdue by the send timeout is what detects a dead peer.
        headers = [("accept-version", "1.2"), ("host", host), ("heart-beat", "0,0")]
        if login is not None:
            headers += [("login", login), ("passcode", passcode or "")]
        self._writer.write(encode(Frame("CONNECT", tuple(headers))))
        while True:
            data = await self._reader.read(65536)
            if not data:
                raise ConnectionError("the broker closed the connection during CONNECT")
            try:
                frames = self._parser.feed(data)
            except StompFrameError as exc:
                raise ConnectionError(f"the broker does not speak STOMP: {exc}") from exc
            for frame in frames:
                if frame.command == "CONNECTED":
                    return
                if frame.command == "ERROR":
                    raise StompError(frame)

    @property
    def is_open(self) -> bool:
        return self._lost is None and not self._writer.is_closing()

    async def send(
        self,
        destination: str,
        body: bytes,
        headers: list[tuple[str, str]],
        receipt_timeout: float,
    ) -> None:
        """SEND ``body``; return once the broker acknowledged it with a RECEIPT."""
        if self._lost is not None:
            raise ConnectionError(f"the session is gone: {self._lost}")
        receipt = str(next(self._ids))
        waiter = asyncio.get_running_loop().create_future()
        self._receipts[receipt] = waiter
        frame = Frame(
            "SEND",
            (
                ("destination", destination),
                ("receipt", receipt),
                ("content-length", str(len(body))),
                *headers,
            ),
            body,
        )
        try:
            async with asyncio.timeout(receipt_timeout):
                async with self._write_lock:
                    self._writer.write(encode(frame))
                    await self._writer.drain()
                await waiter
        finally:
            self._receipts.pop(receipt, None)

    async def _read(self) -> None:
        lost: Exception = ConnectionError("the broker closed the connection")
        try:
            while data := await self._reader.read(65536):
                for frame in self._parser.feed(data):
                    self._dispatch(frame)
        except OSError as exc:
            lost = exc
        except StompFrameError as exc:
            lost = ConnectionError(f"the broker sent something that is not STOMP: {exc}")
        except StompError as exc:  # so that a StompError always means "this SEND was refused"
            lost = ConnectionError(f"the broker ended the session: {exc}")
        self._fail(lost)

    def _dispatch(self, frame: Frame) -> None:
        if frame.command == "RECEIPT":
            waiter = self._receipts.get(frame.header("receipt-id") or "")
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        elif frame.command == "ERROR":
            waiter = self._receipts.get(frame.header("receipt-id") or "")
            if waiter is None:  # about the session, not one SEND: the broker is closing it
                raise StompError(frame)
            if not waiter.done():
                waiter.set_exception(StompError(frame))
        # MESSAGE frames and anything else are not for a producer: ignored.

    def _fail(self, reason: Exception) -> None:
        if self._lost is None:
            self._lost = reason
        for waiter in self._receipts.values():
            if not waiter.done():
                waiter.set_exception(reason)
        self._writer.close()

    async def aclose(self) -> None:
        if self.is_open:  # a polite goodbye; every SEND before it had its own receipt
            self._writer.write(encode(Frame("DISCONNECT")))
        self._fail(ConnectionError("the connection was closed"))
        if self._reading is not None:
            self._reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reading
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()


class StompClient:
    """A STOMP session that is opened on first use and reopened on the first SEND after it was
    lost, so a broker restart needs no restart here. :meth:`send` raises :class:`StompError`
    when the broker refused that SEND, and ``OSError`` / ``TimeoutError`` when it is unreachable
    (the session is then dropped: the next SEND opens a new one)."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        login: str | None = None,
        passcode: str | None = None,
        virtual_host: str | None = None,
        tls: ssl.SSLContext | None = None,
        connect_timeout: float = 10.0,
    ) -> None:
        self._host, self._port = host, port
        self._login, self._passcode, self._virtual_host = login, passcode, virtual_host
        self._tls, self._connect_timeout = tls, connect_timeout
        self._connection: StompConnection | None = None
        self._lock = asyncio.Lock()

    async def send(
        self,
        destination: str,
        body: bytes,
        headers: list[tuple[str, str]],
        receipt_timeout: float,
    ) -> None:
        connection = await self._open()
        try:
            await connection.send(destination, body, headers, receipt_timeout)
        except (OSError, TimeoutError):
            # A receipt overdue: the broker may be gone without a word; start afresh.
            await connection.aclose()
            raise

    async def connect(self) -> None:
        """Open the session now (it is otherwise opened by the first SEND)."""
        await self._open()

    async def _open(self) -> StompConnection:
        async with self._lock:
            connection = self._connection
            if connection is None or not connection.is_open:
                if connection is not None:
                    await connection.aclose()
                    self._connection = None
                try:
                    connection = await StompConnection.open(
                        self._host,
                        self._port,
                        login=self._login,
                        passcode=self._passcode,
                        virtual_host=self._virtual_host,
                        tls=self._tls,
                        connect_timeout=self._connect_timeout,
                    )
                except StompError as exc:  # a refused login: a later attempt may succeed
                    raise ConnectionError(f"the broker refused the session: {exc}") from exc
                self._connection = connection
            return connection

    async def aclose(self) -> None:
        if self._connection is not None:
            await self._connection.aclose()
            self._connection = None
