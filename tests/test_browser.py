"""A real browser (headless Chromium) uses the demo page against the whole stack."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from .conftest import ROOT, free_port

pytestmark = pytest.mark.timeout(120)

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ARTIFACTS = ROOT / "test-artifacts"


@pytest.fixture
def browser(tmp_path):
    assert shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER), \
        "install Debian's chromium and chromium-driver (scripts/test does, as root)"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
                 "--window-size=900,700"):
        options.add_argument(flag)
    # The DevTools events, for what the network saw (the WebSocket handshake).
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    service = Service(CHROMEDRIVER)
    driver = webdriver.Chrome(service=service, options=options)
    try:
        yield driver
    finally:
        driver.quit()
        if service.process is not None and service.process.poll() is None:
            service.process.kill()


def start_send_bulk(browser, gateway, recipients: int):
    """Open the demo page, run send_bulk for ``recipients``; the wait and the task's row."""
    browser.get(f"http://127.0.0.1:{gateway.port}/")
    wait = WebDriverWait(browser, 30)
    wait.until(lambda d: d.find_element(By.ID, "state").text == "connected")
    count = browser.find_element(By.ID, "count")
    count.clear()
    count.send_keys(str(recipients))
    browser.find_element(By.ID, "bulk").click()
    return wait, wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#tasks .task"))


def websocket_extensions(browser) -> list[str]:
    """What the gateway answered in Sec-WebSocket-Extensions, for each WebSocket the
    page opened (from Chromium's DevTools network events)."""
    found = []
    for entry in browser.get_log("performance"):
        event = json.loads(entry["message"])["message"]
        if event.get("method") == "Network.webSocketHandshakeResponseReceived":
            headers = {name.lower(): value for name, value in
                       event["params"]["response"]["headers"].items()}
            found.append(headers.get("sec-websocket-extensions", ""))
    return found


def outcome(row) -> str:
    return row.find_element(By.CLASS_NAME, "outcome").text


def test_demo_page_sends_1000_e_mails_and_shows_them_arrive(make_daemon, make_gateway,
                                                            mail_catcher, browser):
    daemon = make_daemon(smtp={"port": mail_catcher.smtp_port})
    gateway = make_gateway(daemon, mail_catcher=mail_catcher.http_address)
    wait, row = start_send_bulk(browser, gateway, 1000)
    wait.until(lambda d: outcome(row) == "sent 1,000 of 1,000")
    # Chromium offered permessage-deflate and the gateway took it: the progress
    # stream above crossed compressed.
    assert [value.split(";")[0] for value in websocket_extensions(browser)] == \
        ["permessage-deflate"]
    bar = row.find_element(By.TAG_NAME, "progress")
    assert float(bar.get_attribute("value")) == float(bar.get_attribute("max")) == 1
    assert row.find_element(By.CLASS_NAME, "badge").text == "done"
    assert row.find_element(By.CLASS_NAME, "failed-text").text == "0 failed"
    assert row.find_element(By.CLASS_NAME, "elapsed").text.endswith(" s")
    assert not row.find_elements(By.CSS_SELECTOR, "button.cancel")  # gone once final
    assert mail_catcher.messages()["count"] == 1000  # exactly one message each
    # The mailbox panel polls the mail catcher through the gateway.
    wait.until(lambda d: d.find_element(By.ID, "mail-count").text == "1,000")
    recent = browser.find_elements(By.CSS_SELECTOR, "#mail-recent li")
    assert len(recent) == 5 and all(item.text.endswith("@example.org: Hello")
                                    for item in recent)
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "gateway-send_bulk.png"))
    assert (ARTIFACTS / "gateway-send_bulk.png").stat().st_size > 1000
    # At a phone's width the page fits: nothing scrolls sideways.
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": 375, "height": 800, "deviceScaleFactor": 1, "mobile": True})
    wait.until(lambda d: d.execute_script("return window.innerWidth") == 375)
    assert browser.execute_script(
        "return document.documentElement.scrollWidth") <= 375
    browser.save_screenshot(str(ARTIFACTS / "gateway-phone.png"))


def test_the_cancel_button_stops_a_send_bulk_and_the_page_says_how_far_it_got(
        make_daemon, make_gateway, browser):
    from .smtp_sink import Inbox
    inbox = Inbox(delay=0.02)  # slow enough that 1,000 messages take a while
    smtp = Controller(inbox, hostname="127.0.0.1", port=free_port())
    smtp.start()
    try:
        daemon = make_daemon(smtp={"port": smtp.port, "max_parallel": 4})
        gateway = make_gateway(daemon)
        wait, row = start_send_bulk(browser, gateway, 1000)
        wait.until(lambda d: "of 1,000 done" in row.find_element(
            By.CLASS_NAME, "progress-text").text)
        row.find_element(By.CSS_SELECTOR, "button.cancel").click()
        wait.until(lambda d: outcome(row).startswith("cancelled after "))
        assert outcome(row) == f"cancelled after {len(inbox.recipients()):,} of 1,000"
        assert row.find_element(By.CLASS_NAME, "badge").text == "cancelled"
        assert not row.find_elements(By.CSS_SELECTOR, "button.cancel")  # gone once final
        ARTIFACTS.mkdir(exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "gateway-cancel.png"))
    finally:
        smtp.stop()


def test_with_the_mail_catcher_stopped_the_page_the_cli_and_the_log_say_it_failed(
        make_daemon, make_gateway, mail_catcher, browser):
    daemon = make_daemon(smtp={"port": mail_catcher.smtp_port})
    gateway = make_gateway(daemon, mail_catcher=mail_catcher.http_address)
    mail_catcher.stop()
    wait, row = start_send_bulk(browser, gateway, 200)
    error = wait.until(lambda d: row.find_element(By.CSS_SELECTOR, ".outcome.error"))
    assert error.text == "the task failed (TaskError)"  # no operator advice in the page
    assert "176, 0, 32" in error.value_of_css_property("color")
    assert row.find_element(By.CLASS_NAME, "badge").text == "failed"
    wait.until(lambda d: "cannot be read" in d.find_element(By.ID, "mail-state").text)
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "gateway-error.png"))
    cli = subprocess.run([str(Path(sys.executable).with_name("greentask")), "call", "--server",
                          daemon.address, "send_bulk", '[["a@example.org"], "Hi", "Hello."]'],
                         capture_output=True, text=True, timeout=60)
    assert cli.returncode == 1
    assert "cannot reach the SMTP server" in cli.stderr
    assert "WARNING" in daemon.log() and "cannot reach the SMTP server" in daemon.log()
