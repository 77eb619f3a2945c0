"""Fixtures every module test file shares."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from webhook_connect.shared.modules import Pools


@pytest.fixture
async def pools() -> AsyncIterator[Pools]:
    """The clients modules share, closed after the test whatever happened."""
    shared = Pools()
    try:
        yield shared
    finally:
        await shared.aclose()
