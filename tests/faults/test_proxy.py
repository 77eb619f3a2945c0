"""The fault proxy itself, against a real echo server on loopback: each mode does what it says."""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from collections.abc import Iterator

import pytest

from tests.faults.proxy import FaultProxy
from tests.servers import wait_until


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


@pytest.fixture
def proxy() -> Iterator[FaultProxy]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with FaultProxy(server.server_address[1]) as proxy:
            yield proxy
    finally:
        server.shutdown()
        server.server_close()


def dial(proxy: FaultProxy) -> socket.socket:
    return socket.create_connection(("127.0.0.1", proxy.port), timeout=5)


def echo(sock: socket.socket, data: bytes) -> bytes:
    sock.sendall(data)
    received = b""
    while len(received) < len(data):
        chunk = sock.recv(65536)
        if not chunk:
            break
        received += chunk
    return received


def test_pass_forwards_both_ways(proxy: FaultProxy) -> None:
    with dial(proxy) as sock:
        assert echo(sock, b"hello" * 1000) == b"hello" * 1000


def test_cut_closes_with_a_fin_and_new_connections_pass(proxy: FaultProxy) -> None:
    with dial(proxy) as sock:
        assert echo(sock, b"x") == b"x"
        assert proxy.cut() == 1
        assert sock.recv(10) == b""  # an orderly end, not a reset
    with dial(proxy) as sock:
        assert echo(sock, b"again") == b"again"


def test_blackhole_keeps_the_socket_open_and_silent(proxy: FaultProxy) -> None:
    with dial(proxy) as old:
        assert echo(old, b"x") == b"x"
        proxy.blackhole()
        old.settimeout(0.5)
        old.sendall(b"lost")
        with pytest.raises(TimeoutError):
            old.recv(10)  # neither data nor FIN nor RST
        proxy.pass_through()
        with pytest.raises(TimeoutError):
            old.recv(10)  # a connection caught by the blackhole stays dead
        with dial(proxy) as new:
            assert echo(new, b"new") == b"new"


def test_latency_delays_each_direction(proxy: FaultProxy) -> None:
    proxy.latency(200)
    with dial(proxy) as sock:
        started = time.monotonic()
        assert echo(sock, b"ping") == b"ping"
        assert time.monotonic() - started >= 0.4  # 200 ms there, 200 ms back


def test_reset_forwards_half_a_chunk_then_resets(proxy: FaultProxy) -> None:
    with dial(proxy) as sock:
        assert echo(sock, b"x") == b"x"
        assert proxy.reset_mid_frame() == 1
        sock.sendall(b"0123456789")
        received = b""
        with pytest.raises(ConnectionResetError):
            while chunk := sock.recv(100):
                received += chunk
        assert received in (b"", b"01234")  # at most the half that was forwarded
    with dial(proxy) as sock:
        assert echo(sock, b"after") == b"after"


def test_trickle_paces_the_bytes(proxy: FaultProxy) -> None:
    proxy.trickle(10, 0.05)
    with dial(proxy) as sock:
        started = time.monotonic()
        assert echo(sock, b"a" * 100) == b"a" * 100
        assert time.monotonic() - started >= 0.4  # 10 slices of 50 ms, at least one way


def test_stop_closes_a_connection_whose_upstream_has_not_answered() -> None:
    """A client the proxy took while its upstream connect was still pending (a connector
    reconnecting as a test ends): stop() closes it. It used to be left to the garbage
    collector, whose ResourceWarning then failed whichever test was running at the time."""
    with socket.socket() as upstream:
        upstream.bind(("127.0.0.1", 0))
        upstream.listen(0)
        # Fill the upstream's accept queue: from here on its SYNs go unanswered.
        fillers = [socket.socket() for _ in range(4)]
        for filler in fillers:
            filler.setblocking(False)
            filler.connect_ex(upstream.getsockname())
        proxy = FaultProxy(upstream.getsockname()[1])
        proxy.start()
        try:
            with dial(proxy) as sock:
                wait_until(lambda: proxy.connections_accepted == 1)
                time.sleep(0.2)  # the proxy is now waiting on the upstream
                assert proxy.open_connections == 0
                proxy.stop()
                try:
                    assert sock.recv(10) == b""
                except ConnectionResetError:
                    pass  # closed with an RST: closed all the same
        finally:
            proxy.stop()
            for filler in fillers:
                filler.close()
