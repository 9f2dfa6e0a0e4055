"""The gateway's /dashboard in a real browser, against daemons' GET /status."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import ujson
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from greentask import TaskClient
from greentask.errors import Cancelled, RemoteError

from .conftest import ROOT, free_port, wait_until
from .test_browser import ARTIFACTS, browser  # noqa: F401 (a fixture)

pytestmark = pytest.mark.timeout(120)


def status_json(daemon) -> dict:
    result = subprocess.run([str(Path(sys.executable).with_name("greentask")), "status", "-c",
                             str(daemon.config), "--json"], capture_output=True, text=True,
                            timeout=30, check=True)
    return ujson.loads(result.stdout)


@contextlib.contextmanager
def echo_calls(client: TaskClient) -> Iterator[None]:
    """Calls from a thread for as long as the block runs (at most 100,000)."""
    stop = threading.Event()

    def calls() -> None:
        for i in range(100_000):
            if stop.is_set():
                return
            client.call("echo", i)
    caller = threading.Thread(target=calls)
    caller.start()
    try:
        yield
    finally:
        stop.set()
        caller.join(30)


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
    with TaskClient([daemon.address]) as client, echo_calls(client):
        wait.until(lambda d: d.execute_script("return window.dashboardPolls()") >= polls + 3)
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


SLEEP_ROW = 'tr.task[data-function="sleep"]'


def latency_series(driver) -> dict:
    return driver.execute_script("return window.dashboardLatency()")


def test_the_dashboard_cancels_a_running_task_and_shows_failures_and_latency(
        make_daemon, make_gateway, browser):  # noqa: F811
    metrics = free_port()
    daemon = make_daemon(metrics_bind=f"127.0.0.1:{metrics}")
    gateway = make_gateway(daemon, status_servers=f"127.0.0.1:{metrics}")
    with TaskClient([daemon.address]) as client:
        sleeping = client.submit("sleep", 30)
        with pytest.raises(RemoteError, match="dashboard boom"):
            client.call("fail", "dashboard boom")
        browser.get(f"http://127.0.0.1:{gateway.port}/dashboard")
        wait = WebDriverWait(browser, 30)
        # The running sleep(30), with its age, then Cancel ends it for its caller.
        row = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, SLEEP_ROW))
        assert "sleep" in row.text and daemon.address not in row.text  # the status port's row
        failure = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "tr.failure"))
        assert "fail" in failure.text and "RuntimeError" in failure.text \
            and "dashboard boom" in failure.text
        # Calls while polls come in: the latency chart gets echo's p50 and p99 (two
        # values at least: a line on the screenshot).
        with echo_calls(client):
            wait.until(lambda d: sum(v is not None for v in latency_series(d).get("echo p99", []))
                       >= 2)
        assert any(v is not None for v in latency_series(browser)["echo p50"])
        ARTIFACTS.mkdir(exist_ok=True)
        browser.set_window_size(1280, 2000)  # the whole page: charts, workers, tasks, failures
        browser.save_screenshot(str(ARTIFACTS / "gateway-dashboard-tasks.png"))
        browser.find_element(By.CSS_SELECTOR, f"{SLEEP_ROW} button.cancel").click()
        with pytest.raises(Cancelled, match="cancelled from the dashboard"):
            sleeping.get(20)
        wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, SLEEP_ROW))
    status = status_json(daemon)
    assert status["running"] == [] and status["functions"]["sleep"]["cancelled"] == 1
    assert status["failures"][0]["message"] == "dashboard boom"
    assert "cancelled from the dashboard" in daemon.log()


def post(url: str, body: object, **headers: str) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=ujson.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, ujson.loads(reply.read())
    except urllib.error.HTTPError as refused:
        body = refused.read()
        return refused.code, ujson.loads(body) if body.startswith(b"{") else {"text": body}


def test_a_cancel_needs_the_page_origin_a_listed_server_and_the_daemon_token(
        tmp_path, make_daemon, make_gateway):
    token_file = tmp_path / "token"
    token_file.write_text("dashboard-secret\n")
    token_file.chmod(0o600)
    metrics = free_port()
    daemon = make_daemon(metrics_bind=f"127.0.0.1:{metrics}", auth_token_file=token_file)
    with TaskClient([daemon.address], auth_token="dashboard-secret") as client:
        sleeping = client.submit("sleep", 30)
        task = wait_until(lambda: status_json(daemon)["running"], 15, "the running sleep")[0]
        cancel = {"pid": task["pid"], "key": task["key"]}
        # The daemon's own endpoint: the task port's token, a worker that exists.
        daemon_cancel = f"http://127.0.0.1:{metrics}/cancel"
        assert post(daemon_cancel, cancel)[0] == 401
        assert post(daemon_cancel, cancel, Authorization="Bearer wrong")[0] == 401
        code, reply = post(daemon_cancel, {"pid": 1, "key": task["key"]},
                           Authorization="Bearer dashboard-secret")
        assert code == 400 and "no worker has pid 1" in reply["error"]
        code, reply = post(daemon_cancel, ["not", "an", "object"],
                           Authorization="Bearer dashboard-secret")
        assert code == 400 and "pid" in reply["error"]
        # The gateway: only a page of its own origin, only to a listed server.
        gateway = make_gateway(daemon, status_servers=f"127.0.0.1:{metrics}",
                               auth_token_file=token_file)
        page = f"http://127.0.0.1:{gateway.port}"
        relay = f"{page}/dashboard/cancel"
        body = {"server": f"127.0.0.1:{metrics}", **cancel}
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(relay, timeout=10)
        assert info.value.code == 405
        assert post(relay, body)[0] == 403  # no Origin: not a page of this gateway
        assert post(relay, body, Origin="http://evil.example")[0] == 403
        code, reply = post(relay, {**body, "server": f"127.0.0.1:{daemon.port}"}, Origin=page)
        assert code == 400 and "not one of this dashboard's servers" in reply["error"]
        assert not sleeping.done()
        code, reply = post(relay, body, Origin=page)  # the gateway adds the token
        assert code == 202 and reply["ok"], reply
        with pytest.raises(Cancelled, match="cancelled from the dashboard"):
            sleeping.get(20)
