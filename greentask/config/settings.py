"""Every setting, declared once: section, key, default, converter and one line of help.

That one table drives parsing, validation, error messages and ``docs/config.md``
(``greentask config-doc`` prints it, :func:`render_markdown`). It holds
greentask's own sections, ``[worker]`` and ``[gateway]``; a task module
declares a section of its own with :func:`declare_section` (the mail
example's ``[smtp]``), read from the same file and environment once the
module is imported (:meth:`greentask.config.Config.check_sections`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from greentask.config.converters import (
    to_address,
    to_address_list,
    to_auto_path,
    to_bool,
    to_callable_name,
    to_count,
    to_existing_file,
    to_gid,
    to_key_file,
    to_logfile,
    to_loglevel,
    to_max_processes,
    to_module_list,
    to_name,
    to_name_list,
    to_optional_address,
    to_optional_address_list,
    to_optional_path,
    to_origin_list,
    to_positive_int,
    to_processes,
    to_seconds,
    to_secret_file,
    to_size,
    to_size_or_off,
    to_text,
    to_uid,
    to_window_bits,
)
from greentask.protocol import DEFAULT_MAX_DEPTH, DEFAULT_MAX_LINE, DEFAULT_MAX_QUEUED

#: Prefix of the environment variables that override settings.
ENV_PREFIX = "GREENTASK_"


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
        # One line whatever the docstring's layout (Python 3.13 dedents
        # docstrings, 3.11 does not): the text goes into a table cell.
        return " ".join((self.convert.__doc__ or "").split())


SETTINGS: tuple[Setting, ...] = (
    Setting("worker", "name", "greentask", to_name,
            "Name shown in logs and process titles; tells several daemons apart."),
    Setting("worker", "bind", "127.0.0.1:12345", to_address,
            "Address of the task port. Loopback by default: opening it to a network "
            "lets anyone who reaches it run tasks."),
    Setting("worker", "processes", "auto", to_processes,
            "Number of forked worker processes."),
    Setting("worker", "max_processes", "auto", to_max_processes,
            "Most worker processes `processes`, `greentask scale` and SIGTTIN may ask for; "
            "past what the machine's CPUs and memory serve, more processes only make the "
            "master slow to answer."),
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
    Setting("worker", "max_line", f"{DEFAULT_MAX_LINE >> 20}MiB", to_size,
            "Longest request line; a longer one is answered with TooLarge and the "
            "connection is closed."),
    Setting("worker", "max_json_depth", str(DEFAULT_MAX_DEPTH), to_positive_int,
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
            "Connections one process serves at once. When full, a new client still gets in: "
            "the oldest idle connection is closed to make room (a pipelining peer is told "
            "first); only when none is idle does the process stop accepting."),
    Setting("worker", "max_connections_per_peer", "0", to_count,
            "Connections one process serves from one peer address (0: no limit; behind a "
            "load balancer every connection has its address). Past it a connection is told "
            "to close and its requests are refused, not run."),
    Setting("worker", "hello_timeout", "5", to_seconds,
            "With auth_token_file set: how long a new connection has to send its token "
            "before it is answered Unauthorized and closed."),
    Setting("worker", "idle_timeout", "300", to_seconds,
            "A connection with no task running that sends nothing, or half a line, for "
            "this long is closed (pipelining peers are told first)."),
    Setting("worker", "max_queued_replies", f"{DEFAULT_MAX_QUEUED >> 20}MiB", to_size,
            "Reply bytes queued for one connection whose peer does not read them: past a "
            "quarter of it the server stops reading that connection, past all of it the "
            "peer is cut off and its replies dropped. Bounds the memory of one connection."),
    Setting("worker", "max_inflight_per_connection", "1000", to_positive_int,
            "Tasks one connection may have running; past it the server stops reading that "
            "connection until one finishes."),
    Setting("worker", "task_timeout", "300", to_seconds,
            "Longest run of one task; a request's own timeout can only shorten it."),
    Setting("worker", "cancel_grace", "5", to_seconds,
            "After a task is cancelled (a cancel line, or its connection ended with "
            "cancel_on_disconnect), how long it may take to clean up and end before it is "
            "killed."),
    Setting("worker", "graceful_timeout", "30", to_seconds,
            "On SIGTERM, how long in-flight tasks may run before their process is killed."),
    Setting("worker", "closing_grace", "2", to_seconds,
            "During a stop or reload, how long a peer told {\"closing\": true} with "
            "nothing in flight may keep its connection before the worker closes it."),
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
            "Serve Prometheus metrics at http://HOST:PORT/metrics, greentask status --json "
            "at /status and the dashboard's Cancel at POST /cancel (with the task port's "
            "token), from the master (none: off, and tasks are not timed)."),
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
            "Longest WebSocket message, after decompression; a longer one closes the "
            "socket with 1009 as soon as its bytes pass the limit, before more is held."),
    Setting("gateway", "compression", "true", to_bool,
            "Accept permessage-deflate (RFC 7692) when the browser offers it: progress "
            "streams and large results cross the wire compressed."),
    Setting("gateway", "compression_window_bits", "12", to_window_bits,
            "The deflate window of the gateway's compressor (and of the browser's, when it "
            "lets the server choose): 2^N bytes. Each socket that compressed a message "
            "keeps about 2^(N+3) bytes for it (32 KiB at 12), plus the browser's window "
            "for inflating (up to 32 KiB)."),
    Setting("gateway", "max_inflight_per_socket", "16", to_positive_int,
            "Tasks one socket may have running; more get an Overloaded error event."),
    Setting("gateway", "cancel_on_disconnect", "false", to_bool,
            "Cancel a browser's running tasks when its socket closes; otherwise they "
            "finish and their results are dropped."),
    Setting("gateway", "max_inflight", "256", to_positive_int,
            "Tasks one gateway process may have running over all its sockets; more get an "
            "Overloaded error event. Keep it under the task servers' concurrency, so "
            "browsers cannot take every task slot."),
    Setting("gateway", "allowed_origins", "http://127.0.0.1:8080, http://localhost:8080",
            to_origin_list,
            "Origins whose pages may open /ws, as browsers send them (scheme://host[:port]): "
            "the gateway's public origin, and any other site allowed to use it; * for any. "
            "The Host header is never trusted."),
    Setting("gateway", "allow_no_origin", "false", to_bool,
            "Admit handshakes without an Origin header (programs, not browsers)."),
    Setting("gateway", "authorize", "greentask.gateway.admission:loopback_only",
            to_callable_name,
            "module:function called with the WSGI environ of each handshake; it returns "
            "who the caller is, or raises greentask.gateway.admission.Refuse(401 or 403, "
            "reason). The default admits only clients on this host (docs/gateway.md)."),
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
    Setting("gateway", "status_servers", "none", to_optional_address_list,
            "The task daemons' [worker] metrics_bind addresses, HOST:PORT, comma-separated, "
            "whose GET /status the dashboard at /dashboard shows (none: the dashboard says "
            "how to turn it on)."),
    Setting("gateway", "mail_catcher", "127.0.0.1:8025", to_optional_address,
            "HTTP address of the development mail catcher (python -m "
            "greentask.examples.mailcatcher) whose messages the demo page shows at /mailbox; "
            "none: no mailbox on the page."),
)

#: The settings by section, then key, in declaration order.
BY_SECTION: dict[str, dict[str, Setting]] = {}
for _setting in SETTINGS:
    BY_SECTION.setdefault(_setting.section, {})[_setting.key] = _setting

#: The sections task modules declared, by name: (the module, its settings by key).
DECLARED: dict[str, tuple[str, dict[str, Setting]]] = {}


def declare_section(owner: str, *settings: Setting) -> str:
    """Declare a task module's own section (``owner``: the module's name); return its name.

    Call it at import. Then ``current().SECTION.KEY`` reads it, from the
    config file and ``GREENTASK_SECTION_KEY`` like greentask's own, and the
    daemon checks its values at start. Declaring the same section again (a
    reload imports the module again) replaces it.
    """
    sections = {setting.section for setting in settings}
    if len(sections) != 1:
        raise ValueError(f"declare one section at a time, not {sorted(sections) or 'none'}")
    section = sections.pop()
    if section in BY_SECTION:
        raise ValueError(f"[{section}] is greentask's own section")
    other = DECLARED.get(section)
    if other is not None and other[0] != owner:
        raise ValueError(f"[{section}] is already declared by {other[0]}")
    DECLARED[section] = (owner, {setting.key: setting for setting in settings})
    return section


def section_names() -> str:
    """Every section known now, for error messages."""
    names = [f"[{section}]" for section in BY_SECTION]
    names += [f"[{section}] (declared by {owner})" for section, (owner, _) in DECLARED.items()]
    return ", ".join(names)




def render_markdown() -> str:
    """``docs/config.md``, generated from :data:`SETTINGS` and the sections that the
    default ``[worker] tasks`` (greentask's examples) declare."""
    for module in to_module_list(BY_SECTION["worker"]["tasks"].default):
        importlib.import_module(module)
    lines = ["# Configuration", "",
             "<!-- Generated by `greentask config-doc`; edit greentask/config/settings.py. -->", "",
             "greentask reads an INI file (`-c conf/worker.ini`). Each setting can be "
             "overridden by an environment variable `GREENTASK_<SECTION>_<KEY>`; the "
             "worker's `--bind` and `--processes` flags override both. A wrong value stops "
             "the program with exit status 2 and a one-line error naming the file, "
             "section, key, value and what is accepted.", ""]
    sections = [(section, "", settings) for section, settings in BY_SECTION.items()]
    sections += [(section, f"Declared by the task module `{owner}`, read once it is "
                  "imported.", settings) for section, (owner, settings) in DECLARED.items()
                 if owner.startswith("greentask.")]  # not a test's or an application's
    for section, origin, settings in sections:
        lines += [f"## [{section}]", ""] + ([origin, ""] if origin else []) + [
            "| key | default | accepts | what it does |", "| --- | --- | --- | --- |"]
        for s in settings.values():
            lines.append(f"| `{s.key}` | `{s.default}` | {s.accepts} | {s.help} "
                         f"(env `{s.env_var}`) |")
        lines.append("")
    return "\n".join(lines)
