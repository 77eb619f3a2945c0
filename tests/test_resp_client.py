"""The hot-path Redis client (cloud/buffers/resp.py) leaves no connection open: not one whose
handshake failed or timed out, not one still being made when the client is closed. (Found by
the suite's garbage collection after each test: an unclosed socket to a TLS cluster node.)"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from webhook_connect.cloud.buffers import resp
from webhook_connect.cloud.buffers.resp import RespClient
from webhook_connect.shared.exceptions import StorageUnavailable


@dataclass
class SilentServer:
    """Takes connections, reads what comes, never answers; notes when a client hangs up."""

    port: int = 0
    received: bytearray = field(default_factory=bytearray)
    spoke: asyncio.Event = field(default_factory=asyncio.Event)
    hung_up: asyncio.Event = field(default_factory=asyncio.Event)
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        while chunk := await reader.read(4096):
            self.received += chunk
            self.spoke.set()
        self.hung_up.set()


@pytest.fixture(autouse=True)
def no_watchdog(monkeypatch: pytest.MonkeyPatch) -> None:
    """The watchdog that drops a connection silent for REPLY_TIMEOUT would close these
    connections too, later: put it out of the way, so what closes them here is the client."""
    monkeypatch.setattr(resp, "REPLY_TIMEOUT", 300.0)


@pytest.fixture
async def silent() -> AsyncIterator[SilentServer]:
    state = SilentServer()
    server = await asyncio.start_server(state.handle, "127.0.0.1", 0)
    state.port = server.sockets[0].getsockname()[1]
    try:
        yield state
    finally:
        for writer in state.writers:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_a_handshake_that_times_out_closes_its_connection(
    silent: SilentServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(resp, "CONNECT_TIMEOUT", 0.3)
    client = RespClient(f"redis://:secret@127.0.0.1:{silent.port}/0")
    try:
        with pytest.raises(StorageUnavailable, match="TimeoutError"):
            await client.execute("PING")
        assert b"AUTH" in silent.received, "connected; the AUTH was never answered"
        await asyncio.wait_for(silent.hung_up.wait(), 30)
    finally:
        await client.aclose()


async def test_a_connection_being_made_is_closed_by_aclose(silent: SilentServer) -> None:
    client = RespClient(f"redis://:secret@127.0.0.1:{silent.port}/0")
    waiting = asyncio.ensure_future(client.execute("PING"))
    await asyncio.wait_for(silent.spoke.wait(), 5)
    assert b"AUTH" in silent.received, "connected; the handshake is under way"
    await client.aclose()
    with pytest.raises(StorageUnavailable, match="closed"):
        await waiting
    await asyncio.wait_for(silent.hung_up.wait(), 30)
