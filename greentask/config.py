"""Settings: each declared once, then read from an INI file and the environment.

Every setting is a :class:`Setting` in :data:`SETTINGS`: its section, key,
default, converter and one line of help. That one list drives parsing,
validation, error messages, ``conf/worker.ini``'s checks and ``docs/config.md``
(``greentask config-doc`` prints it). ``GREENTASK_<SECTION>_<KEY>``
environment variables override the file. A converter is a small pure function
that turns text into a value or raises ``ValueError`` saying what it accepts;
:func:`load` adds where the text came from.
"""

from __future__ import annotations

import configparser
import logging
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from greentask import tls
from greentask.errors import ConfigError

ENV_PREFIX = "GREENTASK_"


def to_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) -> ``(host, port)``."""
    host, sep, port = text.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("expected HOST:PORT, such as 127.0.0.1:12345 (port 0 to 65535)")
    return host, int(port)


def to_positive_int(text: str) -> int:
    """A whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError("expected a whole number of at least 1")
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


def to_name_list(text: str) -> list[str]:
    """Comma-separated task names (may be empty)."""
    return [name.strip() for name in text.split(",") if name.strip()]


def to_origin_list(text: str) -> list[str]:
    """Comma-separated origins such as ``https://example.org``; ``*`` for any; empty for
    the gateway's own origin only."""
    origins = [origin.strip().rstrip("/") for origin in text.split(",") if origin.strip()]
    for origin in origins:
        if origin != "*" and "://" not in origin:
            raise ValueError(f"{origin!r} is not an origin; expected scheme://host[:port], "
                             "such as https://example.org, or *")
    return origins


class Secret(str):
    """A string that does not show itself in reprs (logs, tracebacks)."""

    def __repr__(self) -> str:
        return "Secret('***')"


def _check_private(path: str, what: str) -> None:
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
    _check_private(path, "token file")
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
        _check_private(path, "key file")
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


@dataclass(frozen=True)
class Setting:
    """One setting: where it lives, its default (as text), how to read it, what it does."""

    section: str
    key: str
    default: str
    convert: Callable[[str], Any]
    help: str

    @property
    def env_var(self) -> str:
        """The environment variable that overrides this setting."""
        return f"{ENV_PREFIX}{self.section}_{self.key}".upper()

    @property
    def accepts(self) -> str:
        """What values it takes, from the converter's docstring."""
        return (self.convert.__doc__ or "").strip()


