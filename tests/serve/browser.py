"""A real browser for the search page: headless Debian chromium driven by selenium.

Used by test_page_browser.py and by scripts/page_screenshot.py (the picture in the README).
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager

INSTALL_HINT = "install them with `bash scripts/install_browser.sh` (Debian: apt-get install chromium chromium-driver)"


def missing() -> str | None:
    """Why the browser cannot run here, or None."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install 'metaembed[dev]')"
    absent = [name for name in ("chromium", "chromedriver") if shutil.which(name) is None]
    return f"{' and '.join(absent)} not found; {INSTALL_HINT}" if absent else None


@contextmanager
def chromium(width: int = 1280, height: int = 900):
    """A headless chromium session (root needs --no-sandbox; /dev/shm is small in containers)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 f"--window-size={width},{height}", "--hide-scrollbars"):  # fmt: skip
        options.add_argument(flag)
    service = Service(executable_path=shutil.which("chromedriver"), log_output=os.devnull)
    driver = webdriver.Chrome(service=service, options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver, condition, timeout: float = 90.0, what: str = "the page"):
    """Poll until ``condition(driver)`` holds; generous: a CPU shared with other work can make a step take long."""
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: condition(d), f"waiting for {what}")


def searches(driver) -> int:
    return int(driver.find_element("id", "stats").get_attribute("data-searches"))
