"""Fixtures of the sandbox's own tests (`sandbox` and `make_sandbox` are in tests/conftest.py,
as the client and pipeline tests use them too)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """One aiohttp session for the test, closed afterwards."""
    async with aiohttp.ClientSession() as session:
        yield session