SETTINGS: tuple[Setting, ...] = (
    Setting("worker", "name", "greentask", to_name,
            "Name shown in logs and process titles; tells several daemons apart."),
    Setting("worker", "bind", "127.0.0.1:12345", to_address,
            "Address of the task port. Loopback by default: opening it to a network "
            "lets anyone who reaches it run tasks."),
    Setting("worker", "processes", "auto", to_processes,
            "Number of forked worker processes."),
    Setting("worker", "tasks", "greentask.examples.basic, greentask.examples.mail",
            to_module_list,
            "Task modules whose @task functions the workers serve. Imported after gevent's "
            "monkey patching, by the master (see preload_tasks) or by each worker."),
    Setting("worker", "preload_tasks", "true", to_bool,
            "Import the task modules once in the master, before it forks, so the workers "
            "share their memory; a reload imports them again there (code installed in "
            "site-packages changes only on a restart). Set it to false for task modules "
            "that must not be imported before the fork, such as ones that open connections "
            "or start threads at import: each worker then imports them itself."),
    Setting("worker", "preload", "smtplib, email.message, email.policy", to_module_list,
            "Libraries the task modules use, imported once by the master before it forks so "
            "the workers share their memory. A preloaded library changes only on a restart."),
    Setting("worker", "concurrency", "1000", to_positive_int,
            "Tasks one process runs at once; when they are all busy the process stops "
            "reading requests (TCP backpressure) instead of dropping them."),
    Setting("worker", "max_line", "1MiB", to_size,
            "Longest request line; a longer one is answered with TooLarge and the "
            "connection is closed."),
    Setting("worker", "max_json_depth", "64", to_positive_int,
            "Deepest nesting of arrays and objects in a request (the request itself is "
            "level 1); a deeper one is answered with BadRequest."),
    Setting("worker", "auth_token_file", "none", to_secret_file,
            "File holding a shared token; when set, a connection must send it first "
            "({\"auth\": TOKEN}) or is answered Unauthorized and closed."),
    Setting("worker", "certfile", "none", to_existing_file,
            "PEM certificate chain of the task port; when set, the port speaks TLS only "
            "(docs/operations.md#tls)."),
    Setting("worker", "keyfile", "none", to_key_file,
            "Private key of certfile (none: it is in certfile, which must then be "
            "private too)."),
    Setting("worker", "ca_certs", "none", to_existing_file,
            "With TLS on: CA certificates that sign client certificates; when set, a "
            "client without one is refused (mutual TLS)."),
    Setting("worker", "max_connections", "10000", to_positive_int,
            "Connections one process serves at once; when full it stops accepting and "
            "the kernel queues new ones for its siblings."),
    Setting("worker", "idle_timeout", "300", to_seconds,
            "A connection with no task running that sends nothing, or half a line, for "
            "this long is closed (pipelining peers are told first)."),
    Setting("worker", "max_inflight_per_connection", "1000", to_positive_int,
            "Tasks one connection may have running; past it the server stops reading that "
            "connection until one finishes."),
    Setting("worker", "task_timeout", "300", to_seconds,
            "Longest run of one task; a request's own timeout can only shorten it."),
    Setting("worker", "graceful_timeout", "30", to_seconds,
            "On SIGTERM, how long in-flight tasks may run before their process is killed."),
    Setting("worker", "heartbeat_timeout", "30", to_seconds,
            "A worker whose event loop has not run for this long (a task that computes "
            "without yielding) is killed (SIGABRT, then SIGKILL) and replaced."),
    Setting("worker", "max_tasks_per_child", "0", to_count,
            "Replace a worker after it has run this many tasks (0: never); its replacement "
            "starts first, then it drains. Bounds slow leaks."),
    Setting("worker", "max_tasks_jitter", "0", to_count,
            "Add up to this many tasks, at random per worker, to max_tasks_per_child, so "
            "workers are not all replaced at once."),
    Setting("worker", "max_memory_per_child", "0", to_size_or_off,
            "Replace a worker whose resident memory (RSS) grows past this (0: never)."),
    Setting("worker", "pidfile", "none", to_optional_path,
            "File the master writes its pid to (removed at exit); a second master with "
            "the same pidfile refuses to start."),
    Setting("worker", "control_socket", "auto", to_auto_path,
            "Unix socket (mode 0600) that `greentask status|reload|stop|scale` talk to. "
            "auto: the pidfile's path plus .sock, or greentask-NAME-PORT.sock in the "
            "temporary directory."),
    Setting("worker", "logfile", "-", to_logfile,
            "Where the master and workers log; SIGUSR1 reopens it (for logrotate)."),
    Setting("worker", "user", "", to_uid,
            "Run the workers as this user (the master keeps its user, to bind and to "
            "supervise). Needs a master started as root."),
    Setting("worker", "group", "", to_gid,
            "Run the workers with this group (default: the user's primary group)."),
    Setting("worker", "metrics_bind", "none", to_optional_address,
            "Serve Prometheus metrics at http://HOST:PORT/metrics from the master "
            "(none: off, and tasks are not timed)."),
    Setting("worker", "loglevel", "info", to_loglevel,
            "Log level of the master and the workers."),
    Setting("worker", "debug", "false", to_bool,
            "Include tracebacks in TaskError replies (never in production: they reveal "
            "your code)."),
    Setting("gateway", "task_servers", "127.0.0.1:12345", to_address_list,
            "Task servers the WebSocket gateway calls (failover in this order)."),
    Setting("gateway", "expose", "echo, sleep, send_bulk", to_name_list,
            "Tasks a browser may call; any other name gets an error event (the task port "
            "may carry internal tasks)."),
    Setting("gateway", "default_function", "echo", to_text,
            "Task run for a message that is not JSON (the PHP original's case), with the "
            "text as its argument; it must also be in expose."),
    Setting("gateway", "max_message", "64KiB", to_size,
            "Longest WebSocket message; a longer one (or a frame that announces more) "
            "closes the socket with 1009 before it is buffered."),
    Setting("gateway", "max_inflight_per_socket", "16", to_positive_int,
            "Tasks one socket may have running; more get an Overloaded error event."),
    Setting("gateway", "allowed_origins", "", to_origin_list,
            "Origins whose pages may open /ws; empty: only pages served by the gateway "
            "itself; * for any."),
    Setting("gateway", "idle_timeout", "300", to_seconds,
            "A socket that sends nothing for this long is closed (1000)."),
    Setting("gateway", "auth_token_file", "none", to_secret_file,
            "The task servers' token file, when they require one ([worker] "
            "auth_token_file)."),
    Setting("gateway", "tls", "false", to_bool,
            "Connect to the task servers with TLS, verifying their certificate and host "
            "name."),
    Setting("gateway", "ca_certs", "none", to_existing_file,
            "CA certificates that sign the task servers' certificates (none: the "
            "system's CAs)."),
    Setting("gateway", "certfile", "none", to_existing_file,
            "Client certificate, for task servers that set [worker] ca_certs."),
    Setting("gateway", "keyfile", "none", to_key_file,
            "Private key of that client certificate (none: it is in certfile)."),
    Setting("gateway", "call_timeout", "60", to_seconds,
            "How long one task may take before the browser gets a Timeout error event."),
    Setting("smtp", "host", "127.0.0.1", to_host,
            "SMTP server the mail example tasks send through."),
    Setting("smtp", "port", "25", to_port,
            "Port of that SMTP server."),
    Setting("smtp", "sender", "greentask@localhost", to_text,
            "Envelope and From address of the mail example tasks."),
    Setting("smtp", "max_parallel", "50", to_positive_int,
            "SMTP sessions one worker process keeps open at once, shared by its mail tasks "
            "and reused between them; each sends many messages. 50 is Postfix's default "
            "limit per client."),
)

