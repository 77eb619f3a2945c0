"""Every ``connector.json`` key as a command-line flag and a ``WEBHOOK_CONNECT_*`` variable.

The flags are derived from :class:`ConnectorSettings`' fields, so a key added to the model gets
its flag and variable with no edit here: ``max_in_flight`` is ``--max-in-flight`` and
``WEBHOOK_CONNECT_MAX_IN_FLIGHT``. Scalar keys (str, int, float, bool, a ``Literal`` choice,
optional or constrained) take a typed value; structured keys (``default_target``, ``targets``,
anything nested) take JSON, the same text the file would hold.

Precedence is file < environment < flag. Click cannot tell a flag's value from its
variable's once it has read both, so the variable is not read by click at all
(:class:`SettingOption`): :func:`given_values` takes flags from click and variables from the
environment, so an error names exactly the flag or variable that was wrong.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import click
import orjson
from click.core import ParameterSource
from pydantic.fields import FieldInfo

ENV_PREFIX = "WEBHOOK_CONNECT_"
Kind = Literal["str", "int", "float", "bool", "choice", "json"]
_SCALARS: Mapping[type, Kind] = {bool: "bool", int: "int", float: "float", str: "str"}


@dataclass(frozen=True, slots=True)
class FlagSpec:
    """How one settings key is given on the command line and in the environment."""

    key: str
    kind: Kind
    choices: tuple[str, ...] = ()
    help: str = ""

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")

    @property
    def envvar(self) -> str:
        return ENV_PREFIX + self.key.upper()


def value_kind(annotation: Any) -> tuple[Kind, tuple[str, ...]]:
    """The kind of value a field's type annotation takes (pure): optional and constrained
    (``Annotated``) scalars count as their scalar; anything else is JSON."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return value_kind(typing.get_args(annotation)[0])
    if origin is typing.Union or origin is types.UnionType:
        members = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return value_kind(members[0]) if len(members) == 1 else ("json", ())
    if origin is Literal:
        choices = typing.get_args(annotation)
        if all(isinstance(choice, str) for choice in choices):
            return "choice", tuple(choices)
        return "json", ()
    if isinstance(annotation, type) and annotation in _SCALARS:
        return _SCALARS[annotation], ()
    return "json", ()


def flag_specs(fields: Mapping[str, FieldInfo]) -> list[FlagSpec]:
    """One spec per settings field, in the model's order."""
    specs = []
    for key, field in fields.items():
        kind, choices = value_kind(field.annotation)
        specs.append(FlagSpec(key, kind, choices, field.description or ""))
    return specs


class JsonValue(click.ParamType):  # type: ignore[type-arg]
    """A structured key given as JSON (``--targets '{"github": {"url": ...}}'``)."""

    name = "json"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value
        try:
            return orjson.loads(value)
        except orjson.JSONDecodeError as exc:
            self.fail(f"not JSON: {exc}", param, ctx)


class SettingOption(click.Option):
    """An option whose ``envvar`` is shown in ``--help`` (and listed for deployment checks)
    but read by :func:`given_values`, not by click, to keep flag and variable apart."""

    def value_from_envvar(self, ctx: click.Context) -> str | None:
        return None


_CLICK_TYPES: Mapping[Kind, click.ParamType[Any]] = {
    "str": click.STRING,
    "int": click.INT,
    "float": click.FLOAT,
    "json": JsonValue(),
}


def option_for(spec: FlagSpec) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The click option of one settings key; unset unless given (``None``)."""
    common: dict[str, Any] = {
        "cls": SettingOption,
        "envvar": spec.envvar,
        "show_envvar": True,
        "default": None,
        "help": spec.help
        or f"connector.json {spec.key!r}" + (" (JSON)" if spec.kind == "json" else ""),
    }
    if spec.kind == "bool":
        name = spec.flag.removeprefix("--")
        return click.option(f"{spec.flag}/--no-{name}", spec.key, **common)
    kind: click.ParamType[Any] = (
        click.Choice(spec.choices) if spec.kind == "choice" else _CLICK_TYPES[spec.kind]
    )
    return click.option(spec.flag, spec.key, type=kind, **common)


def settings_options(
    specs: Iterable[FlagSpec],
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A decorator adding every spec's option to a click command."""

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        for spec in reversed(list(specs)):
            command = option_for(spec)(command)
        return command

    return decorate


class BadValue(Exception):
    """A variable's value does not convert; ``name`` is the variable."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason


def given_values(
    ctx: click.Context, environ: Mapping[str, str]
) -> tuple[dict[str, Any], dict[str, str]]:
    """The values of the :class:`SettingOption` parameters that were given, flag over
    variable, and for each key the flag or variable it came from (to name it in errors).

    An empty variable counts as not set (``KEY=`` lines of environment files)."""
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for param in ctx.command.params:
        if not isinstance(param, SettingOption) or param.name is None:
            continue
        name = param.name
        if ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE:
            values[name] = ctx.params[name]
            origins[name] = param.opts[0]
            continue
        envvar = param.envvar if isinstance(param.envvar, str) else None
        raw = environ.get(envvar) if envvar else None
        if envvar is None or not raw:
            continue
        try:
            values[name] = param.type.convert(raw, param, ctx)
        except click.BadParameter as exc:
            raise BadValue(envvar, exc.message) from None
        origins[name] = envvar
    return values, origins
