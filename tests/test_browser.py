"""A real browser (headless Chromium) uses the demo page against the whole stack."""

from __future__ import annotations

import shutil

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


def test_demo_page_runs_send_bulk_and_shows_the_messages_arrive(make_daemon, make_gateway,
                                                                  mail_catcher, browser):
    daemon = make_daemon(smtp={"port": mail_catcher.smtp_port})
    gateway = make_gateway(daemon, mail_catcher=mail_catcher.http_address)
    wait, row = start_send_bulk(browser, gateway, 200)
    wait.until(lambda d: row.find_element(By.TAG_NAME, "span").text == "sent 200 of 200")
    bar = row.find_element(By.TAG_NAME, "progress")
    assert float(bar.get_attribute("value")) == float(bar.get_attribute("max"))
    # The mailbox panel polls the mail catcher through the gateway.
    wait.until(lambda d: d.find_element(By.ID, "mail-count").text == "200")
    recent = browser.find_elements(By.CSS_SELECTOR, "#mail-recent li")
    assert len(recent) == 5 and all(item.text.endswith("@example.org: Hello")
                                    for item in recent)
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "gateway-send_bulk.png"))
    assert (ARTIFACTS / "gateway-send_bulk.png").stat().st_size > 1000


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
        wait.until(lambda d: " / 1000" in row.find_element(By.TAG_NAME, "span").text)
        row.find_element(By.CSS_SELECTOR, "button.cancel").click()
        wait.until(lambda d: row.find_element(By.TAG_NAME, "span").text.startswith(
            "cancelled after "))
        text = row.find_element(By.TAG_NAME, "span").text
        assert text == f"cancelled after {len(inbox.recipients())} of 1000", text
        assert not row.find_elements(By.CSS_SELECTOR, "button.cancel")  # gone once final
        ARTIFACTS.mkdir(exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "gateway-cancel.png"))
    finally:
        smtp.stop()


def test_a_task_error_is_shown_as_an_error(make_daemon, make_gateway, browser):
    daemon = make_daemon(smtp={"port": free_port()})  # no SMTP server there
    gateway = make_gateway(daemon)
    wait, row = start_send_bulk(browser, gateway, 200)
    span = wait.until(lambda d: row.find_element(By.CSS_SELECTOR, "span.error"))
    assert span.text == "the task failed (TaskError)"  # no operator advice in the page
    assert "176, 0, 32" in span.value_of_css_property("color")
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "gateway-error.png"))
