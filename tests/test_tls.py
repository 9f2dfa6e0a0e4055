"""TLS on the task port, with a CA and certificates the test makes (trustme)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trustme

from greentask import BadRequest, ConnectionFailed, TaskClient, tls

from .conftest import ROOT, wait_until

pytestmark = pytest.mark.timeout(60)


class Certificates:
    """A test CA, a server certificate for 127.0.0.1 and a client certificate, as files."""

    def __init__(self, directory: Path) -> None:
        self.ca = trustme.CA()
        self.ca_file = directory / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        server = self.ca.issue_cert("127.0.0.1")
        self.certfile = directory / "server.pem"
        self.keyfile = directory / "server.key"
        server.cert_chain_pems[0].write_to_path(str(self.certfile))
        server.private_key_pem.write_to_path(str(self.keyfile))
        client = self.ca.issue_cert("client@greentask.test")
        self.client_cert = directory / "client.pem"
        self.client_key = directory / "client.key"
        client.cert_chain_pems[0].write_to_path(str(self.client_cert))
        client.private_key_pem.write_to_path(str(self.client_key))
        for key in (self.keyfile, self.client_key):
            key.chmod(0o600)

    def client(self, daemon, **options) -> TaskClient:
        return TaskClient([daemon.address], connect_timeout=3,
                          ssl_context=tls.client_context(str(self.ca_file), **options))


@pytest.fixture
def certs(tmp_path):
    return Certificates(tmp_path)


@pytest.fixture
def tls_daemon(make_daemon, certs):
    return make_daemon(certfile=certs.certfile, keyfile=certs.keyfile)


def test_a_verified_client_calls_tasks_over_tls(tls_daemon, certs):
    with certs.client(tls_daemon) as client:
        assert client.call("echo", "over tls") == ["over tls"]
        handles = [client.submit("sleep", 0.05) for _ in range(200)]
        assert [handle.get(10) for handle in handles] == [0.05] * 200
        seen = []
        assert client.call("steps.count", 3, on_progress=seen.append) == 3
        assert seen == [{"step": 1}, {"step": 2}, {"step": 3}]


def test_many_threads_share_one_tls_connection(tls_daemon, certs):
    """OpenSSL objects are not thread-safe: the client must serialise them itself."""
    import threading
    client = TaskClient([tls_daemon.address], connections_per_server=1,
                        ssl_context=tls.client_context(str(certs.ca_file)))
    errors, results = [], []

    def caller(n):
        try:
            for i in range(100):
                results.append(client.call("echo", "x" * (n * 300 + i)))
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=caller, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    client.close()
    assert not errors
    assert len(results) == 1600


def test_the_client_refuses_a_server_it_cannot_verify(tls_daemon, certs, tmp_path):
    other_ca = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    client = TaskClient([tls_daemon.address], connect_timeout=3,
                        ssl_context=tls.client_context(str(other_ca)))
    with client, pytest.raises(ConnectionFailed, match="CERTIFICATE_VERIFY_FAILED") as info:
        client.call("echo", 1)
    message = str(info.value)
    assert message.startswith("the task server answered but its TLS certificate was not "
                              "accepted")
    assert "--ca-certs FILE, [gateway] ca_certs" in message
    assert "scripts/run" not in message  # it is running
    # The host name is checked too: the certificate names 127.0.0.1, not localhost.
    client = TaskClient([f"localhost:{tls_daemon.port}"], connect_timeout=3,
                        ssl_context=tls.client_context(str(certs.ca_file)))
    with client, pytest.raises(ConnectionFailed, match="match"):
        client.call("echo", 1)


def test_a_plain_client_is_told_the_port_speaks_tls(tls_daemon, connect, certs):
    conn = connect(tls_daemon.port)
    conn.send(b'{"function": "echo", "args": [1]}\n')
    reply = conn.read_json()
    assert reply["error"]["type"] == "BadRequest"
    assert "speaks TLS only" in reply["error"]["message"]
    assert "greentask call --tls or --ca-certs FILE, [gateway] tls = true" in \
        reply["error"]["message"]
    assert conn.at_eof()
    with TaskClient([tls_daemon.address], connect_timeout=2) as plain:
        with pytest.raises(BadRequest, match="speaks TLS only"):
            plain.call("echo", 1)
    # A peer that never finishes its handshake is dropped; the port still serves.
    stalled = socket.create_connection(("127.0.0.1", tls_daemon.port))
    stalled.sendall(b"\x16\x03\x01")
    with certs.client(tls_daemon) as client:
        assert client.call("echo", 2) == [2]
    stalled.close()
    wait_until(lambda: "TLS handshake failed" in tls_daemon.log(), 10, "refusal logged")


def test_tls_replies_are_not_sent_in_clear_when_a_worker_drains(tls_daemon, certs):
    """Draining shuts the read side down; the replies that follow must stay encrypted."""
    with certs.client(tls_daemon) as client:
        handles = [client.submit("sleep", 0.5) for _ in range(20)]
        time.sleep(0.1)
        tls_daemon.signal(signal.SIGHUP)
        assert [handle.get(15) for handle in handles] == [0.5] * 20
        assert client.call("echo", "after reload") == ["after reload"]


def test_an_idle_tls_peer_is_told_why_in_tls(make_daemon, certs):
    """The idle sweep shuts the read side down, then sends its error: still encrypted."""
    daemon = make_daemon(certfile=certs.certfile, keyfile=certs.keyfile, idle_timeout=1)
    context = tls.client_context(str(certs.ca_file))
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname="127.0.0.1") as conn:
        data = b""
        while not data.endswith(b"\n"):
            chunk = conn.recv(4096)
            assert chunk, f"closed after {data!r}"
            data += chunk
    reply = json.loads(data)
    assert reply["error"]["type"] == "Timeout"
    assert "idle_timeout" in reply["error"]["message"]


def test_mutual_tls_requires_a_client_certificate(make_daemon, certs):
    daemon = make_daemon(certfile=certs.certfile, keyfile=certs.keyfile,
                         ca_certs=certs.ca_file)
    # TLS 1.3 checks the client's certificate after the client's side of the
    # handshake is done, so the refusal is an alert read after the request was
    # sent; the server read none of it, so the call fails as undelivered.
    for _ in range(5):
        with certs.client(daemon) as anonymous, \
                pytest.raises(ConnectionFailed, match=r"CERTIFICATE_REQUIRED.*client certificate"
                              r".*\[gateway\] certfile and keyfile"):
            anonymous.call("echo", 1)
    # A certificate from a CA the server does not trust is refused the same way.
    stranger = trustme.CA().issue_cert("stranger@greentask.test")
    stranger_pem = certs.client_cert.with_name("stranger.pem")
    stranger.private_key_and_cert_chain_pem.write_to_path(str(stranger_pem))
    with certs.client(daemon, certfile=str(stranger_pem)) as stranger_client, \
            pytest.raises(ConnectionFailed, match=r"ALERT_(UNKNOWN_CA|BAD_CERTIFICATE)"):
        stranger_client.call("echo", 1)
    with certs.client(daemon, certfile=str(certs.client_cert),
                      keyfile=str(certs.client_key)) as client:
        assert client.call("echo", "mtls") == ["mtls"]


def test_gateway_and_cli_speak_tls(tls_daemon, certs, make_gateway):
    ws = make_gateway(tls_daemon, tls="true", ca_certs=certs.ca_file).connect()
    ws.send(json.dumps({"function": "echo", "args": ["via gateway"], "id": 1}))
    assert json.loads(ws.recv())["result"] == ["via gateway"]
    greentask = str(Path(sys.executable).with_name("greentask"))
    result = subprocess.run([greentask, "call", "echo", "[4]", "-c", str(tls_daemon.config),
                             "--ca-certs", str(certs.ca_file)],
                            cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[4]"


def _check(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "greentask.worker", "--check"], cwd=ROOT,
                          env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=30)


def test_browsers_speak_wss_to_a_gateway_that_serves_tls_itself(daemon, certs, make_gateway):
    # gunicorn's own TLS: the frames go out through gevent's TLS socket,
    # which cannot write without waiting, so every one goes through the
    # socket's outbox and its drainer.
    import websocket
    gateway = make_gateway(daemon, allow_no_origin="true", expose="echo, steps.count",
                           gunicorn_args=("--certfile", str(certs.certfile),
                                          "--keyfile", str(certs.keyfile)))
    ws = websocket.create_connection(f"wss://127.0.0.1:{gateway.port}/ws", timeout=20,
                                     suppress_origin=True,
                                     sslopt={"ca_certs": str(certs.ca_file)})
    for _ in range(5):  # ten at a time: [gateway] max_inflight_per_socket is 16
        for i in range(10):
            ws.send(f"hello {i}")
        assert [ws.recv() for _ in range(10)] == ["task complete"] * 10
    blob = "x" * 60_000
    for i in range(10):
        ws.send(json.dumps({"function": "echo", "args": [blob, i], "id": i}))
    events = [json.loads(ws.recv()) for _ in range(10)]
    assert sorted(event["result"][1] for event in events) == list(range(10))
    assert all(event["result"][0] == blob for event in events)
    ws.send(json.dumps({"function": "steps.count", "args": [3], "id": "s"}))
    kinds = [json.loads(ws.recv())["event"] for _ in range(4)]
    assert kinds == ["progress", "progress", "progress", "complete"]
    ws.close()


def test_bad_tls_files_are_refused_at_start(certs, tmp_path):
    certs.keyfile.chmod(0o644)
    result = _check({"GREENTASK_WORKER_CERTFILE": str(certs.certfile),
                     "GREENTASK_WORKER_KEYFILE": str(certs.keyfile)})
    assert result.returncode == 2
    assert "key file can be read by others (mode 644); run chmod 600" in result.stderr
    certs.keyfile.chmod(0o600)
    wrong_key = tmp_path / "wrong.key"
    trustme.CA().issue_cert("127.0.0.1").private_key_pem.write_to_path(str(wrong_key))
    wrong_key.chmod(0o600)
    result = _check({"GREENTASK_WORKER_CERTFILE": str(certs.certfile),
                     "GREENTASK_WORKER_KEYFILE": str(wrong_key)})
    assert result.returncode == 2
    assert "[worker] certfile" in result.stderr and "give a PEM certificate" in result.stderr
    result = _check({"GREENTASK_WORKER_CERTFILE": str(tmp_path / "missing.pem")})
    assert result.returncode == 2
    assert "no such file" in result.stderr
    result = _check({"GREENTASK_WORKER_CERTFILE": str(certs.certfile)})  # key not in it
    assert result.returncode == 2
    assert "PEM" in result.stderr


def test_tls_connections_leave_no_descriptor_behind(make_daemon, certs):
    daemon = make_daemon(processes=1, certfile=certs.certfile, keyfile=certs.keyfile)
    worker = daemon.children()[0]

    def descriptors() -> int:
        return len(os.listdir(f"/proc/{worker}/fd"))
    with certs.client(daemon) as client:
        client.call("echo", "warm up")
    before = descriptors()
    for i in range(50):
        with certs.client(daemon) as client:
            assert client.call("echo", i) == [i]
    wait_until(lambda: descriptors() <= before, 10, "TLS sockets to be closed")


def test_the_gateway_refuses_to_start_with_bad_tls_files(daemon, make_gateway, tmp_path):
    not_pem = tmp_path / "not-a-ca.pem"
    not_pem.write_text("this is not a certificate\n")
    gateway = make_gateway(daemon, tls="true", ca_certs=not_pem)
    wait_until(lambda: gateway.proc.poll() is not None, 30, "gunicorn to give up")
    assert gateway.proc.returncode != 0
    assert f"[gateway] ca_certs = {not_pem}" in gateway.log()
    assert "give the PEM CA certificates" in gateway.log()


@pytest.mark.skipif(os.geteuid() != 0, reason="switching user needs root")
def test_workers_switched_to_another_user_still_serve_tls(make_daemon, certs):
    """The key is readable by root only (0600): workers load it before they switch."""
    daemon = make_daemon(certfile=certs.certfile, keyfile=certs.keyfile, user="nobody",
                         group="nogroup")
    for pid in daemon.children():
        assert os.stat(f"/proc/{pid}").st_uid == 65534
    with certs.client(daemon) as client:
        assert client.call("echo", "as nobody") == ["as nobody"]


def documented_block(language: str, after: str) -> str:
    """The first ```language block of docs/operations.md after the heading ``after``."""
    text = (ROOT / "docs" / "operations.md").read_text().split(after, 1)[1]
    return text.split(f"```{language}\n", 1)[1].split("```", 1)[0]


def test_the_documented_openssl_steps_give_a_working_mutual_tls_setup(make_daemon, tmp_path):
    steps = documented_block("sh", "### Making the certificates")
    made = subprocess.run(["bash", "-euo", "pipefail", "-c", steps], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    ini = documented_block("ini", "### Making the certificates").replace(
        "tls/", f"{tmp_path}/tls/")
    worker = dict(line.split(" = ") for line in ini.split("[gateway]")[0].splitlines()
                  if " = " in line)
    daemon = make_daemon(processes=1, **worker)
    cli_config = tmp_path / "that.ini"
    cli_config.write_text(ini.replace("[worker]\n", f"[worker]\nbind = {daemon.address}\n"))
    greentask = str(Path(sys.executable).with_name("greentask"))
    called = subprocess.run([greentask, "call", "echo", "[1]", "-c", str(cli_config)],
                            capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert (called.returncode, called.stdout.strip()) == (0, "[1]"), called.stderr
    # Without the client certificate, the server refuses: mutual TLS is on.
    cli_config.write_text(cli_config.read_text().replace(
        f"certfile = {tmp_path}/tls/client.pem\n", "").replace(
        f"keyfile = {tmp_path}/tls/client.key\n", ""))
    refused = subprocess.run([greentask, "call", "echo", "[1]", "-c", str(cli_config)],
                             capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert refused.returncode == 1 and "CERTIFICATE_REQUIRED" in refused.stderr
