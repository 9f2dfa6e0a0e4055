"""What ``greentask reload``, ``scale`` and ``stop`` wait for: the outcome, not the request.

The master's control socket answers a command at once (its loop must never
block), so the command line asks for ``status`` until the master's state
shows how the command ended: a reload's new generation serves or the reload
failed (``master.reload`` in the status), the wanted number of workers
serves, or the master has exited. The functions that read a status are pure;
:func:`wait_for_outcome` does the asking, with a deadline.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from greentask.daemon.control import ControlError, NoMaster, send_command
from greentask.daemon.lifecycle import processes_text

#: How often the command line asks the master for its status (seconds).
POLL_INTERVAL = 0.1

Status = dict[str, Any]


@dataclass(frozen=True)
class Outcome:
    """How a command ended: ``ok`` and what to tell the operator."""

    ok: bool
    message: str


def _serving(status: Status) -> list[Status]:
    """The workers that serve and are not being retired."""
    return [w for w in status["workers"] if not w["retiring"] and w["state"] in ("ready",
                                                                                 "recycle")]


def reload_outcome(before: Status | None, status: Status) -> Outcome | None:
    """How the reload asked for after ``before`` ended, or None while it runs."""
    reload = status["master"]["reload"]
    earlier = 0 if before is None else before["master"]["reload"]["number"]
    if reload["number"] <= earlier or \
            reload["state"] == "in progress":
        return None
    if reload["state"] == "failed":
        return Outcome(False, f"reload failed: {reload['error']}")
    return Outcome(True, f"reloaded: generation {reload['generation']} serves with "
                         f"{processes_text(len(_serving(status)))}")


def scale_outcome(processes: int, status: Status) -> Outcome | None:
    """Done once exactly ``processes`` workers serve (none booting, extras retired)."""
    live = [w for w in status["workers"] if not w["retiring"]]
    if len(live) != processes or len(_serving(status)) != processes:
        return None
    return Outcome(True, f"scaled to {processes_text(processes)}, all serving")


def timed_out(command: str, status: Status | None, waited: float,
              processes: int | None = None) -> Outcome:
    """What is true when ``command`` has not ended within ``waited`` seconds."""
    if status is None:
        return Outcome(False, f"{command}: the master did not answer for {waited:g} s; see "
                              "the worker log")
    serving = len(_serving(status))
    if command == "reload":
        return Outcome(False, f"reload still in progress after {waited:g} s: generation "
                              f"{status['master']['generation']}, {serving} of "
                              f"{processes_text(status['master']['processes'])} serve; see "
                              "the worker log")
    if command == "scale":
        return Outcome(False, f"scaling to {processes_text(processes or 0)}: {serving} serve "
                              f"after {waited:g} s; see the worker log")
    inflight = sum(w["inflight"] for w in status["workers"])
    return Outcome(False, f"the master is still stopping after {waited:g} s: {inflight} "
                          "task(s) in flight, which it lets finish within [worker] "
                          "graceful_timeout")


def wait_for_outcome(path: str, command: str, before: Status | None, timeout: float,
                     processes: int | None = None) -> Outcome:
    """Ask the master at ``path`` for its status until ``command`` has ended, or ``timeout``.

    ``before`` is the status from before a reload was asked for (its number
    tells this reload from earlier ones).
    """
    started = time.monotonic()
    last: Status | None = before
    while True:
        remaining = timeout - (time.monotonic() - started)
        try:
            status = send_command(path, "status", timeout=min(5.0, max(1.0, remaining)))
        except NoMaster:
            if command == "stop":
                return Outcome(True, "stopped")
            return Outcome(False, f"{command}: the master exited; see the worker log")
        except ControlError:
            status = None  # slow to answer (busy forking, say): ask again
        if status is not None:
            last = status
            if command == "reload":
                outcome = reload_outcome(before, status)
            elif command == "scale":
                assert processes is not None
                outcome = scale_outcome(processes, status)
            else:
                outcome = None
            if outcome is not None:
                return outcome
        waited = time.monotonic() - started
        if waited >= timeout:
            return timed_out(command, last, timeout, processes)
        time.sleep(POLL_INTERVAL)
