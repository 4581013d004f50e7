"""The corpus runs on both client-connection engines (``server.engine``): their HTTP parsers
differ, and a form one of them lets by must still not reach the app."""

from __future__ import annotations

import pytest


@pytest.fixture(params=["lean", "aiohttp"])
def proxy_engine(request: pytest.FixtureRequest) -> str:
    return str(request.param)
