"""TLS for the task port: SSL contexts for servers and clients, made from settings.

The server side is on when ``[worker] certfile`` is set; ``[worker] ca_certs``
then also asks every client for a certificate signed by it (mutual TLS). The
client side verifies the server's certificate and host name by default, as
``ssl.create_default_context`` does; there is no switch to turn that off.

``ssl.SSLContext`` is looked up when a context is made: gevent's monkey
patching replaces it in the ``ssl`` module, so a patched process gets
gevent's cooperative sockets.
"""

from __future__ import annotations

import ssl

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
