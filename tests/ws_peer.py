"""A WebSocket client made by hand, for tests that need frames of their choosing."""

from __future__ import annotations

import base64
import os
import socket
import struct
import zlib

TEXT, BINARY, CLOSE, PING, PONG, CONTINUATION = 0x1, 0x2, 0x8, 0x9, 0xA, 0x0


class Peer:
    """A WebSocket client made by hand: the handshake, then frames of our choosing."""

    def __init__(self, port: int, extensions: str | None = None,
                 receive_buffer: int | None = None) -> None:
        self.sock = socket.socket()
        if receive_buffer is not None:  # before connecting, so the window stays small
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self.sock.settimeout(10)
        self.sock.connect(("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        lines = ["GET /ws HTTP/1.1", f"Host: 127.0.0.1:{port}", "Upgrade: websocket",
                 "Connection: Upgrade", f"Sec-WebSocket-Key: {key}",
                 "Sec-WebSocket-Version: 13"]
        if extensions:
            lines.append(f"Sec-WebSocket-Extensions: {extensions}")
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        self.buffer = b""
        head = self._until(b"\r\n\r\n").decode()
        assert head.startswith("HTTP/1.1 101"), head
        self.headers = {name.lower(): value.strip() for name, _, value in
                        (line.partition(":") for line in head.split("\r\n")[1:])}
        self.inflater = zlib.decompressobj(-15)

    def _until(self, end: bytes) -> bytes:
        while end not in self.buffer:
            data = self.sock.recv(65536)
            assert data, "the server closed the connection"
            self.buffer += data
        head, self.buffer = self.buffer.split(end, 1)
        return head

    def _exactly(self, count: int) -> bytes:
        while len(self.buffer) < count:
            data = self.sock.recv(65536)
            assert data, "the server closed the connection"
            self.buffer += data
        data, self.buffer = self.buffer[:count], self.buffer[count:]
        return data

    def send(self, opcode: int, payload: bytes, fin: bool = True, rsv1: bool = False) -> None:
        first = (0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode
        length = len(payload)
        if length < 126:
            head = struct.pack("!BB", first, 0x80 | length)
        elif length < 65536:
            head = struct.pack("!BBH", first, 0x80 | 126, length)
        else:
            head = struct.pack("!BBQ", first, 0x80 | 127, length)
        mask = os.urandom(4)
        self.sock.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def send_compressed(self, text: str) -> int:
        compressor = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -15)
        data = compressor.compress(text.encode()) + compressor.flush(zlib.Z_SYNC_FLUSH)
        self.send(TEXT, data[:-4], rsv1=True)
        return len(data) - 4

    def frame(self) -> tuple[bool, bool, int, bytes]:
        """The next frame: fin, rsv1, opcode, payload."""
        first, second = self._exactly(2)
        length = second & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", self._exactly(2))
        elif length == 127:
            (length,) = struct.unpack("!Q", self._exactly(8))
        assert not second & 0x80, "server frames are never masked"
        return bool(first & 0x80), bool(first & 0x40), first & 0x0F, self._exactly(length)

    def message(self) -> str:
        fin, rsv1, opcode, payload = self.frame()
        assert fin and opcode == TEXT, (opcode, payload)
        if rsv1:
            payload = self.inflater.decompress(payload + b"\x00\x00\xff\xff")
        return payload.decode()

    def close_frame(self, within: float = 5.0) -> tuple[int | None, bytes]:
        """Skip to the server's close frame: (code, reason); code None for an empty one."""
        self.sock.settimeout(within)
        while True:
            _, _, opcode, payload = self.frame()
            if opcode == CLOSE:
                if not payload:
                    return None, b""
                return struct.unpack("!H", payload[:2])[0], payload[2:]

    def close(self) -> None:
        self.sock.close()


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return struct.pack("!H", code) + reason
