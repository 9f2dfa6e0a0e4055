"""Converters: small pure functions that turn a setting's text into its value.

Each raises ``ValueError`` saying what it accepts; :func:`greentask.config.load`
adds the file, section and key. A converter's docstring is what
``docs/config.md`` shows in its "accepts" column.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from greentask.address import parse_address


def to_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) -> ``(host, port)``."""
    return parse_address(text)


def to_positive_int(text: str) -> int:
    """A whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError("expected a whole number of at least 1")
    return value


def to_window_bits(text: str) -> int:
    """A whole number from 9 to 15 (a deflate window of 2^N bytes)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 9 <= value <= 15:
        raise ValueError("expected a whole number from 9 to 15")
    return value


def to_count(text: str) -> int:
    """A whole number, 0 or more (0 turns the feature off)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError("expected a whole number, 0 or more (0: off)")
    return value


def to_size_or_off(text: str) -> int:
    """``0`` (off) or a byte count such as ``200MiB``."""
    if text.strip() == "0":
        return 0
    try:
        return to_size(text)
    except ValueError:
        raise ValueError("expected 0 (off) or a size such as 200MiB") from None


def to_processes(text: str) -> int:
    """``auto`` (one per CPU) or a whole number of at least 1."""
    if text.strip().lower() == "auto":
        return os.cpu_count() or 1
    try:
        return to_positive_int(text)
    except ValueError:
        raise ValueError("expected 'auto' or a whole number of at least 1") from None


#: Memory that ``max_processes = auto`` allows each worker process (bytes).
MEMORY_PER_PROCESS = 64 << 20


def auto_max_processes() -> int:
    """The most worker processes this machine takes safely: 8 per CPU, at most one per
    64 MiB of memory (and at least one)."""
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return max(1, min(8 * (os.cpu_count() or 1), memory // MEMORY_PER_PROCESS))


def to_max_processes(text: str) -> int:
    """``auto`` (8 per CPU, at most one per 64 MiB of memory) or a whole number of at least 1."""
    if text.strip().lower() == "auto":
        return auto_max_processes()
    try:
        return to_positive_int(text)
    except ValueError:
        raise ValueError("expected 'auto' or a whole number of at least 1") from None


def to_seconds(text: str) -> float:
    """A positive number of seconds."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise ValueError("expected a positive number of seconds, such as 30 or 0.5")
    return value


_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": 1024 ** 2,
               "mb": 1024 ** 2, "mib": 1024 ** 2, "g": 1024 ** 3, "gb": 1024 ** 3,
               "gib": 1024 ** 3}


def to_size(text: str) -> int:
    """A byte count: ``1048576``, ``64KiB``, ``1MiB`` or ``1GiB``."""
    stripped = text.strip().lower()
    digits = stripped.rstrip("abcdefghijklmnopqrstuvwxyz ")
    unit = stripped[len(digits):].strip()
    if not digits.isdigit() or unit not in _SIZE_UNITS or int(digits) < 1:
        raise ValueError("expected a positive size in bytes, such as 1048576, 64KiB or 1MiB")
    return int(digits) * _SIZE_UNITS[unit]


_BOOLEANS = {"1": True, "true": True, "yes": True, "on": True,
             "0": False, "false": False, "no": False, "off": False}


def to_bool(text: str) -> bool:
    """``true``/``false`` (also yes/no, on/off, 1/0)."""
    try:
        return _BOOLEANS[text.strip().lower()]
    except KeyError:
        raise ValueError("expected true or false") from None


def to_module_list(text: str) -> list[str]:
    """Comma-separated dotted module names."""
    modules = [name.strip() for name in text.split(",") if name.strip()]
    for name in modules:
        if not all(part.isidentifier() for part in name.split(".")):
            raise ValueError(f"{name!r} is not a module name; expected dotted module names "
                             "separated by commas, such as greentask.examples.basic, myapp.tasks")
    return modules


_LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def to_loglevel(text: str) -> int:
    """One of debug, info, warning, error, critical."""
    name = text.strip().lower()
    if name not in _LOG_LEVELS:
        raise ValueError(f"expected one of {', '.join(_LOG_LEVELS)}")
    return getattr(logging, name.upper())


def to_name(text: str) -> str:
    """A short name of letters, digits, ``-``, ``_`` and ``.``."""
    name = text.strip()
    if not name or not all(c.isalnum() or c in "-_." for c in name):
        raise ValueError("expected a short name of letters, digits, '-', '_' and '.'")
    return name


def to_host(text: str) -> str:
    """A host name or IP address."""
    host = text.strip()
    if not host or any(c.isspace() for c in host):
        raise ValueError("expected a host name or IP address, such as 127.0.0.1")
    return host


def to_port(text: str) -> int:
    """A TCP port, 1 to 65535."""
    if not text.strip().isdigit() or not 1 <= int(text) <= 65535:
        raise ValueError("expected a TCP port from 1 to 65535")
    return int(text)


def to_text(text: str) -> str:
    """Any non-empty text."""
    if not text.strip():
        raise ValueError("expected a non-empty value")
    return text.strip()


