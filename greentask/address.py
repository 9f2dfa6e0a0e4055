"""Task-server addresses: ``HOST:PORT`` text to a ``(host, port)`` pair.

A leaf of the core (standard library only), shared by the client, which is
handed server names by its caller, and the config, whose converters read them.
"""

from __future__ import annotations


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) -> ``(host, port)``; raises ``ValueError``."""
    host, sep, port = text.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("expected HOST:PORT, such as 127.0.0.1:12345 (port 0 to 65535)")
    return host, int(port)
