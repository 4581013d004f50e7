"""The browser demo, driven in a real headless Chromium (Debian's, through playwright): a record
submitted on the page shows ciphertext in the stored column, plaintext for the billing caller, a
masked view for support, real TLS parameters, both wire captures, and a verified audit trail."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from sidecrypt.demo_page.serve import running_page

SSN = "078-05-1120"
CARD = "4000 0566 5566 5556"
ARGS = [
    "--no-sandbox",  # the tests run as root
    "--headless=new",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (.ci/run installs Debian's chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return found


@pytest.fixture
async def page(tmp_path: Path) -> AsyncIterator[tuple[Any, Any]]:
    from playwright.async_api import async_playwright

    executable = chromium()
    async with running_page() as (url, stack), async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=executable, args=ARGS)
        try:
            tab = await browser.new_page(viewport={"width": 1400, "height": 1000})
            await tab.goto(url)
            yield tab, stack
        finally:
            await browser.close()
    assert not stack.workdir.exists()  # the demo removes everything it made


async def test_submit_shows_each_side_of_the_sidecar(page: tuple[Any, Any], tmp_path: Path) -> None:
    tab, stack = page
    await tab.fill("input[name=ssn]", SSN)
    await tab.fill("input[name=card]", CARD)
    await tab.click("button[type=submit]")
    await tab.wait_for_selector("#view-support", timeout=20_000)

    sent = await tab.inner_text("#sent")
    stored = await tab.inner_text("#stored")
    assert SSN in sent and CARD in sent
    assert SSN not in stored and CARD not in stored and "sc1." in stored
    record_id = int(await tab.get_attribute("body", "data-record"))
    row = stack.stored(record_id)
    assert row is not None and SSN not in row and json.loads(row)["ssn"] in stored  # from SQLite

    assert SSN in await tab.inner_text("#view-billing")
    support = await tab.inner_text("#view-support")
    assert SSN not in support and "1120" in support and "****" in support
    assert "sc1." in await tab.inner_text("#view-analytics")
    intern = await tab.inner_text("#view-intern")
    assert SSN not in intern and "forbidden" in intern

    tls = await tab.inner_text("#tls")
    assert "TLSv1.3" in tls or "TLSv1.2" in tls
    assert "CN=localhost" in tls and "sidecrypt dev CA" in tls

    wire = await tab.inner_text("#wire")
    assert SSN not in wire and SSN.encode().hex() not in wire.replace("\n", "")
    await tab.check("#no-tls")
    plain = await tab.inner_text("#wire")
    assert "POST /users HTTP/1.1" in plain and SSN in plain  # without TLS, anyone can read it

    await tab.wait_for_function(
        "document.getElementById('verify').textContent === 'chain verified'", timeout=20_000
    )
    actions = await tab.inner_text("#audit")
    assert "encrypt_fields" in actions and "reveal" in actions
    assert SSN not in actions
    await tab.uncheck("#no-tls")
    shot = tmp_path / "demo-page.png"
    await tab.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
