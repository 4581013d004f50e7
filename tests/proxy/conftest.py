"""Every proxy test here runs on both client-connection engines (``server.engine``)."""

from __future__ import annotations

import pytest


@pytest.fixture(params=["lean", "aiohttp"])
def proxy_engine(request: pytest.FixtureRequest) -> str:
    return str(request.param)
