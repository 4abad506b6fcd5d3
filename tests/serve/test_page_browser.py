"""The search page in a real browser: type a query, move the budget slider, search with an image, take a picture.

Runs headless Debian chromium through selenium against a live server on 127.0.0.1. Setup installs both
(scripts/install_browser.sh); where they are missing the test is skipped with that hint — except under CI,
where it fails, so the suite never passes without having run it.
"""

from __future__ import annotations

import os

import pytest
from browser import chromium, missing, searches, wait_for
from PIL import Image
from serve_images import data_url

from metaembed.index.ingestion import ingest

QUALITY = {"4x8": {"test P@1": 0.25}, "8x16": {"test P@1": 0.5}}


@pytest.fixture(scope="module")
def browser_ready():
    reason = missing()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"the browser test must run under CI: {reason}")
        pytest.skip(reason)


@pytest.fixture
def served(browser_ready, live_server, serve_model, tmp_path):
    from metaembed.index import open_index

    items = tmp_path / "items"
    items.mkdir()
    for name, colour, size in [("red", (210, 30, 30), (96, 64)), ("blue", (30, 40, 210), (64, 64)),
                               ("green", (30, 170, 60), (64, 96))]:  # fmt: skip
        Image.new("RGB", size, colour).save(items / f"{name}.png")
        (items / f"{name}.txt").write_text(f"a {name} shape")
    (items / "memo.md").write_text("quarterly revenue table for the board meeting")
    ingest(tmp_path / "ix", serve_model, items, progress=False)
    url = live_server(open_index(tmp_path / "ix"), quality=QUALITY, image_dir=items, model_name="tiny-test")
    return url, items


def text_of(driver, element_id: str) -> str:
    return driver.find_element("id", element_id).text


def test_query_slider_and_image_search_in_chromium(served, tmp_path):
    import httpx
    from selenium.webdriver.common.keys import Keys

    url, items = served
    budgets = {b["budget"]: b for b in httpx.get(f"{url}/v1/budgets").json()["budgets"]}
    with chromium() as driver:
        driver.get(url + "/")
        wait_for(driver, lambda d: text_of(d, "budget-label") == "4x8", what="the budget ladder")
        assert "model card: test P@1 25.0 %" in text_of(driver, "quality")

        box = driver.find_element("id", "query")
        box.send_keys("a red shape", Keys.ENTER)
        wait_for(driver, lambda d: searches(d) == 1, what="the first search")
        hits = driver.find_elements("css selector", "#results .hit")
        assert len(hits) == 4
        first = {"encode": text_of(driver, "encode-ms"), "bytes": text_of(driver, "bytes-read")}
        assert float(first["encode"]) > 0 and float(text_of(driver, "score-ms")) >= 0
        assert first["bytes"] == f"{budgets['4x8']['index_bytes'] / 1024:.2f} KiB"
        thumbnails = driver.find_elements("css selector", "#results .hit img")
        assert len(thumbnails) == 3  # the three images; the memo is a text snippet
        wait_for(driver, lambda d: all(img.get_property("naturalWidth") > 0 for img in thumbnails), what="thumbnails")
        assert "quarterly revenue" in driver.find_element("css selector", '.hit[data-id="memo.md"] .snippet').text

        slider = driver.find_element("id", "budget")
        slider.send_keys(Keys.RIGHT)  # 4x8 → 8x16: the same query searched again at the new budget
        wait_for(driver, lambda d: d.find_element("id", "stats").get_attribute("data-budget") == "8x16",
                 what="the search at 8x16")  # fmt: skip
        assert text_of(driver, "budget-label") == "8x16" and searches(driver) == 2
        assert text_of(driver, "bytes-read") == f"{budgets['8x16']['index_bytes'] / 1024:.2f} KiB" != first["bytes"]
        assert "test P@1 50.0 %" in text_of(driver, "quality")

        box.clear()
        driver.find_element("id", "image-input").send_keys(str(items / "blue.png"))
        wait_for(driver, lambda d: searches(d) == 3, what="the image search")
        assert driver.find_element("id", "query-image").is_displayed()
        shown = [hit.get_attribute("data-id") for hit in driver.find_elements("css selector", "#results .hit")]
        query = {"query": {"image": data_url((items / "blue.png").read_bytes())}, "budget": "8x16", "k": 12}
        expected = [hit["id"] for hit in httpx.post(f"{url}/v1/search", json=query).json()["results"]]
        assert shown == expected  # the page sent the same pixels the API ranks
        assert text_of(driver, "error") == ""

        shot = tmp_path / "page.png"
        assert driver.save_screenshot(str(shot))
        with Image.open(shot) as picture:
            assert picture.size[0] >= 1000 and len(picture.getcolors(1 << 20) or []) > 50  # a rendered page


