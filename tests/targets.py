"""A real local HTTP(S) target for the connector's target tests: uvicorn serving a small ASGI
app that records every request it answers with 200 and answers redirects on demand.

- ``/redirect/{status}?to=URL`` answers ``status`` with ``Location: URL`` (nothing recorded);
- ``/chain/{n}`` answers 307 to ``/chain/{n-1}``, and ``/chain/0`` is an ordinary request;
- anything else is recorded (method, path, query, headers, body) and answered 200.

Run with TLS (a certificate of a test CA) and optionally requiring a client certificate of a
given CA, like the HTTPS apps a connector may deliver to.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from tests.servers import REPO, free_port, stop, wait_until

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
RECORDS = "WEBHOOK_CONNECT_TEST_TARGET_RECORDS"


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """The ASGI app uvicorn serves (``tests.targets:app``)."""
    if scope["type"] != "http":
        return
    body = b""
    while True:
        event = await receive()
        body += event.get("body", b"")
        if not event.get("more_body"):
            break
    path: str = scope["path"]
    query = scope["query_string"].decode("latin-1")
    parts = path.strip("/").split("/")
    location: str | None = None
    status = 200
    if len(parts) == 2 and parts[0] == "redirect" and parts[1].isdigit():
        status = int(parts[1])
        location = parse_qs(query).get("to", [""])[0]
    elif len(parts) == 2 and parts[0] == "chain" and parts[1].isdigit() and int(parts[1]) > 0:
        status, location = 307, f"/chain/{int(parts[1]) - 1}"
    if location is None:
        record = {
            "method": scope["method"],
            "scheme": scope["scheme"],
            "path": path,
            "query": query,
            "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in scope["headers"]],
            "body_b64": base64.b64encode(body).decode(),
        }
        _append(Path(os.environ[RECORDS]), json.dumps(record))
    headers = [(b"content-type", b"text/plain")]
    if location is not None:
        headers.append((b"location", location.encode("latin-1")))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"ok"})


def _append(path: Path, line: str) -> None:
    # Written before the answer, so whoever has seen the answer can read the record.
    with path.open("a") as file:
        file.write(line + "\n")


class TargetServer:
    """``tests.targets:app`` under uvicorn on a free loopback port, HTTP or HTTPS."""

    def __init__(
        self,
        workdir: Path,
        *,
        cert: tuple[Path, Path] | None = None,
        client_ca: Path | None = None,
    ) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.cert = cert
        self.client_ca = client_ca
        self.records_path = workdir / f"target-{self.port}.jsonl"
        self.log = workdir / f"target-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        scheme = "https" if self.cert else "http"
        return f"{scheme}://localhost:{self.port}"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        args = [sys.executable, "-m", "uvicorn", "tests.targets:app", "--host", "127.0.0.1"]
        args += ["--port", str(self.port), "--log-level", "warning"]
        if self.cert is not None:
            args += ["--ssl-certfile", str(self.cert[0]), "--ssl-keyfile", str(self.cert[1])]
        if self.client_ca is not None:
            args += ["--ssl-ca-certs", str(self.client_ca), "--ssl-cert-reqs", "2"]
        env = {**os.environ, "PYTHONPATH": str(REPO), RECORDS: str(self.records_path)}
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        wait_until(self._listening, timeout=20, what=f"target on port {self.port}")

    def _listening(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"target exited: {self.log.read_text()}")
        import socket

        with socket.create_connection(("127.0.0.1", self.port), timeout=1):
            return True

    def records(self) -> list[dict[str, Any]]:
        """Every request recorded so far."""
        if not self.records_path.exists():
            return []
        return [json.loads(line) for line in self.records_path.read_text().splitlines()]

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)
            self.process = None
