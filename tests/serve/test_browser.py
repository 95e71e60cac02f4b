"""The page at / in headless Chromium: upload a picture, see its caption, search the index by text.

Needs Debian's chromium and chromium-driver (`make` installs them when CI=true or
BEIT3_INSTALL_BROWSER=1) and selenium; skipped with a message otherwise. BEIT3_SCREENSHOT=PATH
saves a screenshot of the page once everything is on it.
"""
from __future__ import annotations

import os
import shutil
import threading
import time

import pytest

from beit3.serve.app import ServeConfig, Server, create_app
from tests.serve.conftest import COLOURS, shape_picture
from tests.tiny_pipelines import free_port

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
if CHROMIUM is None or CHROMEDRIVER is None:
    pytest.skip("the browser test needs chromium and chromedriver: apt-get install -y chromium chromium-driver "
                "(or run `BEIT3_INSTALL_BROWSER=1 make`)", allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver", reason="the browser test needs selenium (requirements-dev.txt)")
uvicorn = pytest.importorskip("uvicorn", reason="the browser test needs uvicorn")

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def served(world):
    models = [world["models"][kind] for kind in ("captioning", "classification", "vqa", "zero-shot")]
    server = Server(ServeConfig(models=models, index=world["index"], device="cpu"))
    port = free_port()
    config = uvicorn.Config(create_app(server), host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    web = uvicorn.Server(config)
    thread = threading.Thread(target=web.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not web.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    web.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1200,1080", "--hide-scrollbars"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def test_upload_shows_the_caption_and_a_text_search_shows_thumbnails(served, browser, tmp_path):
    picture = tmp_path / "upload.png"
    shape_picture(COLOURS["orange"], "circle", 160).save(picture)
    browser.get(served + "/")
    wait = WebDriverWait(browser, 20)
    wait.until(lambda d: "models:" in d.find_element(By.ID, "status").text)
    assert not browser.find_element(By.ID, "caption-card").get_attribute("hidden")
    assert browser.find_element(By.ID, "classify-card").is_displayed()

    browser.find_element(By.ID, "file").send_keys(str(picture))
    caption = wait.until(lambda d: d.find_element(By.ID, "caption") if d.find_element(By.ID, "caption")
                         .get_attribute("class") == "answer" else None)
    assert caption.text.strip() and "error" not in caption.get_attribute("class")
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#labels li .value")) == 4)

    query = browser.find_element(By.ID, "query")
    query.send_keys("a blue square")
    browser.find_element(By.CSS_SELECTOR, "#search-form button[type=submit]").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#hits figure.hit")) == 7)
    loaded = ("return [...document.querySelectorAll('#hits img')].map(i => i.classList.contains('missing') ? "
              "'missing:' + i.closest('figure').querySelector('figcaption span').textContent : (i.src.startsWith('blob:') && i.complete && i.naturalWidth > 0 ? 'ok' : 'wait'))")
    wait.until(lambda d: "wait" not in d.execute_script(loaded))
    states = browser.execute_script(loaded)
    assert states.count("ok") == 6, states  # the symlink out of the folder is refused (403), shown as missing
    assert [s for s in states if s != "ok"] == ["missing:zz_link.png"]
    names = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#hits figcaption span:first-child")]
    assert "blue_square.png" in names and "zz_link.png" in names  # listed, but its thumbnail is refused
    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"
              and "/thumbnail/" not in entry["message"]]
    assert errors == []
    if os.environ.get("BEIT3_SCREENSHOT"):
        browser.execute_script("window.scrollTo(0, 0)")
        browser.save_screenshot(os.environ["BEIT3_SCREENSHOT"])
