"""A redis-server speaking only TLS, with certificates made here, and ACL users if asked.

:func:`make_tls_files` writes a private CA, a server certificate for 127.0.0.1 and localhost,
a client certificate, and a second CA that signed neither (the "wrong CA").
:class:`TLSRedisServer` starts redis-server with ``--port 0 --tls-port P`` on loopback and
stops it by PID.
"""

from __future__ import annotations

import datetime
import ipaddress
import shutil
import signal
import socket
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.servers import free_port, stop, wait_until

PEM = serialization.Encoding.PEM


@dataclass(frozen=True)
class TLSFiles:
    """Everything a TLS Redis and its clients need, as files."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    wrong_ca: Path  # a CA that signed nothing here

    def client_context(self, *, with_client_cert: bool = True) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca))
        if with_client_cert:
            context.load_cert_chain(str(self.client_cert), str(self.client_key))
        return context


def _key_bytes(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _ca(common_name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    now = datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _leaf(
    ca: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    common_name: str,
    usage: x509.ObjectIdentifier,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    now = datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def make_tls_files(directory: Path) -> TLSFiles:
    """Write a test CA, server and client certificates it signed, and an unrelated CA."""
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = _ca("webhook-connect redis test CA")
    server, server_key = _leaf(ca, ca_key, "localhost", ExtendedKeyUsageOID.SERVER_AUTH)
    client, client_key = _leaf(ca, ca_key, "webhook-connect", ExtendedKeyUsageOID.CLIENT_AUTH)
    wrong, _ = _ca("some other CA")
    files = TLSFiles(
        ca=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
        client_cert=directory / "client.pem",
        client_key=directory / "client.key",
        wrong_ca=directory / "wrong-ca.pem",
    )
    files.ca.write_bytes(ca.public_bytes(PEM))
    files.server_cert.write_bytes(server.public_bytes(PEM))
    files.client_cert.write_bytes(client.public_bytes(PEM))
    files.wrong_ca.write_bytes(wrong.public_bytes(PEM))
    for path, key in ((files.server_key, server_key), (files.client_key, client_key)):
        path.write_bytes(_key_bytes(key))
        path.chmod(0o600)
    return files


class TLSRedisServer:
    """redis-server on a TLS port only (``--port 0``), on loopback.

    ``auth_clients`` is redis's ``tls-auth-clients``: ``yes`` demands a client certificate.
    ``users`` maps ACL user names to passwords; with any, the default user is off, so every
    client must authenticate as one of them.
    """

    def __init__(
        self,
        directory: Path,
        files: TLSFiles,
        *,
        auth_clients: str = "optional",
        users: dict[str, str] | None = None,
    ) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed: run scripts/test (it installs it)")
        self.binary = binary
        self.directory = directory
        self.files = files
        self.auth_clients = auth_clients
        self.users = users or {}
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def url(self, *, user: str = "", password: str = "", **options: str | Path) -> str:
        """A ``rediss://`` URL of this server with ``options`` as its query."""
        auth = f"{quote(user, safe='')}:{quote(password, safe='')}@" if password else ""
        query = "&".join(f"{name}={quote(str(value), safe='/')}" for name, value in options.items())
        return f"rediss://{auth}127.0.0.1:{self.port}/0" + (f"?{query}" if query else "")

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [
            self.binary,
            "--port",
            "0",
            "--tls-port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--tls-cert-file",
            str(self.files.server_cert),
            "--tls-key-file",
            str(self.files.server_key),
            "--tls-ca-cert-file",
            str(self.files.ca),
            "--tls-auth-clients",
            self.auth_clients,
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.directory),
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
        ]
        if self.users:
            args += ["--user", "default", "off"]
            for name, password in self.users.items():
                args += ["--user", name, "on", f">{password}", "~*", "&*", "+@all"]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL)
        wait_until(self._answers, what=f"TLS redis-server on port {self.port}")

    def _answers(self) -> bool:
        """A TLS handshake with the client certificate and an answer to PING (PONG, or the
        refusal of a server whose default user is off)."""
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"redis-server exited with {self.process.returncode}")
        context = self.files.client_context()
        with socket.create_connection(("127.0.0.1", self.port), timeout=1) as raw:
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith((b"+PONG", b"-NOAUTH"))

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None:
            stop(self.process, sig)
            self.process = None
