"""Real reverse proxies for the tests: nginx, Caddy and HAProxy from the Debian packages.

Each one is started from the committed configuration under ``deploy/`` with its ``__NAME__``
placeholders replaced (the files say which), on a free loopback port, terminating TLS with a
certificate of a test CA (tests/certs.py), and stopped by its PID.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path

import httpx

from tests.certs import Certificates, ClientCertificate
from tests.certs import make_certificates as make_certificates
from tests.certs import make_client_certificate as make_client_certificate
from tests.servers import REPO, free_port, stop, wait_until

DEPLOY = REPO / "deploy"
PLACEHOLDER = re.compile(r"__[A-Z][A-Z0-9_]*__")


def render(template: Path, values: Mapping[str, str]) -> str:
    """``template`` with each ``__NAME__`` replaced by ``values[NAME]``; every placeholder of
    the file must have a value, so a new one cannot slip through the tests unrendered."""
    text = template.read_text()

    def value(match: re.Match[str]) -> str:
        name = match.group(0)[2:-2]
        if name not in values:
            raise KeyError(f"{template}: no test value for placeholder {match.group(0)}")
        return values[name]

    return PLACEHOLDER.sub(value, text)


def require(binary: str) -> str:
    if not Path(binary).exists():
        raise RuntimeError(f"{binary} is not installed: run scripts/test (it installs it)")
    return binary


class Proxy:
    """A reverse proxy process serving ``https://127.0.0.1:port`` in front of ``upstream``."""

    name = "proxy"

    def __init__(self, workdir: Path, certs: Certificates, upstream: str) -> None:
        self.workdir = workdir
        self.certs = certs
        self.upstream = upstream  # host:port of the cloud
        self.port = free_port()
        self.log = workdir / f"{self.name}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.last_error: Exception | None = None  # why it was not serving yet

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def command(self) -> tuple[list[str], dict[str, str]]:
        """The command line and environment; writes the rendered configuration."""
        raise NotImplementedError

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        args, env = self.command()
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                args, cwd=self.workdir, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        try:
            wait_until(self._serving, timeout=20, what=f"{self.name} on port {self.port}")
        except TimeoutError as exc:
            raise RuntimeError(f"{exc}: {self.last_error!r}; log: {self.output()}") from None

    def _serving(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            self.last_error = RuntimeError(f"{self.name} exited")
            return False
        try:
            response = httpx.get(
                f"{self.url}/health", verify=self.certs.client_context(), timeout=2
            )
        except Exception as exc:  # not serving yet, or never will: kept for the report
            self.last_error = exc
            return False
        self.last_error = RuntimeError(f"/health answered {response.status_code}")
        return response.status_code == 200

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)
            self.process = None


