"""The dead-letter console in a real browser (headless Chromium through chromedriver, Debian's
``chromium`` and ``chromium-driver``): load the page, filter by code, open one dead letter,
replay a group of 100 and see the group gone and the 100 results arrive; a change without the
token is refused (403) and changes nothing.  Screenshots go to the test's temporary directory,
or to ``docs/`` (the README's) with ``CW_SCREENSHOTS=docs``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pydantic import SecretStr

from tests.integration.conftest import REDIS_URL, Admin, WorkerFactory
from tests.integration.test_dlq import ready_count
from tests.integration.test_dlq_replay import conferences, not_found_on, role, run_id
from worker.console.server import TOKEN_HEADER, Console

pytestmark = pytest.mark.integration
__all__ = ["run_id"]  # the fixture, used here

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
DOCS = Path(__file__).resolve().parents[2] / "docs"
TOKEN = "console-test-token"
GROUP = 100


def browser() -> Any:
    """Headless Chromium driven by chromedriver (skips only when either is missing)."""
    if CHROMIUM is None or DRIVER is None:
        pytest.skip("chromium and chromium-driver are not installed (scripts/test installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000"):
        options.add_argument(flag)
    options.add_argument("--disable-dev-shm-usage")
    return webdriver.Chrome(service=DriverService(DRIVER), options=options)


def wait_for(driver: Any, condition: Any, timeout_s: float = 60.0) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout_s, poll_frequency=0.2).until(condition)


def use_console(url: str, fix_cause: Any, shots: Path) -> dict[str, Any]:
    """What an operator does in the browser (runs in a thread: selenium blocks)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    driver = browser()
    seen: dict[str, Any] = {}
    try:
        driver.get(url)
        wait_for(driver, lambda d: "in flight" in d.find_element(By.ID, "worker").text)
        groups = driver.find_elements(By.CSS_SELECTOR, "#groups tbody tr")
        seen["groups"] = {
            row.get_attribute("data-code"): row.get_attribute("data-count") for row in groups
        }
        driver.save_screenshot(str(shots / "console-dead-letters.png"))
        Select(driver.find_element(By.ID, "filter-code")).select_by_visible_text(
            "provider_not_found"
        )
        driver.find_element(By.ID, "apply-filter").click()
        wait_for(driver, lambda d: "code=provider_not_found" in d.current_url)
        codes = {
            row.get_attribute("data-code")
            for row in driver.find_elements(By.CSS_SELECTOR, "tr.letter")
        }
        seen["filtered"] = (codes, len(driver.find_elements(By.CSS_SELECTOR, "tr.letter")))
        driver.find_element(By.CSS_SELECTOR, "a.inspect").click()
        wait_for(driver, lambda d: d.find_elements(By.ID, "body"))
        seen["letter"] = {
            "code": driver.find_element(By.ID, "letter-code").text,
            "stored": driver.find_element(By.ID, "stored").text,
            "body": driver.find_element(By.ID, "body").text,
        }
        driver.save_screenshot(str(shots / "console-dead-letter.png"))
        driver.get(url)
        wait_for(driver, lambda d: d.find_elements(By.ID, "token"))
        driver.find_element(By.ID, "token").send_keys(TOKEN)
        fix_cause()
        row = driver.find_element(By.CSS_SELECTOR, '#groups tr[data-code="provider_not_found"]')
        row.find_element(By.CSS_SELECTOR, 'button[data-action="replay"]').click()
        wait_for(driver, lambda d: "done: replayed" in d.find_element(By.ID, "job-text").text)
        seen["job"] = driver.find_element(By.ID, "job-text").text
        wait_for(
            driver,
            lambda d: (
                not d.find_elements(By.CSS_SELECTOR, '#groups tr[data-code="provider_not_found"]')
            ),
        )
        wait_for(
            driver,
            lambda d: (
                d.find_elements(By.ID, "results-succeeded")
                and int(d.find_element(By.ID, "results-succeeded").text) >= GROUP
            ),
        )
        seen["after"] = {
            row.get_attribute("data-code")
            for row in driver.find_elements(By.CSS_SELECTOR, "#groups tbody tr")
        }
        seen["succeeded"] = int(driver.find_element(By.ID, "results-succeeded").text)
        driver.save_screenshot(str(shots / "console-replayed.png"))
    finally:
        driver.quit()
    return seen


async def test_the_console_in_a_browser(
    worker_factory: WorkerFactory,
    fixtures: dict[str, Any],
    admin: Admin,
    run_id: str,
    tmp_path: Path,
) -> None:
    """Filter, inspect, replay a group of 100 in headless Chromium: the group leaves the queue and
    100 successes arrive; without the token a replay is refused with 403 and nothing moves."""
    if CHROMIUM is None or DRIVER is None:
        pytest.skip("chromium and chromium-driver are not installed (scripts/test installs them)")
    conference = conferences(fixtures)[0]
    await admin.fault(**not_found_on(conference))
    async with worker_factory(dedup_url=REDIS_URL) as (service, bus):
        for i in range(GROUP):
            await bus.publish(role(f"{run_id}{i:03d}", conference))
        for i in range(3):
            await bus.publish({**role(f"{run_id}bad-{i}", conference), "supervisor_role": "shout"})
        await bus.events(GROUP + 3, timeout_s=60)
        assert await ready_count(bus.settings, GROUP + 3) == GROUP + 3
        settings = bus.settings.model_copy(
            update={
                "console_port": 0,
                "console_token": SecretStr(TOKEN),
                "console_worker_url": f"http://127.0.0.1:{service.http_port}",
            }
        )
        console = Console(settings)
        await console.start()
        try:
            url = f"http://127.0.0.1:{console.port}/"
            async with aiohttp.ClientSession() as http:
                for headers in ({}, {TOKEN_HEADER: "wrong"}):
                    async with http.post(
                        f"{url}api/replay", json={"keys": ["x"]}, headers=headers
                    ) as answer:
                        assert answer.status == 403
            assert await ready_count(bus.settings, GROUP + 3) == GROUP + 3

            loop = asyncio.get_running_loop()

            def fix_cause() -> None:
                asyncio.run_coroutine_threadsafe(
                    admin.call("DELETE", "/__admin/faults"), loop
                ).result(10)

            shots = DOCS if os.environ.get("CW_SCREENSHOTS") == "docs" else tmp_path
            seen = await asyncio.to_thread(use_console, url, fix_cause, shots)
        finally:
            await console.stop()
        events = await bus.events(GROUP, timeout_s=60)
        assert await ready_count(bus.settings, 3) == 3
    assert seen["groups"] == {"provider_not_found": str(GROUP), "invalid_command": "3"}
    assert seen["filtered"] == ({"provider_not_found"}, GROUP)
    assert seen["letter"]["code"] == "provider_not_found"
    assert seen["letter"]["stored"] == "rejected (provider_not_found)"
    assert conference[0] in seen["letter"]["body"]
    assert seen["job"].startswith(f"done: replayed {GROUP} of {GROUP}")
    assert seen["after"] == {"invalid_command"}
    assert seen["succeeded"] >= GROUP
    assert {(e["status"], e["duplicate"]) for e in events} == {("succeeded", False)}
    assert len({e["command_id"] for e in events}) == GROUP