_BY_SECTION: dict[str, dict[str, Setting]] = {}
for _setting in SETTINGS:
    _BY_SECTION.setdefault(_setting.section, {})[_setting.key] = _setting


class Config(SimpleNamespace):
    """Loaded settings: ``config.worker.bind``, ``config.smtp.port``; ``.path``: the file."""

    path: str | None


def _convert(setting: Setting, text: str, origin: str) -> Any:
    try:
        return setting.convert(text)
    except ValueError as exc:
        raise ConfigError(f"{origin}: [{setting.section}] {setting.key} = {text!r}: {exc}") \
            from None


def _read_file(path: str) -> dict[str, dict[str, str]]:
    parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=("#", ";"))
    try:
        with open(path, encoding="utf-8") as file:
            parser.read_file(file)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror}; pass an "
                          "existing file with -c (the shipped one is conf/worker.ini)") from None
    except (configparser.Error, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not a valid INI file: {exc}".replace("\n", " ")) from None
    values: dict[str, dict[str, str]] = {}
    for section in parser.sections():
        known = _BY_SECTION.get(section)
        if known is None:
            raise ConfigError(f"{path}: unknown section [{section}]; the sections are "
                              f"{', '.join(f'[{name}]' for name in _BY_SECTION)}")
        for key, text in parser.items(section):
            if key not in known:
                raise ConfigError(f"{path}: [{section}] {key}: unknown key; the keys of "
                                  f"[{section}] are {', '.join(known)}")
            values.setdefault(section, {})[key] = text
    return values


def _read_environment(environ: Mapping[str, str]) -> dict[str, dict[str, str]]:
    values: dict[str, dict[str, str]] = {}
    by_env = {setting.env_var: setting for setting in SETTINGS}
    for name, text in environ.items():
        setting = by_env.get(name)
        if setting is not None:
            values.setdefault(setting.section, {})[setting.key] = text
        elif any(name.startswith(f"{ENV_PREFIX}{section.upper()}_") for section in _BY_SECTION):
            raise ConfigError(f"environment: {name}: no such setting; the variables are "
                              f"{', '.join(sorted(by_env))}")
    return values


def load(path: str | None = None, environ: Mapping[str, str] | None = None,
         overrides: Mapping[tuple[str, str], str] | None = None) -> Config:
    """Read settings from defaults, then ``path``, then the environment, then ``overrides``.

    ``overrides`` maps ``(section, key)`` to text, for command-line flags.
    Raises :class:`ConfigError` naming the file, section, key, value and
    what is accepted.
    """
    defaults: dict[str, dict[str, str]] = {}
    for setting in SETTINGS:
        defaults.setdefault(setting.section, {})[setting.key] = setting.default
    layers = [("defaults", defaults)]
    if path is not None:
        layers.append((path, _read_file(path)))
    layers.append(("environment", _read_environment(os.environ if environ is None else environ)))
    if overrides:
        flags: dict[str, dict[str, str]] = {}
        for (section, key), text in overrides.items():
            flags.setdefault(section, {})[key] = text
        layers.append(("command line", flags))
    sections = {section: SimpleNamespace() for section in _BY_SECTION}
    for origin, values in layers:
        for section, keys in values.items():
            for key, text in keys.items():
                setting = _BY_SECTION[section][key]
                setattr(sections[section], key, _convert(setting, text, origin))
    return Config(path=path, **sections)


def check_worker_tls(config: Config) -> None:
    """Load ``[worker]``'s certificate and key once, so a bad pair stops the daemon at start
    (or refuses a reload) instead of failing every connection. Raises :class:`ConfigError`.
    """
    worker = config.worker
    try:
        if worker.certfile is not None:
            if worker.keyfile is None:
                _check_private(worker.certfile, "certfile (it holds the private key)")
            tls.server_context(worker.certfile, worker.keyfile, worker.ca_certs)
        elif worker.keyfile is not None or worker.ca_certs is not None:
            raise ValueError("keyfile and ca_certs need certfile (TLS is on when certfile "
                             "is set)")
    except (OSError, ValueError) as exc:
        raise ConfigError(f"[worker] certfile = {worker.certfile}, keyfile = "
                          f"{worker.keyfile}, ca_certs = {worker.ca_certs}: {exc}; give a PEM "
                          "certificate chain and its private key") from None


def check_gateway_tls(config: Config) -> None:
    """Load ``[gateway]``'s CA and client certificate once, when TLS is on, so the gateway
    refuses to start with bad files. Raises :class:`ConfigError`.
    """
    gateway = config.gateway
    if not gateway.tls:
        return
    try:
        if gateway.certfile is not None and gateway.keyfile is None:
            _check_private(gateway.certfile, "certfile (it holds the private key)")
        tls.client_context(gateway.ca_certs, gateway.certfile, gateway.keyfile)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"[gateway] ca_certs = {gateway.ca_certs}, certfile = "
                          f"{gateway.certfile}, keyfile = {gateway.keyfile}: {exc}; give the "
                          "PEM CA certificates that signed the task servers' certificates "
                          "(and, if they require one, a client certificate and its key)"
                          ) from None