def format_bytes(n: int) -> str:
    """What the page's formatBytes shows for ``n`` bytes."""
    value, unit = float(n), 0
    while value >= 1024 and unit < 4:
        value, unit = value / 1024, unit + 1
    return f"{n} B" if unit == 0 else f"{value:.{2 if value < 10 else 1}f} {['B', 'KiB', 'MiB', 'GiB', 'TiB'][unit]}"


def test_auto_budget_in_chromium(served, tmp_path):
    import httpx
    from selenium.webdriver.common.keys import Keys

    from metaembed import Budget
    from metaembed.auto_budget import POLICY_FILE, AutoBudget

    url, _ = served
    index_path = tmp_path / "ix"
    with chromium() as driver:
        driver.get(url + "/")
        wait_for(driver, lambda d: text_of(d, "budget-label") == "4x8", what="the budget ladder")
        assert not driver.find_element("id", "auto-choice").is_displayed()  # no policy: no auto to offer

        AutoBudget(float("inf"), cheap=Budget(2, 4), top_m=100).save(index_path)  # always climbs to 16x64
        driver.refresh()
        wait_for(driver, lambda d: d.find_element("id", "auto-choice").is_displayed(), what="the auto choice")
        driver.find_element("id", "query").send_keys("a red shape", Keys.ENTER)
        wait_for(driver, lambda d: searches(d) == 1, what="the first search")
        assert not driver.find_element("id", "auto-stat").is_displayed()

        driver.find_element("id", "auto").click()
        wait_for(driver, lambda d: searches(d) == 2, what="the search at auto")
        stats = driver.find_element("id", "stats")
        assert stats.get_attribute("data-auto") == "yes" and stats.get_attribute("data-budget") == "16x64"
        assert text_of(driver, "budget-label") == "auto" and not driver.find_element("id", "budget").is_enabled()
        assert "2x4 first, up to 16x64" in text_of(driver, "budget-note")
        assert text_of(driver, "auto-budget") == "16x64" and "3 escalations from 2x4" in text_of(driver, "auto-stat")
        answer = httpx.post(f"{url}/v1/search", json={"query": "a red shape", "budget": "auto", "k": 12}).json()
        assert answer["budget"] == "16x64" and answer["auto"]["escalations"] == 3
        assert text_of(driver, "bytes-read") == format_bytes(answer["index_bytes_read"])
        shown = [hit.get_attribute("data-id") for hit in driver.find_elements("css selector", "#results .hit")]
        assert shown == [hit["id"] for hit in answer["results"]]

        AutoBudget(0.0, cheap=Budget(2, 4)).save(index_path)  # never escalates: the page shows where it stopped
        driver.find_element("id", "search").click()
        wait_for(driver, lambda d: searches(d) == 3, what="the search with the new policy")
        assert text_of(driver, "auto-budget") == "2x4" and "the cheap budget was sure" in text_of(driver, "auto-stat")

        driver.find_element("id", "auto").click()  # back to the slider's budget
        wait_for(driver, lambda d: searches(d) == 4, what="the search at the slider's budget")
        assert stats.get_attribute("data-auto") == "no" and stats.get_attribute("data-budget") == "4x8"
        assert not driver.find_element("id", "auto-stat").is_displayed() and text_of(driver, "error") == ""
    (index_path / POLICY_FILE).unlink()
