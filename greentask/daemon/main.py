"""The daemon's command line (``python -m greentask.worker``): flags, config, the master."""

from __future__ import annotations

import argparse
import sys

from greentask.config import Config, check_worker_tls, load
from greentask.daemon.lifecycle import EXIT_BOOT_ERROR, EXIT_CONFIG, EXIT_OK
from greentask.daemon.logs import setup_logging
from greentask.daemon.master import Master
from greentask.daemon.preload import prepare_master
from greentask.daemon.taskcode import TaskModuleError, import_task_modules
from greentask.errors import ConfigError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m greentask.worker",
        description="Run the greentask task daemon: one master and forked worker processes.")
    parser.add_argument("-c", "--config", metavar="FILE",
                        help="INI file (the shipped defaults: conf/worker.ini)")
    parser.add_argument("--bind", metavar="HOST:PORT", help="override [worker] bind")
    parser.add_argument("--processes", metavar="N", help="override [worker] processes")
    parser.add_argument("--check", action="store_true",
                        help="validate the config, import the preloaded and task modules, "
                             "then exit")
    return parser.parse_args(argv)


def load_config(args: argparse.Namespace) -> Config:
    """The config file with environment and flag overrides applied."""
    overrides = {}
    if args.bind is not None:
        overrides[("worker", "bind")] = args.bind
    if args.processes is not None:
        overrides[("worker", "processes")] = args.processes
    config = load(args.config, overrides=overrides)
    check_worker_tls(config)
    return config


def check(config: Config) -> int:
    """``--check``: import the task modules and list their tasks."""
    from greentask.registry import default_registry
    try:
        prepare_master(config.worker.preload)
        import_task_modules(config.worker.tasks)
    except TaskModuleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BOOT_ERROR
    try:
        config.check_sections()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"config OK: {config.path or '(defaults)'}; tasks: "
          f"{', '.join(default_registry.names())}")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = parse_args(argv)
    try:
        config = load_config(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.check:
        return check(config)
    try:
        setup_logging(config.worker.loglevel, config.worker.logfile)
    except OSError as exc:
        print(f"error: cannot open [worker] logfile {config.worker.logfile}: {exc.strerror}",
              file=sys.stderr)
        return EXIT_CONFIG
    return Master(config, reload_config=lambda: load_config(args)).run()