_current: Config | None = None


def control_socket_path(config: Config) -> str:
    """Where the master's control socket is, for this config."""
    worker = config.worker
    if worker.control_socket:
        return worker.control_socket
    if worker.pidfile:
        return worker.pidfile + ".sock"
    port = worker.bind[1]
    return os.path.join(tempfile.gettempdir(), f"greentask-{worker.name}-{port}.sock")


def current() -> Config:
    """The config of this process: the one the worker loaded, else defaults and environment."""
    global _current
    if _current is None:
        _current = load()
    return _current


def set_current(config: Config) -> None:
    """Make ``config`` what :func:`current` returns (the worker does this at start-up)."""
    global _current
    _current = config


def render_markdown() -> str:
    """``docs/config.md``, generated from :data:`SETTINGS`."""
    lines = ["# Configuration", "",
             "<!-- Generated by `greentask config-doc`; edit greentask/config.py. -->", "",
             "greentask reads an INI file (`-c conf/worker.ini`). Each setting can be "
             "overridden by an environment variable `GREENTASK_<SECTION>_<KEY>`; the "
             "worker's `--bind` and `--processes` flags override both. A wrong value stops "
             "the program with exit status 2 and a one-line error naming the file, "
             "section, key, value and what is accepted.", ""]
    for section, settings in _BY_SECTION.items():
        lines += [f"## [{section}]", "", "| key | default | accepts | what it does |",
                  "| --- | --- | --- | --- |"]
        for s in settings.values():
            lines.append(f"| `{s.key}` | `{s.default}` | {s.accepts} | {s.help} "
                         f"(env `{s.env_var}`) |")
        lines.append("")
    return "\n".join(lines)
