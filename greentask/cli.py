"""The ``greentask`` command: call a task, control a running daemon, print the config doc."""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Any

import ujson

from greentask.client import TaskClient
from greentask.config import control_socket_path, load, render_markdown
from greentask.daemon.control import ControlError, Unanswered, format_status, send_command
from greentask.daemon.outcomes import wait_for_outcome
from greentask.errors import Cancelled, ConfigError, GreentaskError
from greentask.gateway.upstream import client_context

#: Exit status of a call whose task failed, or of a master that could not be reached.
EXIT_TASK_FAILED = 1
#: Exit status of a wrong command line or config.
EXIT_USAGE = 2
#: Exit status of a call cancelled with Ctrl-C (128 + SIGINT, as shells use).
EXIT_INTERRUPTED = 130
#: How long Ctrl-C waits for the cancelled task's last word (seconds).
CANCEL_WAIT = 30.0


def _dumps(value: Any) -> str:
    return ujson.dumps(value, ensure_ascii=False, escape_forward_slashes=False)


def _at_least_one(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number, at least 1")
    return int(text)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="greentask", description="greentask command line")
    commands = parser.add_subparsers(dest="command", required=True)
    call = commands.add_parser(
        "call", help="run a task and print its result",
        description="Run FUNCTION on a task server; print progress lines (with --progress) "
                    "and the result as JSON. Exit 0 on success, 1 when the task failed.")
    call.add_argument("function", help="task name, such as echo or send_bulk")
    call.add_argument("args", nargs="?", default=None,
                      help='arguments as JSON: an object for keywords ({"to": "a@b"}) or an '
                           'array for positions ([1, 2])')
    call.add_argument("--server", metavar="HOST:PORT", action="append",
                      help="task server (repeat for failover); default: [worker] bind of -c")
    call.add_argument("-c", "--config", metavar="FILE", help="read the server from this INI")
    call.add_argument("--tls", action="store_true",
                      help="use TLS (on anyway when the -c config sets [worker] certfile or "
                           "[gateway] tls)")
    call.add_argument("--ca-certs", metavar="FILE",
                      help="CA certificates that sign the server's (implies --tls; default: "
                           "[gateway] ca_certs, else the system's)")
    call.add_argument("--progress", action="store_true", help="print progress lines")
    call.add_argument("--timeout", type=float, default=60.0, help="seconds to wait (60)")
    commands.add_parser("config-doc", help="print docs/config.md, made from the settings")
    for name, text in (
            ("status", "show the master and each worker: state, counters, tasks/s"),
            ("reload", "reload config and task code with zero loss (like SIGHUP); wait until "
                       "the new generation serves or the reload fails"),
            ("stop", "stop gracefully (like SIGTERM); wait until the master has exited"),
            ("scale", "set the number of worker processes; wait until that many serve")):
        control = commands.add_parser(name, help=text, description=text + (
            "" if name == "status" else ". Exit 0 once done, 1 if it failed or is not done "
                                        "within --timeout."))
        if name == "scale":
            control.add_argument("processes", type=_at_least_one, help="worker processes wanted")
        if name == "status":
            control.add_argument("--json", action="store_true", help="print JSON")
        else:
            control.add_argument("--timeout", type=float, default=60.0,
                                 help="seconds to wait for the outcome (60)")
        control.add_argument("-c", "--config", metavar="FILE",
                             help="the daemon's INI file (finds its control socket)")
        control.add_argument("--bind", metavar="HOST:PORT",
                             help="the --bind the daemon was started with, if any")
        control.add_argument("--socket", metavar="PATH", help="the control socket itself")
    return parser


def _parse_task_args(text: str | None) -> list[Any] | dict[str, Any]:
    """The task's arguments from the command line; a wrong one says what to type instead."""
    if text is None:
        return []
    try:
        args = ujson.loads(text)
    except ValueError as exc:
        raise ValueError(f"the arguments {text!r} are not JSON ({exc}); "
                         f"{_suggest_args(text)}") from None
    if not isinstance(args, (list, dict)):
        raise ValueError(f"the arguments must be a JSON array (positional) or object "
                         f"(keywords), not a bare value: for one argument, type "
                         f"'[{_dumps(args)}]'")
    return args


