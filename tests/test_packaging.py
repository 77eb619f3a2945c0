"""The distribution: one import name, every module and data file inside it, the licence, the
locked dependency set; and a user's own ``shared/`` or ``cloud/`` folder never shadows ours."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PARTS = ("cloud", "connector", "shared")
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "webhook_connect", *PARTS)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built from a copy of the sources (the checkout is left as it is)."""
    root = tmp_path_factory.mktemp("dist")
    source = root / "source"
    source.mkdir()
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(
                path, source / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__")
            )
        else:
            shutil.copy2(path, source / name)
    out = root / "out"
    build = "import sys; from setuptools import build_meta as b; print(b.build_wheel(sys.argv[1]))"
    result = subprocess.run(
        [sys.executable, "-c", build, str(out)],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out / result.stdout.strip().splitlines()[-1]


def names(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        return archive.namelist()


def dist_info(wheel: Path, name: str) -> str:
    (path,) = [
        n
        for n in names(wheel)
        if n.split("/")[0].endswith(".dist-info") and n.split("/", 1)[1] == name
    ]
    with zipfile.ZipFile(wheel) as archive:
        return archive.read(path).decode()


def test_the_wheel_installs_one_top_level_name(wheel: Path) -> None:
    tops = {name.split("/")[0] for name in names(wheel)}
    (info,) = [top for top in tops if top.endswith(".dist-info")]
    assert tops - {info} == {"webhook_connect"}
    assert dist_info(wheel, "top_level.txt").split() == ["webhook_connect"]


def test_every_module_and_data_file_is_in_the_namespace(wheel: Path) -> None:
    expected = {
        "webhook_connect/__init__.py",
        "webhook_connect/__main__.py",
        "webhook_connect/cli.py",
        "webhook_connect/py.typed",
    }
    for part in PARTS:
        for path in (REPO / part).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts:
                expected.add(f"webhook_connect/{path.relative_to(REPO).as_posix()}")
    assert expected - set(names(wheel)) == set()


def test_the_wheel_carries_the_licence_and_metadata(wheel: Path) -> None:
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in names(wheel))
    metadata = dist_info(wheel, "METADATA")
    assert "License-Expression: MIT" in metadata
    assert re.search(r"^Project-URL: Changelog, ", metadata, re.M)
    entry_points = dist_info(wheel, "entry_points.txt")
    assert "webhook-connect = webhook_connect.cli:main" in entry_points


def test_the_built_package_runs_from_the_wheel(wheel: Path, tmp_path: Path) -> None:
    # Imported from the wheel itself (zipimport), not from the checkout: the Lua scripts of the
    # Redis buffer are package data and must be found there.
    probe = (
        "import webhook_connect.cloud.buffers.redis as r, webhook_connect.cli as c;"
        "from importlib import resources;"
        "assert 'redis.call' in resources.files('webhook_connect.cloud.buffers')"
        ".joinpath('redis_scripts.lua').read_text();"
        "print(r.__file__)"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        env={"PYTHONPATH": str(wheel), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith(str(wheel))


@pytest.fixture
def users_own_folders(tmp_path: Path) -> Iterator[Path]:
    """A user's project with folders named like ours, each importable and each broken."""
    for name in (*PARTS, "cli"):
        package = tmp_path / name
        package.mkdir()
        (package / "__init__.py").write_text(f"raise ImportError('the user own {name}')\n")
    yield tmp_path


def test_a_users_own_shared_folder_does_not_break_the_cli(users_own_folders: Path) -> None:
    for args in (["--help"], ["cloud", "--help"], ["connector", "--help"], ["channels", "--help"]):
        result = subprocess.run(
            [sys.executable, "-m", "webhook_connect", *args],
            cwd=users_own_folders,
            env={"PYTHONPATH": str(users_own_folders), "PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr[-2000:]
        assert "Usage:" in result.stdout


def imported_modules(path: Path) -> Iterator[str]:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
        elif isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)


@pytest.mark.parametrize(
    ("part", "forbidden"),
    [("shared", ("cloud", "connector")), ("connector", ("cloud",)), ("cloud", ("connector",))],
)
def test_no_part_imports_another_sides_code(part: str, forbidden: tuple[str, ...]) -> None:
    # shared sits below both sides; a laptop running only the connector needs none of the
    # cloud's code or dependencies, and the other way round. Only webhook_connect.cli, above
    # them all, imports both.
    offenders = [
        f"{path.relative_to(REPO)}: {module}"
        for path in (REPO / part).rglob("*.py")
        for module in imported_modules(path)
        if any(
            module.startswith(f"webhook_connect.{side}") or module.split(".")[0] == side
            for side in forbidden
        )
    ]
    assert offenders == []


def requirement_names(lines: list[str]) -> set[str]:
    return {
        re.split(r"[<>=!~\[; ]", line.strip(), maxsplit=1)[0].lower().replace("_", "-")
        for line in lines
        if line.strip() and not line.lstrip().startswith("#")
    }


def test_the_lock_pins_every_dependency_of_the_dev_extra() -> None:
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    wanted = requirement_names(project["dependencies"])
    for extra in extras.values():
        wanted |= requirement_names([r for r in extra if not r.startswith("webhook-connect")])
    lock = (REPO / "requirements" / "dev.txt").read_text().splitlines()
    pinned = requirement_names([line for line in lock if "==" in line])
    assert all("==" in line for line in lock if line and not line.startswith(" "))
    assert wanted - pinned == set(), "run scripts/lock after changing pyproject.toml"
