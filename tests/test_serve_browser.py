"""`igpt serve` in a real browser: headless Chromium, driven by Selenium, uploads a PNG, completes it
and watches the completions fill in; it takes a screenshot, written over the README's
(docs/serve-screenshot.png) when IGPT_SCREENSHOT=1, so an ordinary test run leaves the checkout as it was.

Skipped without Gradio, Selenium, or Debian's `chromium` and `chromium-driver` (.ci/run installs them).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import Served, train

pytestmark = pytest.mark.browser
README_SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "serve-screenshot.png"


def _chromium() -> tuple[str, str]:
    if importlib.util.find_spec("gradio") is None:
        pytest.skip("no gradio: pip install 'igpt[app]'")
    pytest.importorskip("gradio_client")
    pytest.importorskip("selenium")
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.skip("no chromium and chromedriver on PATH (apt-get install chromium chromium-driver)")
    return browser, driver


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    binary, driver_path = _chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1280,1280", "--hide-scrollbars",
                     f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def served(browser, tmp_path_factory):
    # longer than the tiny run, so the screenshot shows digit-like completions (2.1 bits/pixel, seconds);
    # served by a relative path, as a user would type it, so the screenshot is the same every time
    root = tmp_path_factory.mktemp("served")
    train(root / "cwd" / "runs" / "digits", steps=300, eval_every=150, save_every=300, sample_every=300)
    server = Served("runs/digits", root, step_seconds=0.04)
    yield server
    server.stop()


def _until(condition, timeout: float = 60.0, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(every)
    raise AssertionError("timed out waiting for the page")


def _click(element) -> bool:
    """Click once the page lets it through: Gradio covers a component with its loading veil for a moment."""
    from selenium.common.exceptions import ElementClickInterceptedException

    try:
        element.click()
    except ElementClickInterceptedException:
        return False
    return True


def _tab(browser, name: str) -> None:
    from selenium.webdriver.common.by import By

    def chosen() -> bool:
        tab = next((t for t in browser.find_elements(By.CSS_SELECTOR, "button[role=tab]") if t.text == name), None)
        return tab is not None and (tab.get_attribute("aria-selected") == "true" or _click(tab) and False)

    _until(chosen, every=0.3)


def test_draw_on_the_canvas(browser, served):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    browser.get(served.url)
    _until(lambda: browser.find_elements(By.ID, "igpt-facts"))
    _tab(browser, "Draw")
    canvas = _until(lambda: [c for c in browser.find_elements(By.CSS_SELECTOR, "#igpt-canvas canvas")
                             if c.size["width"] > 100])[0]
    reach = int(canvas.size["height"] * 0.3)
    ActionChains(browser).move_to_element_with_offset(canvas, 0, -reach).click_and_hold() \
        .move_by_offset(0, reach).move_by_offset(0, reach).release().perform()  # a one, down the middle
    _until(lambda: _click(browser.find_element(By.ID, "igpt-use-drawing")))
    _until(lambda: "your drawing" in browser.find_element(By.ID, "igpt-status").text)


def test_upload_complete_and_watch_it_fill_in(browser, served, tmp_path):
    from selenium.webdriver.common.by import By

    from igpt.data import DataConfig

    digit = DataConfig(name="digits", resolution=8).images("test").images[7]
    picture = tmp_path / "my digit.png"
    Image.fromarray(np.asarray(digit)[..., 0]).resize((96, 96), Image.NEAREST).save(picture)  # grey, any size

    browser.get(served.url)
    facts = _until(lambda: browser.find_elements(By.ID, "igpt-facts"))[0]
    assert "17 colours" in facts.text and "dense" in facts.text
    _tab(browser, "Upload")
    browser.find_element(By.CSS_SELECTOR, "#igpt-upload input[type=file]").send_keys(str(picture))
    status = browser.find_element(By.ID, "igpt-status")
    _until(lambda: "Chosen: my digit.png" in status.text)
    seed = browser.find_element(By.CSS_SELECTOR, "#igpt-seed input")
    seed.clear()
    seed.send_keys("7")  # the same completions, and the same screenshot, every run

    _until(lambda: _click(browser.find_element(By.ID, "igpt-complete")))
    grids, rows = set(), set()

    def finished() -> bool:
        grids.update(img.get_attribute("src") for img in browser.find_elements(By.CSS_SELECTOR, "#igpt-grid img"))
        if status.text.startswith("Completing: row"):
            rows.add(status.text)
        return "completions of my digit.png" in status.text

    _until(finished, every=0.02)
    assert len(rows) >= 2 and len(grids) >= 3, (rows, grids)  # rows streamed in before the finished grid
    link = _until(lambda: browser.find_elements(By.CSS_SELECTOR, "#igpt-download a"))[0]
    assert "igpt-completions-seed7.png" in link.get_attribute("href")
    time.sleep(0.5)  # the last grid's image decodes
    screenshot = README_SCREENSHOT if os.environ.get("IGPT_SCREENSHOT") == "1" else tmp_path / "serve.png"
    browser.save_screenshot(str(screenshot))
    with Image.open(screenshot) as shot:
        assert shot.size[0] >= 1000
