"""Loading: defaults, then the INI file, then the environment, then flags.

``GREENTASK_<SECTION>_<KEY>`` environment variables override the file. Every
error names where the text came from (file, ``environment``, ``command
line``), the section, the key, the value and what is accepted.

greentask's own sections are converted at load. Any other section, and any
variable that names no setting of greentask's, is kept as text: it may
belong to a task module (:func:`~greentask.config.settings.declare_section`),
which is imported later. ``config.SECTION`` converts a declared section on
first use; :meth:`Config.check_sections`, run by the daemon once the task
modules are imported, converts them all and refuses what nobody declared.
"""

from __future__ import annotations

import configparser
import os
import tempfile
from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

from greentask import tls
from greentask.config.converters import check_private
from greentask.config.settings import (
    BY_SECTION,
    DECLARED,
    ENV_PREFIX,
    SETTINGS,
    Setting,
    section_names,
)
from greentask.errors import ConfigError

#: The origin of the settings read from GREENTASK_* variables.
ENVIRONMENT = "environment"


class Config(SimpleNamespace):
    """Loaded settings: ``config.worker.bind``, ``config.smtp.port``; ``.path``: the file."""

    path: str | None
    #: Text of the sections that are not greentask's: section -> key -> (text, origin).
    other_sections: dict[str, dict[str, tuple[str, str]]]
    #: GREENTASK_* variables that name no setting of greentask's own.
    other_environment: dict[str, str]

    def __getattr__(self, name: str) -> Any:
        # Only for an attribute not set yet: a section a task module declared.
        if name.startswith("_") or name not in DECLARED:
            raise AttributeError(f"no section [{name}] was declared; the sections are "
                                 f"{section_names()}")
        section = self._convert_declared(name)
        setattr(self, name, section)
        return section

    def _convert_declared(self, name: str) -> SimpleNamespace:
        _, settings = DECLARED[name]
        values = {key: (setting.default, "defaults") for key, setting in settings.items()}
        for key, (text, origin) in self.other_sections.get(name, {}).items():
            if key not in settings:
                raise ConfigError(f"{origin}: [{name}] {key}: unknown key; the keys of "
                                  f"[{name}] are {', '.join(settings)}")
            values[key] = (text, origin)
        for key, setting in settings.items():
            if setting.env_var in self.other_environment:
                values[key] = (self.other_environment[setting.env_var], ENVIRONMENT)
        return SimpleNamespace(**{key: _convert(settings[key], text, origin)
                                  for key, (text, origin) in values.items()})

    def check_sections(self) -> None:
        """Convert every declared section, and refuse a section or a GREENTASK_* variable
        that no one declared (once the task modules are imported). Raises ConfigError."""
        for name in DECLARED:
            getattr(self, name)
        for name, keys in self.other_sections.items():
            if name not in DECLARED:
                origin = next(iter(keys.values()), ("", self.path or "the config"))[1]
                raise ConfigError(f"{origin}: unknown section [{name}]; the sections are "
                                  f"{section_names()} (a task module declares its own, "
                                  "once it is in [worker] tasks)")
        variables = {setting.env_var for _, settings in DECLARED.values()
                     for setting in settings.values()}
        for variable in self.other_environment:
            if variable not in variables and any(variable.startswith(
                    f"{ENV_PREFIX}{name.upper()}_") for name in DECLARED):
                raise ConfigError(f"environment: {variable}: no such setting; the variables "
                                  f"are {', '.join(sorted(variables))}")


def _convert(setting: Setting, text: str, origin: str) -> Any:
    try:
        return setting.convert(text)
    except ValueError as exc:
        if origin == ENVIRONMENT:
            # The variable is what the operator set, and must change.
            raise ConfigError(f"environment variable {setting.env_var}={text!r} "
                              f"([{setting.section}] {setting.key}): {exc}") from None
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
        known = BY_SECTION.get(section)
        if known is None:  # a task module's, or nobody's: Config.check_sections says
            values[section] = dict(parser.items(section))
            continue
        for key, text in parser.items(section):
            if key not in known:
                raise ConfigError(f"{path}: [{section}] {key}: unknown key; the keys of "
                                  f"[{section}] are {', '.join(known)}")
            values.setdefault(section, {})[key] = text
    return values


def _read_environment(environ: Mapping[str, str]
                      ) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """greentask's settings from the environment, and the other GREENTASK_* variables."""
    values: dict[str, dict[str, str]] = {}
    others: dict[str, str] = {}
    by_env = {setting.env_var: setting for setting in SETTINGS}
    for name, text in environ.items():
        setting = by_env.get(name)
        if setting is not None:
            values.setdefault(setting.section, {})[setting.key] = text
        elif any(name.startswith(f"{ENV_PREFIX}{section.upper()}_") for section in BY_SECTION):
            raise ConfigError(f"environment: {name}: no such setting; the variables are "
                              f"{', '.join(sorted(by_env))}")
        elif name.startswith(ENV_PREFIX):
            others[name] = text
    return values, others


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
    other_sections: dict[str, dict[str, tuple[str, str]]] = {}
    if path is not None:
        values = _read_file(path)
        for section in [name for name in values if name not in BY_SECTION]:
            other_sections[section] = {key: (text, path)
                                       for key, text in values.pop(section).items()}
        layers.append((path, values))
    from_environment, other_environment = _read_environment(
        os.environ if environ is None else environ)
    layers.append((ENVIRONMENT, from_environment))
    if overrides:
        flags: dict[str, dict[str, str]] = {}
        for (section, key), text in overrides.items():
            flags.setdefault(section, {})[key] = text
        layers.append(("command line", flags))
    sections = {section: SimpleNamespace() for section in BY_SECTION}
    for origin, values in layers:
        for section, keys in values.items():
            for key, text in keys.items():
                setting = BY_SECTION[section][key]
                setattr(sections[section], key, _convert(setting, text, origin))
    worker = sections["worker"]
    if worker.processes > worker.max_processes:
        raise ConfigError(f"[worker] processes = {worker.processes} is more than [worker] "
                          f"max_processes = {worker.max_processes}: lower processes, or raise "
                          "max_processes if this machine can run that many")
    return Config(path=path, other_sections=other_sections,
                  other_environment=other_environment, **sections)


def check_worker_tls(config: Config) -> None:
    """Load ``[worker]``'s certificate and key once, so a bad pair stops the daemon at start
    (or refuses a reload) instead of failing every connection. Raises :class:`ConfigError`.
    """
    worker = config.worker
    try:
        if worker.certfile is not None:
            if worker.keyfile is None:
                check_private(worker.certfile, "certfile (it holds the private key)")
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
            check_private(gateway.certfile, "certfile (it holds the private key)")
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


