"""The gateway's /dashboard in a real browser, against daemons' GET /status."""

from __future__ import annotations

import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import ujson
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from greentask import TaskClient

from .conftest import ROOT, free_port
from .test_browser import ARTIFACTS, browser  # noqa: F401 (a fixture)

pytestmark = pytest.mark.timeout(120)


def status_json(daemon) -> dict:
    result = subprocess.run([str(Path(sys.executable).with_name("greentask")), "status", "-c",
                             str(daemon.config), "--json"], capture_output=True, text=True,
                            timeout=30, check=True)
    return ujson.loads(result.stdout)


def test_the_dashboard_shows_what_greentask_status_shows(make_daemon, make_gateway, browser):  # noqa: F811
    metrics = free_port()
    daemon = make_daemon(metrics_bind=f"127.0.0.1:{metrics}")
    silent = f"127.0.0.1:{free_port()}"  # a status server that does not answer
    gateway = make_gateway(daemon, status_servers=f"127.0.0.1:{metrics}, {silent}")
    with TaskClient([daemon.address]) as client:
        for i in range(25):
            client.call("echo", i)
    expected = status_json(daemon)
    browser.get(f"http://127.0.0.1:{gateway.port}/dashboard")
    wait = WebDriverWait(browser, 30)

    def shown() -> list[tuple[str, str]]:
        rows = browser.find_elements(By.CSS_SELECTOR, ".server tr.worker")
        return sorted((row.find_elements(By.TAG_NAME, "td")[0].text,
                       row.find_elements(By.TAG_NAME, "td")[6].text) for row in rows)

    # Within one refresh: the same workers (pids) and the same done counts.
    want = sorted((str(w["pid"]), str(w["done"])) for w in expected["workers"])
    wait.until(lambda d: shown() == want)
    assert sum(int(done) for _, done in shown()) >= 25
    broken = wait.until(lambda d: d.find_element(
        By.CSS_SELECTOR, f'.server[data-address="{silent}"] .error'))
    assert "does not answer" in broken.text
    # Calls while three more polls come in: the chart draws their rate.
    polls = browser.execute_script("return window.dashboardPolls()")
    stop = threading.Event()
    with TaskClient([daemon.address]) as client:
        def calls() -> None:
            for i in range(100_000):
                if stop.is_set():
                    return
                client.call("echo", i)
        caller = threading.Thread(target=calls)
        caller.start()
        try:
            wait.until(lambda d: d.execute_script("return window.dashboardPolls()") >= polls + 3)
        finally:
            stop.set()
            caller.join(30)
    assert browser.find_elements(By.CSS_SELECTOR, "#chart .uplot")  # the chart drew
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "gateway-dashboard.png"))


def test_without_status_servers_the_dashboard_says_how_to_turn_it_on(daemon, make_gateway,
                                                                     browser):  # noqa: F811
    gateway = make_gateway(daemon)
    browser.get(f"http://127.0.0.1:{gateway.port}/dashboard")
    hint = WebDriverWait(browser, 30).until(lambda d: d.find_element(By.CSS_SELECTOR, ".hint"))
    WebDriverWait(browser, 30).until(lambda d: "metrics_bind" in hint.text)
    assert "[gateway] status_servers" in hint.text


def test_the_dashboard_asks_the_authorize_hook(daemon, make_gateway):
    gateway = make_gateway(daemon, authorize="tests.gateway_auth:authorize")
    for path in ("/dashboard", "/dashboard/status"):
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(f"http://127.0.0.1:{gateway.port}{path}", timeout=10)
        assert info.value.code == 401
    signed_in = urllib.request.Request(f"http://127.0.0.1:{gateway.port}/dashboard/status",
                                       headers={"Cookie": "sessionid=good-session"})
    with urllib.request.urlopen(signed_in, timeout=10) as reply:
        assert ujson.loads(reply.read()) == {"servers": []}
    for asset in ("/static/uplot.js", "/static/uplot.css"):
        with urllib.request.urlopen(f"http://127.0.0.1:{gateway.port}{asset}", timeout=10) as r:
            assert len(r.read()) > 1000
    assert (ROOT / "greentask" / "gateway" / "static" / "uplot" / "LICENSE").exists()
