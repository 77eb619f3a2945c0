"""A TCP fault proxy: forwards loopback connections to one upstream and breaks them on demand.

It runs its own asyncio loop in a thread, so a test thread busy with a load driver or a
``wait_until`` never slows the forwarding, and the test drives it with plain method calls.

Lasting modes (they apply to the connections open now and to new ones):

- ``pass_through()``: forward everything as it comes;
- ``blackhole()``: forward nothing, keep both sockets open, never send a FIN or RST: what a
  dead NAT entry or a partitioned network looks like to both ends. Connections caught by a
  blackhole stay dead after ``pass_through()`` (their state is gone, as a NAT's would be);
  only new connections forward again;
- ``latency(ms)``: hold every chunk ``ms`` milliseconds in each direction;
- ``trickle(nbytes, interval)``: forward at most ``nbytes`` every ``interval`` seconds in each
  direction.

One-shot faults (on the connections open now; new ones pass):

- ``cut()``: close both sides of every connection at once (FIN);
- ``reset_mid_frame()``: forward the first half of the next chunk in either direction, then
  reset both sockets (RST through ``SO_LINGER`` 0), so the peer sees a frame cut in two.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")
CHUNK = 65536


@dataclass
class _Mode:
    name: str = "pass"
    latency: float = 0.0
    trickle_bytes: int = 0
    trickle_interval: float = 0.0


@dataclass(eq=False)
class _Link:
    """One proxied connection: the client's socket and the upstream's."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    dead: bool = False  # caught by a blackhole: never forwards again
    reset_armed: bool = False
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def writers(self) -> tuple[asyncio.StreamWriter, asyncio.StreamWriter]:
        return self.client, self.upstream


def _reset(writer: asyncio.StreamWriter) -> None:
    """Abort with an RST, not a FIN: ``SO_LINGER`` on with a zero timeout, then close."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class FaultProxy:
    """A fault proxy from ``127.0.0.1:port`` to ``upstream_host:upstream_port``."""

    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = 0
        self.connections_accepted = 0
        self._mode = _Mode()
        self._links: set[_Link] = set()
        self._accepting: set[asyncio.Task[Any]] = set()  # accepted, upstream not yet answered
        self._closing = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None

    # Life cycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()
        self._server = self._call(self._listen())
        self.port = int(self._server.sockets[0].getsockname()[1])

    def stop(self) -> None:
        """Close the listener and every connection, then the loop. Safe to call twice."""
        if not self._thread.is_alive():
            return
        self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> FaultProxy:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def url_host(self) -> str:
        return f"127.0.0.1:{self.port}"

    # Control (from any thread) ------------------------------------------------------------

    def pass_through(self) -> None:
        self._set(_Mode())

    def blackhole(self) -> None:
        def apply() -> None:
            self._mode = _Mode("blackhole")
            for link in self._links:
                link.dead = True

        self._run_in_loop(apply)

    def latency(self, milliseconds: float) -> None:
        self._set(_Mode("latency", latency=milliseconds / 1000))

    def trickle(self, nbytes: int, interval: float) -> None:
        self._set(_Mode("trickle", trickle_bytes=nbytes, trickle_interval=interval))

    def cut(self) -> int:
        """Close every open connection (FIN both ways); return how many there were."""

        def apply() -> int:
            links = list(self._links)
            for link in links:
                self._drop(link)
                for writer in link.writers():
                    writer.close()
            return len(links)

        return self._run_in_loop(apply)

    def reset_mid_frame(self) -> int:
        """Arm every open connection to reset after half of its next chunk; return how many."""

        def apply() -> int:
            for link in self._links:
                link.reset_armed = True
            return len(self._links)

        return self._run_in_loop(apply)

    @property
    def open_connections(self) -> int:
        return self._run_in_loop(lambda: len(self._links))

    # Forwarding ---------------------------------------------------------------------------

    async def _listen(self) -> asyncio.Server:
        return await asyncio.start_server(self._accept, "127.0.0.1", 0)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections_accepted += 1
        task = asyncio.current_task()
        assert task is not None
        if self._closing:
            writer.transport.abort()
            return
        self._accepting.add(task)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.close()
            return
        except asyncio.CancelledError:  # stop() while the upstream had not answered yet
            writer.transport.abort()
            raise
        finally:
            self._accepting.discard(task)
        link = _Link(writer, up_writer, dead=self._mode.name == "blackhole")
        self._links.add(link)
        link.tasks = [
            asyncio.create_task(self._pump(link, reader, up_writer)),
            asyncio.create_task(self._pump(link, up_reader, writer)),
        ]

    async def _pump(
        self, link: _Link, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """One direction: read chunks, queue them with their arrival time, and a second task
        writes them out as the mode allows (so latency delays chunks, not the reading)."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        sender = asyncio.create_task(self._send(link, queue, writer))
        try:
            while True:
                try:
                    data = await reader.read(CHUNK)
                except OSError:
                    data = b""
                if not data:
                    break
                if not link.dead:
                    queue.put_nowait((self._loop.time(), data))
            await queue.join()
            if not link.dead and link in self._links:
                with contextlib.suppress(OSError):
                    writer.write_eof()  # the peer's FIN, passed on
        finally:
            sender.cancel()
            # A blackhole says nothing, not even a FIN: its sockets stay open until stop().
            ended = all(task.done() or task is asyncio.current_task() for task in link.tasks)
            if ended and not link.dead:
                self._drop(link)
                for end in link.writers():
                    end.close()

    async def _send(
        self, link: _Link, queue: asyncio.Queue[tuple[float, bytes]], writer: asyncio.StreamWriter
    ) -> None:
        while True:
            arrived, data = await queue.get()
            try:
                await self._forward(link, arrived, data, writer)
            except (OSError, ConnectionError):
                pass
            finally:
                queue.task_done()

    async def _forward(
        self, link: _Link, arrived: float, data: bytes, writer: asyncio.StreamWriter
    ) -> None:
        mode = self._mode
        if link.dead:
            return
        if link.reset_armed:
            writer.write(data[: max(1, len(data) // 2)])
            with contextlib.suppress(OSError, ConnectionError):
                await writer.drain()
            self._drop(link)
            for end in link.writers():
                _reset(end)
            return
        if mode.name == "latency":
            delay = arrived + mode.latency - self._loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
        if mode.name == "trickle":
            for start in range(0, len(data), mode.trickle_bytes):
                if link.dead or self._mode.name != "trickle":
                    writer.write(data[start:])
                    break
                writer.write(data[start : start + mode.trickle_bytes])
                await writer.drain()
                await asyncio.sleep(mode.trickle_interval)
        elif not link.dead:
            writer.write(data)
        await writer.drain()

    def _drop(self, link: _Link) -> None:
        self._links.discard(link)

    async def _shutdown(self) -> None:
        """Close every socket this proxy holds before its loop stops: one left to the garbage
        collector surfaces later as a ResourceWarning in whichever test is running then."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        await asyncio.sleep(0)  # a connection accepted just now gets to see _closing
        tasks = list(self._accepting)
        for link in list(self._links):
            self._drop(link)
            tasks += link.tasks
            for writer in link.writers():
                writer.transport.abort()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.sleep(0)  # the aborted transports close their sockets
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    # Plumbing -----------------------------------------------------------------------------

    def _set(self, mode: _Mode) -> None:
        def apply() -> None:
            self._mode = mode

        self._run_in_loop(apply)

    def _run_in_loop(self, fn: Callable[[], T]) -> T:
        async def call() -> T:
            return fn()

        return self._call(call())

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(10)
