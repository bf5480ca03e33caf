"""The page at `/`, in a real headless Chromium (Debian's chromium + chromedriver, driven by Selenium): drop a file,
pick a task, see the answer; grounding boxes are drawn over the page. Screenshots go to test-output/."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.helpers import IMG, SAMPLES, TINY, running_server

CHROMIUM, CHROMEDRIVER = shutil.which("chromium") or "/usr/bin/chromium", shutil.which("chromedriver") or ""
ARTIFACTS = Path(os.environ.get("VL2_TEST_OUTPUT", Path(__file__).parent.parent / "test-output"))


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (Path(CHROMIUM).exists() and CHROMEDRIVER):
        if os.environ.get("VL2_REQUIRE_BROWSER"):  # .ci/run installs the browser: there, a missing one fails
            pytest.fail("chromium and chromedriver are required (apt-get install chromium chromium-driver)")
        pytest.skip("chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-quic", "--window-size=1280,1600",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def page_url():
    from vl2cli.engine.loading import load_model
    from vl2cli.reader import Reader
    reader = Reader(load_model(TINY, device="cpu", dtype="float32", quant="none"))
    with running_server(reader) as (url, _):
        yield url


def test_the_pages_format_lists_are_the_tasks_formats():
    """The page's hard-coded FORMATS offers what each task writes through /v1/documents (no browser needed)."""
    import json
    import re

    from vl2cli.tasks import TASKS
    script = (Path(__file__).parent.parent / "vl2cli" / "serve" / "static" / "app.js").read_text()
    literal = re.search(r"const FORMATS = (\{.*?\});", script, re.S)
    assert literal is not None
    offered = json.loads(re.sub(r"(\w+):", r'"\1":', literal.group(1)))
    assert offered == {name: list(task.formats) for name, task in TASKS.items()}


def _read(driver, url: str, task: str, path: str, question: str | None = None):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import Select, WebDriverWait
    driver.get(url + "/")
    Select(driver.find_element(By.ID, "task")).select_by_value(task)
    if question is not None:
        driver.find_element(By.ID, "question").send_keys(question)
    driver.find_element(By.ID, "file").send_keys(str(Path(path).resolve()))
    driver.find_element(By.ID, "go").click()
    WebDriverWait(driver, 120).until(ready.text_to_be_present_in_element((By.ID, "status"), "pages done."))
    return driver.find_elements(By.CSS_SELECTOR, "article.page")


def test_the_page_reads_an_image_and_shows_the_text(browser, page_url):
    import json

    from selenium.webdriver.common.by import By
    pages = _read(browser, page_url, "ocr", IMG)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "web-ocr.png"))
    assert len(pages) == 1 and "failed" not in pages[0].get_attribute("class")
    record = json.loads(pages[0].find_element(By.CSS_SELECTOR, "details pre").get_attribute("textContent"))
    assert record["task"] == "ocr" and record["status"] == "ok" and record["source"] == "note_300x200.png"
    shown = pages[0].find_element(By.CSS_SELECTOR, ".answer").text
    assert record["answer"].split()[0] in shown  # the answer itself is on the page, rendered
    assert browser.find_element(By.ID, "status").text == "1 of 1 pages done."


def test_the_page_draws_grounding_boxes_over_the_image(browser, page_url):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    pages = _read(browser, page_url, "ground", str(SAMPLES / "objects.png"), question="the red circle")
    figure = WebDriverWait(browser, 30).until(
        lambda d: d.find_element(By.CSS_SELECTOR, ".figure[data-boxes]"))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "web-ground.png"))
    assert len(pages) == 1 and int(figure.get_attribute("data-boxes")) >= 1  # the strict grammar: always a box
    painted = browser.execute_script(
        "const c = document.querySelector('.figure canvas');"
        "const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++; return n;")
    assert painted > 0  # box outlines were drawn on the canvas over the image


def test_the_page_shows_the_servers_error(browser, page_url, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait
    broken = tmp_path / "broken.pdf"
    broken.write_bytes(b"%PDF-1.7 not really")
    browser.get(page_url + "/")
    browser.find_element(By.ID, "file").send_keys(str(broken))
    browser.find_element(By.ID, "go").click()
    WebDriverWait(browser, 60).until(ready.text_to_be_present_in_element((By.ID, "status"), "400"))
    assert "broken.pdf" in browser.find_element(By.ID, "status").text


def test_the_page_offers_caption_a_token_budget_a_format_and_counts_seconds_while_reading(browser, page_url):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import Select, WebDriverWait
    browser.get(page_url + "/")
    tasks = [o.get_attribute("value") for o in Select(browser.find_element(By.ID, "task")).options]
    assert "caption" in tasks
    browser.execute_script(  # every text the status line shows, to see the seconds counted while a page is read
        "window.seen = []; const s = document.getElementById('status');"
        "new MutationObserver(() => seen.push(s.textContent)).observe(s, {childList: true, subtree: true,"
        " characterData: true});")
    Select(browser.find_element(By.ID, "task")).select_by_value("ocr")
    Select(browser.find_element(By.ID, "format")).select_by_value("text")
    browser.find_element(By.ID, "max_tokens").send_keys("3")
    browser.find_element(By.ID, "file").send_keys(str(Path(IMG).resolve()))
    browser.find_element(By.ID, "go").click()
    WebDriverWait(browser, 120).until(ready.text_to_be_present_in_element((By.ID, "status"), "pages done."))
    shown = browser.find_element(By.CSS_SELECTOR, "article.formatted")
    assert "· text" in shown.find_element(By.TAG_NAME, "h2").text
    assert shown.find_element(By.CSS_SELECTOR, "a[download]").get_attribute("download") == "note_300x200.png.ocr.txt"
    body = shown.find_element(By.TAG_NAME, "pre").get_attribute("textContent")
    assert body.strip() and "{" not in body  # the plain text `vl2 ocr -f text` prints, not a record
    assert any("reading for" in text for text in browser.execute_script("return window.seen"))
    records = _read(browser, page_url, "caption", str(SAMPLES / "objects.png"))
    assert len(records) == 1 and records[0].get_attribute("data-task") == "caption"
