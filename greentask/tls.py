"""TLS for the task port: SSL contexts for servers and clients, made from settings.

The server side is on when ``[worker] certfile`` is set; ``[worker] ca_certs``
then also asks every client for a certificate signed by it (mutual TLS). The
client side verifies the server's certificate and host name by default, as
``ssl.create_default_context`` does; there is no switch to turn that off.

``ssl.SSLContext`` is looked up when a context is made: gevent's monkey
patching replaces it in the ``ssl`` module, so a patched process gets
gevent's cooperative sockets.

OpenSSL forbids using one ``SSL`` object from two threads at once, and the
client's reader thread plus its writing callers would: :class:`SharedTLSStream`
makes every TLS call of a connection under one lock, waiting with ``poll``
outside it.
"""

from __future__ import annotations

import select
import ssl
import threading

#: Oldest protocol version either side accepts.
MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2


def server_context(certfile: str, keyfile: str | None = None,
                   ca_certs: str | None = None) -> ssl.SSLContext:
    """A context for the task port.

    ``keyfile`` None: the private key is in ``certfile``. With ``ca_certs``,
    a client without a certificate signed by one of those CAs is refused.
    Raises ``OSError`` (``ssl.SSLError`` included) when a file does not load.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MINIMUM_VERSION
    context.load_cert_chain(certfile, keyfile)
    if ca_certs is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=ca_certs)
    return context


def client_context(ca_certs: str | None = None, certfile: str | None = None,
                   keyfile: str | None = None) -> ssl.SSLContext:
    """A context that verifies the server's certificate and host name.

    ``ca_certs``: the CAs that sign the servers' certificates (None: the
    system's). ``certfile``/``keyfile``: this client's own certificate, for
    servers that require one. Raises ``OSError`` when a file does not load.
    """
    context = ssl.create_default_context(cafile=ca_certs)
    context.minimum_version = MINIMUM_VERSION
    if certfile is not None:
        context.load_cert_chain(certfile, keyfile)
    return context


class SharedTLSStream:
    """A TLS socket shared by a reader thread and writing threads, one TLS call at a time."""

    def __init__(self, sock: ssl.SSLSocket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._tls_lock = threading.Lock()
        self._readable = select.poll()
        self._readable.register(sock, select.POLLIN)
        self._writable = select.poll()
        self._writable.register(sock, select.POLLOUT)

    def recv(self, size: int) -> bytes:
        """Block until data (or the end) arrives; only the reader thread calls it."""
        while True:
            with self._tls_lock:
                try:
                    return self.sock.recv(size)
                except ssl.SSLWantReadError:
                    waiter = self._readable
                except ssl.SSLWantWriteError:
                    waiter = self._writable
            waiter.poll()

    def send(self, data: bytes | memoryview) -> int:
        """Block until some of ``data`` is sent; return how much. Callers are already
        serialised by the connection's lock."""
        while True:
            with self._tls_lock:
                try:
                    return self.sock.send(data)
                except ssl.SSLWantWriteError:
                    waiter = self._writable
                except ssl.SSLWantReadError:
                    waiter = self._readable
            waiter.poll()


#: OpenSSL's names for the alerts a server sends when it rejects the client's
#: certificate, which happens only in the handshake.
_REFUSAL_ALERTS = ("CERTIFICATE", "UNKNOWN_CA", "ACCESS_DENIED", "HANDSHAKE_FAILURE")


def is_handshake_refusal(exc: ssl.SSLError) -> bool:
    """True for an alert by which a server refuses the client's certificate."""
    reason = exc.reason or ""
    return "ALERT" in reason and any(name in reason for name in _REFUSAL_ALERTS)
