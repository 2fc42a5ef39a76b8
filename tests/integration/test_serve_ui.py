"""The catalogue pages (``/ui``) in a real headless browser against the real server: Debian's
``chromium`` driven by Selenium through ``chromium-driver`` (scripts/bootstrap installs both).

An expert registered and activated over HTTP appears with its fields; the prompt-injection
manifest of test_serve_hostile.py renders as text and runs no script. Set MOSE_UI_SCREENSHOT to
a path to keep the catalogue's screenshot there (docs/img/ui-catalogue.png is made this way).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from tests.integration.test_serve_hostile import INJECTION, upload_body

WINDOW = (1360, 900)


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium; skipped (with the reason) only when it cannot be started."""
    from selenium import webdriver
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.chrome.service import Service

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.skip("Debian's chromium and chromium-driver are not installed (scripts/bootstrap installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--hide-scrollbars",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
    ):
        options.add_argument(argument)
    try:
        browser = webdriver.Chrome(options=options, service=Service(driver))
    except WebDriverException as exc:
        pytest.skip(f"chromium could not be started: {exc.msg}")
    try:
        yield browser
    finally:
        browser.quit()


def no_script_ran(browser) -> bool:
    """No script element in the page, and no alert() fired."""
    from selenium.common.exceptions import NoAlertPresentException

    try:
        _ = browser.switch_to.alert  # raises when no alert is open
    except NoAlertPresentException:
        return browser.execute_script("return document.scripts.length") == 0
    return False


def text_of(element) -> str:
    """The element's exact text content (``.text`` would normalise white space)."""
    return element.get_attribute("textContent")


@pytest.fixture
def registered_over_http(served, tmp_path):
    """An expert with the prompt-injection description, registered and activated over HTTP, some
    routing decisions and a cross-check; retired again afterwards."""
    description = INJECTION.replace("{sentinel}", str(tmp_path / "pwned"))
    body = upload_body(tmp_path, "catalogue-expert", description=description) | {"activate": True}
    with served.client() as client:
        created = client.post("/v1/experts", json=body, headers=served.admin())
        assert created.status_code == 200 and created.json()["status"] == "active", created.text
        for query in ("What are the symptoms of type 2 diabetes?", "What is the derivative of x^2 + 3x?"):
            assert client.post("/v1/route", json={"query": query}).status_code == 200
        check = client.post("/v1/crosscheck", json={"question": "What is 12 * 3?", "answer": "36", "k": 1})
        assert check.status_code == 200, check.text
        try:
            yield body["manifest"]
        finally:
            client.post("/v1/experts/catalogue-expert/retire", headers=served.admin())


def test_the_catalogue_shows_an_expert_registered_over_http_and_escapes_its_manifest(
    served, browser, registered_over_http, tmp_path
):
    from selenium.webdriver.common.by import By

    manifest = registered_over_http
    browser.get(f"{served.url}/ui")
    assert browser.title == "mose catalogue"
    row = browser.find_element(By.CSS_SELECTOR, 'tr.expert[data-name="catalogue-expert"]')
    cells = [text_of(cell).strip() for cell in row.find_elements(By.TAG_NAME, "td")]
    assert cells[1:6] == ["1.0.0", "active", "test-team", "finance", "unsigned"]
    assert text_of(row.find_element(By.CLASS_NAME, "description")) == manifest["description"]
    assert no_script_ran(browser)
    recent = text_of(browser.find_element(By.ID, "recent"))
    assert "med-expert" in recent and "math-expert" in recent
    checks = re.search(r"(\d+) of (\d+) cross-checks flagged", text_of(browser.find_element(By.ID, "live")))
    assert checks and int(checks[2]) >= 1
    shot = browser.find_element(By.TAG_NAME, "body").screenshot_as_png
    (tmp_path / "ui-catalogue.png").write_bytes(shot)
    if os.environ.get("MOSE_UI_SCREENSHOT"):
        Path(os.environ["MOSE_UI_SCREENSHOT"]).write_bytes(shot)

    row.find_element(By.LINK_TEXT, "catalogue-expert").click()
    assert browser.current_url == f"{served.url}/ui/experts/catalogue-expert/1.0.0"
    assert text_of(browser.find_element(By.ID, "description")) == manifest["description"]
    assert no_script_ran(browser)
    files = text_of(browser.find_element(By.ID, "files"))
    assert all(path in files and digest in files for path, digest in manifest["files"].items())
    examples = browser.find_elements(By.CSS_SELECTOR, "#examples li")
    assert [text_of(item) for item in examples] == manifest["example_queries"]
    audit = text_of(browser.find_element(By.ID, "audit"))
    assert "register" in audit and "activate" in audit and "catalogue-expert@1.0.0" in audit
    assert '"owner": "test-team"' in text_of(browser.find_element(By.ID, "manifest"))


def test_an_unknown_expert_page_is_a_404_that_shows_the_name_as_text(served, browser):
    from selenium.webdriver.common.by import By

    with served.client() as client:
        response = client.get("/ui/experts/%3Cimg%20src%3Dx%20onerror%3Dalert(1)%3E")
    assert response.status_code == 404 and "default-src 'none'" in response.headers["content-security-policy"]
    browser.get(f"{served.url}/ui/experts/%3Cimg%20src%3Dx%20onerror%3Dalert(1)%3E")
    assert text_of(browser.find_element(By.ID, "message")).startswith(
        "expert '<img src=x onerror=alert(1)>' is not registered"
    )
    assert not browser.find_elements(By.TAG_NAME, "img") and no_script_ran(browser)
