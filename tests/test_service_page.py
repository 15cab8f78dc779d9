"""The page at "/" and Swagger UI at "/docs" in a real browser: Debian's chromium, headless, driven by
selenium. A real Fashion-MNIST test image goes through the file input, a shape is drawn on the
canvas, and the label and bars that appear are checked against the service's own answer. The
screenshots are kept as artifacts in artifacts/page/ (page.png, page_drawing.png; the README's
docs/img/page.png is refreshed from it with PAGE_SCREENSHOT=1).
Needs chromium + chromium-driver: `make browser` (part of `make test`)."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from service_helpers import REPO, build_model, serve

pytestmark = pytest.mark.timeout(300)
SHOTS = REPO / "artifacts" / "page"

CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1100,900"]


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.fail("chromium / chromedriver missing: run `make browser` (or apt-get install -y chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in CHROME_FLAGS + [f"--user-data-dir={tmp_path_factory.mktemp('chrome-profile')}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def page_server(model_dir, tmp_path_factory):
    with serve(Path(model_dir) / "model.onnx", tmp_path_factory.mktemp("page") / "serve.log", SERVICE_WORKERS="1") as proc:
        proc.wait_ready(120)
        yield proc


def wait_for_result(driver, timeout: float = 30.0) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout).until(
        lambda d: d.find_element("id", "result").get_attribute("data-state") in ("done", "error"))
    state = driver.find_element("id", "result").get_attribute("data-state")
    assert state == "done", driver.find_element("id", "error").text


def shown_bars(driver) -> list[tuple[str, float]]:
    return [(b.get_attribute("data-label"), float(b.get_attribute("data-p")))
            for b in driver.find_elements("css selector", "#bars .bar")]


def test_upload_a_real_test_image_then_draw(browser, page_server, test_images, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.support.ui import WebDriverWait

    driver = browser
    driver.get(page_server.url + "/")
    WebDriverWait(driver, 30).until(lambda d: d.find_element("id", "title").text == "fashion-mnist")
    assert "NCHW" in driver.find_element("id", "model-line").text

    # A real test image, enlarged as a person's file would be, through the file input.
    images, labels = test_images
    png = tmp_path / "ankle_boot.png"
    Image.fromarray(np.round(images[0, 0] * 255).astype(np.uint8)).resize((112, 112), Image.Resampling.BICUBIC).save(png)
    expected = httpx.post(page_server.url + "/classify", files={"image": ("x.png", png.read_bytes(), "image/png")}).json()
    driver.find_element("id", "file").send_keys(str(png))
    wait_for_result(driver)
    assert driver.find_element("id", "label").text == expected["label"]
    bars = shown_bars(driver)
    assert len(bars) == 10 and bars[0][0] == expected["label"]
    assert [p for _, p in bars] == sorted((p for _, p in bars), reverse=True)
    assert abs(sum(p for _, p in bars) - 1.0) < 1e-4
    np.testing.assert_allclose(sorted(p for _, p in bars), sorted(expected["probabilities"]), atol=1e-6)
    top = driver.find_element("css selector", "#bars .bar.top .fill")
    assert float(top.value_of_css_property("width").removesuffix("px")) > 0
    SHOTS.mkdir(parents=True, exist_ok=True)
    shot = SHOTS / "page.png"
    shot.unlink(missing_ok=True)
    driver.save_screenshot(str(shot))
    assert Image.open(shot).size[0] > 500
    if os.environ.get("PAGE_SCREENSHOT"):
        (REPO / "docs" / "img").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, REPO / "docs" / "img" / "page.png")

    # Draw a trouser-like shape (two long legs) on the canvas and classify the drawing.
    driver.find_element("id", "clear").click()
    canvas = driver.find_element("id", "canvas")
    for x in (-40, 40):
        ActionChains(driver).move_to_element_with_offset(canvas, x, -110).click_and_hold() \
            .move_by_offset(0, 110).move_by_offset(0, 110).release().perform()
    ActionChains(driver).move_to_element_with_offset(canvas, -40, -110).click_and_hold().move_by_offset(80, 0).release().perform()
    driver.execute_script("document.getElementById('result').dataset.state = 'idle'")
    driver.find_element("id", "classify-drawing").click()
    wait_for_result(driver)
    drawn = driver.find_element("id", "label").text
    assert drawn in httpx.get(page_server.url + "/metadata").json()["labels"]
    assert len(shown_bars(driver)) == 10
    driver.save_screenshot(str(SHOTS / "page_drawing.png"))


def test_swagger_ui_at_docs_shows_every_route(browser, page_server):
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(page_server.url + "/docs")
    WebDriverWait(browser, 30).until(lambda d: len(d.find_elements("css selector", ".opblock")) > 10)
    shown = {e.text for e in browser.find_elements("css selector", ".opblock-summary-path")}
    assert {"/predict", "/classify", "/metadata", "/v2/models/{name}/infer"} <= shown
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, "\n".join(e["message"] for e in errors)


def test_page_of_a_model_that_takes_no_pictures(browser, tmp_path_factory):
    from selenium.webdriver.support.ui import WebDriverWait

    root = tmp_path_factory.mktemp("features-page")
    with serve(build_model(root, "features"), root / "serve.log", SERVICE_WORKERS="1") as proc:
        proc.wait_ready(120)
        browser.get(proc.url + "/")
        WebDriverWait(browser, 30).until(lambda d: d.find_element("id", "title").text == "tabular")
        note = browser.find_element("id", "notice")
        assert note.is_displayed() and "/predict" in note.text
        assert not browser.find_element("id", "canvas").is_displayed()


def test_page_of_a_model_that_is_not_a_classifier(browser, tmp_path_factory, tmp_path):
    """A detection-style model (two outputs): the page says what it is up front, and its classify
    action shows /classify's own 422 message, which names the outputs and the routes that serve them."""
    from selenium.webdriver.support.ui import WebDriverWait

    root = tmp_path_factory.mktemp("detector-page")
    with serve(build_model(root, "detector"), root / "serve.log", SERVICE_WORKERS="1") as proc:
        proc.wait_ready(120)
        refusal = httpx.post(proc.url + "/classify", files={"image": ("x.png", b"", "image/png")})
        assert refusal.status_code == 422
        message = refusal.json()["error"]
        browser.get(proc.url + "/")
        WebDriverWait(browser, 30).until(lambda d: d.find_element("id", "title").text == "detector")
        assert "not a classifier: outputs boxes [N,4,256], scores [N,3,256]" in browser.find_element("id", "model-line").text
        assert browser.find_element("id", "label").text == "Not a classifier"
        notice = browser.find_element("id", "notice")
        assert notice.is_displayed() and message in notice.text
        png = tmp_path / "photo.png"
        Image.new("RGB", (64, 48), (200, 40, 40)).save(png)
        browser.find_element("id", "file").send_keys(str(png))
        WebDriverWait(browser, 30).until(lambda d: d.find_element("id", "result").get_attribute("data-state") == "error")
        assert browser.find_element("id", "error").text == f"422: {message}"
        assert not browser.find_elements("css selector", "#bars .bar")
        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE" and "/classify" not in e["message"]]
        assert not errors, "\n".join(e["message"] for e in errors)
        SHOTS.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(SHOTS / "page_not_a_classifier.png"))
