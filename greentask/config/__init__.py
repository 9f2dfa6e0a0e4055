"""Settings: each declared once (:mod:`.settings`), converted by pure functions
(:mod:`.converters`) and loaded from defaults, an INI file, the environment and
flags (:mod:`.loading`).
"""

from greentask.config.converters import to_address, to_size
from greentask.config.loading import (
    Config,
    check_gateway_tls,
    check_worker_tls,
    control_socket_path,
    current,
    load,
    set_current,
)
from greentask.config.settings import SETTINGS, Setting, declare_section, render_markdown

__all__ = ["SETTINGS", "Config", "Setting", "check_gateway_tls", "check_worker_tls",
           "control_socket_path", "current", "declare_section", "load", "render_markdown",
           "set_current", "to_address", "to_size"]
