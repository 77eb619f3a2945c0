"""Every error the project raises on purpose is a WebhookConnectError (shared/exceptions.py),
the output modules' included, so a caller can tell ours from a library's surprise."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import webhook_connect.shared.modules as modules
from webhook_connect.shared.exceptions import ModuleError, WebhookConnectError


def module_names() -> list[str]:
    return [f"{modules.__name__}.{info.name}" for info in pkgutil.iter_modules(modules.__path__)]


@pytest.mark.parametrize("name", module_names())
def test_every_exception_of_the_output_modules_is_a_module_error(name: str) -> None:
    try:
        module = importlib.import_module(name)
    except ImportError as exc:  # a driver of an extra not installed here
        pytest.skip(f"{name}: {exc}")
    own = [
        cls
        for _, cls in inspect.getmembers(module, inspect.isclass)
        if issubclass(cls, BaseException) and cls.__module__ == name
    ]
    outside = [cls.__name__ for cls in own if not issubclass(cls, ModuleError)]
    assert outside == [], f"{name}: {outside} are not under ModuleError"


def test_the_module_errors_are_webhook_connect_errors() -> None:
    from webhook_connect.shared.modules.base import Permanent, Transient
    from webhook_connect.shared.modules.registry import MissingDriver, UnknownModule

    for cls in (Transient, Permanent, MissingDriver, UnknownModule, ModuleError):
        assert issubclass(cls, WebhookConnectError)