def _suggest_args(text: str) -> str:
    """What to type for arguments that are not JSON: Python literals or a bare word."""
    import ast
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        if text.lstrip()[:1] in ("[", "{"):
            return "it starts like JSON: check its brackets, commas and double quotes"
        value = text  # a bare word: one string argument, say
    else:
        if isinstance(value, tuple):
            value = list(value)
        try:
            as_json = _dumps(value if isinstance(value, (list, dict)) else [value])
        except (TypeError, OverflowError):
            as_json = None
        if as_json is not None:
            return f"that is Python, not JSON; in JSON it is '{as_json}'"
    return (f"for one string argument type '{_dumps([value])}'; for keywords an object "
            """such as '{"to": "a@example.com"}', quoted for the shell""")


def call(args: argparse.Namespace) -> int:
    """``greentask call``."""
    try:
        task_args = _parse_task_args(args.args)
        config = load(args.config)
        servers = args.server
        if not servers:
            host, port = config.worker.bind
            servers = [f"{host}:{port}"]
        context = None
        if args.tls or args.ca_certs or config.worker.certfile or config.gateway.tls:
            context = client_context(config.gateway, args.ca_certs)
        client = TaskClient(servers, timeout=args.timeout,
                            auth_token=config.worker.auth_token_file, ssl_context=context)
    except (ValueError, ConfigError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    on_progress = (lambda value: print(_dumps({"progress": value}), flush=True)) \
        if args.progress else None
    with client:
        # A Ctrl-C while the request is being sent is held until there is a
        # handle to cancel, then raised in the try below.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            handle = client.apply(args.function, task_args, on_progress=on_progress)
        except BaseException:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
            raise
        try:
            try:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
                result = handle.get()
            except KeyboardInterrupt:
                # Ctrl-C: the task must not go on running on the server.
                print("cancelling the task ...", file=sys.stderr, flush=True)
                handle.cancel()
                result = handle.get(timeout=CANCEL_WAIT)
        except Cancelled as exc:
            print(f"cancelled: {exc.message}", file=sys.stderr)
            if exc.result is not None:
                print(_dumps(exc.result))
            return EXIT_INTERRUPTED
        except GreentaskError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_TASK_FAILED
    print(_dumps(result))
    return 0


def control(args: argparse.Namespace) -> int:
    """``greentask status|reload|stop|scale``: talk to the master's control socket."""
    overrides = {} if args.bind is None else {("worker", "bind"): args.bind}
    try:
        path = args.socket or control_socket_path(load(args.config, overrides=overrides))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    status = None
    try:
        if args.command in ("status", "reload"):
            # A reload is told from earlier ones by its number in the status.
            status = send_command(path, "status")
        if args.command == "status":
            assert status is not None
            if args.json:
                print(_dumps({key: value for key, value in status.items() if key != "ok"}))
            else:
                print(format_status(status))
            return 0
        processes = args.processes if args.command == "scale" else None
        arguments = {} if processes is None else {"processes": processes}
        try:
            send_command(path, args.command, **arguments)
        except Unanswered as exc:
            # It may well have been carried out: the outcome below says.
            print(f"note: {exc}; it may have been carried out, waiting for the outcome",
                  file=sys.stderr, flush=True)
    except ControlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_TASK_FAILED
    outcome = wait_for_outcome(path, args.command, status, args.timeout, processes)
    print(outcome.message if outcome.ok else f"error: {outcome.message}",
          file=sys.stdout if outcome.ok else sys.stderr)
    return 0 if outcome.ok else EXIT_TASK_FAILED


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``greentask`` console script."""
    args = _build_parser().parse_args(argv)
    if args.command == "config-doc":
        sys.stdout.write(render_markdown())
        return 0
    if args.command == "call":
        return call(args)
    return control(args)


if __name__ == "__main__":
    sys.exit(main())