def to_address_list(text: str) -> list[tuple[str, int]]:
    """Comma-separated ``HOST:PORT`` addresses, at least one."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise ValueError("expected one or more HOST:PORT, separated by commas")
    return [to_address(item) for item in items]


def to_optional_address_list(text: str) -> list[tuple[str, int]]:
    """``none`` (no address), or comma-separated ``HOST:PORT`` addresses."""
    if text.strip().lower() in ("", "none"):
        return []
    return to_address_list(text)


def to_name_list(text: str) -> list[str]:
    """Comma-separated task names (may be empty)."""
    return [name.strip() for name in text.split(",") if name.strip()]


_DEFAULT_PORTS = {"http": 80, "https": 443}


def normalize_origin(text: str) -> str:
    """``scheme://host[:port]`` in the form browsers send: lower case, no default port.

    Raises ValueError for anything else (a path, no scheme, a bad port).
    """
    parts = urlsplit(text.strip())
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname or parts.path not in ("", "/") \
            or parts.query or parts.fragment or parts.username is not None:
        raise ValueError(f"{text!r} is not an origin; expected http:// or https:// and a "
                         "host, with an optional port and nothing after it, such as "
                         "https://example.org or http://127.0.0.1:8080")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{text!r} has a bad port") from None
    host = parts.hostname
    if ":" in host:
        host = f"[{host}]"  # an IPv6 address, bracketed again
    if port is None or port == _DEFAULT_PORTS[parts.scheme]:
        return f"{parts.scheme}://{host}"
    return f"{parts.scheme}://{host}:{port}"


def to_origin_list(text: str) -> list[str]:
    """Comma-separated origins such as ``https://example.org``; ``*`` for any; may be empty."""
    return [origin if origin == "*" else normalize_origin(origin)
            for origin in (item.strip() for item in text.split(",")) if origin]


def to_callable_name(text: str) -> str | None:
    """``module:function`` (``none``: not set); imported where it is used."""
    if text.strip().lower() == "none":
        return None
    module, _, function = text.strip().partition(":")
    if not function or not all(part.isidentifier() for part in module.split(".")) or \
            not all(part.isidentifier() for part in function.split(".")):
        raise ValueError(f"{text!r} is not module:function, such as myapp.auth:authorize")
    return text.strip()


class Secret(str):
    """A string that does not show itself in reprs (logs, tracebacks)."""

    def __repr__(self) -> str:
        return "Secret('***')"


def check_private(path: str, what: str) -> None:
    """Refuse a secret file that users other than its owner can read."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise ValueError(f"cannot read the {what}: {exc.strerror}") from None
    if mode & 0o077:
        raise ValueError(f"the {what} can be read by others (mode {mode & 0o777:o}); "
                         "run chmod 600 on it")


def to_secret_file(text: str) -> Secret | None:
    """``none``, or a file (mode 0600 or stricter) holding a shared token."""
    path = text.strip()
    if path.lower() in ("", "none"):
        return None
    check_private(path, "token file")
    try:
        with open(path, encoding="utf-8") as file:
            token = file.read().strip()
    except OSError as exc:
        raise ValueError(f"cannot read the token file: {exc.strerror}") from None
    if len(token) < 16:
        raise ValueError("the token file must hold a token of at least 16 characters, "
                         "such as the output of: python -c 'import secrets; "
                         "print(secrets.token_urlsafe())'")
    return Secret(token)


def to_key_file(text: str) -> str | None:
    """``none``, or a PEM private key file (mode 0600 or stricter)."""
    path = to_optional_path(text)
    if path is not None:
        check_private(path, "key file")
    return path


def to_existing_file(text: str) -> str | None:
    """``none``, or the path of a readable file."""
    path = to_optional_path(text)
    if path is not None and not os.access(path, os.R_OK):
        raise ValueError("no such file, or it cannot be read")
    return path


def to_optional_address(text: str) -> tuple[str, int] | None:
    """``none`` (off) or ``HOST:PORT``."""
    if text.strip().lower() in ("", "none"):
        return None
    try:
        return to_address(text)
    except ValueError:
        raise ValueError("expected none or HOST:PORT, such as 127.0.0.1:9101") from None


def _path_unless(text: str, sentinels: tuple[str, ...], accepted: str) -> str | None:
    """None for a sentinel word, else the (user-expanded) path."""
    path = text.strip()
    if path.lower() in sentinels:
        return None
    if not path or "\0" in path:
        raise ValueError(f"expected {accepted}")
    return os.path.expanduser(path)


def to_optional_path(text: str) -> str | None:
    """A file path, or ``none`` (or empty) for none."""
    return _path_unless(text, ("", "none"), "a file path, or none")


def to_auto_path(text: str) -> str | None:
    """``auto`` (derived from other settings) or a file path."""
    return _path_unless(text, ("auto",), "auto or a file path")


def to_logfile(text: str) -> str | None:
    """``-`` (standard error) or a file path."""
    return _path_unless(text, ("-",), "- (standard error) or a file path")


def _lookup_id(text: str, by_id: Callable[[int], Any], by_name: Callable[[str], Any],
               kind: str) -> int | None:
    name = text.strip()
    if not name:
        return None
    try:
        entry = by_id(int(name)) if name.isdigit() else by_name(name)
    except KeyError:
        raise ValueError(f"expected an existing {kind} name or id (or empty)") from None
    return entry[2]  # pw_uid / gr_gid


def to_uid(text: str) -> int | None:
    """Empty (do not change) or an existing user name or uid."""
    import pwd
    return _lookup_id(text, pwd.getpwuid, pwd.getpwnam, "user")


def to_gid(text: str) -> int | None:
    """Empty (the user's group, or unchanged) or an existing group name or gid."""
    import grp
    return _lookup_id(text, grp.getgrgid, grp.getgrnam, "group")