class Nginx(Proxy):
    """``deploy/nginx/webhook-connect.conf`` inside a minimal main configuration of the test's
    own (pid and logs in ``workdir``), and ``webhook-connect-location.conf`` in a second server
    on ``prefix_port``, serving the cloud under ``/hooks/``."""

    name = "nginx"
    binary = "/usr/sbin/nginx"
    temp: Path | None = None
    prefix = "hooks"

    def __init__(self, workdir: Path, certs: Certificates, upstream: str) -> None:
        super().__init__(workdir, certs, upstream)
        self.prefix_port = free_port()

    @property
    def prefixed_url(self) -> str:
        """The cloud under a path (``webhook-connect-location.conf``)."""
        return f"https://127.0.0.1:{self.prefix_port}/{self.prefix}"

    def command(self) -> tuple[list[str], dict[str, str]]:
        site = self.workdir / "webhook-connect.conf"
        site.write_text(
            render(
                DEPLOY / "nginx" / "webhook-connect.conf",
                {
                    "LISTEN": f"127.0.0.1:{self.port}",
                    "SERVER_NAME": "localhost",
                    "TLS_CERT": str(self.certs.cert_file),
                    "TLS_KEY": str(self.certs.key_file),
                    "CLOUD": self.upstream,
                },
            )
        )
        # Temporary files are written by the worker, which runs as nobody and cannot enter a
        # pytest directory (mode 0700): they go to a directory of their own, removed at stop.
        self.temp = temp = Path(tempfile.mkdtemp(prefix="webhook-connect-nginx-"))
        temp.chmod(0o755)
        paths = "".join(
            f"    {kind}_temp_path {temp / kind};\n"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        location = self.workdir / "webhook-connect-location.conf"
        location.write_text(
            render(
                DEPLOY / "nginx" / "webhook-connect-location.conf",
                {"PREFIX": self.prefix, "CLOUD": self.upstream},
            )
        )
        # A second site serving the cloud under a path, with the location file included.
        prefixed = (
            "    server {\n"
            f"        listen 127.0.0.1:{self.prefix_port} ssl;\n"
            f"        ssl_certificate {self.certs.cert_file};\n"
            f"        ssl_certificate_key {self.certs.key_file};\n"
            f"        include {location};\n"
            "    }\n"
        )
        main = self.workdir / "nginx.conf"
        main.write_text(
            f"pid {self.workdir / 'nginx.pid'};\n"
            f"error_log {self.workdir / 'error.log'} warn;\n"
            "worker_processes 1;\n"
            "events { worker_connections 512; }\n"
            "http {\n"
            f"    access_log {self.workdir / 'access.log'};\n"
            f"{paths}"
            f"    include {site};\n"
            f"{prefixed}"
            "}\n"
        )
        args = [
            require(self.binary),
            "-p",
            str(self.workdir),
            "-e",
            str(self.workdir / "error.log"),
            "-c",
            str(main),
            "-g",
            "daemon off;",
        ]
        return args, dict(os.environ)

    def stop(self) -> None:
        super().stop()
        if self.temp is not None:
            shutil.rmtree(self.temp, ignore_errors=True)
            self.temp = None

    def output(self) -> str:
        error_log = self.workdir / "error.log"
        logged = error_log.read_text(errors="replace") if error_log.exists() else ""
        return super().output() + logged


class Caddy(Proxy):
    """``deploy/caddy/Caddyfile``, with Caddy's data and config directories in ``workdir``."""

    name = "caddy"
    binary = "/usr/bin/caddy"

    def command(self) -> tuple[list[str], dict[str, str]]:
        caddyfile = self.workdir / "Caddyfile"
        caddyfile.write_text(
            render(
                DEPLOY / "caddy" / "Caddyfile",
                {
                    "SITE": f"https://127.0.0.1:{self.port}",
                    "TLS_CERT": str(self.certs.cert_file),
                    "TLS_KEY": str(self.certs.key_file),
                    "CLOUD": self.upstream,
                },
            )
        )
        home = self.workdir / "home"
        home.mkdir(exist_ok=True)
        env = {
            **os.environ,
            "HOME": str(home),
            "XDG_DATA_HOME": str(home / "data"),
            "XDG_CONFIG_HOME": str(home / "config"),
        }
        args = [require(self.binary), "run", "--config", str(caddyfile), "--adapter", "caddyfile"]
        return args, env


class HAProxy(Proxy):
    """``deploy/haproxy/haproxy.cfg`` in the foreground (``-db``)."""

    name = "haproxy"
    binary = "/usr/sbin/haproxy"

    def command(self) -> tuple[list[str], dict[str, str]]:
        config = self.workdir / "haproxy.cfg"
        config.write_text(
            render(
                DEPLOY / "haproxy" / "haproxy.cfg",
                {
                    "LISTEN": f"127.0.0.1:{self.port}",
                    "TLS_PEM": str(self.certs.pem_file),
                    "CLOUD": self.upstream,
                },
            )
        )
        return [require(self.binary), "-db", "-f", str(config)], dict(os.environ)


# Forward proxies and client certificates (the connector on corporate networks) -------------


class MutualTlsNginx(Proxy):
    """nginx terminating TLS in front of the cloud and requiring a client certificate of
    ``client.ca_file`` (``ssl_verify_client on``): without one it answers 400."""

    name = "nginx-mtls"
    binary = "/usr/sbin/nginx"

    def __init__(
        self, workdir: Path, certs: Certificates, upstream: str, client: ClientCertificate
    ) -> None:
        super().__init__(workdir, certs, upstream)
        self.client = client
        self.temp: Path | None = None

    def command(self) -> tuple[list[str], dict[str, str]]:
        # The worker runs as nobody and cannot enter a pytest directory: temp files apart.
        self.temp = temp = Path(tempfile.mkdtemp(prefix="webhook-connect-nginx-"))
        temp.chmod(0o755)
        paths = "".join(
            f"    {kind}_temp_path {temp / kind};\n"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        main = self.workdir / "nginx.conf"
        main.write_text(
            f"pid {self.workdir / 'nginx.pid'};\n"
            f"error_log {self.workdir / 'error.log'} info;\n"
            "worker_processes 1;\n"
            "events { worker_connections 512; }\n"
            "http {\n"
            f"    access_log {self.workdir / 'access.log'};\n"
            f"{paths}"
            "    map $http_upgrade $connection_upgrade { default upgrade; '' close; }\n"
            "    server {\n"
            f"        listen 127.0.0.1:{self.port} ssl;\n"
            f"        ssl_certificate {self.certs.cert_file};\n"
            f"        ssl_certificate_key {self.certs.key_file};\n"
            f"        ssl_client_certificate {self.client.ca_file};\n"
            "        ssl_verify_client on;\n"
            "        location / {\n"
            f"            proxy_pass http://{self.upstream};\n"
            "            proxy_http_version 1.1;\n"
            "            proxy_set_header Upgrade $http_upgrade;\n"
            "            proxy_set_header Connection $connection_upgrade;\n"
            "            proxy_set_header Host $host;\n"
            "            proxy_buffering off;\n"
            "            proxy_read_timeout 3600s;\n"
            "        }\n"
            "    }\n"
            "}\n"
        )
        args = [
            require(self.binary),
            "-p",
            str(self.workdir),
            "-e",
            str(self.workdir / "error.log"),
            "-c",
            str(main),
            "-g",
            "daemon off;",
        ]
        return args, dict(os.environ)

    def _serving(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            self.last_error = RuntimeError(f"{self.name} exited")
            return False
        context = self.certs.client_context()
        context.load_cert_chain(str(self.client.cert_file), str(self.client.key_file))
        try:
            response = httpx.get(f"{self.url}/health", verify=context, timeout=2)
        except Exception as exc:  # not serving yet: kept for the report
            self.last_error = exc
            return False
        return response.status_code == 200

    def stop(self) -> None:
        super().stop()
        if self.temp is not None:
            shutil.rmtree(self.temp, ignore_errors=True)
            self.temp = None

    def output(self) -> str:
        error_log = self.workdir / "error.log"
        logged = error_log.read_text(errors="replace") if error_log.exists() else ""
        return super().output() + logged


class Tinyproxy:
    """A real forward proxy (Debian ``tinyproxy``) on a free loopback port, logging every
    request (``CONNECT host:port`` lines), tunnelling to ``connect_ports`` only, with Basic
    authentication when ``credentials`` are given.

    ``hosts`` maps names only the proxy resolves: it runs in a mount namespace of its own
    (``unshare --mount``) where they are bound over ``/etc/hosts``. A client that reaches such
    a name has gone through the proxy; one that tried to bypass it cannot resolve the name.
    """

    binary = "/usr/bin/tinyproxy"

    def __init__(
        self,
        workdir: Path,
        connect_ports: list[int],
        credentials: tuple[str, str] | None = None,
        hosts: Mapping[str, str] | None = None,
    ) -> None:
        self.workdir = workdir
        self.connect_ports = connect_ports
        self.credentials = credentials
        self.hosts = dict(hosts or {})
        self.port = free_port()
        self.log = workdir / f"tinyproxy-{self.port}.log"
        self.stdout = workdir / f"tinyproxy-{self.port}.out"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``http://[user:pass@]127.0.0.1:port``, as a ``proxy`` key or ``HTTPS_PROXY``."""
        userinfo = f"{self.credentials[0]}:{self.credentials[1]}@" if self.credentials else ""
        return f"http://{userinfo}127.0.0.1:{self.port}"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / f"tinyproxy-{self.port}.conf"
        lines = [
            f"Port {self.port}",
            "Listen 127.0.0.1",
            "Timeout 600",
            f'LogFile "{self.log}"',
            "LogLevel Connect",  # one line per request: CONNECT host:port HTTP/1.1
            "MaxClients 200",
            "Allow 127.0.0.1",
            "DisableViaHeader Yes",
            *(f"ConnectPort {port}" for port in self.connect_ports),
        ]
        if self.credentials is not None:
            lines.append(f"BasicAuth {self.credentials[0]} {self.credentials[1]}")
        config.write_text("\n".join(lines) + "\n")
        args = [require(self.binary), "-d", "-c", str(config)]
        if self.hosts:
            hosts = self.workdir / f"tinyproxy-{self.port}.hosts"
            names = "".join(f"{address} {name}\n" for name, address in self.hosts.items())
            hosts.write_text("127.0.0.1 localhost\n" + names)
            # sh execs tinyproxy, so the PID we stop is tinyproxy's own.
            script = 'mount --bind "$1" /etc/hosts && exec "$2" -d -c "$3"'
            args = ["unshare", "--mount", "sh", "-c", script, "sh", str(hosts), args[0], args[3]]
        with self.stdout.open("ab") as out:
            self.process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
        wait_until(self._listening, timeout=10, what=f"tinyproxy on port {self.port}")

    def _listening(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"tinyproxy exited: {self.output()}")
        import socket

        with socket.create_connection(("127.0.0.1", self.port), timeout=1):
            return True

    def output(self) -> str:
        parts = [p.read_text(errors="replace") for p in (self.stdout, self.log) if p.exists()]
        return "".join(parts)

    def tunnels(self) -> list[str]:
        """``host:port`` of every CONNECT the proxy was asked for, in order."""
        if not self.log.exists():
            return []
        found = re.findall(r"Request \(file descriptor \d+\): CONNECT (\S+) HTTP/", self.output())
        return list(found)

    def requests(self) -> list[str]:
        """Every request line the proxy logged (CONNECT and plain forwarding alike)."""
        return re.findall(r"Request \(file descriptor \d+\): (.+)$", self.output(), re.MULTILINE)

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)
            self.process = None
