"""A reload (HUP) in the master: the new config and task code, and the way back.

The master owns the generations and the children; a :class:`Reloader` owns
what a reload replaces. :meth:`Reloader.begin` reads the settings again and
imports the task code they name (refusing, with the cause logged, when either
fails, so the running generation keeps serving); the master then forks the new
generation from that code. If a child of the new generation cannot start,
:meth:`Reloader.roll_back` restores the config and the code it replaced, so
the children that replace the old generation fork from code that works.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from greentask.config import Config, set_current
from greentask.daemon.preload import freeze_for_fork
from greentask.daemon.taskcode import SavedCode, TaskCode, TaskModuleError
from greentask.errors import ConfigError

log = logging.getLogger("greentask.master")


class ReloadRefused(Exception):
    """A reload that did not begin: the config or the task code does not load (logged)."""


class ReloadOutcome:
    """What became of the last reload, for ``greentask reload`` to wait on.

    ``number`` counts the reloads the master has begun or refused; ``state``
    is ``"none"`` (no reload yet), ``"in progress"``, ``"serving"`` (the new
    generation serves, the old one is retired) or ``"failed"`` (``error``
    says why; the generation that ran before keeps serving).
    """

    def __init__(self) -> None:
        self.number = 0
        self.state = "none"
        self.generation = 1
        self.error: str | None = None

    def begun(self, generation: int) -> None:
        """A reload started generation ``generation``."""
        self.number += 1
        self.state, self.generation, self.error = "in progress", generation, None

    def refused(self, generation: int, error: str) -> None:
        """A reload did not begin; generation ``generation`` keeps serving."""
        self.number += 1
        self.state, self.generation, self.error = "failed", generation, error

    def failed(self, error: str) -> None:
        """The reload in progress was rolled back."""
        self.state, self.error = "failed", error

    def serving(self) -> None:
        """The new generation serves and the old one is retired."""
        self.state = "serving"

    def as_dict(self) -> dict[str, Any]:
        """The outcome as ``greentask status --json`` shows it."""
        return {"number": self.number, "state": self.state, "generation": self.generation,
                "error": self.error}


@dataclass(frozen=True)
class ReloadInFlight:
    """What a reload replaced, to go back to if the new generation cannot start."""

    config: Config
    generation: int
    processes: int
    task_code: SavedCode


class Reloader:
    """Loads a reload's config and task code; restores them when it fails.

    ``read_config`` re-reads the settings (the worker passes one that applies
    the same file and flags as at start); without it a reload keeps the config.
    """

    def __init__(self, task_code: TaskCode,
                 read_config: Callable[[], Config] | None = None) -> None:
        self.task_code = task_code
        self._read_config = read_config

    def load(self, config: Config, running: Config) -> SavedCode:
        """Make ``config`` current and import the task code it names; return what it replaced.

        Without ``preload_tasks`` the code is forgotten (each child imports
        its own, and checks the sections its modules declare). On failure
        ``running`` stays current and TaskModuleError, or ConfigError for a
        task module's section, propagates.
        """
        set_current(config)
        try:
            saved = self.task_code.reload(
                config.worker.tasks if config.worker.preload_tasks else None)
        except TaskModuleError:
            set_current(running)
            raise
        if config.worker.preload_tasks:
            try:
                config.check_sections()
            except ConfigError:
                self.task_code.restore(saved)
                set_current(running)
                raise
        freeze_for_fork()
        return saved

    def begin(self, running: Config, generation: int,
              processes: int) -> tuple[Config, ReloadInFlight]:
        """The new config and what it replaces.

        Raises :class:`ReloadRefused` (the cause logged) when either does not load.
        """
        try:
            config = self._read_config() if self._read_config else running
        except ConfigError as exc:
            log.error("SIGHUP: reload refused, the running workers keep serving: %s", exc)
            raise ReloadRefused(f"the config does not load: {exc}") from None
        try:
            saved_code = self.load(config, running)
        except ConfigError as exc:
            log.error("SIGHUP: reload refused, the running workers keep serving: %s", exc)
            raise ReloadRefused(f"the config does not load: {exc}") from None
        except TaskModuleError as exc:
            log.error("SIGHUP: reload failed, generation %d keeps serving: %s. Fix the "
                      "[worker] tasks modules, then reload again", generation, exc,
                      exc_info=exc.__cause__)
            raise ReloadRefused(f"the task code does not load: {exc}") from None
        if config.worker.bind != running.worker.bind:
            log.warning("SIGHUP: [worker] bind changed; the listener stays at %s:%d until a "
                        "restart", *running.worker.bind)
            config.worker.bind = running.worker.bind
        return config, ReloadInFlight(running, generation, processes, saved_code)

    def roll_back(self, reload: ReloadInFlight) -> None:
        """Make the config and the task code ``reload`` replaced current again."""
        self.task_code.restore(reload.task_code)
        set_current(reload.config)
        freeze_for_fork()
