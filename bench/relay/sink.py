"""The relay benchmark's target: answers 200 and records how long each message took.

Each webhook body starts with ``{"sent": <epoch seconds>`` written by the load generator when
it sent the POST; latency is the time of receipt minus that. ``GET /__stats`` answers the
figures so far as JSON and resets them; ``GET /__count`` answers the counts alone, resetting
nothing (``bench/soak`` follows a long run with it).
"""

from __future__ import annotations

import asyncio
import re
import sys
import time

import httptools
import orjson

SENT = re.compile(rb'"sent":\s*([0-9.]+)')
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class Stats:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.ids: set[bytes] = set()
        self.duplicates = 0
        self.first = 0.0
        self.last = 0.0

    def record(self, body: bytes, message_id: bytes | None, now: float) -> None:
        match = SENT.search(body, 0, 64)
        if match:
            self.latencies.append(now - float(match.group(1)))
        if message_id is not None:
            if message_id in self.ids:
                self.duplicates += 1
            self.ids.add(message_id)
        if not self.first:
            self.first = now
        self.last = now

    def report(self) -> bytes:
        ordered = sorted(self.latencies)

        def pct(fraction: float) -> float:
            return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else 0

        figures = {
            "count": len(ordered),
            "unique": len(self.ids),
            "duplicates": self.duplicates,
            "first": self.first,
            "last": self.last,
            "p50_ms": pct(0.50) * 1000,
            "p99_ms": pct(0.99) * 1000,
            "max_ms": (ordered[-1] if ordered else 0) * 1000,
        }
        self.__init__()  # type: ignore[misc]
        return orjson.dumps(figures)


class Handler(asyncio.Protocol):
    def __init__(self, stats: Stats) -> None:
        self.stats = stats
        self.parser = httptools.HttpRequestParser(self)
        self.body: list[bytes] = []
        self.url = b""
        self.message_id: bytes | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"x-webhook-connect-message-id":
            self.message_id = value

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        if self.url.startswith(b"/__count"):  # how far a run is, without resetting anything
            count = self.stats
            report = orjson.dumps(
                {
                    "count": len(count.latencies),
                    "unique": len(count.ids),
                    "duplicates": count.duplicates,
                }
            )
            head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(report)
            self.transport.write(head + report)
        elif self.url.startswith(b"/__stats"):
            report = self.stats.report()
            head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(report)
            self.transport.write(head + report)
        else:
            self.stats.record(b"".join(self.body), self.message_id, time.time())
            self.transport.write(OK)
        self.body = []
        self.message_id = None


async def main(port: int) -> None:
    stats = Stats()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Handler(stats), "127.0.0.1", port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.run(main(int(sys.argv[1])))
    except ImportError:
        asyncio.run(main(int(sys.argv[1])))
