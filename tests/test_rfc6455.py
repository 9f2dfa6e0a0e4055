"""The gateway's /ws against RFC 6455 and RFC 7692, frame by frame, as a client author
would check it: hand-made frames over a plain socket to a real gunicorn."""

from __future__ import annotations

import signal
import socket
import struct
import time
from collections.abc import Iterator

import pytest

from .conftest import Daemon, Gateway, wait_until
from .ws_peer import CLOSE, CONTINUATION, PING, PONG, TEXT, Peer, close_payload

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory) -> Iterator[Daemon]:
    daemon = Daemon(tmp_path_factory.mktemp("rfc6455"), processes=1).start()
    yield daemon
    daemon.stop()


@pytest.fixture(scope="module")
def gateway(daemon, tmp_path_factory) -> Iterator[Gateway]:
    gateway = Gateway(tmp_path_factory.mktemp("rfc6455-gateway"), daemon.address,
                      allow_no_origin="true")
    yield gateway
    gateway.stop()


@pytest.fixture
def peer(gateway) -> Iterator[Peer]:
    peer = Peer(gateway.port)
    yield peer
    peer.close()


# -- 5.5: control frames ---------------------------------------------------

def test_a_ping_of_126_bytes_is_a_protocol_error_not_a_big_message(peer):
    peer.send(PING, b"p" * 126)
    assert peer.close_frame()[0] == 1002  # 5.5: control frames carry at most 125 bytes


def test_a_ping_is_answered_with_its_payload_even_inside_a_fragmented_message(peer):
    peer.send(TEXT, b"hel", fin=False)
    peer.send(PING, b"are you there")
    assert peer.frame() == (True, False, PONG, b"are you there")
    peer.send(CONTINUATION, b"lo")
    assert peer.message() == "task complete"


# -- 5.2: framing: reserved opcodes and bits ---------------------------------

@pytest.mark.parametrize("opcode", [0x3, 0x7, 0xB, 0xF])
def test_a_reserved_opcode_is_a_protocol_error(peer, opcode):
    peer.send(opcode, b"x")
    assert peer.close_frame()[0] == 1002


# -- 5.4: fragmentation ----------------------------------------------------

def test_a_message_in_many_fragments_is_joined(peer):
    peer.send(TEXT, b"h", fin=False)
    for letter in b"ell":
        peer.send(CONTINUATION, bytes([letter]), fin=False)
    peer.send(CONTINUATION, b"o")
    assert peer.message() == "task complete"


def test_a_continuation_with_nothing_to_continue_is_a_protocol_error(peer):
    peer.send(CONTINUATION, b"orphan")
    assert peer.close_frame()[0] == 1002


def test_a_new_message_inside_a_fragmented_one_is_a_protocol_error(peer):
    peer.send(TEXT, b"first", fin=False)
    peer.send(TEXT, b"second")
    assert peer.close_frame()[0] == 1002


def test_a_fragmented_control_frame_is_a_protocol_error(peer):
    peer.send(PING, b"half", fin=False)
    assert peer.close_frame()[0] == 1002  # 5.4: control frames are never fragmented


def test_fragments_that_add_up_past_max_message_are_1009(peer):
    for opcode in (TEXT, CONTINUATION, CONTINUATION):
        peer.send(opcode, b"x" * 30_000, fin=False)  # 90,000 bytes > 64 KiB
    assert peer.close_frame()[0] == 1009


def test_a_frame_that_announces_more_than_max_message_is_1009_from_its_header(peer):
    peer.sock.sendall(b"\x81\xff" + struct.pack("!Q", 2 ** 62) + b"\x00" * 4)
    assert peer.close_frame()[0] == 1009


# -- 5.6, 8.1: text is UTF-8 -----------------------------------------------

def test_utf8_text_split_inside_a_character_is_joined_whole(peer):
    text = '{"function": "echo", "args": ["héllo ✓ 🐍"], "id": 7}'.encode()
    cut = text.index("🐍".encode()) + 2  # in the middle of the 4-byte character
    peer.send(TEXT, text[:cut], fin=False)
    peer.send(CONTINUATION, text[cut:])
    assert '"result":["héllo ✓ 🐍"]' in peer.message()


def test_a_whole_message_that_is_not_utf8_is_1007(peer):
    peer.send(TEXT, b"caf\xe9")
    assert peer.close_frame()[0] == 1007


# -- 7.4: close codes ------------------------------------------------------

@pytest.mark.parametrize("code", [1004, 1005, 1006, 1014, 1015, 1016, 1100, 2000, 2999, 999,
                                  0, 5000, 65535])
def test_a_close_code_that_must_never_be_sent_is_a_protocol_error(peer, code):
    peer.send(CLOSE, close_payload(code))
    assert peer.close_frame()[0] == 1002  # 7.4.1, 7.4.2


@pytest.mark.parametrize("code", [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012,
                                  1013, 3000, 4000, 4999])
def test_a_valid_close_code_is_echoed(peer, code):
    peer.send(CLOSE, close_payload(code, b"bye"))
    assert peer.close_frame()[0] == code


def test_an_empty_close_is_answered_with_an_empty_close(peer):
    peer.send(CLOSE, b"")
    assert peer.close_frame() == (None, b"")


def test_a_close_of_one_byte_is_a_protocol_error(peer):
    peer.send(CLOSE, b"\x03")
    assert peer.close_frame()[0] == 1002  # 5.5.1


def test_a_close_reason_that_is_not_utf8_is_1007(peer):
    peer.send(CLOSE, close_payload(1000, b"\xff\xfe"))
    assert peer.close_frame()[0] == 1007  # 5.5.1, 8.1


