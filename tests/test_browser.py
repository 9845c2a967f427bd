"""SPEC §3 "The subscribe page" in a real browser: Debian's headless Chromium, driven through chromedriver,
opens the page from a running `serve` with no console error and no request to another origin, and a click
on a client's link hands that site no Referer (the page's URL is a secret)."""

import contextlib
import json
import tempfile
import time
import urllib.request
from urllib.parse import urlsplit

import pytest

from conftest import auth
from test_deploy import required
from test_hardening import fetch, running_server

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402

# Chromium's own traffic off (this machine has no network, and the test must see only the page's requests);
# every host name but the loopback address resolves to nothing, so a click on a client link goes nowhere.
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-default-apps", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                  "--window-size=390,844")


@contextlib.contextmanager
def chromium(scripts=True):
    """A headless Chromium at phone width, its console and network logged; always quit."""
    binary, driver_path = required("chromium"), required("chromedriver")
    with tempfile.TemporaryDirectory() as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = binary
        for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
            options.add_argument(flag)
        if not scripts:
            options.add_experimental_option("prefs", {"profile.managed_default_content_settings.javascript": 2})
        options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
        browser = webdriver.Chrome(service=Service(driver_path), options=options)
        try:
            browser.set_page_load_timeout(30)
            yield browser
        finally:
            browser.quit()


def requests_sent(browser):
    """(url, request headers) of every request the browser sent since the last call."""
    sent = []
    for entry in browser.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            request = message["params"]["request"]
            if message["params"].get("documentURL", "").startswith(("chrome:", "about:")):
                continue                                                    # the browser's own new-tab page
            sent.append((request["url"], {name.lower(): value for name, value in request["headers"].items()}))
    return sent


def console_errors(browser):
    return [entry for entry in browser.get_log("browser") if entry["level"] in ("SEVERE", "ERROR")]


@pytest.fixture
def page(data, db_path):
    """A running `serve` and the subscribe page of a feed created over its API: (page URL, create response)."""
    user_id, token = data.user("owner")
    group_id, _ = data.group(user_id, name="Family <& friends>")
    data.slot(user_id, title="Dinner", groups=[group_id])
    with running_server(db_path) as (base, _):
        request_body = json.dumps({"group": data.run("SELECT uuid FROM slot_groups").fetchone()[0],
                                   "label": "Phone \"quoted\" <label>"}).encode()
        request = urllib.request.Request(base + "/v1/feeds", data=request_body, method="POST",
                                         headers={**auth(token), "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            created = json.loads(response.read())
        yield created["page_url"], created


def wait_for(condition, timeout=10):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_the_page_opens_without_console_errors_or_other_origins_and_clicks_send_no_referer(page):
    page_url, created = page
    origin = "{0.scheme}://{0.netloc}".format(urlsplit(page_url))
    with chromium() as browser:
        browser.get(page_url)
        assert browser.find_element(By.TAG_NAME, "h1").text == "Family <& friends>"
        assert browser.find_element(By.ID, "copy").is_displayed()            # the script ran (its hash allowed it)
        assert browser.find_element(By.ID, "url").get_attribute("value") == created["url"]
        browser.find_element(By.ID, "copy").click()
        assert console_errors(browser) == []                                # no CSP violation, no failed load
        sent = requests_sent(browser)
        assert sent and sent[0][0] == page_url
        assert [url for url, _ in sent if not url.startswith(origin + "/")] == []
        # the page fits a phone: nothing wider than the screen
        assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
        for link in ("google", "outlook"):
            href = browser.find_element(By.ID, link).get_attribute("href")
            browser.find_element(By.ID, link).click()
            clicked = []
            wait_for(lambda: any(url == href for url, _ in clicked.extend(requests_sent(browser)) or clicked))
            headers = next(headers for url, headers in clicked if url == href)
            assert "referer" not in headers, headers                       # the secret page URL stays here
            browser.get(page_url)
        download = browser.find_element(By.ID, "download")
        assert download.get_attribute("href") == created["url"]


def test_the_page_works_with_scripts_turned_off(page):
    page_url, created = page
    with chromium(scripts=False) as browser:
        browser.get(page_url)
        assert not browser.find_element(By.ID, "copy").is_displayed()        # nothing that needs a script shows
        assert browser.find_element(By.ID, "apple").get_attribute("href") == created["webcal_url"]
        assert browser.find_element(By.ID, "url").get_attribute("value") == created["url"]
        assert console_errors(browser) == []


def test_the_404_page_in_the_browser(page):
    page_url, _ = page
    with chromium() as browser:
        browser.get(page_url[:-5] + "XXXXX")                                 # a secret that is no feed's
        assert browser.find_element(By.TAG_NAME, "h1").text == "Calendar link not found"
        errors = console_errors(browser)
        assert all("404" in entry["message"] for entry in errors)            # the status itself, nothing blocked
        assert status_of(page_url[:-5] + "XXXXX") == 404


def status_of(url):
    return fetch(url, method="GET")[0]
