"""Peers for the cloud-service module tests: moto's standalone AWS server, and messages.

The Pub/Sub stand-in (``pubsub_standin.py``) runs as a process too, with a key pair whose
private half goes into a service-account key file, as Google would issue it.

moto keeps everything in memory, so a restart on the same port is an empty AWS: tests recreate
their bucket or queue after one, as an operator would after an outage that lost them.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.servers import REPO, free_port, stop, wait_until
from webhook_connect.shared.envelope import Envelope
from webhook_connect.shared.modules.base import Message

# 2026-08-28T14:05:33.123456Z, so date-based keys are predictable.
RECEIVED_AT = 1787925933.123456
# Not UTF-8 (0xff, 0xfe) and holds a NUL: only a byte-exact path carries it unchanged.
BINARY_BODY = b"\xff\xfe\x00binary\x80\r\n"
JSON_BODY = b'{"event": "payment.succeeded", "amount": 1250, "note": "caf\xc3\xa9"}'
SERVICE_ACCOUNT = "relay@proj.iam.gserviceaccount.com"


def make_message(
    message_id: str = "m-1",
    body: bytes = JSON_BODY,
    webhook_id: str = "stripe",
    headers: tuple[tuple[str, str], ...] = (
        ("Content-Type", "application/json"),
        ("Stripe-Signature", "t=1,v1=abc"),
        ("X-Seen", "one"),
        ("X-Seen", "two"),
    ),
) -> Message:
    envelope = Envelope(
        channel="payments",
        webhook_id=webhook_id,
        received_at=RECEIVED_AT,
        method="POST",
        path=f"/webhook/{webhook_id}",
        query_string="a=1",
        headers=headers,
        body=body,
    )
    return Message.of(message_id, 1, envelope)


class MotoServer:
    """``python -m moto.server`` on a loopback port, restartable on the same port."""

    def __init__(self, log: Path) -> None:
        self.port = free_port()
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def connection(self) -> dict[str, str]:
        """The ``connections.json`` keys that point a module at this server."""
        return {
            "endpoint_url": self.url,
            "region": "us-east-1",
            "aws_access_key_id": "testing",
            "aws_secret_access_key": "testing",
            "addressing_style": "path",
        }

    def start(self) -> None:
        args = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        wait_until(self._answers, timeout=30, what=f"moto on port {self.port}")

    def _answers(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"moto exited: {self.log.read_text()}")
        return httpx.get(f"{self.url}/moto-api/", timeout=1).status_code == 200

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)
            self.process = None
        wait_until(self._port_free, what=f"port {self.port} to close")

    def _port_free(self) -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", self.port)) != 0


class PubSubStandIn:
    """``pubsub_standin.py`` as a process, with an RSA key pair for a service account."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        key, self.private_pem = new_private_key()
        self.public_key = workdir / "public.pem"
        self.public_key.write_bytes(
            key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def key_file(self, private_pem: str | None = None) -> Path:
        path = self.workdir / f"key-{free_port()}.json"
        account = {
            "type": "service_account",
            "project_id": "proj",
            "private_key_id": "kid-1",
            "private_key": private_pem or self.private_pem,
            "client_email": SERVICE_ACCOUNT,
            "token_uri": f"{self.url}/token",
            "client_id": "1",
        }
        path.write_text(json.dumps(account))
        return path

    def start(self) -> None:
        args = [
            sys.executable,
            "-m",
            "tests.modules.pubsub_standin",
            "--port",
            str(self.port),
            "--public-key",
            str(self.public_key),
            "--client-email",
            SERVICE_ACCOUNT,
            "--key-id",
            "kid-1",
        ]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        with (self.workdir / "standin.log").open("ab") as log:
            self.process = subprocess.Popen(args, cwd=REPO, env=env, stdout=log, stderr=log)
        wait_until(lambda: self.stats() is not None, what=f"Pub/Sub stand-in on {self.port}")

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)
            self.process = None

    def stats(self) -> dict[str, int]:
        answer: dict[str, int] = httpx.get(f"{self.url}/_stats", timeout=2).json()
        return answer

    def control(self, **settings: Any) -> None:
        httpx.post(f"{self.url}/_control", json=settings, timeout=2).raise_for_status()

    def create(self, topic: str, **settings: Any) -> None:
        """A topic and its subscription ``{topic}-sub``, as a user would with the real API."""
        base = f"{self.url}/v1/projects/proj"
        httpx.put(f"{base}/topics/{topic}", json=settings, timeout=2).raise_for_status()
        subscription = {"topic": f"projects/proj/topics/{topic}"}
        httpx.put(f"{base}/subscriptions/{topic}-sub", json=subscription).raise_for_status()

    def pull(self, topic: str) -> list[dict[str, Any]]:
        url = f"{self.url}/v1/projects/proj/subscriptions/{topic}-sub:pull"
        answer = httpx.post(url, json={"maxMessages": 10_000}, timeout=5).json()
        return [received["message"] for received in answer.get("receivedMessages", [])]


def new_private_key() -> tuple[rsa.RSAPrivateKey, str]:
    """An RSA key and its PKCS#8 PEM, the form of a service-account key file's private_key."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key, pem.decode()