def test_invalid_utf8_in_a_first_fragment_fails_at_once(peer):
    peer.send(TEXT, b"ok so far \xc3\x28", fin=False)  # no FIN: the message is not over
    started = time.monotonic()
    assert peer.close_frame(within=3.0)[0] == 1007  # 8.1: fail fast, not when it ends
    assert time.monotonic() - started < 3.0


# -- 5.1, 5.2, 5.3: masking and reserved bits -------------------------------

def test_an_unmasked_frame_and_a_reserved_bit_are_protocol_errors(gateway):
    for frame in (b"\x81\x05hello", b"\xc1\x85" + b"\x00" * 4 + b"hello"):  # rsv1, no deflate
        peer = Peer(gateway.port)
        try:
            peer.sock.sendall(frame)
            assert peer.close_frame()[0] == 1002
        finally:
            peer.close()


def raw_http(port: int, request: str) -> tuple[str, dict[str, str], bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request.encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in
               (line.partition(":") for line in lines[1:])}
    return lines[0], headers, body


# -- 4.2: the handshake ----------------------------------------------------

def test_handshakes_without_a_version_or_over_http_1_0_are_refused_with_a_reason(gateway):
    upgrade = "Upgrade: websocket\r\nConnection: Upgrade\r\n" \
              "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    status, headers, body = raw_http(gateway.port,
                                     f"GET /ws HTTP/1.1\r\nHost: x\r\n{upgrade}\r\n")
    assert status == "HTTP/1.1 426 Upgrade Required"
    assert headers["sec-websocket-version"] == "13"
    assert b"version 13" in body and int(headers["content-length"]) == len(body)
    status, headers, body = raw_http(gateway.port, f"GET /ws HTTP/1.0\r\nHost: x\r\n{upgrade}"
                                                   "Sec-WebSocket-Version: 13\r\n\r\n")
    assert status.endswith(" 400 Bad Request")
    assert body == b"a WebSocket handshake needs HTTP/1.1\n"
    assert "Traceback" not in gateway.log() and "TypeError" not in gateway.log()


def test_a_version_other_than_13_and_a_bad_key_are_refused(gateway):
    upgrade = "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    status, headers, _ = raw_http(gateway.port, upgrade + "Sec-WebSocket-Version: 8\r\n"
                                  "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
    assert status.endswith(" 426 Upgrade Required") and headers["sec-websocket-version"] == "13"
    status, _, body = raw_http(gateway.port, upgrade + "Sec-WebSocket-Version: 13\r\n"
                               "Sec-WebSocket-Key: c2hvcnQ=\r\n\r\n")
    assert status.endswith(" 400 Bad Request") and b"16 bytes" in body


# -- RFC 7692: permessage-deflate ------------------------------------------

def test_permessage_deflate_is_negotiated_and_both_directions_compress(gateway):
    peer = Peer(gateway.port, "permessage-deflate; client_max_window_bits")
    try:
        extension = peer.headers["sec-websocket-extensions"]
        assert extension.startswith("permessage-deflate")
        assert "client_max_window_bits=12" in extension  # the server chose the setting
        sent = peer.send_compressed('{"function": "echo", "args": ["' + "progress " * 2000 +
                                    '"], "id": 1}')
        assert sent < 200  # 20,000 bytes of JSON crossed as a few dozen
        _, rsv1, opcode, payload = peer.frame()
        assert rsv1 and opcode == TEXT and len(payload) < 500
        event = peer.inflater.decompress(payload + b"\x00\x00\xff\xff")
        assert b'"event":"complete"' in event and event.count(b"progress") == 2000
        peer.send_compressed("hello")  # the seed's plain-text message, compressed
        assert peer.message() == "task complete"
    finally:
        peer.close()


def test_a_compressed_message_that_inflates_past_max_message_is_1009(gateway):
    peer = Peer(gateway.port, "permessage-deflate")
    try:
        assert peer.send_compressed("0" * 10_000_000) < 20_000  # 10 MB as ~10 KB
        assert peer.close_frame()[0] == 1009
    finally:
        peer.close()


def test_a_deflate_offer_with_a_bad_window_is_declined_and_a_compressed_frame_then_refused(
        gateway):
    peer = Peer(gateway.port, "permessage-deflate; client_max_window_bits=30")
    try:
        assert "sec-websocket-extensions" not in peer.headers
        peer.send_compressed("hello")  # rsv1 without the extension: 5.2
        assert peer.close_frame()[0] == 1002
    finally:
        peer.close()


def test_compression_can_be_turned_off(daemon, make_gateway):
    gateway = make_gateway(daemon, allow_no_origin="true", compression="false")
    peer = Peer(gateway.port, "permessage-deflate; client_max_window_bits")
    try:
        assert "sec-websocket-extensions" not in peer.headers
        peer.send(TEXT, b"hello")
        assert peer.message() == "task complete"
    finally:
        peer.close()


# -- 7.1: closing ---------------------------------------------------------

def test_a_browser_answering_the_stop_1001_closes_cleanly(daemon, make_gateway):
    gateway = make_gateway(daemon, allow_no_origin="true")
    peer = Peer(gateway.port)
    try:
        peer.send(TEXT, b"hello")
        assert peer.message() == "task complete"
        gateway.proc.send_signal(signal.SIGTERM)  # gunicorn's graceful stop
        code, reason = peer.close_frame(within=10)
        assert (code, reason) == (1001, b"server is stopping")
        peer.send(CLOSE, close_payload(1001))  # the browser's answer
        peer.sock.settimeout(10)
        assert peer.sock.recv(100) == b""  # then the server closes the TCP connection
        wait_until(lambda: gateway.proc.poll() is not None, 30, "gunicorn to exit")
    finally:
        peer.close()
    assert "Traceback" not in gateway.log() and "TypeError" not in gateway.log()
